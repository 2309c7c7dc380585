"""Derived splits (label noise, CIFAR-10-C noise corruptions) and the on-disk split format."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pnc.data.derive as derive
import pnc.data.store as store
from pnc.data.base import ImageSplit
from pnc.data.derive import (
    CORRUPTION_CONSTANTS,
    INPUT_TRANSFORMS,
    TRANSFORMS,
    confusion_targets,
    corrupt_images,
    derivation_rng,
    derive_split,
    materialise,
    read_base,
)
from pnc.data.embedded import load_digits
from pnc.data.store import read_split, split_digest, write_split
from pnc.errors import DataError

LEVELS = {"symmetric": 0.4, "class_dependent": 0.3, "gaussian_noise": 3, "shot_noise": 3,
          "impulse_noise": 3, "speckle_noise": 3}
SYNTH_TRANSFORMS = [t for t in TRANSFORMS if t != "human"]


def make_split(n: int = 600, k: int = 10, shape=(8, 8, 3), seed: int = 0, name: str = "train") -> ImageSplit:
    rng = np.random.default_rng(seed)
    return ImageSplit(name=name, classes=[f"c{i}" for i in range(k)], labels=np.arange(n) % k,
                      images=rng.integers(0, 256, size=(n, *shape), dtype=np.uint8), source="synthetic")


@pytest.fixture(scope="module")
def digits_train() -> ImageSplit:
    return load_digits()["train"]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("transform", SYNTH_TRANSFORMS)
def test_same_inputs_same_bytes(transform, digits_train, tmp_path):
    level = LEVELS[transform]
    a, ma = derive_split(digits_train, transform=transform, level=level, seed=3, base_name="digits")
    b, mb = derive_split(digits_train, transform=transform, level=level, seed=3, base_name="digits")
    c, _ = derive_split(digits_train, transform=transform, level=level, seed=4, base_name="digits")
    assert ma == mb and a.digest() == b.digest()
    assert a.digest() != c.digest()
    write_split(tmp_path / "a", a, ma)
    write_split(tmp_path / "b", b, mb)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert split_digest(tmp_path / "a") == split_digest(tmp_path / "b")


def test_rng_depends_on_seed_transform_level():
    draw = lambda *a: derivation_rng(*a).integers(0, 2**62, size=4).tolist()  # noqa: E731
    assert draw(0, "symmetric", 0.2) == draw(0, "symmetric", 0.2)
    assert draw(0, "symmetric", 0) == draw(0, "symmetric", 0.0) == draw(0, "symmetric", np.float64(0.0))
    assert draw(0, "gaussian_noise", 3) == draw(0, "gaussian_noise", np.int64(3))
    assert len({str(draw(*a)) for a in [(0, "symmetric", 0.2), (1, "symmetric", 0.2),
                                         (0, "symmetric", 0.4), (0, "class_dependent", 0.2)]}) == 4


@pytest.mark.parametrize("transform", SYNTH_TRANSFORMS)
def test_level_zero_is_identity(transform, digits_train):
    s, m = derive_split(digits_train, transform=transform, level=0, seed=1, base_name="digits")
    np.testing.assert_array_equal(s.labels, digits_train.labels)
    np.testing.assert_array_equal(s.images, digits_train.images)
    np.testing.assert_array_equal(s.meta["clean_labels"], digits_train.labels)
    assert m["realized_noise_rate"] == 0.0 and m["mean_abs_pixel_change"] == 0.0
    assert s.digest() == digits_train.digest()


# ----------------------------------------------------------------------------- label noise


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8, 1.0])
def test_symmetric_realized_rate(rate):
    base = make_split(n=20000, shape=(1, 1, 1))
    s, m = derive_split(base, transform="symmetric", level=rate, seed=0)
    k = base.num_classes
    changed = s.labels != base.labels
    assert m["realized_noise_rate"] == pytest.approx(changed.mean())
    assert m["realized_noise_rate"] == pytest.approx(rate * (k - 1) / k, abs=0.012)
    assert m["parameters"]["expected_noise_rate"] == pytest.approx(rate * (k - 1) / k)
    assert changed.sum() <= round(rate * len(base))
    # the new labels of the redrawn samples are uniform over all K classes
    assert np.bincount(s.labels[changed], minlength=k).min() > 0


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(2, 12), rate=st.floats(0, 1), seed=st.integers(0, 2**40))
def test_symmetric_properties(n, k, rate, seed):
    base = make_split(n=n, k=k, shape=(1, 1, 1))
    s, m = derive_split(base, transform="symmetric", level=rate, seed=seed)
    assert s.labels.min() >= 0 and s.labels.max() < k
    assert (s.labels != base.labels).sum() <= round(rate * n)
    assert sum(m["class_counts"]) == n == m["num_samples"]
    assert m["class_counts"] == np.bincount(s.labels, minlength=k).tolist()
    assert m["clean_class_counts"] == np.bincount(base.labels, minlength=k).tolist()


@pytest.mark.parametrize("k", [2, 3, 10, 11, 100])
def test_confusion_targets_pairing(k):
    t = confusion_targets(k, seed=5)
    assert (t != np.arange(k)).all() and sorted(t.tolist()) == list(range(k))  # a derangement
    mutual = t[t] == np.arange(k)
    assert mutual.sum() == (k if k % 2 == 0 else k - 3)  # pairs, plus one 3-cycle when k is odd
    assert confusion_targets(k, seed=5).tolist() == t.tolist()


def test_class_dependent_noise():
    base = make_split(n=5000, shape=(1, 1, 1))
    t = confusion_targets(base.num_classes, seed=7)
    for p in (0.1, 0.45):
        s, m = derive_split(base, transform="class_dependent", level=p, seed=7)
        changed = s.labels != base.labels
        assert m["realized_noise_rate"] == pytest.approx(p, abs=1e-3)
        np.testing.assert_array_equal(s.labels[changed], t[base.labels[changed]])  # only to the target
        per_class = [changed[base.labels == c].mean() for c in range(base.num_classes)]
        np.testing.assert_allclose(per_class, p, atol=1e-3)
        assert m["parameters"]["targets"] == t.tolist()  # the same pairing at every level


def test_human_label_sets():
    base = make_split(n=50, shape=(1, 1, 1))
    worse = base.labels.copy()
    worse[:20] = (worse[:20] + 1) % 10
    sets = {"clean": base.labels.copy(), "worse": worse}
    s, m = derive_split(base, transform="human", level="worse", seed=0, base_name="cifar10", label_sets=sets)
    np.testing.assert_array_equal(s.labels, worse)
    np.testing.assert_array_equal(s.meta["clean_labels"], base.labels)
    assert m["realized_noise_rate"] == pytest.approx(0.4) and m["level"] == "worse"
    assert m["parameters"] == {"label_set": "worse"}
    with pytest.raises(DataError, match="'worse'"):
        derive_split(base, transform="human", level="wrose", seed=0, label_sets=sets)
    with pytest.raises(DataError, match="shape"):
        derive_split(base, transform="human", level="short", seed=0, label_sets={"short": worse[:10]})
    with pytest.raises(ValueError, match="cifar10"):
        derive_split(base, transform="human", level="worse", seed=0, base_name="digits")


def test_bad_arguments(digits_train):
    with pytest.raises(ValueError, match="symmetric"):
        derive_split(digits_train, transform="symetric", level=0.1, seed=0)
    with pytest.raises(ValueError, match="rate"):
        derive_split(digits_train, transform="symmetric", level=1.5, seed=0)
    with pytest.raises(ValueError, match="severity"):
        derive_split(digits_train, transform="gaussian_noise", level=6, seed=0)
    with pytest.raises(ValueError, match="severity"):
        derive_split(digits_train, transform="gaussian_noise", level=2.5, seed=0)


def test_noise_on_noise_keeps_the_original_clean_labels(digits_train):
    noisy, _ = derive_split(digits_train, transform="symmetric", level=0.5, seed=0)
    both, m = derive_split(noisy, transform="gaussian_noise", level=2, seed=0)
    np.testing.assert_array_equal(both.labels, noisy.labels)
    np.testing.assert_array_equal(both.meta["clean_labels"], digits_train.labels)
    assert m["realized_noise_rate"] == pytest.approx(np.mean(noisy.labels != digits_train.labels))


# ----------------------------------------------------------------------------- input corruptions


def _flat(value: int, n: int = 64, channels: int = 1) -> np.ndarray:
    return np.full((n, 64, 64, channels), value, dtype=np.uint8)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_gaussian_noise_std(severity):
    c = CORRUPTION_CONSTANTS["gaussian_noise"][severity - 1]
    out = corrupt_images(_flat(128), "gaussian_noise", severity, np.random.default_rng(0)).astype(np.float64)
    assert out.std() == pytest.approx(c * 255, rel=0.02)
    assert out.mean() == pytest.approx(127.5, abs=0.15)  # truncation lowers the mean by half a level


@pytest.mark.parametrize("severity", [1, 5])
def test_shot_noise_poisson(severity):
    c = CORRUPTION_CONSTANTS["shot_noise"][severity - 1]
    out = corrupt_images(_flat(128), "shot_noise", severity, np.random.default_rng(0)).astype(np.float64) / 255
    assert out.std() == pytest.approx(np.sqrt((128 / 255) / c), rel=0.03)
    assert corrupt_images(_flat(0, n=4), "shot_noise", severity, np.random.default_rng(0)).max() == 0


@pytest.mark.parametrize("severity", [1, 5])
@pytest.mark.parametrize("channels", [1, 3])
def test_impulse_noise_fraction(severity, channels):
    c = CORRUPTION_CONSTANTS["impulse_noise"][severity - 1]
    out = corrupt_images(_flat(128, channels=channels), "impulse_noise", severity, np.random.default_rng(0))
    salt, pepper = (out == 255).mean(), (out == 0).mean()
    assert salt + pepper == pytest.approx(c, rel=0.03)
    assert salt == pytest.approx(c / 2, rel=0.05) and pepper == pytest.approx(c / 2, rel=0.05)
    assert set(np.unique(out).tolist()) == {0, 128, 255}  # untouched elements keep their exact value
    if channels == 3:  # channels are hit independently, as in skimage.util.random_noise
        hit = out != 128
        assert hit.any(-1).mean() == pytest.approx(1 - (1 - c) ** 3, rel=0.05)


def test_speckle_noise_scales_with_intensity():
    c = CORRUPTION_CONSTANTS["speckle_noise"][4]
    img = np.concatenate([_flat(60, n=32), _flat(180, n=32)])
    out = corrupt_images(img, "speckle_noise", 5, np.random.default_rng(0)).astype(np.float64)
    lo, hi = out[:32] - 60, out[32:] - 180
    assert hi.std() / lo.std() == pytest.approx(3.0, rel=0.05)
    assert hi.std() == pytest.approx(c * 180, rel=0.03)
    assert corrupt_images(_flat(0, n=4), "speckle_noise", 5, np.random.default_rng(0)).max() == 0


@pytest.mark.parametrize("transform", INPUT_TRANSFORMS)
def test_matches_reference_formula_with_truncation(transform, digits_train):
    """The published formulas, written out here with the same draws, in one chunk."""
    x = digits_train.images.astype(np.float64) / 255
    s = 4
    c = CORRUPTION_CONSTANTS[transform][s - 1]
    rng = derivation_rng(11, transform, s)
    if transform == "gaussian_noise":
        y = x + rng.normal(size=x.shape, scale=c)
    elif transform == "shot_noise":
        y = rng.poisson(x * c) / c
    elif transform == "speckle_noise":
        y = x + x * rng.normal(size=x.shape, scale=c)
    else:
        flipped, salted = rng.random(x.shape) < c, rng.random(x.shape) < 0.5
        y = np.where(flipped, salted.astype(np.float64), x)
    expected = (np.clip(y, 0, 1) * 255).astype(np.uint8)
    got, m = derive_split(digits_train, transform=transform, level=s, seed=11)
    np.testing.assert_array_equal(got.images, expected)
    if transform != "impulse_noise":  # rounding instead of truncating would give other bytes
        assert not np.array_equal(np.round(np.clip(y, 0, 1) * 255).astype(np.uint8), expected)
    assert m["parameters"]["constant"] == c and m["kind"] == "inputs"
    assert m["mean_abs_pixel_change"] == pytest.approx(np.abs(expected.astype(int) - digits_train.images).mean())
    np.testing.assert_array_equal(got.labels, digits_train.labels)


def test_chunk_size_does_not_change_the_result(monkeypatch):
    img = make_split(n=50).images
    whole = corrupt_images(img, "shot_noise", 2, np.random.default_rng(3))
    monkeypatch.setattr(derive, "CHUNK_ELEMENTS", 7 * 8 * 8 * 3)
    chunked = corrupt_images(img, "shot_noise", 2, np.random.default_rng(3))
    np.testing.assert_array_equal(whole, chunked)


@settings(max_examples=25, deadline=None)
@given(transform=st.sampled_from(INPUT_TRANSFORMS), severity=st.integers(0, 5),
       shape=st.tuples(st.integers(1, 5), st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 3])),
       seed=st.integers(0, 2**32 - 1))
def test_corruption_properties(transform, severity, shape, seed):
    img = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    a = corrupt_images(img, transform, severity, np.random.default_rng(seed))
    b = corrupt_images(img, transform, severity, np.random.default_rng(seed))
    assert a.dtype == np.uint8 and a.shape == img.shape
    np.testing.assert_array_equal(a, b)
    if severity == 0:
        np.testing.assert_array_equal(a, img)


def test_path_based_split_label_noise_only(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(20)]
    for p in paths:
        p.write_bytes(b"x")
    base = ImageSplit(name="train", classes=["a", "b"], labels=np.arange(20) % 2, paths=paths)
    s, m = derive_split(base, transform="symmetric", level=1.0, seed=0)
    assert s.paths == paths and s.images is None
    write_split(tmp_path / "out", s, m)
    back = read_split(tmp_path / "out")
    assert back.paths == [Path(p.as_posix()) for p in paths]
    np.testing.assert_array_equal(back.labels, s.labels)
    with pytest.raises(DataError, match="in memory"):
        derive_split(base, transform="gaussian_noise", level=1, seed=0)


# ----------------------------------------------------------------------------- manifest / materialise


def test_manifest_contents(digits_train, tmp_path):
    write_split(tmp_path / "base", digits_train, {"dataset": "digits"})
    base = read_split(tmp_path / "base")
    s, m = derive_split(base, transform="symmetric", level=0.25, seed=9, base_path=tmp_path / "base")
    assert m["base"] == {"name": "digits", "split": "digits/train", "digest": digits_train.digest(),
                         "path": (tmp_path / "base").as_posix(), "split_digest": split_digest(tmp_path / "base")}
    assert (m["transform"], m["level"], m["seed"], m["kind"]) == ("symmetric", 0.25, 9, "labels")
    assert m["format_version"] == store.FORMAT_VERSION and m["num_samples"] == len(digits_train)
    assert m["class_counts"] == np.bincount(s.labels, minlength=10).tolist()
    assert m["clean_class_counts"] == np.bincount(digits_train.labels, minlength=10).tolist()
    assert s.meta["manifest"] is m
    json.dumps(m)  # plain JSON types only


def test_materialise_and_read_base(digits_train, tmp_path):
    write_split(tmp_path / "base", digits_train, {"dataset": "digits"})
    written = materialise(tmp_path / "base", tmp_path / "gn3", transform="gaussian_noise", level=3, seed=0)
    assert written["digest"] == split_digest(tmp_path / "gn3")
    assert written["base"]["name"] == "digits"
    derived = read_split(tmp_path / "gn3")
    np.testing.assert_array_equal(derived.meta["clean_labels"], digits_train.labels)
    assert not np.array_equal(derived.images, digits_train.images)
    for handle in (derived, tmp_path / "gn3"):
        assert read_base(handle).digest() == digits_train.digest()
    # the base changes afterwards: reading the clean inputs must fail loudly
    changed = digits_train.with_labels(np.roll(digits_train.labels, 1))
    write_split(tmp_path / "base", changed, {"dataset": "digits"})
    with pytest.raises(DataError, match="changed"):
        read_base(tmp_path / "gn3")
    unrooted, _ = derive_split(digits_train, transform="gaussian_noise", level=1, seed=0)
    with pytest.raises(DataError, match="no base split"):
        read_base(unrooted)


# ----------------------------------------------------------------------------- store


def test_store_round_trip_and_clean_labels(digits_train, tmp_path):
    s, m = derive_split(digits_train, transform="class_dependent", level=0.3, seed=0)
    write_split(tmp_path / "x", s, m)
    assert sorted(os.listdir(tmp_path / "x")) == ["classes.json", "clean_labels.npy", "images.npy",
                                                  "labels.npy", "manifest.json"]
    back = read_split(tmp_path / "x")
    assert back.digest() == s.digest() and back.classes == s.classes and back.name == s.name
    np.testing.assert_array_equal(back.meta["clean_labels"], digits_train.labels)
    text = (tmp_path / "x" / "manifest.json").read_text()
    assert json.loads(text)["files"]["labels.npy"]
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def test_store_overwrites_and_leaves_no_temp_dirs(tmp_path):
    a, b = make_split(seed=0), make_split(seed=1)
    write_split(tmp_path / "s", a, {})
    write_split(tmp_path / "s", b, {})
    assert read_split(tmp_path / "s").digest() == b.digest()
    assert sorted(os.listdir(tmp_path)) == ["s"]


@pytest.mark.parametrize("existing", [False, True])
def test_store_write_is_atomic(existing, tmp_path, monkeypatch):
    old, new = make_split(seed=0), make_split(seed=1)
    if existing:
        write_split(tmp_path / "s", old, {"v": 1})
    before = _files(tmp_path / "s") if existing else None
    real = store._save_bytes

    def failing(path, data):
        if path.name == "manifest.json":
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(store, "_save_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        write_split(tmp_path / "s", new, {"v": 2})
    assert sorted(os.listdir(tmp_path)) == (["s"] if existing else [])
    if existing:
        assert _files(tmp_path / "s") == before

    # a failure while swapping the folders restores the old one
    monkeypatch.setattr(store, "_save_bytes", real)
    real_rename = os.rename
    calls = []

    def failing_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == (2 if existing else 1):
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(store.os, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        write_split(tmp_path / "s", new, {"v": 2})
    monkeypatch.setattr(store.os, "rename", real_rename)
    assert sorted(os.listdir(tmp_path)) == (["s"] if existing else [])
    if existing:
        assert _files(tmp_path / "s") == before


def test_read_split_errors(tmp_path):
    s = make_split()
    with pytest.raises(DataError, match=r"does not exist.*dvc repro"):
        read_split(tmp_path / "nothing")

    def fresh(name: str) -> Path:
        return write_split(tmp_path / name, s, {"dataset": "synthetic"})

    d = fresh("missing")
    (d / "labels.npy").unlink()
    with pytest.raises(DataError, match=r"labels\.npy: file missing.*dvc repro"):
        read_split(d)

    d = fresh("truncated")
    data = (d / "images.npy").read_bytes()
    (d / "images.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"images\.npy: contents do not match.*dvc repro"):
        read_split(d)
    with pytest.raises(DataError, match=r"images\.npy: not a readable \.npy"):
        read_split(d, verify=False)

    d = fresh("manifest")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json: not valid JSON"):
        read_split(d)

    d = fresh("version")
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="format_version 99"):
        read_split(d)

    d = fresh("classes")
    (d / "classes.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(DataError, match=r"classes\.json"):
        read_split(d)
    with pytest.raises(DataError, match=r"labels outside 0\.\.1"):
        read_split(d, verify=False)


def test_write_split_rejects_bad_manifest_values(tmp_path):
    with pytest.raises(TypeError, match="manifest.obj"):
        write_split(tmp_path / "x", make_split(), {"obj": object()})
    with pytest.raises(ValueError, match="nan"):
        write_split(tmp_path / "x", make_split(), {"rate": float("nan")})
    assert not (tmp_path / "x").exists() and os.listdir(tmp_path) == []


def test_written_splits_have_the_umask_permissions(digits_train, tmp_path):
    """A split is built in a private temporary folder, then published with the modes mkdir/open would give
    (readable by the lab on a shared disk), not mkdtemp's 0700."""
    old = os.umask(0o022)
    try:
        out = write_split(tmp_path / "split", digits_train, {"transform": "none"})
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755
    assert {f.stat().st_mode & 0o777 for f in out.iterdir()} == {0o644}
