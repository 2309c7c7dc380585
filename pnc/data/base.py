"""The in-memory/on-disk representation every pnc dataset loader returns.

A loader returns :class:`ImageSplit` objects: class names, an int64 label vector, and either
all images in memory (``images``: uint8, N x H x W x C) or a list of image files (``paths``)
read lazily. Everything downstream (derived noisy splits, torch datasets, digests) works on
this one type, so a new dataset only needs a loader that produces it.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

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

    def subset(self, index: Sequence[int] | np.ndarray, name: str | None = None) -> ImageSplit:
        index = np.asarray(index, dtype=np.int64)
        return replace(
            self,
            name=name or self.name,
            labels=self.labels[index],
            images=None if self.images is None else self.images[index],
            paths=None if self.paths is None else [self.paths[i] for i in index],
        )

    def with_labels(self, labels: np.ndarray, name: str | None = None) -> ImageSplit:
        return replace(self, name=name or self.name, labels=np.asarray(labels, dtype=np.int64))

    def digest(self) -> str:
        """sha256 of the labels and the image bytes.

        In-memory splits hash the pixel array; on-disk splits (``paths``) hash every file's contents
        (md5 per file, as DVC does, cached by :func:`file_md5s`), in order. File paths are not part of
        the digest: the same data under another data root has the same digest.
        """
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.labels).tobytes())
        if self.images is not None:
            h.update(str(self.images.shape).encode())
            h.update(np.ascontiguousarray(self.images).tobytes())
        else:
            h.update(b"files:md5\0")
            for m in file_md5s(self.paths):
                h.update(m.encode() + b"\n")
        return h.hexdigest()


# ----------------------------------------------------------------------------- per-file content hashes
HASH_CACHE_ENV = "PNC_HASH_CACHE"
_RACY_NS = 2_000_000_000  # files modified this recently are hashed but not cached (a same-tick rewrite is invisible)
_SQL_CHUNK = 500


def stratified_split(labels: np.ndarray, n_first: int | Sequence[int] | np.ndarray,
                     seed: int | np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-class split, the one every loader and study uses: for each class c (increasing label order) its samples in
    a random order (one ``permutation`` per class drawn from ``seed``, an int or a Generator; file order when None),
    of which the first ``n_first[c]`` (an int: the same for every class, capped at the class size) go to the first
    index array and the rest to the second. Both are returned sorted. Written here, not with scikit-learn's
    ``train_test_split``, so that no library upgrade changes a split."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed) if isinstance(seed, int | np.integer) else seed
    first, rest = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if rng is not None:
            idx = idx[rng.permutation(len(idx))]
        k = int(n_first) if np.ndim(n_first) == 0 else int(np.asarray(n_first)[c])
        first.append(idx[:k])
        rest.append(idx[k:])
    empty = np.zeros(0, dtype=np.int64)
    return (np.sort(np.concatenate(first)) if first else empty), (np.sort(np.concatenate(rest)) if rest else empty)


def hash_cache_dir() -> Path:
    """Folder of the per-file hash cache: ``$PNC_HASH_CACHE`` or ``.pnc/hash-cache`` in the working directory."""
    env = os.environ.get(HASH_CACHE_ENV)
    return Path(env).expanduser() if env else Path(".pnc") / "hash-cache"


def _file_md5(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def _open_cache(folder: Path):
    """The cache database (sqlite, WAL, shared by concurrent processes), or None where it cannot be opened."""
    import sqlite3

    try:
        folder.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(folder / "files.sqlite", timeout=30)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, "
                    "mtime_ns INTEGER NOT NULL, md5 TEXT NOT NULL)")
        return con
    except (OSError, sqlite3.Error):
        return None  # read-only or broken cache folder: hash without a cache (correct, only slower)


def file_md5s(paths: Sequence[str | Path], *, cache: Path | None = None) -> list[str]:
    """md5 of each file's contents, in order.

    A per-file cache keyed on (absolute path, size, mtime_ns), like DVC's state database, lives in
    ``cache`` (default :func:`hash_cache_dir`): files whose key is unchanged are not read again, so
    re-hashing an ImageNet-sized folder costs one ``stat`` per file. Raises OSError (naming the file)
    when a file is missing or unreadable.
    """
    import sqlite3
    import time

    keys = [(ap, st.st_size, st.st_mtime_ns) for ap in map(os.path.abspath, paths) for st in [os.stat(ap)]]
    con = _open_cache(hash_cache_dir() if cache is None else Path(cache))
    known: dict[str, tuple[int, int, str]] = {}
    if con is not None:
        try:
            uniq = list(dict.fromkeys(k[0] for k in keys))
            for i in range(0, len(uniq), _SQL_CHUNK):
                part = uniq[i:i + _SQL_CHUNK]
                rows = con.execute(f"SELECT path, size, mtime_ns, md5 FROM files WHERE path IN ({','.join('?' * len(part))})", part)
                known.update((r[0], (r[1], r[2], r[3])) for r in rows)
        except sqlite3.Error:
            known = {}
    todo = {ap: (size, mtime) for ap, size, mtime in keys if known.get(ap, ())[:2] != (size, mtime)}  # new or changed
    if todo:
        names = list(todo)
        if len(names) > 64:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                sums = dict(zip(names, pool.map(_file_md5, names)))
        else:
            sums = {n: _file_md5(n) for n in names}
        if con is not None:
            now = time.time_ns()
            rows = []
            for n in names:
                size, mtime = todo[n]
                try:
                    st = os.stat(n)
                except OSError:
                    continue
                if (st.st_size, st.st_mtime_ns) == (size, mtime) and now - mtime > _RACY_NS:  # unchanged while read
                    rows.append((n, size, mtime, sums[n]))
            try:
                with con:
                    con.executemany("INSERT OR REPLACE INTO files (path, size, mtime_ns, md5) VALUES (?, ?, ?, ?)", rows)
            except sqlite3.Error:
                pass  # another process holds the cache too long: the hashes are still correct, only not cached
    if con is not None:
        con.close()
    return [sums[ap] if ap in todo else known[ap][2] for ap, _, _ in keys]


def dvc_tracking(folder: str | Path) -> dict | None:
    """The ``.dvc`` file (written by ``dvc add``) that tracks ``folder`` or a folder above it, with its md5.

    Returns ``{"dvc_file": path, "dvc_md5": md5}`` (md5 None when the file cannot be read), or None.
    """
    p = Path(folder)
    for d in (p, *p.parents):
        if d.name in ("", ".", ".."):
            break
        f = d.with_name(d.name + ".dvc")
        if f.is_file():
            md5 = None
            try:
                import yaml

                outs = (yaml.safe_load(f.read_text()) or {}).get("outs") or []
                md5 = next((o.get("md5") for o in outs if isinstance(o, dict) and Path(str(o.get("path", ""))).name == d.name), None)
            except Exception:  # noqa: BLE001 - a broken .dvc file: report it without its hash
                pass
            return {"dvc_file": f.as_posix(), "dvc_md5": md5}
    return None
