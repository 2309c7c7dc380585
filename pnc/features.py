"""Layer taps: resolve a layer selection to modules, hook them, reduce their outputs to (B, D).

A selection is "blocks" (every residual / transformer block, then "penultimate"), "stages" (each
stage holding blocks, then "penultimate"), fnmatch patterns over ``model.named_modules()`` names
(plus the pseudo-name "penultimate" = the input of the final classifier), or a mapping
``{"types": [class names], "names": [patterns]}``. A selection, or any one pattern or type in it,
that matches nothing raises :class:`pnc.errors.ModelError`.

Reductions happen inside the hooks, so no reference to an activation outlives the hook (later
in-place operations cannot change a tap) and memory stays (B, D) per layer.
"""
from __future__ import annotations

import fnmatch
import hashlib
import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pnc.errors import ModelError, did_you_mean

PENULTIMATE = "penultimate"
KEYWORDS = ("blocks", "stages")
Selection = str | Sequence[str] | Mapping[str, Sequence[str]]

# Undeclared models (no ``pnc_blocks``: built outside pnc.models): a block is an outermost module whose class name
# ends in Block or Bottleneck (torchvision, timm and most residual / transformer code; "SwinTransformerBlockV2").
BLOCK_NAME = re.compile(r"(Block|Bottleneck)(V\d+)?$")
# Modules whose 4-D outputs are channels-last (B, H, W, C), independent of the model around them.
CHANNELS_LAST_CLASSES = frozenset({
    "SwinTransformerBlock", "SwinTransformerBlockV2", "SwinTransformerV2Block",
    "SwinTransformerStage", "SwinTransformerV2Stage", "PatchMerging", "PatchMergingV2",
})
# Modules whose 4-D outputs are channels-first (B, C, H, W) even inside a channels-last model.
_CHANNELS_FIRST_TYPES = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd,
)


# ----------------------------------------------------------------------------- Selection
def classifier(model: nn.Module) -> nn.Module:
    """The final classifier whose input is the "penultimate" tap (timm ``get_classifier``, else ``fc``,
    ``head``, ``classifier``, else the last ``nn.Linear``)."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        found = get()
        if isinstance(found, nn.Module):
            return found
    for attr in ("fc", "head", "classifier"):
        found = getattr(model, attr, None)
        if isinstance(found, nn.Linear):
            return found
        if isinstance(found, nn.Sequential) and isinstance(found[-1], nn.Linear):
            return found[-1]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(model).__name__} has no linear classifier, so it has no 'penultimate' layer")
    return linears[-1]


def block_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every residual / transformer block (outermost only), in registration (= forward) order: the model's own
    ``pnc_blocks`` attribute (module names in forward order: your architecture's taps; pnc.models sets it from the
    block classes each model source declares), else the outermost modules whose class name matches ``BLOCK_NAME``."""
    declared = getattr(model, "pnc_blocks", None)
    if declared is not None:
        try:
            return [(str(n), model.get_submodule(str(n))) for n in declared]
        except AttributeError as e:
            raise ModelError(f"{type(model).__name__}.pnc_blocks names a module it does not have: {e}") from None
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if BLOCK_NAME.search(type(module).__name__) and not any(name.startswith(f"{n}.") for n, _ in found):
            found.append((name, module))
    return found


def stage_name(block_name: str) -> str:
    """The stage holding a block: ``layer2.1`` -> ``layer2``; timm ``layers.1.blocks.0`` -> ``layers.1``."""
    parent = block_name.rpartition(".")[0]
    return parent.removesuffix(".blocks")


def stage_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules holding the blocks (``layer1`` ..., timm Swin ``layers.0`` ...), in order."""
    names = list(OrderedDict.fromkeys(stage_name(n) for n, _ in block_layers(model)))
    return [(n, model.get_submodule(n)) for n in names]


def select_layers(model: nn.Module, selection: Selection = "blocks") -> list[tuple[str, nn.Module]]:
    """Resolve ``selection`` to ``(name, module)`` pairs in forward order ("penultimate" last).

    The "penultimate" entry's module is the classifier; its tap is the classifier's input.
    """
    if isinstance(selection, str) and selection in KEYWORDS:
        found = block_layers(model) if selection == "blocks" else stage_layers(model)
        if not found:
            raise ModelError(
                f"layer selection {selection!r} found no residual or transformer blocks in "
                f"{type(model).__name__}; choose its layers by name or type instead. {candidates(model)}"
            )
        return found + [(PENULTIMATE, classifier(model))]
    patterns, types = _parse_selection(selection)
    named = [(n, m) for n, m in model.named_modules() if n]
    chosen: set[str] = set()
    for pattern in patterns:
        hits = {n for n, _ in named if fnmatch.fnmatchcase(n, pattern)}
        if not hits and not fnmatch.fnmatchcase(PENULTIMATE, pattern):
            names = [n for n, _ in named] + [PENULTIMATE, *KEYWORDS]
            raise ModelError(f"layer pattern {pattern!r} of selection {selection!r} matches no module of "
                             f"{type(model).__name__}.{did_you_mean(pattern, names, show=20)}")
        chosen |= hits
    classes = sorted({type(m).__name__ for _, m in named})
    for type_name in types:
        hits = {n for n, m in named if type(m).__name__ == type_name}
        if not hits:
            raise ModelError(
                f"layer type {type_name!r} of selection {selection!r} matches no module of "
                f"{type(model).__name__}.{did_you_mean(type_name, classes)}"
            )
        chosen |= hits
    result = [(n, m) for n, m in named if n in chosen]
    if any(fnmatch.fnmatchcase(PENULTIMATE, p) for p in patterns):
        result.append((PENULTIMATE, classifier(model)))
    return result


def _parse_selection(selection: Selection) -> tuple[list[str], list[str]]:
    """(name patterns, class names) of a non-keyword selection."""
    if isinstance(selection, str):
        return [selection], []
    if isinstance(selection, Mapping):
        unknown = set(selection) - {"types", "names"}
        if unknown:
            raise ModelError(f"layer selection keys {sorted(unknown)} are unknown; use 'types' and/or 'names'")
        patterns, types = list(selection.get("names", ())), list(selection.get("types", ()))
    else:
        patterns, types = list(selection), []
    if not patterns and not types or not all(isinstance(s, str) for s in patterns + types):
        raise ModelError(f"layer selection {selection!r} is empty or not made of strings")
    return patterns, types


def tap_shapes(model: nn.Module, selection: Selection, channels: int, image_size: int) -> list[tuple[str, str, tuple]]:
    """(name, module type, output shape) of each tap for one input of the given size, traced on the meta device
    (no memory, no weights); the "penultimate" tap's shape is its classifier's input."""
    import torch

    taps = select_layers(model, selection)
    shapes: dict[str, tuple] = {}

    def hook(name: str, want_input: bool):
        def fn(mod, args, out):  # noqa: ARG001
            t = args[0] if want_input else out
            shapes[name] = tuple(t.shape) if isinstance(t, torch.Tensor) else ()
        return fn

    handles = [m.register_forward_hook(hook(n, n == PENULTIMATE)) for n, m in taps]
    try:
        with torch.no_grad():
            model.to("meta").eval()(torch.empty(1, channels, image_size, image_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return [(n, type(m).__name__, shapes.get(n, ())) for n, m in taps]


def candidates(model: nn.Module) -> str:
    """The model's top-level modules and its repeated module types: what a layer selection can name."""
    from collections import Counter

    top = ", ".join(f"{n} ({type(m).__name__})" for n, m in model.named_children()) or "none"
    counts = Counter(type(m).__name__ for n, m in model.named_modules() if n)
    repeated = ", ".join(f"{t} (x{c})" for t, c in counts.most_common() if c > 1) or "none"
    return (f"Top-level modules: {top}. Repeated module types: {repeated}. E.g. `layers: {{types: [{counts.most_common(1)[0][0] if counts else 'Conv2d'}]}}` "
            "or `layers: ['features.*']`.")


# ----------------------------------------------------------------------------- Reduction
def parse_reduction(reduction: str) -> tuple[str, int | None]:
    """"avgpool" | "flatten" | "project:<dim>" -> (kind, dim)."""
    kind, _, arg = reduction.partition(":")
    if kind in ("avgpool", "flatten") and not arg:
        return kind, None
    if kind == "project" and arg.isdigit() and int(arg) > 0:
        return kind, int(arg)
    raise ModelError(f"unknown reduction {reduction!r}; use 'avgpool', 'flatten' or 'project:<dim>' (e.g. project:512)")


def channels_last(model: nn.Module, module: nn.Module) -> bool:
    """Whether ``module``'s 4-D output is (B, H, W, C): decided by its class or its own declared
    ``output_fmt``, then by the model's (timm ``output_fmt``, torchvision Swin), never by the shape."""
    if isinstance(module, _CHANNELS_FIRST_TYPES):
        return False
    if type(module).__name__ in CHANNELS_LAST_CLASSES:
        return True
    own = getattr(module, "output_fmt", None)  # timm PatchEmbed and friends declare their layout
    if own is not None:
        return str(getattr(own, "value", own)) == "NHWC"
    return getattr(model, "output_fmt", "NCHW") == "NHWC" or type(model).__name__ == "SwinTransformer"


def avgpool(x: torch.Tensor, last: bool) -> torch.Tensor:
    """float32 mean over spatial positions / tokens of (B, C, *S), channels-last (B, *S, C) or (B, N, C)."""
    if x.ndim <= 2:  # copied, so that later in-place operations cannot reach the tap
        return x.reshape(x.shape[0], -1).to(torch.float32, copy=True)
    dims = tuple(range(1, x.ndim - 1)) if x.ndim == 3 or last else tuple(range(2, x.ndim))
    return x.mean(dim=dims, dtype=torch.float32)


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from ``seed`` and the layer name, the same in every process."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def projection_matrix(name: str, in_dim: int, out_dim: int, seed: int = 0) -> torch.Tensor:
    """Gaussian random projection (in_dim, out_dim), entries N(0, 1/out_dim), made on the CPU from
    ``layer_seed(seed, name)`` (Johnson-Lindenstrauss: squared distances are kept in expectation)."""
    gen = torch.Generator(device="cpu").manual_seed(layer_seed(seed, name))
    return torch.randn(in_dim, out_dim, generator=gen) / math.sqrt(out_dim)


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ModelError(f"a tapped module returned {type(out).__name__}, not a tensor")


# ----------------------------------------------------------------------------- Extractor
class LayerNames(list):
    """Tap names in forward order; ``merged`` maps each tap measured under another name (identical reduced
    outputs, see :class:`FeatureExtractor`) to the name kept."""

    def __init__(self, names: Sequence[str] = (), merged: Mapping[str, str] | None = None):
        super().__init__(names)
        self.merged = dict(merged or {})


class FeatureExtractor:
    """Forward hooks on the selected layers; ``extractor(x)`` -> ``(logits, {name: (B, D) float32})``.

    ``reduction``: "avgpool" (mean over positions / tokens), "flatten", or "project:<dim>" (flatten,
    then a fixed Gaussian projection per layer from ``seed``; layers with at most ``dim`` features are
    kept as they are). The call runs the model in eval mode under ``torch.inference_mode()`` and then
    restores its mode; the returned tensors are ordinary (not inference) tensors, so probes may train
    on them. Hooks record only during the call, so training with the hooks on costs nothing.
    A module that runs more than once in a forward (a shared ReLU) keeps its last output.

    ``merge_identical``: taps whose reduced outputs are the same numbers are measured once (the pooled last block
    and "penultimate" under ``avgpool``, a stage and its last block): decided on the first call, by exact equality
    of that batch's reduced outputs; the *last* tap of such a group (in forward order, so "penultimate") is kept,
    and :attr:`merged` maps each dropped name to the kept one (``docs/metrics.md``, "Layers").
    """

    def __init__(self, model: nn.Module, layers: Selection = "blocks", reduction: str = "avgpool", seed: int = 0,
                 merge_identical: bool = True):
        self.model = model
        self.kind, self.dim = parse_reduction(reduction)
        self.seed = seed
        selected = select_layers(model, layers)
        self.layer_names: list[str] = [n for n, _ in selected]
        self.merged: dict[str, str] = {}
        self._merge_pending = merge_identical and len(selected) > 1
        self._projections: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self._recording = False
        self._handles: dict[str, Any] = {}
        for name, module in selected:
            if name == PENULTIMATE:  # the classifier's input
                self._handles[name] = module.register_forward_pre_hook(self._hook(name, False))
            else:
                self._handles[name] = module.register_forward_hook(self._hook(name, channels_last(model, module)))

    def _hook(self, name: str, last: bool):
        """A forward hook ``(module, args, out)`` recording ``out``, or a pre-hook ``(module, args)`` recording ``args``."""
        def hook(module: nn.Module, args: Any, *out: Any) -> None:
            if self._recording:
                self._outputs[name] = self.reduce(name, _first_tensor(out[0] if out else args), last)

        return hook

    def reduce(self, name: str, x: torch.Tensor, last: bool) -> torch.Tensor:
        """(B, D) float32 features of one layer's output ``x``."""
        if self.kind == "avgpool":
            return avgpool(x, last)
        flat = x.reshape(x.shape[0], -1)
        if self.kind == "project" and flat.shape[1] > self.dim:
            with torch.autocast(x.device.type, enabled=False):  # project in float32 under mixed precision
                return flat.float() @ self._projection(name, flat.shape[1], x.device)
        return flat.to(torch.float32, copy=True)  # a copy: later in-place operations cannot reach the tap

    def _projection(self, name: str, in_dim: int, device: torch.device) -> torch.Tensor:
        matrix = self._projections.get(name)
        if matrix is None or matrix.shape[0] != in_dim or matrix.device != device:
            matrix = projection_matrix(name, in_dim, self.dim, self.seed).to(device)
            self._projections[name] = matrix
        return matrix

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, OrderedDict[str, torch.Tensor]]:
        was_training = self.model.training
        self._outputs = {}
        self._recording = True
        try:
            self.model.eval()
            with torch.inference_mode():
                logits = self.model(x)
        finally:
            self._recording = False
            self.model.train(was_training)
        silent = [n for n in self.layer_names if n not in self._outputs]
        if silent:
            raise ModelError(f"tapped layers {silent} did not run in {type(self.model).__name__}'s forward")
        if self._merge_pending:
            self._merge_pending = False
            self._merge(self._outputs)
        # clones made outside inference mode are ordinary tensors, usable by autograd (linear probes)
        features = OrderedDict((n, self._outputs[n].clone()) for n in self.layer_names)
        self._outputs = {}
        return (logits.clone() if isinstance(logits, torch.Tensor) else logits), features

    def _merge(self, outputs: dict[str, torch.Tensor]) -> None:
        """Drop every tap whose reduced output equals a later tap's exactly (non-constant outputs only: two dead
        layers are not one layer); see the class docstring."""
        names = self.layer_names
        for i, name in enumerate(names):
            a = outputs[name]
            if a.numel() < 2 or bool((a == a.reshape(-1)[0]).all()):
                continue
            kept = next((later for later in reversed(names[i + 1:])  # the group's last tap (equality is transitive)
                         if outputs[later].shape == a.shape and torch.equal(outputs[later], a)), None)
            if kept is not None:
                self.merged[name] = kept
        for name in self.merged:
            self._handles.pop(name).remove()
        self.layer_names = [n for n in names if n not in self.merged]

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}

    def __enter__(self) -> FeatureExtractor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def layer_dims(extractor: FeatureExtractor, example_input: torch.Tensor) -> dict[str, int]:
    """Feature dimension D of every tapped layer, from one forward of ``example_input``."""
    _, features = extractor(example_input)
    return {name: int(f.shape[1]) for name, f in features.items()}
