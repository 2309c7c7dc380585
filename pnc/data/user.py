"""A researcher's own images: two layouts, checked before anything is built (``docs/datasets.md``).

``image_folder`` (torchvision's ImageFolder layout)::

    <root>/<split folder>/<class name>/<image files>      e.g. root/train/cat/001.jpg

one sub-folder per split (``dataset.splits`` maps split names to folders; default ``train`` and ``test``),
classes = the sorted class-folder names of the training split (every split has the same class folders),
images of any size and mode, read lazily as RGB and resized like every other dataset.

``arrays`` (the format of pnc's own split store, without the manifest)::

    <root>/<split folder>/images.npy   uint8 N x H x W x C (C = 1 or 3)
    <root>/<split folder>/labels.npy   integer N, 0 <= label < K
    <root>/classes.json                optional: the K class names (else "0" .. "K-1", K = max label + 1)

Both are hashed like the catalog datasets (file contents; labels) for cell ids and lineage. A problem is a
:class:`~pnc.errors.DataError` naming the file and the fix.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import ImageSplit
from .imagenet import IMG_EXTENSIONS

DEFAULT_SPLITS = {"train": "train", "test": "test"}


def _folder(root: str | Path | None, layout: str) -> Path:
    if root is None:
        raise DataError(f"dataset {layout!r} needs `root:` (the folder holding your data); see docs/datasets.md")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"{base}: no such folder (dataset {layout}); give `root:` the folder holding one sub-folder per split")
    return base


def _split_dir(base: Path, split: str, folder: str) -> Path:
    d = base / folder
    if not d.is_dir():
        have = sorted(p.name for p in base.iterdir() if p.is_dir())
        raise DataError(f"{d}: split {split!r} has no folder; {base} holds {', '.join(have) or 'no folders'} "
                        "(map split names to folders with `dataset.splits`)")
    return d


def _class_dirs(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_image_folder(root: str | Path | None, *, splits: dict[str, str] | None = None) -> dict[str, ImageSplit]:
    """Every split of an ``image_folder`` dataset, as lazily read path lists."""
    base = _folder(root, "image_folder")
    out: dict[str, ImageSplit] = {}
    classes: list[str] | None = None
    for split, folder in (splits or DEFAULT_SPLITS).items():
        d = _split_dir(base, split, folder)
        found = _class_dirs(d)
        if not found:
            raise DataError(f"{d}: no class folders; put each class's images in {d}/<class name>/")
        if classes is None:
            classes = found
        elif found != classes:
            raise DataError(f"{d}: class folders differ from the first split's: missing "
                            f"{sorted(set(classes) - set(found))[:5]}, unexpected {sorted(set(found) - set(classes))[:5]}")
        paths: list[Path] = []
        labels: list[int] = []
        for k, name in enumerate(classes):
            files = sorted(p for p in (d / name).iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            if not files:
                raise DataError(f"{d / name}: empty class folder (no {', '.join(IMG_EXTENSIONS)} files); add images or remove it")
            paths += files
            labels += [k] * len(files)
        _check_readable(paths[0])
        out[split] = ImageSplit(name=split, classes=list(classes), labels=np.asarray(labels), paths=paths, source=str(d))
    return out


def _check_readable(path: Path) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e}); replace or remove it") from None


def load_arrays(root: str | Path | None, *, splits: dict[str, str] | None = None) -> dict[str, ImageSplit]:
    """Every split of an ``arrays`` dataset, in memory."""
    base = _folder(root, "arrays")
    names = _class_names(base)
    out: dict[str, ImageSplit] = {}
    for split, folder in (splits or DEFAULT_SPLITS).items():
        d = _split_dir(base, split, folder)
        images, labels = _read_npy(d / "images.npy"), _read_npy(d / "labels.npy")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DataError(f"{d / 'images.npy'}: expected uint8 N x H x W x C with C = 1 or 3, got {images.dtype} {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{d / 'labels.npy'}: expected {images.shape[0]} integer labels, got {labels.dtype} {labels.shape}")
        k = len(names) if names is not None else int(labels.max(initial=0)) + 1
        bad = np.flatnonzero((labels < 0) | (labels >= k))
        if bad.size:
            raise DataError(f"{d / 'labels.npy'}: label {int(labels[bad[0]])} at index {int(bad[0])} is out of range 0..{k - 1}"
                            + (" (classes.json lists the classes)" if names is not None else ""))
        out[split] = ImageSplit(name=split, classes=[], labels=labels.astype(np.int64), images=images, source=str(d))
    k = len(names) if names is not None else max(int(s.labels.max(initial=0)) + 1 for s in out.values())
    for s in out.values():
        s.classes = list(names) if names is not None else [str(i) for i in range(k)]
    return out


def _class_names(base: Path) -> list[str] | None:
    path = base / "classes.json"
    if not path.exists():
        return None
    try:
        names = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path}: not JSON ({e}); it must be a list of class names") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise DataError(f"{path}: must be a list of distinct class names (strings)")
    return names


def _read_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: missing; an arrays split folder holds images.npy and labels.npy")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a numpy array file ({e})") from None


def describe(layout: str, root: str | None, splits: dict[str, str] | None) -> tuple[int, int, int]:
    """(number of classes, channels, native side length; 0 when the images' sizes vary) of a user dataset, from
    its folder names and array headers only (no image is decoded)."""
    base = _folder(root, layout)
    first, folder = next(iter((splits or DEFAULT_SPLITS).items()))
    d = _split_dir(base, first, folder)
    if layout == "image_folder":
        classes = _class_dirs(d)
        if not classes:
            raise DataError(f"{d}: no class folders; put each class's images in {d}/<class name>/")
        return len(classes), 3, 0
    images = np.load(d / "images.npy", mmap_mode="r") if (d / "images.npy").is_file() else _read_npy(d / "images.npy")
    names = _class_names(base)
    k = len(names) if names is not None else int(_read_npy(d / "labels.npy").max(initial=0)) + 1
    h, w = images.shape[1:3] if images.ndim == 4 else (0, 0)
    return k, int(images.shape[-1]) if images.ndim == 4 else 3, int(h) if h == w else 0
