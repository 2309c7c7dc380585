"""The study spec language: pydantic models, YAML loading with line numbers, overrides.

A study is one of the registered kinds (:data:`pnc.registry.KINDS`; each kind's spec class lives in its
module under ``pnc/kinds/``), discriminated on ``kind``; the blocks every kind shares live here. :func:`load_spec` validates a YAML file completely
and raises :class:`~pnc.errors.SpecError` listing every problem as ``FILE:LINE:COL: key.path:
message``. Nothing after this module re-checks the spec.

Stdlib + pydantic + ruamel.yaml only: ``pnc validate`` must not import torch or mlflow.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from . import catalog
from .errors import DataError, PncError, Problem, SpecError, did_you_mean
from .metrics.geometry import REGISTRY
from .metrics.options import DEFAULTS, PROBES, SCATTER_PRODUCTS
from .registry import KINDS

SCHEMA_PATH = Path(__file__).parent / "schema" / "study.schema.json"
SCHEMA_LINE_PREFIX = "# yaml-language-server: $schema="

_NAME_RE = r"^[a-z0-9][a-z0-9_\-]*$"


class SpecBlock(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True)


# ----------------------------------------------------------------------------- blocks
class DatasetSpec(SpecBlock):
    """Which data a study trains and measures on."""

    name: str = Field(description="Dataset name: " + ", ".join(catalog.DATASETS))
    image_size: int | None = Field(
        None, ge=4, le=1024, description="Side length the images are resized to; default: the dataset's native size."
    )
    train_split: str = Field("train", description="Split the networks are trained on.")
    test_split: str | None = Field(None, description="Held-out split for probes and test metrics; default: 'test' or 'val'.")
    domain: str | None = Field(None, description="Domain of a multi-domain dataset (depth/noise studies only).")
    root: str | None = Field(None, description="Raw-data folder; default $PNC_DATA_ROOT/<dataset> or data/raw/<dataset>.")
    splits: dict[str, str] | None = Field(
        None, description="Your own data (image_folder, arrays): split name -> sub-folder of root; default {train: train, test: test}.")

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v not in catalog.DATASETS:
            raise ValueError(f"unknown dataset {v!r}.{did_you_mean(v, catalog.DATASETS)}")
        return v

    @property
    def info(self) -> catalog.DatasetInfo:
        """The catalog entry; for your own data (``user``), with classes, channels and size read from ``root``."""
        info = catalog.DATASETS[self.name]
        return user_info(info, self.root, tuple(self.split_folders.items())) if info.user else info

    @property
    def split_folders(self) -> dict[str, str]:
        return dict(self.splits) if self.splits else {"train": "train", "test": "test"}

    @property
    def size(self) -> int:
        return self.image_size or self.info.image_size

    @property
    def test(self) -> str:
        if self.test_split:
            return self.test_split
        return "test" if "test" in self.info.splits else self.info.splits[-1]


class ModelSpec(SpecBlock):
    """One network: a timm/torchvision name verbatim, one of pnc's CIFAR ResNets (resnet8, resnet20, ...), your own
    architecture from a Python ``factory``, or (measure studies) a model logged in MLflow (``uri``)."""

    uri: str | None = Field(None, pattern=r"^(models:/[^/@]+(/[0-9]+|@[A-Za-z0-9_-]+)|runs:/[0-9a-f]{32}/[^ ]+)$",
                            description="A model logged in MLflow (measure studies): models:/<name>/<version>, "
                                        "models:/<name>@<alias> or runs:/<run id>/<artifact path>.")
    factory: str | None = Field(None, pattern=r"^[^:]+:[A-Za-z_][A-Za-z0-9_]*$",
                                description="Your architecture: 'path/to/file.py:function' or 'package.module:function' "
                                            "returning an nn.Module (called with kwargs, and num_classes/in_chans if it takes them).")
    name: str
    source: Literal[("auto", *catalog.MODEL_SOURCES)] = "auto"
    cifar_stem: bool | None = Field(None, description="3x3 stride-1 stem, no max-pool; default: on for inputs <= 64 px.")
    pretrained: bool = False
    weights: str | None = Field(None, description="Local weights file for pretrained=true (nothing is downloaded).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for the model factory.")

    @model_validator(mode="before")
    @classmethod
    def _name_of_uri(cls, v: Any) -> Any:
        if isinstance(v, dict) and "name" not in v and isinstance(v.get("uri"), str):  # a label for runs and figures
            return {**v, "name": re.sub(r"[^A-Za-z0-9_.-]+", "-", v["uri"].split(":/", 1)[-1]).strip("-")}
        return v

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str, info: Any) -> str:
        if info.data.get("factory") or info.data.get("uri"):  # a label of your own
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", v):
                raise ValueError(f"model name {v!r}: use letters, digits, '_', '.', '-' (it names runs, tags and figures)")
            return v
        if catalog.model_source(v) is None:
            hint = did_you_mean(v, catalog.all_model_names(), show=0).split(" Available:")[0]
            raise ValueError(
                f"unknown model {v!r}.{hint} Known: pnc's CIFAR ResNets ({', '.join(catalog.pnc_model_names()[:7])}) "
                "and every torchvision/timm classification model name verbatim (listed in pnc/model_names.json)."
            )
        return v

    @model_validator(mode="after")
    def _one_origin(self) -> ModelSpec:
        if self.uri and (self.factory or self.weights or self.pretrained or self.kwargs or self.source != "auto"):
            raise ValueError("a model from `uri` is loaded as logged: remove factory, weights, pretrained, kwargs and source")
        if self.factory and (self.pretrained and not self.weights or self.source != "auto"):
            raise ValueError("a `factory` model takes no source or library pretraining; give `weights:` for a file")
        return self

    def config(self) -> dict:
        """The entry as it enters cell ids and run params (origins not given are left out, so adding them kept ids)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if not (k in ("uri", "factory") and v is None)}

    @property
    def resolved_source(self) -> str:
        if self.factory or self.uri:
            return "factory" if self.factory else "mlflow"
        return catalog.model_source(self.name) if self.source == "auto" else self.source


def factory_file(factory: str) -> Path | None:
    """The source file of a ``factory`` ('path/file.py:fn' or 'package.module:fn'; found without running it)."""
    import importlib.util

    target = factory.rpartition(":")[0]
    if target.endswith(".py"):
        return Path(target).expanduser()
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        return None
    return Path(found.origin) if found is not None and found.origin else None


def factory_problems(factory: str) -> list[str]:
    """What is wrong with a ``factory`` reference, read without running its code: the file or module, the function."""
    import ast

    target, _, fn = factory.rpartition(":")
    path = factory_file(factory)
    if path is None or not path.is_file():
        what = f"file {target!r}" if target.endswith(".py") else f"module {target!r}"
        return [f"{what} not found (from {Path.cwd()}); give 'path/to/file.py:function' or an importable 'package.module:function'"]
    try:
        tree = ast.parse(path.read_text(), str(path))
    except SyntaxError as e:
        return [f"{path}:{e.lineno}: syntax error: {e.msg}"]
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    if fn not in defined:
        return [f"{path} defines no function {fn!r}.{did_you_mean(fn, defined)}"]
    return []


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (weights, factory source): part of a cell's id, so a changed file is a new cell."""
    with open(Path(path).expanduser(), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


@lru_cache(maxsize=32)
def user_info(info: catalog.DatasetInfo, root: str | None, splits: tuple) -> catalog.DatasetInfo:
    """A user dataset's catalog entry completed from its files (``pnc.data.user.describe``)."""
    from .data.user import describe

    k, channels, size = describe(info.name, root, dict(splits))
    return replace(info, num_classes=k, channels=channels, image_size=size, splits=tuple(dict(splits)))


ModelEntry = Annotated[ModelSpec, BeforeValidator(lambda v: {"name": v} if isinstance(v, str) else v)]  # a bare name: {name: ...}


class OptimizerSpec(SpecBlock):
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    nesterov: bool = False


class ScheduleSpec(SpecBlock):
    name: Literal["cosine", "step", "constant"] = "step"
    step_size: int = Field(40, ge=1, description="Epochs between decays (step schedule).")
    gamma: float = Field(0.2, gt=0, le=1, description="Decay factor (step schedule).")
    warmup_epochs: int = Field(0, ge=0)


class AugmentSpec(SpecBlock):
    random_crop: bool = False
    crop_padding: int = Field(4, ge=0, le=64)
    horizontal_flip: bool = False


class TrainSpec(SpecBlock):
    """Training recipe. Defaults: the neural-collapse recipe of Zhu et al. 2021 (SGD, momentum 0.9, lr 0.05,
    weight decay 5e-4, batch 128, 200 epochs, StepLR(40, 0.2), no augmentation: the terminal phase is reached
    sooner without it). The CIFAR specs set the common CIFAR recipe (lr 0.1, cosine, crop + flip) explicitly."""

    epochs: int = Field(200, ge=1, le=100_000)
    batch_size: int = Field(128, ge=1, le=1_000_000)
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    augmentation: AugmentSpec = AugmentSpec()
    seed: int = Field(0, ge=0, le=2**31 - 1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum_steps: int = Field(1, ge=1, le=1024)
    num_workers: int = Field(0, ge=0, le=256)
    max_loss: float = Field(1e4, gt=0, description="A loss above this (or NaN) fails the cell as diverged.")


def no_duplicates(v: list) -> list:
    seen, dups = set(), []
    for x in v:
        key = json.dumps(x, sort_keys=True, default=str)
        if key in seen:
            dups.append(x)
        seen.add(key)
    if dups:
        raise ValueError(f"duplicate entries: {', '.join(map(str, dups))}")
    return v


T = TypeVar("T")
Unique = Annotated[list[T], AfterValidator(no_duplicates)]  # a list of distinct entries


class LayerSelection(SpecBlock):
    """Tapped modules chosen by class name (``types``) and/or module-name glob pattern (``names``)."""

    types: list[str] = Field(default_factory=list, description="Module class names, e.g. BasicBlock, SwinTransformerBlock.")
    names: list[str] = Field(default_factory=list, description="Module name glob patterns, e.g. 'layer3.*', 'penultimate'.")

    @model_validator(mode="after")
    def _something(self) -> LayerSelection:
        if not self.types and not self.names:
            raise ValueError("give at least one module class under 'types' or one name pattern under 'names'")
        no_duplicates(self.types)
        no_duplicates(self.names)
        return self


def _selection_form(v: Any) -> str | None:
    """Which form of ``measure.layers`` a value takes (only that form's errors are reported)."""
    if isinstance(v, str):
        return "keyword"
    if isinstance(v, (list, tuple)):
        return "names"
    if isinstance(v, (dict, LayerSelection)):
        return "selection"
    return None


Layers = Annotated[
    Annotated[Literal["blocks", "stages"], Tag("keyword")] | Annotated[list[str], Tag("names")] | Annotated[LayerSelection, Tag("selection")],
    Discriminator(_selection_form, custom_error_type="layers_form",
                  custom_error_message="expected 'blocks', 'stages', a list of module name patterns, "
                                       "or a mapping {types: [...], names: [...]}"),
]


class MeasureSpec(SpecBlock):
    """What is measured on every tapped layer."""

    layers: Layers = Field(
        "blocks", description="'blocks' (every residual/transformer block + penultimate), 'stages', module name patterns, "
                              "or {types: [module classes], names: [patterns]}."
    )
    reduction: str = Field("avgpool", pattern=r"^(avgpool|flatten|project:[1-9][0-9]*)$")
    metrics: Unique[Literal[REGISTRY.selectable()]] = Field(  # the metric registry's choices (docs/metrics.md)
        default_factory=lambda: list(REGISTRY.defaults()), min_length=1)
    nc1_dim_cap: int = Field(DEFAULTS.nc1_dim_cap, ge=1, le=65536, description="NC1 is computed for layers of at most this dimension.")
    scatter_products: Literal[SCATTER_PRODUCTS] = Field(
        DEFAULTS.scatter_products, description="Precision of the D x D scatter's per-batch products: float64 (exact to "
                                               "float64 rounding) or float32 (faster; error bound in docs/metrics.md).")
    keep_features_bytes: int = Field(
        DEFAULTS.keep_features_bytes, ge=0, description="Budget (bytes per process) for keeping the training split's "
                                                        "pooled features from the first pass, so ncc_acc/train needs no "
                                                        "second pass; 0: always a second pass.")
    batch_size: int = Field(256, ge=1, le=1_000_000)
    epochs: Unique[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list,
        description="Training studies: epochs at which every tapped layer is also measured during training (0 = at "
                    "initialisation; at most train.epochs; the final epoch is always measured). Stored per run as "
                    "layer_metrics.parquet (see README, 'Collapse during training').")

    @field_validator("layers")
    @classmethod
    def _nonempty_layers(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("layer pattern list is empty: give at least one pattern, or 'blocks'")
            no_duplicates(v)
        return v

    @property
    def layer_selection(self) -> str | list[str] | dict[str, list[str]]:
        """``layers`` as :class:`pnc.features.FeatureExtractor` takes it."""
        if isinstance(self.layers, LayerSelection):
            return {k: v for k, v in self.layers.model_dump().items() if v}
        return self.layers


class ProbeSpec(SpecBlock):
    """Layer-wise linear probes: trained on the training split, scored on the test split."""

    kind: Literal[PROBES] = PROBES[0]
    val_fraction: float = Field(DEFAULTS.val_fraction, gt=0, lt=1, description="Part of the training split held out to pick regularisation.")
    max_samples: int = Field(DEFAULTS.max_samples, ge=10, description="Cap on cached samples per layer (logistic probe).")
    samples_per_class: int | None = Field(None, ge=1, description="Target samples per class (kinds that probe other domains).")


class TrackingSpec(SpecBlock):
    experiment: str | None = Field(None, description="MLflow experiment; default: the study name.")
    registered_model: str | None = Field(None, description="Model-registry name (kinds that register models); default: '<study>-<model>'.")


# ----------------------------------------------------------------------------- studies
class StudySpecBase(SpecBlock):
    """What every study kind has; a kind's spec class (in ``pnc/kinds/<kind>.py``) adds its ``kind`` literal and blocks."""

    name: str = Field(pattern=_NAME_RE, max_length=64, description="Study name (lower-case, digits, '_' or '-').")
    description: str = ""
    dataset: DatasetSpec
    models: list[ModelEntry] = Field(min_length=1)
    train: TrainSpec = TrainSpec()
    measure: MeasureSpec = MeasureSpec()
    probe: ProbeSpec = ProbeSpec()
    tracking: TrackingSpec = TrackingSpec()

    @field_validator("models")
    @classmethod
    def _unique_models(cls, v: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in v]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"duplicate models: {', '.join(dups)}")
        return v

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name


@lru_cache(maxsize=1)
def adapter() -> TypeAdapter:
    """The spec language: the union of every registered kind's spec class, discriminated on ``kind``."""
    classes = tuple(k.spec_class for k in KINDS.all())
    return TypeAdapter(Annotated[Union[classes], Field(discriminator="kind")])  # noqa: UP007 - a runtime tuple of classes


def json_schema() -> dict:
    schema = adapter().json_schema()
    # a model entry is a bare name or a mapping (the BeforeValidator turns names into mappings)
    for _name, d in schema.get("$defs", {}).items():
        models = d.get("properties", {}).get("models")
        if models and "items" in models:
            models["items"] = {"anyOf": [{"type": "string", "description": "model name"}, models["items"]]}
    entry = schema.get("$defs", {}).get("ModelSpec")
    if entry and "name" in entry.get("required", []):  # a logged model (uri) gets its name from the uri
        entry["required"] = [r for r in entry["required"] if r != "name"]
        entry["anyOf"] = [{"required": ["name"]}, {"required": ["uri"]}]
    schema["title"] = "pnc study spec"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


# ----------------------------------------------------------------------------- cross-field rules
def kinds_where(attr: str) -> list[str]:
    """The registered study kinds whose kind object has ``attr`` true (e.g. ``domains_in_spec``)."""
    return [k.name for k in KINDS.all() if getattr(k, attr)]


def semantic_problems(spec: Any) -> list[tuple[tuple, str]]:
    """Rules that involve more than one field: the common ones here, the kind's own from its ``rules``.
    Returns (loc, message) pairs. ``spec`` may be a partial spec (the valid blocks of an invalid one)."""
    out: list[tuple[tuple, str]] = []
    kind = KINDS.get(spec.kind)
    if catalog.DATASETS[spec.dataset.name].user:
        try:
            spec.dataset.info  # noqa: B018 - reads the folder names and array headers
        except DataError as e:
            return [(("dataset", "root" if spec.dataset.root is None or "split" not in str(e) else "splits"), str(e))]
        if not spec.dataset.size:
            out.append((("dataset", "image_size"), f"the images of {spec.dataset.root} vary in size: set dataset.image_size "
                                                    "(they are resized to it)"))
    elif spec.dataset.splits is not None:
        out.append((("dataset", "splits"), f"{spec.dataset.name} has fixed splits; `splits` is for your own data "
                                           "(image_folder, arrays): remove it"))
    info = spec.dataset.info
    if spec.dataset.train_split not in info.splits:
        out.append((("dataset", "train_split"), f"{info.name} has no split {spec.dataset.train_split!r}.{did_you_mean(spec.dataset.train_split, info.splits)}"))
    if spec.dataset.test_split is not None and spec.dataset.test_split not in info.splits:
        out.append((("dataset", "test_split"), f"{info.name} has no split {spec.dataset.test_split!r}.{did_you_mean(spec.dataset.test_split, info.splits)}"))
    if spec.dataset.domain is not None:
        if kind.domains_in_spec:
            out.append((("dataset", "domain"), f"a {kind.name} study names its domains under {kind.domains_in_spec}, not dataset.domain"))
        elif not info.domains:
            out.append((("dataset", "domain"), f"{info.name} has no domains; remove dataset.domain"))
        elif spec.dataset.domain not in info.domains:
            out.append((("dataset", "domain"), f"unknown domain {spec.dataset.domain!r} of {info.name}.{did_you_mean(spec.dataset.domain, info.domains)}"))
    elif info.domains and not kind.domains_in_spec:
        out.append((("dataset",), f"{info.name} has several domains: set dataset.domain to one of {', '.join(info.domains)}"))
    if spec.probe.samples_per_class is not None and not kind.probes_per_class:
        out.append((("probe", "samples_per_class"), f"only a {' or '.join(kinds_where('probes_per_class'))} study probes on a "
                                                    "fixed number of target samples per class; remove it"))
    for i, m in enumerate(spec.models):
        if m.source != "auto":
            libs = catalog.library_model_names()
            ok = catalog.cifar_resnet_depth(m.name) is not None if m.source == "pnc" else m.name in libs.get(m.source, ())
            if not ok:
                out.append((("models", i, "source"), f"{m.name!r} is not a {m.source} model (it resolves to {catalog.model_source(m.name)})"))
        if m.resolved_source == "pnc" and m.cifar_stem is False:
            out.append((("models", i, "cifar_stem"), f"{m.name} is one of pnc's CIFAR ResNets, which always have the 3x3 stem; remove cifar_stem"))
        if m.factory:
            out += [(("models", i, "factory"), msg) for msg in factory_problems(m.factory)]
        if m.weights is not None and not Path(m.weights).expanduser().is_file():
            out.append((("models", i, "weights"), f"weights file {m.weights!r} does not exist (from {Path.cwd()}); nothing is downloaded"))
        if m.uri and kind.trains:
            out.append((("models", i, "uri"), f"a {kind.name} study trains its networks; a logged model (uri) is measured by a "
                                              f"{' or '.join(kinds_where('measures_given'))} study"))
    return out + snapshot_epoch_problems(spec, kind) + kind.rules(spec)


def snapshot_epoch_problems(spec: Any, kind: Any) -> list[tuple[tuple, str]]:
    """``measure.epochs``: only where networks are trained, each at most ``train.epochs``."""
    measure, train = getattr(spec, "measure", None), getattr(spec, "train", None)
    epochs = getattr(measure, "epochs", None) or []
    if epochs and not kind.trains:
        return [(("measure", "epochs"), f"a {kind.name} study measures given networks and trains none: measure.epochs "
                                        f"applies to {' and '.join(kinds_where('trains'))} studies; remove it")]
    if train is None:
        return []
    return [(("measure", "epochs", i), f"epoch {e} is beyond train.epochs ({train.epochs}); the final epoch "
                                       f"({train.epochs}) is always measured")
            for i, e in enumerate(epochs) if e > train.epochs]


def _duplicate_model_names(data: dict) -> list[tuple[tuple, str]]:
    """Models listed twice, from the raw entries (also when another entry is invalid)."""
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        return []
    names = [m if isinstance(m, str) else m.get("name") if isinstance(m, dict) else None for m in models]
    names = [n for n in names if isinstance(n, str)]
    dups = sorted({n for n in names if names.count(n) > 1})
    return [(("models",), f"duplicate models: {', '.join(dups)}")] if dups else []


def strings_of(v: Any) -> list[str | None]:
    """The entries of a raw list that are strings (others None, keeping indices); [] for anything but a list."""
    return [x if isinstance(x, str) else None for x in v] if isinstance(v, list) else []


def _partial_spec(data: dict) -> Any | None:
    """The blocks of an invalid spec that do validate, for the cross-field rules (None without a valid dataset).
    The kind adds its own blocks (:meth:`pnc.kinds.base.StudyKind.partial`)."""
    from types import SimpleNamespace

    if data.get("kind") not in KINDS:
        return None
    raw = data.get("dataset")
    # An invalid dataset block still names its dataset (and domain): enough for the domain and label-set rules.
    tries = [raw] + ([{k: raw[k] for k in ("name", "domain") if k in raw}] if isinstance(raw, dict) else [])
    for attempt in tries:
        try:
            dataset = DatasetSpec.model_validate(attempt)
            break
        except ValidationError:
            continue
    else:
        return None
    # train and measure for measure.epochs vs train.epochs; an invalid probe block gives its defaults, the others are left out
    blocks = {"probe": ProbeSpec()}
    for key, block in (("probe", ProbeSpec), ("train", TrainSpec), ("measure", MeasureSpec)):
        try:
            blocks[key] = block.model_validate(data.get(key) if data.get(key) is not None else {})
        except ValidationError:
            pass
    return SimpleNamespace(kind=data["kind"], dataset=dataset, models=[], **blocks, **KINDS.get(data["kind"]).partial(data))


# ----------------------------------------------------------------------------- YAML with positions
def _yaml():
    from ruamel.yaml import YAML

    y = YAML(typ="rt")
    y.allow_duplicate_keys = False
    return y


_PLAIN_SCALARS = {"ScalarFloat": float, "ScalarBoolean": bool, "ScalarInt": int, "HexInt": int, "OctalInt": int, "BinaryInt": int}


def _to_plain(node: Any) -> Any:
    """A parsed document as plain dicts, lists and scalars (ruamel's own scalar types converted)."""
    if isinstance(node, dict):  # also ruamel's CommentedMap
        return {str(k) if not isinstance(k, (str, int, float, bool)) else k: _to_plain(v) for k, v in node.items()}
    if isinstance(node, list):  # also CommentedSeq
        return [_to_plain(v) for v in node]
    name = type(node).__name__
    if name == "TaggedScalar":
        return str(node.value)
    if name in _PLAIN_SCALARS:
        return _PLAIN_SCALARS[name](node)
    return str(node) if isinstance(node, str) else node


def _position(doc: Any, loc: tuple, at_key: bool = False) -> tuple[int, int]:
    """1-based (line, col) of the deepest node of ``loc`` that exists in the YAML document
    (of the key itself rather than its value when ``at_key``)."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    def pos(get: Any, *args: Any) -> tuple[int, int] | None:
        try:  # a node added by --set (a plain dict or a CommentedMap built in memory) has no positions
            ln, cl = get(*args)
            return (ln + 1, cl + 1) if isinstance(ln, int) and isinstance(cl, int) else None
        except Exception:  # noqa: BLE001 - positions are best effort
            return None

    node = doc
    line, col = pos(lambda: (doc.lc.line, doc.lc.col)) or (1, 1)
    for depth, key in enumerate(loc):
        last_key = at_key and depth == len(loc) - 1
        if isinstance(node, CommentedMap) and key in node:
            at = pos(node.lc.key, key)
        elif isinstance(node, CommentedSeq) and isinstance(key, int) and 0 <= key < len(node):
            at = pos(node.lc.item, key)
        else:
            break
        if at is None:  # stop at the nearest ancestor that has a position
            break
        line, col = at
        child = node[key]
        # of a mapping's key: point at the value when it is a scalar on the same line
        if isinstance(node, CommentedMap) and not isinstance(child, (CommentedMap, CommentedSeq)) and not last_key:
            line, col = pos(node.lc.value, key) or (line, col)
        node = child
    return line, col


def _clean_loc(loc: tuple) -> tuple:
    """Drop the discriminator tags and validator names pydantic adds to error locations."""
    out: list = []
    for i, part in enumerate(loc):
        tag = part in KINDS if i == 0 else i and isinstance(loc[i - 1], int) and part in catalog.LABEL_NOISE_KINDS
        if isinstance(part, str) and (tag or part.startswith("function-") or part in ("str", "ModelSpec")):
            continue
        if tuple(loc[max(i - 2, 0):i]) == ("measure", "layers") and part in ("keyword", "names", "selection"):  # its form
            continue
        out.append(part)
    return tuple(out)


def _dotted(loc: tuple) -> str:
    s = ""
    for part in loc:
        part = part if isinstance(part, int) else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(part))
        s += f"[{part}]" if isinstance(part, int) else (f".{part}" if s else part)
    return s


def _message(err: dict, data: Any, loc: tuple) -> str:
    typ, msg = err["type"], err["msg"]
    if typ == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], data)
        hint = did_you_mean(str(loc[-1]), allowed) if allowed else ""
        return f"unknown key {loc[-1]!r}.{hint}"
    if typ == "missing":
        return "required key is missing"
    if typ == "union_tag_invalid":
        tags = err.get("ctx", {}).get("expected_tags", "")
        got = err.get("ctx", {}).get("tag", "")
        opts = [t.strip().strip("'") for t in str(tags).split(",")]
        return f"unknown kind {got!r}.{did_you_mean(str(got), opts)}"
    if typ == "union_tag_not_found":
        return "missing key 'kind': one of " + ", ".join(KINDS.names()) if not loc else f"missing key 'kind' ({err.get('ctx', {}).get('discriminator', '')})"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    if typ not in ("value_error",) and not isinstance(got, (dict, list)) and got is not None:
        msg += f" (got {got!r})"
    return msg


def _allowed_keys(loc: tuple, data: Any) -> list[str]:
    """Field names allowed at ``loc`` (used for 'did you mean' on unknown keys)."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in KINDS:
        return []
    cls = KINDS.get(kind).spec_class
    for part in loc:
        if isinstance(part, int):  # an entry of a list: the list's model
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return []
        cls = _model_of(field.annotation)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return []


def _model_of(ann: Any) -> Any:
    """The pydantic model a field's annotation holds (through lists, ``Annotated`` and unions), or None."""
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    args, origin = typing.get_args(ann), typing.get_origin(ann)
    if origin in (list, Annotated) and args:
        return _model_of(args[0])
    models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    if models and (origin is Union or origin is type(int | str)):  # of several (a discriminated union), the first
        return models[0]
    return next((m for m in map(_model_of, args) if m is not None), None)


def parse_yaml_text(text: str, file: str) -> Any:
    """Parse YAML keeping positions; malformed YAML raises SpecError with its position."""
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        doc = _yaml().load(io.StringIO(text))
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise SpecError([Problem(file, line, col, "", f"malformed YAML: {what}")]) from None
    except YAMLError as e:  # e.g. a character YAML does not allow (ReaderError: an offset, not a mark)
        pos = getattr(e, "position", None)
        line, col = (text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)) if isinstance(pos, int) else (1, 1)
        raise SpecError([Problem(file, line, col, "", f"malformed YAML: {str(e).splitlines()[0]}")]) from None
    except RecursionError:
        raise SpecError([Problem(file, 1, 1, "", "malformed YAML: nesting too deep")]) from None
    tagged = _foreign_tags(doc)
    if tagged:
        raise SpecError([Problem(file, line, col, "", f"unsupported YAML tag {tag}: a spec holds plain mappings, lists "
                                 "and scalars") for line, col, tag in tagged])
    return doc


def _foreign_tags(node: Any, depth: int = 0) -> list[tuple[int, int, str]]:
    """(line, col, tag) of every mapping or list carrying a tag other than YAML's own (``!!python/object:...``,
    ``!custom``): the loader keeps such a node as a plain mapping or list, which would hide the tag."""
    if depth > 200 or not isinstance(node, (dict, list)):
        return []
    out = []
    tag = getattr(getattr(node, "tag", None), "value", None)
    if tag is not None and tag not in ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"):
        lc = getattr(node, "lc", None)
        out.append(((lc.line + 1, lc.col + 1) if lc is not None and lc.line is not None else (1, 1))
                   + (tag.replace("tag:yaml.org,2002:", "!!"),))
    for child in (node.values() if isinstance(node, dict) else node):
        out.extend(_foreign_tags(child, depth + 1))
    return out


def read_spec_text(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise SpecError([Problem(str(path), 1, 1, "", "no such file; give the path of a study spec such as specs/digits_depth.yaml")])
    if p.is_dir():
        specs = sorted(str(x) for x in p.glob("*.yaml"))
        hint = f" (it holds {len(specs)} specs: pass them as {p}/*.yaml)" if specs else ""
        raise SpecError([Problem(str(path), 1, 1, "", f"is a directory, not a spec file{hint}")])
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise SpecError([Problem(str(path), 1, 1, "", f"cannot read: {e.strerror}")]) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SpecError([Problem(str(path), line, 1, "", "not UTF-8 text; save the spec as UTF-8")]) from None


_SEGMENT_RE = re.compile(r"^([^.\[\]]+)?((?:\[\d+\])*)$")


def _parse_key(key: str, override: str) -> tuple:
    """``train.optimizer.lr`` / ``models[1].name`` -> ('train', 'optimizer', 'lr') / ('models', 1, 'name')."""
    usage = "expected key.path=value, e.g. train.epochs=1"
    if not key:
        raise PncError(f"--set {override}: empty key path; {usage}")
    parts: list[Any] = []
    for seg in key.split("."):
        if not seg.strip():
            raise PncError(f"--set {override}: empty key segment; {usage}")
        m = _SEGMENT_RE.match(seg.strip())
        if m is None or (not parts and not m.group(1)):
            raise PncError(f"--set {override}: malformed key segment {seg!r} (a key name, optionally followed by "
                           f"[index]); {usage}")
        if m.group(1):
            parts.append(m.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return tuple(parts)


def _set_path(doc: Any, parts: tuple, value: Any, override: str) -> tuple | None:
    """Set ``parts`` to ``value`` in ``doc``; returns the location of the first mapping it had to create (or None)."""
    from ruamel.yaml.comments import CommentedMap

    created: tuple | None = None
    node = doc
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                where = f"index {part} is out of range" if last else f"{_dotted(parts[: i + 1])} does not exist"
                raise PncError(f"--set {override}: {where}")
        elif not isinstance(node, dict):
            what = _dotted(parts[:i])
            raise PncError(f"--set {override}: {what + ' is' if what else 'the document is'} not a mapping")
        elif not last and (part not in node or node[part] is None):
            node[part] = CommentedMap()
            created = created or parts[: i + 1]
        if last:
            node[part] = value
        else:
            node = node[part]
    return created


def apply_overrides(doc: Any, overrides: list[str]) -> dict[tuple, str]:
    """Apply ``key.path=value`` overrides (value parsed as YAML) in place; returns loc -> override text.

    The result also maps the location of every mapping an override created (``--set foo.bar=1`` creates ``foo``)
    to that override: a problem there has no position in the file and is reported as the override."""
    from ruamel.yaml.error import YAMLError

    applied: dict[tuple, str] = {}
    for raw_ov in overrides:
        # the override as messages echo it: control characters and line breaks escaped, one message one line
        ov = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in raw_ov)
        if "=" not in raw_ov:
            raise PncError(f"--set {ov}: expected key.path=value, e.g. --set train.epochs=1")
        key, _, text = raw_ov.partition("=")
        loc = _parse_key(key.strip(), ov)
        try:
            value = _yaml().load(io.StringIO(text)) if text.strip() else None
        except YAMLError as e:
            raise PncError(f"--set {ov}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
        except RecursionError:
            raise PncError(f"--set {ov}: the value is not valid YAML (nesting too deep)") from None
        created = _set_path(doc, loc, value, ov)
        applied[loc] = ov
        if created is not None:
            applied.setdefault(created, ov)
    return applied


def validate_document(doc: Any, file: str, overrides: dict[tuple, str] | None = None) -> Any:
    """Validate a parsed YAML document; raise SpecError with every problem."""
    overrides = overrides or {}
    if doc is None:
        raise SpecError([Problem(file, 1, 1, "", "empty spec; a study needs at least kind, name, dataset and models")])
    if not isinstance(doc, dict):
        line, col = _position(doc, ())
        what = "list" if isinstance(doc, list) else type(doc).__name__
        raise SpecError([Problem(file, line, col, "", f"the document must be a mapping of keys (kind, name, dataset, ...), not a {what}")])
    data = _to_plain(doc)

    def problem(loc: tuple, msg: str, at_key: bool = False) -> Problem:
        # the longest (most specific) override location that holds ``loc``: its problem is the override's
        hits = [(oloc, text) for oloc, text in overrides.items() if loc[: len(oloc)] == oloc]
        if hits:
            text = max(hits, key=lambda h: len(h[0]))[1]
            return Problem(f"{file}: --set {text}", 0, 0, _dotted(loc), msg)
        line, col = _position(doc, loc, at_key)
        return Problem(file, line, col, _dotted(loc), msg)

    try:
        spec = adapter().validate_python(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = _clean_loc(tuple(err["loc"]))
            problems.append(problem(loc, _message(err, data, loc), at_key=err["type"] == "extra_forbidden"))
        try:  # cross-field rules on the blocks that are valid: every problem at once (best effort)
            partial = _partial_spec(data)
            extra = semantic_problems(partial) if partial is not None else []
            extra += _duplicate_model_names(data)
        except Exception:  # noqa: BLE001 - the field-level problems above are reported regardless
            extra = []
        unique: dict[str, Problem] = {}  # each message once (the first of equal ones)
        for p in problems + [problem(loc, msg) for loc, msg in extra]:
            unique.setdefault(str(p), p)
        raise SpecError(sorted(unique.values(), key=lambda p: (p.file, p.line, p.col))) from None
    sem = semantic_problems(spec)
    if sem:
        raise SpecError([problem(loc, msg) for loc, msg in sem])
    return spec


def load_spec(path: str | Path, overrides: list[str] | None = None) -> Any:
    """Read, parse and validate a study spec. Raises SpecError (all problems at once) or PncError."""
    file = str(path)
    text = read_spec_text(path)
    doc = parse_yaml_text(text, file)
    if overrides and not isinstance(doc, dict):
        validate_document(doc, file)  # an empty or non-mapping document: its own message, before any override
    applied = apply_overrides(doc, overrides) if overrides else {}
    fit_snapshots_to_override(doc, applied)
    return validate_document(doc, file, applied)


def fit_snapshots_to_override(doc: Any, applied: dict[tuple, str]) -> None:
    """A quick try with ``--set train.epochs=N`` on a spec that lists ``measure.epochs`` for its full training:
    the snapshot epochs beyond N are left out (with a note on stderr) instead of failing validation. Only when
    ``train.epochs`` comes from ``--set`` and ``measure.epochs`` from the file; in the file itself, or both set
    together, an epoch beyond ``train.epochs`` is an error."""
    import sys

    if ("train", "epochs") not in applied or any(loc[:2] == ("measure", "epochs") or loc == ("measure",) for loc in applied):
        return
    train, measure = doc.get("train"), doc.get("measure")
    epochs = measure.get("epochs") if isinstance(measure, dict) else None
    last = train.get("epochs") if isinstance(train, dict) else None
    if not isinstance(epochs, list) or not isinstance(last, int) or isinstance(last, bool):
        return
    beyond = [e for e in epochs if isinstance(e, int) and not isinstance(e, bool) and e > last]
    if beyond:
        for e in beyond:
            epochs.remove(e)
        print(f"note: --set {applied[('train', 'epochs')]}: measure.epochs {', '.join(map(str, beyond))} left out "
              f"(beyond the {last} epochs trained; the final epoch is always measured)", file=sys.stderr)


def spec_digest(spec: Any) -> str:
    """sha256 of the normalized spec (all defaults filled in), first 16 hex digits."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:16]


def canonical_json(spec: Any) -> str:
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def flatten_params(spec: Any) -> dict[str, str]:
    """The normalized spec as flat ``a.b.c -> value`` strings (for MLflow params)."""
    out: dict[str, str] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                walk(f"{prefix}[{i}]", x)
        else:
            out[prefix] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)

    walk("", spec.model_dump(mode="json"))
    return out
