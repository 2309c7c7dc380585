"""Lazy registries: a name maps to a ``"module:attr"`` string, imported on first use.

Listing the names of a registry imports nothing, so ``pnc --help`` and ``pnc validate`` stay light, and a
module registers a thing by naming it here, once (the habit of lm-evaluation-harness's registry). An unknown
name is an error that says what exists.
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import PncError, did_you_mean


class Registry:
    """Names -> ``"package.module:attr"``; :meth:`get` imports the module the first time a name is asked for."""

    def __init__(self, what: str, entries: dict[str, str]):
        self.what = what
        self.entries = dict(entries)
        self.loaded: dict[str, Any] = {}

    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def get(self, name: str) -> Any:
        if name not in self.entries:
            raise PncError(f"unknown {self.what} {name!r}.{did_you_mean(str(name), self.entries)}")
        if name not in self.loaded:
            module, _, attr = self.entries[name].partition(":")
            self.loaded[name] = getattr(importlib.import_module(module), attr)
        return self.loaded[name]

    def all(self) -> list[Any]:
        return [self.get(n) for n in self.entries]


# Study kinds: one module each under pnc/kinds/, exposing ``KIND`` (a :class:`pnc.kinds.base.StudyKind`).
KINDS = Registry("study kind", {
    "depth_sweep": "pnc.kinds.depth:KIND",
    "noise_sweep": "pnc.kinds.noise:KIND",
    "domain_transfer": "pnc.kinds.transfer:KIND",
    "measure": "pnc.kinds.measure:KIND",
})
