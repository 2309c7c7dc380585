"""Every real-dataset loader reads small fixtures written in the exact real formats (tests/fakedata.py)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fakedata as F
from pnc.catalog import CIFAR10C_CORRUPTIONS
from pnc.data import cifar
from pnc.data.base import stratified_split
from pnc.data.cifar import load_cifar10, load_cifar100
from pnc.data.cifar10c import load_cifar10c
from pnc.data.cifar10n import load_cifar_n, noise_rates
from pnc.data.imagenet import load_imagenet
from pnc.data.mini_imagenet import load_mini_imagenet
from pnc.data.office_home import OFFICE_HOME_CLASSES, load_office_home
from pnc.errors import DataError


# ---------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("key_type", ["py2", "str", "bytes"])
def test_cifar10_reads_exact_values(tmp_path: Path, key_type: str) -> None:
    written = F.write_cifar10(tmp_path, n_per_batch=12, n_test=7, key_type=key_type)
    splits = load_cifar10(tmp_path)
    assert set(splits) == {"train", "test"}
    for name, n in (("train", 60), ("test", 7)):
        s = splits[name]
        assert s.images.shape == (n, 32, 32, 3) and s.images.dtype == np.uint8
        assert s.labels.dtype == np.int64
        np.testing.assert_array_equal(s.images, written[name][0])
        np.testing.assert_array_equal(s.labels, written[name][1])
        assert s.classes == F.CIFAR10_NAMES
        assert s.meta["md5_verified"] == []


def test_fixture_is_a_python2_pickle(tmp_path: Path) -> None:
    """The default fixture holds Python 2 str opcodes and numpy.core globals, like the official files."""
    import pickletools

    F.write_cifar10(tmp_path, n_per_batch=2)
    raw = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    ops = {(op.name, arg) for op, arg, _ in pickletools.genops(raw) if op.name in ("SHORT_BINSTRING", "GLOBAL")}
    assert ("SHORT_BINSTRING", "data") in ops and ("GLOBAL", "numpy.core.multiarray _reconstruct") in ops
    assert not any(name == "BINUNICODE" for name, _ in ops)


def test_cifar10_chw_to_hwc(tmp_path: Path) -> None:
    """Pixel (r, c) of channel k sits at data[k * 1024 + r * 32 + c] in the file."""
    F.write_cifar10(tmp_path, n_per_batch=2)
    raw = cifar.str_keys(cifar.unpickle((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()))["data"]
    img = load_cifar10(tmp_path)["train"].images[0]
    for k, r, c in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
        assert img[r, c, k] == raw[0, k * 1024 + r * 32 + c]


@pytest.mark.parametrize("label,col,n_classes", [("fine", 1, 100), ("coarse", 2, 20)])
def test_cifar100_fine_and_coarse(tmp_path: Path, label: str, col: int, n_classes: int) -> None:
    written = F.write_cifar100(tmp_path, n_train=30, n_test=10, key_type="bytes")
    splits = load_cifar100(tmp_path, label=label)
    for name in ("train", "test"):
        np.testing.assert_array_equal(splits[name].images, written[name][0])
        np.testing.assert_array_equal(splits[name].labels, written[name][col])
        assert splits[name].num_classes == n_classes
    assert splits["train"].classes == (F.CIFAR100_FINE if label == "fine" else F.CIFAR100_COARSE)


def test_pnc_data_root_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    F.write_cifar10(tmp_path / "cifar10", n_per_batch=3)
    F.write_cifar100(tmp_path / "cifar100", n_train=4, n_test=2)
    F.write_cifar10c(tmp_path / "cifar10" / "CIFAR-10-C", n=10)
    F.write_imagenet(tmp_path / "imagenet", train_per_class=1, val_per_class=1)
    F.write_mini_imagenet_pickle(tmp_path / "mini_imagenet", size=8)
    F.write_office_home(tmp_path / "office_home", per_class=1, domains=["Art"])
    monkeypatch.setenv("PNC_DATA_ROOT", str(tmp_path))
    assert len(load_cifar10()["train"]) == 15
    assert len(load_cifar100()["test"]) == 2
    assert len(load_cifar10c(corruption="gaussian_noise", severity=1)) == 2
    assert len(load_imagenet()["val"]) == 3
    assert len(load_mini_imagenet()["train"]) == 25
    assert len(load_office_home(domain="Art")["train"]) == 65
    F.write_cifar10n(tmp_path / "cifar10", np.arange(50000) % 10)
    assert load_cifar_n()["clean"].shape == (50000,)


def test_md5_auto_skips_fixtures_and_true_checks_them(tmp_path: Path) -> None:
    F.write_cifar10(tmp_path, n_per_batch=4)
    assert load_cifar10(tmp_path)["train"].meta["md5_verified"] == []
    assert load_cifar10(tmp_path, verify_md5=False)["train"].meta["md5_verified"] == []
    with pytest.raises(DataError, match=r"(?s)data_batch_1: md5 .* differs from the published c99cafc1.*verify_md5=False"):
        load_cifar10(tmp_path, verify_md5=True)


def test_md5_auto_checks_real_sized_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file with the real row count is checked; here the 'real' sizes and md5s are the fixture's own."""
    F.write_cifar10(tmp_path, n_per_batch=4)
    top = tmp_path / "cifar-10-batches-py"
    monkeypatch.setattr(cifar, "CIFAR_REAL_ROWS", {**cifar.CIFAR_REAL_ROWS, "data_batch_2": 4})
    with pytest.raises(DataError, match=r"data_batch_2: md5"):
        load_cifar10(tmp_path)
    real_md5 = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in top.iterdir()}
    monkeypatch.setattr(cifar, "CIFAR_MD5", {**cifar.CIFAR_MD5, **real_md5})
    assert load_cifar10(tmp_path)["test"].meta["md5_verified"] == ["data_batch_2"]
    monkeypatch.setattr(cifar, "CIFAR_REAL_ROWS", {k: 4 for k in cifar.CIFAR_REAL_ROWS})
    verified = load_cifar10(tmp_path)["train"].meta["md5_verified"]
    assert sorted(verified) == sorted(real_md5)  # all six data files and batches.meta


# ---------------------------------------------------------------- CIFAR-10N / CIFAR-100N
def test_cifar10n_keys_values_and_noise_rates(tmp_path: Path) -> None:
    train = F.write_cifar10(tmp_path, n_per_batch=200)["train"][1]
    written = F.write_cifar10n(tmp_path, train)
    sets = load_cifar_n(tmp_path / "CIFAR-10_human.pt", train_labels=train)
    assert set(sets) == {"clean", "aggre", "random1", "random2", "random3", "worse"}
    for key, name in [("clean_label", "clean"), ("aggre_label", "aggre"), ("worse_label", "worse"),
                      ("random_label2", "random2")]:
        assert sets[name].dtype == np.int64
        np.testing.assert_array_equal(sets[name], written[key])
    rates = noise_rates(sets)
    assert rates["clean"] == 0.0
    assert rates["aggre"] == pytest.approx(0.09, abs=1e-3) and rates["worse"] == pytest.approx(0.402, abs=1e-3)


def test_cifar10n_default_length_50000_and_folder_path(tmp_path: Path) -> None:
    labels = np.arange(50000) % 10
    F.write_cifar10n(tmp_path / "CIFAR-10_human.pt", labels)
    sets = load_cifar_n(tmp_path)  # a folder: the official file name is appended
    assert sets["clean"].shape == (50000,)
    assert noise_rates(sets)["random1"] == pytest.approx(0.1723, abs=1e-4)


def test_cifar100n_with_coarse_sets(tmp_path: Path) -> None:
    fine = np.arange(300) % 100
    coarse = fine // 5
    written = F.write_cifar10n(tmp_path, fine, dataset="cifar100",
                               extra={"clean_coarse_label": coarse, "noisy_coarse_label": (coarse + 1) % 20})
    sets = load_cifar_n(tmp_path, dataset="cifar100", train_labels=fine)
    assert set(sets) == {"clean", "noisy", "clean_coarse", "noisy_coarse"}
    np.testing.assert_array_equal(sets["noisy"], written["noisy_label"])
    rates = noise_rates(sets)
    assert rates["noisy"] == pytest.approx(0.402, abs=0.01) and rates["noisy_coarse"] == 1.0


def test_cifar_n_tensors_fall_back_to_weights_only(tmp_path: Path) -> None:
    import torch

    y = np.arange(40) % 10
    keys = ["clean_label", "aggre_label", "random_label1", "random_label2", "random_label3", "worse_label"]
    torch.save({k: torch.from_numpy(y) for k in keys}, tmp_path / "CIFAR-10_human.pt")
    sets = load_cifar_n(tmp_path, train_labels=y)
    np.testing.assert_array_equal(sets["worse"], y)


def test_cifar_n_never_runs_pickled_code(tmp_path: Path) -> None:
    import os
    import pickle
    import zipfile

    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    pt = tmp_path / "CIFAR-10_human.pt"
    with zipfile.ZipFile(pt, "w") as z:
        z.writestr("CIFAR-10_human/data.pkl", pickle.dumps({"clean_label": Evil()}, protocol=2))
        z.writestr("CIFAR-10_human/version", "3\n")
    with pytest.raises(DataError, match=r"(?s)CIFAR-10_human.pt: data.pkl refers to (posix|os|nt)\.system"):
        load_cifar_n(pt)
    assert not marker.exists()


# ---------------------------------------------------------------- CIFAR-10-C
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_cifar10c_severity_rows(tmp_path: Path, severity: int) -> None:
    written = F.write_cifar10c(tmp_path, ["gaussian_noise", "saturate"], n=25)
    s = load_cifar10c(tmp_path, corruption="saturate", severity=severity)
    rows = slice((severity - 1) * 5, severity * 5)
    assert s.images.shape == (5, 32, 32, 3) and s.images.dtype == np.uint8 and type(s.images) is np.ndarray
    np.testing.assert_array_equal(s.images, written["saturate"][rows])
    np.testing.assert_array_equal(s.labels, written["labels"][rows].astype(np.int64))
    assert s.classes[0] == "airplane" and s.meta == {"corruption": "saturate", "severity": severity, "rows": [rows.start, rows.stop]}


def test_cifar10c_unknown_corruption_and_severity(tmp_path: Path) -> None:
    F.write_cifar10c(tmp_path, n=10)
    assert len(CIFAR10C_CORRUPTIONS) == 19
    with pytest.raises(DataError, match="Did you mean 'gaussian_noise'"):
        load_cifar10c(tmp_path, corruption="gausian_noise", severity=1)
    with pytest.raises(DataError, match="severity must be an integer 1..5"):
        load_cifar10c(tmp_path, corruption="gaussian_noise", severity=6)


# ---------------------------------------------------------------- Mini-ImageNet
def test_mini_imagenet_csv(tmp_path: Path) -> None:
    written = F.write_mini_imagenet_csv(tmp_path, classes_per_part=(3, 1, 1), per_class=6, size=12)
    splits = load_mini_imagenet(tmp_path)
    wnids = sorted(f[:9] for names in written.values() for f in names)
    classes = sorted(set(wnids))
    tr, te = splits["train"], splits["test"]
    assert tr.classes == te.classes == classes
    assert tr.images is None and len(tr) == 25 and len(te) == 5  # 5/6 of each class to train
    assert np.bincount(tr.labels).tolist() == [5] * 5 and np.bincount(te.labels).tolist() == [1] * 5
    for s in (tr, te):  # each path's wnid prefix is its class
        assert all(tr.classes[y] == p.name[:9] for p, y in zip(s.paths, s.labels))
    assert not set(tr.paths) & set(te.paths)
    assert te.image(0).shape == (12, 12, 3)
    assert splits["train"].meta["format"] == "csv"


def test_mini_imagenet_pickle_exact_images(tmp_path: Path) -> None:
    per_wnid = F.write_mini_imagenet_pickle(tmp_path, classes_per_part=(2, 1, 1), per_class=12, size=8)
    splits = load_mini_imagenet(tmp_path, seed=None)  # first 10 of each class (file order) to train
    tr, te = splits["train"], splits["test"]
    assert tr.images.shape == (40, 8, 8, 3) and te.images.shape == (8, 8, 8, 3)
    assert tr.classes == sorted(per_wnid)
    for c, wnid in enumerate(tr.classes):
        got = tr.images[tr.labels == c]
        want = per_wnid[wnid]
        # class_dict order is the file order of the scattered rows: compare as sets of images
        idx = np.sort(np.array([np.flatnonzero((want == g).all(axis=(1, 2, 3)))[0] for g in got]))
        assert len(idx) == 10 and len(set(idx.tolist())) == 10
    assert tr.meta["format"] == "pickle"


def test_mini_imagenet_auto_prefers_pickle_and_layout_override(tmp_path: Path) -> None:
    F.write_mini_imagenet_csv(tmp_path, per_class=6, size=8)
    F.write_mini_imagenet_pickle(tmp_path, per_class=6, size=8)
    assert load_mini_imagenet(tmp_path)["train"].meta["format"] == "pickle"
    assert load_mini_imagenet(tmp_path, layout="csv")["train"].meta["format"] == "csv"


def test_mini_imagenet_split_seeded_and_deterministic(tmp_path: Path) -> None:
    F.write_mini_imagenet_pickle(tmp_path, per_class=12, size=8)
    a = load_mini_imagenet(tmp_path, seed=0)["train"]
    b = load_mini_imagenet(tmp_path, seed=0)["train"]
    c = load_mini_imagenet(tmp_path, seed=1)["train"]
    assert a.digest() == b.digest() and a.digest() != c.digest()
    assert np.bincount(a.labels).tolist() == [10] * 5
    assert np.bincount(load_mini_imagenet(tmp_path, train_per_class=300)["test"].labels).tolist() == [6] * 5


# ---------------------------------------------------------------- ImageNet
def test_imagenet_imagefolder(tmp_path: Path) -> None:
    wnids = F.write_imagenet(tmp_path, wnids=["n02000000", "n01000000", "n03000000"], train_per_class=3,
                             val_per_class=2, size=10)
    splits = load_imagenet(tmp_path)
    assert set(splits) == {"train", "val"}
    tr, va = splits["train"], splits["val"]
    assert tr.classes == va.classes == sorted(wnids)
    assert tr.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and va.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert all(p.parent.name == tr.classes[y] for p, y in zip(tr.paths + va.paths, np.r_[tr.labels, va.labels]))
    assert tr.images is None and tr.image(4).shape == (10, 10, 3) and tr.image(4).dtype == np.uint8


# ---------------------------------------------------------------- Office-Home
def test_office_home_class_list_is_sorted() -> None:
    assert len(OFFICE_HOME_CLASSES) == 65 and list(OFFICE_HOME_CLASSES) == sorted(OFFICE_HOME_CLASSES)


@pytest.mark.parametrize("dirname", ["Real World", "Real_World", "RealWorld"])
def test_office_home_real_world_spellings(tmp_path: Path, dirname: str) -> None:
    F.write_office_home(tmp_path, per_class=2, domains=["Real_World"], domain_dirname=dirname)
    for domain in ("Real_World", "Real World"):
        splits = load_office_home(tmp_path, domain=domain)
        assert splits["train"].classes == list(OFFICE_HOME_CLASSES)
        assert len(splits["train"]) == len(splits["test"]) == 65
        assert splits["train"].meta["folder"] == dirname


def test_office_home_split_stratified_and_deterministic(tmp_path: Path) -> None:
    counts = {c: 5 + (i % 4) * 5 for i, c in enumerate(OFFICE_HOME_CLASSES)}  # 5, 10, 15, 20 images
    F.write_office_home(tmp_path, per_class=counts, domains=["Clipart"], size=4)
    a = load_office_home(tmp_path, domain="Clipart")
    b = load_office_home(tmp_path, domain="Clipart")
    c = load_office_home(tmp_path, domain="Clipart", seed=1)
    n = np.array(list(counts.values()))
    assert np.bincount(a["train"].labels, minlength=65).tolist() == (n * 4 // 5).tolist()
    assert np.bincount(a["test"].labels, minlength=65).tolist() == (n // 5).tolist()
    assert a["train"].paths == b["train"].paths and a["train"].paths != c["train"].paths
    assert not set(a["train"].paths) & set(a["test"].paths)
    assert all(p.parent.name == OFFICE_HOME_CLASSES[y] for p, y in zip(a["test"].paths, a["test"].labels))
    assert a["train"].image(0).shape == (4, 4, 3)


def test_office_home_root_may_hold_domains_directly(tmp_path: Path) -> None:
    F.write_office_home(tmp_path, per_class=1, domains=["Product"], top=None)
    splits = load_office_home(tmp_path, domain="Product")
    assert len(splits["train"]) == 65 and len(splits["test"]) == 0  # one image per class: train only


# ---------------------------------------------------------------- the shared per-class split
@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.one_of(st.none(), st.integers(0, 3)))
def test_stratified_split_counts_and_partition(labels: list[int], seed: int | None) -> None:
    y = np.array(labels)
    counts = np.bincount(y, minlength=5)
    k = counts // 2
    tr, te = stratified_split(y, k, seed)
    assert np.bincount(y[tr], minlength=5).tolist() == k.tolist()
    assert sorted(np.r_[tr, te].tolist()) == list(range(len(y)))
    if seed is None:  # the first k of each class in file order
        for c in range(5):
            assert tr[y[tr] == c].tolist() == np.flatnonzero(y == c)[: k[c]].tolist()
