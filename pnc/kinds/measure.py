"""``measure``: measure networks that already exist, without training them, like a depth sweep measures its own.

Each listed model is one cell (one child run): a library or pnc architecture with its checkpoint (``weights``,
loaded strictly: every key and shape must match), your own architecture from a Python ``factory`` (with or
without ``weights``), or a model logged in MLflow (``uri``: ``models:/<name>/<version>``, ``models:/<name>@<alias>``,
``runs:/<run id>/<path>``), which the run records as its input model so that ``pnc lineage`` walks back to the run
that trained it. Same per-layer metrics, keys, analyses and report as a depth sweep. A cell's id covers the model
entry and the bytes of its weights file and factory source; a registry alias is resolved when the study runs, and
another version behind it is a new run (same model + same data + same measurement = skipped).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from ..catalog import model_depth
from ..cells import Cell, canonical
from ..spec import StudySpecBase, factory_file, file_digest
from .depth import DepthSweep


class MeasureStudySpec(StudySpecBase):
    """Measure existing networks (checkpoints, your architectures, models logged in MLflow) layer by layer."""

    kind: Literal["measure"]


class Measure(DepthSweep):
    """A depth sweep whose networks are given: :meth:`network` loads instead of training, :meth:`origin` names it."""

    name = "measure"
    spec_class = MeasureStudySpec
    params_key = "measure_studies"
    trains = False

    def rules(self, spec: Any) -> list[tuple[tuple, str]]:
        return [(("models", i), f"{m.name}: nothing to measure: a {self.name} study measures given networks; "
                                "give `weights: <checkpoint file>`, `uri: models:/<name>/<version>`, "
                                "`factory: <file.py>:<function>` or `pretrained: true` (library weights on disk)")
                for i, m in enumerate(spec.models) if not (m.uri or m.factory or m.weights or m.pretrained)]

    def expand(self, spec: Any) -> list[Cell]:
        d = spec.model_dump(mode="json")
        cells = []
        for model in spec.models:
            entry = model.config()
            if model.weights:
                entry["weights_digest"] = file_digest(model.weights)
            if model.factory:
                entry["factory_digest"] = file_digest(factory_file(model.factory))
            cfg = {"kind": spec.kind, "dataset": {k: v for k, v in d["dataset"].items() if v is not None}, "model": entry,
                   "measure": d["measure"], "probe": d["probe"], "seed": spec.train.seed}
            cells.append(Cell(spec.name, spec.kind, model, (("model", model.name),), canonical(cfg)))
        return cells

    def depth_family(self, models: list[str]) -> bool:
        """Listed models are a depth family when their names differ only in their numbers (resnet8, resnet20)."""
        return len(models) > 1 and len({re.sub(r"[0-9]+", "#", m) for m in models}) == 1 and all(model_depth(m) for m in models)

    # ------------------------------------------------------------------ the given network
    def origin(self, cell: Cell) -> dict[str, str]:
        """For a logged model: the exact model it resolves to now (an alias may move), and the run that trained it."""
        from .. import tracking

        uri = cell.model.uri
        if not uri:
            return {}
        c = tracking.client()
        m = re.fullmatch(r"models:/([^/@]+)(?:/([0-9]+)|@(.+))", uri)
        try:
            if m:
                name, version, alias = m.groups()
                mv = (tracking.retrying(lambda: c.get_model_version(name, version)) if version
                      else tracking.retrying(lambda: c.get_model_version_by_alias(name, alias)))
                return {tracking.TAG_MODEL_URI: f"models:/{name}/{mv.version}", tracking.TAG_MODEL_RUN: mv.run_id or ""}
            run_id = uri.split("/")[1]
            tracking.retrying(lambda: c.get_run(run_id))
            return {tracking.TAG_MODEL_URI: uri, tracking.TAG_MODEL_RUN: run_id}
        except Exception as e:  # noqa: BLE001 - MLflow raises its own types for unknown names, versions and runs
            from ..errors import ModelError

            raise ModelError(f"{cell.model.name}: {uri} is not in {tracking.tracking_uri()} "
                             f"({str(e).splitlines()[0][:200]}); list registered models in `pnc ui`") from None

    def log_origin(self, run_id: str, origin: dict[str, str]) -> None:
        from .. import tracking

        resolved = origin.get(tracking.TAG_MODEL_URI, "")
        m = re.fullmatch(r"models:/([^/]+)/([0-9]+)", resolved)
        if m:
            tracking.log_model_input(run_id, tracking.client().get_model_version(*m.groups()))

    def network(self, study: Any, cell: Cell, data: Any, run_id: str) -> tuple[Any, None]:
        """The cell's network as given (nothing trained): built and loaded, or loaded from MLflow."""
        from ..engine import build_cell_model

        model = cell.model
        if model.uri:  # safetensors + recipe only: a pickled model is refused (loading it would run its code)
            from .. import modelstore, tracking

            uri = tracking.get_run(run_id).data.tags.get(tracking.TAG_MODEL_URI, model.uri) if study.main else model.uri
            (uri,) = study.broadcast(uri)
            net = modelstore.load(uri)
        else:
            net = build_cell_model(study.spec, model, strict=True)
        return net.to(study.accelerator.device).eval(), None

    def prepare(self, spec: Any, cells: list) -> Any:
        data = super().prepare(spec, cells)
        for cell in cells:  # a missing checkpoint stops the study before anything is built
            if cell.model.weights and not Path(cell.model.weights).expanduser().is_file():
                from ..errors import ModelError

                raise ModelError(f"{cell.model.name}: weights file {cell.model.weights!r} does not exist")
        return data


KIND = Measure()
