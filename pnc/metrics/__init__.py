"""pnc's metric engine: streaming, exact neural-collapse statistics and layer-wise probes.

Pure: no MLflow, no model code. Conventions: ``docs/metrics.md``. Names are imported lazily (PEP 562), so
``pnc.metrics.registry``, ``pnc.metrics.geometry`` and ``pnc.metrics.options`` import without torch.

Orchestrator
------------
``measure(extract, train_batches, eval_batches=None, *, num_classes, label_names=("label",),
metrics=("cdnv", "nc1", "nc2", "ncc", "probe"), probe="ridge", probe_labels=None, nc1_dim_cap=1024,
probe_dim_cap=4096, val_fraction=0.2, seed=0, ridge_alphas=RIDGE_ALPHAS, logistic_cs=LOGISTIC_CS,
logistic_max_samples=50_000, accelerator=None, progress=True, classifiers=None, scatter_products="float64",
keep_features_bytes=2**31) -> Measurements``

* ``extract(x) -> dict[str, Tensor[B, D]]``: already-reduced features per tapped layer, in layer
  order (called once per batch, under ``torch.inference_mode``).
* ``train_batches``: iterable of ``(x, y, idx)`` or ``(x, y, idx, mask)``; ``y`` int64 (B,) or (B, C)
  with column j = label vector ``label_names[j]`` (e.g. ``("noisy", "clean")``: column 0 the labels
  the network was trained on, column 1 the clean labels); ``idx`` int64 (B,) global sample indices
  (they choose the probe's validation part); ``mask`` bool (B,), False rows are ignored (padding).
  Loaders are sharded per process; statistics are merged exactly across processes.
* ``eval_batches``: None, one iterable (named ``"test"``), or ``{split name: iterable}``. An eval
  split's ``y`` has one column (used for every label vector: e.g. clean test labels) or one per label
  vector. Exactly one forward pass per split. To get ``ncc_acc/train`` / ``probe_acc/train``, pass the
  training loader again as an eval split named ``"train"``: the nearest-class-mean classifier needs the
  final class means, which exist only after the first pass, so it is scored from the training features
  kept in the first pass when they fit ``keep_features_bytes`` (default 2 GiB per process; the loader
  is then never iterated), else in a second pass over it (``Measurements.info["train_eval"]``).
* ``metrics``: any of "cdnv", "nc1", "nc2" (measured on every split; an eval split named "train"
  skips them, they are the training pass's), "ncc" (eval splits), "probe" (with ``probe`` = "ridge" or
  "logistic"; trained on ``probe_labels``, default "clean" if present else column 0, validation part
  = ``val_fraction`` of the training split by seeded index hash, scored on eval splits).

Output keys of ``Measurements.metrics`` (one float per layer, step = layer index), with
``<sfx>`` = "" for one label vector and ``_<name>`` for several:

* ``cdnv/train<sfx>``, ``nc1/train<sfx>``, ``nc2/train<sfx>`` per training label vector;
* ``cdnv/<split>[<sfx>]`` etc. per eval split (no suffix when the split has one label column);
* ``ncc_acc/<split><sfx>``: means of training label vector ``<sfx>``, scored against the split's
  matching column (or its only column);
* ``probe_acc/<split>``;
* ``mem_ratio/train`` = cdnv/train_clean / cdnv/train_noisy when label_names holds "noisy" and
  "clean"; ``Measurements.memorization_layers`` = indices with ratio > 1.

Matrix metrics (``cdnv_matrix``) are in ``Measurements.matrices`` under the same key scheme, one K x K array
per layer; :mod:`pnc.metrics.matrices` writes and reads their run artifact (``cdnv_matrix.npz``).

Convenience
-----------
``collapse_metrics(features, labels, num_classes) -> {"cdnv", "nc1", "nc2"}`` and
``ncc_accuracy(ref_features, ref_labels, features, labels, num_classes) -> float`` (torch or numpy).

Building blocks
---------------
``ClassStats`` (streaming accumulator: ``update``, ``merge_``, ``all_reduce``, ``summary``),
``ClassSummary``, the pure functions ``cdnv``, ``nc1``, ``nc2``, ``class_variances``,
``memorization_ratio``, ``memorization_layers``, ``NearestClassMean``, and the probes ``fit_ridge``,
``fit_logistic``, ``LinearProbe``, ``validation_part``.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "collapse": ("NearestClassMean", "cdnv", "cdnv_matrix", "class_variances", "geometry", "nc1", "nc2"),
    "comm": ("Comm",),
    "geometry": ("Geometry", "REGISTRY", "ROUNDING_TOL", "memorization_layers", "memorization_ratio", "pair_sq_distances"),
    "matrices": ("matrix_arrays", "read_npz", "tidy_columns", "write_npz"),
    "measurement": ("METRICS", "Measurements", "class_summary", "collapse_metrics", "measure", "ncc_accuracy"),
    "options": ("DEFAULTS", "MeasureOptions", "LOGISTIC_CS", "RIDGE_ALPHAS"),
    "probes": ("CountSketch", "FeatureCache", "LinearProbe", "fit_logistic", "fit_ridge", "ridge_moments",
               "ridge_solve", "ridge_val_mse", "validation_part"),
    "registry": ("Metric", "MetricWarning"),
    "stats": ("ClassStats", "ClassSummary", "chan_merge"),
}
_MODULE_OF = {name: mod for mod, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    mod = _MODULE_OF.get(name)
    if mod is None:
        raise AttributeError(f"module 'pnc.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pnc.metrics.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
