"""``depth_sweep``: train a family of networks of increasing depth, measure every layer (paper sec. 4.1, Fig. 1).

Analyses: the transition phase per model (segmented fit of log CDNV) and the efficient depth (the smallest
depth whose curve shows the transition, next to the depth a validation split picks).
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, Literal

from ..catalog import model_order
from ..spec import StudySpecBase
from .base import CellData, StudyKind, model_cells

CURVE_KEY = "cdnv/train"  # the curve whose collapse the analyses locate
STAGE_KEY = "layer/stage"  # per-layer metric: the tap's stage, an index into the run's tag STAGES_TAG
STAGES_TAG = "pnc.stages"  # JSON list of the run's stage names, in depth order


def tap_stages(names: list[str], selection: Any) -> list[str]:
    """The stage of each tap, from the model's own module tree (:func:`pnc.features.stage_name`: ``layer2.1`` ->
    ``layer2``); with ``measure.layers: stages`` each tap is a stage of its own; the pooled classifier input
    ("penultimate") is :data:`pnc.analysis.HEAD`, unless it stands for a block merged into it (identical outputs:
    ``names.merged``, ``docs/metrics.md``, "Layers"): then it is that block's stage."""
    from ..analysis import HEAD
    from ..features import PENULTIMATE, stage_name

    stands_for = {kept: dropped for dropped, kept in getattr(names, "merged", {}).items()}

    def stage(n: str) -> str:
        n = stands_for.get(n, n)
        return HEAD if n == PENULTIMATE else (n if selection == "stages" else stage_name(n) or n)

    return [stage(n) for n in names]


def metric_name(part: str) -> str:
    """A stage or boundary name as MLflow allows it in a metric key."""
    return re.sub(r"[^\w\-. :/]", "_", part)


def collapse_metrics(c: Any) -> dict[str, float]:
    """A :class:`pnc.analysis.StageCollapse` as cell-run metrics: ``collapse/total_decline``,
    ``collapse/share/<part>`` per stage and boundary, ``collapse/slope_per_block/<stage>``."""
    out = {"collapse/total_decline": c.total_decline}
    for p in c.parts:
        if p["share"] is not None:
            out[f"collapse/share/{metric_name(p['name'])}"] = p["share"]
        if p.get("slope_per_block") is not None:
            out[f"collapse/slope_per_block/{metric_name(p['name'])}"] = p["slope_per_block"]
    return out


KEYS = [("cdnv/train", "CDNV (train)", True), ("nc2/train", "NC2 (train)", False),
        ("probe_acc/test", "probe accuracy (test)", False)]
EXTRA_KEYS = ("nc1/train", "ncc_acc/train", "ncc_acc/test")


class DepthSweepSpec(StudySpecBase):
    """Train a family of networks of increasing depth; measure every layer (paper sec. 4.1, Fig. 1)."""

    kind: Literal["depth_sweep"]


class DepthSweep(StudyKind):
    name = "depth_sweep"
    spec_class = DepthSweepSpec
    params_key = "depth_studies"
    headline_keys = ("train/final_acc", "test/acc")
    ncc_train = True  # ncc_acc/train: a second pass over the training split with the finished class means
    by_noise = False  # whether its cells differ by noise setting (names of the analyses over time, report labels)

    def expand(self, spec: Any) -> list:
        return model_cells(spec)

    def load_data(self, spec: Any, cell: Any) -> Any:
        from ..data.registry import load_cell_data

        return load_cell_data(spec, cell)

    def prepare(self, spec: Any, cells: list) -> CellData:
        data = CellData(lambda cell: self.load_data(spec, cell))
        data(cells[0])
        return data

    # ------------------------------------------------------------------ one cell
    def run_cell(self, study: Any, cell: Any, data: CellData, prefix: str) -> Any:
        from .. import tracking
        from ..engine import CellOutcome, cell_params, cell_tags, checkpoint_path, data_digest

        spec, main = study.spec, study.main
        d = data(cell)
        digest = data_digest(d.inputs)
        origin = self.origin(cell) if main else {}  # where a given network comes from (measure studies)
        same = {tracking.TAG_DATA: digest, **origin}  # new data or another model version: a new run

        def claimed(run_id: str, reused: Any) -> None:
            tracking.log_params(run_id, cell_params(spec, cell))
            tracking.log_inputs(run_id, d.inputs if reused is None else [])
            self.log_origin(run_id, origin)

        att = study.claim(cell, {**same, **study.tags(), **cell_tags(spec, cell)},
                          usable=lambda r: all(r.data.tags.get(k) == v for k, v in same.items()), on_claimed=claimed)
        if att.decision == "skip":
            study.say(f"{prefix} {cell.name}: finished earlier (run {att.run_id}), skipped")
            return CellOutcome(cell, "SKIPPED", att.run_id)
        if att.decision == "busy":
            study.say(f"{prefix} {cell.name}: {att.reason}")
            return CellOutcome(cell, "BUSY", att.run_id, reason=att.reason)
        study.say(f"{prefix} {cell.name} (cell {cell.id}, run {att.run_id})")
        t0 = time.time()
        status, summary, reason = study.execute(att.run_id, lambda: self.measure_network(study, cell, d, att.run_id),
                                                checkpoint=checkpoint_path(spec, cell))
        if status == "FAILED":
            study.say(f"  FAILED: {reason}")
            return CellOutcome(cell, "FAILED", att.run_id, reason=reason)
        if main:
            summary["seconds"] = round(time.time() - t0, 1)
            print(f"  done in {summary['seconds']:.0f}s: train acc {summary['train_final_acc']:.4f}, "
                  f"test acc {summary['test_acc']:.4f}" + (f", final-layer probe {summary['final_probe_acc']:.4f}"
                                                           if "final_probe_acc" in summary else ""), file=sys.stderr)
        return CellOutcome(cell, "FINISHED", att.run_id, summary)

    def origin(self, cell: Any) -> dict[str, str]:
        """Tags that identify a given network beyond the cell id (a registry version behind an alias); trained: none."""
        return {}

    def log_origin(self, run_id: str, origin: dict[str, str]) -> None:
        """Record where a given network came from (its input model); trained networks have nothing to record."""

    def network(self, study: Any, cell: Any, data: Any, run_id: str, snapshots: Any = None) -> tuple[Any, Any]:
        """(the cell's network, its TrainResult): trained here, resuming from its checkpoint, measured at the
        ``snapshots``' epochs on the way (:mod:`pnc.snapshots`)."""
        from ..engine import train_cell

        return train_cell(study.spec, cell, data, accelerator=study.accelerator, run_id=run_id, progress=study.progress,
                          snapshots=snapshots)

    def measure_network(self, study: Any, cell: Any, data: Any, run_id: str) -> dict:
        """Get the cell's network (:meth:`network`), measure every layer, log to ``run_id``."""
        from .. import snapshots, tracking
        from ..engine import log_layers
        from ..figures import layer_figure
        from ..metrics.geometry import REGISTRY

        main = study.main
        snaps = snapshots.make(study.spec, lambda m: self.measure_cell(study, m, data)) if self.trains else None
        model, result = self.network(study, cell, data, run_id, **({"snapshots": snaps} if snaps else {}))
        how: dict[str, Any] = {}
        results, names, accs = self.measure_cell(study, model, data, info=how)
        results, matrices = REGISTRY.split(results)  # matrix metrics (cdnv_matrix): an artifact, not curves
        if snaps is not None and main:  # the table, its final epoch being the curves logged below
            snapshots.record(run_id, snaps, results, names, accs)
        summary = {"train_final_acc": accs.get("train"), "test_acc": accs.get("test"),
                   **({"train_acc": result.acc, "epochs": result.epochs, "resumed_from": result.resumed_from} if result else {}),
                   **{f"{r}_acc": accs.get(r) for r in data.extra_eval}}
        probe_key = "probe_acc/test"
        if probe_key in results:
            summary["final_probe_acc"] = results[probe_key][-1]
            summary["best_probe_acc"] = max(results[probe_key])
        if main:
            tracking.log_layer_metrics(run_id, results)
            if how.get("ncc_train"):
                tracking.log_tags(run_id, {tracking.TAG_NCC_TRAIN: how["ncc_train"]})
            finals = {"train/final_acc": accs.get("train"), "test/acc": accs.get("test"), "val/acc": accs.get("test_val"),
                      "test/holdout_acc": accs.get("test_holdout"), "layers/count": len(names),
                      **({"train/last_epoch_acc": result.acc, "train/last_epoch_loss": result.loss} if result else {})}
            if probe_key in results:
                finals.update({"final/probe_acc_test": summary["final_probe_acc"], "best/probe_acc_test": summary["best_probe_acc"]})
            for role in data.extra_eval:
                finals[f"test/{role}_acc"] = accs.get(role)
            tracking.log_metrics(run_id, finals)
            log_layers(run_id, names)
            self.log_stages(run_id, results, names, study.spec.measure.layers)
            tracking.log_figure(run_id, layer_figure(results, names, cell.name), "layers.png")
            tracking.log_matrix_artifacts(run_id, matrices, names)
        summary.update(self.log_cell_extras(study, run_id, results, names, accs, data))
        return summary

    def datasets(self, spec: Any, data: Any) -> dict[str, Any]:
        """The ImageDatasets of a cell's measurement: train, test and further test sets."""
        from ..data.torchdata import ImageDataset

        size, ch = spec.dataset.size, spec.dataset.info.channels
        return {"train": ImageDataset(data.train, image_size=size, channels=ch),
                "test": ImageDataset(data.test, image_size=size, channels=ch),
                **{role: ImageDataset(split, image_size=size, channels=ch) for role, split in data.extra_eval.items()}}

    def measure_cell(self, study: Any, model: Any, data: Any, info: dict | None = None) -> tuple[dict, list[str], dict]:
        """(per-layer results, layer names, accuracies) of a trained cell network; ``info`` gets how ncc_acc/train
        was scored (``measure_model``)."""
        from ..engine import measure_model

        spec = study.spec
        return measure_model(model, spec, self.datasets(spec, data), accelerator=study.accelerator,
                             num_classes=spec.dataset.info.num_classes, label_names=("train",), progress=study.progress,
                             ncc_train=self.ncc_train, info=info)

    def log_stages(self, run_id: str, results: dict, names: list[str], selection: Any) -> None:
        """The stage of each tap (per-layer metric ``layer/stage``: an index into the run's tag ``pnc.stages``) and
        where the CDNV curve declines (:func:`pnc.analysis.collapse_by_stage`: metrics ``collapse/...``)."""
        import json

        from .. import analysis, tracking

        labels = tap_stages(names, selection)
        order = list(dict.fromkeys(labels))
        tracking.log_tags(run_id, {STAGES_TAG: json.dumps(order)})
        tracking.log_layer_metrics(run_id, {STAGE_KEY: [float(order.index(s)) for s in labels]})
        curve = results.get(CURVE_KEY)
        if curve is None or len(curve) != len(labels):
            return
        try:
            c = analysis.collapse_by_stage(curve, labels)
        except ValueError:  # a stage's taps are not consecutive (a pattern selection): no decomposition
            return
        tracking.log_metrics(run_id, collapse_metrics(c))

    def log_cell_extras(self, study: Any, run_id: str, results: dict, names: list[str], accs: dict, data: Any) -> dict:
        """What a kind logs beyond the per-layer curves and final accuracies; returns summary additions."""
        return {}

    # ------------------------------------------------------------------ reading back
    def analyses(self, spec: Any, selection: Any = None) -> dict:
        """The transition per model and the efficient depth, from the runs of the spec's cells."""
        from .. import analysis
        from ..frames import RunSelection, layer_frame, run_frame

        sel = selection if selection is not None else RunSelection(spec)
        out: dict = {"metrics": {}, "tags": {}, "details": {}, "curves": {}}
        metrics, tags, details = out["metrics"], out["tags"], out["details"]
        df = layer_frame(spec.experiment, [CURVE_KEY, STAGE_KEY], runs=sel)
        runs = run_frame(spec.experiment, runs=sel)
        stages = df[df.metric == STAGE_KEY]
        df = df[df.metric == CURVE_KEY]
        if df.empty or runs.empty:
            return out
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
            c = self.stage_collapse(curve, stages[stages.run_id.isin(set(d.run_id))], r.get(STAGES_TAG))
            if c is not None:
                details.setdefault("collapse", {})[model] = c.as_dict()
                metrics.update({k.replace("collapse/", f"collapse/{model}/", 1): v for k, v in collapse_metrics(c).items()})
            rows.append((int(d.depth.iloc[0]), model, curve, float(r["val/acc"]), float(r["test/holdout_acc"])))
        if rows and self.depth_family([x[1] for x in rows]):
            rows.sort()
            e = analysis.efficient_depth([x[0] for x in rows], [x[2] for x in rows], [x[3] for x in rows], [x[4] for x in rows])
            details["efficient_depth"] = e.as_dict()
            metrics["efficient_depth/validation"] = e.validation_depth
            if e.transition_depth is not None:
                metrics["efficient_depth/transition"] = e.transition_depth
                metrics["efficient_depth/test_acc_cost"] = e.cost
            tags["pnc.efficient_depth"] = (f"transition: {e.transition_depth}, validation: {e.validation_depth}, "
                                           f"cost: {e.cost if e.cost is None else round(e.cost, 4)}")
        out["metrics"] = {k: float(v) for k, v in metrics.items() if v is not None}
        return self.over_time(spec, sel, out)

    def over_time(self, spec: Any, selection: Any, out: dict) -> dict:
        """``out`` with the analyses over training time added (:func:`pnc.snapshots.time_analyses`)."""
        from .. import snapshots

        if not self.trains:
            return out
        return snapshots.merge(out, snapshots.time_analyses(spec, selection, self.curve_key, by_noise=self.by_noise))

    def stage_collapse(self, curve: list[float], stages: Any, names: Any) -> Any:
        """:func:`pnc.analysis.collapse_by_stage` of one run's curve, its taps' stages read back from the run
        (per-layer ``layer/stage`` into the tag ``pnc.stages``); None for runs that did not log them."""
        import json

        from .. import analysis

        if stages.empty or not isinstance(names, str):
            return None
        order = json.loads(names)
        labels = [order[int(v)] for v in stages.sort_values("layer").value]
        if len(labels) != len(curve):
            return None
        try:
            return analysis.collapse_by_stage(curve, labels)
        except ValueError:
            return None

    def family_panels(self, spec: Any, folder: Path, selection: Any, shown: set[str], order: list[str]) -> list[tuple[str, str]]:
        """A figure per metric family (variability, geometry, duality, agreement) of the other registry metrics the
        study measured (``measure.metrics``), training split and test split, one line per model; and a heatmap of
        each selected matrix metric (``cdnv_matrix``) at the first, middle and last tapped layer of every model."""
        from ..figures import family_keys, family_panels
        from ..frames import layer_frame

        keys = [k for k in family_keys(spec.measure.metrics, ["train", "test"]) if k not in shown]
        df = layer_frame(spec.experiment, keys, runs=selection)
        return family_panels(df, keys, folder, color="model", order=order) + matrix_sections(spec, folder, selection, order)

    def collapse_section(self, collapse: dict, folder: Path, name: str) -> tuple[str, str]:
        """The report's "where collapse happens" section: a stacked bar per model and the table behind it."""
        import pandas as pd

        from ..figures import collapse_bars, figure, save, table

        order = model_order(collapse)
        rows = [{"model": m, "position": i, "part": p["name"], "kind": p["kind"], "share": p["share"],
                 "decline": p["decline"], "slope_per_block": p.get("slope_per_block"), "blocks": p.get("blocks")}
                for m in order for i, p in enumerate(collapse[m]["parts"])]
        df = pd.DataFrame(rows)
        drawn = df[df.share.notna()]
        html = ("<p>Per model, the decline of log CDNV (train) from the first tapped block to the pooled classifier "
                "input, split into what happens between consecutive blocks of one stage (a stage, e.g. <code>layer2"
                "</code>) and across the step into the next stage (a boundary, e.g. <code>layer1-layer2</code>: the "
                "next stage's first, downsampling, block; <code>-head</code>: global pooling). Shares add up to 1; a "
                "negative share is a rise. Slope per block: least-squares slope of log CDNV per block inside the stage."
                "</p>")
        if not drawn.empty:
            save(collapse_bars(drawn, [m for m in order if m in set(drawn.model)], f"{name}: where CDNV declines"),
                 folder, "collapse_by_stage")
            html += figure("collapse_by_stage")
        notes = [f"{m}: {collapse[m]['reason']}" for m in order if collapse[m].get("reason")]
        html += "".join(f"<p>{n}</p>" for n in notes)
        wide = df.pivot_table(index="model", columns="part", values="share", sort=False).reindex(order).reset_index()
        slopes = df[df.kind == "stage"].pivot_table(index="model", columns="part", values="slope_per_block", sort=False)
        slopes.columns = [f"slope/block {c}" for c in slopes.columns]
        wide = wide.merge(slopes.reset_index(), on="model", how="left")
        wide.insert(1, "total decline (log)", [collapse[m]["total_decline"] for m in wide.model])
        return ("Where collapse happens: share of the CDNV decline per stage and stage boundary", html + table(wide))

    def depth_family(self, models: list[str]) -> bool:
        """Whether ``models`` are depths of one family, so that an efficient depth among them means something."""
        return True

    def headline(self, spec: Any, analyses: dict, selection: Any = None) -> dict[str, float]:
        """Final accuracies, the efficient depths, and per model whether its curve shows the transition (1 or 0)."""
        out = super().headline(spec, analyses, selection)
        for model, t in ((analyses.get("details") or {}).get("transitions") or {}).items():
            out[f"transition/found@model={model}"] = float(bool(t.get("found")))
        return out

    def report(self, spec: Any, folder: Path, selection: Any) -> list[tuple[str, str]]:
        import altair as alt
        import pandas as pd

        from ..figures import curves, figure, fmt, no_runs, save, table
        from ..frames import layer_frame, run_frame

        df = layer_frame(spec.experiment, [k for k, _, _ in KEYS] + list(EXTRA_KEYS), runs=selection)
        if df.empty:
            raise no_runs(spec)
        order = df.drop_duplicates("model").sort_values("depth").model.tolist()
        rows = [curves(df, k, t, log, "model", order, width=420, height=170) for k, t, log in KEYS if k in set(df.metric)]
        save(alt.vconcat(*rows).properties(title=f"{spec.name}: progressive collapse by depth"), folder, "layers")
        sections = [("Per-layer collapse and probe accuracy (Figure 1 layout)", figure("layers"))]
        extra = [k for k in EXTRA_KEYS if k in set(df.metric)]
        if extra:
            save(alt.hconcat(*[curves(df, k, k, k.startswith("nc1"), "model", order) for k in extra]), folder, "extra")
            sections.append(("NC1 and nearest-class-centre accuracy", figure("extra")))
        sections += self.family_panels(spec, folder, selection, shown={k for k, _, _ in KEYS} | set(EXTRA_KEYS), order=order)
        runs = run_frame(spec.experiment, runs=selection)
        cols = [c for c in ["pnc.model", "epochs", "overrides", "train/final_acc", "test/acc", "val/acc", "test/holdout_acc",
                            "final/probe_acc_test", "best/probe_acc_test"] if c in runs]
        if cols:
            sections.append(("Final accuracies per model", table(runs[cols])))
        det = self.analyses(spec, selection)["details"]
        if det.get("transitions"):
            t = pd.DataFrame([{"model": m, **{k: v for k, v in det["transitions"][m].items() if k not in ("slopes", "phases")},
                               "slopes (log CDNV / rel. depth)": ", ".join(f"{s:.2f}" for s in det["transitions"][m]["slopes"]),
                               "fall before / along / after plateau (log CDNV)":
                                   ", ".join(f"{s:.2f}" for s in det["transitions"][m].get("phases") or [])}
                              for m in model_order(det["transitions"])])
            sections.append(("Transition phase (segmented fit of log CDNV; see README)", table(t)))
        if det.get("collapse"):
            sections.append(self.collapse_section(det["collapse"], folder, spec.name))
        if det.get("efficient_depth"):
            e = det["efficient_depth"]
            text = (f"<p>Smallest depth whose CDNV curve shows the transition: <b>{e['transition_depth']}</b>; depth the "
                    f"validation half of the test split picks: <b>{e['validation_depth']}</b>; holdout test accuracy given up by "
                    f"the intrinsic choice: <b>{fmt(e['cost'])}</b>.</p>")
            sections.append(("Efficient depth", text + table(pd.DataFrame(e["per_depth"]))))
        return sections + self.report_over_time(spec, folder, selection, det)

    def report_over_time(self, spec: Any, folder: Path, selection: Any, details: dict) -> list[tuple[str, str]]:
        """Heatmaps, overlaid curves and analyses over training time (:func:`pnc.snapshots.report_sections`)."""
        from .. import snapshots

        return snapshots.report_sections(spec, folder, selection, self.curve_key, details.get("dynamics"), by_noise=self.by_noise)


KIND = DepthSweep()


def matrix_sections(spec: Any, folder: Path, selection: Any, order: list[str], rows: str = "model",
                    role: str = "cell", split: str = "train") -> list[tuple[str, str]]:
    """Heatmaps of the matrix metrics the spec selects (``cdnv_matrix``) on ``split``, from each run's artifact, at the
    first, middle and last tapped layer; a row per ``rows`` value. With more classes than a figure can show
    (``HEATMAP_MAX_CLASSES``), a note pointing at the artifacts instead."""
    import html

    from ..figures import HEATMAP_MAX_CLASSES, matrix_heatmaps
    from ..frames import matrix_frame
    from ..metrics.geometry import REGISTRY

    sections = []
    for m in REGISTRY:
        if m.kind != "matrix" or m.name not in spec.measure.metrics:
            continue
        if spec.dataset.info.num_classes > HEATMAP_MAX_CLASSES:
            sections.append((f"{m.label} ({m.name})", f"<p>{spec.dataset.info.num_classes} classes: too many to draw "
                             f"(at most {HEATMAP_MAX_CLASSES}); each run's artifact <code>{html.escape(m.artifact)}</code> "
                             "holds the matrices of every layer (docs/metrics.md).</p>"))
            continue
        frame = matrix_frame(spec.experiment, m.artifact, [split], role=role, runs=selection, max_classes=HEATMAP_MAX_CLASSES)
        sections += matrix_heatmaps(frame, folder, m.name, rows=rows, row_order=order)
    return sections
