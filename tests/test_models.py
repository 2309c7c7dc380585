"""Model registry and factory: names, sources, small-image adaptations, local weights only."""
from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
import torch
from torch import nn

from lock import LOCK_FILE, locked_version
from pnc import catalog
from pnc.errors import ModelError
from pnc.models import (
    MODEL_NAMES_FILE,
    CifarResNet,
    build_model,
    installed_model_names,
    model_defaults,
    resolve_source,
    swin_geometry,
)

SWIN_TINY = "swin_tiny_patch4_window7_224"


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point the torch hub and Hugging Face caches at empty folders."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch_hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    yield tmp_path
    torch.hub.set_dir(old)


def stage_grids(model: nn.Module) -> list[int]:
    return [stage.blocks[0].input_resolution[0] for stage in model.layers]


# --- the committed name lists -------------------------------------------------------------------


def test_model_names_json_is_for_the_locked_libraries():
    """model_names.json holds for the torchvision and timm versions of requirements.lock (`make lock` writes both)."""
    committed = json.loads(MODEL_NAMES_FILE.read_text())
    for lib in ("torchvision", "timm"):
        assert committed["versions"][lib] == locked_version(lib), (
            f"{MODEL_NAMES_FILE} was generated from {lib} {committed['versions'][lib]}, {LOCK_FILE.name} pins "
            f"{locked_version(lib)}: regenerate both with `make lock`")


def test_model_names_json_matches_installed_libraries():
    committed = json.loads(MODEL_NAMES_FILE.read_text())
    installed = installed_model_names()
    for lib in ("torchvision", "timm"):
        assert committed[lib] == sorted(committed[lib]), f"{lib} names in {MODEL_NAMES_FILE} are not sorted"
        assert committed[lib] == installed[lib], (
            f"{MODEL_NAMES_FILE} is stale for {lib} (committed for {committed['versions'][lib]}, installed "
            f"{installed['versions'][lib]}): regenerate it with `make lock` (or `python bench/make_model_names.py`) and commit it"
        )


# --- name resolution ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, source",
    [("resnet20", "pnc"), ("cifar_resnet26", "pnc"), ("resnet18", "torchvision"), ("swin_t", "torchvision"),
     (SWIN_TINY, "timm"), ("resnet50.a1_in1k", "timm")],
)
def test_resolve_source(name, source):
    assert resolve_source(name) == source


def test_unknown_name_says_did_you_mean():
    with pytest.raises(ModelError, match=r"unknown model 'swin_tiny_patch4_window7_22'.*Did you mean.*"
                                         r"swin_tiny_patch4_window7_224"):
        build_model("swin_tiny_patch4_window7_22", num_classes=10)


def test_unknown_source_and_name_missing_from_source():
    with pytest.raises(ModelError, match="unknown model source 'timmm'.*Did you mean 'timm'"):
        build_model("resnet18", num_classes=10, source="timmm")
    with pytest.raises(ModelError, match="pnc has no model 'resnet18'.*Did you mean"):
        build_model("resnet18", num_classes=10, source="pnc")


def test_bad_keyword_argument_is_a_model_error():
    with pytest.raises(ModelError, match="bad model argument"):
        build_model("resnet20", num_classes=10, no_such_argument=1)


# --- pnc's CIFAR ResNet -------------------------------------------------------------------------


@pytest.mark.parametrize("depth", catalog.CIFAR_RESNET_DEPTHS)
def test_cifar_resnet_layout(depth):
    model = build_model(f"resnet{depth}", num_classes=10)
    n = (depth - 2) // 6
    assert isinstance(model, CifarResNet)
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [n, n, n]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == depth  # 6n 3x3 convs in blocks + the stem conv, + fc = 6n+2 layers
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
            model.layer3[0].conv1.out_channels] == [16, 32, 64]
    assert [model.layer2[0].conv1.stride, model.layer3[0].conv1.stride] == [(2, 2), (2, 2)]
    # option B: 1x1 conv projections exactly where the shape changes
    assert isinstance(model.layer1[0].downsample, nn.Identity)
    assert model.layer2[0].downsample[0].kernel_size == (1, 1)
    assert model.fc.in_features == 64 and model.fc.out_features == 10
    assert dict(model.named_modules())["layer3.0"] is model.layer3[0]


def test_cifar_resnet20_parameter_count():
    # He et al. report 0.27M for option A; option B adds the two 1x1 projections (+BN).
    count = sum(p.numel() for p in build_model("resnet20", num_classes=10).parameters())
    assert 270_000 < count < 280_000


def test_cifar_resnet_depth_and_width_overrides():
    assert build_model("cifar_resnet26", num_classes=3).depth == 26
    model = build_model("resnet8", num_classes=3, in_chans=1, widths=(8, 16, 32))
    assert model.conv1.in_channels == 1 and model.fc.in_features == 32


def test_pnc_model_rejects_cifar_stem_false():
    with pytest.raises(ModelError, match="always have the CIFAR stem"):
        build_model("resnet20", num_classes=10, cifar_stem=False)


# --- small-image adaptations --------------------------------------------------------------------


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_cifar_stem_is_automatic_at_small_sizes(source):
    small = build_model("resnet18", num_classes=10, image_size=32, source=source)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    large = build_model("resnet18", num_classes=10, image_size=224, source=source)
    assert large.conv1.kernel_size == (7, 7) and not isinstance(large.maxpool, nn.Identity)
    kept = build_model("resnet18", num_classes=10, image_size=32, source=source, cifar_stem=False)
    assert kept.conv1.kernel_size == (7, 7)
    forced = build_model("resnet18", num_classes=10, image_size=224, source=source, cifar_stem=True)
    assert forced.conv1.stride == (1, 1)


def test_cifar_stem_on_a_model_without_resnet_stem_fails():
    with pytest.raises(ModelError, match="needs a ResNet-style stem"):
        build_model(SWIN_TINY, num_classes=10, cifar_stem=True)


def test_in_chans_for_torchvision_without_cifar_stem():
    model = build_model("resnet18", num_classes=10, in_chans=1, image_size=224)
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (7, 7)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize(
    "image_size, patch, grids",
    [(32, 2, [16, 8, 4, 2]), (84, 3, [28, 14, 7, 4]), (224, 4, [56, 28, 14, 7]), (16, 2, [8, 4, 2, 1])],
)
def test_timm_swin_geometry(image_size, patch, grids):
    assert swin_geometry(image_size)[0] == patch
    model = build_model(SWIN_TINY, num_classes=10, image_size=image_size)
    assert model.patch_embed.patch_size == (patch, patch)
    assert stage_grids(model) == grids


def test_keyword_arguments_override_registry_defaults():
    assert model_defaults(SWIN_TINY, "timm", 32) == {"img_size": 32, "patch_size": 2, "window_size": 4}
    model = build_model(SWIN_TINY, num_classes=10, image_size=32, patch_size=4)
    assert stage_grids(model) == [8, 4, 2, 1]
    assert model.layers[0].blocks[0].window_size == (4, 4)


def test_init_is_deterministic_given_torch_seed():
    for name in ("resnet20", "resnet18", SWIN_TINY):
        torch.manual_seed(3)
        a = build_model(name, num_classes=10).state_dict()
        torch.manual_seed(3)
        b = build_model(name, num_classes=10).state_dict()
        torch.manual_seed(4)
        c = build_model(name, num_classes=10).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert not all(torch.equal(a[k], c[k]) for k in a), name


# --- weights: local files only ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, source, where",
    [("resnet20", "pnc", None), ("resnet18", "torchvision", "resnet18-f37072fd.pth"),
     ("resnet18", "timm", "resnet18"), (SWIN_TINY, "timm", "swin_tiny_patch4_window7_224")],
)
def test_pretrained_without_local_weights_explains_the_fix(empty_caches, name, source, where):
    with pytest.raises(ModelError) as info:
        build_model(name, num_classes=10, source=source, pretrained=True)
    message = str(info.value)
    assert "cannot download" in message and "weights:" in message and "pretrained: false" in message
    if where:
        assert "place the file at" in message and where in message


def test_missing_weights_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        build_model("resnet20", num_classes=10, weights=tmp_path / "nope.pth")


def test_torchvision_weights_file_new_head_and_gray_input(tmp_path):
    torch.manual_seed(0)
    source = build_model("resnet18", num_classes=1000, image_size=224)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = build_model("resnet18", num_classes=10, image_size=224, in_chans=1, weights=path)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc.out_features == 10
    assert torch.allclose(model.conv1.weight, source.conv1.weight.sum(1, keepdim=True))


def test_weights_from_torch_hub_cache(empty_caches):
    torch.manual_seed(0)
    source = build_model("resnet18", num_classes=1000, image_size=224)
    cache = empty_caches / "torch_hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(source.state_dict(), cache / "resnet18-f37072fd.pth")
    model = build_model("resnet18", num_classes=10, image_size=32, pretrained=True)
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert model.conv1.kernel_size == (3, 3)  # the CIFAR stem replaces the pretrained conv1


def test_timm_weights_from_hugging_face_cache(empty_caches):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = build_model("resnet18", num_classes=1000, image_size=224, source="timm")
    snapshot = empty_caches / "hf" / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file(source.state_dict(), str(snapshot / "model.safetensors"))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    model = build_model("resnet18", num_classes=7, image_size=224, source="timm", pretrained=True)
    assert torch.equal(model.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    assert model.fc.out_features == 7


def test_pnc_weights_file_roundtrip(tmp_path):
    source = build_model("resnet8", num_classes=10)
    path = tmp_path / "r8.pth"
    torch.save(source.state_dict(), path)
    model = build_model("resnet8", num_classes=10, weights=path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in source.state_dict().items())
    with pytest.raises(ModelError, match="does not fit"):
        build_model("resnet14", num_classes=10, weights=path)
