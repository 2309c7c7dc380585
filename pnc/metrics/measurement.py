"""The single-pass measurement orchestrator and the convenience API.

See the package docstring (:mod:`pnc.metrics`) for the contract and the output keys.
"""
from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pnc.metrics.collapse import NearestClassMean, geometry
from pnc.metrics.comm import Comm
from pnc.metrics.geometry import REGISTRY, memorization_layers, memorization_ratio
from pnc.metrics.options import DEFAULTS, PROBES, SCATTER_PRODUCTS
from pnc.metrics.probes import (
    CountSketch,
    FeatureCache,
    LinearProbe,
    fit_logistic,
    fit_ridge,
    validation_part,
)
from pnc.metrics.registry import MetricWarning
from pnc.metrics.stats import F64, ClassStats, ClassSummary, check_labels

METRICS: tuple[str, ...] = REGISTRY.defaults()  # the default selection; every choice: REGISTRY.selectable()
TRAIN = "train"


@dataclass
class Measurements:
    """Result of :func:`measure`.

    Attributes:
        layers: tapped layer names, in ``extract``'s order; index = MLflow step.
        dims: feature dimension per layer.
        metrics: ``{"<metric>/<split>[_<label>]": [value per layer]}`` (floats; NaN only where a
            MetricWarning said why).
        memorization_layers: ``[l : mem_ratio/train[l] > 1]`` when label names include "noisy" and
            "clean" and CDNV was measured, else None.
        samples: number of samples counted per split (after masks, summed over processes).
        info: ``probe`` (per layer: kind, chosen ``reg``, ``grid``, ``val_scores``, ``val_metric``,
            ``n_fit``, ``n_val``, ``sketched_to``), ``nc1_skipped_layers``, ``label_names``,
            ``probe_labels``, ``state_bytes`` (bytes of accumulator state per split).
        matrices: the selected matrix metrics (``cdnv_matrix``), ``{"<metric>/<split>[_<label>]": [K x K float64
            array per layer]}``, keyed like ``metrics``; not in ``metrics`` or :meth:`as_dict`.
    """

    layers: list[str]
    dims: list[int]
    metrics: dict[str, list[float]]
    memorization_layers: list[int] | None
    samples: dict[str, int]
    info: dict[str, Any] = field(default_factory=dict)
    matrices: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def __getitem__(self, key: str) -> list[float]:
        return self.metrics[key]

    def __contains__(self, key: str) -> bool:
        return key in self.metrics

    def keys(self):
        return self.metrics.keys()

    def as_dict(self) -> dict[str, Any]:
        """Plain dict: every metric key plus ``layers`` and (if any) ``memorization_layers``."""
        out: dict[str, Any] = {k: list(v) for k, v in self.metrics.items()}
        out["layers"] = list(self.layers)
        if self.memorization_layers is not None:
            out["memorization_layers"] = list(self.memorization_layers)
        return out


# ----------------------------------------------------------------------------- batches
def _unpack(batch: Any) -> tuple[Any, Tensor, Tensor, Tensor | None]:
    if isinstance(batch, Mapping):
        return batch["x"], batch["y"], batch["idx"], batch.get("mask")
    if not isinstance(batch, (tuple, list)) or len(batch) not in (3, 4):
        raise ValueError("each batch must be (x, y, idx) or (x, y, idx, mask); got " + type(batch).__name__)
    x, y, idx = batch[0], batch[1], batch[2]
    return x, y, idx, (batch[3] if len(batch) == 4 else None)


def _as_2d_labels(y: Any) -> Tensor:
    t = torch.as_tensor(y)
    if t.ndim == 1:
        t = t.unsqueeze(1)
    if t.ndim != 2:
        raise ValueError(f"labels y must have shape (B,) or (B, L); got {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"labels y must be an integer tensor; got {t.dtype}")
    return t.long()


def _progress(it: Iterable, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    total = len(it) if hasattr(it, "__len__") else None  # type: ignore[arg-type]
    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _features(extract: Callable, x: Any, names: list[str] | None) -> dict[str, Tensor]:
    with torch.inference_mode():
        feats = extract(x)
    if not isinstance(feats, Mapping) or not feats:
        raise TypeError("extract(x) must return a non-empty dict {layer name: Tensor[B, D]}")
    if names is not None and list(feats.keys()) != names:
        raise ValueError(f"extract(x) returned layers {list(feats.keys())}, expected {names} (as in the first batch)")
    for k, v in feats.items():
        if not isinstance(v, Tensor) or v.ndim != 2 or not v.dtype.is_floating_point:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"layer {k!r}: features must be a float Tensor[B, D] (already reduced); got {shape}")
    return dict(feats)


@dataclass
class _Batch:
    """One batch as every pass uses it: features per layer and labels (and, in the training pass, the global
    indices), masked rows dropped, checked, on the features' device."""

    feats: dict[str, Tensor]
    y: Tensor  # (B, C) int64
    idx: Tensor | None  # (B,) int64 on the CPU, training pass only

    @property
    def rows(self) -> int:
        return int(self.y.shape[0])


class _BatchStream:
    """The single batch iterator of :func:`measure`'s passes: unpacks ``(x, y, idx[, mask])``, calls ``extract``,
    checks layer names, dimensions, row counts, label columns and label range, applies the mask, and moves labels
    and indices to the features' device (handled on the CPU first: no device syncs). The first batch fixes the
    layer names and dimensions for every later batch of every pass."""

    def __init__(self, extract: Callable, cfg: _Config, show: bool):
        self.extract, self.cfg, self.show = extract, cfg, show
        self.names: list[str] | None = None
        self.dims: dict[str, int] = {}
        self.device: torch.device | None = None

    def batches(self, source: Iterable, split: str, *, train: bool = False) -> Iterator[_Batch]:
        """The batches of one pass: the training pass (``train``: every label vector, indices for the probe) or
        the eval pass of ``split`` (one label column or one per label vector)."""
        cfg, L = self.cfg, self.cfg.num_labelings
        where = "" if train else f"split {split!r}: "
        cols: int | None = None
        for batch in _progress(source, f"measure {split}", self.show):
            x, y, idx, mask = _unpack(batch)
            feats = _features(self.extract, x, self.names)
            if self.names is None:
                self.names = list(feats)
                self.dims = {k: int(v.shape[1]) for k, v in feats.items()}
            if self.device is None:
                self.device = next(iter(feats.values())).device
            y2 = _as_2d_labels(y).cpu()
            if train:
                if y2.shape[1] < L:
                    raise ValueError(
                        f"training labels have {y2.shape[1]} column(s) but label_names has {L}: {list(cfg.label_names)}")
                c = L
            else:
                c = _eval_columns(y2.shape[1], L, split)
            if cols is not None and c != cols:
                raise ValueError(f"{where}the number of label columns changed between batches")
            cols = c
            y2 = y2[:, :cols]
            rows = y2.shape[0]
            idx_t = None
            if train:
                if idx is None:
                    if cfg.probe is not None:
                        raise ValueError("training batches need global sample indices idx: they choose the probe's "
                                         "validation part")
                    idx = torch.zeros(rows, dtype=torch.int64)
                idx_t = torch.as_tensor(idx).cpu().long().reshape(-1)
                if idx_t.shape[0] != rows:
                    raise ValueError(f"idx has {idx_t.shape[0]} entries for a batch of {rows} labels")
            keep = None if mask is None else torch.as_tensor(mask).cpu().bool().reshape(-1)
            if keep is not None:
                if keep.shape[0] != rows:
                    raise ValueError(f"{where}mask has {keep.shape[0]} entries for a batch of {rows} labels")
                y2 = y2[keep]
                idx_t = None if idx_t is None else idx_t[keep]
            check_labels(y2, cfg.num_classes)
            dev = self.device
            keep_d = None if keep is None else keep.to(dev)
            out: dict[str, Tensor] = {}
            for name, h in feats.items():
                if h.shape[0] != rows:
                    raise ValueError(f"{where}layer {name!r} has {h.shape[0]} rows for a batch of {rows} labels")
                if h.shape[1] != self.dims[name]:
                    raise ValueError(f"{where}layer {name!r} has dimension {h.shape[1]}, expected {self.dims[name]} "
                                     "(as in the first batch)")
                h = h.to(dev)
                out[name] = h if keep_d is None else h[keep_d]
            yield _Batch(out, y2.to(dev), idx_t)


class _KeptFeatures:
    """The training pass's features and labels, kept (in the dtype ``extract`` returned them, on its device) while
    they fit ``budget`` bytes, so that an eval split named "train" is scored from them instead of a second
    forward pass. ``fits`` turns False (and everything kept is dropped) at the first batch over the budget."""

    def __init__(self, budget: int):
        self.budget, self.nbytes, self.fits = int(budget), 0, int(budget) > 0
        self.kept: list[_Batch] = []

    def add(self, b: _Batch) -> None:
        if not self.fits:
            return
        feats = {k: v.detach().clone() for k, v in b.feats.items()}
        self.nbytes += sum(v.numel() * v.element_size() for v in feats.values()) + b.y.numel() * b.y.element_size()
        if self.nbytes > self.budget:
            self.fits, self.kept = False, []
            return
        self.kept.append(_Batch(feats, b.y.clone(), None))

    def __iter__(self) -> Iterator[_Batch]:
        return iter(self.kept)

    def __len__(self) -> int:
        return len(self.kept)


# ----------------------------------------------------------------------------- per-layer plans
class _TrainLayer:
    """Accumulators for one layer over the training split."""

    def __init__(self, name: str, dim: int, *, cfg: _Config, device: torch.device, layer_index: int):
        self.name, self.dim = name, dim
        L, K = cfg.num_labelings, cfg.num_classes
        self.nc1_ok = cfg.want_nc1 and dim <= cfg.nc1_dim_cap
        self.sketch: CountSketch | None = None
        if cfg.probe is not None and dim > cfg.probe_dim_cap:
            self.sketch = CountSketch(dim, cfg.probe_dim_cap, cfg.seed, salt=layer_index)
        self.probe_stats: ClassStats | None = None
        self.cache: FeatureCache | None = None
        probe_in_coll = True
        if cfg.probe == "ridge":
            pdim = cfg.probe_dim_cap if self.sketch is not None else dim
            self.probe_stats = ClassStats(K, pdim, num_labelings=1, num_parts=2, scatter=True, device=device,
                                          products=cfg.scatter_products)
            # the probe labels' collapse statistics come from the probe accumulator unless sketched
            probe_in_coll = self.sketch is not None
        elif cfg.probe == "logistic":
            self.cache = FeatureCache(cfg.logistic_max_samples, cfg.seed)
        self.coll_labelings = [l for l in range(L) if cfg.want_stats and (probe_in_coll or l != cfg.probe_col)]
        self.coll: ClassStats | None = None
        if self.coll_labelings:
            self.coll = ClassStats(K, dim, num_labelings=len(self.coll_labelings), scatter=self.nc1_ok, device=device,
                                   products=cfg.scatter_products)
        self._coll_cols = torch.tensor(self.coll_labelings, dtype=torch.int64, device=device)

    def update(self, h: Tensor, y: Tensor, idx: Tensor, part: Tensor | None, cfg: _Config) -> None:
        x = h.to(F64)
        if self.coll is not None:
            self.coll._update(x, y.index_select(1, self._coll_cols), None)
        if self.probe_stats is not None or self.cache is not None:
            z = self.sketch(x) if self.sketch is not None else x
            yp = y[:, cfg.probe_col]
            if self.probe_stats is not None:
                self.probe_stats._update(z, yp.unsqueeze(1), part)
            if self.cache is not None:
                self.cache.add(z, yp, idx)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in (self.coll, self.probe_stats, self.cache) if s is not None)

    def summary(self, labeling: int) -> ClassSummary:
        if labeling in self.coll_labelings:
            assert self.coll is not None
            return self.coll.summary(self.coll_labelings.index(labeling))
        assert self.probe_stats is not None
        return self.probe_stats.summary(0)


class _EvalLayer:
    def __init__(self, dim: int, *, num_labelings: int, nc1_ok: bool, collapse: bool, cfg: _Config, device):
        self.coll = (
            ClassStats(cfg.num_classes, dim, num_labelings=num_labelings, scatter=nc1_ok, device=device,
                       products=cfg.scatter_products)
            if collapse else None
        )
        self.ncc_correct = torch.zeros(cfg.num_labelings, dtype=torch.int64, device=device)
        self.probe_correct = torch.zeros((), dtype=torch.int64, device=device)
        self.nc4_agree = torch.zeros(cfg.num_labelings, dtype=torch.int64, device=device)

    @property
    def nbytes(self) -> int:
        return (self.coll.nbytes if self.coll is not None else 0) + 8 * (2 * self.ncc_correct.numel() + 1)


@dataclass
class _Config:
    num_classes: int
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    probe: str | None
    probe_col: int
    nc1_dim_cap: int
    probe_dim_cap: int
    val_fraction: float
    seed: int
    ridge_alphas: tuple[float, ...]
    logistic_cs: tuple[float, ...]
    logistic_max_samples: int
    scatter_products: str = DEFAULTS.scatter_products
    keep_features_bytes: int = DEFAULTS.keep_features_bytes

    @property
    def num_labelings(self) -> int:
        return len(self.label_names)

    @property
    def want_nc1(self) -> bool:
        """Whether a selected metric needs the D x D within-class scatter (NC1)."""
        return any("scatter" in REGISTRY[m].needs for m in self.metrics)

    @property
    def want_collapse(self) -> bool:
        return any(REGISTRY[m].from_class_stats for m in self.metrics)

    @property
    def want_stats(self) -> bool:
        return self.want_collapse or "ncc" in self.metrics or "nc4" in self.metrics

    def suffix(self, labeling: int) -> str:
        return "" if self.num_labelings == 1 else "_" + self.label_names[labeling]


def _resolve_probe_col(probe_labels: str | int | None, names: tuple[str, ...]) -> int:
    if probe_labels is None:
        return names.index("clean") if "clean" in names else 0
    if isinstance(probe_labels, str):
        if probe_labels not in names:
            raise ValueError(f"probe_labels={probe_labels!r} is not one of label_names {list(names)}")
        return names.index(probe_labels)
    col = int(probe_labels)
    if not 0 <= col < len(names):
        raise ValueError(f"probe_labels={col} is out of range for label_names {list(names)}")
    return col


def _add_class_stat_values(s: ClassSummary, cfg: _Config, nc1_ok: bool, where: str, out: dict, matrices: dict) -> None:
    """Append, under ``<key>/<where>``, every selected metric from class statistics (the registry's) that needs no
    classifier: scalars to ``out`` (those that need the scatter are NaN on layers wider than ``nc1_dim_cap``,
    warned once per measurement), matrix metrics (``cdnv_matrix``: a K x K array) to ``matrices``."""
    g = geometry(s)
    for m in REGISTRY.from_class_stats():
        if m.name in cfg.metrics and "classifier" not in m.needs:
            value = m.compute(g) if nc1_ok or "scatter" not in m.needs else math.nan
            (matrices if m.kind == "matrix" else out).setdefault(f"{m.key}/{where}", []).append(value)


def _classifier_values(s: ClassSummary, cfg: _Config, clf: tuple[Tensor, Tensor] | None) -> dict[str, float]:
    """{key: value} of the selected metrics that need the layer's classifier (NaN without one)."""
    wanted = [m for m in REGISTRY.from_class_stats() if m.name in cfg.metrics and "classifier" in m.needs]
    if not wanted:
        return {}
    g = geometry(s, clf) if clf is not None else None
    return {m.key: m.compute(g) if g is not None else math.nan for m in wanted}


# ----------------------------------------------------------------------------- measure
def measure(
    extract: Callable[[Any], Mapping[str, Tensor]],
    train_batches: Iterable,
    eval_batches: Iterable | Mapping[str, Iterable] | None = None,
    *,
    num_classes: int,
    label_names: Sequence[str] = ("label",),
    metrics: Sequence[str] = METRICS,
    probe: str | None = "ridge",
    probe_labels: str | int | None = None,
    nc1_dim_cap: int = DEFAULTS.nc1_dim_cap,
    probe_dim_cap: int = DEFAULTS.probe_dim_cap,
    val_fraction: float = DEFAULTS.val_fraction,
    seed: int = 0,
    ridge_alphas: Sequence[float] = DEFAULTS.ridge_alphas,
    logistic_cs: Sequence[float] = DEFAULTS.logistic_cs,
    logistic_max_samples: int = DEFAULTS.max_samples,
    accelerator: Any = None,
    progress: bool = True,
    classifiers: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    scatter_products: str = DEFAULTS.scatter_products,
    keep_features_bytes: int = DEFAULTS.keep_features_bytes,
) -> Measurements:
    """Measure every tapped layer in one forward pass over the training split and one per eval split.

    Args:
        extract: ``extract(x) -> {layer name: Tensor[B, D]}``, already-reduced features in layer order;
            called once per batch under ``torch.inference_mode``.
        train_batches: iterable of ``(x, y, idx)`` or ``(x, y, idx, mask)``: ``y`` int (B,) or (B, C)
            with column j = ``label_names[j]``; ``idx`` (B,) global sample indices; ``mask`` (B,) bool,
            False rows ignored. Sharded per process; merged exactly.
        eval_batches: None, an iterable (split "test") or ``{split: iterable}``; ``y`` with one column
            (used for every label vector) or one per label vector.
        num_classes: K; labels must lie in [0, K).
        label_names: names of the label columns, e.g. ``("noisy", "clean")``.
        metrics: subset of ``("cdnv", "nc1", "nc2", "ncc", "probe")``.
        probe: "ridge" (streamed closed form, all layers) | "logistic" (cached features) | None.
        probe_labels: label name or column the probe learns; default "clean" if present, else 0.
        nc1_dim_cap: NC1 only for layers with D <= this (NaN + MetricWarning above).
        probe_dim_cap: wider layers are count-sketched to this many dimensions for the probe.
        val_fraction: share of the training split (by seeded index hash) used to select the probe's
            regularisation.
        seed: seed of the validation split, the logistic cache subsample and the sketches.
        ridge_alphas / logistic_cs: regularisation grids.
        logistic_max_samples: cached training samples per layer for the logistic probe.
        accelerator: an ``accelerate.Accelerator``; else ``torch.distributed`` if initialised.
        progress: tqdm bars (only on a TTY, only on the main process).
        classifiers: ``{layer name: (weight (K, D), bias (K,))}``, the layers' own classifiers (NC3, UNC3, NC4);
            other layers use their probe.
        scatter_products: "float64" or "float32", the precision of the D x D scatter's per-batch products
            (``docs/metrics.md``, "Scatter in float32").
        keep_features_bytes: budget (bytes per process) for keeping the training pass's features and labels so
            that an eval split named "train" (which must be the training split again) is scored from them, with no
            second forward pass; 0 never keeps them. ``info["train_eval"]`` says which happened.

    Returns:
        :class:`Measurements`; keys are listed in :mod:`pnc.metrics`.
    """
    # ---------------------------------------------------------------- validate arguments
    names = tuple(str(n) for n in label_names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"label_names must be non-empty and distinct; got {list(label_names)}")
    mset = tuple(dict.fromkeys(str(m) for m in metrics))
    unknown = [m for m in mset if m not in REGISTRY.selectable()]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; available: {list(REGISTRY.selectable())}")
    if probe is not None and probe not in PROBES:
        raise ValueError(f"probe must be one of {list(PROBES)} or None; got {probe!r}")
    want_probe = "probe" in mset and probe is not None
    if want_probe and not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1) when a probe is requested; got {val_fraction}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}")
    cfg = _Config(
        num_classes=int(num_classes), label_names=names, metrics=mset, probe=probe if want_probe else None,
        probe_col=_resolve_probe_col(probe_labels, names), nc1_dim_cap=int(nc1_dim_cap),
        probe_dim_cap=int(probe_dim_cap), val_fraction=float(val_fraction), seed=int(seed),
        ridge_alphas=tuple(float(a) for a in ridge_alphas), logistic_cs=tuple(float(c) for c in logistic_cs),
        logistic_max_samples=int(logistic_max_samples), scatter_products=str(scatter_products),
        keep_features_bytes=int(keep_features_bytes),
    )
    if cfg.scatter_products not in SCATTER_PRODUCTS:
        raise ValueError(f"scatter_products must be one of {list(SCATTER_PRODUCTS)}; got {scatter_products!r}")
    if eval_batches is None:
        evals: dict[str, Iterable] = {}
    elif isinstance(eval_batches, Mapping):
        evals = {str(k): v for k, v in eval_batches.items()}
    else:
        evals = {"test": eval_batches}
    for s in evals:
        if not s or "/" in s:
            raise ValueError(f"eval split names must be non-empty without '/'; got {s!r}")
    comm = Comm(accelerator)
    show = bool(progress) and comm.is_main and sys.stderr.isatty()

    # ---------------------------------------------------------------- training pass
    stream = _BatchStream(extract, cfg, show)
    kept = _KeptFeatures(cfg.keep_features_bytes if TRAIN in evals else 0)
    layers: list[_TrainLayer] | None = None
    layer_names: list[str] | None = None
    n_local = torch.zeros((), dtype=torch.int64)
    for b in stream.batches(train_batches, TRAIN, train=True):
        if layers is None:
            layer_names = list(b.feats)
            layers = [_TrainLayer(n, int(f.shape[1]), cfg=cfg, device=stream.device, layer_index=i)
                      for i, (n, f) in enumerate(b.feats.items())]
        if b.rows == 0:
            continue
        n_local += b.rows
        kept.add(b)
        assert b.idx is not None
        dev = b.y.device
        part = validation_part(b.idx, cfg.val_fraction, cfg.seed).to(dev) if cfg.probe is not None else None
        idx_d = b.idx.to(dev)
        for lay in layers:
            lay.update(b.feats[lay.name], b.y, idx_d, part, cfg)

    seen = comm.all_gather_object(None if layers is None else [(l.name, l.dim) for l in layers])
    spec = next((s for s in seen if s is not None), None)
    if spec is None:
        raise ValueError("train_batches yielded no batches (on any process)")
    if any(s is not None and s != spec for s in seen):
        raise ValueError(f"processes disagree on the tapped layers: {seen}")
    if layers is None:  # this process got no batch: join the reduction with empty statistics
        layers = [_TrainLayer(n, d, cfg=cfg, device=comm.device, layer_index=i) for i, (n, d) in enumerate(spec)]
        layer_names = [n for n, _ in spec]
        stream.names, stream.dims = list(layer_names), dict(spec)
    assert layer_names is not None
    state_bytes = {TRAIN: sum(lay.nbytes for lay in layers)}
    n_train = int(comm.sum(n_local.to(comm.device)).item())
    if n_train == 0:
        raise ValueError("train_batches has no samples after masking")
    for lay in layers:
        for st in (lay.coll, lay.probe_stats):
            if st is not None:
                st.all_reduce(comm)
    _warn_nonfinite(TRAIN, [(lay.name, [lay.coll, lay.probe_stats]) for lay in layers])

    # ---------------------------------------------------------------- metrics from training statistics
    L = cfg.num_labelings
    out: dict[str, list[float]] = {}
    matrices: dict[str, list[np.ndarray]] = {}
    nclayers = [lay.name for lay in layers if cfg.want_nc1 and not lay.nc1_ok]
    if nclayers:
        warnings.warn(
            f"NC1 skipped (NaN) for layers wider than nc1_dim_cap={cfg.nc1_dim_cap}: {nclayers}", MetricWarning,
            stacklevel=2,
        )
    train_summaries: list[list[ClassSummary]] = []
    if cfg.want_stats:
        train_summaries = [[lay.summary(l) for l in range(L)] for lay in layers]
        for l in range(L):
            for i, lay in enumerate(layers):
                _add_class_stat_values(train_summaries[i][l], cfg, lay.nc1_ok, f"{TRAIN}{cfg.suffix(l)}", out, matrices)
    mem_layers = None
    if "cdnv" in cfg.metrics and "noisy" in names and "clean" in names:
        ratio = memorization_ratio(out[f"cdnv/{TRAIN}_clean"], out[f"cdnv/{TRAIN}_noisy"])
        out[f"mem_ratio/{TRAIN}"] = ratio
        mem_layers = memorization_layers(ratio)

    # ---------------------------------------------------------------- probes
    probes: list[LinearProbe] = []
    if cfg.probe == "ridge":
        for lay in layers:
            assert lay.probe_stats is not None
            fit, val = lay.probe_stats.summary(0, part=0), lay.probe_stats.summary(0, part=1)
            p = fit_ridge(fit, val, cfg.ridge_alphas, sketch=lay.sketch)
            probes.append(p)
    elif cfg.probe == "logistic":
        for lay in layers:
            assert lay.cache is not None
            dim = cfg.probe_dim_cap if lay.sketch is not None else lay.dim
            xc, yc, ic = lay.cache.finalize(dim, comm)
            is_val = validation_part(ic, cfg.val_fraction, cfg.seed).bool()
            p = fit_logistic(xc, yc, is_val, cfg.num_classes, cs=cfg.logistic_cs, seed=cfg.seed, sketch=lay.sketch)
            probes.append(p)
    probe_info = [{
        "layer": lay.name, "kind": p.kind, "reg": p.reg, "grid": list(p.grid), "val_scores": list(p.val_scores),
        "val_metric": "mse" if p.kind == "ridge" else "accuracy", "sketched_to": lay.sketch.out_dim if lay.sketch else None,
        **p.info,
    } for lay, p in zip(layers, probes)]
    samples = {TRAIN: int(n_train)}

    # ---------------------------------------------------------------- the layers' classifiers (NC3, UNC3, NC4)
    given = dict(classifiers or {})
    clfs: list[tuple[Tensor, Tensor] | None] = [
        given[lay.name] if lay.name in given else probes[i].in_feature_space() if probes else None
        for i, lay in enumerate(layers)]
    clf_source = ["given" if lay.name in given else cfg.probe if probes else None for lay in layers]
    if any(m in cfg.metrics for m in ("nc3", "unc3", "nc4")):
        missing = [lay.name for lay, c in zip(layers, clfs) if c is None]
        if missing:
            warnings.warn(f"NC3/UNC3/NC4 need a classifier per layer (the probe, or the network's head): NaN for {missing}",
                          MetricWarning, stacklevel=2)
        for l in range(L):
            for i in range(len(layers)):
                for k, v in _classifier_values(train_summaries[i][l], cfg, clfs[i]).items():
                    out.setdefault(f"{k}/{TRAIN}{cfg.suffix(l)}", []).append(v)

    # ---------------------------------------------------------------- eval passes
    nccs: list[list[NearestClassMean]] = []
    if "ncc" in cfg.metrics or "nc4" in cfg.metrics:
        nccs = [[NearestClassMean(s) for s in per_layer] for per_layer in train_summaries]
    # an eval split named "train" is scored from the kept training features when they fitted on every process
    from_kept = TRAIN in evals and all(comm.all_gather_object(kept.fits))
    for split, batches in evals.items():
        source = (_progress(kept, f"measure {split} (kept features)", show) if split == TRAIN and from_kept
                  else stream.batches(batches, split))
        ev = _eval_pass(source, split, cfg, layers, probes, nccs, comm, clfs)
        samples[split] = ev.pop("__n__")  # type: ignore[assignment]
        state_bytes[split] = ev.pop("__bytes__")  # type: ignore[assignment]
        matrices.update(ev.pop("__matrices__"))  # type: ignore[arg-type]
        for k, v in ev.items():
            out[k] = v  # type: ignore[assignment]

    info = {"probe": probe_info, "nc1_skipped_layers": nclayers, "classifier": clf_source, "label_names": list(names),
            "probe_labels": names[cfg.probe_col] if cfg.probe else None, "state_bytes": state_bytes,
            "train_eval": None if TRAIN not in evals else "kept features" if from_kept else "second pass",
            "kept_feature_bytes": kept.nbytes if from_kept else 0, "scatter_products": cfg.scatter_products}
    return Measurements(
        layers=list(layer_names), dims=[lay.dim for lay in layers], metrics=out,
        memorization_layers=mem_layers, samples=samples, info=info, matrices=matrices,
    )


def _eval_pass(
    source: Iterable[_Batch], split: str, cfg: _Config, layers: list[_TrainLayer],
    probes: list[LinearProbe], nccs: list[list[NearestClassMean]], comm: Comm,
    clfs: list[tuple[Tensor, Tensor] | None] | None = None,
) -> dict[str, Any]:
    L = cfg.num_labelings
    collapse = cfg.want_collapse and split != TRAIN
    state: list[_EvalLayer] | None = None
    ecols: int | None = None
    n_local = torch.zeros((), dtype=torch.int64)
    for b in source:
        y2 = b.y
        device = y2.device
        if state is None:
            ecols = int(y2.shape[1])
            state = _make_eval_state(layers, ecols, collapse, cfg, device)
            for p in probes:
                p.to(device)
            clfs = [None if c is None else (c[0].to(device, F64), c[1].to(device, F64)) for c in (clfs or [])]
            for per in nccs:
                for c in per:
                    c.to(device)
        assert ecols is not None
        if b.rows == 0:
            continue
        n_local += b.rows
        for i, lay in enumerate(layers):
            st = state[i]
            x64 = b.feats[lay.name].to(F64)
            if st.coll is not None:
                st.coll._update(x64, y2, None)
            agree = "nc4" in cfg.metrics and clfs and clfs[i] is not None
            head = (x64 @ clfs[i][0].T + clfs[i][1]).argmax(1) if agree else None
            for l, c in enumerate(nccs[i] if nccs else []):
                yl = y2[:, l if ecols > 1 else 0]
                pred = c.predict(x64)
                st.ncc_correct[l] += (pred == yl).sum()
                if head is not None:
                    st.nc4_agree[l] += (pred == head).sum()
            if probes:
                yp = y2[:, cfg.probe_col if ecols > 1 else 0]
                st.probe_correct += (probes[i].predict(x64) == yp).sum()

    seen = comm.all_gather_object(ecols)
    cols = next((c for c in seen if c is not None), None)
    if cols is None:
        raise ValueError(f"eval split {split!r} yielded no batches (on any process)")
    if any(c is not None and c != cols for c in seen):
        raise ValueError(f"processes disagree on the label columns of split {split!r}: {seen}")
    if state is None:
        state = _make_eval_state(layers, cols, collapse, cfg, comm.device)
    n = int(comm.sum(n_local.to(comm.device)).item())
    out: dict[str, Any] = {"__n__": n, "__bytes__": sum(st.nbytes for st in state), "__matrices__": {}}
    if n == 0:
        raise ValueError(f"eval split {split!r} has no samples after masking")
    esuffix = (lambda l: "") if cols == 1 or L == 1 else cfg.suffix
    if collapse:
        for st in state:
            assert st.coll is not None
            st.coll.all_reduce(comm)
        _warn_nonfinite(split, [(lay.name, [st.coll]) for lay, st in zip(layers, state)])
    for lay, st in zip(layers, state):
        if st.coll is not None:
            for l in range(st.coll.num_labelings):
                _add_class_stat_values(st.coll.summary(l), cfg, lay.nc1_ok, f"{split}{esuffix(l)}", out, out["__matrices__"])
        if nccs and "ncc" in cfg.metrics:
            correct = comm.sum(st.ncc_correct)
            for l in range(L):
                out.setdefault(f"ncc_acc/{split}{cfg.suffix(l)}", []).append(float(correct[l]) / n)
        if nccs and "nc4" in cfg.metrics:
            agree = comm.sum(st.nc4_agree)
            has = clfs is not None and clfs[layers.index(lay)] is not None
            for l in range(L):
                out.setdefault(f"nc4/{split}{cfg.suffix(l)}", []).append(float(agree[l]) / n if has else math.nan)
        if probes:
            out.setdefault(f"probe_acc/{split}", []).append(float(comm.sum(st.probe_correct)) / n)
    return out


def _warn_nonfinite(split: str, layers: list[tuple[str, list[ClassStats | None]]]) -> None:
    """One MetricWarning naming the layers whose features held NaN or inf (their metrics are NaN/inf)."""
    bad = [
        name for name, stats in layers
        if any(st is not None and not bool(torch.isfinite(st.mean).all() and torch.isfinite(st.sq_dist).all())
               for st in stats)
    ]
    if bad:
        warnings.warn(f"split {split!r}: features of layers {bad} contain NaN or inf; their metrics are not finite",
                      MetricWarning, stacklevel=3)


def _eval_columns(ncols: int, L: int, split: str) -> int:
    if ncols >= L:
        return L
    if ncols == 1:
        return 1
    raise ValueError(
        f"split {split!r}: labels have {ncols} columns; give one column (used for every label vector) or {L}"
    )


def _make_eval_state(layers: list[_TrainLayer], ecols: int, collapse: bool, cfg: _Config, device) -> list[_EvalLayer]:
    return [
        _EvalLayer(lay.dim, num_labelings=ecols, nc1_ok=lay.nc1_ok, collapse=collapse, cfg=cfg, device=device)
        for lay in layers
    ]


# ----------------------------------------------------------------------------- convenience API
def _as_tensor(a: Any) -> Tensor:
    if isinstance(a, Tensor):
        return a.detach()
    return torch.as_tensor(np.asarray(a))


def class_summary(
    features: Any, labels: Any, num_classes: int, *, scatter: bool = True, batch_size: int = 8192
) -> ClassSummary:
    """Exact per-class statistics of (N, D) features (torch or numpy) with (N,) labels, streamed in
    chunks of ``batch_size`` rows through :class:`ClassStats`."""
    x = _as_tensor(features)
    y = _as_tensor(labels).reshape(-1).long()
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features must be (N, D) and labels (N,); got {tuple(x.shape)} and {tuple(y.shape)}")
    if not x.dtype.is_floating_point:
        x = x.to(F64)
    st = ClassStats(num_classes, int(x.shape[1]), scatter=scatter, device=x.device)
    check_labels(y, num_classes)
    for i in range(0, x.shape[0], batch_size):
        st._update(x[i:i + batch_size].to(F64), y[i:i + batch_size].unsqueeze(1).to(x.device), None)
    return st.summary()


def collapse_metrics(features: Any, labels: Any, num_classes: int, *, nc1_dim_cap: int = DEFAULTS.nc1_dim_cap) -> dict[str, float]:
    """{"cdnv", "nc1", "nc2"} of one layer's features (N, D) under labels (N,), torch or numpy, float64,
    through the same streaming accumulator as :func:`measure`. NC1 is NaN (with a MetricWarning) when
    D > ``nc1_dim_cap``."""
    x = _as_tensor(features)
    ok = x.ndim == 2 and x.shape[1] <= nc1_dim_cap
    s = class_summary(x, labels, num_classes, scatter=ok)
    if not ok:
        warnings.warn(f"NC1 skipped (NaN): D = {x.shape[1]} > nc1_dim_cap = {nc1_dim_cap}", MetricWarning, stacklevel=2)
    g = geometry(s)
    return {name: REGISTRY[name].compute(g) if ok or name != "nc1" else math.nan for name in ("cdnv", "nc1", "nc2")}


def ncc_accuracy(ref_features: Any, ref_labels: Any, features: Any, labels: Any, num_classes: int,
                 *, batch_size: int = 8192) -> float:
    """Nearest-class-mean accuracy: class means from (ref_features, ref_labels), applied to ``features``
    and scored against ``labels`` (Papyan et al. 2020 NC4, scored against labels). Classes absent from
    the reference are never predicted; their samples count as errors."""
    ref = class_summary(ref_features, ref_labels, num_classes, scatter=False)
    clf = NearestClassMean(ref)
    x = _as_tensor(features)
    y = _as_tensor(labels).reshape(-1).long()
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[1] != ref.dim:
        raise ValueError(f"features must be (N, {ref.dim}) and labels (N,); got {tuple(x.shape)}, {tuple(y.shape)}")
    if y.numel() == 0:
        raise ValueError("ncc_accuracy: no samples to score")
    check_labels(y, num_classes)
    clf.to(x.device)
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((clf.predict(x[i:i + batch_size]) == y[i:i + batch_size].to(x.device)).sum())
    return correct / int(y.shape[0])
