"""The metric registry: every per-layer metric, declared once where it is computed, with its metadata.

A metric is declared with :func:`register` (a decorator on the function that computes it from a
layer's class statistics, see :mod:`pnc.metrics.geometry`) or :func:`declare` (a metric scored in
the measurement passes themselves, e.g. NCC accuracy). The spec's ``measure.metrics`` choices, the
logged keys, the figures' labels and log axes and ``docs/metrics.md``'s table all read
:data:`REGISTRY`. Stdlib only: ``pnc validate`` imports it (through :mod:`pnc.metrics.geometry`).

For figures::

    from pnc.metrics.geometry import REGISTRY
    REGISTRY.for_key("nc1/train")   # the Metric behind a logged key (its .label, .log_axis, .better)
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAMILIES: dict[str, str] = {
    "variability": "within-class variability (NC1)",
    "geometry": "geometry of the class means (NC2)",
    "duality": "classifier / class-mean duality (NC3)",
    "agreement": "classifier / nearest-class-mean agreement (NC4)",
    "probe": "accuracy of layer-wise classifiers",
}
NEEDS: dict[str, str] = {
    "class_stats": "per-class counts, means and squared distances of the pass (always streamed)",
    "scatter": "the D x D within-class scatter (layers with D <= nc1_dim_cap)",
    "classifier": "the layer's linear classifier: the network's own head at its input (penultimate), the probe elsewhere",
    "eval_pass": "scored sample by sample in an eval pass (needs the finished training statistics)",
}

DOC_START, DOC_END = "<!-- metric-registry -->", "<!-- /metric-registry -->"


class MetricWarning(UserWarning):
    """A metric is undefined or degenerate for the given statistics (the value is NaN or inf)."""


@dataclass(frozen=True)
class Metric:
    """One per-layer metric.

    Attributes:
        name: the name chosen in ``measure.metrics``.
        family: one of :data:`FAMILIES` (one report panel per family).
        label: axis / legend label for figures.
        better: "lower" or "higher" (towards collapse / a better classifier).
        log_axis: whether figures draw it on a log axis.
        needs: subset of :data:`NEEDS`.
        definition, source: the row of ``docs/metrics.md``'s table.
        key: prefix of the logged keys ``<key>/<split>[_<label vector>]`` (default: the name).
        kind: "scalar" (one float per layer, logged with step = layer index) or "matrix" (one array
            per layer, an artifact).
        selectable: False for a metric derived from others (not chosen in the spec).
        default: part of the spec's default selection.
        compute: ``compute(geometry) -> float | ndarray`` for a metric from class statistics; None
            for one scored in the passes (computed in :mod:`pnc.metrics.measurement`).
    """

    name: str
    family: str
    label: str
    better: str
    log_axis: bool
    needs: frozenset[str]
    definition: str
    source: str
    key: str = ""
    kind: str = "scalar"
    selectable: bool = True
    default: bool = False
    compute: Callable[[Any], Any] | None = field(default=None, compare=False, repr=False)

    @property
    def from_class_stats(self) -> bool:
        return self.compute is not None

    @property
    def artifact(self) -> str:
        """The run artifact that holds a matrix metric's values (``docs/metrics.md``); "" for a scalar one."""
        return f"{self.name}.npz" if self.kind == "matrix" else ""


class Registry:
    """Metrics by name, in declaration order."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}

    def add(self, metric: Metric) -> Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name!r} is declared twice")
        if metric.family not in FAMILIES:
            raise ValueError(f"metric {metric.name!r}: unknown family {metric.family!r}; one of {list(FAMILIES)}")
        unknown = set(metric.needs) - set(NEEDS)
        if unknown or metric.better not in ("lower", "higher") or metric.kind not in ("scalar", "matrix"):
            raise ValueError(f"metric {metric.name!r}: bad needs {sorted(unknown)}, better or kind")
        if not metric.key:
            metric = Metric(**{**metric.__dict__, "key": metric.name})
        self._metrics[metric.name] = metric
        return metric

    def __getitem__(self, name: str) -> Metric:
        return self._metrics[name]

    def __contains__(self, name: object) -> bool:
        return name in self._metrics

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._metrics.values())

    def names(self) -> tuple[str, ...]:
        return tuple(self._metrics)

    def selectable(self) -> tuple[str, ...]:
        """The choices of the spec's ``measure.metrics``."""
        return tuple(m.name for m in self if m.selectable)

    def defaults(self) -> tuple[str, ...]:
        """The spec's default selection."""
        return tuple(m.name for m in self if m.default)

    def from_class_stats(self) -> tuple[Metric, ...]:
        return tuple(m for m in self if m.compute is not None)

    def split(self, results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(scalar curves, matrix metrics) of per-layer results ``{"<key>/<split>": [value per layer]}``: the keys of
        matrix metrics (e.g. ``cdnv_matrix/train``, one K x K array per layer) go to an artifact, not to the logged
        curves."""
        matrix = {m.key for m in self if m.kind == "matrix"}
        curves = {k: v for k, v in results.items() if k.split("/", 1)[0] not in matrix}
        return curves, {k: v for k, v in results.items() if k not in curves}

    def for_key(self, key: str) -> Metric | None:
        """The metric behind a logged key ``<key>/<split>...`` (None for keys of no metric)."""
        head = key.split("/", 1)[0]
        return next((m for m in self if m.key == head), None)

    def doc_table(self) -> str:
        """The markdown table of ``docs/metrics.md`` (between its ``metric-registry`` markers)."""
        rows = ["| metric (`measure.metrics`) | logged key | family | definition | better | axis | needs | source |",
                "|---|---|---|---|---|---|---|---|"]
        for m in self:
            name = f"`{m.name}`" if m.selectable else f"`{m.name}` (derived)"
            definition = m.definition.replace("|", "\\|")
            logged = f"artifact `{m.artifact}`" if m.kind == "matrix" else f"`{m.key}/<split>`"
            rows.append(f"| {name} | {logged} | {m.family} | {definition} | {m.better} | "
                        f"{'log' if m.log_axis else 'linear'} | {', '.join(sorted(m.needs))} | {m.source} |")
        return "\n".join(rows)

    def write_doc_table(self, path: str) -> bool:
        """Rewrite the table between ``<!-- metric-registry -->`` and ``<!-- /metric-registry -->`` in ``path``;
        whether it changed. ``python -c "from pnc.metrics.geometry import REGISTRY as R; R.write_doc_table('docs/metrics.md')"``"""
        text = Path(path).read_text()
        head, _, rest = text.partition(DOC_START)
        _, _, tail = rest.partition(DOC_END)
        new = f"{head}{DOC_START}\n{self.doc_table()}\n{DOC_END}{tail}"
        Path(path).write_text(new)
        return new != text


REGISTRY = Registry()


def register(name: str, *, family: str, label: str, better: str = "lower", log_axis: bool = False,
             needs: tuple[str, ...] = (), definition: str, source: str, key: str = "", kind: str = "scalar",
             selectable: bool = True, default: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: declare the decorated ``f(geometry)`` as the metric ``name`` (from class statistics)."""

    def deco(fn: Callable) -> Callable:
        REGISTRY.add(Metric(name, family, label, better, log_axis, frozenset(("class_stats",) + tuple(needs)),
                            definition, source, key, kind, selectable, default, fn))
        return fn

    return deco


def declare(name: str, *, family: str, label: str, better: str, log_axis: bool = False,
            needs: tuple[str, ...], definition: str, source: str, key: str = "", selectable: bool = True,
            default: bool = False) -> Metric:
    """Declare a metric scored in the measurement passes (no function of class statistics)."""
    return REGISTRY.add(Metric(name, family, label, better, log_axis, frozenset(needs), definition, source, key,
                               "scalar", selectable, default, None))
