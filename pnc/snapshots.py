"""Collapse during training: every tapped layer measured at chosen epochs (``measure.epochs``).

While a cell trains, :class:`Snapshots` measures its network at the chosen epochs with the cell's own one-pass
measurement (the kind's ``measure_cell``, i.e. :func:`pnc.engine.measure_model`: one pass over each measured
split, NCC's second pass over the training split only when ``ncc`` is selected). Epoch ``e`` means "after ``e``
completed epochs" (0 = at initialisation, before the first step). A snapshot runs with the training RNG states
saved and restored around it, so the network trained with snapshots is the network trained without them. The
snapshots taken so far travel in the per-epoch checkpoint (plain JSON text: ``torch.load(weights_only=True)``
still loads it), so a run killed and resumed ends with the same table as an uninterrupted one.

At the end of the cell, :func:`record` adds the final measurement as the snapshot of the final epoch (the very
values logged as the per-layer curves) and logs to the cell's run:

* ``layer_metrics.parquet``: the tidy table, one row per (epoch, layer, metric, split): columns ``epoch``,
  ``layer``, ``module``, ``metric``, ``split``, ``value`` (``pandas.read_parquet``);
* per-epoch summaries with step = epoch (MLflow's charts show the dynamics): ``<metric>_mean_intermediate/<split>``
  (mean over the layers of relative depth in :data:`pnc.analysis.INTERMEDIATE`; geometric for metrics drawn on a
  log axis), ``net_acc/<split>`` (the network's own accuracy on that split) and, with a memorization ratio,
  ``mem_layers/train`` (the number of layers with Delta > 1, ``docs/metrics.md``).

:func:`time_analyses` (the study's analyses over time, on the parent run) and :func:`report_sections` (heatmaps
and overlaid curves in the report) read the tables back.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .metrics.geometry import REGISTRY

TABLE = "layer_metrics.parquet"
COLUMNS = ("epoch", "layer", "module", "metric", "split", "value")
SUMMARY = "_mean_intermediate"
MEM_KEY = "mem_ratio/train"


class Snapshots:
    """The snapshots of one cell's training. ``measure(model)`` returns (per-layer results, layer names,
    accuracies), as the kind's final measurement does; it is a collective on a multi-process run (every process
    calls :meth:`at` at the same epochs). ``final``: ``train.epochs`` (measured by the cell itself, not here)."""

    def __init__(self, epochs: list[int], final: int, measure: Callable[[Any], tuple[dict, list[str], dict]]):
        self.epochs = sorted(set(int(e) for e in epochs))
        self.final = int(final)
        self.measure = measure
        self.taken: dict[int, dict] = {}

    def at(self, epoch: int, model: Any) -> None:
        """Measure ``model`` when ``epoch`` is a chosen one not yet taken (the final epoch is the cell's own)."""
        if epoch not in self.epochs or epoch >= self.final or epoch in self.taken:
            return
        from .train import rng_state, set_rng_state

        saved = rng_state()  # the measurement's data loaders draw from the global RNG: training must not notice
        try:
            results, names, accs = self.measure(model)
        finally:
            set_rng_state(saved)
        self.taken[epoch] = _entry(REGISTRY.split(results)[0], names, accs)  # matrix metrics (cdnv_matrix) stay out

    def state(self) -> str:
        """What the checkpoint keeps (JSON text; floats round-trip exactly)."""
        return json.dumps({str(e): s for e, s in self.taken.items()})

    def load(self, state: str | None) -> None:
        """Take back the snapshots a checkpoint kept."""
        if state:
            self.taken = {int(e): s for e, s in json.loads(state).items()}

    def with_final(self, results: dict, names: list[str], accs: dict) -> dict[int, dict]:
        """Every snapshot, the final epoch's being ``results`` (the cell's final measurement)."""
        return {**self.taken, self.final: _entry(results, names, accs)}


def _entry(results: dict, names: list[str], accs: dict) -> dict:
    """One epoch's snapshot as the checkpoint keeps it (plain floats; accuracies that are None left out)."""
    return {"results": {k: [float(x) for x in v] for k, v in results.items()}, "names": list(names),
            "accs": {k: float(v) for k, v in accs.items() if v is not None}}


def make(spec: Any, measure: Callable[[Any], tuple[dict, list[str], dict]]) -> Snapshots | None:
    """The cell's :class:`Snapshots`, or None when ``measure.epochs`` is empty (nothing changes then)."""
    return Snapshots(spec.measure.epochs, spec.train.epochs, measure) if spec.measure.epochs else None


def source_measure(spec: Any, data: Any, study: Any) -> Callable[[Any], tuple[dict, list[str], dict]]:
    """The measurement of a network trained on ``data`` (its training and test splits), for kinds whose cells
    measure elsewhere once trained (the source training of a transfer study)."""

    def measure(model: Any) -> tuple[dict, list[str], dict]:
        from .data.torchdata import ImageDataset
        from .engine import measure_model

        size, ch = spec.dataset.size, spec.dataset.info.channels
        splits = {"train": ImageDataset(data.train, image_size=size, channels=ch),
                  "test": ImageDataset(data.test, image_size=size, channels=ch)}
        return measure_model(model, spec, splits, accelerator=study.accelerator, num_classes=spec.dataset.info.num_classes,
                             label_names=("train",), progress=study.progress)

    return measure


# ----------------------------------------------------------------------------- the table and its summaries
def layer_table(snaps: dict[int, dict]) -> pd.DataFrame:
    """The tidy table of ``{epoch: {"results", "names"}}``: one row per (epoch, layer, metric, split).
    Only per-layer keys (one value per tapped layer) enter it; ``metric/split`` is split at the first '/'."""
    rows = []
    for epoch in sorted(snaps):
        s = snaps[epoch]
        names = s["names"]
        for key, values in s["results"].items():
            if len(values) != len(names) or "/" not in key:
                continue
            metric, split = key.split("/", 1)
            rows += [(int(epoch), i, names[i], metric, split, float(v)) for i, v in enumerate(values)]
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    return df.astype({"epoch": "int64", "layer": "int64", "value": "float64"})


def intermediate_mean(values: np.ndarray, log: bool) -> float:
    """Mean over the layers of relative depth in :data:`pnc.analysis.INTERMEDIATE` (finite values only; positive
    ones and a geometric mean when ``log``); NaN when none is left."""
    from .analysis import INTERMEDIATE

    v = np.asarray(values, dtype=np.float64)
    x = np.linspace(0.0, 1.0, len(v)) if len(v) > 1 else np.zeros(len(v))
    sel = (x >= INTERMEDIATE[0]) & (x <= INTERMEDIATE[1]) & np.isfinite(v) & ((v > 0) if log else True)
    if not sel.any():
        return math.nan
    return float(np.exp(np.log(v[sel]).mean())) if log else float(v[sel].mean())


def epoch_summaries(table: pd.DataFrame, accs: dict[int, dict[str, float]] | None = None) -> dict[int, dict[str, float]]:
    """Per epoch, the scalars logged with step = epoch (see the module's docstring)."""
    from .metrics.geometry import REGISTRY, memorization_layers

    out: dict[int, dict[str, float]] = {}
    for (epoch, metric, split), d in table.groupby(["epoch", "metric", "split"], sort=True):
        values = d.sort_values("layer").value.to_numpy()
        key = f"{metric}/{split}"
        m = REGISTRY.for_key(key)
        row = out.setdefault(int(epoch), {})
        row[f"{metric}{SUMMARY}/{split}"] = intermediate_mean(values, bool(m and m.log_axis))
        if key == MEM_KEY:
            row["mem_layers/train"] = float(len(memorization_layers(values.tolist())))
    for epoch, a in (accs or {}).items():
        out.setdefault(int(epoch), {}).update({f"net_acc/{s}": v for s, v in a.items() if v == v})
    return out


def record(run_id: str, snapshots: Snapshots, results: dict, names: list[str], accs: dict) -> pd.DataFrame:
    """Log the cell's table (``layer_metrics.parquet``) and per-epoch summaries to ``run_id`` (main process);
    the final epoch's snapshot is ``results``, the values logged as the per-layer curves. Returns the table."""
    from . import tracking

    snaps = snapshots.with_final(results, names, accs)
    table = layer_table(snaps)
    for epoch, values in epoch_summaries(table, {e: s["accs"] for e, s in snaps.items()}).items():
        tracking.log_metrics(run_id, {k: v for k, v in values.items() if v == v}, step=epoch)
    with tempfile.TemporaryDirectory(prefix="pnc-snap-") as tmp:
        path = Path(tmp) / TABLE
        table.to_parquet(path, index=False)
        tracking.retrying(lambda: tracking.client().log_artifact(run_id, str(path)))
    return table


# ----------------------------------------------------------------------------- reading back
def read_table(run_id: str) -> pd.DataFrame | None:
    """A run's ``layer_metrics.parquet`` (None when it has none)."""
    from . import tracking

    try:
        with tempfile.TemporaryDirectory(prefix="pnc-snap-") as tmp:
            path = tracking.client().download_artifacts(run_id, TABLE, tmp)
            return pd.read_parquet(path)
    except Exception:  # noqa: BLE001 - a run without snapshots
        return None


def snapshot_frame(spec: Any, selection: Any) -> pd.DataFrame:
    """The tables of the selected cell runs, with run_id, cell, model, depth and noise columns added."""
    from . import tracking
    from .frames import run_frame

    if not spec.measure.epochs:  # the spec's cells take no snapshots
        return pd.DataFrame()
    runs = run_frame(spec.experiment, runs=selection)
    frames = []
    for _, r in runs.iterrows():
        t = read_table(r.run_id)
        if t is None or t.empty:
            continue
        frames.append(t.assign(run_id=r.run_id, cell=r.get(tracking.TAG_CELL_NAME, ""), model=r.get("pnc.model", ""),
                               depth=int(r.get("pnc.depth", 0) or 0), noise=r.get("pnc.noise", "clean") or "clean",
                               source=r.get("source", "") or ""))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def curve_at(d: pd.DataFrame, metric: str, split: str) -> tuple[list[int], list[list[float]]]:
    """(epochs, per-epoch per-layer values) of one run's table for ``metric/split``."""
    d = d[(d.metric == metric) & (d.split == split)]
    epochs = sorted(int(e) for e in d.epoch.unique())
    return epochs, [d[d.epoch == e].sort_values("layer").value.tolist() for e in epochs]


def cell_dynamics(table: pd.DataFrame, train_acc: list[float], curve_key: str) -> dict:
    """One cell's analyses over time: ``train_acc_100_epoch`` (first epoch whose training accuracy, ``train/acc``
    of the training loop per epoch, reaches 1), the :class:`~pnc.analysis.TransitionOnset` of its ``curve_key``
    CDNV curves, and with a memorization ratio the first epoch each layer's Delta exceeds 1."""
    from . import analysis
    from .metrics.geometry import ROUNDING_TOL

    out: dict = {"train_acc_100_epoch": analysis.first_epoch_reaching(range(1, len(train_acc) + 1), train_acc, 1.0)}
    metric, split = curve_key.split("/", 1)
    epochs, curves = curve_at(table, metric, split)
    if epochs:
        out["transition"] = analysis.transition_onset(epochs, curves).as_dict()
    m_metric, m_split = MEM_KEY.split("/", 1)
    epochs, ratios = curve_at(table, m_metric, m_split)
    if epochs:
        out["mem_first_epoch"] = analysis.first_crossings(epochs, ratios, ROUNDING_TOL)
    return out


def time_analyses(spec: Any, selection: Any, curve_key: str, by_noise: bool = False, by_source: bool = False) -> dict:
    """The study's analyses over time for its parent run: per cell with a table, :func:`cell_dynamics` as
    metrics (``dynamics/<model>[/<noise>]/...``), a tag ``pnc.dynamics.<model>[.<noise>]``, per-layer curves of
    the first Delta > 1 epoch (step = layer) and details; empty when no run has snapshots."""
    from . import tracking

    out: dict = {"metrics": {}, "tags": {}, "details": {}, "curves": {}}
    df = snapshot_frame(spec, selection)
    if df.empty or "run_id" not in df:
        return out
    for run_id, d in df.groupby("run_id", sort=False):
        model, noise = d.model.iloc[0], d.noise.iloc[0]
        name = f"{model}/{noise}" if by_noise else f"{model}/{d.source.iloc[0]}" if by_source else model
        dyn = cell_dynamics(d, tracking.layer_history(run_id, "train/acc"), curve_key)
        out["details"].setdefault("dynamics", {})[name] = dyn
        key, words = f"dynamics/{name}", []
        acc100 = dyn["train_acc_100_epoch"]
        words.append(f"train acc 100% at epoch {acc100}" if acc100 is not None else "train acc never 100%")
        if acc100 is not None:
            out["metrics"][f"{key}/train_acc_100_epoch"] = acc100
        t = dyn.get("transition")
        if t:
            for k in ("first_found", "stable_from"):
                if t[k] is not None:
                    out["metrics"][f"{key}/transition_{k}_epoch"] = t[k]
            words.append(f"transition from epoch {t['stable_from']} (first found at {t['first_found']})"
                         if t["first_found"] is not None else "no transition at any measured epoch")
        mem = dyn.get("mem_first_epoch")
        if mem is not None:
            out["curves"][f"mem_first_epoch/{name}"] = [math.nan if e is None else float(e) for e in mem]
            crossed = [(e, j) for j, e in enumerate(mem) if e is not None]
            if crossed:
                e, j = min(crossed)
                out["metrics"][f"{key}/mem_first_epoch"] = e
                words.append(f"Delta > 1 first at epoch {e} (layer {j}); {len(crossed)}/{len(mem)} layers by the end")
            else:
                words.append("Delta > 1 at no layer and epoch")
        out["tags"][f"pnc.dynamics.{name.replace('/', '.')}"] = "; ".join(words)
    return out


def merge(into: dict, extra: dict) -> dict:
    """Add :func:`time_analyses`' result to a kind's analyses (``into``, changed in place and returned)."""
    for k in ("metrics", "tags", "details", "curves"):
        into.setdefault(k, {}).update(extra.get(k, {}))
    return into


# ----------------------------------------------------------------------------- report
def report_sections(spec: Any, folder: Path, selection: Any, curve_key: str, dynamics: dict | None = None,
                    by_noise: bool = False, by_source: bool = False) -> list[tuple[str, str]]:
    """The report's sections over time: per model (per noise cell in a noise study) an epoch x layer heatmap of
    log10 CDNV, the memorization ratio's heatmap with the Delta = 1 boundary, the per-layer curves at the
    measured epochs overlaid, and the analyses over time as a table; none when no run has snapshots."""
    import altair as alt

    from .figures import epoch_curves, epoch_heatmap, figure, save, table

    try:
        df = snapshot_frame(spec, selection)
    except Exception as e:  # noqa: BLE001 - the rest of the report does not depend on it
        print(f"  (snapshot sections skipped: {type(e).__name__}: {e})", file=sys.stderr)
        return []
    if df.empty or "run_id" not in df:
        return []
    metric, split = curve_key.split("/", 1)
    m_metric, m_split = MEM_KEY.split("/", 1)
    sections = []
    cells = df.drop_duplicates("run_id").sort_values(["depth", "noise", "source"])
    heat, mem, lines = [], [], []
    for _, c in cells.iterrows():
        d = df[df.run_id == c.run_id]

        label = f"{c.model} {c.noise}" if by_noise else f"{c.model} on {c.source}" if by_source else c.model
        cd = d[(d.metric == metric) & (d.split == split)]
        if not cd.empty:
            heat.append(epoch_heatmap(cd, f"{label}: log10 CDNV ({split})", log=True))
            lines.append(epoch_curves(cd, f"{label}: CDNV ({split}) per epoch", log=True))
        md = d[(d.metric == m_metric) & (d.split == m_split)]
        if not md.empty:
            mem.append(epoch_heatmap(md, f"{label}: memorization ratio", log=True, boundary=1.0))
    for charts, stem, title in ((heat, "dynamics_cdnv", "Collapse during training: log10 CDNV by epoch and layer"),
                                (mem, "dynamics_mem", "Memorization during training: Delta by epoch and layer (outlined: Delta > 1)"),
                                (lines, "dynamics_curves", "Per-layer CDNV at the measured epochs")):
        if charts:  # three per row, each with its own colour scale
            save(alt.vconcat(*[alt.hconcat(*charts[i:i + 3]).resolve_scale(color="independent")
                               for i in range(0, len(charts), 3)]).resolve_scale(color="independent"), folder, stem)
            sections.append((title, figure(stem)))
    if dynamics:
        t = pd.DataFrame([{"cell": name, "train acc 100% at epoch": d["train_acc_100_epoch"],
                           "transition first found at": (d.get("transition") or {}).get("first_found"),
                           "transition from epoch": (d.get("transition") or {}).get("stable_from"),
                           "first epoch with Delta > 1, per layer": ", ".join("-" if e is None else str(e)
                                                                             for e in d.get("mem_first_epoch") or [])}
                          for name, d in dynamics.items()])
        sections.append(("When the pattern forms (analyses over time)", table(t.dropna(axis=1, how="all"))))
    return sections
