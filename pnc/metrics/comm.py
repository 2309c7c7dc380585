"""Process-group access for the metric engine: gather tensors and objects from every process.

The metric engine reduces across processes by *gathering* each process's statistics and merging
them in rank order (see :mod:`pnc.metrics.stats`), so it only needs an all-gather. Two back ends:

* an ``accelerate.Accelerator`` passed in (its ``gather`` / ``gather_object``);
* ``torch.distributed`` when it is initialised (gloo, NCCL, ...).

With neither, the world has one process and every collective is the identity. Every process
receives the same gathered values, so every process computes the same metrics.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class Comm:
    """All-gather over the current process group (or a trivial one-process group)."""

    def __init__(self, accelerator: Any = None):
        self.accelerator = accelerator
        # one process unless a process group says otherwise; ``device``: where collectives run (CUDA for NCCL, else the CPU)
        self.world_size, self.rank, self.device = 1, 0, torch.device("cpu")
        if accelerator is not None:
            self.world_size = int(accelerator.num_processes)
            self.rank = int(accelerator.process_index)
            self.device = torch.device(accelerator.device)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            self.world_size = torch.distributed.get_world_size()
            self.rank = torch.distributed.get_rank()
            if "nccl" in str(torch.distributed.get_backend()).lower() and torch.cuda.is_available():
                self.device = torch.device("cuda", torch.cuda.current_device())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """Return ``[t_rank0, t_rank1, ...]``; every process must pass a tensor of the same shape/dtype."""
        if self.world_size == 1:
            return [t]
        src = t.detach().to(self.device).contiguous()
        if self.accelerator is not None:
            out = self.accelerator.gather(src.unsqueeze(0))
            parts = list(out.reshape(self.world_size, *src.shape).unbind(0))
        else:
            parts = [torch.empty_like(src) for _ in range(self.world_size)]
            torch.distributed.all_gather(parts, src)
        return [p.to(t.device) for p in parts]

    def all_gather_rows(self, t: Tensor) -> list[Tensor]:
        """All-gather tensors whose first dimension differs between processes (padded internally)."""
        if self.world_size == 1:
            return [t]
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        sizes = [int(s.item()) for s in self.all_gather(n)]
        pad = max(sizes)
        buf = t.new_zeros((pad, *t.shape[1:]))
        buf[: t.shape[0]] = t
        return [g[:s] for g, s in zip(self.all_gather(buf), sizes)]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Gather one picklable object per process, in rank order."""
        if self.world_size == 1:
            return [obj]
        if self.accelerator is not None:
            from accelerate.utils import gather_object

            return list(gather_object([obj]))
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def sum(self, t: Tensor) -> Tensor:
        """Sum a tensor over processes (via all-gather, deterministic order)."""
        parts = self.all_gather(t)
        return sum(parts[1:], parts[0].clone())
