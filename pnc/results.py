"""The study results file a run leaves behind (``--results``; DVC's output of a study stage)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .spec import spec_digest


def write_results(path: Path, spec: Any, outcomes: list) -> None:
    """``path`` (JSON, written atomically): the study, its spec digest and every cell's status, run and summary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "study": spec.name, "kind": spec.kind, "spec_digest": spec_digest(spec),
        "cells": [{"id": o.cell.id, "name": o.cell.name, "status": o.status, "run_id": o.run_id, **o.summary,
                   **({"reason": o.reason} if o.reason else {})} for o in outcomes],
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
