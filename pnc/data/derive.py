"""Derived splits: a base split + a transform + a level + a seed -> a noisy split and a manifest.

Pure and deterministic: all randomness comes from ``numpy.random.default_rng`` seeded by
(``seed``, ``transform``, ``level``) through :func:`derivation_rng`; the same inputs give the same
bytes. Level 0 is the identity for every label-noise rate and every corruption severity.
The derived split keeps the clean labels in ``meta["clean_labels"]``; input corruptions keep the
labels and record the base split (name, digest, folder) in the manifest so a runner can load
the clean inputs with :func:`read_base`.

Label transforms (DATA.md "Random labels"; catalog ``LABEL_NOISE_KINDS``)
-------------------------------------------------------------------------
* ``symmetric`` (rate r in [0, 1]): ``round(r * N)`` samples, chosen uniformly without
  replacement, get a label drawn uniformly from all K classes (Zhang et al. 2017, "r =
  percentage of randomly labelled data"). A redrawn label equals the old one with probability
  1/K, so the expected realized noise rate is ``r * (K - 1) / K``. Some neural-collapse code
  instead permutes the labels of the chosen samples class-balanced; pnc keeps the independent
  uniform draw (the paper's wording) and records the realized rate.
* ``class_dependent`` (rate p in [0, 1]): the embedded stand-in for human noise. The K classes
  are paired by a seeded shuffle (with an odd K the last three form a cycle), giving a target
  ``t(k) != k`` for every class: the transition matrix is ``T[k, k] = 1 - p``,
  ``T[k, t(k)] = p``. Exactly ``round(p * n_k)`` samples of each class k, chosen uniformly,
  get label ``t(k)``, so the realized rate is p up to rounding. The pairing depends on ``seed``
  only (not on p), so a sweep over p keeps the same confusions; it is stored in the manifest.
* ``human`` (level = a label-set name such as ``aggre`` or ``worse``): the CIFAR-10N/100N label
  array, read with :func:`pnc.data.cifar10n.load_cifar_n` (or passed in as ``label_sets``).

Realized noise rate = fraction of samples whose label differs from the clean label.

Input transforms (Hendrycks & Dietterich 2019, CIFAR-10-C; constants in DATA.md)
--------------------------------------------------------------------------------
With x = image / 255 in float64 and severity s in 1..5, c = constant[s - 1]:

* ``gaussian_noise``: x + N(0, c)  (c is the standard deviation)
* ``shot_noise``: Poisson(x * c) / c
* ``impulse_noise``: salt-and-pepper as ``skimage.util.random_noise(mode="s&p", amount=c)``:
  every array element (each channel of each pixel independently) is replaced with probability
  c, by 1 (salt) or 0 (pepper) with probability 1/2 each.
* ``speckle_noise``: x + x * N(0, c)

Output ``uint8(clip(y, 0, 1) * 255)``: truncation, as ``np.uint8`` in the published script.
Applied chunk by chunk (bounded memory) with one generator drawn in order, so the result does
not depend on the chunk size.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pnc.catalog import CORRUPTIONS, LABEL_NOISE_KINDS, MAX_SEVERITY
from pnc.data.base import ImageSplit
from pnc.data.store import FORMAT_VERSION, read_manifest, read_split, split_digest, write_split
from pnc.errors import DataError, did_you_mean

LABEL_TRANSFORMS: tuple[str, ...] = tuple(LABEL_NOISE_KINDS)  # symmetric, class_dependent, human
INPUT_TRANSFORMS: tuple[str, ...] = CORRUPTIONS
TRANSFORMS: tuple[str, ...] = LABEL_TRANSFORMS + INPUT_TRANSFORMS

# CIFAR-10-C constants per severity 1..5 (Hendrycks & Dietterich 2019; DATA.md).
CORRUPTION_CONSTANTS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
}
CHUNK_ELEMENTS = 1 << 22  # array elements corrupted at once (32 MiB of float64)


# ----------------------------------------------------------------------------- seeding / levels
def _level_key(transform: str, level: Any) -> str:
    if transform in INPUT_TRANSFORMS:
        return str(int(level))
    if transform == "human":
        return str(level)
    return repr(float(level))


def derivation_rng(seed: int, transform: str, level: Any, purpose: str = "") -> np.random.Generator:
    """``default_rng`` seeded by (seed, transform, level[, purpose]); stable across processes
    (sha256 of the tags, never Python's salted ``hash``)."""
    tag = f"{transform}|{_level_key(transform, level)}|{purpose}".encode()
    words = np.frombuffer(hashlib.sha256(tag).digest()[:16], dtype="<u4").tolist()
    seed = int(seed)
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, *words]))


def _check_transform(transform: str) -> None:
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}.{did_you_mean(transform, TRANSFORMS)}")


def _check_rate(transform: str, level: Any) -> float:
    r = float(level)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"{transform}: the noise rate must be in [0, 1], got {level!r}")
    return r


def _check_severity(transform: str, level: Any) -> int:
    s = int(level)
    if s != level or not 0 <= s <= MAX_SEVERITY:
        raise ValueError(f"{transform}: severity must be an integer 0..{MAX_SEVERITY}, got {level!r}")
    return s


# ----------------------------------------------------------------------------- label noise
def symmetric_labels(labels: np.ndarray, num_classes: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """``round(rate * N)`` samples (uniform, without replacement) get a uniform label in 0..K-1."""
    labels = np.asarray(labels, dtype=np.int64)
    out = labels.copy()
    m = int(round(rate * len(labels)))
    if m:
        idx = rng.choice(len(labels), size=m, replace=False)
        out[idx] = rng.integers(0, num_classes, size=m)
    return out


def confusion_targets(num_classes: int, seed: int) -> np.ndarray:
    """The seeded class pairing of ``class_dependent`` noise: ``t[k] != k`` for every class.

    Classes are shuffled and paired (a, b) -> a<->b; with an odd count the last three shuffled
    classes form a cycle a->b->c->a. Depends on ``seed`` only.
    """
    if num_classes < 2:
        raise ValueError("class_dependent noise needs at least 2 classes")
    order = derivation_rng(seed, "class_dependent", 0, "targets").permutation(num_classes)
    t = np.empty(num_classes, dtype=np.int64)
    n_pairs = num_classes // 2 - (num_classes % 2)  # pairs before a final 3-cycle (odd K)
    a, b = order[0:2 * n_pairs:2], order[1:2 * n_pairs:2]
    t[a], t[b] = b, a
    rest = order[2 * n_pairs:]  # empty (even K) or the 3-cycle a->b->c->a (odd K)
    t[rest] = np.roll(rest, -1)
    return t


def class_dependent_labels(labels: np.ndarray, targets: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """For each class k, exactly ``round(rate * n_k)`` of its samples get label ``targets[k]``."""
    labels = np.asarray(labels, dtype=np.int64)
    out = labels.copy()
    for k in range(len(targets)):
        idx = np.flatnonzero(labels == k)
        m = int(round(rate * len(idx)))
        if m:
            out[rng.choice(idx, size=m, replace=False)] = targets[k]
    return out


def _human_labels(level: Any, n: int, num_classes: int, base_name: str | None, clean: np.ndarray,
                  label_sets: Mapping[str, np.ndarray] | None, human_path: str | Path | None) -> np.ndarray:
    if label_sets is None:
        fits = LABEL_NOISE_KINDS["human"] or ()
        if base_name not in fits:
            raise ValueError(f"human label noise exists for {', '.join(fits)} only, not {base_name!r} "
                             f"(pass base_name=, or label_sets=)")
        from pnc.data.cifar10n import load_cifar_n

        label_sets = load_cifar_n(human_path, dataset=base_name, train_labels=clean)
    name = str(level)
    if name not in label_sets:
        raise DataError(f"no human label set {name!r}.{did_you_mean(name, label_sets)}")
    labels = np.asarray(label_sets[name], dtype=np.int64)
    if labels.shape != (n,):
        raise DataError(f"human label set {name!r} has shape {labels.shape}, the base split has {n} samples")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"human label set {name!r} has labels outside 0..{num_classes - 1}")
    return labels


# ----------------------------------------------------------------------------- input corruptions
def _corrupt_chunk(x: np.ndarray, transform: str, c: float, rng: np.random.Generator) -> np.ndarray:
    if transform == "gaussian_noise":
        y = x + rng.normal(size=x.shape, scale=c)
    elif transform == "shot_noise":
        y = rng.poisson(x * c) / c
    elif transform == "impulse_noise":
        flipped = rng.random(x.shape) < c
        salted = rng.random(x.shape) < 0.5
        y = x.copy()
        y[flipped & salted] = 1.0
        y[flipped & ~salted] = 0.0
    elif transform == "speckle_noise":
        y = x + x * rng.normal(size=x.shape, scale=c)
    else:  # pragma: no cover - guarded by callers
        raise ValueError(transform)
    return (np.clip(y, 0.0, 1.0) * 255).astype(np.uint8)  # truncating, like np.uint8 in the original


def corrupt_images(images: np.ndarray, transform: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Apply a CIFAR-10-C noise corruption (module docstring) to uint8 images of any shape.

    Severity 0 returns a copy. Chunked over the first axis to bound memory.
    """
    if transform not in CORRUPTION_CONSTANTS:
        raise ValueError(f"unknown corruption {transform!r}.{did_you_mean(transform, CORRUPTION_CONSTANTS)}")
    severity = _check_severity(transform, severity)
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if severity == 0:
        return images.copy()
    c = CORRUPTION_CONSTANTS[transform][severity - 1]
    out = np.empty_like(images)
    for rows in _chunks(images):
        out[rows] = _corrupt_chunk(images[rows].astype(np.float64) / 255.0, transform, c, rng)
    return out


def _chunks(a: np.ndarray) -> list[slice]:
    """Slices of ``a``'s first axis of about CHUNK_ELEMENTS array elements each."""
    step = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(a.shape[1:], dtype=np.int64))))
    return [slice(s, s + step) for s in range(0, len(a), step)]


# ----------------------------------------------------------------------------- derive / materialise
def derive_split(base: ImageSplit, *, transform: str, level: float | int | str, seed: int,
                 base_name: str | None = None, base_path: str | Path | None = None,
                 label_sets: Mapping[str, np.ndarray] | None = None,
                 human_path: str | Path | None = None) -> tuple[ImageSplit, dict]:
    """Apply ``transform`` at ``level`` with ``seed`` to ``base``; returns (split, manifest).

    ``base_name`` is the dataset name recorded in the manifest (and, for ``human``, selects
    CIFAR-10N or CIFAR-100N); ``base_path`` is the folder the base split was read from, recorded
    as given so a runner can reload the clean inputs (:func:`read_base`). For ``human`` the label
    sets come from ``label_sets`` or else from ``load_cifar_n(human_path, dataset=base_name)``.
    The returned split has the derived labels (and corrupted images for input transforms),
    ``meta["clean_labels"]`` and ``meta["manifest"]``.
    """
    _check_transform(transform)
    clean = np.asarray(base.meta.get("clean_labels", base.labels), dtype=np.int64)
    k = base.num_classes
    if base_name is None:
        base_name = base.meta.get("dataset") or (base.meta.get("manifest") or {}).get("dataset")
    labels, images = base.labels, base.images
    params: dict[str, Any] = {}
    mean_change = 0.0
    if transform in INPUT_TRANSFORMS:
        severity = _check_severity(transform, level)
        level = severity
        params = {"constant": CORRUPTION_CONSTANTS[transform][severity - 1] if severity else None,
                  "formula": _FORMULAS[transform]}
        if severity:
            if base.images is None:
                raise DataError(f"{transform} needs images in memory; {base.name} is a list of files "
                                f"({base.source or 'path-based dataset'})")
            images = corrupt_images(base.images, transform, severity, derivation_rng(seed, transform, severity))
            mean_change = _mean_abs_change(base.images, images)
    elif transform == "human":
        level = str(level)
        labels = _human_labels(level, len(base), k, base_name, clean, label_sets, human_path)
        params = {"label_set": level}
    else:
        rate = _check_rate(transform, level)
        level = rate
        rng = derivation_rng(seed, transform, rate)
        if transform == "symmetric":
            params = {"rate": rate, "expected_noise_rate": rate * (k - 1) / k}
            if rate:
                labels = symmetric_labels(base.labels, k, rate, rng)
        else:
            targets = confusion_targets(k, seed)
            params = {"rate": rate, "targets": targets.tolist()}
            if rate:
                labels = class_dependent_labels(base.labels, targets, rate, rng)
    labels = np.asarray(labels, dtype=np.int64)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "base": {
            "name": base_name,
            "split": base.name,
            "digest": base.digest(),
            "path": None if base_path is None else Path(base_path).as_posix(),
            "split_digest": None if base_path is None else split_digest(base_path),
        },
        "transform": transform,
        "kind": "inputs" if transform in INPUT_TRANSFORMS else "labels",
        "level": level,
        "seed": int(seed),
        "parameters": params,
        "realized_noise_rate": float(np.mean(labels != clean)) if len(labels) else 0.0,
        "mean_abs_pixel_change": mean_change,
        "num_samples": int(len(labels)),
        "class_counts": np.bincount(labels, minlength=k).tolist(),
        "clean_class_counts": np.bincount(clean, minlength=k).tolist(),
    }
    meta = {key: v for key, v in base.meta.items() if key not in ("manifest", "path", "index")}
    meta.update(clean_labels=clean, manifest=manifest)
    split = ImageSplit(name=base.name, classes=list(base.classes), labels=labels, images=images,
                       paths=base.paths, source=f"{base.source} | {transform}@{level} seed={int(seed)}",
                       meta=meta)
    return split, manifest


_FORMULAS = {
    "gaussian_noise": "uint8(clip(x + N(0, c), 0, 1) * 255)",
    "shot_noise": "uint8(clip(poisson(x * c) / c, 0, 1) * 255)",
    "impulse_noise": "uint8(clip(s&p(x, amount=c), 0, 1) * 255)",
    "speckle_noise": "uint8(clip(x + x * N(0, c), 0, 1) * 255)",
}


def _mean_abs_change(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |a - b| over all elements, in uint8 units (chunked)."""
    total = sum(int(np.abs(a[rows].astype(np.int16) - b[rows].astype(np.int16)).sum(dtype=np.int64)) for rows in _chunks(a))
    return total / a.size if a.size else 0.0


def materialise(base_dir: str | Path, out_dir: str | Path, *, transform: str, level: float | int | str,
                seed: int, base_name: str | None = None, human_path: str | Path | None = None) -> dict:
    """DVC stage entry point: read the split in ``base_dir``, derive, write to ``out_dir``.

    Returns the manifest as written (with ``files`` and ``digest``).
    """
    base = read_split(base_dir)
    split, manifest = derive_split(base, transform=transform, level=level, seed=seed, base_name=base_name,
                                   base_path=base_dir, human_path=human_path)
    write_split(out_dir, split, manifest)
    return read_manifest(out_dir)


def read_base(derived: ImageSplit | str | Path) -> ImageSplit:
    """The clean base split of a derived split (or split folder), checked against its digest."""
    if isinstance(derived, ImageSplit):
        manifest = derived.meta.get("manifest") or {}
        where = derived.meta.get("path", derived.name)
    else:
        manifest, where = read_manifest(derived), str(derived)
    base = manifest.get("base") or {}
    if not base.get("path"):
        raise DataError(f"{where}: the manifest records no base split folder, so the clean inputs cannot be "
                        f"loaded; re-create it with `dvc repro`.")
    split = read_split(base["path"])
    if split.digest() != base.get("digest"):
        raise DataError(f"{base['path']}: the base split changed since {where} was derived from it; "
                        f"re-create both with `dvc repro`.")
    return split
