"""ImageSplit -> torch Dataset: resizing, normalisation, augmentation, label columns, indices.

Every batch pnc feeds a network or the metric engine is ``(x, y, idx)``: ``x`` float
(B, C, S, S) normalised to [-1, 1]; ``y`` int64 (B, L) whose column 0 holds the labels the
network is trained on (possibly noisy) and column 1, when present, the clean labels; ``idx``
the global sample indices (used to carve the probe's validation part independently of
batching and of the number of processes).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .base import ImageSplit


def _resize_uint8(images: np.ndarray, size: int) -> torch.Tensor:
    """N x H x W x C uint8 -> float N x C x size x size in [0, 1] (bilinear, antialiased)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.cat([torch.nn.functional.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                       for chunk in torch.split(x, 4096)]).clamp_(0.0, 1.0)
    return x


class ImageDataset(Dataset):
    """A split as tensors. In-memory splits are resized once; file-backed splits lazily per item."""

    decodes_epoch = True  # takes EpochShuffle's epoch * n + i keys

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

    def __getitem__(self, key: int):
        # EpochShuffle hands out epoch * n + i, so that (persistent) workers know the epoch: the augmentation of
        # sample i in epoch e depends only on (seed, e, i), and a resumed run sees the same images.
        n = len(self.labels)
        i, epoch = key % n, key // n
        x = self._load(i)
        if self.augment is not None:
            x = self.augment(x, self.augment.generator(epoch, i))
        return x, self.labels[i], i


class Augment:
    """Training augmentation on tensors, its randomness drawn from (seed, epoch, sample index) only.

    ``random_crop`` with ``padding > 0``: a crop of the image padded with ``padding`` pixels (He/Papyan CIFAR
    style); with ``padding == 0``: a random-resized crop (area 8-100%, aspect 3/4-4/3, resized back; the
    ImageNet recipe). ``horizontal_flip``: a flip with probability 1/2.
    """

    def __init__(self, *, random_crop: bool, padding: int, horizontal_flip: bool, seed: int = 0):
        self.random_crop, self.padding, self.flip, self.seed = random_crop, padding, horizontal_flip, seed

    def generator(self, epoch: int, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 2_147_483_659 + index) % (2**63 - 1))

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        if self.random_crop and self.padding > 0:
            p = self.padding
            s = x.shape[-1]
            padded = torch.nn.functional.pad(x, (p, p, p, p), value=-1.0)
            i, j = torch.randint(0, 2 * p + 1, (2,), generator=gen).tolist()
            x = padded[:, i:i + s, j:j + s]
        elif self.random_crop:
            x = _random_resized_crop(x, gen)
        if self.flip and torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        return x


def _random_resized_crop(x: torch.Tensor, gen: torch.Generator | None, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop on a (C, H, W) tensor: 10 tries, then the central crop."""
    c, h, w = x.shape
    area = h * w
    log_r = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=gen).item())
        aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand((), generator=gen)).item()
        cw, ch = round((target * aspect) ** 0.5), round((target / aspect) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (), generator=gen))
            break
    else:
        ch, cw = h, w
        top, left = 0, 0
    crop = x[None, :, top:top + ch, left:left + cw]
    return torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]


def make_augment(aug, seed: int = 0) -> Augment | None:
    if aug is None or not (aug.random_crop or aug.horizontal_flip):
        return None
    return Augment(random_crop=aug.random_crop, padding=aug.crop_padding, horizontal_flip=aug.horizontal_flip, seed=seed)


class EpochShuffle(Sampler[int]):
    """A permutation that depends only on (seed, epoch): resumed runs see the same order. With
    ``encode_epoch`` it yields ``epoch * n + i`` for sample ``i`` (ImageDataset decodes both), so that
    workers know the epoch."""

    def __init__(self, n: int, seed: int, encode_epoch: bool = False):
        self.n, self.seed, self.epoch, self.encode_epoch = n, seed, 0, encode_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        return iter((order + self.epoch * self.n if self.encode_epoch else order).tolist())

    def __len__(self) -> int:
        return self.n


def shard_bounds(b: int, rank: int, world: int) -> tuple[int, int]:
    """Positions [lo, hi) of process ``rank``'s contiguous part of ``b`` items split over ``world`` processes: sizes
    differ by at most one, the first ``b % world`` processes take one more."""
    q, rem = divmod(b, world)
    lo = rank * q + min(rank, rem)
    return lo, lo + q + (1 if rank < rem else 0)


class ShardedBatches(Sampler[list]):
    """This process's part of every global batch of an epoch: over all processes, each sample exactly once per epoch.

    The epoch's order is :class:`EpochShuffle`'s permutation of (seed, epoch); global batch ``j`` is its positions
    ``[j B, min((j + 1) B, n))`` (``B`` = ``batch_size``, the global batch whatever the number of processes), and
    process ``rank`` takes a contiguous part of it (:func:`shard_bounds`). So 1 and N processes train on the same
    global batches, and nothing is padded or repeated (Accelerate's prepared loader evens out the last batch with
    repeated samples instead: 61 per epoch on digits_depth with 2 processes). Only when the last global batch has
    fewer samples than there are processes does a process left without one get that batch's first sample with
    weight 0: masked, it adds nothing to the loss, the gradient or the counts, and lets every process take part in
    every gradient all-reduce.

    Yields lists of ``(key, weight)``: ``key`` as EpochShuffle hands it out, ``weight`` = world / b for each of the
    ``b`` real samples of the global batch (so that the sum of weighted losses, averaged over processes by the
    gradient all-reduce, is the global batch's mean loss) and 0 for a masked one. :class:`WeightedKeys` serves them.
    """

    def __init__(self, n: int, batch_size: int, seed: int, *, rank: int = 0, world: int = 1, encode_epoch: bool = False):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.order = EpochShuffle(n, seed, encode_epoch)
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def __iter__(self):
        keys = list(self.order)
        for start in range(0, self.n, self.batch_size):
            batch = keys[start:start + self.batch_size]
            lo, hi = shard_bounds(len(batch), self.rank, self.world)
            w = self.world / len(batch)
            yield [(k, w) for k in batch[lo:hi]] or [(batch[0], 0.0)]

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


class WeightedKeys(Dataset):
    """Serves :class:`ShardedBatches`' ``(key, weight)`` pairs: ``dataset[key]`` with the weight appended."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        key, weight = item
        return (*self.dataset[key], weight)


def shard_loader(ds: Dataset, *, batch_size: int, rank: int = 0, world: int = 1, num_workers: int = 0) -> DataLoader:
    """An in-order loader over this process's shard (indices rank, rank+world, ...): no padding, no duplicates."""
    from torch.utils.data import Subset

    idx = list(range(rank, len(ds), world))
    return DataLoader(Subset(ds, idx), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)
