"""The protocol every study kind implements, and what training kinds share.

A kind is one module under ``pnc/kinds/`` that exposes ``KIND``, an instance of a :class:`StudyKind`
subclass, and is named in :data:`pnc.registry.KINDS`. It holds everything that differs between kinds: its
spec class and cross-field rules, how its spec expands into cells, the data its cells need, how a cell
runs through the engine (:class:`pnc.engine.StudyRun`), what a run logs, the study's analyses and its
report section. Adding a kind = one module here + its registry entry (+ its ``params.yaml`` group).

Module-level imports stay light (spec, cells, catalog, errors): ``pnc validate`` imports every kind.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from ..cells import Cell, base_config, canonical
from ..errors import DataError


class StudyKind:
    """One study kind. Subclasses set the class attributes and implement :meth:`expand`, :meth:`run_cell`,
    :meth:`analyses` and :meth:`report`; the rest has defaults."""

    name: ClassVar[str]
    spec_class: ClassVar[type]
    params_key: ClassVar[str]  # the group of params.yaml whose studies DVC runs with this kind's stage
    domains_in_spec: ClassVar[str] = ""  # where the kind names its domains instead of dataset.domain ("" = it does not)
    probes_per_class: ClassVar[bool] = False  # whether probe.samples_per_class applies
    curve_key: ClassVar[str] = "cdnv/train"  # the per-layer CDNV curve `pnc compare` and `pnc estimate-noise` read
    curve_role: ClassVar[str] = "cell"  # the role of the runs that log it
    trains: ClassVar[bool] = True  # whether its cells train networks (else they measure given ones)

    @property
    def measures_given(self) -> bool:
        return not self.trains
    headline_keys: ClassVar[tuple[str, ...]] = ()  # final scalars of those runs that go into DVC's metrics file, per cell

    # ------------------------------------------------------------------ spec
    def rules(self, spec: Any) -> list[tuple[tuple, str]]:
        """Cross-field rules of this kind: (loc, message) pairs. ``spec`` may be partial (see :meth:`partial`)."""
        return []

    def partial(self, data: dict) -> dict:
        """This kind's blocks of an invalid spec that still validate, for :meth:`rules` (attribute -> value)."""
        return {}

    def expand(self, spec: Any) -> list[Cell]:
        raise NotImplementedError

    # ------------------------------------------------------------------ running
    def cell_tags(self, cell: Cell) -> dict[str, str]:
        """Tags of a cell's run beyond model, depth and kind."""
        return {}

    def cell_params(self, cell: Cell) -> dict[str, str]:
        """Params of a cell's run beyond the spec's and its model's."""
        return {}

    def prepare(self, spec: Any, cells: list[Cell]) -> Any:
        """Load and check the data of every cell before anything is built (missing files stop the study here)."""
        raise NotImplementedError

    def run_cell(self, study: Any, cell: Cell, data: Any, prefix: str) -> Any:
        """Run one cell through ``study`` (:class:`pnc.engine.StudyRun`); returns its :class:`pnc.engine.CellOutcome`."""
        raise NotImplementedError

    def runs_of(self, cells: list[Cell]) -> list[tuple[str, str, str]]:
        """(cell id, role, name) of every run the study's cells make: all FINISHED = the study is complete."""
        return [(c.id, "cell", c.name) for c in cells]

    def derive(self, spec: Any, out_root: Path) -> list[Path]:
        """The derived splits of a study (DVC stage ``derive@<study>``); most kinds have none."""
        raise DataError(f"{spec.name} is a {spec.kind}; it has no derived splits")

    # ------------------------------------------------------------------ reading back
    def analyses(self, spec: Any, selection: Any = None) -> dict:
        """The study's analyses from MLflow: {"metrics", "tags", "details", "curves"} (curves: per-layer, logged to
        the parent run). ``selection``: a :class:`pnc.frames.RunSelection`, default the spec's own cells."""
        return {"metrics": {}, "tags": {}, "details": {}, "curves": {}}

    def report(self, spec: Any, folder: Path, selection: Any) -> list[tuple[str, str]]:
        """The report's sections (title, HTML), charts saved into ``folder``."""
        raise NotImplementedError

    def headline(self, spec: Any, analyses: dict, selection: Any = None) -> dict[str, float]:
        """The study's headline numbers, DVC's metrics file of its stage (flat: name -> number): each of
        :attr:`headline_keys` of every ``curve_role`` run of the spec's cells as ``<key>@<cell>`` (the cell's name
        without the study), then the metrics of ``analyses`` (:meth:`analyses`' result). ``selection`` as there."""
        from .. import tracking
        from ..cells import cell_label
        from ..frames import RunSelection, run_frame

        out: dict[str, float] = {}
        runs = run_frame(spec.experiment, role=self.curve_role, runs=selection if selection is not None else RunSelection(spec))
        for _, run in runs.iterrows():
            for key in self.headline_keys:
                v = run.get(key)
                if v is not None and v == v:
                    out[f"{key}@{cell_label(run[tracking.TAG_CELL_NAME])}"] = float(v)
        out.update({k: float(v) for k, v in (analyses.get("metrics") or {}).items()})
        return out

    def layer_curves(self, spec: Any, selection: Any = None) -> Any:
        """The per-layer CDNV curve of every ``curve_role`` run of the spec's cells, DVC's plots file of its stage:
        a DataFrame with columns ``cell`` (its name without the study), ``model``, ``layer``, ``cdnv``."""
        import pandas as pd

        from ..cells import cell_label
        from ..frames import RunSelection, layer_frame

        df = layer_frame(spec.experiment, [self.curve_key], role=self.curve_role,
                         runs=selection if selection is not None else RunSelection(spec))
        if df.empty:
            return pd.DataFrame(columns=["cell", "model", "layer", "cdnv"])
        return pd.DataFrame({"cell": [cell_label(c) for c in df.cell], "model": df.model, "layer": df.layer, "cdnv": df.value})


class CellData:
    """Each cell's data, loaded once per distinct data key and kept (``load`` is the kind's loader)."""

    def __init__(self, load, key=lambda cell: "base"):
        self.load, self.key, self.cache = load, key, {}

    def __call__(self, cell: Cell) -> Any:
        k = self.key(cell)
        if k not in self.cache:
            self.cache[k] = self.load(cell)
        return self.cache[k]


def model_cells(spec: Any, extra=lambda model: [((), {}, {})]) -> list[Cell]:
    """Cells per model (models outermost), each with ``extra(model)``'s (axes, config additions, Cell fields)."""
    cells = []
    for model in spec.models:
        base = base_config(spec, model)
        for axes, cfg, fields in extra(model):
            cells.append(Cell(spec.name, spec.kind, model, (("model", model.name), *axes), canonical({**base, **cfg}), **fields))
    return cells
