"""Domain transfer through the MLflow model registry (paper sec. 4.3, Figure 3).

For each (model, source domain) cell: train on the source and register the network in the
model registry (tags: study, source, cell id, spec and data digests; aliases ``current`` and
``src-<source>``; MLflow reserves ``latest``), or reuse a registered version with the same cell id and data digest. Then,
for each target domain, load that version by URI (``models:/<name>/<version>``), measure
every layer's CDNV and NC2 on the target training split and train layer-wise linear probes on
``probe.samples_per_class`` target samples per class, scored on the held-out target split.
Each (source, target) pair is one child run whose input model is the registered version.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

import numpy as np

from .errors import TrainingError


def registered_name(spec: Any, cell: Any) -> str:
    if spec.tracking.registered_model and len(spec.models) == 1:
        return spec.tracking.registered_model
    base = spec.tracking.registered_model or spec.name
    return f"{base}-{cell.model.name}"


def _alias(source: str) -> str:
    return "src-" + re.sub(r"[^A-Za-z0-9_-]", "_", source)


TAG_TRAIN_KEY = "pnc.train_key"


def find_registered(name: str, cell: Any, digest: str) -> Any | None:
    """The newest registered version of ``name`` trained as this cell trains (same ``train_key``: dataset, model,
    recipe, source) on this data, or None. Measurement, probe and target settings do not matter."""
    from . import tracking

    c = tracking.client()
    try:
        versions = tracking._retrying(lambda: c.search_model_versions(f"name='{name}'"))
    except Exception:  # noqa: BLE001 - no such registered model yet
        return None
    hits = [v for v in versions if v.tags.get(tracking.TAG_DATA) == digest and v.status == "READY"
            and (v.tags.get(TAG_TRAIN_KEY) == cell.train_key
                 or TAG_TRAIN_KEY not in v.tags and v.tags.get(tracking.TAG_CELL) == cell.id)]  # versions before train_key
    return max(hits, key=lambda v: int(v.version)) if hits else None


def register(net, run_id: str, name: str, tags: dict[str, str], source: str) -> Any:
    """Log ``net`` to ``run_id`` and register it as a new version of ``name`` with tags and aliases."""
    import mlflow
    import mlflow.pytorch

    from . import tracking

    c = tracking.client()
    # Pickle on purpose: the models are pnc's own, timm's or torchvision's classes, read back by pnc (pt2 export
    # would trace them); MLflow's warning about it, once per registered model, only clutters the study's log.
    log = logging.getLogger("mlflow.pytorch")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(net.cpu().eval(), name="model", serialization_format="pickle",
                                            pip_requirements=["torch", "torchvision", "timm"])
    finally:
        log.setLevel(level)
    try:
        tracking._retrying(lambda: c.create_registered_model(name, tags={"pnc.study": tags.get("pnc.study", "")}))
    except Exception:  # noqa: BLE001 - exists already
        pass
    mv = tracking._retrying(lambda: c.create_model_version(name, info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id))
    for alias in ("current", _alias(source)):
        tracking._retrying(lambda: c.set_registered_model_alias(name, alias, mv.version))
    return mv


def registered_model_id(mv: Any) -> str | None:
    """The logged model (``m-...``) behind a model version: ``mv.model_id`` where the store fills it in,
    else from its source URI ``models:/m-...`` (MLflow 3 leaves model_id empty on versions it reads back)."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = getattr(mv, "source", "") or ""
    if source.startswith("models:/m-"):
        return source[len("models:/"):].split("/")[0]
    return None


def load_registered(uri: str):
    import mlflow.pytorch

    return mlflow.pytorch.load_model(uri, map_location="cpu")


def per_class_subset(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices of ``k`` samples per class (seeded; all of a class when it has fewer)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out.append(np.sort(rng.permutation(idx)[:k]))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


def run_transfer_study(spec: Any, cells: list, *, spec_path: str, force: bool = False, progress: bool = True,
                       results_path: str | None = None, overrides: list[str] | None = None) -> int:
    from . import tracking
    from .data.registry import load_cell_data
    from .runner import (CHECKPOINT_ROOT, CellOutcome, StudyGuard, _train_cell, cell_params, close_study, finish_study,
                         cell_tags, data_digest, log_params_once)
    from .spec import spec_digest

    progress = progress and sys.stderr.isatty()
    domains = list(dict.fromkeys([*spec.transfer.sources, *spec.transfer.targets]))
    # Data first: every domain's splits, before torch is imported, any model built or run created.
    data = {d: load_cell_data(spec, cells[0], domain=d) for d in domains}
    from .runner import check_layer_selection

    check_layer_selection(spec, cells)  # imports torch
    from .train import make_accelerator

    accelerator = make_accelerator(spec.train.precision, spec.train.grad_accum_steps)
    main = accelerator.is_main_process
    exp_id = parent = None
    outcomes: list[CellOutcome] = []
    k = spec.probe.samples_per_class
    with StudyGuard(main) as guard:
        if main:
            exp_id = tracking.experiment_id(spec.experiment)
            parent = guard.parent = tracking.study_parent(exp_id, spec.name, {tracking.TAG_SPEC: str(spec_path), tracking.TAG_SPEC_DIGEST: spec_digest(spec), "pnc.overrides": json.dumps(overrides or []),
                                                              "pnc.kind": spec.kind, **tracking.git_state()})
        for i, cell in enumerate(cells):
            src = data[cell.source]
            digest = data_digest(src.inputs)
            name = registered_name(spec, cell)
            mv = None if force else find_registered(name, cell, digest) if main else None
            reused = mv is not None
            if accelerator.num_processes > 1:  # every process takes the same branch
                from accelerate.utils import broadcast_object_list

                box = [reused]
                broadcast_object_list(box)
                reused = box[0]
            t0 = time.time()
            summary: dict = {"registered_model": name}
            if reused:
                run_id = mv.run_id if main else None
                if main:
                    print(f"[{i + 1}/{len(cells)}] {cell.name}: reusing registered model {name} v{mv.version}", file=sys.stderr)
            else:
                run_id, decision, busy_reason = None, "run", ""
                if main:
                    tags = {tracking.TAG_DATA: digest, tracking.TAG_SPEC: str(spec_path), tracking.TAG_SPEC_DIGEST: spec_digest(spec), "pnc.overrides": json.dumps(overrides or []),
                            **cell_tags(spec, cell), **tracking.git_state()}
                    # A FINISHED source run without a registered version (registration failed) trains again: force.
                    claim = tracking.claim_cell_run(exp_id, parent, cell, tags, run_name=f"{cell.name} (source training)", force=True,
                                                    usable=lambda r: r.data.tags.get(tracking.TAG_DATA) == digest)
                    decision, run_id, reuse = claim.decision, claim.run_id, claim.reused
                    if decision == "busy":
                        busy_reason = tracking.busy_message(claim)
                        print(f"[{i + 1}/{len(cells)}] {cell.name}: {busy_reason}", file=sys.stderr)
                    else:
                        if reuse is not None and tracking.TAG_FAILURE in reuse.data.tags:  # retried: the old reason no longer holds
                            tracking.client().delete_tag(run_id, tracking.TAG_FAILURE)
                        log_params_once(run_id, cell_params(spec, cell))
                        tracking.log_inputs(run_id, [] if reuse else src.inputs)
                        print(f"[{i + 1}/{len(cells)}] {cell.name}: training on {cell.source} (run {run_id})", file=sys.stderr)
                if accelerator.num_processes > 1:
                    from accelerate.utils import broadcast_object_list

                    box = [run_id, decision]
                    broadcast_object_list(box)
                    run_id, decision = box
                if decision == "busy":
                    outcomes.append(CellOutcome(cell, "BUSY", run_id, summary, reason=busy_reason))
                    continue

                def on_epoch(epoch: int, loss: float, acc: float, _run=run_id) -> None:
                    tracking.log_metrics(_run, {"train/loss": loss, "train/acc": acc}, step=epoch)

                try:
                    model, result, ckpt = _train_cell(spec, cell, src, accelerator=accelerator, run_id=run_id, progress=progress,
                                                      on_epoch=on_epoch if main else None)
                except TrainingError as e:
                    if main:
                        tracking.log_tags(run_id, {tracking.TAG_FAILURE: str(e)})
                        tracking.end_run(run_id, "FAILED")
                        ckpt = CHECKPOINT_ROOT / spec.experiment / f"{cell.id}.pt"
                        if ckpt.exists():
                            ckpt.unlink()
                    outcomes.append(CellOutcome(cell, "FAILED", run_id, reason=str(e)))
                    continue
                except BaseException:
                    if main and run_id:
                        tracking.end_run(run_id, "KILLED")
                    raise
                net = accelerator.unwrap_model(model)
                if main:
                    tracking.log_metrics(run_id, {"train/last_epoch_acc": result.acc, "train/last_epoch_loss": result.loss})
                    vtags = {"pnc.study": spec.name, "source": cell.source, tracking.TAG_CELL: cell.id, TAG_TRAIN_KEY: cell.train_key, tracking.TAG_DATA: digest,
                             tracking.TAG_SPEC_DIGEST: spec_digest(spec), "pnc.model": cell.model.name}
                    try:
                        mv = register(net, run_id, name, vtags, cell.source)
                    except BaseException as e:
                        tracking.log_tags(run_id, {tracking.TAG_FAILURE: f"registering the model failed: {e}"[:5000]})
                        tracking.end_run(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
                        raise
                    tracking.end_run(run_id, "FINISHED")
                    if ckpt.exists():
                        ckpt.unlink()
                    print(f"  trained in {time.time() - t0:.0f}s (train acc {result.acc:.4f}); registered {name} v{mv.version}", file=sys.stderr)
                summary["trained"] = True
            version = mv.version if main else None
            if accelerator.num_processes > 1:
                from accelerate.utils import broadcast_object_list

                box = [version]
                broadcast_object_list(box)
                version = box[0]
            uri = f"models:/{name}/{version}"
            net = load_registered(uri).to(accelerator.device)  # also when just trained: targets see what the registry holds
            summary.update({"model_uri": uri, "source_run_id": run_id, "targets": {}})
            busy_targets: list[str] = []
            for target in cell.targets:
                tdat = data[target]
                tdigest = data_digest(tdat.inputs)
                tcell_id = f"{cell.id}:{target}"
                trun = None
                if main:
                    from .study import Cell

                    tc = Cell(cell.study, cell.kind, cell.model, cell.axes + (("target", target),), cell.config + target,
                              source=cell.source, targets=(target,))
                    tags = {tracking.TAG_DATA: tdigest, "source": cell.source, "target": target, "pnc.model_uri": uri,
                            "pnc.model": cell.model.name, "pnc.depth": cell_tags(spec, cell)["pnc.depth"],
                            tracking.TAG_SPEC: str(spec_path), tracking.TAG_SPEC_DIGEST: spec_digest(spec), "pnc.overrides": json.dumps(overrides or []), **tracking.git_state()}
                    claim = tracking.claim_cell_run(
                        exp_id, parent, tc, tags, role="transfer", cell_id=tcell_id, force=force,
                        run_name=f"{cell.model.name}: {cell.source} -> {target}",
                        usable=lambda r: r.data.tags.get("pnc.model_uri") == uri and r.data.tags.get(tracking.TAG_DATA) == tdigest)
                    if claim.decision == "skip":
                        summary["targets"][target] = {"run_id": claim.run_id, "status": "SKIPPED"}
                        print(f"  {cell.source} -> {target}: finished earlier (run {claim.run_id}), skipped", file=sys.stderr)
                        trun = "skip"
                    elif claim.decision == "busy":
                        summary["targets"][target] = {"run_id": claim.run_id, "status": "BUSY"}
                        busy_targets.append(f"{target}: {tracking.busy_message(claim)}")
                        print(f"  {cell.source} -> {target}: {tracking.busy_message(claim)}", file=sys.stderr)
                        trun = "skip"
                    else:
                        trun = claim.run_id
                        log_params_once(trun, {**cell_params(spec, cell), "transfer.target": target, "model_uri": uri})
                        if claim.reused is None:
                            tracking.log_inputs(trun, tdat.probe_inputs())
                            _log_model_input(trun, mv)
                if accelerator.num_processes > 1:
                    from accelerate.utils import broadcast_object_list

                    box = [trun]
                    broadcast_object_list(box)
                    trun = box[0]
                if trun == "skip":
                    continue
                try:
                    res = _measure_target(net, spec, tdat, accelerator=accelerator, k=k, progress=progress)
                except BaseException:
                    if main:
                        tracking.end_run(trun, "KILLED")
                    raise
                if main:
                    tracking.log_layer_metrics(trun, res["layers"])
                    finals = {"final/probe_acc_target_test": res["layers"]["probe_acc/target_test"][-1],
                              "best/probe_acc_target_test": max(res["layers"]["probe_acc/target_test"]),
                              "test/source_head_acc": res["head_acc"], "layers/count": len(res["names"])}
                    tracking.log_metrics(trun, finals)
                    tracking.log_json_artifact(trun, "layers.json", {str(j): n for j, n in enumerate(res["names"])})
                    tracking.end_run(trun, "FINISHED")
                    summary["targets"][target] = {"run_id": trun, **finals}
                    print(f"  {cell.source} -> {target}: final-layer probe {finals['final/probe_acc_target_test']:.4f}, "
                          f"best {finals['best/probe_acc_target_test']:.4f}", file=sys.stderr)
            nothing_done = not summary.get("trained") and all(t.get("status") == "SKIPPED" for t in summary["targets"].values())
            outcomes.append(CellOutcome(cell, "BUSY", run_id, summary, reason="; ".join(busy_targets)) if busy_targets
                            else CellOutcome(cell, "SKIPPED" if nothing_done else "FINISHED", run_id, summary))
        failed = finish_study(spec, parent, outcomes, results_path, main)  # inside the guard: an interrupt closes the parent
    return close_study(spec, outcomes, failed, accelerator)


def _log_model_input(run_id: str, mv: Any) -> None:
    from mlflow.entities import LoggedModelInput

    from . import tracking

    model_id = registered_model_id(mv)
    if model_id:
        tracking._retrying(lambda: tracking.client().log_inputs(run_id, models=[LoggedModelInput(model_id)]))
    tracking.log_tags(run_id, {"pnc.registered_model": mv.name, "pnc.registered_version": mv.version})


def _measure_target(net, spec: Any, tdat: Any, *, accelerator, k: int | None, progress: bool) -> dict:
    """CDNV/NC2 on the whole target training split; probes on k samples per class of it, scored on target test."""
    from .data.torchdata import ImageDataset
    from .runner import measure_model

    info = spec.dataset.info
    size, ch = spec.dataset.size, info.channels
    train_ds = ImageDataset(tdat.train, image_size=size, channels=ch)
    test_ds = ImageDataset(tdat.test, image_size=size, channels=ch)
    collapse_spec = spec.model_copy(update={"measure": spec.measure.model_copy(update={"metrics": [m for m in spec.measure.metrics if m != "probe"]})})
    layers, names, accs = measure_model(net, collapse_spec, {"train": train_ds}, accelerator=accelerator,
                                        num_classes=info.num_classes, label_names=("label",), progress=progress)
    out = {k2.replace("/train", "/target"): v for k2, v in layers.items() if k2.endswith("/train")}
    sub = tdat.train.subset(per_class_subset(tdat.train.labels, k, spec.train.seed)) if k else tdat.train
    probe_ds = ImageDataset(sub, image_size=size, channels=ch)
    probe_spec = spec.model_copy(update={"measure": spec.measure.model_copy(update={"metrics": ["probe"]})})
    players, _, paccs = measure_model(net, probe_spec, {"train": probe_ds, "test": test_ds}, accelerator=accelerator,
                                      num_classes=info.num_classes, label_names=("label",), progress=progress)
    out["probe_acc/target_test"] = players["probe_acc/test"]
    return {"layers": out, "names": names, "head_acc": paccs.get("test", float("nan"))}
