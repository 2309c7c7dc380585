"""What exists: datasets, their domains and label sets, corruptions, pnc's own model families.

Stdlib only, so that ``pnc validate`` answers without importing torch. The committed list of
timm/torchvision model names lives in ``model_names.json`` beside this file; a test keeps it in
sync with the installed libraries.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_size: int  # native side length in pixels
    channels: int
    splits: tuple[str, ...]
    embedded: bool = False  # generated from installed packages, no files needed
    domains: tuple[str, ...] = ()
    label_sets: tuple[str, ...] = ()  # human label sets usable as label noise
    raw_dir: str = ""  # folder under the data root
    description: str = ""
    loader: str = ""  # "module:function" reading the raw files: (root, **{domain, train_fraction, seed} with domains)
    user: bool = False  # the researcher's own files under dataset.root; classes, channels and size read from them


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in [
        DatasetInfo("digits", 10, 8, 1, ("train", "test"), embedded=True,
                    description="scikit-learn's 1,797 handwritten digits (8x8, 0..16), seeded stratified split"),
        DatasetInfo("digits_domains", 10, 16, 1, ("train", "test"), embedded=True,
                    domains=("handwritten", "typeset", "segment"),
                    description="ten digit classes in three rendering styles, generated offline by a DVC stage"),
        DatasetInfo("cifar10", 10, 32, 3, ("train", "test"), raw_dir="cifar10", loader="pnc.data.cifar:load_cifar10",
                    label_sets=("clean", "aggre", "random1", "random2", "random3", "worse"),
                    description="CIFAR-10 python pickles; CIFAR-10N human label sets"),
        DatasetInfo("cifar100", 100, 32, 3, ("train", "test"), raw_dir="cifar100", loader="pnc.data.cifar:load_cifar100",
                    label_sets=("clean", "noisy"),
                    description="CIFAR-100 python pickles; CIFAR-100N human label set"),
        DatasetInfo("mini_imagenet", 100, 84, 3, ("train", "test"), raw_dir="mini_imagenet", loader="pnc.data.mini_imagenet:load_mini_imagenet",
                    description="Mini-ImageNet, all 100 classes merged, 500 train / 100 test per class"),
        DatasetInfo("imagenet", 1000, 224, 3, ("train", "val"), raw_dir="imagenet", loader="pnc.data.imagenet:load_imagenet",
                    description="ILSVRC2012 ImageFolder layout"),
        DatasetInfo("office_home", 65, 224, 3, ("train", "test"), raw_dir="office_home", loader="pnc.data.office_home:load_office_home",
                    domains=("Art", "Clipart", "Product", "Real_World"),
                    description="Office-Home, four domains, seeded per-domain splits"),
        DatasetInfo("image_folder", 0, 0, 3, ("train", "test"), loader="pnc.data.user:load_image_folder", user=True,
                    description="your images, one folder per split and class (torchvision ImageFolder layout)"),
        DatasetInfo("arrays", 0, 0, 3, ("train", "test"), loader="pnc.data.user:load_arrays", user=True,
                    description="your arrays: <split>/images.npy (uint8 N x H x W x C) + labels.npy, optional classes.json"),
    ]
}

# Label-noise kinds of a noise_sweep and the datasets each fits (None = any dataset).
LABEL_NOISE_KINDS: dict[str, tuple[str, ...] | None] = {
    "symmetric": None,  # a fraction r of samples gets a uniformly random label
    "class_dependent": None,  # labels flipped through a seeded transition matrix
    "human": ("cifar10", "cifar100"),  # CIFAR-10N / CIFAR-100N human label sets
}

# CIFAR-10-C corruptions whose formulas pnc applies to training images (DATA.md).
CORRUPTIONS: tuple[str, ...] = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")
# All 19 CIFAR-10-C corruptions (for evaluation on the published .npy files).
CIFAR10C_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate",
)
MAX_SEVERITY = 5
# Version of how a cell's layers are measured, part of every cell id: bumped when the same spec would log different
# curves (2: taps with identical reduced outputs are measured once, e.g. the pooled last block and "penultimate").
MEASUREMENT_VERSION = 2
# Train share of a dataset without official splits (Office-Home domains, the digit domains' transfer splits).
TRAIN_FRACTION = 0.8

# pnc's CIFAR-style ResNets (He et al. 2016, sec. 4.2): depth 6n+2, widths 16/32/64.
CIFAR_RESNET_DEPTHS: tuple[int, ...] = (8, 14, 20, 32, 44, 56, 110)
_CIFAR_RESNET_RE = re.compile(r"^cifar_resnet(\d+)$")


def pnc_model_names() -> list[str]:
    return [f"resnet{d}" for d in CIFAR_RESNET_DEPTHS] + [f"cifar_resnet{d}" for d in CIFAR_RESNET_DEPTHS]


def cifar_resnet_depth(name: str) -> int | None:
    """Depth of a pnc CIFAR-style ResNet name (``resnet20``, ``cifar_resnet26``), else None."""
    m = re.fullmatch(r"resnet(\d+)", name)
    if m and int(m.group(1)) in CIFAR_RESNET_DEPTHS:
        return int(m.group(1))
    m = _CIFAR_RESNET_RE.fullmatch(name)
    if m and (int(m.group(1)) - 2) % 6 == 0 and int(m.group(1)) >= 8:
        return int(m.group(1))
    return None


@lru_cache(maxsize=1)
def library_model_names() -> dict[str, frozenset[str]]:
    """{'torchvision': names, 'timm': names} from the committed ``model_names.json``."""
    path = Path(__file__).with_name("model_names.json")
    data = json.loads(path.read_text())
    return {k: frozenset(v) for k, v in data.items() if isinstance(v, list)}


MODEL_SOURCES = ("pnc", "torchvision", "timm")  # where a model name is looked up ("auto" in a spec: model_source)


def model_source(name: str) -> str | None:
    """Which registry resolves ``name`` by default: 'pnc', 'torchvision', 'timm', or None."""
    if cifar_resnet_depth(name) is not None:
        return "pnc"
    libs = library_model_names()
    for src in MODEL_SOURCES[1:]:
        if name in libs.get(src, ()):
            return src
    if "." in name and name.split(".", 1)[0] in libs.get("timm", ()):  # timm names with a weights tag
        return "timm"
    return None


def model_depth(name: str) -> int:
    """The number in a model's name (resnet14 -> 14; 0 without one): models sort by depth, not as text."""
    m = re.search(r"(\d+)", str(name))
    return int(m.group(1)) if m else 0


def model_order(models: Any) -> list[str]:
    """Distinct model names, shallowest first (resnet8 before resnet14)."""
    return sorted({str(m) for m in models}, key=lambda m: (model_depth(m), m))


def all_model_names() -> list[str]:
    libs = library_model_names()
    return sorted(set(pnc_model_names()) | set().union(*libs.values()))
