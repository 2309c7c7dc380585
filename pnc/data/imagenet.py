"""ImageNet (ILSVRC2012) in the ImageFolder layout, images read lazily from their files.

Layout under the root (default ``data_root()/imagenet``)::

    train/<wnid>/*.JPEG      1000 folders, 1,281,167 images
    val/<wnid>/*.JPEG        the same 1000 folders, 50,000 images (val sorted into class folders)

Classes are the sorted wnid folder names of ``train/`` (labels 0..999, ImageFolder's order);
``val/`` must hold the same folders. Files are sorted by name within a class.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pnc.data.base import ImageSplit
from pnc.data.cifar import data_error, dataset_root, found

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT = """\
  {root}/
  ├── train/
  │   ├── n01440764/  n01440764_10026.JPEG, ...
  │   └── ... (1000 wnid folders)
  └── val/
      ├── n01440764/  ILSVRC2012_val_00000293.JPEG, ...
      └── ... (the same 1000 wnid folders)"""
SOURCE = "https://image-net.org/ (ILSVRC2012 train and validation archives)"
VALPREP = "https://raw.githubusercontent.com/soumith/imagenetloader.torch/master/valprep.sh"


def _err(problem: str, root: Path, fix: str, where: Path | None = None):
    return data_error(problem, dataset="imagenet", layout=LAYOUT.format(root=root), found=found(where or root), fix=fix)


def _scan(folder: Path) -> tuple[list[str], list[str]]:
    """(sorted sub-folder names, sorted image file names) directly inside ``folder``."""
    dirs, files = [], []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                dirs.append(e.name)
            elif e.name.lower().endswith(IMG_EXTENSIONS):
                files.append(e.name)
    return sorted(dirs), sorted(files)


def _split(root: Path, name: str, classes: list[str] | None) -> ImageSplit:
    folder = root / name
    if not folder.is_dir():
        raise _err(f"ImageNet: missing folder {folder}.", root,
                   f"extract the ILSVRC2012 {name} archive into {folder}/ ({SOURCE}).")
    dirs, flat = _scan(folder)
    if flat and name == "val":
        raise _err(f"ImageNet: {folder} holds {len(flat)} images directly (e.g. {flat[0]}) instead of one folder "
                   f"per wnid: the validation set is not sorted into class folders.", root,
                   f"sort it once, e.g. `cd {folder} && bash valprep.sh` with {VALPREP}, "
                   f"which moves each image into val/<wnid>/.", where=folder)
    if not dirs:
        raise _err(f"ImageNet: {folder} has no class folders.", root,
                   f"extract the ILSVRC2012 {name} archive so that {folder}/<wnid>/ holds the images ({SOURCE}).",
                   where=folder)
    if classes is not None and dirs != classes:
        extra, lack = sorted(set(dirs) - set(classes)), sorted(set(classes) - set(dirs))
        raise _err(f"ImageNet: class folders of {folder} differ from train/'s: "
                   f"missing {', '.join(lack[:5]) or 'none'}; unexpected {', '.join(extra[:5]) or 'none'}.", root,
                   f"make {folder}/ hold exactly the wnid folders of train/ ({VALPREP} sorts val/).", where=folder)
    paths: list[Path] = []
    counts: list[int] = []
    for wnid in dirs:
        _, files = _scan(folder / wnid)
        if not files:
            raise _err(f"ImageNet: class folder {folder / wnid} holds no images ({', '.join(IMG_EXTENSIONS)}).",
                       root, f"restore the images of {wnid} from the ILSVRC2012 archives ({SOURCE}).",
                       where=folder / wnid)
        paths += [folder / wnid / f for f in files]
        counts.append(len(files))
    labels = np.repeat(np.arange(len(dirs), dtype=np.int64), counts)
    return ImageSplit(name=name, classes=dirs, labels=labels, paths=paths, source=str(folder))


def load_imagenet(root: str | Path | None = None) -> dict[str, ImageSplit]:
    """ImageNet ``{"train", "val"}`` with ``paths`` (lazily read) and labels = index of the sorted wnid."""
    base = dataset_root("imagenet", root)
    if not base.is_dir():
        raise _err(f"ImageNet: missing folder {base}.", base, f"extract ILSVRC2012 into {base}/ ({SOURCE}).")
    train = _split(base, "train", None)
    return {"train": train, "val": _split(base, "val", train.classes)}
