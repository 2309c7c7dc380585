"""The explicit training loop (the only module that imports accelerate).

One CPU, one GPU or many (``accelerate launch`` / ``torchrun``): Accelerate prepares the model and the
optimizer; mixed precision and gradient accumulation come from the spec. The loader is pnc's own
(:class:`~pnc.data.torchdata.ShardedBatches`): ``train.batch_size`` is the global batch, each process takes
its part of it, and every sample is seen exactly once per epoch whatever the number of processes. The
learning rate is a pure function of the epoch and the shuffling order a pure function of (seed, epoch), so a
run resumed from its per-epoch checkpoint (model, optimizer, gradient scaler, every process's RNG states)
follows the same path as an uninterrupted one. A NaN or diverging loss on any process raises
:class:`~pnc.errors.TrainingError` on every process.
"""
from __future__ import annotations

import math
import os
import random
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import TrainingError

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
CHECKPOINT_FORMAT = 2  # 2: per-process RNG states, the gradient scaler, loadable with torch.load(weights_only=True)


def make_accelerator(precision: str = "fp32", grad_accum_steps: int = 1):
    """An Accelerator for this process: GPU when there is one, else CPU (gloo when distributed).

    ``fp16`` needs a GPU (autocast and the gradient scaler); on the CPU it trains in fp32, with a warning, and
    :func:`precision_used` (recorded with every trained run) says so."""
    from accelerate import Accelerator

    cpu = not torch.cuda.is_available()
    mp = PRECISION[precision]
    if cpu and mp == "fp16":
        mp = "no"  # fp16 autocast is GPU-only
    accelerator = Accelerator(cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=grad_accum_steps)
    if precision_used(accelerator) != precision and accelerator.is_main_process:
        warnings.warn(f"train.precision {precision} needs a GPU; training runs in {precision_used(accelerator)} on the "
                      f"CPU (recorded in the run's tag pnc.precision_used)", stacklevel=2)
    return accelerator


def precision_used(accelerator: Any) -> str:
    """The precision training really runs in: fp32 unless Accelerate's autocast is on."""
    if not getattr(accelerator, "native_amp", False):
        return "fp32"
    return {v: k for k, v in PRECISION.items()}.get(str(accelerator.mixed_precision), str(accelerator.mixed_precision))


def shutdown(accelerator: Any) -> None:
    """Tear down the process group of a multi-process run (gloo can abort at interpreter exit otherwise)."""
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        accelerator.wait_for_everyone()
        if dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(epoch: int, tspec: Any) -> float:
    """Learning rate for ``epoch`` (0-based) under the spec's schedule, with linear warm-up."""
    base, sched = tspec.optimizer.lr, tspec.schedule
    if sched.warmup_epochs and epoch < sched.warmup_epochs:
        return base * (epoch + 1) / sched.warmup_epochs
    if sched.name == "constant":
        return base
    if sched.name == "step":
        return base * sched.gamma ** (epoch // sched.step_size)
    span = max(1, tspec.epochs - sched.warmup_epochs)
    t = (epoch - sched.warmup_epochs) / span
    return 0.5 * base * (1.0 + math.cos(math.pi * t))


def make_optimizer(model: torch.nn.Module, tspec: Any) -> torch.optim.Optimizer:
    o = tspec.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov and o.momentum > 0)
    if o.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


@dataclass
class TrainResult:
    epochs: int
    loss: float  # mean training loss of the last epoch, over its real samples (each once)
    acc: float
    resumed_from: int | None = None
    precision: str = "fp32"  # what training ran in (see precision_used)


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path | None) -> dict | None:
    """A checkpoint written by :func:`train`, loaded with ``weights_only=True`` (tensors and plain types only: a
    tampered file cannot run code). A torn, foreign or older-format file is ignored: training restarts."""
    if path is None or not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a torn checkpoint is ignored, training restarts
        return None
    return state if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT else None


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU, every CUDA device) as tensors and plain types."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    p, n = state["python"], state["numpy"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(model: torch.nn.Module, dataset: torch.utils.data.Dataset, tspec: Any, *, accelerator: Any,
          checkpoint: Path | None = None, on_epoch: Callable[[int, float, float], None] | None = None,
          progress: bool = True, desc: str = "train", extra_state: dict | None = None,
          snapshots: Any = None) -> TrainResult:
    """Train ``model`` in place for ``tspec.epochs`` epochs, resuming from ``checkpoint`` when present.

    On N processes each process trains on its part of every global batch of ``tspec.batch_size`` samples
    (:class:`~pnc.data.torchdata.ShardedBatches`): every sample once per epoch, no padding; ``train/loss`` and
    ``train/acc`` count real samples only. The divergence check reduces the epoch's largest batch loss over all
    processes, so all of them raise the same TrainingError together. The checkpoint holds the model, the
    optimizer, the gradient scaler (fp16) and every process's RNG states. ``snapshots`` (:class:`pnc.snapshots.Snapshots`): measured at
    its epochs (0 before the first step, e after e epochs), kept in the checkpoint and taken back on resume."""
    from torch.utils.data import DataLoader

    from .data.torchdata import ShardedBatches, WeightedKeys

    rank, world = accelerator.process_index, accelerator.num_processes
    batches = ShardedBatches(len(dataset), tspec.batch_size, tspec.seed, rank=rank, world=world,
                             encode_epoch=getattr(dataset, "decodes_epoch", False))
    loader = DataLoader(WeightedKeys(dataset), batch_sampler=batches, num_workers=tspec.num_workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=tspec.num_workers > 0)
    optimizer = make_optimizer(model, tspec)
    start, resumed = 0, None
    state = load_checkpoint(checkpoint)
    want = (extra_state or {}).get("run_id")
    if state is not None and want is not None and state.get("run_id") not in (None, want):
        # another run's checkpoint (a new run of the cell: other data, another store): never resume from it
        if accelerator.is_main_process:
            print(f"  ignoring checkpoint {checkpoint}: it belongs to run {state.get('run_id')}, not {want}", file=sys.stderr)
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = resumed = state["epoch"] + 1
        rngs = state["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])  # exact when resumed on as many processes
        if state.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
    model, optimizer = accelerator.prepare(model, optimizer)
    if snapshots is not None:
        snapshots.load(state.get("snapshots") if state is not None else None)
        if start == 0:
            snapshots.at(0, model)  # at initialisation
    loss_v, acc_v = float("nan"), float("nan")
    if start >= tspec.epochs and state is not None:
        loss_v, acc_v = state.get("loss", float("nan")), state.get("acc", float("nan"))

    from tqdm.auto import tqdm

    dev = accelerator.device
    bar = tqdm(range(start, tspec.epochs), desc=desc, unit="ep", disable=not (progress and accelerator.is_main_process),
               leave=False, dynamic_ncols=True)
    for epoch in bar:
        batches.set_epoch(epoch)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(epoch, tspec)
        model.train()
        # Loss sum, correct count, real-sample count and the largest batch loss stay on the device: one host
        # sync per epoch, not per batch. A NaN anywhere propagates into the maximum.
        tot = torch.zeros(3, dtype=torch.float64, device=dev)
        worst = torch.full((), -math.inf, dtype=torch.float64, device=dev)
        for x, y, _, w in loader:
            x, target = x.to(dev, non_blocking=True), y[:, 0].to(dev, non_blocking=True)
            w = w.to(dev, non_blocking=True)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    logits = model(x)
                    per_sample = torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")
                    loss = (per_sample * w.float()).sum()
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            real = (w > 0).double()
            stats = torch.stack([(per_sample.detach().double() * real).sum(),
                                 ((logits.detach().argmax(1) == target).double() * real).sum(), real.sum()])
            tot += stats
            batch_mean = stats[0] / stats[2].clamp(min=1.0)
            worst = torch.where(stats[2] > 0, torch.maximum(worst, batch_mean), worst)  # NaN propagates
        # One collective for the counts and the divergence check: every process sees the same numbers and
        # decides the same way (a process raising alone would leave the others waiting in the next collective).
        mine = torch.cat([tot, torch.isnan(worst).double()[None], torch.where(torch.isnan(worst), -math.inf, worst)[None]])
        every = accelerator.gather(mine[None]) if world > 1 else mine[None]
        w_max = math.nan if every[:, 3].max().item() > 0 else every[:, 4].max().item()
        if not math.isfinite(w_max) or w_max > tspec.max_loss:
            raise TrainingError(f"loss became {w_max:.4g} at epoch {epoch} (max_loss {tspec.max_loss:g}); "
                                "lower train.optimizer.lr or check the data")
        tot = every[:, :3].sum(0)
        loss_v, acc_v = (tot[0] / tot[2]).item(), (tot[1] / tot[2]).item()
        if on_epoch is not None and accelerator.is_main_process:
            on_epoch(epoch, loss_v, acc_v)
        bar.set_postfix(loss=f"{loss_v:.3f}", acc=f"{acc_v:.3f}")
        if snapshots is not None:
            snapshots.at(epoch + 1, model)  # before the checkpoint, which keeps it
        if checkpoint is not None:
            rngs = [rng_state()]
            if world > 1:
                from accelerate.utils import gather_object

                rngs = gather_object(rngs)
            if accelerator.is_main_process:
                _atomic_save({"format": CHECKPOINT_FORMAT, "model": accelerator.unwrap_model(model).state_dict(),
                              "optimizer": optimizer.state_dict(),
                              "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                              "epoch": epoch, "loss": loss_v, "acc": acc_v, "rng": rngs, "world": world,
                              **({"snapshots": snapshots.state()} if snapshots is not None else {}),
                              **(extra_state or {})}, checkpoint)
        accelerator.wait_for_everyone()
    bar.close()
    return TrainResult(epochs=tspec.epochs, loss=loss_v, acc=acc_v, resumed_from=resumed,
                       precision=precision_used(accelerator))
