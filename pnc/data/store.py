"""On-disk format of one materialised split (embedded or derived), written by DVC stages.

A split folder holds::

    images.npy         uint8 N x H x W x C   (or paths.json: a JSON list of image files)
    labels.npy         int64 N               the labels to train/evaluate on
    clean_labels.npy   int64 N               only when the split carries ``meta["clean_labels"]``
    classes.json       JSON list of class names
    manifest.json      the caller's manifest + ``format_version``, ``contents`` (name, source,
                       num_samples, image shape), ``files`` (sha256 of each data file) and
                       ``digest`` (:func:`split_digest`); sorted keys, no timestamps

Writing is atomic (everything goes into a temporary folder beside the target, which is then
renamed into place; an old folder is swapped out only once the new one is complete) and
byte-deterministic (same split and manifest -> same bytes). Reading validates every file and
raises :class:`pnc.errors.DataError` naming the file and the fix.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pnc.data.base import ImageSplit
from pnc.errors import DataError

FORMAT_VERSION = 1
IMAGES, PATHS, LABELS, CLEAN_LABELS, CLASSES, MANIFEST = (
    "images.npy", "paths.json", "labels.npy", "clean_labels.npy", "classes.json", "manifest.json")
# Order of the data files in split_digest (manifest.json is excluded: it holds the digest).
DATA_FILES: tuple[str, ...] = (IMAGES, PATHS, LABELS, CLEAN_LABELS, CLASSES)
_FIX = "delete the folder and re-create it (`dvc repro`)"


def _jsonable(obj: Any, where: str = "manifest") -> Any:
    """Plain JSON types for ``obj`` (numpy scalars/arrays, tuples, Paths converted)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist(), where)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        if not math.isfinite(f):
            raise ValueError(f"{where}: {f} cannot be stored in JSON")
        return f
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return obj.as_posix()
    raise TypeError(f"{where}: {type(obj).__name__} is not JSON-serialisable")


def _dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digest_of(files: Mapping[str, str]) -> str:
    """Combine per-file sha256 hex digests in :data:`DATA_FILES` order."""
    h = hashlib.sha256()
    for name in DATA_FILES:
        if name in files:
            h.update(name.encode() + b"\0" + files[name].encode() + b"\n")
    return h.hexdigest()


def split_digest(dir: str | Path) -> str:
    """sha256 over the data files of a split folder (names and contents, fixed order)."""
    d = Path(dir)
    return _digest_of({n: _file_sha256(d / n) for n in DATA_FILES if (d / n).is_file()})


def _save_npy(path: Path, a: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(a), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _save_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_split(dir: str | Path, split: ImageSplit, manifest: Mapping[str, Any]) -> Path:
    """Write ``split`` to folder ``dir`` atomically; returns ``dir``.

    ``split.meta["clean_labels"]`` (if present) is written to ``clean_labels.npy``. The written
    ``manifest.json`` is ``manifest`` plus the keys ``format_version``, ``contents``, ``files`` and
    ``digest`` (these four are set here and override the caller's).
    """
    target = Path(dir)
    labels = np.asarray(split.labels, dtype=np.int64)
    clean = split.meta.get("clean_labels")
    if clean is not None:
        clean = np.asarray(clean, dtype=np.int64)
        if clean.shape != labels.shape:
            raise ValueError(f"{split.name}: clean_labels shape {clean.shape} != labels shape {labels.shape}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old: Path | None = None
    try:
        if split.images is not None:
            _save_npy(tmp / IMAGES, split.images)
            shape = list(split.images.shape[1:])
        else:
            _save_bytes(tmp / PATHS, _dump_json([Path(p).as_posix() for p in split.paths]))
            shape = None
        _save_npy(tmp / LABELS, labels)
        if clean is not None:
            _save_npy(tmp / CLEAN_LABELS, clean)
        _save_bytes(tmp / CLASSES, _dump_json(list(split.classes)))
        files = {n: _file_sha256(tmp / n) for n in DATA_FILES if (tmp / n).is_file()}
        full = dict(_jsonable(dict(manifest)))
        full.update(
            format_version=FORMAT_VERSION,
            contents={"name": split.name, "source": split.source, "num_samples": len(labels), "image_shape": shape},
            files=files,
            digest=_digest_of(files),
        )
        _save_bytes(tmp / MANIFEST, _dump_json(full))
        _umask_permissions(tmp)
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rmdir(old)
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.rename(old, target)
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _umask_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders: give the folder and its files the modes a plain mkdir/open would (the umask's),
    so that a split written on a shared lab disk is readable by the lab."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~mask)


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: file missing; {_FIX}.")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e}); {_FIX}.") from None


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: file missing; {_FIX}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); {_FIX}.") from None


def read_manifest(dir: str | Path) -> dict:
    """The ``manifest.json`` of a split folder (validated to be a JSON object of this format)."""
    d = Path(dir)
    if not d.is_dir():
        raise DataError(f"{d}: split folder does not exist; create it with `dvc repro` "
                        f"(or `pnc` for the study that needs it).")
    manifest = _load_json(d / MANIFEST)
    if not isinstance(manifest, dict):
        raise DataError(f"{d / MANIFEST}: expected a JSON object; {_FIX}.")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{d / MANIFEST}: format_version {version!r}, this pnc reads {FORMAT_VERSION}; {_FIX}.")
    return manifest


def read_split(dir: str | Path, *, verify: bool = True) -> ImageSplit:
    """Read a split folder written by :func:`write_split`.

    With ``verify`` (default) every data file's sha256 is checked against the manifest. The
    returned split has ``meta = {"manifest": ..., "path": str(dir)}`` plus ``clean_labels``
    when the folder has them. Raises :class:`DataError` naming the file and the fix.
    """
    d = Path(dir)
    manifest = read_manifest(d)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise DataError(f"{d / MANIFEST}: no 'files' table; {_FIX}.")
    for name in files:
        if name not in DATA_FILES:
            raise DataError(f"{d / MANIFEST}: unknown data file {name!r}; {_FIX}.")
        if not (d / name).is_file():
            raise DataError(f"{d / name}: file missing; {_FIX}.")
        if verify and _file_sha256(d / name) != files[name]:
            raise DataError(f"{d / name}: contents do not match the sha256 in manifest.json "
                            f"(changed or truncated); {_FIX}.")
    classes = _load_json(d / CLASSES)
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{d / CLASSES}: expected a non-empty JSON list of class names; {_FIX}.")
    labels = _load_npy(d / LABELS)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{d / LABELS}: expected a 1-D integer array, got {labels.dtype} {labels.shape}; {_FIX}.")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{d / LABELS}: labels outside 0..{len(classes) - 1} "
                        f"(classes.json lists {len(classes)} classes); {_FIX}.")
    images = paths = None
    if IMAGES in files:
        images = _load_npy(d / IMAGES)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DataError(f"{d / IMAGES}: expected uint8 N x H x W x C (C = 1 or 3), "
                            f"got {images.dtype} {images.shape}; {_FIX}.")
        n = len(images)
    elif PATHS in files:
        raw = _load_json(d / PATHS)
        if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
            raise DataError(f"{d / PATHS}: expected a JSON list of file paths; {_FIX}.")
        paths = [Path(p) for p in raw]
        n = len(paths)
    else:
        raise DataError(f"{d}: neither {IMAGES} nor {PATHS} is listed in manifest.json; {_FIX}.")
    if n != len(labels):
        raise DataError(f"{d}: {n} images but {len(labels)} labels in {LABELS}; {_FIX}.")
    meta: dict[str, Any] = {"manifest": manifest, "path": str(d)}
    if CLEAN_LABELS in files:
        clean = _load_npy(d / CLEAN_LABELS)
        if clean.shape != labels.shape or clean.dtype.kind not in "iu":
            raise DataError(f"{d / CLEAN_LABELS}: expected {labels.shape} integers like {LABELS}, "
                            f"got {clean.dtype} {clean.shape}; {_FIX}.")
        meta["clean_labels"] = clean.astype(np.int64)
    info = manifest.get("contents") or {}
    return ImageSplit(name=str(info.get("name", d.name)), classes=classes, labels=labels.astype(np.int64),
                      images=images, paths=paths, source=str(info.get("source", "")), meta=meta)
