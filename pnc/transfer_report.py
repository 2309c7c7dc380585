"""The domain-transfer report (paper Figure 3): curves per target, source x target heatmaps, and the
per-layer rank correlation across sources between target collapse and target probe accuracy."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from .errors import PncError


def render_transfer(spec: Any, folder: Path) -> list[tuple[str, str]]:
    import altair as alt

    from .analysis import rank_correlation
    from .report import TRANSFER_KEYS, _figure, _save, _table, _where, layer_frame

    df = layer_frame(spec.experiment, [k for k, _, _ in TRANSFER_KEYS], role="transfer")
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
            charts.append(alt.Chart(d).mark_line(point=True).encode(
                x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1, format="d")),
                y=alt.Y("value:Q", title=title, scale=alt.Scale(type="log") if log else alt.Undefined),
                color=alt.Color("source:N", sort=sources, title="source"),
                strokeDash=alt.StrokeDash("model:N") if df.model.nunique() > 1 else alt.Undefined,
                tooltip=["source", "target", "layer", alt.Tooltip("value:Q", format=".4g")],
            ).properties(width=220, height=140, title=f"target {target}" if key == TRANSFER_KEYS[0][0] else ""))
        rows.append(alt.hconcat(*charts))
    _save(alt.vconcat(*rows).properties(title=f"{spec.name}: target collapse and probe accuracy by source"), folder, "transfer")
    sections = [("Per-layer collapse and probe accuracy on each target (Figure 3 layout)", _figure("transfer"))]

    probe = df[df.metric == "probe_acc/target_test"]
    final = probe.sort_values("layer").groupby(["model", "source", "target"]).agg(final=("value", "last"), best=("value", "max")).reset_index()
    heat = []
    for col, title in (("final", "final-layer probe accuracy"), ("best", "best-layer probe accuracy")):
        base = alt.Chart(final).encode(x=alt.X("target:N", sort=list(spec.transfer.targets)), y=alt.Y("source:N", sort=sources))
        heat.append((base.mark_rect().encode(color=alt.Color(f"{col}:Q", scale=alt.Scale(scheme="viridis"), title=title))
                     + base.mark_text(baseline="middle").encode(text=alt.Text(f"{col}:Q", format=".3f"),
                                                                 color=alt.value("white")))
                    .properties(width=180, height=150, title=title))
    _save(alt.hconcat(*heat), folder, "heatmap")
    sections.append(("Source x target probe accuracy", _figure("heatmap")))

    piv = df.pivot_table(index=["model", "source", "target", "layer"], columns="metric", values="value").reset_index()
    corr_rows = []
    for layer in sorted(piv.layer.unique()):
        d = piv[piv.layer == layer].dropna(subset=["cdnv/target", "probe_acc/target_test"])
        rho, lo, hi = rank_correlation(-d["cdnv/target"].to_numpy(), d["probe_acc/target_test"].to_numpy(), seed=spec.train.seed)
        per_target = []
        for t in spec.transfer.targets:
            dt = d[d.target == t]
            r, _, _ = rank_correlation(-dt["cdnv/target"].to_numpy(), dt["probe_acc/target_test"].to_numpy(), n_boot=1)
            per_target.append(r)
        corr_rows.append({"layer": int(layer), "spearman (all pairs)": rho, "90% CI low": lo, "90% CI high": hi,
                          "pairs": len(d), **{f"rho within target {t}": r for t, r in zip(spec.transfer.targets, per_target)}})
    corr = pd.DataFrame(corr_rows)
    ch = alt.Chart(corr).encode(x=alt.X("layer:Q", axis=alt.Axis(tickMinStep=1, format="d")))
    band = ch.mark_area(opacity=0.25).encode(y=alt.Y("90% CI low:Q", title="Spearman rho (-CDNV vs probe acc)",
                                                         scale=alt.Scale(domain=[-1, 1])), y2="90% CI high:Q")
    line = ch.mark_line(point=True).encode(y="spearman (all pairs):Q")
    _save((band + line).properties(width=420, height=180, title="Does better target collapse go with better probes?"), folder, "correlation")
    sections.append(("Rank correlation across (source, target) pairs, per layer, with a bootstrap interval",
                     _figure("correlation") + _table(corr)))
    (folder / "correlation.csv").write_text(corr.to_csv(index=False))
    return sections
