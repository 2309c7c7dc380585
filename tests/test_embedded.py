"""Embedded datasets: scikit-learn digits and the three-domain digits (DATA.md, "Data that ships
inside installed packages")."""
from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from pnc.data.embedded import (
    DIGIT_CLASSES,
    DOMAINS,
    TYPESET_FONTS,
    fraction_split,
    generate_digit_domains,
    load_digits,
    load_embedded,
    render_domain,
    typeset_fonts,
    write_embedded,
)
from pnc.data.store import read_split
from pnc.errors import DataError

PER_CLASS = 170


@pytest.fixture(scope="module")
def domains():
    return generate_digit_domains()


def _ncc_accuracy(train, test) -> float:
    """Nearest-class-mean accuracy on raw pixels: a cheap 'are the glyphs legible' probe."""
    x = train.images.reshape(len(train), -1).astype(np.float64)
    means = np.stack([x[train.labels == k].mean(0) for k in range(10)])
    y = test.images.reshape(len(test), -1).astype(np.float64)
    pred = np.argmin(((y[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    return float(np.mean(pred == test.labels))


def test_load_digits_matches_sklearn():
    from sklearn.datasets import load_digits as sk_load

    sk = sk_load()
    d = load_digits()
    tr, te = d["train"], d["test"]
    assert len(tr) + len(te) == 1797
    for s in (tr, te):
        assert s.images.shape[1:] == (8, 8, 1) and s.images.dtype == np.uint8
        assert s.classes == DIGIT_CLASSES
        expected = np.round(sk.images[s.meta["index"]] * 255 / 16).astype(np.uint8)[..., None]
        np.testing.assert_array_equal(s.images, expected)
        np.testing.assert_array_equal(s.labels, sk.target[s.meta["index"]])
    assert tr.images.max() == 255
    assert not set(tr.meta["index"]) & set(te.meta["index"])
    # stratified 25 %: every class within one sample of a quarter of its count
    counts = np.bincount(sk.target)
    assert np.all(np.abs(np.bincount(te.labels) - counts * 0.25) <= 1)


def test_load_digits_deterministic_and_seeded():
    a, b, c = load_digits(), load_digits(), load_digits(seed=1)
    for split in ("train", "test"):
        assert a[split].digest() == b[split].digest()
        assert a[split].digest() != c[split].digest()
    assert load_digits(test_fraction=0.5)["test"].labels.size in (898, 899, 900, 901)


def test_fraction_split_partitions():
    labels = np.repeat(np.arange(3), [10, 7, 4])
    tr, te = fraction_split(labels, 0.25, np.random.default_rng(0))
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(21))
    assert np.bincount(labels[te]).tolist() == [2, 2, 1]  # round(2.5)=2, round(1.75)=2, round(1.0)=1
    with pytest.raises(ValueError):
        fraction_split(labels, 1.0, np.random.default_rng(0))


def test_domains_shapes_classes_balance(domains):
    assert tuple(domains) == DOMAINS
    for name, splits in domains.items():
        tr, te = splits["train"], splits["test"]
        for s in (tr, te):
            assert s.images.shape[1:] == (16, 16, 1) and s.images.dtype == np.uint8
            assert s.classes == DIGIT_CLASSES and s.meta["domain"] == name
            assert s.images.max() == 255 and s.images.min() == 0
        total = np.bincount(tr.labels, minlength=10) + np.bincount(te.labels, minlength=10)
        assert total.tolist() == [PER_CLASS] * 10, name
        assert np.bincount(te.labels).tolist() == [round(PER_CLASS * 0.25)] * 10
        # every image has ink and a dark border region (glyphs are framed, not cropped)
        assert (tr.images.reshape(len(tr), -1).max(1) == 255).all()
        assert tr.images[:, 0, :, 0].mean() < 40 and tr.images[:, :, 0, 0].mean() < 40


def test_domains_are_legible(domains):
    for name, splits in domains.items():
        acc = _ncc_accuracy(splits["train"], splits["test"])
        assert acc > 0.5, (name, acc)  # chance is 0.1; measured ~0.67-0.79


def test_domains_differ(domains):
    means = {d: s["train"].images.astype(np.float64).mean(0) for d, s in domains.items()}
    for a, b in itertools.combinations(DOMAINS, 2):
        assert np.abs(means[a] - means[b]).mean() > 3.0, (a, b)
    # per-class means differ between domains too (not just framing)
    for a, b in itertools.combinations(DOMAINS, 2):
        ta, tb = domains[a]["train"], domains[b]["train"]
        diffs = [np.abs(ta.images[ta.labels == k].mean(0) - tb.images[tb.labels == k].mean(0)).mean() for k in range(10)]
        assert min(diffs) > 5.0, (a, b, diffs)
    # a classifier fitted on one domain does worse on another than in-domain
    hw = domains["handwritten"]
    assert _ncc_accuracy(hw["train"], domains["segment"]["test"]) < _ncc_accuracy(hw["train"], hw["test"])


def test_domains_deterministic(domains):
    again = generate_digit_domains()
    for d in DOMAINS:
        for split in ("train", "test"):
            assert again[d][split].images.tobytes() == domains[d][split].images.tobytes()
            assert again[d][split].digest() == domains[d][split].digest()
    for d in DOMAINS:
        a, _ = render_domain(d, per_class=4, seed=1)
        b, _ = render_domain(d, per_class=4, seed=1)
        c, _ = render_domain(d, per_class=4, seed=2)
        assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_domains_do_not_depend_on_the_hash_seed():
    code = ("from pnc.data.embedded import render_domain; import hashlib, sys; "
            "sys.stdout.write(hashlib.sha256(b''.join(render_domain(d, per_class=3)[0].tobytes() "
            "for d in ('handwritten', 'typeset', 'segment'))).hexdigest())")
    here = hashlib.sha256(b"".join(render_domain(d, per_class=3)[0].tobytes() for d in DOMAINS))
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=dict(os.environ, PYTHONHASHSEED=hash_seed)).stdout
        assert out == here.hexdigest()


def test_render_domain_options():
    imgs, labels = render_domain("segment", image_size=28, per_class=2)
    assert imgs.shape == (20, 28, 28, 1) and labels.tolist() == sorted(list(range(10)) * 2)
    with pytest.raises(ValueError, match="per_class"):
        render_domain("handwritten", per_class=175)
    with pytest.raises(ValueError, match="typeset"):
        render_domain("typeste", per_class=1)


def test_typeset_fonts_fixed_order(domains):
    fonts = typeset_fonts()
    assert len(fonts) >= 10
    assert [p.name for p in fonts] == [f for f in TYPESET_FONTS if f in {p.name for p in fonts}]
    assert domains["typeset"]["train"].meta["fonts"] == [p.name for p in fonts]


def test_load_embedded_and_errors():
    assert load_embedded("digits")["train"].digest() == load_digits()["train"].digest()
    with pytest.raises(DataError, match="digits_domains"):
        load_embedded("digits_domain")
    with pytest.raises(DataError, match="segment"):
        load_embedded("digits_domains", domain="segments")


def test_write_embedded_round_trip(tmp_path):
    written = write_embedded(tmp_path / "digits", "digits")
    assert [p.name for p in written] == ["train", "test"]
    ref = load_digits()
    for p in written:
        s = read_split(p)
        assert s.digest() == ref[p.name].digest()
        assert s.meta["manifest"]["dataset"] == "digits" and s.meta["manifest"]["split"] == p.name
        assert "clean_labels" not in s.meta
