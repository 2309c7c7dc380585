"""Measurement options: every default of a measurement, defined once.

Used by the spec (``MeasureSpec`` / ``ProbeSpec`` field defaults) and by
:func:`pnc.metrics.measure` (its keyword defaults). Stdlib only: ``pnc validate`` imports it.
"""
from __future__ import annotations

from dataclasses import dataclass

RIDGE_ALPHAS: tuple[float, ...] = tuple(10.0 ** e for e in range(-6, 4))
LOGISTIC_CS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
PROBES: tuple[str, ...] = ("ridge", "logistic")
SCATTER_PRODUCTS: tuple[str, ...] = ("float64", "float32")


@dataclass(frozen=True)
class MeasureOptions:
    """How a measurement is made (not what is measured: that is the metric selection).

    Attributes:
        nc1_dim_cap: NC1 (which needs the D x D within-class scatter) only for layers with D <= this.
        probe_dim_cap: wider layers are count-sketched to this many dimensions for the probes.
        val_fraction: share of the training split (by seeded index hash) that selects the probe's
            regularisation.
        max_samples: training samples cached per layer for the logistic probe.
        ridge_alphas / logistic_cs: regularisation grids.
        scatter_products: precision of the D x D scatter's per-batch products, "float64" (exact to float64
            rounding) or "float32" (about twice as fast on CPUs, far more on GPUs with weak float64; error bound in
            docs/metrics.md, "Scatter in float32").
        keep_features_bytes: budget (bytes per process) for keeping the training pass's pooled features, so that
            ncc_acc/train is scored without a second forward pass over the training split; 0 = always a second pass.
    """

    nc1_dim_cap: int = 1024
    probe_dim_cap: int = 4096
    val_fraction: float = 0.2
    max_samples: int = 50_000
    ridge_alphas: tuple[float, ...] = RIDGE_ALPHAS
    logistic_cs: tuple[float, ...] = LOGISTIC_CS
    scatter_products: str = "float64"
    keep_features_bytes: int = 2 * 2**30


DEFAULTS = MeasureOptions()
