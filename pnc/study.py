"""Expand a validated study spec into cells: one training run and its measurements each.

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

from .spec import ModelSpec


@dataclass(frozen=True)
class NoiseSetting:
    """One noise level of a noise_sweep. ``clean`` is shared by every kind's level 0."""

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
        return hashlib.sha256(_cfg(keep).encode()).hexdigest()[:12]

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


def noise_settings(spec: Any) -> list[NoiseSetting]:
    """Every distinct noise setting of a noise_sweep, clean first, in spec order."""
    out: list[NoiseSetting] = []

    def add(s: NoiseSetting) -> None:
        if s not in out:
            out.append(s)

    clean = NoiseSetting("clean", "clean", 0)
    for ln in spec.noise.label:
        if ln.kind == "human":
            for s in ln.label_sets:
                add(clean if s == "clean" else NoiseSetting("label", "human", s))
        else:
            for r in ln.rates:
                add(clean if r == 0 else NoiseSetting("label", ln.kind, float(r)))
    for inp in spec.noise.input:
        for s in inp.severities:
            add(clean if s == 0 else NoiseSetting("input", inp.corruption, int(s)))
    if clean in out:
        out.remove(clean)
        out.insert(0, clean)
    return out


def _base_config(spec: Any, model: ModelSpec) -> dict:
    d = spec.model_dump(mode="json")
    return {
        "kind": spec.kind,
        "dataset": d["dataset"],
        "model": model.model_dump(mode="json"),
        "train": d["train"],
        "measure": d["measure"],
        "probe": d["probe"],
    }


def _cfg(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def expand(spec: Any) -> list[Cell]:
    """All cells of a study, in a stable order (models outermost)."""
    cells: list[Cell] = []
    for model in spec.models:
        base = _base_config(spec, model)
        if spec.kind == "depth_sweep":
            cells.append(Cell(spec.name, spec.kind, model, (("model", model.name),), _cfg(base)))
        elif spec.kind == "noise_sweep":
            for ns in noise_settings(spec):
                cfg = dict(base, noise={"type": ns.type, "kind": ns.kind, "level": ns.level, "seed": spec.noise.seed})
                if spec.noise.corrupted_test and ns.type == "input" and ns.level:  # measured on CIFAR-10-C too
                    cfg["noise"]["corrupted_test"] = True
                cells.append(Cell(spec.name, spec.kind, model, (("model", model.name), ("noise", ns.tag)), _cfg(cfg), noise=ns))
        elif spec.kind == "domain_transfer":
            for src in spec.transfer.sources:
                cfg = dict(base, source=src, targets=list(spec.transfer.targets),
                           train_fraction=spec.transfer.train_fraction)
                cells.append(Cell(spec.name, spec.kind, model, (("model", model.name), ("source", src)), _cfg(cfg),
                                  source=src, targets=tuple(spec.transfer.targets)))
        else:  # pragma: no cover - the spec union has exactly these kinds
            raise AssertionError(spec.kind)
    return cells


def find_cell(cells: list[Cell], key: str) -> Cell:
    """A cell by id (or unique id prefix) or by name."""
    from .errors import PncError, did_you_mean

    hits = [c for c in cells if c.id == key or c.name == key] or [c for c in cells if c.id.startswith(key) and len(key) >= 4]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise PncError(f"cell {key!r} is ambiguous: {', '.join(c.id for c in hits)}")
    raise PncError(f"no cell {key!r} in this study.{did_you_mean(key, [c.id for c in cells] + [c.name for c in cells])} "
                   "Run `pnc plan SPEC` to list the cells.")
