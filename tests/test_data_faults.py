"""Every missing or broken dataset input raises DataError naming the file, the expectation and the fix."""
from __future__ import annotations

import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fakedata as F
from pnc.data.cifar import load_cifar10, load_cifar100
from pnc.data.cifar10c import load_cifar10c
from pnc.data.cifar10n import load_cifar_n
from pnc.data.imagenet import load_imagenet
from pnc.data.mini_imagenet import load_mini_imagenet
from pnc.data.office_home import load_office_home
from pnc.errors import DataError, PncError

COMMON = ("Fix:", "PNC_DATA_ROOT", "README.md section 'Real datasets'")


def fails(fn: Callable[[], Any], *needles: str, layout: str | None = None) -> str:
    """Run ``fn``; it must raise DataError whose message holds the fix hints, ``needles`` and ``layout``."""
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert isinstance(info.value, PncError)
    for s in COMMON + needles:
        assert s in msg, f"{s!r} missing from:\n{msg}"
    if layout:
        assert "Expected layout:" in msg and layout in msg, msg
    return msg


def edit_pickle(path: Path, change: Callable[[dict], Any]) -> None:
    d = pickle.loads(path.read_bytes(), encoding="latin1")
    path.write_bytes(pickle.dumps(change(d), protocol=2))


@pytest.fixture
def c10(tmp_path: Path) -> Path:
    F.write_cifar10(tmp_path, n_per_batch=6)
    return tmp_path


# ---------------------------------------------------------------- CIFAR
def test_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "nowhere" / "cifar10"
    msg = fails(lambda: load_cifar10(root), str(root / "cifar-10-batches-py"), "does not exist",
                "cifar-10-python.tar.gz", layout="data_batch_1 ... data_batch_5")
    assert f"nearest existing folder {tmp_path}/" in msg


def test_missing_root_default_location_mentions_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNC_DATA_ROOT", str(tmp_path))
    fails(load_cifar100, str(tmp_path / "cifar100" / "cifar-100-python"), "$PNC_DATA_ROOT/cifar100/",
          layout="cifar-100-python/")


def test_missing_one_file(c10: Path) -> None:
    (c10 / "cifar-10-batches-py" / "data_batch_3").unlink()
    msg = fails(lambda: load_cifar10(c10), "data_batch_3", "Found:", "data_batch_1, data_batch_2, data_batch_4")
    assert "missing file(s)" in msg


def test_truncated_pickle(c10: Path) -> None:
    f = c10 / "cifar-10-batches-py" / "data_batch_2"
    f.write_bytes(f.read_bytes()[: 5000])
    fails(lambda: load_cifar10(c10), "data_batch_2: cannot unpickle", "truncated", "delete")


def test_pickle_not_a_dict(c10: Path) -> None:
    (c10 / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))
    fails(lambda: load_cifar10(c10), "test_batch: expected a pickled dict, got list")


def test_pickle_without_data(c10: Path) -> None:
    edit_pickle(c10 / "cifar-10-batches-py" / "data_batch_1", lambda d: {k: v for k, v in d.items() if k != "data"})
    fails(lambda: load_cifar10(c10), "data_batch_1: the pickled dict has no 'data' key", "keys: batch_label")


def test_wrong_data_shape(c10: Path) -> None:
    edit_pickle(c10 / "cifar-10-batches-py" / "data_batch_4", lambda d: {**d, "data": d["data"][:, :3071]})
    fails(lambda: load_cifar10(c10), "data_batch_4", "(N, 3072)", "got uint8 (6, 3071)")


def test_wrong_data_dtype(c10: Path) -> None:
    edit_pickle(c10 / "cifar-10-batches-py" / "data_batch_4", lambda d: {**d, "data": d["data"].astype(np.float32)})
    fails(lambda: load_cifar10(c10), "data_batch_4", "must be uint8", "float32")


def test_labels_out_of_range(c10: Path) -> None:
    edit_pickle(c10 / "cifar-10-batches-py" / "data_batch_5", lambda d: {**d, "labels": [10] + d["labels"][1:]})
    fails(lambda: load_cifar10(c10), "data_batch_5: labels in 'labels' out of range", "expected 0..9")


def test_label_count_differs_from_images(c10: Path) -> None:
    edit_pickle(c10 / "cifar-10-batches-py" / "test_batch", lambda d: {**d, "labels": d["labels"][:-1]})
    fails(lambda: load_cifar10(c10), "test_batch: 5 labels in 'labels' but 6 images")


def test_cifar100_meta_without_names(tmp_path: Path) -> None:
    F.write_cifar100(tmp_path, n_train=4, n_test=2)
    edit_pickle(tmp_path / "cifar-100-python" / "meta", lambda d: {"fine_label_names": d["fine_label_names"]})
    fails(lambda: load_cifar100(tmp_path, label="coarse"), "meta: expected a list of class names under 'coarse_label_names'")


# ---------------------------------------------------------------- CIFAR-10N
@pytest.fixture
def c10n(tmp_path: Path) -> tuple[Path, np.ndarray]:
    y = np.arange(60) % 10
    F.write_cifar10n(tmp_path, y)
    return tmp_path / "CIFAR-10_human.pt", y


def test_cifar10n_clean_does_not_match_training_order(c10n: tuple[Path, np.ndarray]) -> None:
    pt, y = c10n
    msg = fails(lambda: load_cifar_n(pt, train_labels=np.roll(y, 1)), "CIFAR-10_human.pt", "'clean_label' differs",
                "at 60 of 60 positions", "data_batch_1..5", "github.com/UCSC-REAL/cifar-10-100n")
    assert "first at index 0" in msg


def test_cifar10n_wrong_length(c10n: tuple[Path, np.ndarray]) -> None:
    pt, y = c10n
    fails(lambda: load_cifar_n(pt, train_labels=np.r_[y, y]), "CIFAR-10_human.pt", "has 60 labels",
          "training set has 120")
    fails(lambda: load_cifar_n(pt), "has 60 labels", "(50000)")


def test_cifar10n_not_a_zip(tmp_path: Path) -> None:
    pt = tmp_path / "CIFAR-10_human.pt"
    pt.write_bytes(b"<html>404 Not Found</html>")
    fails(lambda: load_cifar_n(pt), "CIFAR-10_human.pt: not a zip-format torch.save file", "corrupted",
          "download CIFAR-10_human.pt again")


def test_cifar10n_truncated_zip(c10n: tuple[Path, np.ndarray]) -> None:
    pt, _ = c10n
    pt.write_bytes(pt.read_bytes()[:300])
    fails(lambda: load_cifar_n(pt), "CIFAR-10_human.pt", "download CIFAR-10_human.pt again")


def test_cifar10n_missing_key_and_missing_file(tmp_path: Path) -> None:
    F.write_cifar10n(tmp_path, np.arange(50000) % 10, noise={"aggre_label": 0.1})
    fails(lambda: load_cifar_n(tmp_path), "missing key(s) random_label1, random_label2, random_label3, worse_label",
          "found keys: aggre_label, clean_label")
    fails(lambda: load_cifar_n(tmp_path / "none", dataset="cifar100"), "missing file",
          str(tmp_path / "none" / "CIFAR-100_human.pt"), "does not exist")


def test_cifar10n_labels_out_of_range(tmp_path: Path) -> None:
    y = np.arange(20) % 10
    F.write_cifar10n(tmp_path, y, extra={"worse_label": y + 5})
    fails(lambda: load_cifar_n(tmp_path, train_labels=y), "'worse_label' values 5..14 outside 0..9")


# ---------------------------------------------------------------- CIFAR-10-C
@pytest.fixture
def c10c(tmp_path: Path) -> Path:
    F.write_cifar10c(tmp_path, ["fog"], n=10)
    return tmp_path


def test_cifar10c_wrong_shape(c10c: Path) -> None:
    np.save(c10c / "fog.npy", np.zeros((10, 32, 32), np.uint8))
    fails(lambda: load_cifar10c(c10c, corruption="fog", severity=1), "fog.npy: expected uint8 (N, 32, 32, 3)",
          "got uint8 (10, 32, 32)", layout="labels.npy")


def test_cifar10c_wrong_dtype(c10c: Path) -> None:
    np.save(c10c / "fog.npy", np.zeros((10, 32, 32, 3), np.float32))
    fails(lambda: load_cifar10c(c10c, corruption="fog", severity=1), "fog.npy", "got float32")


def test_cifar10c_not_divisible_by_five(c10c: Path) -> None:
    np.save(c10c / "fog.npy", np.zeros((12, 32, 32, 3), np.uint8))
    fails(lambda: load_cifar10c(c10c, corruption="fog", severity=1), "N divisible by 5")


def test_cifar10c_missing_labels(c10c: Path) -> None:
    (c10c / "labels.npy").unlink()
    fails(lambda: load_cifar10c(c10c, corruption="fog", severity=2), "missing file", "labels.npy",
          "Found:", "fog.npy", "zenodo")


def test_cifar10c_missing_corruption_file(c10c: Path) -> None:
    fails(lambda: load_cifar10c(c10c, corruption="snow", severity=2), "missing file", "snow.npy", "fog.npy, labels.npy")


def test_cifar10c_label_count(c10c: Path) -> None:
    np.save(c10c / "labels.npy", np.zeros(5, np.uint8))
    fails(lambda: load_cifar10c(c10c, corruption="fog", severity=1), "labels.npy: 5 labels but fog.npy has 10 images")


def test_cifar10c_truncated_npy(c10c: Path) -> None:
    f = c10c / "fog.npy"
    f.write_bytes(f.read_bytes()[:1000])
    fails(lambda: load_cifar10c(c10c, corruption="fog", severity=1), "fog.npy: not a readable .npy array", "truncated")


# ---------------------------------------------------------------- Office-Home
def test_office_home_missing_domain(tmp_path: Path) -> None:
    F.write_office_home(tmp_path, classes=["Bed"], per_class=1, domains=["Art", "Clipart", "Product"])
    fails(lambda: load_office_home(tmp_path, domain="Real_World"), "no folder for domain 'Real_World'",
          "found domains: Art, Clipart, Product", "'Real World', 'Real_World', 'RealWorld'",
          "OfficeHomeDataset_10072016", layout="Real World/  (or Real_World, RealWorld)")


def test_office_home_missing_class_folder(tmp_path: Path) -> None:
    base = F.write_office_home(tmp_path, per_class=1, domains=["Art"])
    shutil.rmtree(base / "Art" / "Toys")
    (base / "Art" / "toys").mkdir()
    fails(lambda: load_office_home(tmp_path, domain="Art"), "missing class folder(s) Toys",
          "unexpected folder(s) toys", str(base / "Art"))


def test_office_home_empty_class_folder(tmp_path: Path) -> None:
    base = F.write_office_home(tmp_path, per_class=1, domains=["Art"])
    for f in (base / "Art" / "Mug").iterdir():
        f.unlink()
    fails(lambda: load_office_home(tmp_path, domain="Art"), f"class folder {base / 'Art' / 'Mug'} holds no images")


def test_office_home_missing_root_and_unknown_domain(tmp_path: Path) -> None:
    fails(lambda: load_office_home(tmp_path / "oh", domain="Art"), "missing folder", "OfficeHomeDataset_10072016",
          "hemanthdv.org")
    with pytest.raises(DataError, match="Did you mean 'Clipart'"):
        load_office_home(tmp_path, domain="ClipArt")


# ---------------------------------------------------------------- Mini-ImageNet
def test_mini_imagenet_bad_header(tmp_path: Path) -> None:
    F.write_mini_imagenet_csv(tmp_path, per_class=6, size=8)
    f = tmp_path / "val.csv"
    f.write_text("file,class\n" + "\n".join(f.read_text().splitlines()[1:]) + "\n")
    fails(lambda: load_mini_imagenet(tmp_path), "val.csv: first line must be the header 'filename,label'",
          "got 'file,class'", "meta-learning-lstm")


def test_mini_imagenet_missing_csv_and_images(tmp_path: Path) -> None:
    names = F.write_mini_imagenet_csv(tmp_path, per_class=6, size=8)
    (tmp_path / "images" / names["test"][2]).unlink()
    fails(lambda: load_mini_imagenet(tmp_path), "1 of the 30 images named in the CSVs are missing", names["test"][2])
    (tmp_path / "test.csv").unlink()
    fails(lambda: load_mini_imagenet(tmp_path), "missing", str(tmp_path / "test.csv"), "train.csv, val.csv, test.csv")


def test_mini_imagenet_pickle_without_keys_and_truncated(tmp_path: Path) -> None:
    F.write_mini_imagenet_pickle(tmp_path, per_class=6, size=8)
    f = tmp_path / "mini-imagenet-cache-val.pkl"
    f.write_bytes(pickle.dumps({"images": np.zeros((1, 8, 8, 3), np.uint8)}))
    fails(lambda: load_mini_imagenet(tmp_path), "mini-imagenet-cache-val.pkl: expected keys 'image_data' and 'class_dict'",
          "found keys: images")
    f.write_bytes(b"\x80\x04garbage")
    fails(lambda: load_mini_imagenet(tmp_path), "mini-imagenet-cache-val.pkl: cannot unpickle", "truncated")


def test_mini_imagenet_class_too_small(tmp_path: Path) -> None:
    F.write_mini_imagenet_pickle(tmp_path, per_class=1, size=8)
    fails(lambda: load_mini_imagenet(tmp_path), "has 1 images, too few")


# ---------------------------------------------------------------- ImageNet
def test_imagenet_val_not_sorted(tmp_path: Path) -> None:
    F.write_imagenet(tmp_path, flat_val=True, train_per_class=1, val_per_class=2)
    fails(lambda: load_imagenet(tmp_path), f"{tmp_path / 'val'} holds 6 images directly",
          "not sorted into class folders", "valprep.sh", layout="val/")


def test_imagenet_missing_val_and_mismatched_classes(tmp_path: Path) -> None:
    wnids = F.write_imagenet(tmp_path, train_per_class=1, val_per_class=1)
    shutil.rmtree(tmp_path / "val" / wnids[1])
    fails(lambda: load_imagenet(tmp_path), "class folders of", f"missing {wnids[1]}")
    shutil.rmtree(tmp_path / "val")
    fails(lambda: load_imagenet(tmp_path), f"missing folder {tmp_path / 'val'}", "Found:", "train/")
    fails(lambda: load_imagenet(tmp_path / "absent"), "missing folder", "image-net.org")
