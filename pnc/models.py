"""Model registry and factory: pnc's CIFAR ResNets, torchvision and timm models by their own names.

``build_model`` resolves a name to a source (``catalog.model_source``), merges the source's defaults
for the image size with the caller's keyword arguments (``dict(defaults, **kwargs)``, timm style),
builds the network, optionally loads local weights, and adapts it to small images:

- torchvision/timm ResNets at ``image_size <= 64`` get the CIFAR stem (3x3 stride-1 ``conv1``,
  ``maxpool`` -> ``Identity``; the module names stay, so layer taps are stable);
- timm Swin (v1) gets ``img_size=image_size`` and a patch/window geometry that fits (``swin_geometry``).

Nothing is downloaded: ``pretrained=True`` loads a file given as ``weights=`` or one already in the
torch hub / Hugging Face cache, and otherwise raises :class:`pnc.errors.ModelError`.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pnc import catalog
from pnc.errors import ModelError, did_you_mean

SOURCES = catalog.MODEL_SOURCES
# build_model / build_factory_model record how they built a network (attribute RECIPE_ATTR), so that pnc.modelstore
# can store it as safetensors weights plus this recipe and rebuild it without unpickling anything
RECIPE_ATTR = "pnc_recipe"
RECIPE_FORMAT = "pnc.safetensors/1"
CIFAR_STEM_MAX_SIZE = 64  # ResNets at or below this image size get the CIFAR stem automatically

# ------------------ pnc's CIFAR-style ResNet (He et al. 2016, "Deep Residual Learning for Image Recognition", sec. 4.2)
class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1 conv-BN projection shortcut (option B)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class CifarResNet(nn.Module):
    """ResNet of depth 6n+2: 3x3 conv (16), three stages of n BasicBlocks (16/32/64, strides 1/2/2),
    global average pooling and a linear classifier ``fc``. Blocks are ``layer1.0`` ... ``layer3.{n-1}``."""

    def __init__(
        self,
        depth: int,
        num_classes: int,
        in_chans: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ModelError(f"a CIFAR ResNet has depth 6n+2 >= 8 (8, 14, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for i, (width, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            blocks = [BasicBlock(in_planes if j == 0 else width, width, stride if j == 0 else 1) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            in_planes = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.pnc_blocks = [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(n)]  # its taps (pnc.features.block_layers)
        _init_resnet_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _init_resnet_(model: nn.Module) -> None:
    """He-normal (fan_out) convolutions, unit BN scale, zero BN shift; Linear keeps torch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------- Registry: one builder per source (and its block classes)
Builder = Callable[..., nn.Module]
_BUILDERS: dict[str, Builder] = {}
_BLOCKS: dict[str, frozenset[str]] = {}


def register_source(source: str, blocks: tuple[str, ...] = ()) -> Callable[[Builder], Builder]:
    """Register ``fn(name, *, num_classes, in_chans, weights_file, **kwargs) -> nn.Module`` and the class names of the
    residual / transformer blocks its models are made of (their ``pnc_blocks``: what ``measure.layers: blocks`` taps)."""

    def add(fn: Builder) -> Builder:
        _BUILDERS[source] = fn
        _BLOCKS[source] = frozenset(blocks)
        return fn

    return add


def declare_blocks(model: nn.Module, classes: frozenset[str]) -> None:
    """Set ``model.pnc_blocks`` (unless the model declares its own): its outermost modules of the given classes,
    in registration (= forward) order."""
    if getattr(model, "pnc_blocks", None) is not None or not classes:
        return
    found: list[str] = []
    for name, module in model.named_modules():
        if type(module).__name__ in classes and not any(name.startswith(f"{n}.") for n in found):
            found.append(name)
    model.pnc_blocks = found


@register_source("pnc")
def _build_pnc(name: str, *, num_classes: int, in_chans: int, weights_file: Path | None, **kwargs: Any) -> nn.Module:
    depth = catalog.cifar_resnet_depth(name)
    if depth is None:
        raise ModelError(f"unknown pnc model {name!r}.{did_you_mean(name, catalog.pnc_model_names())}")
    try:
        model = CifarResNet(depth, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as e:
        raise ModelError(f"{name}: bad model argument: {e}") from None
    if weights_file is not None:
        load_weights_file(model, weights_file)
    return model


@register_source("torchvision", blocks=("BasicBlock", "Bottleneck", "SwinTransformerBlock", "SwinTransformerBlockV2"))
def _build_torchvision(
    name: str, *, num_classes: int, in_chans: int, weights_file: Path | None, **kwargs: Any
) -> nn.Module:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ModelError(f"{name}: bad model argument for torchvision: {e}") from None
    if weights_file is not None:
        load_weights_file(model, weights_file)
    if in_chans != 3:
        set_in_chans(model, in_chans)
    return model


@register_source("timm", blocks=("BasicBlock", "Bottleneck", "PreActBasic", "PreActBottleneck",
                                  "SwinTransformerBlock", "SwinTransformerV2Block"))
def _build_timm(name: str, *, num_classes: int, in_chans: int, weights_file: Path | None, **kwargs: Any) -> nn.Module:
    import timm

    overlay = {"file": str(weights_file)} if weights_file is not None else None
    try:
        return timm.create_model(
            name,
            pretrained=weights_file is not None,
            pretrained_cfg_overlay=overlay,
            num_classes=num_classes,
            in_chans=in_chans,
            **kwargs,
        )
    except TypeError as e:
        raise ModelError(f"{name}: bad model argument for timm: {e}") from None


# Swin (timm, v1) patch/window geometry per image size; see swin_geometry.
SWIN_GEOMETRY: dict[int, tuple[int, int]] = {
    32: (2, 4),  # stage grids 16/8/4/2, windows 4/4/4/2
    84: (3, 7),  # Mini-ImageNet: grids 28/14/7/4, windows 7/7/7/4 (only the last merge pads 7 -> 8)
    224: (4, 7),  # timm's own: grids 56/28/14/7
}


def swin_geometry(image_size: int) -> tuple[int, int]:
    """(patch_size, window_size) for a timm Swin at ``image_size``.

    Known sizes come from ``SWIN_GEOMETRY``; other sizes <= 64 use patch 2 / window 4 (grid image/2,
    halved three times), larger ones timm's patch 4 / window 7. timm clips windows to small grids and
    pads grids that the window does not divide, so every size runs; the table avoids needless padding.
    """
    if image_size in SWIN_GEOMETRY:
        return SWIN_GEOMETRY[image_size]
    return (2, 4) if image_size <= CIFAR_STEM_MAX_SIZE else (4, 7)


def _is_timm_swin(name: str) -> bool:
    import timm

    base = name.split(".", 1)[0]
    return base in timm.list_models(module="swin_transformer")


def model_defaults(name: str, source: str, image_size: int) -> dict[str, Any]:
    """Registry defaults for ``name`` at ``image_size``; caller keyword arguments override them."""
    if source == "timm" and _is_timm_swin(name):
        patch_size, window_size = swin_geometry(image_size)
        return {"img_size": image_size, "patch_size": patch_size, "window_size": window_size}
    return {}


# ----------------------------------------------------------------------------- Name resolution
def resolve_source(name: str, source: str = "auto") -> str:
    """The source that builds ``name``; raises ModelError for an unknown name or source."""
    if source not in ("auto", *SOURCES):
        raise ModelError(f"unknown model source {source!r}.{did_you_mean(source, ('auto', *SOURCES))}")
    if source == "auto":
        found = catalog.model_source(name)
        if found is None and "." in name:  # a timm pretrained tag, e.g. resnet50.a1_in1k
            found = "timm" if name.split(".", 1)[0] in catalog.library_model_names().get("timm", ()) else None
        if found is None:
            raise ModelError(f"unknown model {name!r}.{did_you_mean(name, catalog.all_model_names())}")
        return found
    if not _source_has(source, name):
        raise ModelError(f"{source} has no model {name!r}.{did_you_mean(name, _source_names(source))}")
    return source


def _source_names(source: str) -> list[str]:
    if source == "pnc":
        return catalog.pnc_model_names()
    return sorted(catalog.library_model_names().get(source, ()))


def _source_has(source: str, name: str) -> bool:
    if source == "pnc":
        return catalog.cifar_resnet_depth(name) is not None
    if source == "timm":
        import timm

        return timm.is_model(name.split(".", 1)[0])
    import torchvision

    return name in torchvision.models.list_models(module=torchvision.models)


# ----------------------------------------------------------------------------- Factory
def build_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    image_size: int = 32,
    source: str = "auto",
    cifar_stem: bool | None = None,
    pretrained: bool = False,
    weights: str | Path | None = None,
    strict_weights: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build ``name`` for ``num_classes`` classes and ``in_chans`` x ``image_size`` x ``image_size`` inputs.

    ``source``: "auto" (``catalog.model_source``), "pnc", "torchvision" or "timm".
    ``cifar_stem``: None = automatic (torchvision/timm ResNets at ``image_size <= 64``).
    ``pretrained`` / ``weights``: load a local file (``weights`` implies ``pretrained``); never downloads.
    ``strict_weights``: the file is this very network's (a checkpoint to measure): loaded after the stem is
    adapted, every key and shape must match (no head left at its init, no input conv adapted).
    ``kwargs`` override the registry defaults for the image size (e.g. Swin ``patch_size``).
    Initialisation draws from torch's global generator, so ``torch.manual_seed`` makes it repeatable.
    """
    src = resolve_source(name, source)
    recipe = {"format": RECIPE_FORMAT, "builder": "catalog", "name": name, "num_classes": num_classes,
              "in_chans": in_chans, "image_size": image_size, "source": src, "cifar_stem": cifar_stem, "kwargs": dict(kwargs)}
    weights_file = find_weights(name, src, weights) if (pretrained or weights is not None) else None
    args = dict(model_defaults(name, src, image_size), **kwargs)
    model = _BUILDERS[src](name, num_classes=num_classes, in_chans=in_chans,
                           weights_file=None if strict_weights else weights_file, **args)
    if _wants_cifar_stem(model, src, image_size, cifar_stem, name):
        apply_cifar_stem(model, in_chans)
    if strict_weights and weights_file is not None:
        load_weights_file(model, weights_file, strict=True)
    declare_blocks(model, _BLOCKS[src])
    setattr(model, RECIPE_ATTR, recipe)
    return model


def build_factory_model(factory: str, *, num_classes: int, in_chans: int, weights: str | Path | None = None,
                        **kwargs: Any) -> nn.Module:
    """Your architecture: ``factory`` ('path/file.py:function' or 'package.module:function') called with ``kwargs``
    (and ``num_classes`` / ``in_chans`` when it takes them); ``weights`` loaded strictly."""
    import inspect

    fn = load_factory(factory)
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if k in params or takes_any}
    try:
        model = fn(**given, **kwargs)
    except Exception as e:  # noqa: BLE001 - the user's code: say where it failed
        raise ModelError(f"factory {factory!r} raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory {factory!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights_file(model, find_weights(factory, "factory", weights), strict=True)
    from pnc.spec import factory_file, file_digest

    setattr(model, RECIPE_ATTR, {"format": RECIPE_FORMAT, "builder": "factory", "factory": factory, "kwargs": dict(kwargs),
                                 "source_sha256": file_digest(factory_file(factory)), "num_classes": num_classes,
                                 "in_chans": in_chans})
    return model


def load_factory(factory: str) -> Callable[..., Any]:
    """The function a ``factory`` reference names: its file is run (or its module imported) here."""
    import importlib
    import importlib.util

    target, _, name = factory.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser().resolve()
            spec = importlib.util.spec_from_file_location(f"pnc_factory_{path.stem}", path)
            if spec is None or spec.loader is None or not path.is_file():
                raise ModelError(f"factory file {target!r} not found")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module failed to import
        raise ModelError(f"factory {factory!r}: importing {target} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ModelError(f"factory {factory!r}: {target} has no function {name!r}")
    return fn


def _wants_cifar_stem(model: nn.Module, source: str, image_size: int, cifar_stem: bool | None, name: str) -> bool:
    if source == "pnc":
        if cifar_stem is False:
            raise ModelError(f"{name}: pnc's CIFAR ResNets always have the CIFAR stem; drop `cifar_stem: false`")
        return False
    if cifar_stem is None:
        return has_resnet_stem(model) and image_size <= CIFAR_STEM_MAX_SIZE
    if cifar_stem and not has_resnet_stem(model):
        raise ModelError(
            f"{name}: `cifar_stem: true` needs a ResNet-style stem (conv1, bn1, maxpool); "
            f"{type(model).__name__} has none. Drop `cifar_stem` for this model."
        )
    return cifar_stem


def has_resnet_stem(model: nn.Module) -> bool:
    """True for torchvision/timm ResNet-style models (``conv1``, ``bn1``, ``maxpool``, ``layer1``)."""
    return all(isinstance(getattr(model, a, None), nn.Module) for a in ("conv1", "bn1", "maxpool", "layer1"))


def apply_cifar_stem(model: nn.Module, in_chans: int) -> nn.Module:
    """Replace ``conv1`` by a 3x3 stride-1 conv and ``maxpool`` by ``Identity`` (names kept)."""
    width = model.bn1.num_features
    conv = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    model.conv1 = conv
    model.maxpool = nn.Identity()
    return model


def set_in_chans(model: nn.Module, in_chans: int) -> nn.Module:
    """Give the first 3-channel Conv2d ``in_chans`` inputs (weights adapted as timm does)."""
    from timm.models import adapt_input_conv

    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
            new = nn.Conv2d(
                in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
            )
            with torch.no_grad():
                new.weight.copy_(adapt_input_conv(in_chans, conv.weight))
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)
            return model
    raise ModelError(f"{type(model).__name__}: no 3-channel input convolution to adapt to in_chans={in_chans}")


# ----------------------------------------------------------------------------- Local weights (never downloaded)
def find_weights(name: str, source: str, weights: str | Path | None) -> Path:
    """The local weights file for ``name``: ``weights`` if given, else one already in a cache."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelError(f"{name}: weights file {str(path)!r} does not exist")
        return path
    cached, expected = cached_weights(name, source)
    if cached is not None:
        return cached
    where = f" or place the file at {expected}" if expected else ""
    raise ModelError(
        f"{name}: pretrained weights are not on disk and pnc cannot download them (no network). "
        f"Download them elsewhere and set `weights: /path/to/file`{where}; "
        f"or set `pretrained: false` to train from scratch."
    )


def cached_weights(name: str, source: str) -> tuple[Path | None, str]:
    """(file already in the torch hub / Hugging Face cache or None, where it would be expected)."""
    candidates = _torchvision_cache(name) if source == "torchvision" else _timm_cache(name) if source == "timm" else []
    for path in candidates:
        if path.is_file():
            return path, str(candidates[0])
    return None, str(candidates[0]) if candidates else ""


def _torch_hub_file(url: str | None) -> list[Path]:
    if not url:
        return []
    return [Path(torch.hub.get_dir()) / "checkpoints" / Path(url.split("?", 1)[0]).name]


def _torchvision_cache(name: str) -> list[Path]:
    import torchvision

    try:
        default = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return []
    return _torch_hub_file(getattr(default, "url", None))


def _timm_cache(name: str) -> list[Path]:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return []
    paths = _hf_cache(cfg.hf_hub_id, cfg.hf_hub_filename) if cfg.hf_hub_id else []
    return paths + ([Path(cfg.file)] if cfg.file else []) + _torch_hub_file(cfg.url)


def _hf_cache(hub_id: str, filename: str | None) -> list[Path]:
    """Files of ``hub_id`` already in the Hugging Face cache (the names timm downloads)."""
    from huggingface_hub import try_to_load_from_cache

    names = ([filename] if filename else []) + ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    hits = (try_to_load_from_cache(hub_id.split("@", 1)[0], n) for n in names)
    return [Path(h) for h in hits if isinstance(h, str)]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint (.safetensors, or a torch file holding a state dict or a wrapper dict)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ModelError(f"cannot read weights file {str(path)!r}: {e}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict):
        raise ModelError(f"weights file {str(path)!r} holds no state dict")
    return {k.removeprefix("module."): v for k, v in data.items() if isinstance(v, torch.Tensor)}


def load_weights_file(model: nn.Module, path: Path, *, strict: bool = False) -> nn.Module:
    """Load ``path`` into ``model``; a classifier of another size keeps its fresh init, a first conv of
    another input width is adapted; any other mismatch raises ModelError. ``strict``: the file must be this
    network's own (measuring a checkpoint): the first key missing, unexpected or of another shape is an error."""
    from timm.models import adapt_input_conv

    state = read_state_dict(path)
    own = model.state_dict()
    if strict:
        problem = next((f"key {k!r} is missing from the file" for k in own if k not in state), None) or next(
            (f"key {k!r} of the file is not in the model" for k in state if k not in own), None) or next(
            (f"key {k!r} has shape {tuple(state[k].shape)} in the file but {tuple(own[k].shape)} in the model"
             + (" (another number of classes?)" if own[k].ndim and own[k].shape[0] != state[k].shape[0] else "")
             for k in own if own[k].shape != state[k].shape), None)
        if problem:
            raise ModelError(f"weights file {str(path)!r} is not a {type(model).__name__} like this one: {problem}")
        model.load_state_dict(state, strict=True)
        return model
    head = _classifier_prefix(model)
    first_conv = next((f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), "")
    fitted: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            if key == first_conv and own[key].shape[0] == value.shape[0]:
                value = adapt_input_conv(own[key].shape[1], value)
            elif head and key.startswith(head):
                skipped.append(key)
                continue
        fitted[key] = value
    missing, unexpected = model.load_state_dict(fitted, strict=False)
    missing = [k for k in missing if k not in skipped]
    bad = [k for k in fitted if k in own and own[k].shape != fitted[k].shape]
    if missing or unexpected or bad:
        raise ModelError(
            f"weights file {str(path)!r} does not fit {type(model).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {bad[:5]}"
        )
    return model


def _classifier_prefix(model: nn.Module) -> str:
    for attr in ("fc", "head", "classifier"):
        if isinstance(getattr(model, attr, None), nn.Module):
            return attr + "."
    return ""


# ---------------------------------------------------------------------- The committed name lists (pnc/model_names.json)
MODEL_NAMES_FILE = Path(__file__).with_name("model_names.json")


def installed_model_names() -> dict[str, Any]:
    """Model names and versions of the installed torchvision and timm, as ``model_names.json`` holds them."""
    import timm
    import torchvision

    return {
        "torchvision": sorted(torchvision.models.list_models(module=torchvision.models)),
        "timm": sorted(timm.list_models()),
        "versions": {"torchvision": torchvision.__version__.split("+")[0], "timm": timm.__version__.split("+")[0]},
    }


def write_model_names(path: Path = MODEL_NAMES_FILE) -> Path:
    """Regenerate ``model_names.json`` from the installed libraries."""
    import json

    path.write_text(json.dumps(installed_model_names(), indent=1) + "\n")
    return path
