"""CIFAR-10N / CIFAR-100N human label sets (Wei et al. 2022), read without arbitrary unpickling.

``CIFAR-10_human.pt`` / ``CIFAR-100_human.pt`` are zip-format ``torch.save`` files of a dict of
numpy int64 arrays (50,000 labels in CIFAR training order). ``torch.load`` would need
``weights_only=False`` (it would run any code a tampered file names), so pnc opens the zip,
reads the inner ``data.pkl`` and unpickles it with :class:`pnc.data.cifar.NumpyUnpickler`, which
rebuilds numpy arrays and nothing else. Only if the file stores torch tensors (or is a legacy
non-zip torch file) does pnc fall back to ``torch.load(weights_only=True)``, still the safe mode.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pnc.catalog import DATASETS
from pnc.data.base import data_root
from pnc.data.cifar import NUMPY_GLOBALS, UNPICKLE_ERRORS, ForbiddenGlobal, data_error, found, str_keys, unpickle

CIFAR_N_FILES = {"cifar10": "CIFAR-10_human.pt", "cifar100": "CIFAR-100_human.pt"}
# Keys of the published files -> pnc's label-set names (catalog.DATASETS[...].label_sets).
CIFAR_N_KEYS: dict[str, dict[str, str]] = {
    "cifar10": {"clean_label": "clean", "aggre_label": "aggre", "random_label1": "random1",
                "random_label2": "random2", "random_label3": "random3", "worse_label": "worse"},
    "cifar100": {"clean_label": "clean", "noisy_label": "noisy"},
}
CIFAR_N_LENGTH = 50000
CIFAR_N_URL = "https://github.com/UCSC-REAL/cifar-10-100n (folder data/)"

LAYOUT = """\
  {root}/
  ├── {cifar_dir}/                (the CIFAR python pickles)
  └── {file}             (from {url})
  a zip-format torch.save of a dict of numpy int64 arrays of length 50000:
  {keys}"""


def _layout(dataset: str, path: Path) -> str:
    cifar_dir = "cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python"
    return LAYOUT.format(root=path.parent, cifar_dir=cifar_dir, file=CIFAR_N_FILES[dataset], url=CIFAR_N_URL,
                         keys=", ".join(CIFAR_N_KEYS[dataset]))


def _read_pt(path: Path, dataset: str) -> Any:
    """The object pickled in a zip-format torch file, loaded with the numpy-only unpickler."""
    err = dict(dataset=dataset, layout=_layout(dataset, path), found=found(path.parent),
               fix=f"download {CIFAR_N_FILES[dataset]} again from {CIFAR_N_URL} into {path.parent}/.")
    if not zipfile.is_zipfile(path):
        raise data_error(f"{path}: not a zip-format torch.save file ({path.stat().st_size} bytes); it is corrupted "
                         f"or truncated.", **err)
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if not names:
                raise data_error(f"{path}: zip file without a data.pkl (entries: {', '.join(z.namelist()[:8])}); "
                                 f"not a torch.save file.", **err)
            raw = z.read(names[0])
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise data_error(f"{path}: broken zip archive ({e}); it is corrupted or truncated.", **err) from None
    try:
        return unpickle(raw)
    except ForbiddenGlobal as e:
        forbidden = str(e)  # e.g. torch tensors instead of numpy arrays: try torch's safe loader
    except UNPICKLE_ERRORS as e:
        raise data_error(f"{path}: data.pkl cannot be unpickled ({type(e).__name__}: {e}); it is corrupted or "
                         f"truncated.", **err) from None
    return _torch_load(path, forbidden, err)


def _torch_load(path: Path, forbidden: str, err: dict) -> Any:
    """Fallback when data.pkl holds more than numpy arrays (e.g. tensors): ``torch.load(weights_only=True)``.

    weights_only=True rebuilds tensors and the numpy globals allowed here but no arbitrary object,
    so a tampered file still cannot run code. pnc never uses weights_only=False.
    """
    import torch

    try:
        with torch.serialization.safe_globals(list({id(v): v for v in NUMPY_GLOBALS.values()}.values())):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises many types (UnpicklingError, RuntimeError, EOFError...)
        raise data_error(f"{path}: data.pkl {forbidden}, and torch.load(weights_only=True) refuses it too; pnc "
                         f"only reads dicts of numpy arrays or tensors and never unpickles arbitrary objects.",
                         **err) from None


def load_cifar_n(path: str | Path | None = None, *, dataset: Literal["cifar10", "cifar100"] = "cifar10",
                 train_labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Human label sets ``{name: int64 (N,)}`` with pnc's names (``clean``, ``aggre``, ``random1``..).

    ``path`` is the ``.pt`` file or the folder holding it (default
    ``data_root()/<cifar10|cifar100>/CIFAR-10_human.pt`` / ``CIFAR-100_human.pt``). Each array must
    have ``len(train_labels)`` entries (50,000 when ``train_labels`` is None) and valid class
    indices; with ``train_labels`` given, ``clean`` must equal them in order. Extra keys holding
    label arrays of the same length are kept with the ``_label`` suffix dropped (e.g. CIFAR-100N's
    ``noisy_coarse_label`` -> ``noisy_coarse``); other extra keys are ignored.
    """
    if dataset not in CIFAR_N_FILES:
        raise ValueError(f"dataset must be 'cifar10' or 'cifar100', got {dataset!r}")
    fname = CIFAR_N_FILES[dataset]
    p = data_root() / DATASETS[dataset].raw_dir / fname if path is None else Path(path).expanduser()
    if p.is_dir() or (not p.exists() and p.suffix != ".pt"):
        p = p / fname
    if not p.is_file():
        title = "CIFAR-10N" if dataset == "cifar10" else "CIFAR-100N"
        raise data_error(f"{title}: missing file {p}.", dataset=dataset, layout=_layout(dataset, p),
                         found=found(p.parent), fix=f"download {fname} from {CIFAR_N_URL} into {p.parent}/.")
    obj = _read_pt(p, dataset)
    err = dict(dataset=dataset, layout=_layout(dataset, p),
               fix=f"download {fname} again from {CIFAR_N_URL} into {p.parent}/.")
    if not isinstance(obj, dict):
        raise data_error(f"{p}: expected a dict of label arrays, got {type(obj).__name__}.", **err)
    obj = str_keys(obj)
    keys = CIFAR_N_KEYS[dataset]
    missing = [k for k in keys if k not in obj]
    if missing:
        raise data_error(f"{p}: missing key(s) {', '.join(missing)}; found keys: {', '.join(sorted(obj))}.", **err)
    n = CIFAR_N_LENGTH if train_labels is None else len(train_labels)
    num_classes = DATASETS[dataset].num_classes
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        y = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
        if key not in keys:  # extra sets (CIFAR-100N coarse labels): kept when they fit, else ignored
            if y.ndim == 1 and y.dtype.kind in "iu" and len(y) == n:
                out[str(key).removesuffix("_label")] = y.astype(np.int64)
            continue
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise data_error(f"{p}: '{key}' must be a 1-D integer array, got {y.dtype} {y.shape}.", **err)
        if len(y) != n:
            where = "the CIFAR training set" if train_labels is not None else "CIFAR's training set (50000)"
            raise data_error(f"{p}: '{key}' has {len(y)} labels, {where} has {n}.", **err)
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise data_error(f"{p}: '{key}' values {int(y.min())}..{int(y.max())} outside 0..{num_classes - 1}.", **err)
        out[keys[key]] = y.astype(np.int64)
    if train_labels is not None:
        t = np.asarray(train_labels)
        bad = np.flatnonzero(out["clean"] != t)
        if bad.size:
            raise data_error(
                f"{p}: 'clean_label' differs from the CIFAR training labels at {bad.size} of {n} positions "
                f"(first at index {int(bad[0])}: {int(out['clean'][bad[0]])} in the file vs {int(t[bad[0]])} in "
                f"CIFAR); the label file must follow the python training order (data_batch_1..5 concatenated).",
                dataset=dataset, layout=_layout(dataset, p),
                fix=f"use the official {fname} from {CIFAR_N_URL} with the original CIFAR python pickles (not a "
                    f"re-ordered or re-exported copy of either).")
    return out


def noise_rates(label_sets: dict[str, np.ndarray]) -> dict[str, float]:
    """Fraction of labels differing from ``clean`` for each label set (CIFAR-10N: aggre 9.01%, worse 40.21%).

    Coarse sets (``*coarse*``) are compared with ``clean_coarse`` when present, else skipped.
    """
    ref = {k: label_sets.get("clean_coarse") if "coarse" in k else label_sets["clean"] for k in label_sets}
    return {k: float(np.mean(v != ref[k])) for k, v in label_sets.items() if ref[k] is not None and v.shape == ref[k].shape}
