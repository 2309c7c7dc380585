"""Matrix-valued metrics (``cdnv_matrix``) as run artifacts: one ``<metric>.npz`` per run, numpy only.

Layout of ``<metric>.npz`` (``np.load(path)``; no pickled objects; ``docs/metrics.md``):

* ``value``: float64 (S, L, K, K), the metric's K x K matrix per split and tapped layer;
* ``split``: (S,) str, the split of each row, as in the logged keys (``train``, ``test``, ``train_noisy``, ...);
* ``module``: (L,) str, the tapped module of each layer; ``layer``: (L,) int64, its index (the MLflow step).

:func:`tidy_columns` flattens one into columns (split, layer, module, class_i, class_j, value) for a DataFrame.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pnc.metrics.geometry import REGISTRY


def matrix_arrays(matrices: Mapping[str, Sequence[np.ndarray]], modules: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """{artifact file name: its arrays} of per-layer matrix results ``{"<metric>/<split>": [K x K per layer]}``
    (:meth:`pnc.metrics.registry.Registry.split`'s second half), one artifact per matrix metric."""
    by_metric: dict[str, dict[str, Sequence[np.ndarray]]] = {}
    for key, per_layer in matrices.items():
        head, _, split = key.partition("/")
        metric = REGISTRY.for_key(key)
        if metric is None or metric.kind != "matrix" or not split:
            raise ValueError(f"{key!r} is not the key of a matrix metric (<metric>/<split>)")
        if len(per_layer) != len(modules):
            raise ValueError(f"{key!r} has {len(per_layer)} layers, the run has {len(modules)}")
        by_metric.setdefault(metric.artifact, {})[split] = per_layer
    out = {}
    for name, splits in by_metric.items():
        order = sorted(splits)
        out[name] = {"value": np.stack([np.stack([np.asarray(m, dtype=np.float64) for m in splits[s]]) for s in order]),
                     "split": np.array(order, dtype=str), "module": np.array(list(modules), dtype=str),
                     "layer": np.arange(len(modules), dtype=np.int64)}
    return out


def write_npz(path: Path | str, arrays: Mapping[str, np.ndarray]) -> Path:
    """``arrays`` as a compressed ``.npz`` at ``path`` (the diagonal's NaNs and symmetric halves compress well)."""
    np.savez_compressed(path, **arrays)
    return Path(path)


def read_npz(path: Path | str) -> dict[str, np.ndarray]:
    """A matrix artifact's arrays (``value``, ``split``, ``module``, ``layer``), checked for that layout."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    missing = {"value", "split", "module", "layer"} - set(arrays)
    if missing or arrays["value"].ndim != 4 or arrays["value"].shape[:2] != (len(arrays["split"]), len(arrays["module"])):
        raise ValueError(f"{path}: not a matrix-metric artifact (value (S, L, K, K), split (S,), module (L,), layer (L,))")
    return arrays


def tidy_columns(arrays: Mapping[str, np.ndarray], layers: Sequence[int] | None = None,
                 splits: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Columns split, layer, module, class_i, class_j, value (one row per matrix entry) of the chosen layer indices
    and splits (default all): ``pandas.DataFrame(tidy_columns(read_npz(path)))``."""
    value = arrays["value"]
    s_idx = [s for s, name in enumerate(arrays["split"]) if splits is None or str(name) in splits]
    l_idx = list(range(value.shape[1])) if layers is None else [int(x) for x in layers]
    k = value.shape[-1]
    sub = value[np.ix_(s_idx, l_idx)] if s_idx and l_idx else np.zeros((len(s_idx), len(l_idx), k, k))
    si, li, ci, cj = (a.reshape(-1) for a in np.meshgrid(s_idx, l_idx, np.arange(k), np.arange(k), indexing="ij"))
    return {"split": arrays["split"][si].astype(str), "layer": arrays["layer"][li], "module": arrays["module"][li].astype(str),
            "class_i": ci, "class_j": cj, "value": sub.reshape(-1)}
