"""The in-memory/on-disk representation every pnc dataset loader returns.

A loader returns :class:`ImageSplit` objects: class names, an int64 label vector, and either
all images in memory (``images``: uint8, N x H x W x C) or a list of image files (``paths``)
read lazily. Everything downstream (derived noisy splits, torch datasets, digests) works on
this one type, so a new dataset only needs a loader that produces it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

DATA_ROOT_ENV = "PNC_DATA_ROOT"


def data_root() -> Path:
    """Root folder of raw datasets: ``$PNC_DATA_ROOT`` or ``data/raw`` under the working directory."""
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else Path("data") / "raw"


@dataclass
class ImageSplit:
    """One split of an image-classification dataset.

    Exactly one of ``images`` (uint8 array N x H x W x C, C = 1 or 3) and ``paths`` (image files,
    read with PIL on access) is set. ``labels`` are int64 indices into ``classes``.
    """

    name: str
    classes: list[str]
    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[Path] | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if (self.images is None) == (self.paths is None):
            raise ValueError("ImageSplit needs exactly one of images= or paths=")
        n = len(self.images) if self.images is not None else len(self.paths)
        if n != len(self.labels):
            raise ValueError(f"{self.name}: {n} images but {len(self.labels)} labels")
        if self.images is not None:
            if self.images.dtype != np.uint8 or self.images.ndim != 4:
                raise ValueError(f"{self.name}: images must be uint8 N x H x W x C, got {self.images.dtype} {self.images.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 H x W x C."""
        if self.images is not None:
            return self.images[i]
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return np.asarray(im.convert("RGB"))

    def subset(self, index: Sequence[int] | np.ndarray, name: str | None = None) -> "ImageSplit":
        index = np.asarray(index, dtype=np.int64)
        return replace(
            self,
            name=name or self.name,
            labels=self.labels[index],
            images=None if self.images is None else self.images[index],
            paths=None if self.paths is None else [self.paths[i] for i in index],
        )

    def with_labels(self, labels: np.ndarray, name: str | None = None) -> "ImageSplit":
        return replace(self, name=name or self.name, labels=np.asarray(labels, dtype=np.int64))

    def digest(self) -> str:
        """sha256 of the labels and the image bytes (or file paths and sizes for on-disk splits)."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.labels).tobytes())
        if self.images is not None:
            h.update(str(self.images.shape).encode())
            h.update(np.ascontiguousarray(self.images).tobytes())
        else:
            for p in self.paths:
                p = Path(p)
                h.update(str(p).encode())
                h.update(str(p.stat().st_size).encode())
        return h.hexdigest()
