"""Cells: one network to train (or load) and its measurements each; a study kind expands its spec into them.

Pure and deterministic. A cell's id is a digest of exactly the spec fields that affect it
(dataset, model, training recipe, measurement, probe, its noise setting or source domain), so a
changed field re-runs exactly the cells it touches and a finished cell is found again by id.
Cell names read like ``digits_noise@model=resnet8,noise=symmetric:0.2``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from . import catalog
from .errors import PncError, did_you_mean
from .registry import KINDS
from .spec import ModelSpec, factory_file, file_digest


@dataclass(frozen=True)
class NoiseSetting:
    """One noise level of a noise study. ``clean`` is shared by every noise kind's level 0."""

    type: str  # "clean" | "label" | "input"
    kind: str  # "clean", "symmetric", "class_dependent", "human", or a corruption name
    level: Any  # rate (float), severity (int) or human label-set name

    @property
    def tag(self) -> str:
        if self.type == "clean":
            return "clean"
        level = f"{self.level:g}" if isinstance(self.level, float) else str(self.level)
        return f"{self.kind}:{level}"

    @property
    def is_clean(self) -> bool:
        return self.type == "clean"


@dataclass(frozen=True)
class Cell:
    study: str
    kind: str
    model: ModelSpec
    axes: tuple[tuple[str, str], ...]
    config: str = field(repr=False)  # canonical JSON of everything that affects this cell
    noise: NoiseSetting | None = None
    source: str | None = None
    targets: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return hashlib.sha256(self.config.encode()).hexdigest()[:12]

    @property
    def train_key(self) -> str:
        """Digest of what the cell's training depends on (dataset, model, recipe, source domain), not of how it
        is measured: a transfer study whose probes or targets change reuses its registered source models."""
        cfg = json.loads(self.config)
        keep = {k: cfg[k] for k in ("kind", "dataset", "model", "train", "source", "train_fraction", "noise") if k in cfg}
        if cfg.get("measure", {}).get("epochs"):  # snapshots are taken while training: other epochs, another training run
            keep["snapshot_epochs"] = cfg["measure"]["epochs"]
        return hashlib.sha256(canonical(keep).encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        return f"{self.study}@" + ",".join(f"{k}={v}" for k, v in self.axes)

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "model": self.model.name,
            **({"noise": self.noise.tag} if self.noise else {}),
            **({"source": self.source, "targets": list(self.targets)} if self.source else {}),
        }


def cell_label(name: str) -> str:
    """A cell's name without its study (the part that tells the study's cells apart): ``digits_depth@model=resnet8``
    -> ``model=resnet8``."""
    return name.partition("@")[2] or name


def base_config(spec: Any, model: ModelSpec) -> dict:
    d = spec.model_dump(mode="json")
    return {
        "kind": spec.kind,
        "dataset": {k: v for k, v in d["dataset"].items() if not (k == "splits" and v is None)},  # ids kept from before splits
        "model": model.config() | ({"factory_digest": file_digest(factory_file(model.factory))} if model.factory else {}),
        "train": d["train"],
        # measure.epochs enters the id only when set: ids of studies without snapshots are kept from before it;
        # keep_features_bytes is a memory budget: it changes no number
        "measure": {k: v for k, v in d["measure"].items() if not (k == "epochs" and not v) and k != "keep_features_bytes"},
        "probe": d["probe"],
        "measurement": catalog.MEASUREMENT_VERSION,
    }


def canonical(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def expand(spec: Any) -> list[Cell]:
    """All cells of a study, in a stable order (models outermost): its kind's :meth:`~pnc.kinds.base.StudyKind.expand`."""
    return KINDS.get(spec.kind).expand(spec)


def find_cell(cells: list[Cell], key: str) -> Cell:
    """A cell by id (or unique id prefix) or by name."""
    hits = [c for c in cells if c.id == key or c.name == key] or [c for c in cells if c.id.startswith(key) and len(key) >= 4]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise PncError(f"cell {key!r} is ambiguous: {', '.join(c.id for c in hits)}")
    raise PncError(f"no cell {key!r} in this study.{did_you_mean(key, [c.id for c in cells] + [c.name for c in cells])} "
                   "Run `pnc plan SPEC` to list the cells.")
