"""MLflow -> tidy frames: which runs stand for a spec (:class:`RunSelection`), one row per (run, metric, layer)
(:func:`layer_frame`), one row per run (:func:`run_frame`) and one per matrix entry of a matrix metric's
artifact (:func:`matrix_frame`). Reads MLflow only, never torch; the figures
(:mod:`pnc.figures`) and the kinds' analyses and report sections are built on these frames.
"""
from __future__ import annotations

import json
from typing import Any

import pandas as pd

from . import tracking
from .catalog import model_depth
from .cells import expand
from .registry import KINDS
from .spec import load_spec

# the scalar metrics of a run that run_frame keeps (per-layer curves have their own frame)
RUN_METRICS = ("train/", "test/", "val/", "noise/", "final/", "best/", "efficient_depth/", "noise_map/", "transfer/")


def noise_key(tag: Any) -> tuple:
    """Sort key of a noise tag: clean first, then per kind by numeric level (2 before 10)."""
    tag = str(tag)
    if tag in ("clean", "", "nan"):
        return (0, "", 0.0, "")
    kind, _, level = tag.partition(":")
    try:
        return (1, kind, float(level), level)
    except ValueError:
        return (1, kind, float("inf"), level)


def spec_cells(spec: Any, role: str = "cell") -> dict[str, str]:
    """{run's cell id: name} of the runs of ``role`` that a spec's cells make (its kind's ``runs_of``)."""
    cells = expand(spec)
    out = {cid: name for cid, r, name in KINDS.get(spec.kind).runs_of(cells) if r == role}
    if not out and role == "cell":  # a kind whose cell runs log no curves (a transfer study's sources): the cells
        out = {c.id: c.name for c in cells}
    return out


def _newest(runs: list, key) -> list:
    """The newest run per ``key(run)``; ``runs`` come oldest first."""
    return list({key(r): r for r in runs}.values())


def _name_key(r: Any) -> str:
    return r.data.tags.get(tracking.TAG_CELL_NAME, r.info.run_id) + r.data.tags.get("target", "")


def _overrides_text(tag: str | None) -> str:
    """``pnc.overrides`` (a JSON list) as the command line wrote it: ``--set a=1 --set b=2``; "" for none."""
    if not tag:
        return ""
    try:
        items = json.loads(tag)
    except ValueError:
        return str(tag)
    return " ".join(f"--set {x}" for x in items) if isinstance(items, list) else str(items)


def _settings_summary(runs: list) -> str:
    """'epochs 2, --set train.epochs=2 (resnet8, resnet14); epochs 4, ... (resnet20)'."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in runs:
        key = (r.data.params.get("train.epochs", "?"), _overrides_text(r.data.tags.get("pnc.overrides")) or "no --set")
        groups.setdefault(key, []).append(r.data.tags.get("pnc.model", "?") + (f" -> {r.data.tags['target']}"
                                                                             if r.data.tags.get("target") else ""))
    return "; ".join(f"epochs {e}, {o} ({', '.join(sorted(set(ms), key=lambda m: (model_depth(m), m)))})"
                     for (e, o), ms in sorted(groups.items(), key=lambda g: (len(g[0][0]), g[0])))


class RunSelection:
    """The finished runs that stand for a spec's cells: per cell id of ``study.expand(spec)`` (tag ``pnc.cell_id``),
    the newest. Runs of the same cell names trained with other settings (``pnc run --set ...``) are never mixed in.

    With ``fallback`` (the report of a spec file run with other settings), when *no* run has one of the spec's cell
    ids, the newest run per cell name is used instead and :attr:`warnings` says so. :attr:`notes` lists cells
    with no finished run yet. Runs are looked up on first use, once per role.
    """

    def __init__(self, spec: Any, fallback: bool = False):
        self.spec = spec
        self.fallback = fallback
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self._cache: dict[str, list] = {}

    def resolved(self, role: str = "cell") -> bool:
        """Whether the runs of ``role`` were looked up already."""
        return role in self._cache

    def runs(self, role: str = "cell") -> list:
        if role in self._cache:
            return self._cache[role]
        found = _runs(self.spec.experiment, role)
        cells = spec_cells(self.spec, role)
        exact = _newest([r for r in found if r.data.tags.get(tracking.TAG_CELL) in cells],
                        key=lambda r: r.data.tags[tracking.TAG_CELL])
        what = "target runs" if role == "transfer" else "cells"
        if exact:
            chosen = exact
            have = {r.data.tags[tracking.TAG_CELL] for r in exact}
            missing = [name for cid, name in cells.items() if cid not in have]
            if missing:
                self.notes.append(f"{len(missing)} of {len(cells)} {what} of this spec have no finished run yet: "
                                  + ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else ""))
        elif self.fallback and found:
            chosen = _newest(found, _name_key)  # the spec's own settings never ran: whatever ran last, said loudly
            spec_epochs = getattr(getattr(self.spec, "train", None), "epochs", None)
            self.warnings.append(
                f"no runs of this spec's exact cells; showing the newest run of each model, trained with other settings: "
                f"{_settings_summary(chosen)}" + (f" (this spec: epochs {spec_epochs})" if spec_epochs is not None else "")
                + ". Run `pnc run` on this spec to measure its own cells.")
        else:
            chosen = []
        self._cache[role] = chosen
        return chosen


# ----------------------------------------------------------------------------- MLflow -> DataFrame
def _runs(experiment: str, role: str) -> list:
    c = tracking.client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_ROLE}` = '{role}' and attributes.status = 'FINISHED'",
                         max_results=5000, order_by=["attributes.start_time ASC"])


def _selected(experiment: str, role: str, runs: RunSelection | list | None) -> list:
    """The runs a frame is built from: a spec's (``RunSelection``), a given list, or else the newest run per cell name."""
    if isinstance(runs, RunSelection):
        return runs.runs(role)
    if runs is not None:
        return list(runs)
    return _newest(_runs(experiment, role), _name_key)


def layer_frame(experiment: str, keys: list[str], role: str = "cell", runs: RunSelection | list | None = None) -> pd.DataFrame:
    """One row per (run, metric, layer): run_id, cell, model, noise, source, target, metric, layer, rel_depth, value.

    ``runs``: a :class:`RunSelection` (the runs of a spec's cells), a list of runs, or None (the newest run per cell
    name, whatever settings it was trained with)."""
    rows = []
    for r in _selected(experiment, role, runs):
        tags = r.data.tags
        for key in keys:
            if key not in r.data.metrics:
                continue
            vals = tracking.layer_history(r.info.run_id, key)
            n = len(vals)
            for layer, v in enumerate(vals):
                rows.append({
                    "run_id": r.info.run_id, "cell": tags.get(tracking.TAG_CELL_NAME, ""), "model": tags.get("pnc.model", ""),
                    "depth": int(tags.get("pnc.depth", "0") or 0), "noise": tags.get("pnc.noise", "clean"),
                    "noise_kind": tags.get("pnc.noise_kind", "clean"), "noise_level": tags.get("pnc.noise_level", "0"),
                    "source": tags.get("source", ""), "target": tags.get("target", ""),
                    "metric": key, "layer": layer, "rel_depth": layer / max(1, n - 1), "value": v,
                })
    return pd.DataFrame(rows)


def matrix_frame(experiment: str, artifact: str, splits: list[str], role: str = "cell",
                 runs: RunSelection | list | None = None, max_classes: int | None = None) -> pd.DataFrame:
    """One row per (run, split, layer, class_i, class_j) of a matrix metric's artifact (``cdnv_matrix.npz``,
    :mod:`pnc.metrics.matrices`) for the first, middle and last tapped layer of each selected run that logged it:
    run_id, cell, model, depth, source, target, split, layer, module, position ("first" / "middle" / "last"),
    class_i, class_j, value. Runs with more than ``max_classes`` classes are left out (a figure cannot show them)."""
    import os
    import tempfile

    from .metrics.matrices import read_npz, tidy_columns

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small artifact is noise
    c = tracking.client()
    frames = []
    for r in _selected(experiment, role, runs):
        if artifact not in {a.path for a in tracking.retrying(lambda r=r: c.list_artifacts(r.info.run_id))}:
            continue
        with tempfile.TemporaryDirectory(prefix="pnc-matrix-") as d:
            arrays = read_npz(tracking.retrying(lambda r=r, d=d: c.download_artifacts(r.info.run_id, artifact, d)))
        n, k = arrays["value"].shape[1], arrays["value"].shape[-1]
        if n == 0 or (max_classes is not None and k > max_classes):
            continue
        ends = dict.fromkeys([0, (n - 1) // 2, n - 1])  # first, middle, last (fewer when the run has < 3 layers)
        f = pd.DataFrame(tidy_columns(arrays, list(ends), splits))
        f["position"] = f.layer.map(dict(zip(ends, ("first", "middle", "last") if len(ends) == 3 else ("first", "last"))))
        tags = r.data.tags
        for col, tag, default in (("cell", tracking.TAG_CELL_NAME, ""), ("model", "pnc.model", ""), ("source", "source", ""),
                                  ("target", "target", ""), ("noise", "pnc.noise", "clean")):
            f[col] = tags.get(tag, default)
        f["run_id"], f["depth"] = r.info.run_id, int(tags.get("pnc.depth", "0") or 0)
        frames.append(f)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def run_frame(experiment: str, role: str = "cell", runs: RunSelection | list | None = None) -> pd.DataFrame:
    """One row per selected finished run (see :func:`layer_frame`): tags, ``epochs`` (param ``train.epochs``),
    ``overrides`` (the ``--set`` it was run with) and final scalar metrics; models shallowest first."""
    rows = []
    for r in _selected(experiment, role, runs):
        row = {"run_id": r.info.run_id, **{k: v for k, v in r.data.tags.items() if k.startswith("pnc.") or k in ("source", "target")}}
        row["epochs"] = r.data.params.get("train.epochs", "")
        row["overrides"] = _overrides_text(r.data.tags.get("pnc.overrides")) or "none"
        row.update({k: v for k, v in r.data.metrics.items() if "/" not in k or k.startswith(RUN_METRICS)})
        rows.append(row)
    return _sort_runs(pd.DataFrame(rows))


def _sort_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Rows by model depth (resnet8 before resnet14), then noise setting (clean first, numeric levels), source, target."""
    if df.empty or "pnc.model" not in df:
        return df

    def key(i: Any) -> tuple:
        row = df.loc[i]
        return (model_depth(row["pnc.model"]), str(row["pnc.model"]), noise_key(row.get("pnc.noise", "clean")),
                str(row.get("source", "")), str(row.get("target", "")))

    return df.loc[sorted(df.index, key=key)].reset_index(drop=True)


def study_of(study: str) -> tuple[str, str, Any]:
    """(label, experiment, spec or None) for a spec path or a study/experiment name."""
    if study.endswith((".yaml", ".yml")) or "/" in study:
        spec = load_spec(study)
        return spec.name, spec.experiment, spec
    return study, study, None

