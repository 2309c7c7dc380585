"""Figures, tables and pages: Altair charts saved as offline HTML + PNG, HTML tables, a report page, and
:func:`publish`, which swaps a finished report folder into place in one rename. Presentation only: the frames
come from :mod:`pnc.frames`, the numbers from the kinds' analyses.
"""
from __future__ import annotations

import html
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import PncError
from .metrics.geometry import REGISTRY
from .tracking import tracking_uri

HEATMAP_MAX_CLASSES = 100  # matrix metrics of more classes are not drawn (their artifacts hold them)


def log_axis(key: str) -> bool:
    """Whether a per-layer metric (a logged key ``<metric>/<split>``) is drawn on a log axis: as its metric's
    registration says (variability ratios spanning decades, e.g. CDNV and NC1); keys of no metric: linear."""
    m = REGISTRY.for_key(key)
    return bool(m and m.log_axis)


def no_runs(spec: Any, what: str = "runs") -> PncError:
    """The error of a report with nothing to draw."""
    return PncError(f"no finished {what} of study {spec.name!r} in MLflow ({tracking_uri()}); run `pnc run` or `dvc repro` first")


def curves(df: pd.DataFrame, key: str, title: str, log: bool, color: str, color_sort: list[str] | None,
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


def family_keys(selected: Any, splits: list[str]) -> list[str]:
    """The logged keys ``<metric>/<split>`` of the scalar registry metrics among ``selected`` (a spec's
    ``measure.metrics``), per split, in registry order."""
    return [f"{m.key}/{split}" for m in REGISTRY if m.name in selected and m.kind == "scalar" for split in splits]


def family_panels(df: pd.DataFrame, keys: list[str], folder: Path, *, color: str, order: list[str] | None,
                  facet: str | None = None, facet_order: list[str] | None = None, stem: str = "family",
                  title: str = "") -> list[tuple[str, str]]:
    """A figure per metric family (variability, geometry, duality, agreement, probes: :data:`FAMILIES`) of the
    per-layer curves ``keys`` found in ``df`` (a :func:`pnc.frames.layer_frame`), one line per ``color`` value; with
    ``facet``, a row per key and a column per ``facet`` value (e.g. per model, per target). Returns the report
    sections (figures saved as ``<stem>_<family>``); families with none of ``keys`` logged get none."""
    import altair as alt

    from .metrics.registry import FAMILIES

    have = set(df.metric) if not df.empty else set()
    sections = []
    for family, what in FAMILIES.items():
        present = [k for k in keys if k in have and (m := REGISTRY.for_key(k)) is not None and m.family == family]
        if not present:
            continue
        if facet is None:
            chart = alt.hconcat(*[curves(df, k, k, log_axis(k), color, order) for k in present])
        else:
            values = facet_order or sorted(df[facet].unique())
            chart = alt.vconcat(*[alt.hconcat(*[curves(df[df[facet] == v], k, k, log_axis(k), color, order)
                                                .properties(title=f"{facet} {v}" if k == present[0] else "")
                                                for v in values if not df[(df[facet] == v) & (df.metric == k)].empty])
                                  for k in present])
        save(chart.properties(title=title) if title else chart, folder, f"{stem}_{family}")
        sections.append((f"{family.capitalize()}: {what}", figure(f"{stem}_{family}")))
    return sections


def matrix_heatmaps(frame: pd.DataFrame, folder: Path, name: str, *, rows: str,
                    row_order: list[str] | None = None) -> list[tuple[str, str]]:
    """Heatmaps of the matrix metric ``name`` (its :func:`pnc.frames.matrix_frame`) at the first, middle and last
    tapped layer: a row per ``rows`` value (e.g. model) and split, a column per layer position, colour on a log
    scale where the metric's registration says so (one scale for all). Diagonal and absent-class entries (NaN) and
    inf are left blank. Returns the report section (figure ``heatmap_<name>``), or none when nothing is drawable."""
    import altair as alt

    if frame.empty:
        return []
    metric = REGISTRY[name]
    d = frame[frame.value.notna() & (frame.value != float("inf")) & (frame.value != float("-inf"))]
    if metric.log_axis:
        d = d[d.value > 0]
    if d.empty:
        return []
    k = int(frame.class_i.max()) + 1
    side = max(2, min(16, 240 // k))
    scale = alt.Scale(type="log", scheme="viridis") if metric.log_axis else alt.Scale(scheme="viridis")
    grid = []
    positions = [p for p in ("first", "middle", "last") if p in set(d.position)]
    for r in row_order or sorted(d[rows].unique()):
        for split in sorted(d[d[rows] == r].split.unique()):
            sub = d[(d[rows] == r) & (d.split == split)]
            charts = []
            for pos in positions:
                p = sub[sub.position == pos]
                if p.empty:
                    continue
                where = f"layer {int(p.layer.iloc[0])} ({p.module.iloc[0]})"
                charts.append(alt.Chart(p).mark_rect().encode(
                    x=alt.X("class_j:O", title="class"), y=alt.Y("class_i:O", title="class"),
                    color=alt.Color("value:Q", scale=scale, title=metric.label),
                    tooltip=["class_i", "class_j", alt.Tooltip("value:Q", format=".4g")],
                ).properties(width=side * k, height=side * k, title=f"{r}, {split}: {pos}, {where}"))
            if charts:
                grid.append(alt.hconcat(*charts))
    if not grid:
        return []
    save(alt.vconcat(*grid).resolve_scale(color="shared"), folder, f"heatmap_{name}")
    return [(f"{metric.label} ({name}) at the first, middle and last tapped layer", figure(f"heatmap_{name}"))]


def collapse_bars(df: pd.DataFrame, order: list[str], title: str, width: int = 420):
    """Where collapse happens: a horizontal stacked bar per model (rows in ``order``) of the shares of the total
    log-CDNV decline (``share``) that fall in each ``part`` (stage or boundary, ``kind``), parts stacked in depth
    order (``position``); a rise is a negative share, drawn left of 0. ``df`` as :func:`pnc.analysis.collapse_by_stage`'s
    parts, one row per (model, part)."""
    import altair as alt

    most = df.groupby("model").part.count().idxmax()  # the model with most parts gives the legend its depth order
    parts = list(dict.fromkeys(df[df.model == most].sort_values("position").part.tolist() + df.part.tolist()))
    bars = alt.Chart(df).mark_bar(stroke="white", strokeWidth=0.5).encode(
        x=alt.X("share:Q", title="share of the total decline of log CDNV (first tap to last)", stack="zero"),
        y=alt.Y("model:N", sort=order, title="model"),
        color=alt.Color("part:N", sort=parts, title="stage / boundary",
                        scale=alt.Scale(scheme="tableau20")),
        order=alt.Order("position:Q"),
        tooltip=["model", "part", "kind", alt.Tooltip("share:Q", format=".3f"), alt.Tooltip("decline:Q", format=".3f"),
                 alt.Tooltip("slope_per_block:Q", format=".3f")],
    ).properties(width=width, height=22 * max(1, len(order)), title=title)
    rule = alt.Chart(pd.DataFrame({"x": [0.0, 1.0]})).mark_rule(strokeDash=[3, 3], color="gray").encode(x="x:Q")
    return bars + rule


def layer_figure(results: dict[str, list[float]], names: list[str], title: str) -> Any:
    """One run's per-layer curves as a matplotlib figure, the image a cell run logs as ``layers.png`` for its run
    page: a panel per metric (the part of a logged key ``<metric>/<split>`` before the slash) with a line per split,
    x = layer index, log y where the metric's registration says so. Drawn without a layout engine (a fixed grid):
    constrained layout measured every tick label of every panel and took most of a small cell's logging time."""
    import math

    from matplotlib.figure import Figure

    panels: dict[str, list[str]] = {}
    for k, v in results.items():
        if len(v) == len(names) and any(x == x for x in v):
            panels.setdefault(k.split("/", 1)[0], []).append(k)
    cols = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    height = 2.6 * rows + 0.8
    fig = Figure(figsize=(4.2 * cols, height), dpi=80)
    fig.suptitle(title, fontsize=10, y=1 - 0.15 / height)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.5 / height, top=1 - 0.65 / height, wspace=0.28, hspace=0.55)
    x = range(len(names))
    for i, (metric, keys) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        log = log_axis(keys[0])
        for key in keys:
            values = [v if v == v and (v > 0 or not log) else math.nan for v in results[key]]
            ax.plot(x, values, marker="o", markersize=3, label=key.split("/", 1)[1] if "/" in key else key)
        if log:
            ax.set_yscale("log")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("layer (step)", fontsize=8)
        ax.set_xticks(x)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    return fig


def save(chart: Any, folder: Path, stem: str) -> list[str]:
    chart.save(str(folder / f"{stem}.html"), inline=True)
    chart.save(str(folder / f"{stem}.png"), scale_factor=1.5)
    return [f"{stem}.html", f"{stem}.png"]


def page(title: str, sections: list[tuple[str, str]], warnings: list[str] = (), notes: list[str] = ()) -> str:
    body = "\n".join(f"<section><h2>{html.escape(h)}</h2>\n{content}</section>" for h, content in sections)
    top = "".join(f"<p class='warning'><b>Warning:</b> {html.escape(w)}</p>\n" for w in warnings)
    top += "".join(f"<p class='note'><b>Note:</b> {html.escape(n)}</p>\n" for n in notes)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
            "img{max-width:100%}.warning{background:#fff3cd;border:1px solid #d39e00;padding:.5em 1em}"
            ".note{background:#eef;border:1px solid #99c;padding:.5em 1em}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>\n{top}{body}\n<p><a href='../index.html'>all reports</a></p></body></html>")


def figure(stem: str) -> str:
    return (f"<p><a href='{stem}.html'>interactive chart</a></p>"
            f"<img src='{stem}.png' alt='{html.escape(stem)}'>")


def fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, escape=True)


def default_permissions(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain mkdir / open would: 0o777 & ~umask for folders,
    0o666 & ~umask for files."""
    mask = os.umask(0o022)  # read the umask (setting it is the only way), then put it back
    os.umask(mask)
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
        default_permissions(tmp)  # mkdtemp made it 0700: others sharing the disk could not read the report
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


def render_index(out: Path) -> Path:
    """``out/index.html`` linking every study report found under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    items = [f"<li><a href='{html.escape(d.name)}/index.html'>{html.escape(d.name)}</a></li>"
             for d in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "index.html").exists())]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>pnc reports</title></head><body>"
            "<h1>pnc reports</h1><ul>" + "\n".join(items) + "</ul></body></html>")
    path = out / "index.html"
    tmp = path.with_name(f".index.html.{os.getpid()}")
    tmp.write_text(page)
    os.replace(tmp, path)
    return path


def epoch_heatmap(d: pd.DataFrame, title: str, log: bool, boundary: float | None = None, width: int = 220):
    """An epoch x layer heatmap of one run's values of one metric (rows: ``layer_metrics.parquet``'s; log10 colour
    when ``log``); with ``boundary`` the cells above it are outlined, so where the value crosses it (Delta = 1) reads
    off by epoch and layer."""
    import altair as alt
    import numpy as np

    d = d.assign(shown=np.log10(d.value.where(d.value > 0)) if log else d.value)
    enc = dict(x=alt.X("layer:O", title="layer (tapped block)"), y=alt.Y("epoch:O", title="epoch", sort="descending"))
    scale = alt.Scale(scheme="viridis")
    if boundary is not None:  # diverging around the boundary, symmetric: above it red, below blue
        mid = float(np.log10(boundary)) if log else boundary
        half = max(float(np.nanmax(np.abs(d.shown - mid))) if d.shown.notna().any() else 0.0, 0.05)
        scale = alt.Scale(scheme="redblue", reverse=True, domain=[mid - half, mid + half])
    chart = alt.Chart(d).mark_rect().encode(
        **enc, color=alt.Color("shown:Q", title="log10" if log else "value", scale=scale),
        tooltip=["epoch", "layer", "module", alt.Tooltip("value:Q", format=".4g")],
    ).properties(title=title, width=width, height=max(60, 18 * d.epoch.nunique()))
    if boundary is not None:  # above the boundary beyond rounding (the rule of pnc.metrics.geometry.memorization_layers)
        from .metrics.geometry import ROUNDING_TOL

        above = d[d.value > boundary * (1.0 + ROUNDING_TOL)]
        chart = chart + alt.Chart(above).mark_rect(fillOpacity=0, stroke="black", strokeWidth=1.5).encode(**enc)
    return chart


def epoch_curves(d: pd.DataFrame, title: str, log: bool, width: int = 220):
    """One run's per-layer curves of one metric, one line per measured epoch (light to dark as training goes on)."""
    import altair as alt

    if log:
        d = d[d.value > 0]
    return alt.Chart(d).mark_line(point=alt.OverlayMarkDef(size=14)).encode(
        x=alt.X("layer:Q", title="layer (tapped block)", axis=alt.Axis(tickMinStep=1, format="d")),
        y=alt.Y("value:Q", title=title.split(": ")[-1], scale=alt.Scale(type="log") if log else alt.Undefined),
        color=alt.Color("epoch:O", scale=alt.Scale(scheme="viridis"), title="epoch"),
        tooltip=["epoch", "layer", "module", alt.Tooltip("value:Q", format=".4g")],
    ).properties(title=title, width=width, height=150)
