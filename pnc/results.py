"""The files a study run leaves behind for DVC: the results file (``--results``, a cached output of a study stage),
the study's headline numbers (``--metrics``, DVC ``metrics``) and its per-layer CDNV curves (``--curves``, DVC ``plots``)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .registry import KINDS
from .spec import spec_digest


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file beside it, then one rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(path: Path, spec: Any, outcomes: list) -> None:
    """``path`` (JSON, written atomically): the study, its spec digest and every cell's status, run and summary."""
    doc = {
        "study": spec.name, "kind": spec.kind, "spec_digest": spec_digest(spec),
        "cells": [{"id": o.cell.id, "name": o.cell.name, "status": o.status, "run_id": o.run_id, **o.summary,
                   **({"reason": o.reason} if o.reason else {})} for o in outcomes],
    }
    _replace(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")


@dataclass
class DvcFiles:
    """The metrics and plots files of a study stage (either may be None): its kind's
    :meth:`~pnc.kinds.base.StudyKind.headline` and :meth:`~pnc.kinds.base.StudyKind.layer_curves`, read from what
    MLflow holds for the spec's own cells, so a cell skipped (finished earlier) counts like one just run."""

    metrics: Path | None = None
    curves: Path | None = None

    def write(self, spec: Any, analyses: dict) -> None:
        kind = KINDS.get(spec.kind)
        if self.metrics is not None:
            numbers = kind.headline(spec, analyses)
            _replace(self.metrics, json.dumps({k: numbers[k] for k in sorted(numbers)}, indent=2) + "\n")
        if self.curves is not None:
            _replace(self.curves, kind.layer_curves(spec).to_csv(index=False))
