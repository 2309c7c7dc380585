"""Writers of small fake datasets in exactly the real on-disk formats (docs/datasets.md, DATA.md).

Each ``write_*`` function creates the files a user would place under ``data/raw/<dataset>/`` (pass
that folder as ``root``) and returns what it wrote, so tests can compare the loaders' output with
the exact values. Images are random but seeded; JPEG datasets get real JPEG files written by PIL.
"""
from __future__ import annotations

import io
import pickle
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_FINE = [f"fine_{i:02d}" for i in range(100)]
CIFAR100_COARSE = [f"coarse_{i:02d}" for i in range(20)]
CIFAR10N_NOISE = {"aggre_label": 0.0901, "random_label1": 0.1723, "random_label2": 0.1812,
                  "random_label3": 0.1764, "worse_label": 0.4021}
CIFAR100N_NOISE = {"noisy_label": 0.4020}
KeyType = Literal["py2", "str", "bytes"]


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes what Python 2's cPickle wrote for the official CIFAR files: every str and bytes object
    as a Python 2 ``str`` (BINSTRING opcodes), numpy arrays via ``numpy.core.multiarray``."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: str | bytes) -> None:
        b = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(b) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _dump(path: Path, obj: dict, key_type: KeyType) -> None:
    """Pickle ``obj`` like the official files.

    ``py2``: byte-for-byte what Python 2 wrote (str keys when read with encoding="latin1");
    ``str``: a Python 3 pickle with str keys; ``bytes``: a Python 3 pickle with bytes keys (b"data").
    """
    if key_type == "py2":
        path.write_bytes(py2_pickle(obj))
        return
    if key_type == "bytes":
        obj = {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _cifar_batch(rng: np.random.Generator, n: int, label_keys: dict[str, int], name: str) -> tuple[dict, np.ndarray, dict]:
    """One CIFAR batch dict (data uint8 (n, 3072) CHW) plus the HWC images and the labels written."""
    hwc = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = {k: rng.integers(0, c, size=n).tolist() for k, c in label_keys.items()}
    d = {"batch_label": name, **labels,
         "data": np.ascontiguousarray(hwc.transpose(0, 3, 1, 2).reshape(n, 3072)),
         "filenames": [f"img_{i:05d}.png" for i in range(n)]}
    return d, hwc, {k: np.asarray(v, dtype=np.int64) for k, v in labels.items()}


def write_cifar10(root: str | Path, n_per_batch: int = 20, n_test: int | None = None, seed: int = 0,
                  key_type: KeyType = "py2") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``; returns {split: (HWC images, labels)}."""
    rng = np.random.default_rng(seed)
    top = Path(root) / "cifar-10-batches-py"
    top.mkdir(parents=True, exist_ok=True)
    _dump(top / "batches.meta", {"num_cases_per_batch": n_per_batch, "label_names": CIFAR10_NAMES,
                                 "num_vis": 3072}, key_type)
    out: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    files = [(f"data_batch_{i}", "train", n_per_batch) for i in range(1, 6)]
    files.append(("test_batch", "test", n_test or n_per_batch))
    for fname, split, n in files:
        d, hwc, labels = _cifar_batch(rng, n, {"labels": 10}, f"batch {fname}")
        _dump(top / fname, d, key_type)
        out[split][0].append(hwc)
        out[split][1].append(labels["labels"])
    return {s: (np.concatenate(x), np.concatenate(y)) for s, (x, y) in out.items()}


def write_cifar100(root: str | Path, n_train: int = 40, n_test: int = 20, seed: int = 0,
                   key_type: KeyType = "py2") -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``root/cifar-100-python/{train,test,meta}``; returns {split: (HWC images, fine labels, coarse labels)}."""
    rng = np.random.default_rng(seed)
    top = Path(root) / "cifar-100-python"
    top.mkdir(parents=True, exist_ok=True)
    _dump(top / "meta", {"fine_label_names": CIFAR100_FINE, "coarse_label_names": CIFAR100_COARSE}, key_type)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        d, hwc, labels = _cifar_batch(rng, n, {"fine_labels": 100, "coarse_labels": 20}, split)
        _dump(top / split, d, key_type)
        out[split] = (hwc, labels["fine_labels"], labels["coarse_labels"])
    return out


def noisy_copy(labels: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``labels`` with exactly ``round(rate * n)`` entries changed to a different class."""
    labels = np.asarray(labels, dtype=np.int64)
    idx = rng.choice(len(labels), size=int(round(rate * len(labels))), replace=False)
    out = labels.copy()
    out[idx] = (labels[idx] + rng.integers(1, num_classes, size=len(idx))) % num_classes
    return out


def write_cifar10n(path: str | Path, train_labels: np.ndarray, noise: dict[str, float] | None = None,
                   seed: int = 0, dataset: Literal["cifar10", "cifar100"] = "cifar10",
                   extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """``CIFAR-10_human.pt`` / ``CIFAR-100_human.pt``: ``torch.save`` (zip format) of a dict of numpy int64 arrays.

    ``path`` is the file or a folder (the official file name is appended). ``noise`` maps the
    published keys to noise rates (defaults: the published rates). Returns the dict written.
    """
    import torch

    path = Path(path)
    if path.suffix != ".pt":
        path = path / ("CIFAR-10_human.pt" if dataset == "cifar10" else "CIFAR-100_human.pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    num_classes = 10 if dataset == "cifar10" else 100
    noise = dict(CIFAR10N_NOISE if dataset == "cifar10" else CIFAR100N_NOISE) if noise is None else noise
    clean = np.asarray(train_labels, dtype=np.int64)
    d = {"clean_label": clean}
    d.update({k: noisy_copy(clean, r, num_classes, rng) for k, r in noise.items()})
    d.update(extra or {})
    torch.save(d, path)
    return d


def write_cifar10c(root: str | Path, corruptions: Iterable[str] = ("gaussian_noise",), n: int = 50,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """``root/<corruption>.npy`` uint8 (n, 32, 32, 3) and ``root/labels.npy`` uint8 (n,); n divisible by 5."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    labels = np.tile(rng.integers(0, 10, size=n // 5), 5).astype(np.uint8)  # same test labels per severity
    np.save(root / "labels.npy", labels)
    out = {"labels": labels}
    for c in corruptions:
        out[c] = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        np.save(root / f"{c}.npy", out[c])
    return out


def _jpeg(path: Path, rng: np.random.Generator, size: int) -> None:
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(path, quality=90)


def fake_wnids(n: int, start: int = 1000000) -> list[str]:
    """``n`` distinct wnid-like names (``n01000000``, ...), sorted."""
    return [f"n{start + 1000 * i:08d}" for i in range(n)]


MINI_PARTS = ("train", "val", "test")


def _mini_classes(classes_per_part: Sequence[int]) -> dict[str, list[str]]:
    wnids = fake_wnids(sum(classes_per_part))
    rng = np.random.default_rng(123)
    wnids = [wnids[i] for i in rng.permutation(len(wnids))]  # parts do not hold sorted ranges
    out, i = {}, 0
    for part, k in zip(MINI_PARTS, classes_per_part):
        out[part], i = wnids[i:i + k], i + k
    return out


def write_mini_imagenet_csv(root: str | Path, classes_per_part: Sequence[int] = (3, 1, 1), per_class: int = 6,
                            size: int = 84, seed: int = 0) -> dict[str, list[str]]:
    """Ravi & Larochelle layout: ``root/{train,val,test}.csv`` (``filename,label``) + JPEGs in ``root/images/``.

    Returns {part: [filename, ...]} in CSV order; filenames are ``<wnid><index:08d>.jpg``.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    out = {}
    for part, wnids in _mini_classes(classes_per_part).items():
        names = [f"{w}{j:08d}.jpg" for w in wnids for j in range(1, per_class + 1)]
        lines = ["filename,label"] + [f"{f},{f[:9]}" for f in names]
        (root / f"{part}.csv").write_text("\n".join(lines) + "\n")
        for f in names:
            _jpeg(root / "images" / f, rng, size)
        out[part] = names
    return out


def write_mini_imagenet_pickle(root: str | Path, classes_per_part: Sequence[int] = (3, 1, 1), per_class: int = 6,
                               size: int = 84, seed: int = 0, shuffle: bool = True) -> dict[str, np.ndarray]:
    """Pickle cache ``root/mini-imagenet-cache-{train,val,test}.pkl`` ({'image_data', 'class_dict'}).

    Images of a class are scattered through ``image_data`` when ``shuffle``. Returns
    {wnid: uint8 (per_class, size, size, 3)} in ``class_dict`` index order.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, np.ndarray] = {}
    for part, wnids in _mini_classes(classes_per_part).items():
        n = len(wnids) * per_class
        x = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
        pos = rng.permutation(n) if shuffle else np.arange(n)
        class_dict = {w: pos[i * per_class:(i + 1) * per_class].tolist() for i, w in enumerate(wnids)}
        for w, idx in class_dict.items():
            out[w] = x[idx]
        with (root / f"mini-imagenet-cache-{part}.pkl").open("wb") as fh:
            pickle.dump({"image_data": x, "class_dict": class_dict}, fh, protocol=4)
    return out


def write_imagenet(root: str | Path, wnids: Sequence[str] | None = None, train_per_class: int = 3,
                   val_per_class: int = 2, flat_val: bool = False, size: int = 16, seed: int = 0) -> list[str]:
    """ImageFolder layout ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` (or flat ``root/val/*.JPEG``)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    wnids = list(wnids or fake_wnids(3))
    k = 0
    for w in wnids:
        (root / "train" / w).mkdir(parents=True, exist_ok=True)
        for j in range(train_per_class):
            _jpeg(root / "train" / w / f"{w}_{j + 1}.JPEG", rng, size)
        val = root / "val" if flat_val else root / "val" / w
        val.mkdir(parents=True, exist_ok=True)
        for _ in range(val_per_class):
            k += 1
            _jpeg(val / f"ILSVRC2012_val_{k:08d}.JPEG", rng, size)
    return wnids


def write_office_home(root: str | Path, classes: Sequence[str] | None = None, per_class: int = 2,
                      domains: Sequence[str] = ("Art", "Clipart", "Product", "Real_World"),
                      domain_dirname: str = "Real World", size: int = 8, seed: int = 0,
                      top: str | None = "OfficeHomeDataset_10072016") -> Path:
    """``root/OfficeHomeDataset_10072016/<domain>/<Class>/<nnnnn>.jpg``; ``Real_World`` written as ``domain_dirname``.

    ``per_class`` may be an int or a dict {class: count}. Returns the folder holding the domains.
    """
    from pnc.data.office_home import OFFICE_HOME_CLASSES

    rng = np.random.default_rng(seed)
    base = Path(root) / top if top else Path(root)
    for d in domains:
        ddir = base / (domain_dirname if d == "Real_World" else d)
        for c in classes if classes is not None else OFFICE_HOME_CLASSES:
            (ddir / c).mkdir(parents=True, exist_ok=True)
            n = per_class[c] if isinstance(per_class, dict) else per_class
            for j in range(n):
                _jpeg(ddir / c / f"{j + 1:05d}.jpg", rng, size)
    return base
