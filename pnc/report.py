"""Reports: a study's page (its kind's report section, :meth:`pnc.kinds.base.StudyKind.report`) and the
cross-study comparison, drawn from MLflow (:mod:`pnc.frames`) into ``reports/<name>/`` (:mod:`pnc.figures`).

Reads MLflow only (never torch). A study's report uses the runs of the spec's own cells (:class:`RunSelection`),
never runs of the same models trained with other settings. Each report is rendered into a temporary folder and
moved into place in one rename, so an interrupted report never leaves a half-written folder.
"""
from __future__ import annotations

import html
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from . import figures, tracking
from .catalog import model_depth, model_order
from .errors import PncError
from .figures import log_axis
from .frames import RunSelection, layer_frame, noise_key, study_of
from .registry import KINDS
from .tracking import tracking_uri


def render_study(spec: Any, out: Path) -> Path:
    """Write ``out/<study>/index.html`` (+ chart HTML/PNG files) atomically; returns the folder."""
    sel = RunSelection(spec, fallback=True)

    def fill(tmp: Path) -> None:
        sections = KINDS.get(spec.kind).report(spec, tmp, sel)
        (tmp / "index.html").write_text(figures.page(f"{spec.name} ({spec.kind})", [("About", html.escape(spec.description or ""))]
                                             + sections, warnings=sel.warnings, notes=sel.notes))

    path = figures.publish(out, spec.name, fill)
    parent = tracking.find_study_parent(spec.experiment, spec.name)
    if parent is not None:  # the report on the study's parent run page too (its artifacts, folder report/)
        tracking.log_folder(parent, path, "report")
    for w in sel.warnings:
        print(f"warning: {spec.name}: {w}", file=sys.stderr)
    for n in sel.notes:
        print(f"note: {spec.name}: {n}", file=sys.stderr)
    return path


def study_summary(spec: Any, selection: RunSelection | None = None) -> dict:
    """A study's analyses from MLflow (its kind's :meth:`~pnc.kinds.base.StudyKind.analyses`): {"metrics", "tags",
    "details", "curves"}, from the runs of ``spec``'s own cells (``selection``, default :class:`RunSelection`)."""
    return KINDS.get(spec.kind).analyses(spec, selection)


# ----------------------------------------------------------------------------- cross-study comparison
def curve_keys() -> tuple[tuple[str, str], ...]:
    """(metric, role) of each kind's per-layer CDNV curve: what `pnc compare` draws by default."""
    return tuple(dict.fromkeys((k.curve_key, k.curve_role) for k in KINDS.all()))


def _setting(row: Any, noise_varies: bool) -> str:
    parts = (f"noise={row.noise}" if noise_varies or row.noise != "clean" else "", f"from {row.source}" if row.source else "",
             f"on {row.target}" if row.target else "")
    return " ".join(p for p in parts if p)


def _compare_panel(d: pd.DataFrame, title: str):
    """One study's curves: colour per curve (per setting, with a dash per model when both vary)."""
    import altair as alt

    key = d.key.iloc[0]
    log = log_axis(key)
    if log:
        d = d[d.value > 0]
    models = model_order(d.model.unique())
    settings = sorted(d.setting.unique(), key=lambda x: (noise_key(x.split(" ")[0].removeprefix("noise=")), x))
    by_setting = len(settings) > 1 or settings != [""]
    field, order = ("setting", settings) if by_setting else ("model", models)
    n = len(order)
    color = alt.Color(f"{field}:N", sort=order, title=field,
                      scale=alt.Scale(scheme="tableau10" if n <= 10 else "category20"),
                      legend=alt.Legend(symbolLimit=0, labelLimit=260, columns=1 if n <= 20 else 2))
    dash = (alt.StrokeDash("model:N", sort=models, title="model",
                           legend=alt.Legend(symbolLimit=0, symbolType="stroke", symbolStrokeWidth=2, symbolSize=500))
            if by_setting and len(models) > 1 else alt.Undefined)
    base = alt.Chart(d).encode(
        x=alt.X("rel_depth:Q", title="relative depth (layer / last layer)", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("value:Q", title=f"{key}{' (log)' if log else ''}", scale=alt.Scale(type="log" if log else "linear",
                                                                                    zero=False)),
        color=color, detail="curve:N",
        tooltip=["study", "curve", "layer", alt.Tooltip("value:Q", format=".4g")],
    )
    # lines carry the dash per model (its legend drawn as strokes); points only mark the layers
    return (base.mark_line(strokeWidth=1.6).encode(strokeDash=dash) + base.mark_point(filled=True, size=14, opacity=1)
            ).properties(width=380, height=280, title=title)


def compare_chart(df: pd.DataFrame):
    """A panel per study (its own colour legend and y axis; log only for CDNV/NC1), curves on relative depth."""
    import altair as alt

    labels = list(dict.fromkeys(df.study))
    panels = [_compare_panel(df[df.study == s], s) for s in labels]
    if len(panels) == 1:
        return panels[0]
    return alt.concat(*panels, columns=min(3, len(panels))).resolve_scale(color="independent", strokeDash="independent",
                                                                           y="independent")


def render_compare(studies: list[str], out: Path, metric: str | None = None) -> Path:
    """One report overlaying a per-layer metric of several studies on relative depth.

    A spec file stands for the runs of its cells (the newest run per cell name when none has its exact
    settings, with a warning); a bare study name for the newest run per cell name. Written to
    ``out/compare-<studies>`` (``-<metric>`` appended when ``metric`` is given)."""
    frames, warnings, notes, seen = [], [], [], {}
    keys = [metric] if metric else list(dict.fromkeys(k for k, _ in curve_keys()))
    roles = list(dict.fromkeys(r for _, r in curve_keys()))
    for s in studies:
        label, exp, spec = study_of(s)
        sel = RunSelection(spec, fallback=True) if spec is not None else None
        df = pd.concat([layer_frame(exp, keys, role=r, runs=sel) for r in roles], ignore_index=True)
        if df.empty:
            raise PncError(f"study {label!r} has no finished runs with {', '.join(keys)} in MLflow ({tracking_uri()})")
        if sel is not None:
            warnings += [f"{label}: {m}" for m in sel.warnings if f"{label}: {m}" not in warnings]
            notes += [f"{label}: {m}" for m in sel.notes if f"{label}: {m}" not in notes]
        key = next(k for k in keys if k in set(df.metric))
        df = df[df.metric == key]
        if key == "cdnv/train_noisy":
            df = df[df.noise == "clean"] if (df.noise == "clean").any() else df
        seen[label] = seen.get(label, 0) + 1
        shown = label if seen[label] == 1 else f"{label} ({seen[label]})"
        noise_varies = df.noise.nunique() > 1
        setting = [_setting(r, noise_varies) for r in df.itertuples()]
        df = df.assign(study=shown, key=key, setting=setting,
                       curve=[f"{m} {x}".strip() for m, x in zip(df.model, setting)])
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    name = "compare-" + "-".join(study_of(s)[0] for s in studies)
    if metric:
        name += "-" + "".join(ch if ch.isalnum() or ch in "._" else "_" for ch in metric)

    def fill(tmp: Path) -> None:
        figures.save(compare_chart(df), tmp, "compare")
        rows = (df.sort_values("layer").groupby(["study", "key", "model", "setting", "curve"], sort=False)
                 .agg(layers=("layer", "max"), first=("value", "first"), last=("value", "last")).reset_index()
                 .rename(columns={"key": "metric"}))
        rows["layers"] += 1
        rows = rows.loc[sorted(rows.index, key=lambda i: (list(dict.fromkeys(df.study)).index(rows.study[i]),
                                                             model_depth(rows.model[i]), rows.model[i],
                                                             noise_key(rows.setting[i].split(" ")[0].removeprefix("noise=")),
                                                             rows.setting[i]))]
        rows = rows.drop(columns=["model", "setting"])
        (tmp / "index.html").write_text(figures.page(name, [("Per-layer curves on relative depth (a panel per study)", figures.figure("compare")),
                                                     ("Curves", figures.table(rows))], warnings=warnings, notes=notes))

    path = figures.publish(out, name, fill)
    for m in warnings:
        print(f"warning: {m}", file=sys.stderr)
    for m in notes:
        print(f"note: {m}", file=sys.stderr)
    return path
