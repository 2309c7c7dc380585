"""Office-Home (Venkateswara et al. 2017): one domain, 65 classes, a seeded stratified train/test split.

Layout under the root (default ``data_root()/office_home``)::

    OfficeHomeDataset_10072016/{Art, Clipart, Product, Real World}/<Class>/<nnnnn>.jpg

The last domain may also be spelled ``Real_World`` or ``RealWorld`` (derived copies); pnc calls it
``Real_World``. A root that holds the domain folders directly (without the
``OfficeHomeDataset_10072016`` level) is accepted too. The class folders must be exactly
:data:`OFFICE_HOME_CLASSES` (labels = index in that case-sensitive sorted list).

Split rule (no official split exists): within each class of the domain, ``round(n * train_fraction)``
images (half rounds up, at least 1 and, when n >= 2, at most n - 1) go to train, the rest to test;
which ones is a seeded random choice (``seed``), or the first in sorted file order with ``seed=None``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pnc.catalog import DATASETS, TRAIN_FRACTION
from pnc.data.base import ImageSplit, stratified_split
from pnc.data.cifar import data_error, dataset_root, found
from pnc.data.imagenet import IMG_EXTENSIONS
from pnc.errors import DataError, did_you_mean

OFFICE_HOME_DIR = "OfficeHomeDataset_10072016"
OFFICE_HOME_CLASSES: tuple[str, ...] = (
    "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator", "Calendar", "Candles",
    "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp", "Drill", "Eraser", "Exit_Sign", "Fan",
    "File_Cabinet", "Flipflops", "Flowers", "Folder", "Fork", "Glasses", "Hammer", "Helmet", "Kettle", "Keyboard",
    "Knives", "Lamp_Shade", "Laptop", "Marker", "Monitor", "Mop", "Mouse", "Mug", "Notebook", "Oven", "Pan",
    "Paper_Clip", "Pen", "Pencil", "Postit_Notes", "Printer", "Push_Pin", "Radio", "Refrigerator", "Ruler",
    "Scissors", "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda", "Speaker", "Spoon", "TV", "Table", "Telephone",
    "ToothBrush", "Toys", "Trash_Can", "Webcam",
)
# pnc's domain name -> accepted folder names, first = the official spelling.
DOMAIN_DIRS: dict[str, tuple[str, ...]] = {
    "Art": ("Art",), "Clipart": ("Clipart",), "Product": ("Product",),
    "Real_World": ("Real World", "Real_World", "RealWorld"),
}
SOURCE = "https://www.hemanthdv.org/officeHomeDataset.html (OfficeHomeDataset_10072016.zip)"
LAYOUT = """\
  {root}/
  └── OfficeHomeDataset_10072016/
      ├── Art/         Alarm_Clock/00001.jpg, ..., Webcam/  (65 class folders)
      ├── Clipart/
      ├── Product/
      └── Real World/  (or Real_World, RealWorld)"""


def _err(problem: str, root: Path, fix: str, where: Path | None = None) -> DataError:
    return data_error(problem, dataset="office_home", layout=LAYOUT.format(root=root), found=found(where or root), fix=fix)


def _domain_dir(base: Path, domain: str) -> Path:
    top = base / OFFICE_HOME_DIR
    if not top.is_dir() and any((base / d).is_dir() for dirs in DOMAIN_DIRS.values() for d in dirs):
        top = base  # domain folders directly under the root
    if not top.is_dir():
        raise _err(f"Office-Home: missing folder {top}.", base, f"download and unzip {SOURCE} into {base}/.")
    for d in DOMAIN_DIRS[domain]:
        if (top / d).is_dir():
            return top / d
    have = sorted(p.name for p in top.iterdir() if p.is_dir() and not p.name.startswith("."))
    raise _err(f"Office-Home: no folder for domain {domain!r} in {top} (looked for "
               f"{', '.join(repr(d) for d in DOMAIN_DIRS[domain])}); found domains: {', '.join(have) or 'none'}.",
               base, f"restore the {DOMAIN_DIRS[domain][0]}/ folder from {SOURCE}.", where=top)


def load_office_home(root: str | Path | None = None, *, domain: str, train_fraction: float = TRAIN_FRACTION,
                     seed: int | None = 0) -> dict[str, ImageSplit]:
    """Office-Home ``{"train", "test"}`` of one ``domain`` (Art, Clipart, Product, Real_World), 65 classes, paths."""
    domain = {"Real World": "Real_World", "RealWorld": "Real_World"}.get(domain, domain)
    if domain not in DOMAIN_DIRS:
        raise DataError(f"unknown Office-Home domain {domain!r}." + did_you_mean(domain, DATASETS["office_home"].domains))
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    base = dataset_root("office_home", root)
    folder = _domain_dir(base, domain)
    present = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    lack = [c for c in OFFICE_HOME_CLASSES if c not in present]
    extra = [c for c in present if c not in OFFICE_HOME_CLASSES]
    if lack or extra:
        what = "; ".join(s for s in (f"missing class folder(s) {', '.join(lack)}" if lack else "",
                                     f"unexpected folder(s) {', '.join(extra)}" if extra else "") if s)
        raise _err(f"Office-Home: {folder}: {what} (expected the 65 classes {OFFICE_HOME_CLASSES[0]} ... "
                   f"{OFFICE_HOME_CLASSES[-1]}, spelled exactly).", base,
                   f"restore {folder.name}/ from {SOURCE}, with the class folders named as in the original.",
                   where=folder)
    paths: list[Path] = []
    counts: list[int] = []
    for c in OFFICE_HOME_CLASSES:
        files = sorted(p for p in (folder / c).iterdir()
                       if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith("."))
        if not files:
            raise _err(f"Office-Home: class folder {folder / c} holds no images.", base,
                       f"restore the images of {folder.name}/{c}/ from {SOURCE}.", where=folder / c)
        paths += files
        counts.append(len(files))
    n = np.asarray(counts)
    labels = np.repeat(np.arange(len(n), dtype=np.int64), n)
    n_train = np.where(n >= 2, np.clip(np.floor(n * train_fraction + 0.5), 1, n - 1), n).astype(np.int64)
    tr, te = stratified_split(labels, n_train, seed)
    meta = {"domain": domain, "folder": folder.name, "train_fraction": float(train_fraction), "seed": seed}
    return {name: ImageSplit(name=name, classes=list(OFFICE_HOME_CLASSES), labels=labels[idx],
                             paths=[paths[i] for i in idx], source=str(folder), meta=dict(meta))
            for name, idx in (("train", tr), ("test", te))}
