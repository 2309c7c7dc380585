"""The cell engine: every study kind's cells run through it.

A study run: data first (every cell's data loaded and checked before torch is imported or a run
created), then the layer selection of every model, then one parent run per study and, per cell:
claim -> broadcast the decision to every process -> run -> FINISHED / FAILED / KILLED -> checkpoint
clean-up -> the results file. A finished cell (same cell id, same data digest, status FINISHED) is
skipped; an unfinished one (killed, interrupted, failed) continues in the same MLflow run from its last
checkpoint; a cell held by another live process is left to it (BUSY). A cell whose training diverges is
marked FAILED with the reason and the study goes on; the exit code is non-zero when any cell failed.
Only the main process writes to MLflow. What a cell *does* is its kind's business
(:class:`pnc.kinds.base.StudyKind`); how it is claimed, closed and recorded is this module's.
"""
from __future__ import annotations

import hashlib
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import catalog, tracking
from .errors import ModelError, TrainingError
from .registry import KINDS
from .results import DvcFiles, write_results
from .spec import flatten_params, spec_digest

CHECKPOINT_ROOT = Path(".pnc") / "checkpoints"
PER_CELL_PARAMS = ("models", "noise.label", "noise.input")  # spec fields a cell replaces by its own setting


@dataclass
class CellOutcome:
    cell: Any
    status: str  # FINISHED, SKIPPED, FAILED, BUSY (another process is running it)
    run_id: str | None = None
    summary: dict = field(default_factory=dict)
    reason: str = ""


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that runs are closed cleanly (marked KILLED)."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise Terminated()


class StudyGuard:
    """Closes a study's MLflow runs however it ends: the open cell run and the parent KILLED on Ctrl-C or
    SIGTERM (turned into KeyboardInterrupt while the guard is active), the parent FAILED on an error;
    never left RUNNING. Only the main process writes."""

    def __init__(self, main: bool):
        self.main, self.parent, self.open_run = main, None, None

    def __enter__(self) -> StudyGuard:
        self._old_term = signal.signal(signal.SIGTERM, _on_sigterm)
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        try:
            if typ is not None and self.main:
                if issubclass(typ, KeyboardInterrupt):  # also a cell run interrupted before its training
                    for r in (self.open_run, self.parent):
                        if r:
                            tracking.end_run(r, "KILLED")
                elif issubclass(typ, Exception) and self.parent:
                    tracking.end_run(self.parent, "FAILED")
        finally:
            signal.signal(signal.SIGTERM, self._old_term)
        return False


# ----------------------------------------------------------------------------- what a run records
TAG_MERGED_TAPS = "pnc.merged_taps"


def data_digest(inputs) -> str:
    h = hashlib.sha256()
    for inp in sorted(inputs, key=lambda i: (i.name, i.context)):
        h.update(f"{inp.name}:{inp.digest}:{inp.context};".encode())
    return h.hexdigest()[:16]


def checkpoint_path(spec: Any, cell: Any) -> Path:
    return CHECKPOINT_ROOT / spec.experiment / f"{cell.id}.pt"


def cell_tags(spec: Any, cell: Any) -> dict[str, str]:
    tags = {"pnc.model": cell.model.name, "pnc.depth": str(catalog.model_depth(cell.model.name)), "pnc.kind": spec.kind}
    return {**tags, **KINDS.get(spec.kind).cell_tags(cell)}


def study_params(spec: Any) -> dict[str, str]:
    """The spec's fields as MLflow params, less those a cell sets for itself (its model, its noise setting)."""
    return {k: v for k, v in flatten_params(spec).items() if not k.startswith(PER_CELL_PARAMS)}


def cell_params(spec: Any, cell: Any) -> dict[str, str]:
    params = study_params(spec)
    for k, v in cell.model.config().items():
        params[f"model.{k}"] = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return {**params, **KINDS.get(spec.kind).cell_params(cell)}


def run_tags(spec: Any, spec_path: str, overrides: list[str] | None) -> dict[str, str]:
    """Tags every run of a study carries: its spec (path, digest), the ``--set`` overrides, the git state, the
    hardware and numerics context."""
    return {tracking.TAG_SPEC: str(spec_path), tracking.TAG_SPEC_DIGEST: spec_digest(spec),
            "pnc.overrides": json.dumps(overrides or []), **tracking.git_state(), **tracking.dvc_tags(), **tracking.numerics_context()}


# ----------------------------------------------------------------------------- building and measuring networks
def build_cell_model(spec: Any, model: Any, *, pretrained: bool = True, strict: bool = False):
    """The network of a model entry (a library/pnc name or your ``factory``), for the spec's dataset (weights only
    with ``pretrained``; ``strict``: the weights file is this network's own checkpoint)."""
    from .models import build_factory_model, build_model

    info = spec.dataset.info
    weights = model.weights if pretrained else None
    if model.factory:
        return build_factory_model(model.factory, num_classes=info.num_classes, in_chans=info.channels, weights=weights,
                                   **model.kwargs)
    return build_model(model.name, num_classes=info.num_classes, in_chans=info.channels, image_size=spec.dataset.size,
                       source=model.source, cifar_stem=model.cifar_stem, pretrained=model.pretrained and pretrained,
                       weights=weights, strict_weights=strict, **model.kwargs)


def check_layer_selection(spec: Any, cells: list) -> None:
    """``measure.layers`` must tap something in every model of the study: checked on each model built on the
    meta device (no memory, no weights) before anything trains. A selection that matches nothing raises
    ModelError naming the modules that exist."""
    import torch

    from .features import select_layers

    for m in {c.model.name: c.model for c in cells}.values():
        if m.uri:  # a logged model: its layers are checked once it is loaded
            continue
        if m.factory:  # your code: built for real once here, so that its errors stop the study before any run
            model = build_cell_model(spec, m, pretrained=False)
        else:
            try:
                with torch.device("meta"):
                    model = build_cell_model(spec, m, pretrained=False)
            except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device is checked when it trains
                continue
        select_layers(model, spec.measure.layer_selection)


def planned_taps(spec: Any, cells: list) -> dict[str, list[tuple[str, str, tuple]] | str]:
    """Per model of the study: its taps (name, type, output shape at the spec's image size), or why they are not
    known before the study runs (a logged model is loaded only then). Taps that a measurement merges (identical
    reduced outputs, ``docs/metrics.md``) are left out, and the kept tap's name says what it stands for
    (``penultimate (= layer3.2)``): found by one forward of two random images through the model built on the CPU
    with its initial weights."""
    import torch

    from .features import FeatureExtractor, tap_shapes

    out: dict[str, list | str] = {}
    size, channels = spec.dataset.size, spec.dataset.info.channels
    for m in {c.model.name: c.model for c in cells}.values():
        if m.uri:
            out[m.name] = f"resolved when {m.uri} is loaded"
            continue
        with torch.device("meta"):
            model = build_cell_model(spec, m, pretrained=False)
        shapes = tap_shapes(model, spec.measure.layer_selection, channels, size)
        with FeatureExtractor(build_cell_model(spec, m, pretrained=False), spec.measure.layer_selection,
                              spec.measure.reduction, seed=spec.train.seed) as extractor:
            extractor(torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0)))
        into: dict[str, list[str]] = {}
        for dropped, kept in extractor.merged.items():
            into.setdefault(kept, []).append(dropped)
        out[m.name] = [(n + (f" (= {', '.join(into[n])})" if n in into else ""), ty, shape)
                       for n, ty, shape in shapes if n not in extractor.merged]
    return out


def log_layers(run_id: str, names: Any) -> None:
    """A measured run's ``layers.json`` (step -> tap name) and, when taps were merged (identical reduced outputs,
    ``docs/metrics.md``), the tag ``pnc.merged_taps`` (``layer3.2 -> penultimate``)."""
    tracking.log_json_artifact(run_id, "layers.json", {str(i): n for i, n in enumerate(names)})
    merged = getattr(names, "merged", {})
    if merged:
        tracking.log_tags(run_id, {TAG_MERGED_TAPS: ", ".join(f"{a} -> {b}" for a, b in merged.items())})


def train_cell(spec, cell, data, *, accelerator, run_id, progress, snapshots=None):
    """Build and train the cell's model (resuming from its checkpoint; measured at ``snapshots``' epochs, see
    :mod:`pnc.snapshots`), logging ``train/loss`` and ``train/acc`` per epoch. Returns (model, TrainResult)."""
    from .data.torchdata import ImageDataset, make_augment
    from .train import seed_everything, train

    def on_epoch(epoch: int, loss: float, acc: float) -> None:
        tracking.log_metrics(run_id, {"train/loss": loss, "train/acc": acc}, step=epoch)

    main = accelerator.is_main_process
    seed_everything(spec.train.seed)
    model = build_cell_model(spec, cell.model)
    train_ds = ImageDataset(data.train, image_size=spec.dataset.size, channels=spec.dataset.info.channels,
                            augment=make_augment(spec.train.augmentation, spec.train.seed))
    result = train(model, train_ds, spec.train, accelerator=accelerator, checkpoint=checkpoint_path(spec, cell),
                   on_epoch=on_epoch if main else None, progress=progress, desc=cell.name,
                   extra_state={"run_id": run_id}, snapshots=snapshots)
    if main:  # what ran, next to the train.precision param asked for (fp16 on a CPU runs fp32)
        tracking.log_tags(run_id, {tracking.TAG_PRECISION: result.precision})
    return model, result


def measure_model(model, spec: Any, splits: dict[str, Any], *, accelerator, num_classes: int, label_names,
                  progress: bool, ncc_train: bool = False, metrics: tuple[str, ...] | None = None,
                  info: dict[str, Any] | None = None) -> tuple[dict[str, list], list[str], dict[str, float]]:
    """Tap every selected layer of ``model`` and measure the given datasets, one pass each.

    ``splits`` maps a role to an ImageDataset: "train" (the reference split: class statistics,
    class means for NCC, probe training data) and optional "test" and further test sets. ``ncc_train`` scores
    ``ncc_acc/train`` (the nearest-class-mean classifier needs the finished class means): from the training features
    kept in the first pass when they fit ``spec.measure.keep_features_bytes``, else in a second pass over the training
    split; ``info`` (if given) gets ``ncc_train``: "kept features" or "second pass". ``metrics``: what to measure
    (default ``spec.measure.metrics``). Returns per-layer results, layer names and the network's own accuracy on each
    split (against label column 0). The results hold the per-layer curves and, when selected, the matrix metrics
    (``cdnv_matrix/<split>``: a K x K array per layer), which :meth:`pnc.metrics.registry.Registry.split` separates
    (curves are logged, matrices saved as an artifact).
    """
    import torch

    from .data.torchdata import shard_loader
    from .features import PENULTIMATE, FeatureExtractor, LayerNames, classifier
    from .metrics import measure
    from .metrics.probes import validation_part

    wanted = list(spec.measure.metrics if metrics is None else metrics)
    net = accelerator.unwrap_model(model).eval()
    try:
        head = classifier(net)  # the network's own classifier: NC3/UNC3/NC4 at its input, the penultimate tap
    except ModelError:
        head = None
    heads = ({PENULTIMATE: (head.weight.detach(), head.bias.detach() if head.bias is not None else torch.zeros(num_classes))}
             if isinstance(head, torch.nn.Linear) and head.out_features == num_classes else {})
    rank, world = accelerator.process_index, accelerator.num_processes
    extractor = FeatureExtractor(net, layers=spec.measure.layer_selection, reduction=spec.measure.reduction, seed=spec.train.seed)
    acc_counts: dict[str, torch.Tensor] = {}
    current: dict[str, Any] = {"split": None, "y": None}

    def batches(role: str, count: bool = True):
        ds = splits[role]
        loader = shard_loader(ds, batch_size=spec.measure.batch_size, rank=rank, world=world, num_workers=spec.train.num_workers)
        for x, y, idx in loader:
            current["split"], current["y"], current["idx"] = (role if count else None), y[:, 0], idx
            yield x.to(accelerator.device), y.to(accelerator.device), idx.to(accelerator.device)

    def extract(x):
        with accelerator.autocast():
            logits, feats = extractor(x)
        if current["split"] is not None:
            ok = (logits.argmax(1).cpu() == current["y"]).double()
            parts = {current["split"]: torch.ones_like(ok)}
            if current["split"] == "test":  # two seeded halves: one picks (validation), the other scores (holdout)
                half = validation_part(current["idx"], 0.5, spec.train.seed).double()
                parts.update({"test_val": half, "test_holdout": 1.0 - half})
            for name, w in parts.items():
                t = acc_counts.setdefault(name, torch.zeros(2, dtype=torch.float64))
                t += torch.stack([(ok * w).sum(), w.sum()])
        return {k: v.float() for k, v in feats.items()}

    evals = {"train": batches("train", count=False)} if ncc_train and "ncc" in wanted else {}
    # "test", then further test sets (e.g. the published corrupted test set, "cifar10c"), in the order given
    evals.update({role: batches(role) for role in splits if role != "train"})
    want_probe = "probe" in wanted and "test" in splits
    try:
        result = measure(
            extract,
            batches("train"),
            evals or None,
            num_classes=num_classes,
            label_names=label_names,
            metrics=tuple(m for m in wanted if m != "probe" or want_probe),
            probe=spec.probe.kind if want_probe else None,
            nc1_dim_cap=spec.measure.nc1_dim_cap,
            scatter_products=spec.measure.scatter_products,
            keep_features_bytes=spec.measure.keep_features_bytes,
            val_fraction=spec.probe.val_fraction,
            logistic_max_samples=spec.probe.max_samples,
            seed=spec.train.seed,
            accelerator=accelerator if world > 1 else None,
            progress=progress,
            classifiers=heads,
        )
    finally:
        extractor.close()
    names = LayerNames(result.layers, extractor.merged)
    if info is not None and result.info.get("train_eval"):
        info["ncc_train"] = result.info["train_eval"]
    accs = {}
    for s, t in acc_counts.items():
        if world > 1:
            t = accelerator.reduce(t.to(accelerator.device), reduction="sum").cpu()
        accs[s] = (t[0] / t[1]).item() if t[1] > 0 else float("nan")
    return {**result.metrics, **result.matrices}, names, accs  # matrix metrics: REGISTRY.split() them off before logging


# ----------------------------------------------------------------------------- one study's run
class StudyRun:
    """One study being run by this process (and its peers): the accelerator, the parent run, the guard, and
    the two steps every cell goes through, :meth:`claim` and :meth:`execute`."""

    def __init__(self, spec: Any, *, spec_path: str, force: bool, progress: bool, overrides: list[str] | None,
                 accelerator: Any, guard: StudyGuard):
        self.spec, self.spec_path, self.force, self.progress, self.overrides = spec, spec_path, force, progress, overrides
        self.accelerator, self.guard = accelerator, guard
        self.main = accelerator.is_main_process
        self.exp_id = self.parent = None
        if self.main:
            self.exp_id = tracking.experiment_id(spec.experiment, experiment_note(spec))
            self.parent = guard.parent = tracking.study_parent(
                self.exp_id, spec.name, {**run_tags(spec, spec_path, overrides), "pnc.kind": spec.kind})
            tracking.log_params(self.parent, study_params(spec))

    def tags(self) -> dict[str, str]:
        return run_tags(self.spec, self.spec_path, self.overrides)

    def say(self, message: str) -> None:
        """``message`` on stderr, from the main process only."""
        if self.main:
            print(message, file=sys.stderr)

    def broadcast(self, *values: Any) -> list:
        """The main process's ``values`` on every process (one collective; the values themselves when alone)."""
        box = list(values)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(box)
        return box

    def claim(self, cell: Any, tags: dict[str, str], *, role: str = "cell", cell_id: str | None = None,
              run_name: str | None = None, force: bool | None = None, usable: Callable = lambda r: True,
              on_claimed: Callable[[str, Any], None] | None = None) -> tracking.Claim:
        """Claim the run of ``cell`` (or of a sub-run: ``role``, ``cell_id``) on the main process, run
        ``on_claimed(run_id, reused_run)`` there when it is this process's to run, and broadcast the decision
        (the other processes' claims carry no ``reused`` run and no ``holder``)."""
        claim = tracking.Claim("run", None)
        if self.main:
            claim = tracking.claim_cell_run(self.exp_id, self.parent, cell, tags, role=role, cell_id=cell_id,
                                            run_name=run_name, force=self.force if force is None else force, usable=usable)
            if claim.decision == "run":
                self.guard.open_run = claim.run_id
                if claim.reused is not None and tracking.TAG_FAILURE in claim.reused.data.tags:  # retried: the old reason no longer holds
                    tracking.delete_tag(claim.run_id, tracking.TAG_FAILURE)
                if on_claimed is not None:
                    on_claimed(claim.run_id, claim.reused)
        claim.decision, claim.run_id = self.broadcast(claim.decision, claim.run_id)
        return claim

    def execute(self, run_id: str, work: Callable[[], dict], *, checkpoint: Path | None = None) -> tuple[str, dict, str]:
        """Run ``work`` for a claimed run and close it: (status, summary, reason). FINISHED when it returns;
        FAILED with the reason on a TrainingError (the study goes on); KILLED on Ctrl-C / SIGTERM and FAILED
        on any other error, both re-raised. The checkpoint goes once the run is closed."""
        status, summary, reason = "FINISHED", {}, ""
        try:
            summary = work()
        except TrainingError as e:
            status, reason = "FAILED", str(e)
            if self.main:
                tracking.log_tags(run_id, {tracking.TAG_FAILURE: reason})
        except KeyboardInterrupt:
            if self.main and run_id:
                tracking.end_run(run_id, "KILLED")
            raise
        except BaseException as e:
            if self.main and run_id:
                tracking.log_tags(run_id, {tracking.TAG_FAILURE: f"{type(e).__name__}: {e}"[:5000]})
                tracking.end_run(run_id, "FAILED")
            raise
        if self.main:
            tracking.end_run(run_id, status)
            self.guard.open_run = None
            if checkpoint is not None and checkpoint.exists():
                checkpoint.unlink()
        return status, summary, reason


def run_study(spec: Any, cells: list, *, spec_path: str, force: bool = False, progress: bool = True,
              results_path: str | None = None, overrides: list[str] | None = None, dvc_files: DvcFiles | None = None) -> int:
    """Run ``cells`` of ``spec`` through its kind; returns the exit code (0 all finished or skipped, 1 some
    failed or are held by other processes). ``results_path``, ``dvc_files``: the files a DVC stage declares."""
    kind = KINDS.get(spec.kind)
    progress = progress and sys.stderr.isatty()
    data = kind.prepare(spec, cells)  # data first: a missing dataset stops the run before torch is imported
    check_layer_selection(spec, cells)  # imports torch
    from .train import make_accelerator

    accelerator = make_accelerator(spec.train.precision, spec.train.grad_accum_steps)
    outcomes: list[CellOutcome] = []
    with StudyGuard(accelerator.is_main_process) as guard:
        study = StudyRun(spec, spec_path=spec_path, force=force, progress=progress, overrides=overrides,
                         accelerator=accelerator, guard=guard)
        for i, cell in enumerate(cells):
            outcomes.append(kind.run_cell(study, cell, data, f"[{i + 1}/{len(cells)}]"))
        failed = finish_study(spec, study.parent, outcomes, results_path, study.main, dvc_files)  # inside the guard
    return close_study(spec, outcomes, failed, accelerator)


# ----------------------------------------------------------------------------- closing a study
def log_study_summary(spec: Any, parent: str) -> dict:
    """The kind's analyses (transition, efficient depth, noise map, transfer correlation, ...) on the parent run;
    returns them ({} when they could not run)."""
    try:
        summary = KINDS.get(spec.kind).analyses(spec)
    except Exception as e:  # noqa: BLE001 - an analysis that cannot run must not fail the study
        print(f"  (study analyses skipped: {type(e).__name__}: {e})", file=sys.stderr)
        return {}
    tracking.log_metrics(parent, summary["metrics"])
    tracking.log_tags(parent, summary["tags"])
    tracking.log_layer_metrics(parent, summary.get("curves", {}))
    tracking.log_json_artifact(parent, "analysis.json", summary["details"])
    for k, v in summary["tags"].items():
        print(f"  {k}: {v}", file=sys.stderr)
    return summary


def experiment_note(spec: Any) -> str:
    """The experiment's description (``mlflow.note.content``): the study and how its runs are laid out."""
    return (f"**{spec.name}**, a pnc `{spec.kind}` study. {spec.description or ''}\n\n"
            "One parent run per study (its analyses, report and this description) with one child run per cell; "
            "per-layer metrics (`cdnv/...`, `nc2/...`, `probe_acc/...`) are logged with step = layer index, so a "
            "run's chart view draws them across layers, and each cell run holds its per-layer figure `layers.png`. "
            "`layers.json` maps a step to its module.")


def study_note(spec: Any, tags: dict[str, str], outcomes: list, analyses: dict) -> str:
    """The parent run's description (``mlflow.note.content``, markdown): the study, its cells, the analyses'
    verdicts, and the command that reproduces it (the spec path and ``--set`` overrides the run was made with)."""
    sets = " ".join(f"--set '{o}'" for o in json.loads(tags.get("pnc.overrides") or "[]"))
    lines = [f"**{spec.name}** ({spec.kind}): {spec.description or ''}", "",
             f"{len(outcomes)} cell(s) in this invocation:", "", "| cell | status | run |", "|---|---|---|"]
    lines += [f"| {o.cell.name} | {o.status} | {o.run_id or ''} |" for o in outcomes[:60]]
    verdicts = (analyses or {}).get("tags") or {}
    lines += ["", "**Analyses**" if verdicts else "**Analyses**: none logged (see the report)", ""]
    lines += [f"- `{k}`: {v}" for k, v in verdicts.items()]
    command = f"pnc run {tags.get(tracking.TAG_SPEC, '')} {sets}".rstrip()
    lines += ["", f"**Reproduce**: `{command}` (finished cells are skipped; `pnc report` with the same arguments "
                  "draws the report)."]
    exp = tags.get("pnc.dvc_experiment")
    if exp:
        lines.append(f"Run as DVC experiment `{exp}`: `dvc exp apply {exp}` restores its spec, `dvc repro` re-runs it.")
    return "\n".join(lines)


def finish_study(spec: Any, parent: str | None, outcomes: list, results_path: str | None, main: bool,
                 dvc_files: DvcFiles | None = None) -> list:
    """Study analyses, the results file (and DVC's metrics and plots files) and the parent's final status (call
    inside the StudyGuard). Returns the outcomes that make the run incomplete: FAILED cells, and BUSY ones (another
    process runs them)."""
    failed = [o for o in outcomes if o.status == "FAILED"]
    busy = [o for o in outcomes if o.status == "BUSY"]
    if main:
        if results_path:
            write_results(Path(results_path), spec, outcomes)
        if failed or study_complete(spec, outcomes):
            summary = log_study_summary(spec, parent)
            tracking.log_tags(parent, {tracking.TAG_NOTE: study_note(spec, tracking.get_run(parent).data.tags, outcomes, summary)})
            if dvc_files is not None:
                dvc_files.write(spec, summary)
            tracking.end_run(parent, "FAILED" if failed else "FINISHED")
        else:  # run in parts (`--cell`, fanned out) and not all done: the last cell to finish closes the study
            print(f"{spec.name}: other cells of the study are not finished yet; its analyses and parent run "
                  f"(left RUNNING) are closed by the run that finishes the last cell", file=sys.stderr)
    return failed + busy


def study_complete(spec: Any, outcomes: list) -> bool:
    """Whether every run the study's cells make (:meth:`~pnc.kinds.base.StudyKind.runs_of`) is FINISHED:
    known from ``outcomes`` when this process went through all cells, else looked up in the store."""
    from .cells import expand

    kind = KINDS.get(spec.kind)
    cells = expand(spec)
    if any(o.status == "BUSY" for o in outcomes) or {o.cell.id for o in outcomes} != {c.id for c in cells}:
        exp_id = tracking.experiment_id(spec.experiment)
        for cell_id, role, _ in kind.runs_of(cells):
            run = tracking.find_cell_run(exp_id, cell_id, role=role)
            if run is None or run.info.status != "FINISHED":
                return False
    return True


def close_study(spec: Any, outcomes: list, incomplete: list, accelerator: Any) -> int:
    """Print the study's outcome (main process), tear down the process group; the exit code
    (1 when a cell failed or is still being run by another process)."""
    from .train import shutdown

    if accelerator.is_main_process:
        count = {s: sum(o.status == s for o in outcomes) for s in ("FINISHED", "SKIPPED", "FAILED", "BUSY")}
        busy = f", {count['BUSY']} being run by other processes" if count["BUSY"] else ""
        print(f"{spec.name}: {count['FINISHED']} cell(s) run, {count['SKIPPED']} skipped, {count['FAILED']} failed{busy} "
              f"(MLflow: {tracking.tracking_uri()}, experiment '{spec.experiment}')", file=sys.stderr)
        for o in incomplete:
            print(f"  {o.status} {o.cell.name} (run {o.run_id}): {o.reason}", file=sys.stderr)
        if count["BUSY"]:
            print("  run the study again once they finish: their cells are then skipped and the results complete",
                  file=sys.stderr)
    shutdown(accelerator)
    return 1 if incomplete else 0
