"""Mini-ImageNet for 100-way classification: all 100 classes merged, then split per class.

Two layouts under the root (default ``data_root()/mini_imagenet``):

(a) Ravi & Larochelle CSVs: ``train.csv``, ``val.csv``, ``test.csv`` (header ``filename,label``,
    rows like ``n0153282900000005.jpg,n01532829``) plus the images flat in ``images/``; images are
    read lazily (``ImageSplit.paths``).
(b) the pickle cache ``mini-imagenet-cache-{train,val,test}.pkl``: dicts with ``image_data`` uint8
    (N, 84, 84, 3) and ``class_dict`` {wnid: [indices]}; images are held in memory.

``layout="auto"`` uses the pickle cache when all three files exist, else the CSVs.

Split rule: classes are the sorted wnids of all three files (labels 0..99). A class with ``n``
images sends ``round(n * train_per_class / 600)`` of them to train (half rounds up) and the rest
to test: the real 600 per class give 500 / 100 with the default, a fixture with 6 per class 5 / 1.
The train images of a class are a seeded random choice (``seed``), or the first ones in file
order with ``seed=None``. Every class must keep at least one image on each side.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Literal

import numpy as np

from pnc.data.base import ImageSplit, stratified_split
from pnc.data.cifar import UNPICKLE_ERRORS, as_str, data_error, dataset_root, found, str_keys, unpickle

REAL_PER_CLASS = 600
PARTS = ("train", "val", "test")
CSV_HEADER = ["filename", "label"]
PICKLE_NAME = "mini-imagenet-cache-{}.pkl"
SOURCES = ("CSVs: https://github.com/twitter/meta-learning-lstm/tree/master/data/miniImagenet, images cut "
           "from ILSVRC2012 and resized to 84x84")
LAYOUT = """\
  {root}/
  ├── train.csv, val.csv, test.csv    header 'filename,label', e.g. n0153282900000005.jpg,n01532829
  └── images/                          all 60000 images, flat: n0153282900000005.jpg, ...
  or the pickle cache:
  {root}/
  └── mini-imagenet-cache-train.pkl, mini-imagenet-cache-val.pkl, mini-imagenet-cache-test.pkl
      each a dict: 'image_data' uint8 (N, 84, 84, 3), 'class_dict' {{wnid: [indices]}}"""


def _err(problem: str, root: Path, fix: str, where: Path | None = None):
    return data_error(problem, dataset="mini_imagenet", layout=LAYOUT.format(root=root),
                      found=found(where or root), fix=fix)


def _read_csvs(root: Path) -> tuple[list[Path], list[str]]:
    """(image paths, wnid per image) from the three CSVs, in file order train, val, test."""
    images = root / "images"
    paths: list[str] = []
    wnids: list[str] = []
    for part in PARTS:
        f = root / f"{part}.csv"
        try:
            with f.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
        except (UnicodeDecodeError, csv.Error) as e:
            raise _err(f"{f}: not a text CSV ({e}).", root, f"restore {f.name} from the original split files ({SOURCES}).") from None
        if not rows or [c.strip() for c in rows[0]] != CSV_HEADER:
            got = ",".join(rows[0]) if rows else "(empty file)"
            raise _err(f"{f}: first line must be the header 'filename,label', got {got!r}.", root,
                       f"use the Ravi & Larochelle split files ({SOURCES}); the first line of each CSV is 'filename,label'.")
        body = [r for r in rows[1:] if r]
        bad = [i + 2 for i, r in enumerate(body) if len(r) != 2 or not r[0] or not r[1]]
        if bad:
            raise _err(f"{f}: line {bad[0]} is not 'filename,label' ({len(bad)} such lines).", root,
                       f"restore {f.name} from the original split files ({SOURCES}).")
        paths += [r[0].strip() for r in body]
        wnids += [r[1].strip() for r in body]
    if not images.is_dir():
        raise _err(f"Mini-ImageNet: missing folder {images} (the CSVs name {len(paths)} images in it).", root,
                   f"put all images, flat, into {images}/ ({SOURCES}).")
    present = set(os.listdir(images))
    missing = [p for p in paths if p not in present]
    if missing:
        raise _err(f"Mini-ImageNet: {len(missing)} of the {len(paths)} images named in the CSVs are missing from "
                   f"{images}/ (first: {', '.join(missing[:3])}).", root,
                   f"put all images, flat, into {images}/ ({SOURCES}).", where=images)
    return [images / p for p in paths], wnids


def _read_pickles(root: Path) -> tuple[np.ndarray, list[str]]:
    """(images uint8 N x H x W x 3, wnid per image) from the three pickle caches."""
    xs: list[np.ndarray] = []
    wnids: list[str] = []
    for part in PARTS:
        f = root / PICKLE_NAME.format(part)
        fix = f"replace {f.name} with an intact copy of the Mini-ImageNet pickle cache, or use the CSV layout."
        try:
            obj = unpickle(f.read_bytes())
        except UNPICKLE_ERRORS as e:
            raise _err(f"{f}: cannot unpickle ({type(e).__name__}: {e}); truncated or not a pickle.", root, fix) from None
        if not isinstance(obj, dict):
            raise _err(f"{f}: expected a pickled dict, got {type(obj).__name__}.", root, fix)
        d = str_keys(obj)
        if "image_data" not in d or "class_dict" not in d or not isinstance(d["class_dict"], dict):
            raise _err(f"{f}: expected keys 'image_data' and 'class_dict' (a dict), found keys: "
                       f"{', '.join(sorted(map(str, d)))}.", root, fix)
        x = d["image_data"]
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
            raise _err(f"{f}: 'image_data' must be uint8 (N, H, W, 3) (84 x 84 in the real cache), got {desc}.", root, fix)
        owner = np.full(len(x), -1, dtype=np.int64)
        names = [as_str(k) for k in d["class_dict"]]
        for j, idx in enumerate(d["class_dict"].values()):
            idx = np.asarray(idx, dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= len(x)):
                raise _err(f"{f}: class_dict['{names[j]}'] has indices {int(idx.min())}..{int(idx.max())} outside "
                           f"0..{len(x) - 1} (image_data has {len(x)} images).", root, fix)
            if np.any(owner[idx] >= 0):
                raise _err(f"{f}: class_dict['{names[j]}'] shares images with another class.", root, fix)
            owner[idx] = j
        keep = np.flatnonzero(owner >= 0)
        xs.append(x if keep.size == len(x) else x[keep])
        wnids += [names[j] for j in owner[keep]]
    return (np.concatenate(xs) if len(xs) > 1 else xs[0]), wnids


def load_mini_imagenet(root: str | Path | None = None, *, train_per_class: int = 500, seed: int | None = 0,
                       layout: Literal["auto", "csv", "pickle"] = "auto") -> dict[str, ImageSplit]:
    """Mini-ImageNet ``{"train", "test"}``: 100 merged classes (sorted wnids), split per class (module docstring)."""
    if not 0 < train_per_class < REAL_PER_CLASS:
        raise ValueError(f"train_per_class must be in 1..{REAL_PER_CLASS - 1}, got {train_per_class}")
    if layout not in ("auto", "csv", "pickle"):
        raise ValueError(f"layout must be 'auto', 'csv' or 'pickle', got {layout!r}")
    base = dataset_root("mini_imagenet", root)
    pkls = [base / PICKLE_NAME.format(p) for p in PARTS]
    csvs = [base / f"{p}.csv" for p in PARTS]
    if layout == "auto":
        layout = "pickle" if all(p.is_file() for p in pkls) else "csv"
    needed = pkls if layout == "pickle" else csvs
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise _err(f"Mini-ImageNet ({layout} layout): missing {', '.join(str(base / m) for m in missing)}.", base,
                   f"place the three {'pickle caches' if layout == 'pickle' else 'split CSVs and images/'} "
                   f"in {base}/ ({SOURCES}).")
    if layout == "pickle":
        images, wnids = _read_pickles(base)
        paths = None
    else:
        paths, wnids = _read_csvs(base)
        images = None
    classes, labels = np.unique(np.asarray(wnids), return_inverse=True)
    counts = np.bincount(labels, minlength=len(classes))
    n_train = np.floor(counts * train_per_class / REAL_PER_CLASS + 0.5).astype(np.int64)
    bad = np.flatnonzero((n_train < 1) | (n_train >= counts))
    if bad.size:
        c = bad[0]
        raise _err(f"Mini-ImageNet: class {classes[c]} has {counts[c]} images, too few to send "
                   f"{train_per_class}/{REAL_PER_CLASS} of them to train and keep one for test.", base,
                   "restore the full class (600 images per class in the real data).")
    tr, te = stratified_split(labels, n_train, seed)
    meta = {"format": layout, "train_per_class": int(train_per_class), "seed": seed}
    return {name: ImageSplit(name=name, classes=[str(c) for c in classes], labels=labels[idx],
                             images=None if images is None else images[idx],
                             paths=None if paths is None else [paths[i] for i in idx], source=str(base), meta=dict(meta))
            for name, idx in (("train", tr), ("test", te))}
