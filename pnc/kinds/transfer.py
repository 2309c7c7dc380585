"""``domain_transfer``: train on source domains, measure and probe on target domains through the MLflow model
registry (paper sec. 4.3, Figure 3).

For each (model, source domain) cell: train on the source and register the network in the model registry
(tags: study, source, cell id, train key, spec and data digests; aliases ``current`` and ``src-<source>``;
MLflow reserves ``latest``), or reuse a registered version trained the same way on the same data. Then, for
each target domain, a sub-run of the cell through the same engine: load that version by URI
(``models:/<name>/<version>``), measure every layer's CDNV and NC2 on the target training split and train
layer-wise linear probes on ``probe.samples_per_class`` target samples per class, scored on the held-out
target split; the registered version is the sub-run's input model. Analyses: the per-relative-depth rank
correlation across sources between target collapse and target probe accuracy.
"""
from __future__ import annotations

import html
import math
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from .. import catalog
from ..catalog import TRAIN_FRACTION, model_order
from ..cells import Cell
from ..errors import PncError, did_you_mean
from ..spec import SpecBlock, StudySpecBase, Unique, strings_of
from .base import StudyKind, model_cells

KEYS = [("cdnv/target", "CDNV (target)", True), ("nc2/target", "NC2 (target)", False),
        ("probe_acc/target_test", "probe accuracy (target test)", False)]
TAG_TRAIN_KEY = "pnc.train_key"
SOURCE_CURVE = "cdnv/train"  # the source training's own collapse curve, in its snapshot table
ROLE = "transfer"  # the role of the (source, target) sub-runs


# ----------------------------------------------------------------------------- spec
class TransferSpec(SpecBlock):
    sources: Unique[str] = Field(min_length=1)
    targets: Unique[str] = Field(min_length=1)
    train_fraction: float = Field(TRAIN_FRACTION, gt=0, lt=1, description="Per-domain train share (datasets without official splits).")


class DomainTransferSpec(StudySpecBase):
    """Train on source domains, measure and linearly probe on target domains (sec. 4.3, Fig. 3)."""

    kind: Literal["domain_transfer"]
    transfer: TransferSpec


# ----------------------------------------------------------------------------- the model registry
def registered_name(spec: Any, cell: Any) -> str:
    if spec.tracking.registered_model and len(spec.models) == 1:
        return spec.tracking.registered_model
    base = spec.tracking.registered_model or spec.name
    return f"{base}-{cell.model.name}"


def find_registered(name: str, cell: Any, digest: str) -> Any | None:
    """The newest registered version of ``name`` trained as this cell trains (same ``train_key``: dataset, model,
    recipe, source) on this data, or None. Measurement, probe and target settings do not matter."""
    from .. import modelstore, tracking

    c = tracking.client()
    try:
        versions = tracking.retrying(lambda: c.search_model_versions(f"name='{name}'"))
    except Exception:  # noqa: BLE001 - no such registered model yet
        return None
    hits = [v for v in versions if v.tags.get(tracking.TAG_DATA) == digest and v.status == "READY"
            and v.tags.get(modelstore.TAG_FORMAT) == modelstore.FORMAT  # a pickled version (pnc before 0.2) retrains
            and (v.tags.get(TAG_TRAIN_KEY) == cell.train_key
                 or TAG_TRAIN_KEY not in v.tags and v.tags.get(tracking.TAG_CELL) == cell.id)]  # versions before train_key
    return max(hits, key=lambda v: int(v.version)) if hits else None


def target_cell(cell: Cell, target: str) -> Cell:
    """The (source, target) sub-run of ``cell``, as a cell: its name ends in ``,target=<target>``."""
    return Cell(cell.study, cell.kind, cell.model, cell.axes + (("target", target),), cell.config + target,
                source=cell.source, targets=(target,))


# ----------------------------------------------------------------------------- the kind
class DomainTransfer(StudyKind):
    name = "domain_transfer"
    spec_class = DomainTransferSpec
    params_key = "transfer_studies"
    domains_in_spec = "transfer.sources/targets"
    probes_per_class = True
    curve_key = "cdnv/target"
    curve_role = ROLE
    headline_keys = ("final/probe_acc_target_test",)

    def rules(self, spec: Any) -> list[tuple[tuple, str]]:
        out: list[tuple[tuple, str]] = []
        info = spec.dataset.info
        if getattr(spec, "transfer", None) is None:
            return out
        if not info.domains:
            out.append((("dataset", "name"), f"{info.name} has no domains; a {self.name} needs a multi-domain dataset: "
                        + ", ".join(n for n, d in catalog.DATASETS.items() if d.domains)))
        else:
            for key in ("sources", "targets"):
                for j, d in enumerate(getattr(spec.transfer, key)):
                    if d is not None and d not in info.domains:
                        out.append((("transfer", key, j), f"unknown domain {d!r} of {info.name}.{did_you_mean(d, info.domains)}"))
        return out

    def partial(self, data: dict) -> dict:
        from types import SimpleNamespace

        raw = data.get("transfer")
        if not isinstance(raw, dict):
            return {"transfer": None}
        return {"transfer": SimpleNamespace(sources=strings_of(raw.get("sources")), targets=strings_of(raw.get("targets")))}

    def expand(self, spec: Any) -> list[Cell]:
        targets = list(spec.transfer.targets)
        return model_cells(spec, lambda model: [
            ((("source", src),), {"source": src, "targets": targets, "train_fraction": spec.transfer.train_fraction},
             {"source": src, "targets": tuple(targets)}) for src in spec.transfer.sources])

    def runs_of(self, cells: list[Cell]) -> list[tuple[str, str, str]]:
        return [(f"{c.id}:{t}", ROLE, target_cell(c, t).name) for c in cells for t in c.targets]

    def cell_tags(self, cell: Cell) -> dict[str, str]:
        return {"source": cell.source}

    def prepare(self, spec: Any, cells: list[Cell]) -> dict[str, Any]:
        """Every domain's splits, before torch is imported, any model built or run created."""
        from ..data.registry import load_cell_data

        domains = list(dict.fromkeys([*spec.transfer.sources, *spec.transfer.targets]))
        return {d: load_cell_data(spec, cells[0], domain=d) for d in domains}

    # ------------------------------------------------------------------ one cell: the source, then its targets
    def run_cell(self, study: Any, cell: Cell, data: dict, prefix: str) -> Any:
        from ..engine import CellOutcome, data_digest

        spec, main = study.spec, study.main
        digest = data_digest(data[cell.source].inputs)
        name = registered_name(spec, cell)
        mv = find_registered(name, cell, digest) if main and not study.force else None
        (reused,) = study.broadcast(mv is not None)  # every process takes the same branch
        summary: dict = {"registered_model": name}
        run_id = None
        if reused:
            run_id = mv.run_id if main else None
            if main:
                print(f"{prefix} {cell.name}: reusing registered model {name} v{mv.version}", file=sys.stderr)
        else:
            status, run_id, mv, reason = self.train_source(study, cell, data[cell.source], digest, name, prefix)
            if status != "FINISHED":
                return CellOutcome(cell, status, run_id, summary if status == "BUSY" else {}, reason=reason)
            summary["trained"] = True
        (version,) = study.broadcast(mv.version if main else None)
        uri = f"models:/{name}/{version}"
        from .. import modelstore

        net = modelstore.load(uri).to(study.accelerator.device)  # also when just trained: targets see what the registry holds
        summary.update({"model_uri": uri, "source_run_id": run_id, "targets": {}})
        busy: list[str] = []
        for target in cell.targets:
            summary["targets"][target], note = self.run_target(study, cell, target, data[target], net, uri, mv)
            if note:
                busy.append(note)
        if busy:
            return CellOutcome(cell, "BUSY", run_id, summary, reason="; ".join(busy))
        nothing_done = not summary.get("trained") and all(t.get("status") == "SKIPPED" for t in summary["targets"].values())
        return CellOutcome(cell, "SKIPPED" if nothing_done else "FINISHED", run_id, summary)

    def train_source(self, study: Any, cell: Cell, src: Any, digest: str, name: str, prefix: str) -> tuple:
        """Train the cell's network on its source and register it: (status, run id, model version, reason)."""
        from .. import modelstore, snapshots, tracking
        from ..engine import cell_params, cell_tags, checkpoint_path, train_cell
        from ..spec import spec_digest

        spec, main = study.spec, study.main

        def claimed(run_id: str, reused: Any) -> None:
            tracking.log_params(run_id, cell_params(spec, cell))
            tracking.log_inputs(run_id, [] if reused else src.inputs)
            print(f"{prefix} {cell.name}: training on {cell.source} (run {run_id})", file=sys.stderr)

        # A FINISHED source run without a registered version (registration failed) trains again: force.
        att = study.claim(cell, {tracking.TAG_DATA: digest, **study.tags(), **cell_tags(spec, cell)},
                          run_name=f"{cell.name} (source training)", force=True,
                          usable=lambda r: r.data.tags.get(tracking.TAG_DATA) == digest, on_claimed=claimed)
        if att.decision == "busy":
            study.say(f"{prefix} {cell.name}: {att.reason}")
            return "BUSY", att.run_id, None, att.reason
        box: dict = {}

        def work() -> dict:
            t0 = time.time()
            snaps = snapshots.make(spec, snapshots.source_measure(spec, src, study))
            model, result = train_cell(spec, cell, src, accelerator=study.accelerator, run_id=att.run_id,
                                       progress=study.progress, snapshots=snaps)
            if snaps is not None:  # the final epoch's snapshot on the source (every process: a collective)
                results, names, accs = snaps.measure(model)
                if main:
                    snapshots.record(att.run_id, snaps, results, names, accs)
            if main:
                net = study.accelerator.unwrap_model(model)
                tracking.log_metrics(att.run_id, {"train/last_epoch_acc": result.acc, "train/last_epoch_loss": result.loss})
                vtags = {"pnc.study": spec.name, "source": cell.source, tracking.TAG_CELL: cell.id, TAG_TRAIN_KEY: cell.train_key,
                         tracking.TAG_DATA: digest, tracking.TAG_SPEC_DIGEST: spec_digest(spec), "pnc.model": cell.model.name}
                try:
                    example = np.zeros((1, spec.dataset.info.channels, spec.dataset.size, spec.dataset.size), dtype=np.float32)
                    box["mv"] = modelstore.register(net, att.run_id, name, vtags, cell.source, example=example)
                except PncError:  # e.g. the server refused it (a permission missing): said as it is, exit 1
                    raise
                except Exception as e:
                    raise RuntimeError(f"registering the model failed: {e}") from e
                print(f"  trained in {time.time() - t0:.0f}s (train acc {result.acc:.4f}); registered {name} "
                      f"v{box['mv'].version}", file=sys.stderr)
            return {}

        status, _, reason = study.execute(att.run_id, work, checkpoint=checkpoint_path(spec, cell))
        if status == "FAILED":
            study.say(f"  FAILED: {reason}")
        return status, att.run_id, box.get("mv"), reason

    def run_target(self, study: Any, cell: Cell, target: str, tdat: Any, net: Any, uri: str, mv: Any) -> tuple[dict, str]:
        """Measure the registered network of ``cell`` on ``target`` in its own sub-run: (summary, busy note)."""
        from .. import tracking
        from ..engine import cell_params, data_digest, log_layers
        from ..figures import layer_figure
        from ..metrics.geometry import REGISTRY

        spec, main = study.spec, study.main
        tdigest = data_digest(tdat.inputs)
        tags = {tracking.TAG_DATA: tdigest, "source": cell.source, "target": target, "pnc.model_uri": uri,
                tracking.TAG_MODEL_RUN: mv.run_id if main else "",
                "pnc.model": cell.model.name, "pnc.depth": str(catalog.model_depth(cell.model.name)), **study.tags()}

        def claimed(run_id: str, reused: Any) -> None:
            tracking.log_params(run_id, {**cell_params(spec, cell), "transfer.target": target, "model_uri": uri})
            if reused is None:
                tracking.log_inputs(run_id, tdat.probe_inputs())
                tracking.log_model_input(run_id, mv)

        att = study.claim(target_cell(cell, target), tags, role=ROLE, cell_id=f"{cell.id}:{target}",
                          run_name=f"{cell.model.name}: {cell.source} -> {target}", on_claimed=claimed,
                          usable=lambda r: r.data.tags.get("pnc.model_uri") == uri and r.data.tags.get(tracking.TAG_DATA) == tdigest)
        if att.decision == "skip":
            study.say(f"  {cell.source} -> {target}: finished earlier (run {att.run_id}), skipped")
            return {"run_id": att.run_id, "status": "SKIPPED"}, ""
        if att.decision == "busy":
            study.say(f"  {cell.source} -> {target}: {att.reason}")
            return {"run_id": att.run_id, "status": "BUSY"}, f"{target}: {att.reason}"

        def work() -> dict:
            res = self.measure_target(study, net, tdat)
            if not main:
                return {}
            res["layers"], matrices = REGISTRY.split(res["layers"])  # matrix metrics (cdnv_matrix): an artifact
            tracking.log_layer_metrics(att.run_id, res["layers"])
            tracking.log_matrix_artifacts(att.run_id, matrices, res["names"])
            probe = res["layers"]["probe_acc/target_test"]
            finals = {"final/probe_acc_target_test": probe[-1], "best/probe_acc_target_test": max(probe),
                      "test/source_head_acc": res["head_acc"], "layers/count": len(res["names"])}
            tracking.log_metrics(att.run_id, finals)
            log_layers(att.run_id, res["names"])
            tracking.log_figure(att.run_id, layer_figure(res["layers"], res["names"], target_cell(cell, target).name), "layers.png")
            print(f"  {cell.source} -> {target}: final-layer probe {finals['final/probe_acc_target_test']:.4f}, "
                  f"best {finals['best/probe_acc_target_test']:.4f}", file=sys.stderr)
            return finals

        _, finals, _ = study.execute(att.run_id, work)
        return {"run_id": att.run_id, **finals}, ""

    def measure_target(self, study: Any, net: Any, tdat: Any) -> dict:
        """CDNV/NC2 on the whole target training split; probes on k samples per class of it, scored on target test."""
        from ..data.base import stratified_split
        from ..data.torchdata import ImageDataset
        from ..engine import measure_model

        spec = study.spec
        info, k = spec.dataset.info, spec.probe.samples_per_class
        size, ch = spec.dataset.size, info.channels
        common = dict(accelerator=study.accelerator, num_classes=info.num_classes, label_names=("label",), progress=study.progress)
        layers, names, _ = measure_model(net, spec, {"train": ImageDataset(tdat.train, image_size=size, channels=ch)},
                                         metrics=tuple(m for m in spec.measure.metrics if m != "probe"), **common)
        out = {key.replace("/train", "/target"): v for key, v in layers.items() if key.endswith("/train")}
        sub = tdat.train.subset(stratified_split(tdat.train.labels, k, spec.train.seed)[0]) if k else tdat.train
        players, _, paccs = measure_model(net, spec, {"train": ImageDataset(sub, image_size=size, channels=ch),
                                                      "test": ImageDataset(tdat.test, image_size=size, channels=ch)},
                                          metrics=("probe",), **common)
        out["probe_acc/target_test"] = players["probe_acc/test"]
        return {"layers": out, "names": names, "head_acc": paccs.get("test", float("nan"))}

    # ------------------------------------------------------------------ reading back
    def correlation(self, spec: Any, selection: Any) -> Any:
        """:func:`pnc.analysis.transfer_correlation` of the spec's finished target runs."""
        from .. import analysis
        from ..frames import layer_frame

        df = layer_frame(spec.experiment, ["cdnv/target", "probe_acc/target_test"], role=ROLE, runs=selection)
        if df.empty:
            return analysis.TransferCorrelation([], {}, [], {})
        piv = df.pivot_table(index=["model", "source", "target", "layer"], columns="metric", values="value").reset_index()
        piv = piv.rename(columns={"cdnv/target": "cdnv", "probe_acc/target_test": "probe_acc"})
        for col in ("cdnv", "probe_acc"):
            if col not in piv:
                piv[col] = math.nan
        return analysis.transfer_correlation(piv)

    def analyses(self, spec: Any, selection: Any = None) -> dict:
        """The per-layer rank correlation across sources (curves logged to the parent run)."""
        from ..frames import RunSelection

        sel = selection if selection is not None else RunSelection(spec)
        corr = self.correlation(spec, sel)
        metrics: dict[str, float] = {}
        tags: dict[str, str] = {}
        rho = [r["rho"] for r in corr.pooled if r["rho"] == r["rho"]]
        if rho:
            metrics["transfer/spearman_mean"] = sum(rho) / len(rho)
        if corr.pooled:
            last = corr.pooled[-1]
            if last["rho"] == last["rho"]:
                metrics["transfer/spearman_final_layer"] = last["rho"]
                ci = f"{corr.level:.0%} CI {last['lo']:.2f}..{last['hi']:.2f}" if last["lo"] == last["lo"] else last["note"]
                pv = last.get("p", math.nan)
                if pv == pv:
                    metrics["transfer/spearman_final_layer_p"] = pv
                p = f"permutation p {pv:.3g}" if pv == pv else f"no permutation p: {last.get('p_note') or 'undefined'}"
                tags["pnc.transfer_correlation"] = (f"final layer: rho {last['rho']:.2f} ({ci}; n={last['n']} off-domain "
                                                    f"pairs, {last['targets']} targets); {p}")
            else:
                tags["pnc.transfer_correlation"] = f"final layer: no rho ({last['note']})"
        curves = corr.curves()
        out = {"metrics": {k: float(v) for k, v in metrics.items()}, "tags": tags, "curves": curves,
               "details": {"transfer_correlation": curves, "transfer": corr.as_dict()}}
        from .. import snapshots

        # the source trainings' snapshots (measure.epochs): when collapse forms on each source, as in a depth sweep
        return snapshots.merge(out, snapshots.time_analyses(spec, sel, SOURCE_CURVE, by_source=True))

    def report(self, spec: Any, folder: Path, selection: Any) -> list[tuple[str, str]]:
        from .. import snapshots

        sections = render_transfer(self, spec, folder, selection)
        dynamics = snapshots.time_analyses(spec, selection, SOURCE_CURVE, by_source=True)["details"].get("dynamics")
        return sections + snapshots.report_sections(spec, folder, selection, SOURCE_CURVE, dynamics, by_source=True)


def render_transfer(kind: DomainTransfer, spec: Any, folder: Path, sel: Any = None) -> list[tuple[str, str]]:
    """Figure 3: curves per target, source x target heatmaps, and the per-relative-depth rank correlation across
    sources between target collapse and target probe accuracy (the same numbers the parent run logs)."""
    import altair as alt
    import pandas as pd

    from ..figures import figure, no_runs, save, table
    from ..frames import RunSelection, layer_frame, run_frame

    sel = sel if sel is not None else RunSelection(spec, fallback=True)
    df = layer_frame(spec.experiment, [k for k, _, _ in KEYS], role=ROLE, runs=sel)
    if df.empty:
        raise no_runs(spec, "transfer runs")
    sources = list(spec.transfer.sources)
    models = model_order(df.model.unique())  # resnet8 before resnet14
    several = len(models) > 1
    rows = []
    for target in spec.transfer.targets:
        sub = df[df.target == target]
        charts = []
        for key, title, log in KEYS:
            d = sub[sub.metric == key]
            if log:
                d = d[d.value > 0]
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
            charts.append((lines + points).properties(width=220, height=140, title=f"target {target}" if key == KEYS[0][0] else ""))
        rows.append(alt.hconcat(*charts))
    save(alt.vconcat(*rows).properties(title=f"{spec.name}: target collapse and probe accuracy by source"), folder, "transfer")
    sections = [("Per-layer collapse and probe accuracy on each target (Figure 3 layout)", figure("transfer"))]

    sections += family_sections(spec, folder, sel, shown={k for k, _, _ in KEYS}, models=models)

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
                         + base.mark_text(baseline="middle").encode(text=alt.Text(f"{col}:Q", format=".3f"), color=alt.value("white")))
                        .properties(width=180, height=150, title=f"{model}: {title}"))
        heat_rows.append(alt.hconcat(*heat))
    save(alt.vconcat(*heat_rows), folder, "heatmap")
    sections.append(("Source x target probe accuracy", figure("heatmap")))
    if sel.resolved(ROLE):  # the runs drawn above, with the settings they were trained with
        runs = run_frame(spec.experiment, role=ROLE, runs=sel)
        cols = [c for c in ["pnc.model", "source", "target", "epochs", "overrides", "final/probe_acc_target_test",
                            "best/probe_acc_target_test"] if c in runs]
        if {"pnc.model", "source", "target"} <= set(cols):
            sections.append(("Target runs measured", table(runs[cols])))

    # The correlation is computed once, by the same function and seed as the parent-run metrics.
    corr = kind.analyses(spec, sel)["details"].get("transfer") or {}
    long = pd.DataFrame([{"target": "pooled (ranks within target)", **r} for r in corr.get("pooled", [])]
                        + [{"target": t, **r} for t, rs in (corr.get("per_target") or {}).items() for r in rs])
    if long.empty:
        sections.append(("Rank correlation across sources", "<p>No off-domain (source != target) pairs: nothing to correlate.</p>"))
        return sections
    for model, ix in (corr.get("layers") or {}).items():
        long[f"layer ({model})"] = long.step.map(dict(enumerate(ix)))
    if "p" not in long:
        long["p"] = math.nan
    cols = ["target", "step", "rel_depth", *[c for c in long if c.startswith("layer (")], "n", "rho", "p", "lo", "hi", "note"]
    lo, hi = f"{corr['level']:.0%} CI low", f"{corr['level']:.0%} CI high"
    long = long[cols].rename(columns={"rel_depth": "relative depth", "lo": lo, "hi": hi, "p": "permutation p"})
    plot = long[long.rho.notna()]
    ch = alt.Chart(plot).encode(x=alt.X("relative depth:Q", scale=alt.Scale(domain=[0, 1])),
                                color=alt.Color("target:N", title="target"))
    band = ch.transform_filter(alt.datum.target == "pooled (ranks within target)").mark_area(opacity=0.2).encode(
        y=alt.Y(f"{lo}:Q", title="Spearman rho (-CDNV vs probe acc)", scale=alt.Scale(domain=[-1, 1])), y2=f"{hi}:Q")
    line = ch.mark_line(point=True).encode(y="rho:Q", strokeDash=alt.condition(
        alt.datum.target == "pooled (ranks within target)", alt.value([1, 0]), alt.value([4, 3])),
        tooltip=["target", "step", "n", alt.Tooltip("rho:Q", format=".3f")])
    save((band + line).properties(width=420, height=180, title="Does better target collapse go with better probes?"), folder, "correlation")
    notes = sorted({f"{r['target']}: {r['note']}" for _, r in long.iterrows() if r["note"]}
                   | {f"pooled (ranks within target): no permutation p, {r['p_note']}" for r in corr.get("pooled", [])
                      if r.get("p_note")})
    text = ("<p>Per target: Spearman's rho across the off-domain (source, model) pairs measured on it (in-domain pairs "
            "left out), per relative depth, with a percentile bootstrap interval over resampled sources "
            f"({corr['n_boot']} resamples, seed {corr['seed']}). Pooled: ranks taken within each target, then pooled "
            "(targets' scales never mix); its interval resamples sources jointly for all targets. No rho below "
            "3 points. The pooled rho's <i>permutation p</i> (two-sided) shuffles the models' probe accuracies within "
            f"each (source, target) group at each grid point, every permutation when there are at most {corr.get('n_perm')} "
            f"of them, else {corr.get('n_perm')} seeded ones: it asks whether, with each source's level held fixed, the "
            "better-collapsed models are the better-probed ones (none when each source has one model).</p>"
            + (f"<p>{'; '.join(html.escape(n) for n in notes)}</p>" if notes else ""))
    sections.append(("Rank correlation across sources, per relative depth, with a bootstrap interval",
                     figure("correlation") + text + table(long)))
    (folder / "correlation.csv").write_text(long.to_csv(index=False))
    return sections


def family_sections(spec: Any, folder: Path, sel: Any, shown: set[str], models: list[str]) -> list[tuple[str, str]]:
    """The depth report's family panels (variability, geometry, duality, agreement) for the registry metrics the spec
    selects beyond Figure 3's, on each target's training split: a row per metric, a column per target, a line per
    source (and model, when there are several); and the heatmaps of a selected matrix metric (``cdnv_matrix``) on the
    target training split, a row per target run."""
    from ..figures import family_keys, family_panels
    from ..frames import layer_frame
    from .depth import matrix_sections

    keys = [k for k in family_keys(spec.measure.metrics, ["target"]) if k not in shown]
    df = layer_frame(spec.experiment, keys, role=ROLE, runs=sel)
    cells = df.sort_values(["target", "depth", "source"], kind="stable").drop_duplicates("cell").cell.tolist() if not df.empty else None
    sources = list(spec.transfer.sources)
    order = sources
    if len(models) > 1 and not df.empty:
        df["source"] = df.source + " / " + df.model
        order = [f"{s} / {m}" for m in models for s in sources]
    return (family_panels(df, keys, folder, color="source", order=order, facet="target", facet_order=list(spec.transfer.targets))
            + matrix_sections(spec, folder, sel, cells, rows="cell", role=ROLE, split="target"))


KIND = DomainTransfer()
