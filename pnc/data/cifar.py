"""CIFAR-10 / CIFAR-100 (python version) loader, plus the file helpers the other real loaders share.

pnc reads the pickles itself (torchvision checks every file's md5, which small test fixtures
always fail) with a restricted unpickler that only rebuilds numpy arrays, lists, dicts and
strings. Layout under the root (default ``$PNC_DATA_ROOT/cifar10`` or ``data/raw/cifar10``)::

    cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    cifar-100-python/{train, test, meta}

md5 rule (``verify_md5="auto"``): a data file whose row count equals the real file's (10,000 per
CIFAR-10 batch; 50,000 / 10,000 for CIFAR-100 train / test) must match its published md5; the
meta file is checked when every data file looked real. Smaller files (fixtures, subsets) are not
checked. ``verify_md5=True`` checks every file, ``False`` none. The names of the checked files
are recorded in ``split.meta["md5_verified"]``.
"""
from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pnc.catalog import DATASETS
from pnc.data.base import DATA_ROOT_ENV, ImageSplit, data_root
from pnc.errors import DataError

# -------------------------------- Shared helpers for every real loader: default roots, error messages, safe unpickling.
README_SECTION = "see README.md section 'Real datasets' and docs/datasets.md"


def dataset_root(dataset: str, root: str | Path | None) -> Path:
    """``root`` if given, else ``data_root() / catalog.DATASETS[dataset].raw_dir``."""
    if root is not None:
        return Path(root).expanduser()
    return data_root() / DATASETS[dataset].raw_dir


def found(path: Path, *, limit: int = 12) -> str:
    """What exists at or above ``path``: its entries, or the nearest existing ancestor's."""
    path = Path(path)
    probe, missing = path, False
    while not probe.exists() and probe != probe.parent:
        probe, missing = probe.parent, True
    if not probe.exists():
        return f"{path} does not exist"
    if probe.is_file():
        return f"{probe} is a file of {probe.stat().st_size} bytes"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in probe.iterdir() if not p.name.startswith("."))
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
    head = f"{path} does not exist; nearest existing folder {probe.resolve()}/ holds" if missing else f"{probe}/ holds"
    return f"{head}: {shown or 'nothing'}"


def data_error(problem: str, *, dataset: str, layout: str, found: str | None = None, fix: str) -> DataError:
    """A :class:`DataError` naming the problem, the expected layout, what exists and the fix."""
    raw = DATASETS[dataset].raw_dir
    lines = [problem, "Expected layout:", layout.rstrip()]
    if found:
        lines.append(f"Found: {found}")
    lines.append(
        f"Fix: {fix} pnc looks under $PNC_DATA_ROOT/{raw}/ (default data/raw/{raw}/) unless a root is "
        f"given explicitly; set {DATA_ROOT_ENV} to the folder that holds '{raw}/' if the data lives "
        f"elsewhere; {README_SECTION}."
    )
    return DataError("\n".join(lines))


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("codecs").encode,  # bytes under pickle protocol 2
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


NUMPY_GLOBALS = _numpy_globals()


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle refers to a class or function outside numpy's array reconstruction."""


class NumpyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only builtin containers and numpy arrays / dtypes / scalars.

    Anything else (torch tensors, arbitrary callables) raises :class:`ForbiddenGlobal`, so a
    tampered file cannot run code, unlike ``pickle.load`` or ``torch.load(weights_only=False)``.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return NUMPY_GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(f"refers to {module}.{name}, which pnc does not unpickle") from None


def unpickle(raw: bytes) -> Any:
    """Load ``raw`` pickle bytes with :class:`NumpyUnpickler` (``encoding="latin1"`` for Python 2 pickles).

    Raises ``pickle.UnpicklingError`` (or ``EOFError``/``ValueError``...) for broken input; callers
    turn these into :class:`DataError` with context.
    """
    return NumpyUnpickler(io.BytesIO(raw), encoding="latin1").load()


UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                   IndexError, KeyError, ImportError, UnicodeDecodeError, OverflowError, MemoryError)


def str_keys(obj: dict) -> dict[str, Any]:
    """Dict with bytes keys (pickles read with ``encoding="bytes"`` semantics) decoded to str."""
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def as_str(x: Any) -> str:
    return x.decode("latin1") if isinstance(x, bytes) else str(x)


# ----------------------------------------------------------------------------- CIFAR
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

CIFAR_MD5: dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
# Rows in the real data files: a file with this many rows is treated as real by verify_md5="auto".
CIFAR_REAL_ROWS: dict[str, int] = {
    **{f"data_batch_{i}": 10000 for i in range(1, 6)}, "test_batch": 10000, "train": 50000, "test": 10000,
}

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
CIFAR10_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR100_SPLITS = {"train": ["train"], "test": ["test"]}

CIFAR10_LAYOUT = """\
  {root}/
  └── cifar-10-batches-py/          (extracted from cifar-10-python.tar.gz)
      ├── data_batch_1 ... data_batch_5
      ├── test_batch
      └── batches.meta
  each data file: a pickled dict with 'data' uint8 (N, 3072) in CHW order and 'labels' (N ints)"""
CIFAR100_LAYOUT = """\
  {root}/
  └── cifar-100-python/             (extracted from cifar-100-python.tar.gz)
      ├── train
      ├── test
      └── meta
  each data file: a pickled dict with 'data' uint8 (N, 3072) in CHW order, 'fine_labels', 'coarse_labels'"""
CIFAR_TITLE = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
CIFAR_URL = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
             "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}

VerifyMd5 = Literal["auto"] | bool


def _cifar_fix(dataset: str, root: Path) -> str:
    return f"download {CIFAR_URL[dataset]} and extract it into {root}/ (it creates the folder shown)."


def _read_cifar_file(path: Path, *, dataset: str, root: Path, layout: str) -> tuple[dict[str, Any], bytes]:
    """Read one CIFAR pickle into a str-keyed dict (plus its raw bytes for the md5)."""
    raw = path.read_bytes()
    try:
        obj = unpickle(raw)
    except UNPICKLE_ERRORS as e:
        raise data_error(
            f"{path}: cannot unpickle ({type(e).__name__}: {e}); the file is truncated or not a CIFAR pickle "
            f"({len(raw)} bytes).",
            dataset=dataset, layout=layout.format(root=root), found=found(path.parent),
            fix=f"delete {path} and re-extract it: {_cifar_fix(dataset, root)}",
        ) from None
    if not isinstance(obj, dict):
        raise data_error(
            f"{path}: expected a pickled dict, got {type(obj).__name__}.",
            dataset=dataset, layout=layout.format(root=root), found=found(path.parent),
            fix=f"replace {path} with the original file: {_cifar_fix(dataset, root)}",
        )
    return str_keys(obj), raw


def _labels(d: dict[str, Any], key: str, n: int, num_classes: int, path: Path, *,
            dataset: str, root: Path, layout: str) -> np.ndarray:
    """Validated int64 label vector ``d[key]`` of length ``n`` with values in [0, num_classes)."""
    fix = f"replace {path} with the original file: {_cifar_fix(dataset, root)}"
    err = dict(dataset=dataset, layout=layout.format(root=root), fix=fix)
    if key not in d:
        raise data_error(f"{path}: the pickled dict has no '{key}' key (keys: {', '.join(sorted(map(str, d)))}).", **err)
    y = np.asarray(d[key])
    if y.ndim != 1 or not (y.dtype.kind in "iu" or y.size == 0):
        raise data_error(f"{path}: '{key}' must be a list of ints, got {y.dtype} with shape {y.shape}.", **err)
    if len(y) != n:
        raise data_error(f"{path}: {len(y)} labels in '{key}' but {n} images in 'data'.", **err)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise data_error(
            f"{path}: labels in '{key}' out of range: found {int(y.min())}..{int(y.max())}, expected 0..{num_classes - 1}.", **err)
    return y.astype(np.int64)


def _images(d: dict[str, Any], path: Path, *, dataset: str, root: Path, layout: str) -> np.ndarray:
    """Validated ``data`` (N, 3072) uint8 CHW rows -> (N, 32, 32, 3) uint8 HWC."""
    err = dict(dataset=dataset, layout=layout.format(root=root),
               fix=f"replace {path} with the original file: {_cifar_fix(dataset, root)}")
    if "data" not in d:
        raise data_error(f"{path}: the pickled dict has no 'data' key (keys: {', '.join(sorted(map(str, d)))}).", **err)
    x = d["data"]
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != 3072 or x.dtype != np.uint8:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise data_error(f"{path}: 'data' must be uint8 with shape (N, 3072) (3 x 32 x 32, CHW), got {desc}.", **err)
    return np.ascontiguousarray(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _class_names(meta: dict[str, Any], key: str, path: Path, *, dataset: str, root: Path, layout: str) -> list[str]:
    if key not in meta or not isinstance(meta[key], (list, tuple)) or not meta[key]:
        raise data_error(
            f"{path}: expected a list of class names under '{key}' (keys: {', '.join(sorted(map(str, meta)))}).",
            dataset=dataset, layout=layout.format(root=root),
            fix=f"replace {path} with the original file: {_cifar_fix(dataset, root)}")
    return [as_str(c) for c in meta[key]]


def _check_md5(name: str, raw: bytes, path: Path, *, dataset: str, root: Path, layout: str) -> None:
    got = hashlib.md5(raw).hexdigest()
    if got != CIFAR_MD5[name]:
        raise data_error(
            f"{path}: md5 {got} differs from the published {CIFAR_MD5[name]} (the file holds as many rows as the "
            f"real one, so pnc checks it).",
            dataset=dataset, layout=layout.format(root=root), found=found(path.parent),
            fix=f"re-download and extract the archive ({CIFAR_URL[dataset]}); if you changed the files on "
                f"purpose, pass verify_md5=False.")


def _load_cifar(dataset: str, root: str | Path | None, folder: str, splits: dict[str, list[str]],
                meta_file: str, label_key: str, names_key: str, layout: str,
                verify_md5: VerifyMd5) -> dict[str, ImageSplit]:
    if verify_md5 not in ("auto", True, False):
        raise ValueError(f"verify_md5 must be 'auto', True or False, got {verify_md5!r}")
    base = dataset_root(dataset, root)
    top = base / folder
    needed = [meta_file] + [f for files in splits.values() for f in files]
    missing = [f for f in needed if not (top / f).is_file()]
    if missing:
        what = f"folder {top}" if not top.is_dir() else f"file(s) {', '.join(str(top / f) for f in missing)}"
        raise data_error(f"{CIFAR_TITLE[dataset]}: missing {what}.", dataset=dataset,
                         layout=layout.format(root=base), found=found(top), fix=_cifar_fix(dataset, base))
    ctx = dict(dataset=dataset, root=base, layout=layout)
    meta, meta_raw = _read_cifar_file(top / meta_file, **ctx)
    classes = _class_names(meta, names_key, top / meta_file, **ctx)
    verified: list[str] = []
    all_real = True
    out: dict[str, ImageSplit] = {}
    for split, files in splits.items():
        xs, ys = [], []
        for f in files:
            d, raw = _read_cifar_file(top / f, **ctx)
            x = _images(d, top / f, **ctx)
            ys.append(_labels(d, label_key, len(x), len(classes), top / f, **ctx))
            xs.append(x)
            looks_real = len(x) == CIFAR_REAL_ROWS[f]
            all_real &= looks_real
            if verify_md5 is True or (verify_md5 == "auto" and looks_real):
                _check_md5(f, raw, top / f, **ctx)
                verified.append(f)
        out[split] = ImageSplit(name=split, classes=classes, labels=np.concatenate(ys),
                                images=np.concatenate(xs) if len(xs) > 1 else xs[0],
                                source=str(top), meta={"files": files, "label": label_key})
    if verify_md5 is True or (verify_md5 == "auto" and all_real):
        _check_md5(meta_file, meta_raw, top / meta_file, **ctx)
        verified.append(meta_file)
    for s in out.values():
        s.meta["md5_verified"] = list(verified)
    return out


def load_cifar10(root: str | Path | None = None, *, verify_md5: VerifyMd5 = "auto") -> dict[str, ImageSplit]:
    """CIFAR-10 ``{"train": 50,000, "test": 10,000}`` as uint8 (N, 32, 32, 3), labels 0..9.

    ``root`` holds ``cifar-10-batches-py/`` (default ``data_root()/cifar10``). Training order is
    data_batch_1..5 concatenated (the order CIFAR-10N's labels follow). See the module docstring
    for the md5 rule.
    """
    return _load_cifar("cifar10", root, CIFAR10_DIR, CIFAR10_SPLITS, "batches.meta", "labels",
                       "label_names", CIFAR10_LAYOUT, verify_md5)


def load_cifar100(root: str | Path | None = None, *, label: Literal["fine", "coarse"] = "fine",
                  verify_md5: VerifyMd5 = "auto") -> dict[str, ImageSplit]:
    """CIFAR-100 ``{"train": 50,000, "test": 10,000}`` with ``fine`` (100) or ``coarse`` (20) labels.

    ``root`` holds ``cifar-100-python/`` (default ``data_root()/cifar100``).
    """
    if label not in ("fine", "coarse"):
        raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
    return _load_cifar("cifar100", root, CIFAR100_DIR, CIFAR100_SPLITS, "meta", f"{label}_labels",
                       f"{label}_label_names", CIFAR100_LAYOUT, verify_md5)
