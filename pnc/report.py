"""Reports: MLflow -> tidy DataFrame -> Altair charts (offline HTML + PNG) in ``reports/<study>/``.

Reads MLflow only (never torch). A study's analyses and report use the runs of the spec's own cells
(:class:`RunSelection`), never runs of the same models trained with other settings. Each study's report
is rendered into a temporary folder and moved into place in one rename, so an interrupted report never
leaves a half-written folder.
"""
from __future__ import annotations

import html
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import PncError

DEPTH_KEYS = [("cdnv/train", "CDNV (train)", True), ("nc2/train", "NC2 (train)", False), ("probe_acc/test", "probe accuracy (test)", False)]
NOISE_KEYS = [("cdnv/train_noisy", "CDNV (noisy)", True), ("nc2/train_noisy", "NC2 (noisy)", False),
              ("mem_ratio/train", "memorization ratio", True), ("probe_acc/test", "probe accuracy (test)", False)]
TRANSFER_KEYS = [("cdnv/target", "CDNV (target)", True), ("nc2/target", "NC2 (target)", False),
                 ("probe_acc/target_test", "probe accuracy (target test)", False)]


# ----------------------------------------------------------------------------- which runs stand for a spec
def model_depth(name: str) -> int:
    """The number in a model's name (resnet14 -> 14; 0 without one): models sort by depth, not as text."""
    import re

    m = re.search(r"(\d+)", str(name))
    return int(m.group(1)) if m else 0


def model_order(models: Any) -> list[str]:
    """Distinct model names, shallowest first (resnet8 before resnet14)."""
    return sorted({str(m) for m in models}, key=lambda m: (model_depth(m), m))


def _noise_key(tag: Any) -> tuple:
    """Sort key of a noise tag: clean first, then per kind by numeric level (2 before 10)."""
    tag = str(tag)
    if tag in ("clean", "", "nan"):
        return (0, "", 0.0, "")
    kind, _, level = tag.partition(":")
    try:
        return (1, kind, float(level), level)
    except ValueError:
        return (1, kind, float("inf"), level)


def spec_cells(spec: Any, role: str = "cell") -> dict[str, str]:
    """{cell id: cell name} of a spec's cells; for role "transfer", of its (cell, target) runs (id ``<cell>:<target>``)."""
    from .study import expand

    out: dict[str, str] = {}
    for c in expand(spec):
        if role == "transfer":
            for t in c.targets:
                out[f"{c.id}:{t}"] = f"{c.name},target={t}"
        else:
            out[c.id] = c.name
    return out


def _newest(runs: list, key) -> list:
    """The newest run per ``key(run)``; ``runs`` come oldest first."""
    latest: dict[str, Any] = {}
    for r in runs:
        latest[key(r)] = r
    return list(latest.values())


def _name_key(r: Any) -> str:
    from . import tracking

    return r.data.tags.get(tracking.TAG_CELL_NAME, r.info.run_id) + r.data.tags.get("target", "")


def _overrides_text(tag: str | None) -> str:
    """``pnc.overrides`` (a JSON list) as the command line wrote it: ``--set a=1 --set b=2``; "" for none."""
    if not tag:
        return ""
    try:
        items = json.loads(tag)
    except ValueError:
        return str(tag)
    return " ".join(f"--set {x}" for x in items) if isinstance(items, list) else str(items)


def _settings_summary(runs: list) -> str:
    """'epochs 2, --set train.epochs=2 (resnet8, resnet14); epochs 4, ... (resnet20)'."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in runs:
        key = (r.data.params.get("train.epochs", "?"), _overrides_text(r.data.tags.get("pnc.overrides")) or "no --set")
        groups.setdefault(key, []).append(r.data.tags.get("pnc.model", "?") + (f" -> {r.data.tags['target']}"
                                                                             if r.data.tags.get("target") else ""))
    return "; ".join(f"epochs {e}, {o} ({', '.join(sorted(set(ms), key=lambda m: (model_depth(m), m)))})"
                     for (e, o), ms in sorted(groups.items(), key=lambda g: (len(g[0][0]), g[0])))


class RunSelection:
    """The finished runs that stand for a spec's cells: per cell id of ``study.expand(spec)`` (tag ``pnc.cell_id``),
    the newest. Runs of the same cell names trained with other settings (``pnc run --set ...``) are never mixed in.

    With ``fallback`` (the report of a spec file run with other settings), when *no* run has one of the spec's cell
    ids, the newest run per cell name is used instead and :attr:`warnings` says so. :attr:`notes` lists cells
    with no finished run yet. Runs are looked up on first use, once per role.
    """

    def __init__(self, spec: Any, fallback: bool = False):
        self.spec = spec
        self.fallback = fallback
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self._cache: dict[str, list] = {}

    @property
    def messages(self) -> list[str]:
        return self.warnings + self.notes

    def resolved(self, role: str = "cell") -> bool:
        """Whether the runs of ``role`` were looked up already."""
        return role in self._cache

    def runs(self, role: str = "cell") -> list:
        if role in self._cache:
            return self._cache[role]
        from . import tracking

        found = _runs(self.spec.experiment, role)
        cells = spec_cells(self.spec, role)
        exact = _newest([r for r in found if r.data.tags.get(tracking.TAG_CELL) in cells],
                        key=lambda r: r.data.tags[tracking.TAG_CELL])
        what = "target runs" if role == "transfer" else "cells"
        if exact:
            chosen = exact
            have = {r.data.tags[tracking.TAG_CELL] for r in exact}
            missing = [name for cid, name in cells.items() if cid not in have]
            if missing:
                self.notes.append(f"{len(missing)} of {len(cells)} {what} of this spec have no finished run yet: "
                                  + ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else ""))
        elif self.fallback and found:
            chosen = _newest(found, _name_key)  # the spec's own settings never ran: whatever ran last, said loudly
            spec_epochs = getattr(getattr(self.spec, "train", None), "epochs", None)
            self.warnings.append(
                f"no runs of this spec's exact cells; showing the newest run of each model, trained with other settings: "
                f"{_settings_summary(chosen)}" + (f" (this spec: epochs {spec_epochs})" if spec_epochs is not None else "")
                + ". Run `pnc run` on this spec to measure its own cells.")
        else:
            chosen = []
        self._cache[role] = chosen
        return chosen


# ----------------------------------------------------------------------------- MLflow -> DataFrame
def _runs(experiment: str, role: str) -> list:
    from . import tracking

    c = tracking.client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_ROLE}` = '{role}' and attributes.status = 'FINISHED'",
                         max_results=5000, order_by=["attributes.start_time ASC"])
    return runs


def _selected(experiment: str, role: str, runs: "RunSelection | list | None") -> list:
    """The runs a frame is built from: a spec's (``RunSelection``), a given list, or else the newest run per cell name."""
    if isinstance(runs, RunSelection):
        return runs.runs(role)
    if runs is not None:
        return list(runs)
    return _newest(_runs(experiment, role), _name_key)


def layer_frame(experiment: str, keys: list[str], role: str = "cell", runs: "RunSelection | list | None" = None) -> pd.DataFrame:
    """One row per (run, metric, layer): run_id, cell, model, noise, source, target, metric, layer, rel_depth, value.

    ``runs``: a :class:`RunSelection` (the runs of a spec's cells), a list of runs, or None (the newest run per cell
    name, whatever settings it was trained with)."""
    from . import tracking

    rows = []
    for r in _selected(experiment, role, runs):
        tags = r.data.tags
        for key in keys:
            if key not in r.data.metrics:
                continue
            vals = tracking.layer_history(r.info.run_id, key)
            n = len(vals)
            for layer, v in enumerate(vals):
                rows.append({
                    "run_id": r.info.run_id, "cell": tags.get(tracking.TAG_CELL_NAME, ""), "model": tags.get("pnc.model", ""),
                    "depth": int(tags.get("pnc.depth", "0") or 0), "noise": tags.get("pnc.noise", "clean"),
                    "noise_kind": tags.get("pnc.noise_kind", "clean"), "noise_level": tags.get("pnc.noise_level", "0"),
                    "source": tags.get("source", ""), "target": tags.get("target", ""),
                    "metric": key, "layer": layer, "rel_depth": layer / max(1, n - 1), "value": v,
                })
    return pd.DataFrame(rows)


def run_frame(experiment: str, role: str = "cell", runs: "RunSelection | list | None" = None) -> pd.DataFrame:
    """One row per selected finished run (see :func:`layer_frame`): tags, ``epochs`` (param ``train.epochs``),
    ``overrides`` (the ``--set`` it was run with) and final scalar metrics; models shallowest first."""
    rows = []
    for r in _selected(experiment, role, runs):
        row = {"run_id": r.info.run_id, **{k: v for k, v in r.data.tags.items() if k.startswith("pnc.") or k in ("source", "target")}}
        row["epochs"] = r.data.params.get("train.epochs", "")
        row["overrides"] = _overrides_text(r.data.tags.get("pnc.overrides")) or "none"
        row.update({k: v for k, v in r.data.metrics.items() if "/" not in k or k.startswith(("train/", "test/", "val/", "noise/", "final/", "best/", "efficient_depth/", "noise_map/", "transfer/"))})
        rows.append(row)
    return _sort_runs(pd.DataFrame(rows))


def _sort_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Rows by model depth (resnet8 before resnet14), then noise setting (clean first, numeric levels), source, target."""
    if df.empty or "pnc.model" not in df:
        return df

    def key(i: Any) -> tuple:
        row = df.loc[i]
        return (model_depth(row["pnc.model"]), str(row["pnc.model"]), _noise_key(row.get("pnc.noise", "clean")),
                str(row.get("source", "")), str(row.get("target", "")))

    return df.loc[sorted(df.index, key=key)].reset_index(drop=True)


# ----------------------------------------------------------------------------- charts
def _curves(df: pd.DataFrame, key: str, title: str, log: bool, color: str, color_sort: list[str] | None,
            width: int = 220, height: int = 150, rule: float | None = None):
    import altair as alt

    d = df[df.metric == key]
    if log:
        d = d[d.value > 0]
    y = alt.Y("value:Q", title=title, scale=alt.Scale(type="log") if log else alt.Undefined)
    base = alt.Chart(d).mark_line(point=alt.OverlayMarkDef(size=18)).encode(
        x=alt.X("layer:Q", title="layer (tapped block)", axis=alt.Axis(tickMinStep=1, format="d")),
        y=y,
        color=alt.Color(f"{color}:N", sort=color_sort, title=color),
        tooltip=["cell", "layer", alt.Tooltip("value:Q", format=".4g")],
    ).properties(width=width, height=height)
    if rule is not None:
        base = base + alt.Chart(pd.DataFrame({"y": [rule]})).mark_rule(strokeDash=[4, 4], color="gray").encode(y="y:Q")
    return base


def depth_chart(df: pd.DataFrame, title: str):
    """The paper's Figure 1 layout: rows CDNV (log), NC2, probe accuracy; x = layer; one line per model."""
    import altair as alt

    order = df.drop_duplicates("model").sort_values("depth").model.tolist()
    rows = [_curves(df, k, t, log, "model", order, width=420, height=170) for k, t, log in DEPTH_KEYS if k in set(df.metric)]
    return alt.vconcat(*rows).properties(title=title)


def noise_chart(df: pd.DataFrame, title: str):
    """Figures 2, 6-9: rows CDNV (noisy, log), NC2, memorization ratio (Delta = 1 line), probe accuracy; columns = models."""
    import altair as alt

    models = df.drop_duplicates("model").sort_values("depth").model.tolist()
    levels = sorted(df.noise.unique(), key=_noise_key)  # clean first, then numeric levels per kind
    grid = []
    for key, t, log in NOISE_KEYS:
        if key not in set(df.metric):
            continue
        row = [_curves(df[df.model == m], key, f"{t}", log, "noise", levels, rule=1.0 if key.startswith("mem_ratio") else None)
               .properties(title=m if key == NOISE_KEYS[0][0] else "") for m in models]
        grid.append(alt.hconcat(*row))
    return alt.vconcat(*grid).properties(title=title)


def _save(chart: Any, folder: Path, stem: str) -> list[str]:
    chart.save(str(folder / f"{stem}.html"), inline=True)
    chart.save(str(folder / f"{stem}.png"), scale_factor=1.5)
    return [f"{stem}.html", f"{stem}.png"]


def _page(title: str, sections: list[tuple[str, str]], warnings: list[str] = (), notes: list[str] = ()) -> str:
    body = "\n".join(f"<section><h2>{html.escape(h)}</h2>\n{content}</section>" for h, content in sections)
    top = "".join(f"<p class='warning'><b>Warning:</b> {html.escape(w)}</p>\n" for w in warnings)
    top += "".join(f"<p class='note'><b>Note:</b> {html.escape(n)}</p>\n" for n in notes)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
            "img{max-width:100%}.warning{background:#fff3cd;border:1px solid #d39e00;padding:.5em 1em}"
            ".note{background:#eef;border:1px solid #99c;padding:.5em 1em}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>\n{top}{body}\n<p><a href='../index.html'>all reports</a></p></body></html>")


def _figure(stem: str) -> str:
    return (f"<p><a href='{stem}.html'>interactive chart</a></p>"
            f"<img src='{stem}.png' alt='{html.escape(stem)}'>")


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, escape=True)


# ----------------------------------------------------------------------------- study reports
def _render_depth(spec: Any, folder: Path, sel: RunSelection) -> list[tuple[str, str]]:
    df = layer_frame(spec.experiment, [k for k, _, _ in DEPTH_KEYS] + ["nc1/train", "ncc_acc/train", "ncc_acc/test"], runs=sel)
    if df.empty:
        raise PncError(f"no finished runs of study {spec.name!r} in MLflow ({_where()}); run `pnc run` or `dvc repro` first")
    _save(depth_chart(df, f"{spec.name}: progressive collapse by depth"), folder, "layers")
    sections = [("Per-layer collapse and probe accuracy (Figure 1 layout)", _figure("layers"))]
    extra = [k for k in ("nc1/train", "ncc_acc/train", "ncc_acc/test") if k in set(df.metric)]
    if extra:
        import altair as alt

        order = df.drop_duplicates("model").sort_values("depth").model.tolist()
        ch = alt.hconcat(*[_curves(df, k, k, k.startswith("nc1"), "model", order) for k in extra])
        _save(ch, folder, "extra")
        sections.append(("NC1 and nearest-class-centre accuracy", _figure("extra")))
    runs = run_frame(spec.experiment, runs=sel)
    cols = [c for c in ["pnc.model", "epochs", "overrides", "train/final_acc", "test/acc", "val/acc", "test/holdout_acc",
                        "final/probe_acc_test", "best/probe_acc_test"] if c in runs]
    if cols:
        sections.append(("Final accuracies per model", _table(runs[cols])))
    summary = study_summary(spec, sel)
    det = summary["details"]
    if det.get("transitions"):
        t = pd.DataFrame([{"model": m, **{k: v for k, v in det["transitions"][m].items() if k != "slopes"},
                           "slopes (log CDNV / rel. depth)": ", ".join(f"{s:.2f}" for s in det["transitions"][m]["slopes"])}
                          for m in model_order(det["transitions"])])
        sections.append(("Transition phase (segmented fit of log CDNV; see README)", _table(t)))
    if det.get("efficient_depth"):
        e = det["efficient_depth"]
        text = (f"<p>Smallest depth whose CDNV curve shows the transition: <b>{e['transition_depth']}</b>; depth the "
                f"validation half of the test split picks: <b>{e['validation_depth']}</b>; holdout test accuracy given up by "
                f"the intrinsic choice: <b>{_fmt(e['cost'])}</b>.</p>")
        sections.append(("Efficient depth", text + _table(pd.DataFrame(e["per_depth"]))))
    return sections


def _render_noise(spec: Any, folder: Path, sel: RunSelection) -> list[tuple[str, str]]:
    keys = [k for k, _, _ in NOISE_KEYS] + ["cdnv/train_clean"]
    df = layer_frame(spec.experiment, keys, runs=sel)
    if df.empty:
        raise PncError(f"no finished runs of study {spec.name!r} in MLflow ({_where()}); run `pnc run` or `dvc repro` first")
    sections = []
    kinds = [k for k in df.noise_kind.unique() if k != "clean"]
    for kind in kinds:
        sub = df[(df.noise_kind == kind) | (df.noise == "clean")]
        stem = f"noise_{kind}"
        _save(noise_chart(sub, f"{spec.name}: {kind}"), folder, stem)
        sections.append((f"{kind}: collapse on noisy data, memorization ratio, probe accuracy", _figure(stem)))
    runs = run_frame(spec.experiment, runs=sel)
    cols = [c for c in ["pnc.model", "pnc.noise", "epochs", "overrides", "noise/realized_rate", "train/final_acc",
                        "train/clean_input_acc", "test/acc", "pnc.memorization_layers"] if c in runs]
    if cols:
        sections.append(("Memorization layers and final accuracies per cell", _table(runs[cols])))
    maps = study_summary(spec, sel)["details"].get("noise_maps")
    if maps:
        def levels(v: dict) -> str:
            names = v.get("settings") or [""] * len(v["levels"])
            srcs = v.get("level_source") or [""] * len(v["levels"])
            return ", ".join(f"{n}: {x:.4g}" + (" (nominal)" if s == "nominal" and n != "clean" and v["kind"] in LABEL_NOISE_KINDS else "")
                             for n, x, s in zip(names, v["levels"], srcs))

        t = pd.DataFrame([{"model / kind": k, "slope": v["slope"], "intercept": v["intercept"],
                           "leave-one-level-out MAE": v["loo_mae"], "cells: level": levels(v)} for k, v in maps.items()])
        sections.append(("Noise-level estimation from the intermediate-layer CDNV profile",
                          "<p>Label noise is measured by each cell's realised fraction of changed training labels "
                          "(<code>noise/realized_rate</code>; human label sets included), input corruption by its severity. "
                          "The error is leave-one-level-out, in the same units.</p>" + _table(t)))
    return sections


def _render_transfer(spec: Any, folder: Path, sel: RunSelection) -> list[tuple[str, str]]:
    from .transfer_report import render_transfer

    return render_transfer(spec, folder, sel)


def _where() -> str:
    from .tracking import tracking_uri

    return tracking_uri()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _default_permissions(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain mkdir / open would: 0o777 & ~umask for folders,
    0o666 & ~umask for files."""
    mask = _umask()
    dmode, fmode = 0o777 & ~mask, 0o666 & ~mask
    os.chmod(folder, dmode)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), dmode)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, fmode)


def publish(out: Path, name: str, fill) -> Path:
    """Render into a temporary folder beside ``out/name`` with ``fill(tmp)``, then swap it in.

    Never leaves a half-written ``out/name``: an interrupt before the swap keeps the previous
    folder; one between the two renames puts the previous folder back. The published folder and its
    files get the modes the umask gives (not mkdtemp's 0700), so others sharing the disk can read it.
    """
    out.mkdir(parents=True, exist_ok=True)
    final = out / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    old = None
    try:
        fill(tmp)
        _default_permissions(tmp)  # mkdtemp made it 0700: others sharing the disk could not read the report
        if final.exists():
            old = out / f".{name}-old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        if old is not None and old.exists():
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:  # interrupted between the two renames: put the previous report back
                os.replace(old, final)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def render_study(spec: Any, out: Path) -> Path:
    """Write ``out/<study>/index.html`` (+ chart HTML/PNG files) atomically; returns the folder."""

    sel = RunSelection(spec, fallback=True)

    def fill(tmp: Path) -> None:
        render = {"depth_sweep": _render_depth, "noise_sweep": _render_noise, "domain_transfer": _render_transfer}[spec.kind]
        sections = render(spec, tmp, sel)
        (tmp / "index.html").write_text(_page(f"{spec.name} ({spec.kind})", [("About", html.escape(spec.description or ""))]
                                              + sections, warnings=sel.warnings, notes=sel.notes))

    path = publish(out, spec.name, fill)
    for w in sel.warnings:
        print(f"warning: {spec.name}: {w}", file=sys.stderr)
    for n in sel.notes:
        print(f"note: {spec.name}: {n}", file=sys.stderr)
    return path


def render_index(out: Path) -> Path:
    """``out/index.html`` linking every study report found under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for d in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "index.html").exists()):
        items.append(f"<li><a href='{html.escape(d.name)}/index.html'>{html.escape(d.name)}</a></li>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>pnc reports</title></head><body>"
            "<h1>pnc reports</h1><ul>" + "\n".join(items) + "</ul></body></html>")
    path = out / "index.html"
    tmp = path.with_name(f".index.html.{os.getpid()}")
    tmp.write_text(page)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- study-level analyses
def study_summary(spec: Any, selection: RunSelection | None = None) -> dict:
    """The paper's proposed analyses for one study, from MLflow: {"metrics": {...}, "tags": {...}, "details": {...}}.

    Only the runs of ``spec``'s own cells count (``selection``, default :class:`RunSelection` of ``spec`` without
    fallback): runs of the same models trained with other settings (``--set``) are never mixed in.
    depth_sweep: transition per model and the efficient depth; noise_sweep: the per-(model, kind)
    noise-level map and its leave-one-level-out error; domain_transfer: per-layer rank correlation.
    """
    from . import analysis

    sel = selection if selection is not None else RunSelection(spec)
    metrics: dict[str, Any] = {}
    tags: dict[str, str] = {}
    details: dict[str, Any] = {}
    if spec.kind == "depth_sweep":
        df = layer_frame(spec.experiment, ["cdnv/train"], runs=sel)
        runs = run_frame(spec.experiment, runs=sel)
        if df.empty or runs.empty:
            return {"metrics": metrics, "tags": tags, "details": details}
        rows = []
        for model in model_order(df.model.unique()):
            d = df[df.model == model]
            r = runs[runs.run_id.isin(set(d.run_id))] if "run_id" in runs and "run_id" in d else runs[runs["pnc.model"] == model]
            if r.empty or "val/acc" not in r:
                continue
            r = r.iloc[-1]
            curve = d.sort_values("layer").value.tolist()
            t = analysis.detect_transition(curve)
            details.setdefault("transitions", {})[model] = t.as_dict()
            tags[f"pnc.transition.{model}"] = (f"layers {t.start}-{t.end} (confidence {t.confidence:.2f})" if t.found
                                              else f"none: {t.reason}")
            rows.append((int(d.depth.iloc[0]), model, curve, float(r["val/acc"]), float(r["test/holdout_acc"])))
        if rows:
            rows.sort()
            e = analysis.efficient_depth([x[0] for x in rows], [x[2] for x in rows], [x[3] for x in rows], [x[4] for x in rows])
            details["efficient_depth"] = e.as_dict()
            metrics["efficient_depth/validation"] = e.validation_depth
            if e.transition_depth is not None:
                metrics["efficient_depth/transition"] = e.transition_depth
                metrics["efficient_depth/test_acc_cost"] = e.cost
            tags["pnc.efficient_depth"] = (f"transition: {e.transition_depth}, validation: {e.validation_depth}, "
                                           f"cost: {e.cost if e.cost is None else round(e.cost, 4)}")
    elif spec.kind == "noise_sweep":
        df = layer_frame(spec.experiment, ["cdnv/train_noisy"], runs=sel)
        if df.empty:
            return {"metrics": metrics, "tags": tags, "details": details}
        maps, skipped = noise_maps(df, run_frame(spec.experiment, runs=sel))
        for name, m in maps.items():
            model, kind = m["model"], m["kind"]
            if m["loo_abs_errors"]:
                metrics[f"noise_map/{model}/{kind}/loo_mae"] = m["loo_mae"]
            metrics[f"noise_map/{model}/{kind}/slope"] = m["slope"]
        details["noise_maps"] = maps
        if skipped:
            details["noise_map_skipped"] = skipped
    elif spec.kind == "domain_transfer":
        corr = _transfer_correlations(spec, sel)
        details["transfer_correlation"] = corr.curves()  # per-step curves, logged to the parent run
        details["transfer"] = corr.as_dict()
        rho = [r["rho"] for r in corr.pooled if r["rho"] == r["rho"]]
        if rho:
            metrics["transfer/spearman_mean"] = sum(rho) / len(rho)
        if corr.pooled:
            last = corr.pooled[-1]
            if last["rho"] == last["rho"]:
                metrics["transfer/spearman_final_layer"] = last["rho"]
                tags["pnc.transfer_correlation"] = (f"final layer: rho {last['rho']:.2f} ({corr.level:.0%} CI {last['lo']:.2f}"
                                                    f"..{last['hi']:.2f}; n={last['n']} off-domain pairs, {last['targets']} targets)")
            else:
                tags["pnc.transfer_correlation"] = f"final layer: no rho ({last['note']})"
    return {"metrics": {k: float(v) for k, v in metrics.items() if v is not None}, "tags": tags, "details": details}


def _transfer_correlations(spec: Any, sel: RunSelection) -> Any:
    """:func:`pnc.analysis.transfer_correlation` of the spec's finished target runs."""
    import math

    from . import analysis

    df = layer_frame(spec.experiment, ["cdnv/target", "probe_acc/target_test"], role="transfer", runs=sel)
    if df.empty:
        return analysis.TransferCorrelation([], {}, [], {})
    piv = df.pivot_table(index=["model", "source", "target", "layer"], columns="metric", values="value").reset_index()
    piv = piv.rename(columns={"cdnv/target": "cdnv", "probe_acc/target_test": "probe_acc"})
    for col in ("cdnv", "probe_acc"):
        if col not in piv:
            piv[col] = math.nan
    return analysis.transfer_correlation(piv)


LABEL_NOISE_KINDS = ("symmetric", "class_dependent", "human")


def noise_maps(df: pd.DataFrame, runs: pd.DataFrame) -> tuple[dict, list[str]]:
    """Noise-level maps per (model, noise kind) from a noise sweep's ``cdnv/train_noisy`` curves.

    The level of a label-noise cell (symmetric, class-dependent, human label sets) is the fraction of
    its training labels that differ from the clean ones, as logged (``noise/realized_rate``); the
    nominal rate is the fallback when that metric is missing (a cell of a human label set without it is
    skipped). Input corruptions use their severity; the clean cell is level 0 of every kind.
    Returns ({"model/kind": NoiseMap.as_dict()}, reasons for cells left out).
    """
    from . import analysis

    realized: dict[str, float] = {}
    if not runs.empty and "noise/realized_rate" in runs:
        realized = {r: float(v) for r, v in zip(runs.run_id, runs["noise/realized_rate"]) if v == v}
    maps: dict[str, dict] = {}
    skipped: list[str] = []
    for model in model_order(df.model.unique()):
        dm = df[df.model == model]
        for kind in sorted(k for k in dm.noise_kind.unique() if k != "clean"):
            label_noise = kind in LABEL_NOISE_KINDS
            cells = []
            for noise, dn in dm[(dm.noise_kind == kind) | (dm.noise == "clean")].groupby("noise"):
                run_id, nominal = dn.run_id.iloc[0], "0" if noise == "clean" else str(dn.noise_level.iloc[0])
                if label_noise and run_id in realized:
                    level, source = realized[run_id], "realized"
                else:
                    try:
                        level, source = float(nominal), "nominal"
                    except ValueError:
                        skipped.append(f"{model} {noise}: no noise/realized_rate logged and no numeric nominal level")
                        continue
                cells.append((level, str(noise), source, dn.sort_values("layer").value.tolist()))
            if len(cells) < 2:
                continue
            cells.sort(key=lambda c: (c[0], c[1]))
            m = analysis.fit_noise_map(model, kind, [c[0] for c in cells], [c[3] for c in cells])
            m.settings = [c[1] for c in cells]
            m.level_source = [c[2] for c in cells]
            maps[f"{model}/{kind}"] = m.as_dict()
    return maps, skipped


# ----------------------------------------------------------------------------- cross-study comparison
CURVE_KEYS = ("cdnv/train", "cdnv/train_noisy", "cdnv/target")
LOG_METRICS = ("cdnv", "nc1")  # variability ratios spanning decades; accuracies, NC2 and memorization ratios stay linear


def log_axis(key: str) -> bool:
    """Whether a per-layer metric is drawn on a log axis: CDNV and NC1 (``cdnv/...``, ``nc1/...``) only."""
    return key.split("/", 1)[0] in LOG_METRICS


def _study_of(study: str) -> tuple[str, str, Any]:
    """(label, experiment, spec or None) for a spec path or a study/experiment name."""
    from .spec import load_spec

    if study.endswith((".yaml", ".yml")) or "/" in study:
        spec = load_spec(study)
        return spec.name, spec.experiment, spec
    return study, study, None


def _experiment_of(study: str) -> tuple[str, str]:
    """(label, experiment) for a spec path or a study/experiment name."""
    label, exp, _ = _study_of(study)
    return label, exp


def _setting(row: Any, noise_varies: bool) -> str:
    parts = []
    if noise_varies or row.noise != "clean":
        parts.append(f"noise={row.noise}")
    if row.source:
        parts.append(f"from {row.source}")
    if row.target:
        parts.append(f"on {row.target}")
    return " ".join(parts)


def _compare_panel(d: pd.DataFrame, title: str):
    """One study's curves: colour per curve (per setting, with a dash per model when both vary)."""
    import altair as alt

    key = d.key.iloc[0]
    log = log_axis(key)
    if log:
        d = d[d.value > 0]
    models = model_order(d.model.unique())
    settings = sorted(d.setting.unique(), key=lambda x: (_noise_key(x.split(" ")[0].removeprefix("noise=")), x))
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
    keys = [metric] if metric else list(CURVE_KEYS)
    for s in studies:
        label, exp, spec = _study_of(s)
        sel = RunSelection(spec, fallback=True) if spec is not None else None
        df = pd.concat([layer_frame(exp, keys, role=r, runs=sel) for r in ("cell", "transfer")], ignore_index=True)
        if df.empty:
            raise PncError(f"study {label!r} has no finished runs with {', '.join(keys)} in MLflow ({_where()})")
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
    name = "compare-" + "-".join(_experiment_of(s)[0] for s in studies)
    if metric:
        name += "-" + "".join(ch if ch.isalnum() or ch in "._" else "_" for ch in metric)

    def fill(tmp: Path) -> None:
        _save(compare_chart(df), tmp, "compare")
        table = (df.sort_values("layer").groupby(["study", "key", "model", "setting", "curve"], sort=False)
                 .agg(layers=("layer", "max"), first=("value", "first"), last=("value", "last")).reset_index()
                 .rename(columns={"key": "metric"}))
        table["layers"] += 1
        table = table.loc[sorted(table.index, key=lambda i: (list(dict.fromkeys(df.study)).index(table.study[i]),
                                                             model_depth(table.model[i]), table.model[i],
                                                             _noise_key(table.setting[i].split(" ")[0].removeprefix("noise=")),
                                                             table.setting[i]))]
        table = table.drop(columns=["model", "setting"])
        (tmp / "index.html").write_text(_page(name, [("Per-layer curves on relative depth (a panel per study)", _figure("compare")),
                                                     ("Curves", _table(table))], warnings=warnings, notes=notes))

    path = publish(out, name, fill)
    for m in warnings:
        print(f"warning: {m}", file=sys.stderr)
    for m in notes:
        print(f"note: {m}", file=sys.stderr)
    return path


def _sig(x: Any, digits: int = 3) -> Any:
    """``x`` rounded to ``digits`` significant digits (NaN and None unchanged)."""
    if x is None or x != x or x in (float("inf"), float("-inf")):
        return x
    return float(f"{float(x):.{digits}g}")


# run params whose difference from the calibration runs' makes a noise estimate doubtful: (param, what)
_CALIBRATION_PARAMS = (("dataset.name", "dataset"), ("dataset.image_size", "image size"), ("model.name", "model"),
                       ("model.source", "model source"), ("model.cifar_stem", "model stem (model.cifar_stem)"),
                       ("model.pretrained", "pretraining"), ("model.weights", "model weights"), ("model.kwargs", "model kwargs"))


def _study_kind(c: Any, calibration: str) -> tuple[Any, str | None]:
    """(experiment, kind) of the study ``calibration`` names; kind from its spec or its parent run's ``pnc.kind`` tag."""
    from . import tracking

    label, exp_name, spec = _study_of(calibration)
    exp = c.get_experiment_by_name(exp_name)
    if spec is not None:
        return exp, spec.kind
    if exp is None:
        raise PncError(f"no study {calibration!r} in {tracking.tracking_uri()}; give a noise_sweep spec or study name")
    parents = c.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_ROLE}` = 'study'", max_results=5)
    kinds = {p.data.tags.get("pnc.kind") for p in parents} - {None}
    return exp, (kinds.pop() if len(kinds) == 1 else None)


def _calibration_mismatches(c: Any, exp: Any, run: Any, model: str) -> list[str]:
    """How ``run``'s dataset, image size and model settings differ from those of the calibration study's runs of ``model``."""
    from . import tracking

    cal = c.search_runs([exp.experiment_id], max_results=500,
                        filter_string=f"tags.`{tracking.TAG_ROLE}` = 'cell' and tags.`pnc.model` = '{model}' "
                                      "and attributes.status = 'FINISHED'")
    out = []
    for param, what in _CALIBRATION_PARAMS:
        mine = run.data.params.get(param)
        theirs = sorted({r.data.params[param] for r in cal if param in r.data.params})
        if mine is not None and theirs and mine not in theirs:
            out.append(f"the run's {what} ({mine}) differs from the calibration runs' ({', '.join(theirs)})")
    return out


def estimate_noise_for_run(run_id: str, calibration: str | None = None, *, echo: bool = True) -> list[dict]:
    """Apply the noise maps calibrated on noise studies to one run's intermediate-layer CDNV profile.

    Each row: calibration study, model, kind, ``estimate`` (3 significant digits), ``calibrated_range``,
    ``extrapolated`` and ``warnings``: an estimate outside the calibrated levels, and a run whose dataset,
    image size or model settings differ from the calibration runs'. With ``echo`` the warnings also go to stderr.
    """
    from . import analysis, tracking

    c = tracking.client()
    try:
        run = c.get_run(run_id)
    except Exception as e:  # noqa: BLE001
        raise PncError(f"no MLflow run {run_id!r} in {tracking.tracking_uri()} ({str(e).splitlines()[0]})") from None
    model = run.data.tags.get("pnc.model")
    key = next((k for k in ("cdnv/train_noisy", "cdnv/train") if k in run.data.metrics), None)
    if key is None or model is None:
        raise PncError(f"run {run_id} has no per-layer CDNV curve (cdnv/train or cdnv/train_noisy); is it a pnc cell run?")
    curve = tracking.layer_history(run_id, key)
    if calibration:
        exp, kind = _study_kind(c, calibration)
        if kind is not None and kind != "noise_sweep":
            raise PncError(f"{calibration} is a {kind}; calibrate on a noise_sweep study (e.g. specs/digits_noise.yaml)")
        exps = [exp]
    else:
        exps = c.search_experiments()
    maps = []
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per tiny analysis.json is noise
    for exp in exps:
        if exp is None:
            continue
        for parent in c.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_ROLE}` = 'study'"):
            try:
                path = c.download_artifacts(parent.info.run_id, "analysis.json", tempfile.mkdtemp(prefix="pnc-"))
            except Exception:  # noqa: BLE001 - no analysis logged
                continue
            for name, m in (json.loads(Path(path).read_text()).get("noise_maps") or {}).items():
                if m["model"] == model:
                    maps.append((exp, m))
    if not maps:
        where = f"study {calibration!r}" if calibration else "any noise study in this store"
        raise PncError(f"no noise calibration for model {model!r} in {where}; run a noise_sweep with this model first "
                       "(e.g. `pnc run specs/digits_noise.yaml`)")
    out = []
    mismatch: dict[str, list[str]] = {}
    for exp, m in maps:
        nm = analysis.NoiseMap(m["model"], m["kind"], m["intercept"], m["slope"], m["levels"], m["profiles"], m["loo_abs_errors"])
        est = analysis.estimate_noise(nm, curve)
        lo, hi = (min(nm.levels), max(nm.levels)) if nm.levels else (math.nan, math.nan)
        span = hi - lo if hi == hi else 0.0
        outside = bool(nm.levels) and not (lo - 1e-9 * max(1.0, span) <= est <= hi + 1e-9 * max(1.0, span))
        warnings = []
        if outside:
            warnings.append(f"{_sig(est):g} is outside the calibrated levels {_sig(lo):g}..{_sig(hi):g}: extrapolated")
        if exp.experiment_id not in mismatch:
            mismatch[exp.experiment_id] = _calibration_mismatches(c, exp, run, model)
        warnings += mismatch[exp.experiment_id]
        out.append({"calibration": exp.name, "model": model, "kind": nm.kind, "estimate": _sig(est),
                    "calibrated_range": [_sig(lo), _sig(hi)], "extrapolated": outside, "warnings": warnings,
                    "loo_mae": _sig(nm.loo_mae), "levels": [_sig(x) for x in nm.levels], "curve_key": key})
        if echo:
            for w in warnings:
                print(f"warning: {exp.name} {nm.kind}: {w}", file=sys.stderr)
    return out
