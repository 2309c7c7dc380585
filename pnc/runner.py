"""Run a study's cells: data -> model -> train -> measure every layer -> MLflow.

A finished cell (same cell id, same data digest, status FINISHED) is skipped; an unfinished one
(killed, interrupted, failed) continues in the same MLflow run from its last checkpoint. A cell
whose training diverges is marked FAILED with the reason and the study goes on; the exit code
is non-zero when any cell failed. Only the main process writes to MLflow.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TrainingError

CHECKPOINT_ROOT = Path(".pnc") / "checkpoints"


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

    def __enter__(self) -> "StudyGuard":
        self._old_term = signal.signal(signal.SIGTERM, _on_sigterm)
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        try:
            if typ is not None and self.main:
                from . import tracking

                if issubclass(typ, KeyboardInterrupt):  # also a cell run interrupted before its training
                    for r in (self.open_run, self.parent):
                        if r:
                            tracking.end_run(r, "KILLED")
                elif issubclass(typ, Exception) and self.parent:
                    tracking.end_run(self.parent, "FAILED")
        finally:
            signal.signal(signal.SIGTERM, self._old_term)
        return False


def data_digest(inputs) -> str:
    h = hashlib.sha256()
    for inp in sorted(inputs, key=lambda i: (i.name, i.context)):
        h.update(f"{inp.name}:{inp.digest}:{inp.context};".encode())
    return h.hexdigest()[:16]


def model_depth(name: str) -> int:
    import re

    m = re.search(r"(\d+)", name)
    return int(m.group(1)) if m else 0


def cell_tags(spec: Any, cell: Any) -> dict[str, str]:
    tags = {"pnc.model": cell.model.name, "pnc.depth": str(model_depth(cell.model.name)), "pnc.kind": spec.kind}
    if cell.noise is not None:
        tags.update({"pnc.noise": cell.noise.tag, "pnc.noise_type": cell.noise.type, "pnc.noise_kind": cell.noise.kind,
                     "pnc.noise_level": str(cell.noise.level)})
    if cell.source is not None:
        tags["source"] = cell.source
    return tags


def cell_params(spec: Any, cell: Any) -> dict[str, str]:
    from .spec import flatten_params

    params = {k: v for k, v in flatten_params(spec).items() if not k.startswith(("models", "noise.label", "noise.input"))}
    for k, v in cell.model.model_dump(mode="json").items():
        params[f"model.{k}"] = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    if cell.noise is not None:
        params.update({"noise.type": cell.noise.type, "noise.kind": cell.noise.kind, "noise.level": str(cell.noise.level)})
    if cell.source is not None:
        params["transfer.source"] = cell.source
    return params


def log_params_once(run_id: str, params: dict[str, Any]) -> None:
    """Log the params ``run_id`` does not hold yet. MLflow params are immutable; a reused run (the study's
    parent, a resumed cell) keeps a key's first value: the cell id pins every field that changes a cell's
    results, and the parent's ``pnc.spec_digest`` tag names the latest spec."""
    from . import tracking

    have = tracking._retrying(lambda: tracking.client().get_run(run_id)).data.params
    tracking.log_params(run_id, {k: v for k, v in params.items() if k not in have})


# ----------------------------------------------------------------------------- measurement
def measure_model(model, spec: Any, splits: dict[str, Any], *, accelerator, num_classes: int, label_names,
                  progress: bool, ncc_train: bool = False) -> tuple[dict[str, list], list[str], dict[str, float]]:
    """Tap every selected layer of ``model`` and measure the given datasets, one pass each.

    ``splits`` maps a role to an ImageDataset: "train" (the reference split: class statistics,
    class means for NCC, probe training data) and optional "test". ``ncc_train`` adds a second
    pass over the training split for ``ncc_acc/train`` (the nearest-class-mean classifier needs the
    finished class means). Returns per-layer results, layer names and the network's own accuracy
    on each split (against label column 0).
    """
    import torch

    from .data.torchdata import shard_loader
    from .features import FeatureExtractor
    from .metrics import measure
    from .metrics.probes import validation_part

    net = accelerator.unwrap_model(model).eval()
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

    evals = {}
    if ncc_train and "ncc" in spec.measure.metrics:
        evals["train"] = batches("train", count=False)
    if "test" in splits:
        evals["test"] = batches("test")
    for role in splits:  # further test sets, e.g. the published corrupted test set ("cifar10c")
        if role not in ("train", "test"):
            evals[role] = batches(role)
    want_probe = "probe" in spec.measure.metrics and "test" in splits
    try:
        result = measure(
            extract,
            batches("train"),
            evals or None,
            num_classes=num_classes,
            label_names=label_names,
            metrics=tuple(m for m in spec.measure.metrics if m != "probe" or want_probe),
            probe=spec.probe.kind if want_probe else None,
            nc1_dim_cap=spec.measure.nc1_dim_cap,
            val_fraction=spec.probe.val_fraction,
            logistic_max_samples=spec.probe.max_samples,
            seed=spec.train.seed,
            accelerator=accelerator if world > 1 else None,
            progress=progress,
        )
    finally:
        names = list(extractor.layer_names)
        extractor.close()
    accs = {}
    for s, t in acc_counts.items():
        if world > 1:
            t = accelerator.reduce(t.to(accelerator.device), reduction="sum").cpu()
        accs[s] = (t[0] / t[1]).item() if t[1] > 0 else float("nan")
    return dict(result.metrics), names, accs


# ----------------------------------------------------------------------------- one cell
def _write_results(path: Path, spec: Any, outcomes: list[CellOutcome]) -> None:
    from .spec import spec_digest

    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "study": spec.name, "kind": spec.kind, "spec_digest": spec_digest(spec),
        "cells": [{"id": o.cell.id, "name": o.cell.name, "status": o.status, "run_id": o.run_id, **o.summary,
                   **({"reason": o.reason} if o.reason else {})} for o in outcomes],
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def check_layer_selection(spec: Any, cells: list) -> None:
    """``measure.layers`` must tap something in every model of the study: checked on each model built on the
    meta device (no memory, no weights) before anything trains. A selection that matches nothing raises
    ModelError naming the modules that exist."""
    import torch

    from .features import select_layers
    from .models import build_model

    info = spec.dataset.info
    for m in {c.model.name: c.model for c in cells}.values():
        try:
            with torch.device("meta"):
                model = build_model(m.name, num_classes=info.num_classes, in_chans=info.channels, image_size=spec.dataset.size,
                                    source=m.source, cifar_stem=m.cifar_stem, pretrained=False, **m.kwargs)
        except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device is checked when it trains
            continue
        select_layers(model, spec.measure.layer_selection)


def _train_cell(spec, cell, data, *, accelerator, run_id, progress, on_epoch=None):
    """Build and train the cell's model (resuming from its checkpoint)."""
    from .data.torchdata import ImageDataset, make_augment
    from .models import build_model
    from .train import seed_everything, train

    seed_everything(spec.train.seed)
    info = spec.dataset.info
    m = cell.model
    model = build_model(m.name, num_classes=info.num_classes, in_chans=info.channels, image_size=spec.dataset.size,
                        source=m.source, cifar_stem=m.cifar_stem, pretrained=m.pretrained, weights=m.weights, **m.kwargs)
    train_ds = ImageDataset(data.train, image_size=spec.dataset.size, channels=info.channels,
                            augment=make_augment(spec.train.augmentation, spec.train.seed))
    ckpt = CHECKPOINT_ROOT / spec.experiment / f"{cell.id}.pt"
    result = train(model, train_ds, spec.train, accelerator=accelerator, checkpoint=ckpt, on_epoch=on_epoch,
                   progress=progress, desc=cell.name, extra_state={"run_id": run_id})
    return model, result, ckpt


def run_cell(spec: Any, cell: Any, data: Any, *, accelerator, run_id: str | None, progress: bool) -> dict:
    """Train and measure one depth/noise cell; log everything to ``run_id`` (main process)."""
    from . import tracking
    from .data.torchdata import ImageDataset

    main = accelerator.is_main_process
    info = spec.dataset.info

    def on_epoch(epoch: int, loss: float, acc: float) -> None:
        tracking.log_metrics(run_id, {"train/loss": loss, "train/acc": acc}, step=epoch)

    model, result, ckpt = _train_cell(spec, cell, data, accelerator=accelerator, run_id=run_id, progress=progress,
                                      on_epoch=on_epoch if main else None)
    size, ch = spec.dataset.size, info.channels
    is_noise = spec.kind == "noise_sweep"
    # Label noise, and the clean cell of a noise sweep (noisy = clean labels, so Delta should come out 1):
    # both label vectors accumulated in the one pass. Corrupted inputs: one label vector, two passes below.
    noisy_labels = is_noise and data.clean_inputs is None
    cols = ([data.train.labels, data.clean_labels if data.clean_labels is not None else data.train.labels]
            if noisy_labels else None)
    train_ds = ImageDataset(data.train, image_size=size, channels=ch, label_columns=cols)
    test_ds = ImageDataset(data.test, image_size=size, channels=ch)
    label_names = ("noisy", "clean") if noisy_labels else ("train",)
    extra = {role: ImageDataset(split, image_size=size, channels=ch) for role, split in data.extra_eval.items()}
    layers, names, accs = measure_model(model, spec, {"train": train_ds, "test": test_ds, **extra}, accelerator=accelerator,
                                        num_classes=info.num_classes, label_names=label_names, progress=progress,
                                        ncc_train=spec.kind == "depth_sweep")
    results = dict(layers)
    mem_layers: list[int] | None = None
    if is_noise and data.clean_inputs is not None:
        # corrupted inputs: measure the same network on the clean images too; probes train on clean data
        clean_ds = ImageDataset(data.clean_inputs, image_size=size, channels=ch)
        clean_layers, _, clean_accs = measure_model(model, spec, {"train": clean_ds, "test": test_ds}, accelerator=accelerator,
                                                    num_classes=info.num_classes, label_names=("train",), progress=progress)
        results = {k.replace("/train", "/train_noisy") if k.endswith("/train") else k: v for k, v in layers.items()
                   if not k.startswith("probe_acc")}
        results.update({k.replace("/train", "/train_clean"): v for k, v in clean_layers.items() if k.endswith("/train")})
        for k, v in clean_layers.items():
            if k.startswith("probe_acc"):
                results[k] = v
        for role in extra:  # probes on the corrupted training inputs, scored on the published corrupted test set
            results.update({k: v for k, v in layers.items() if k.startswith("probe_acc/") and k.endswith("/" + role)})
        results["mem_ratio/train"] = list(np.asarray(results["cdnv/train_clean"]) / np.asarray(results["cdnv/train_noisy"]))
        accs["train_clean"] = clean_accs["train"]
    if "mem_ratio/train" in results:
        from .metrics.collapse import memorization_layers

        mem_layers = memorization_layers(results["mem_ratio/train"])
    results.pop("memorization_layers", None)
    summary = {"train_acc": result.acc, "train_final_acc": accs.get("train"), "test_acc": accs.get("test"),
               "epochs": result.epochs, "resumed_from": result.resumed_from, **{f"{r}_acc": accs.get(r) for r in extra}}
    probe_key = "probe_acc/test"
    if probe_key in results:
        summary["final_probe_acc"] = results[probe_key][-1]
        summary["best_probe_acc"] = max(results[probe_key])
    if main:
        tracking.log_layer_metrics(run_id, results)
        finals = {"train/final_acc": accs.get("train"), "test/acc": accs.get("test"), "val/acc": accs.get("test_val"),
                  "test/holdout_acc": accs.get("test_holdout"), "train/last_epoch_acc": result.acc,
                  "train/last_epoch_loss": result.loss, "layers/count": len(names)}
        if probe_key in results:
            finals.update({"final/probe_acc_test": summary["final_probe_acc"], "best/probe_acc_test": summary["best_probe_acc"]})
        if data.noise_rate is not None:
            finals["noise/realized_rate"] = data.noise_rate
        if "train_clean" in accs:
            finals["train/clean_input_acc"] = accs["train_clean"]
        for role in extra:
            finals[f"test/{role}_acc"] = accs.get(role)
        tracking.log_metrics(run_id, finals)
        tracking.log_json_artifact(run_id, "layers.json", {str(i): n for i, n in enumerate(names)})
        if mem_layers is not None:
            tracking.log_tags(run_id, {"pnc.memorization_layers": ",".join(map(str, mem_layers)) or "none"})
            tracking.log_json_artifact(run_id, "memorization_layers.json",
                                       {"memorization_layers": mem_layers, "layer_names": [names[i] for i in mem_layers],
                                        "mem_ratio": results["mem_ratio/train"]})
        if data.manifest is not None:
            tracking.log_json_artifact(run_id, "derived_split_manifest.json", data.manifest)
    if main and ckpt.exists():
        ckpt.unlink()
    summary["memorization_layers"] = mem_layers
    return summary


def log_study_summary(spec: Any, parent: str) -> None:
    """The paper's proposed analyses (transition, efficient depth, noise map, transfer correlation) on the parent run."""
    from . import tracking
    from .report import study_summary

    try:
        summary = study_summary(spec)
    except Exception as e:  # noqa: BLE001 - an analysis that cannot run must not fail the study
        print(f"  (study analyses skipped: {type(e).__name__}: {e})", file=sys.stderr)
        return
    tracking.log_metrics(parent, summary["metrics"])
    tracking.log_tags(parent, summary["tags"])
    corr = summary["details"].get("transfer_correlation")
    if corr:
        tracking.log_layer_metrics(parent, corr)
    tracking.log_json_artifact(parent, "analysis.json", summary["details"])
    for k, v in summary["tags"].items():
        print(f"  {k}: {v}", file=sys.stderr)


def finish_study(spec: Any, parent: str | None, outcomes: list, results_path: str | None, main: bool) -> list:
    """Study analyses, the results file and the parent's final status (call inside the StudyGuard).
    Returns the outcomes that make the run incomplete: FAILED cells, and BUSY ones (another process runs them)."""
    from . import tracking

    failed = [o for o in outcomes if o.status == "FAILED"]
    busy = [o for o in outcomes if o.status == "BUSY"]
    if main:
        if results_path:
            _write_results(Path(results_path), spec, outcomes)
        if failed or study_complete(spec, outcomes):
            log_study_summary(spec, parent)
            tracking.end_run(parent, "FAILED" if failed else "FINISHED")
        else:  # run in parts (`--cell`, fanned out) and not all done: the last cell to finish closes the study
            print(f"{spec.name}: other cells of the study are not finished yet; its analyses and parent run "
                  f"(left RUNNING) are closed by the run that finishes the last cell", file=sys.stderr)
    return failed + busy


def study_complete(spec: Any, outcomes: list) -> bool:
    """Whether every cell of the study (every (source, target) pair of a transfer study) has a FINISHED run:
    known from ``outcomes`` when this process went through all cells, else looked up in the store."""
    from . import tracking
    from .study import expand

    cells = expand(spec)
    if any(o.status == "BUSY" for o in outcomes) or {o.cell.id for o in outcomes} != {c.id for c in cells}:
        exp_id = tracking.experiment_id(spec.experiment)
        wanted = ([(f"{c.id}:{t}", "transfer") for c in cells for t in c.targets] if spec.kind == "domain_transfer"
                  else [(c.id, "cell") for c in cells])
        for cell_id, role in wanted:
            run = tracking.find_cell_run(exp_id, cell_id, role=role)
            if run is None or run.info.status != "FINISHED":
                return False
    return True


def close_study(spec: Any, outcomes: list, incomplete: list, accelerator: Any) -> int:
    """Print the study's outcome (main process), tear down the process group; the exit code
    (1 when a cell failed or is still being run by another process)."""
    from . import tracking
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


# ----------------------------------------------------------------------------- the study
def run_study(spec: Any, cells: list, *, spec_path: str, force: bool = False, progress: bool = True,
              results_path: str | None = None, overrides: list[str] | None = None) -> int:
    """Run ``cells`` of ``spec``; returns the exit code (0 all finished or skipped, 1 some failed)."""
    from . import tracking
    from .data.registry import load_cell_data
    from .spec import spec_digest

    if spec.kind == "domain_transfer":
        from .transfer import run_transfer_study

        return run_transfer_study(spec, cells, spec_path=spec_path, force=force, progress=progress, results_path=results_path,
                                  overrides=overrides)

    progress = progress and sys.stderr.isatty()
    # Data first: a missing dataset stops the run before torch is imported, any model built or run created.
    data_cache: dict[str, Any] = {}

    def data_for(cell):
        key = cell.noise.tag if cell.noise is not None else "base"
        if key not in data_cache:
            data_cache[key] = load_cell_data(spec, cell)
        return data_cache[key]

    data_for(cells[0])
    from .data.registry import check_corrupted_test

    check_corrupted_test(spec)
    # Every other cell's data too (derived splits written and checked, e.g. a CIFAR-10N file in the wrong
    # order), then dropped: a bad file stops the study before anything trains, not hours into it.
    seen = {cells[0].noise.tag if cells[0].noise is not None else "base"}
    for cell in cells[1:]:
        key = cell.noise.tag if cell.noise is not None else "base"
        if key not in seen:
            seen.add(key)
            load_cell_data(spec, cell)
    check_layer_selection(spec, cells)  # imports torch
    from .train import make_accelerator

    accelerator = make_accelerator(spec.train.precision, spec.train.grad_accum_steps)
    main = accelerator.is_main_process
    outcomes: list[CellOutcome] = []
    exp_id = parent = None
    with StudyGuard(main) as guard:
        if main:
            exp_id = tracking.experiment_id(spec.experiment)
            parent = guard.parent = tracking.study_parent(exp_id, spec.name, {tracking.TAG_SPEC: str(spec_path),
                                                              tracking.TAG_SPEC_DIGEST: spec_digest(spec),
                                                              "pnc.kind": spec.kind, **tracking.git_state()})
            log_params_once(parent, {k: v for k, v in cell_params(spec, cells[0]).items() if not k.startswith(("model.", "noise."))})
        for i, cell in enumerate(cells):
            data = data_for(cell)
            digest = data_digest(data.inputs)
            run_id, decision, busy_reason = None, "run", ""
            if main:
                tags = {tracking.TAG_DATA: digest, tracking.TAG_SPEC: str(spec_path), tracking.TAG_SPEC_DIGEST: spec_digest(spec), "pnc.overrides": json.dumps(overrides or []),
                        **cell_tags(spec, cell), **tracking.git_state()}
                claim = tracking.claim_cell_run(exp_id, parent, cell, tags, force=force,
                                                usable=lambda r: r.data.tags.get(tracking.TAG_DATA) == digest)  # new data: a new run
                decision, run_id, reuse = claim.decision, claim.run_id, claim.reused
                if decision == "run":
                    guard.open_run = run_id
                    if reuse is not None and tracking.TAG_FAILURE in reuse.data.tags:  # retried: the old reason no longer holds
                        tracking.client().delete_tag(run_id, tracking.TAG_FAILURE)
                    log_params_once(run_id, cell_params(spec, cell))
                    tracking.log_inputs(run_id, data.inputs if reuse is None else [])
                elif decision == "busy":
                    busy_reason = tracking.busy_message(claim)
            if accelerator.num_processes > 1:
                from accelerate.utils import broadcast_object_list

                box = [decision, run_id]
                broadcast_object_list(box)
                decision, run_id = box
            if decision == "skip":
                if main:
                    print(f"[{i + 1}/{len(cells)}] {cell.name}: finished earlier (run {run_id}), skipped", file=sys.stderr)
                outcomes.append(CellOutcome(cell, "SKIPPED", run_id))
                continue
            if decision == "busy":
                if main:
                    print(f"[{i + 1}/{len(cells)}] {cell.name}: {busy_reason}", file=sys.stderr)
                outcomes.append(CellOutcome(cell, "BUSY", run_id, reason=busy_reason if main else ""))
                continue
            if main:
                print(f"[{i + 1}/{len(cells)}] {cell.name} (cell {cell.id}, run {run_id})", file=sys.stderr)
            t0 = time.time()
            try:
                summary = run_cell(spec, cell, data, accelerator=accelerator, run_id=run_id, progress=progress)
            except TrainingError as e:
                if main:
                    tracking.log_tags(run_id, {tracking.TAG_FAILURE: str(e)})
                    tracking.end_run(run_id, "FAILED")
                    guard.open_run = None
                    ckpt = CHECKPOINT_ROOT / spec.experiment / f"{cell.id}.pt"
                    if ckpt.exists():
                        ckpt.unlink()
                    print(f"  FAILED: {e}", file=sys.stderr)
                outcomes.append(CellOutcome(cell, "FAILED", run_id, reason=str(e)))
                continue
            except KeyboardInterrupt:
                if main and run_id:
                    tracking.end_run(run_id, "KILLED")
                raise
            except BaseException as e:
                if main and run_id:
                    tracking.log_tags(run_id, {tracking.TAG_FAILURE: f"{type(e).__name__}: {e}"[:5000]})
                    tracking.end_run(run_id, "FAILED")
                raise
            if main:
                tracking.end_run(run_id, "FINISHED")
                guard.open_run = None
                summary["seconds"] = round(time.time() - t0, 1)
                print(f"  done in {summary['seconds']:.0f}s: train acc {summary['train_final_acc']:.4f}, "
                      f"test acc {summary['test_acc']:.4f}" + (f", final-layer probe {summary['final_probe_acc']:.4f}"
                                                               if "final_probe_acc" in summary else ""), file=sys.stderr)
            outcomes.append(CellOutcome(cell, "FINISHED", run_id, summary))
        failed = finish_study(spec, parent, outcomes, results_path, main)  # inside the guard: an interrupt closes the parent
    return close_study(spec, outcomes, failed, accelerator)
