"""Layer taps: every model the shipped specs use, at their image sizes; selections; reductions."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from pnc.errors import ModelError
from pnc.features import (
    PENULTIMATE,
    FeatureExtractor,
    channels_last,
    layer_dims,
    projection_matrix,
    select_layers,
)
from pnc.models import build_model

SWIN = "swin_{}_patch4_window7_224"
SWIN_TINY = SWIN.format("tiny")


def check_taps(model: nn.Module, in_chans: int, size: int, batch: int, expected: int) -> dict[str, torch.Tensor]:
    x = torch.randn(batch, in_chans, size, size)
    with FeatureExtractor(model, merge_identical=False) as extractor:
        logits, features = extractor(x)
    assert logits.shape == (batch, model_classes(model))
    assert len(features) == expected, list(features)
    assert list(features)[-1] == PENULTIMATE
    for name, f in features.items():
        assert f.ndim == 2 and f.shape[0] == batch and f.dtype == torch.float32, name
        assert torch.isfinite(f).all(), name
    return features


def model_classes(model: nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


# --- every model of the shipped specs, at its image sizes ---------------------------------------


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("size", [8, 16, 32])
@pytest.mark.parametrize("depth", [8, 14, 20, 32, 56])
def test_pnc_resnet_taps(depth, size, in_chans):
    model = build_model(f"resnet{depth}", num_classes=10, in_chans=in_chans, image_size=size)
    blocks = 3 * (depth - 2) // 6
    features = check_taps(model, in_chans, size, batch=2, expected=blocks + 1)
    dims = [f.shape[1] for f in features.values()]
    assert dims == [16] * (blocks // 3) + [32] * (blocks // 3) + [64] * (blocks // 3) + [64]


TORCHVISION_RESNETS = [("resnet18", 8, 512), ("resnet34", 16, 512), ("resnet50", 16, 2048),
                       ("resnet101", 33, 2048), ("resnet152", 50, 2048)]


@pytest.mark.parametrize("name, blocks, width", TORCHVISION_RESNETS)
def test_torchvision_resnet_taps_cifar(name, blocks, width):
    model = build_model(name, num_classes=10, image_size=32)
    features = check_taps(model, 3, 32, batch=2, expected=blocks + 1)
    assert features[PENULTIMATE].shape[1] == width


@pytest.mark.parametrize("name, blocks, width", TORCHVISION_RESNETS)
def test_torchvision_resnet_taps_224(name, blocks, width):
    # ImageNet (all five) and Office-Home (resnet50, 65 classes); heavy on a CPU, so batch 1
    model = build_model(name, num_classes=65, image_size=224)
    assert model.conv1.kernel_size == (7, 7)
    features = check_taps(model, 3, 224, batch=1, expected=blocks + 1)
    assert features[PENULTIMATE].shape[1] == width


SWIN_CASES = [(v, b, size, batch) for v, b in [("tiny", 12), ("small", 24), ("base", 24), ("large", 24)]
              for size, batch in [(32, 2), (84, 1)]] + [("tiny", 12, 224, 1)]  # heavy cases at batch 1


@pytest.mark.parametrize("variant, blocks, size, batch", SWIN_CASES)
def test_timm_swin_taps(variant, blocks, size, batch):
    model = build_model(SWIN.format(variant), num_classes=100, image_size=size)
    features = check_taps(model, 3, size, batch=batch, expected=blocks + 1)
    assert features[PENULTIMATE].shape[1] == model.num_features


@pytest.mark.parametrize("name, expected", [("resnet18", 9), (SWIN_TINY, 13)])
def test_grayscale_small_inputs(name, expected):
    model = build_model(name, num_classes=10, in_chans=1, image_size=16)
    check_taps(model, 1, 16, batch=2, expected=expected)


def test_torchvision_swin_taps():
    model = build_model("swin_t", num_classes=10, image_size=32)
    features = check_taps(model, 3, 32, batch=2, expected=13)
    assert list(features)[:2] == ["features.1.0", "features.1.1"]


def test_shipped_factory_model_declares_its_blocks():
    """specs/models/plain_cnn.py (digits_measure's control): no residual blocks, its own `pnc_blocks` are the taps."""
    from pathlib import Path

    from pnc.models import build_factory_model

    factory = str(Path(__file__).parents[1] / "specs" / "models" / "plain_cnn.py") + ":build"
    features = check_taps(build_factory_model(factory, num_classes=10, in_chans=1), 1, 16, batch=2, expected=7)
    assert list(features)[:2] == ["features.0", "features.1"]


def test_the_cases_above_cover_every_shipped_spec():
    """Each (model, image size, channels) of specs/*.yaml is built and tapped by one of the tests above:
    a spec that gains a model or a size fails here until a case is added."""
    from pathlib import Path

    from pnc.spec import load_spec

    covered = {(f"resnet{d}", s, c) for d in (8, 14, 20, 32, 56) for s in (8, 16, 32) for c in (1, 3)}
    covered |= {(n, s, 3) for n, _, _ in TORCHVISION_RESNETS for s in (32, 224)}
    covered |= {(SWIN.format(v), s, 3) for v, _, s, _ in SWIN_CASES}
    covered |= {("plain_cnn_untrained", 16, 1)}  # test_shipped_factory_model_declares_its_blocks
    missing = set()
    for path in sorted((Path(__file__).parents[1] / "specs").glob("*.yaml")):
        spec = load_spec(path)
        for m in spec.models:
            if m.uri:  # a logged model is the network its training study built (covered there)
                continue
            key = (m.name, spec.dataset.size, spec.dataset.info.channels)
            if key not in covered:
                missing.add((path.name, *key))
    assert not missing, f"add a build-and-tap case for: {sorted(missing)}"


# --- what a tap holds -------------------------------------------------------------------------


def clone_outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of ``names`` in an eval forward, cloned at once (immune to later in-place ops)."""
    saved: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: saved.__setitem__(n, out.detach().clone())) for n in names]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return saved


@pytest.mark.parametrize("reduction", ["avgpool", "flatten", "project:100000"])
@pytest.mark.parametrize("name", ["resnet18", "resnet20"])
def test_taps_survive_in_place_operations(name, reduction):
    # bn2's output is then changed in place by `out += identity` and ReLU(inplace=True)
    model = build_model(name, num_classes=10, image_size=16)
    x = torch.randn(2, 3, 16, 16)
    exact = clone_outputs(model, ["layer1.0.bn2"], x)["layer1.0.bn2"]
    aliased: dict[str, torch.Tensor] = {}
    handle = model.layer1[0].bn2.register_forward_hook(lambda m, a, out: aliased.setdefault("t", out))
    with FeatureExtractor(model, ["layer1.0.bn2"], reduction=reduction) as extractor:
        _, features = extractor(x)
    handle.remove()
    expected = exact.mean(dim=(2, 3)) if reduction == "avgpool" else exact.flatten(1)  # project:<big> = flatten
    assert torch.allclose(features["layer1.0.bn2"], expected, atol=1e-6)
    assert not torch.allclose(aliased["t"], exact)  # a kept reference would have been overwritten


def test_swin_blocks_pool_over_tokens_channels_last():
    model = build_model(SWIN_TINY, num_classes=10, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    exact = clone_outputs(model, ["layers.1.blocks.1"], x)["layers.1.blocks.1"]
    assert exact.shape == (2, 8, 8, 192)  # timm Swin blocks are (B, H, W, C)
    with FeatureExtractor(model, ["layers.1.blocks.1"]) as extractor:
        _, features = extractor(x)
    assert torch.allclose(features["layers.1.blocks.1"], exact.mean(dim=(1, 2)), atol=1e-5)


def test_channels_last_is_decided_per_module():
    swin = build_model(SWIN_TINY, num_classes=10, image_size=32)
    assert channels_last(swin, swin.layers[0].blocks[0])
    assert channels_last(swin, swin.patch_embed)  # declares output_fmt NHWC
    assert not channels_last(swin, swin.patch_embed.proj)  # a conv inside is NCHW
    resnet = build_model("resnet18", num_classes=10)
    assert not channels_last(resnet, resnet.layer1[0])
    tv_swin = build_model("swin_t", num_classes=10)
    assert channels_last(tv_swin, tv_swin.features[1][0])


@pytest.mark.parametrize("name", ["resnet18", "resnet20", SWIN_TINY])
def test_penultimate_is_the_classifier_input(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with FeatureExtractor(model, ["penultimate"]) as extractor:
        logits, features = extractor(x)
    with torch.no_grad():
        expected_logits = model(x)
    head = model.get_classifier() if hasattr(model, "get_classifier") else model.fc
    assert torch.allclose(logits, expected_logits, atol=1e-5)
    assert torch.allclose(head(features[PENULTIMATE]), expected_logits, atol=1e-4)


def test_inference_mode_and_mode_restored():
    model = build_model("resnet8", num_classes=10).train()
    x = torch.randn(2, 3, 8, 8)
    seen: list[tuple[bool, bool]] = []
    model.layer2.register_forward_hook(lambda m, a, o: seen.append((torch.is_inference_mode_enabled(), m.training)))
    with FeatureExtractor(model) as extractor:
        logits, features = extractor(x)
        assert seen == [(True, False)]  # ran under inference_mode, in eval mode
        assert model.training  # mode restored after the measurement
        assert not any(f.requires_grad for f in [logits, *features.values()])
        probe = nn.Linear(64, 10)
        probe(features[PENULTIMATE]).sum().backward()  # ordinary tensors: probes can train on them
        model(x).sum().backward()  # training with hooks attached: they record nothing
        assert extractor._outputs == {}
    assert model.conv1.weight.grad is not None and probe.weight.grad is not None


def test_features_in_forward_order_and_hooks_removed():
    model = build_model("resnet14", num_classes=10)
    order: list[str] = []
    names = [n for n, _ in select_layers(model)][:-1]
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: order.append(n)) for n in names]
    extractor = FeatureExtractor(model, merge_identical=False)
    _, features = extractor(torch.randn(2, 3, 8, 8))
    assert list(features)[:-1] == order == extractor.layer_names[:-1]
    extractor.close()
    for h in handles:
        h.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# --- selections -------------------------------------------------------------------------------


def test_stage_selection():
    resnet = build_model("resnet20", num_classes=10)
    assert [n for n, _ in select_layers(resnet, "stages")] == ["layer1", "layer2", "layer3", PENULTIMATE]
    swin = build_model(SWIN_TINY, num_classes=10)
    assert [n for n, _ in select_layers(swin, "stages")] == ["layers.0", "layers.1", "layers.2", "layers.3",
                                                              PENULTIMATE]
    _, features = FeatureExtractor(swin, "stages")(torch.randn(1, 3, 32, 32))
    assert [f.shape[1] for f in features.values()] == [96, 192, 384, 768, 768]


def test_pattern_and_type_selections():
    model = build_model("resnet20", num_classes=10)
    names = [n for n, _ in select_layers(model, ["layer3.?", "penultimate"])]
    assert names == ["layer3.0", "layer3.1", "layer3.2", PENULTIMATE]
    star = [n for n, _ in select_layers(model, ["layer3.*"])]
    assert "layer3.0.conv1" in star and "layer3.2" in star
    assert [n for n, _ in select_layers(model, {"types": ["BasicBlock"]})] == [n for n, _ in select_layers(model)][:-1]
    mixed = select_layers(model, {"types": ["Linear"], "names": ["conv1"]})
    assert [n for n, _ in mixed] == ["conv1", "fc"]
    assert [n for n, _ in select_layers(model, "layer2.0")] == ["layer2.0"]


@pytest.mark.parametrize("text, expected", [
    ("{types: [BasicBlock]}", ["layer1.0", "layer2.0", "layer3.0"]),
    ("{types: [BasicBlock], names: [penultimate]}", ["layer1.0", "layer2.0", "layer3.0", PENULTIMATE]),
    ("{names: ['layer[23].0', conv1]}", ["conv1", "layer2.0", "layer3.0"]),
    ("['layer1.*']", "layer1.*"),
    ("stages", None),
])
def test_spec_layer_selection_reaches_the_extractor(tmp_path, text, expected):
    """`measure.layers` in a spec, in each of its forms, taps exactly the modules it names."""
    from pnc.spec import load_spec

    p = tmp_path / "s.yaml"
    p.write_text(f"kind: depth_sweep\nname: t\ndataset: {{name: digits, image_size: 8}}\nmodels: [resnet8]\n"
                 f"measure:\n  layers: {text}\n")
    spec = load_spec(p)
    model = build_model("resnet8", num_classes=10, in_chans=1, image_size=8)
    names = [n for n, _ in select_layers(model, spec.measure.layer_selection)]
    if expected is None:
        assert names == [n for n, _ in select_layers(model, "stages")]
    elif isinstance(expected, str):
        assert names == [n for n, _ in model.named_modules() if n.startswith("layer1.")] and len(names) > 3
    else:
        assert names == expected
    x = torch.randn(2, 1, 8, 8)
    with FeatureExtractor(model, layers=spec.measure.layer_selection, merge_identical=False) as extractor:
        _, every = extractor(x)
    assert list(every) == names
    with FeatureExtractor(model, layers=spec.measure.layer_selection) as extractor:  # identical taps measured once
        _, feats = extractor(x)
    assert list(feats) == [n for n in names if n not in extractor.merged]
    assert all(torch.equal(every[a], every[b]) for a, b in extractor.merged.items())


@pytest.mark.parametrize(
    "selection, match",
    [(["layer4.*"], r"layer pattern 'layer4\.\*'.*matches no module of CifarResNet.*Available: .*layer1"),
     (["layer1.0", "layer1.O"], r"'layer1\.O'.*Did you mean 'layer1\.0'"),
     ({"types": ["BasicBlok"]}, r"layer type 'BasicBlok'.*Did you mean 'BasicBlock'"),
     ({"typs": ["BasicBlock"]}, r"unknown; use 'types' and/or 'names'"),
     ([], r"empty"),
     ("block", r"matches no module.*Did you mean 'blocks'")],
)
def test_selection_errors(selection, match):
    model = build_model("resnet8", num_classes=10)
    with pytest.raises(ModelError, match=match):
        select_layers(model, selection)


def test_blocks_of_a_model_without_blocks():
    with pytest.raises(ModelError, match="found no residual or transformer blocks in Sequential"):
        select_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), "blocks")


# --- reductions -------------------------------------------------------------------------------


def test_flatten_and_project_dims():
    model = build_model("resnet8", num_classes=10)
    x = torch.randn(2, 3, 8, 8)
    flat = layer_dims(FeatureExtractor(model, reduction="flatten"), x)
    assert flat == {"layer1.0": 16 * 64, "layer2.0": 32 * 16, "layer3.0": 64 * 4, PENULTIMATE: 64}
    projected = layer_dims(FeatureExtractor(model, reduction="project:100"), x)
    assert projected == {"layer1.0": 100, "layer2.0": 100, "layer3.0": 100, PENULTIMATE: 64}
    with pytest.raises(ModelError, match="unknown reduction 'project:x'"):
        FeatureExtractor(model, reduction="project:x")


def test_projection_is_seeded_per_layer():
    model = build_model("resnet8", num_classes=10).eval()
    x = torch.randn(4, 3, 8, 8)
    flat = FeatureExtractor(model, reduction="flatten")(x)[1]["layer2.0"]
    a = FeatureExtractor(model, reduction="project:64", seed=1)(x)[1]
    b = FeatureExtractor(model, reduction="project:64", seed=1)(x)[1]
    c = FeatureExtractor(model, reduction="project:64", seed=2)(x)[1]
    assert torch.equal(a["layer2.0"], b["layer2.0"]) and not torch.equal(a["layer2.0"], c["layer2.0"])
    assert torch.allclose(a["layer2.0"], flat @ projection_matrix("layer2.0", 512, 64, seed=1), atol=1e-5)
    assert not torch.equal(projection_matrix("layer1.0", 64, 8), projection_matrix("layer2.0", 64, 8))
    big = projection_matrix("layer1.0", 2000, 500)
    assert abs(big.var().item() * 500 - 1) < 0.02


def test_projection_matrix_is_the_same_in_another_process():
    here = projection_matrix("layers.2.blocks.5", 300, 16, seed=7)
    code = ("from pnc.features import projection_matrix as p; "
            "print(repr(p('layers.2.blocks.5', 300, 16, seed=7).double().sum().item()))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert float(out.stdout.strip()) == here.double().sum().item()


# --- identical taps are measured once (docs/metrics.md, "Layers") --------------------------------------------


@pytest.mark.parametrize("name, last_block", [("resnet14", "layer3.1"), ("resnet18", "layer4.1")])
def test_pooled_last_block_is_merged_into_penultimate(name, last_block):
    model = build_model(name, num_classes=10)
    x = torch.randn(3, 3, 16, 16)
    with FeatureExtractor(model, merge_identical=False) as raw:
        _, every = raw(x)
    assert torch.equal(every[last_block], every[PENULTIMATE])  # why: avgpool of the last block is the head's input
    with FeatureExtractor(model) as extractor:
        _, first = extractor(x)
        _, second = extractor(x)  # the decision of the first call holds: the dropped tap's hook is gone
        assert extractor.merged == {last_block: PENULTIMATE}
        assert list(first) == list(second) == extractor.layer_names == [n for n in every if n != last_block]
        for n, f in second.items():
            assert torch.equal(f, every[n]), n


def test_stage_and_its_last_block_merge_into_the_later_tap():
    model = build_model("resnet14", num_classes=10)
    with FeatureExtractor(model, ["layer2", "layer2.1", "layer3.0"]) as extractor:
        _, features = extractor(torch.randn(2, 3, 8, 8))
    # forward order of the hooks' modules: layer2.1 is registered after layer2, so it is the one kept
    assert extractor.merged == {"layer2": "layer2.1"} and list(features) == ["layer2.1", "layer3.0"]


def test_no_merge_when_a_layer_sits_between_block_and_head():
    swin = build_model(SWIN_TINY, num_classes=10, image_size=32)
    with FeatureExtractor(swin) as extractor:
        _, features = extractor(torch.randn(2, 3, 32, 32))
    assert extractor.merged == {} and len(features) == 13  # timm's Swin normalises before pooling


def test_constant_taps_are_not_merged():
    """Two layers that output only zeros on a batch are two dead layers, not one layer."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.fill_(-1.0)  # relu(-1) = 0 everywhere: both ReLU outputs are all zero
    with FeatureExtractor(net, ["1", "3"]) as extractor:
        _, features = extractor(torch.randn(2, 1, 8, 8))
    assert extractor.merged == {} and list(features) == ["1", "3"]
