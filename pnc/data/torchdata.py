"""ImageSplit -> torch Dataset: resizing, normalisation, augmentation, label columns, indices.

Every batch pnc feeds a network or the metric engine is ``(x, y, idx)``: ``x`` float
(B, C, S, S) normalised to [-1, 1]; ``y`` int64 (B, L) whose column 0 holds the labels the
network is trained on (possibly noisy) and column 1, when present, the clean labels; ``idx``
the global sample indices (used to carve the probe's validation part independently of
batching and of the number of processes).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .base import ImageSplit


def _resize_uint8(images: np.ndarray, size: int) -> torch.Tensor:
    """N x H x W x C uint8 -> float N x C x size x size in [0, 1] (bilinear, antialiased)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        out = []
        for chunk in torch.split(x, 4096):
            out.append(torch.nn.functional.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
        x = torch.cat(out).clamp_(0.0, 1.0)
    return x


class ImageDataset(Dataset):
    """A split as tensors. In-memory splits are resized once; file-backed splits lazily per item."""

    def __init__(self, split: ImageSplit, *, image_size: int, channels: int, label_columns: Sequence[np.ndarray] | None = None,
                 augment=None):
        self.split = split
        self.size = image_size
        self.channels = channels
        cols = list(label_columns) if label_columns is not None else [split.labels]
        self.labels = torch.from_numpy(np.stack([np.asarray(c, dtype=np.int64) for c in cols], axis=1))
        self.augment = augment
        self.tensors = None
        if split.images is not None:
            x = _resize_uint8(split.images, image_size)
            self.tensors = self._channels(x).mul_(2.0).sub_(1.0)

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.channels:
            return x
        if self.channels == 1:
            return x.mean(dim=1, keepdim=True)
        return x.expand(x.shape[0], self.channels, *x.shape[2:]).contiguous()

    def __len__(self) -> int:
        return len(self.labels)

    def _load(self, i: int) -> torch.Tensor:
        if self.tensors is not None:
            return self.tensors[i]
        img = self.split.image(i)[None]
        return self._channels(_resize_uint8(img, self.size))[0].mul_(2.0).sub_(1.0)

    def __getitem__(self, i: int):
        x = self._load(i)
        if self.augment is not None:
            x = self.augment(x)
        return x, self.labels[i], i


class Augment:
    """Random crop with zero padding and horizontal flip (Papyan/He CIFAR style), on tensors."""

    def __init__(self, *, random_crop: bool, padding: int, horizontal_flip: bool):
        self.random_crop, self.padding, self.flip = random_crop, padding, horizontal_flip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.random_crop and self.padding > 0:
            p = self.padding
            s = x.shape[-1]
            padded = torch.nn.functional.pad(x, (p, p, p, p), value=-1.0)
            i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = padded[:, i:i + s, j:j + s]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x


def make_augment(aug) -> Augment | None:
    if aug is None or not (aug.random_crop or aug.horizontal_flip):
        return None
    return Augment(random_crop=aug.random_crop, padding=aug.crop_padding, horizontal_flip=aug.horizontal_flip)


class EpochShuffle(Sampler[int]):
    """A permutation that depends only on (seed, epoch): resumed runs see the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def shard_loader(ds: Dataset, *, batch_size: int, rank: int = 0, world: int = 1, num_workers: int = 0) -> DataLoader:
    """An in-order loader over this process's shard (indices rank, rank+world, ...): no padding, no duplicates."""
    from torch.utils.data import Subset

    idx = list(range(rank, len(ds), world))
    return DataLoader(Subset(ds, idx), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)
