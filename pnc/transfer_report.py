"""The domain-transfer report (paper Figure 3): curves per target, source x target heatmaps, and the
per-relative-depth rank correlation across sources between target collapse and target probe accuracy
(:func:`pnc.analysis.transfer_correlation`, the same numbers the parent run logs)."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import PncError


def render_transfer(spec: Any, folder: Path, sel: Any = None) -> list[tuple[str, str]]:
    """The report's sections; ``sel`` (a :class:`pnc.report.RunSelection`) picks the runs of the spec's cells."""
    import altair as alt

    from .report import (TRANSFER_KEYS, RunSelection, _figure, _save, _table, _where, layer_frame, model_order, run_frame,
                         study_summary)

    sel = sel if sel is not None else RunSelection(spec, fallback=True)
    df = layer_frame(spec.experiment, [k for k, _, _ in TRANSFER_KEYS], role="transfer", runs=sel)
    if df.empty:
        raise PncError(f"no finished transfer runs of study {spec.name!r} in MLflow ({_where()}); run `pnc run` or `dvc repro` first")
    sources = list(spec.transfer.sources)
    rows = []
    for target in spec.transfer.targets:
        sub = df[df.target == target]
        charts = []
        for key, title, log in TRANSFER_KEYS:
            d = sub[sub.metric == key]
            if log:
                d = d[d.value > 0]
            several = df.model.nunique() > 1
            models = model_order(df.model.unique())  # resnet8 before resnet14
            base = alt.Chart(d).encode(
                x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1, format="d")),
                y=alt.Y("value:Q", title=title, scale=alt.Scale(type="log") if log else alt.Undefined),
                color=alt.Color("source:N", sort=sources, title="source"),
                tooltip=["source", "model", "target", "layer", alt.Tooltip("value:Q", format=".4g")],
            )
            # several models: a dash pattern per model on the lines, and a point shape per model for the legend
            lines = base.mark_line().encode(strokeDash=alt.StrokeDash("model:N", sort=models, legend=None) if several else alt.Undefined)
            points = base.mark_point(filled=True, size=28).encode(
                shape=alt.Shape("model:N", sort=models, title="model") if several else alt.Undefined)
            charts.append((lines + points).properties(width=220, height=140,
                                                      title=f"target {target}" if key == TRANSFER_KEYS[0][0] else ""))
        rows.append(alt.hconcat(*charts))
    _save(alt.vconcat(*rows).properties(title=f"{spec.name}: target collapse and probe accuracy by source"), folder, "transfer")
    sections = [("Per-layer collapse and probe accuracy on each target (Figure 3 layout)", _figure("transfer"))]

    probe = df[df.metric == "probe_acc/target_test"]
    final = probe.sort_values("layer").groupby(["model", "source", "target"]).agg(final=("value", "last"), best=("value", "max")).reset_index()
    heat_rows = []
    scale = alt.Scale(scheme="viridis", domain=[float(min(final.final.min(), final.best.min())), 1.0])
    for model in model_order(final.model.unique()):  # one row of heatmaps per model
        heat = []
        for col, title in (("final", "final-layer probe accuracy"), ("best", "best-layer probe accuracy")):
            base = alt.Chart(final[final.model == model]).encode(x=alt.X("target:N", sort=list(spec.transfer.targets)),
                                                                 y=alt.Y("source:N", sort=sources))
            heat.append((base.mark_rect().encode(color=alt.Color(f"{col}:Q", scale=scale, title="probe accuracy (target test)"))
                         + base.mark_text(baseline="middle").encode(text=alt.Text(f"{col}:Q", format=".3f"),
                                                                     color=alt.value("white")))
                        .properties(width=180, height=150, title=f"{model}: {title}"))
        heat_rows.append(alt.hconcat(*heat))
    _save(alt.vconcat(*heat_rows), folder, "heatmap")
    sections.append(("Source x target probe accuracy", _figure("heatmap")))
    if sel.resolved("transfer"):  # the runs drawn above, with the settings they were trained with
        runs = run_frame(spec.experiment, role="transfer", runs=sel)
        cols = [c for c in ["pnc.model", "source", "target", "epochs", "overrides", "final/probe_acc_target_test",
                            "best/probe_acc_target_test"] if c in runs]
        if {"pnc.model", "source", "target"} <= set(cols):
            sections.append(("Target runs measured", _table(runs[cols])))

    # The correlation is computed once, by the same function and seed as the parent-run metrics.
    corr = study_summary(spec, sel)["details"].get("transfer") or {}
    long = pd.DataFrame([{"target": "pooled (ranks within target)", **r} for r in corr.get("pooled", [])]
                        + [{"target": t, **r} for t, rs in (corr.get("per_target") or {}).items() for r in rs])
    if long.empty:
        sections.append(("Rank correlation across sources", "<p>No off-domain (source != target) pairs: nothing to correlate.</p>"))
        return sections
    for model, ix in (corr.get("layers") or {}).items():
        long[f"layer ({model})"] = long.step.map(dict(enumerate(ix)))
    cols = ["target", "step", "rel_depth", *[c for c in long if c.startswith("layer (")], "n", "rho", "lo", "hi", "note"]
    long = long[cols].rename(columns={"rel_depth": "relative depth", "lo": f"{corr['level']:.0%} CI low",
                                      "hi": f"{corr['level']:.0%} CI high"})
    lo, hi = f"{corr['level']:.0%} CI low", f"{corr['level']:.0%} CI high"
    plot = long[long.rho.notna()]
    ch = alt.Chart(plot).encode(x=alt.X("relative depth:Q", scale=alt.Scale(domain=[0, 1])),
                                color=alt.Color("target:N", title="target"))
    band = ch.transform_filter(alt.datum.target == "pooled (ranks within target)").mark_area(opacity=0.2).encode(
        y=alt.Y(f"{lo}:Q", title="Spearman rho (-CDNV vs probe acc)", scale=alt.Scale(domain=[-1, 1])), y2=f"{hi}:Q")
    line = ch.mark_line(point=True).encode(y="rho:Q", strokeDash=alt.condition(
        alt.datum.target == "pooled (ranks within target)", alt.value([1, 0]), alt.value([4, 3])),
        tooltip=["target", "step", "n", alt.Tooltip("rho:Q", format=".3f")])
    _save((band + line).properties(width=420, height=180, title="Does better target collapse go with better probes?"), folder, "correlation")
    notes = sorted({f"{r['target']}: {r['note']}" for _, r in long.iterrows() if r["note"]})
    text = ("<p>Per target: Spearman's rho across the off-domain (source, model) pairs measured on it (in-domain pairs "
            "left out), per relative depth, with a percentile bootstrap interval over resampled sources "
            f"({corr['n_boot']} resamples, seed {corr['seed']}). Pooled: ranks taken within each target, then pooled "
            "(targets' scales never mix); its interval resamples sources jointly for all targets. No rho below "
            "3 points.</p>" + (f"<p>{'; '.join(html.escape(n) for n in notes)}</p>" if notes else ""))
    sections.append(("Rank correlation across sources, per relative depth, with a bootstrap interval",
                     _figure("correlation") + text + _table(long)))
    (folder / "correlation.csv").write_text(long.to_csv(index=False))
    return sections
