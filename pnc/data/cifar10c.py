"""CIFAR-10-C (Hendrycks & Dietterich 2019): one corruption at one severity of the 10,000 test images.

Layout: ``<root>/<corruption>.npy`` uint8 (N, 32, 32, 3) and ``<root>/labels.npy`` (N,), where the
default root is ``data_root()/cifar10/CIFAR-10-C`` (the folder ``CIFAR-10-C.tar`` extracts to).
The real files have N = 50,000 = 5 severities x 10,000; rows ``[(s-1)*N/5, s*N/5)`` are severity
``s``. Any N divisible by 5 is accepted (small fixtures use e.g. N = 50). Files are memory-mapped;
only the requested severity block is copied into memory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pnc.catalog import CIFAR10C_CORRUPTIONS, DATASETS, MAX_SEVERITY
from pnc.data.base import ImageSplit, data_root
from pnc.data.cifar import CIFAR10_CLASSES, data_error, found
from pnc.errors import DataError, did_you_mean

CIFAR10C_DIR = "CIFAR-10-C"
CIFAR10C_URL = "https://zenodo.org/records/2535967 (CIFAR-10-C.tar)"
LAYOUT = """\
  {root}/                  (extracted from CIFAR-10-C.tar)
  ├── labels.npy           uint8 (50000,)
  ├── gaussian_noise.npy   uint8 (50000, 32, 32, 3): severities 1..5, 10000 rows each
  └── ... one <corruption>.npy for each of the 19 corruptions"""


def _open(path: Path, root: Path) -> np.ndarray:
    err = dict(dataset="cifar10", layout=LAYOUT.format(root=root), found=found(root))
    if not path.is_file():
        raise data_error(f"CIFAR-10-C: missing file {path}.",
                         fix=f"download {CIFAR10C_URL} and extract it so that {root}/ holds the .npy files.", **err)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise data_error(f"{path}: not a readable .npy array ({type(e).__name__}: {e}); truncated or corrupted.",
                         fix=f"delete {path} and extract it again from {CIFAR10C_URL}.", **err) from None


def load_cifar10c(root: str | Path | None = None, *, corruption: str, severity: int) -> ImageSplit:
    """The CIFAR-10 test images under ``corruption`` at ``severity`` (1..5): uint8 (N/5, 32, 32, 3), labels 0..9."""
    if corruption not in CIFAR10C_CORRUPTIONS:
        raise DataError(f"unknown CIFAR-10-C corruption {corruption!r}." + did_you_mean(corruption, CIFAR10C_CORRUPTIONS))
    if not (isinstance(severity, (int, np.integer)) and 1 <= severity <= MAX_SEVERITY):
        raise DataError(f"CIFAR-10-C severity must be an integer 1..{MAX_SEVERITY}, got {severity!r}.")
    base = Path(root).expanduser() if root is not None else data_root() / DATASETS["cifar10"].raw_dir / CIFAR10C_DIR
    xpath, ypath = base / f"{corruption}.npy", base / "labels.npy"
    x, y = _open(xpath, base), _open(ypath, base)
    fix = f"extract {xpath.name} and labels.npy again from {CIFAR10C_URL} into {base}/."
    err = dict(dataset="cifar10", layout=LAYOUT.format(root=base), fix=fix)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(x) == 0 or len(x) % MAX_SEVERITY:
        raise data_error(f"{xpath}: expected uint8 (N, 32, 32, 3) with N divisible by 5 (50000 in the real file), "
                         f"got {x.dtype} {x.shape}.", **err)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise data_error(f"{ypath}: expected integer labels of shape (N,), got {y.dtype} {y.shape}.", **err)
    if len(y) != len(x):
        raise data_error(f"{ypath}: {len(y)} labels but {xpath.name} has {len(x)} images.", **err)
    per = len(x) // MAX_SEVERITY
    rows = slice((severity - 1) * per, severity * per)
    labels = np.asarray(y[rows], dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise data_error(f"{ypath}: labels {int(labels.min())}..{int(labels.max())} outside 0..9.", **err)
    return ImageSplit(name=f"test_{corruption}_{severity}", classes=list(CIFAR10_CLASSES), labels=labels,
                      images=np.array(x[rows]), source=str(xpath),
                      meta={"corruption": corruption, "severity": int(severity), "rows": [rows.start, rows.stop]})
