"""The explicit training loop (the only module that imports accelerate).

One CPU, one GPU or many (``accelerate launch`` / ``torchrun``): Accelerate prepares the
model, optimizer and loader; mixed precision and gradient accumulation come from the spec.
The learning rate is a pure function of the epoch and the shuffling order a pure function of
(seed, epoch), so a run resumed from its per-epoch checkpoint follows the same path as an
uninterrupted one. A NaN or diverging loss raises :class:`~pnc.errors.TrainingError`.
"""
from __future__ import annotations

import math
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import TrainingError

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def make_accelerator(precision: str = "fp32", grad_accum_steps: int = 1):
    """An Accelerator for this process: GPU when there is one, else CPU (gloo when distributed)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    cpu = not torch.cuda.is_available()
    mp = PRECISION[precision]
    if cpu and mp == "fp16":
        mp = "no"  # fp16 autocast is GPU-only
    # split_batches: train.batch_size is the global batch, whatever the number of processes, so a study
    # gives the same optimisation path on 1 or N processes (up to per-process BatchNorm statistics).
    return Accelerator(cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=grad_accum_steps,
                       dataloader_config=DataLoaderConfiguration(split_batches=True))


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
    loss: float
    acc: float
    resumed_from: int | None = None


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path | None) -> dict | None:
    if path is None or not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - a torn checkpoint is ignored, training restarts
        return None


def train(model: torch.nn.Module, dataset: torch.utils.data.Dataset, tspec: Any, *, accelerator: Any,
          checkpoint: Path | None = None, on_epoch: Callable[[int, float, float], None] | None = None,
          progress: bool = True, desc: str = "train", extra_state: dict | None = None) -> TrainResult:
    """Train ``model`` in place for ``tspec.epochs`` epochs, resuming from ``checkpoint`` when present."""
    from torch.utils.data import DataLoader

    from .data.torchdata import EpochShuffle

    sampler = EpochShuffle(len(dataset), tspec.seed, encode_epoch=getattr(dataset, "decodes_epoch", False))
    loader = DataLoader(dataset, batch_size=tspec.batch_size, sampler=sampler, num_workers=tspec.num_workers,
                        pin_memory=torch.cuda.is_available(), drop_last=False,
                        persistent_workers=tspec.num_workers > 0)
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
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    loss_fn = torch.nn.CrossEntropyLoss()
    loss_v, acc_v = float("nan"), float("nan")
    if start >= tspec.epochs and state is not None:
        loss_v, acc_v = state.get("loss", float("nan")), state.get("acc", float("nan"))

    from tqdm.auto import tqdm

    bar = tqdm(range(start, tspec.epochs), desc=desc, unit="ep", disable=not (progress and accelerator.is_main_process),
               leave=False, dynamic_ncols=True)
    for epoch in bar:
        # Accelerate's loader re-seeds samplers from its own iteration counter: set it, not just the sampler.
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(epoch, tspec)
        model.train()
        # Loss sum, correct count, sample count and the largest batch loss stay on the device: one host
        # sync per epoch, not per batch. A NaN anywhere propagates into the maximum.
        tot = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
        worst = torch.full((), -math.inf, dtype=torch.float64, device=accelerator.device)
        for x, y, _ in loader:
            target = y[:, 0]
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    logits = model(x)
                    loss = loss_fn(logits.float(), target)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            lv = loss.detach().double()
            worst = torch.maximum(worst, lv)  # NaN propagates
            tot += torch.stack([lv * target.numel(), (logits.detach().argmax(1) == target).sum().double(),
                                torch.tensor(float(target.numel()), dtype=torch.float64, device=tot.device)])
        w = worst.item()
        if not math.isfinite(w) or w > tspec.max_loss:
            raise TrainingError(f"loss became {w:.4g} at epoch {epoch} (max_loss {tspec.max_loss:g}); "
                                "lower train.optimizer.lr or check the data")
        tot = accelerator.reduce(tot, reduction="sum")
        loss_v, acc_v = (tot[0] / tot[2]).item(), (tot[1] / tot[2]).item()
        if on_epoch is not None and accelerator.is_main_process:
            on_epoch(epoch, loss_v, acc_v)
        bar.set_postfix(loss=f"{loss_v:.3f}", acc=f"{acc_v:.3f}")
        if checkpoint is not None and accelerator.is_main_process:
            _atomic_save({"model": accelerator.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                          "epoch": epoch, "loss": loss_v, "acc": acc_v, "torch_rng": torch.get_rng_state(),
                          "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                          **(extra_state or {})}, checkpoint)
        accelerator.wait_for_everyone()
    bar.close()
    return TrainResult(epochs=tspec.epochs, loss=loss_v, acc=acc_v, resumed_from=resumed)
