"""Per-layer metrics from one pass's class statistics, each declared here with its metadata.

Every function takes a :class:`Geometry` (the float64 class statistics of one layer under one label
vector) and returns a float (or, for
``cdnv_matrix``, a K x K array). Definitions, sources and conventions: ``docs/metrics.md``.

Conventions (``docs/metrics.md``): classes absent from the split are excluded (K = classes present);
mu_G is the sample mean of all N features; M = [m_1 .. m_K], m_k = mu_k - mu_G; standard deviations
are population ones (divide by the count); a metric that is undefined returns NaN (or inf) with a
:class:`MetricWarning`, never silently. numpy only (``pnc validate`` imports this module).

Adding a metric computed from class statistics is one function here with its ``@register``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import cached_property

import numpy as np

from pnc.metrics.registry import REGISTRY, MetricWarning, declare, register

__all__ = ["Geometry", "REGISTRY", "MetricWarning", "pair_sq_distances"]

# below this share of ||a||^2 + ||b||^2, a pair's squared distance is recomputed from explicit differences
_GRAM_SAFE = 1e-2


def warn(msg: str) -> None:
    warnings.warn(msg, MetricWarning, stacklevel=3)


def pair_sq_distances(x: np.ndarray, *, chunk_elems: int = 1 << 24) -> np.ndarray:
    """(K, K) float64 squared distances between the rows of ``x``: ||a||^2 + ||b||^2 - 2 a.b by one
    matrix product, and, for the pairs where that could lose digits (distance^2 below 1% of
    ||a||^2 + ||b||^2), from explicit differences. Relative error ~ 1e2 * D * eps at worst, so centre
    the rows first (the class means on mu_G) to keep ||a||, ||b|| small."""
    x = np.asarray(x, dtype=np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    scale = sq[:, None] + sq[None, :]
    d2 = scale - 2.0 * (x @ x.T)
    close = np.argwhere(np.triu(d2 < _GRAM_SAFE * scale, 1))
    step = max(1, chunk_elems // max(1, x.shape[1]))
    for s in range(0, len(close), step):
        i, j = close[s:s + step, 0], close[s:s + step, 1]
        d2[i, j] = d2[j, i] = np.square(x[i] - x[j]).sum(1)
    np.fill_diagonal(d2, 0.0)
    return np.maximum(d2, 0.0)


class Geometry:
    """Float64 statistics of one layer under one label vector, restricted to the classes present.

    Args:
        count: (K,) samples per class; mean: (K, D) class means; sq_dist: (K,) per class the sum of
        ||h_i - mu_k||^2; scatter: (D, D) pooled within-class scatter or None; weight, bias: the layer's
        linear classifier, logits = weight @ h + bias, (K, D) and (K,), or None.
    """

    def __init__(self, count, mean, sq_dist, scatter=None, weight=None, bias=None):
        cnt = np.asarray(count).reshape(-1)
        self.num_classes = int(cnt.shape[0])
        self.present = cnt > 0
        self.n = cnt[self.present].astype(np.float64)
        self.mu = np.asarray(mean, dtype=np.float64)[self.present]
        self.q = np.asarray(sq_dist, dtype=np.float64)[self.present]
        self.scatter = None if scatter is None else np.asarray(scatter, dtype=np.float64)
        self.weight = None if weight is None else np.asarray(weight, dtype=np.float64)[self.present]
        self.bias = None if bias is None else np.asarray(bias, dtype=np.float64)[self.present]

    @property
    def k(self) -> int:
        """Number of classes present."""
        return int(self.n.shape[0])

    @cached_property
    def var(self) -> np.ndarray:
        return self.q / self.n

    @cached_property
    def mu_g(self) -> np.ndarray:
        return (self.n[:, None] * self.mu).sum(0) / self.n.sum()

    @cached_property
    def m(self) -> np.ndarray:
        """(K, D) centred class means m_k = mu_k - mu_G (the rows of M^T)."""
        return self.mu - self.mu_g

    @cached_property
    def norms(self) -> np.ndarray:
        return np.sqrt(np.einsum("ij,ij->i", self.m, self.m))

    @cached_property
    def d2(self) -> np.ndarray:
        """(K, K) squared distances between class means."""
        return pair_sq_distances(self.m)

    @cached_property
    def unit(self) -> np.ndarray | None:
        """(K, D) m_k / ||m_k||, or None (with a warning) when a class mean equals mu_G."""
        if np.any(self.norms == 0):
            warn("a class mean equals the global mean: its direction is undefined; returning NaN")
            return None
        return self.m / self.norms[:, None]

    @cached_property
    def cos(self) -> np.ndarray | None:
        """(K, K) cosines between centred class means."""
        u = self.unit
        return None if u is None else np.clip(u @ u.T, -1.0, 1.0)

    @cached_property
    def upper(self) -> tuple[np.ndarray, np.ndarray]:
        return np.triu_indices(self.k, 1)

    def classifier_rows(self, what: str) -> np.ndarray | None:
        """The classifier's rows w_k of the present classes, or None (with a warning) when none is known or fewer
        than two classes are present."""
        if self.weight is None:
            warn(f"{what} needs the layer's classifier, which is not known; returning NaN")
            return None
        return self.weight if self.pairs_defined(what) else None

    def pair_cosines(self, what: str) -> np.ndarray | None:
        """cos(m_k, m_k') over the pairs k<k', or None (with a warning) where undefined."""
        return self.cos[self.upper] if self.pairs_defined(what) and self.cos is not None else None

    def means_apart(self, scale: float, what: str) -> bool:
        """False (with a warning) when ``scale``, a spread of the class means, is 0: they all coincide."""
        if scale == 0.0:
            warn(f"{what}: all class means coincide; returning NaN")
        return scale != 0.0

    def pairs_defined(self, what: str) -> bool:
        if self.k < 2:
            warn(f"{what} is undefined with {self.k} class(es) present; returning NaN")
            return False
        return True


# ----------------------------------------------------------------------------- variability
@register("cdnv", family="variability", label="CDNV", log_axis=True, default=True,
          definition="mean over the K(K−1)/2 pairs k<k' of (var_k + var_k') / (2‖mu_k − mu_k'‖²), "
                     "var_k = (1/n_k) Σ_i ‖h_i − mu_k‖²",
          source="paper eq. 6–7; Galanti et al. 2021")
def cdnv(g: Geometry) -> float:
    if not g.pairs_defined("CDNV"):
        return math.nan
    i, j = g.upper
    den = 2.0 * g.d2[i, j]
    if np.any(den == 0):
        warn("CDNV: two classes have identical means; returning inf")
        return math.inf
    return float(np.mean((g.var[i] + g.var[j]) / den))


@register("cdnv_matrix", family="variability", label="pairwise CDNV", log_axis=True, kind="matrix",
          definition="K × K matrix, entry (k, k') = (var_k + var_k') / (2‖mu_k − mu_k'‖²) over all K classes; "
                     "NaN on the diagonal and in the rows and columns of absent classes, inf for coinciding means; "
                     "the mean of its off-diagonal finite entries is `cdnv`",
          source="paper eq. 7 before averaging; Galanti et al. 2021")
def cdnv_matrix(g: Geometry) -> np.ndarray:
    """The K x K matrix of pairwise CDNV values over all K classes (NaN on the diagonal and for absent classes,
    inf for coinciding means): paper eq. 7 before averaging. A matrix metric: saved as an artifact per run
    (``cdnv_matrix.npz``, see ``docs/metrics.md``), not logged as a per-layer scalar."""
    out = np.full((g.num_classes, g.num_classes), math.nan)
    if g.k == 0:
        return out
    with np.errstate(divide="ignore", invalid="ignore"):
        sub = (g.var[:, None] + g.var[None, :]) / (2.0 * g.d2)
    sub[g.d2 == 0] = math.inf
    np.fill_diagonal(sub, math.nan)
    idx = np.flatnonzero(g.present)
    out[np.ix_(idx, idx)] = sub
    return out


@register("nc1", family="variability", label="NC1", log_axis=True, needs=("scatter",), default=True,
          definition="(1/K) tr(Σ_W Σ_B⁺), Σ_W = (1/N) Σ_i (h_i − mu_{y_i})(h_i − mu_{y_i})ᵀ, "
                     "Σ_B = (1/K) Σ_k m_k m_kᵀ; Σ_B⁺ over the top K−1 eigenpairs",
          source="Papyan et al. 2020; paper Fig. 4")
def nc1(g: Geometry) -> float:
    if g.scatter is None:
        warn("NC1 needs the within-class scatter, which was not accumulated (D above the cap); returning NaN")
        return math.nan
    if not g.pairs_defined("NC1"):
        return math.nan
    _, sv, vh = np.linalg.svd(g.m / math.sqrt(g.k), full_matrices=False)
    lam, v = np.square(sv)[: g.k - 1], vh[: g.k - 1].T
    if lam.size == 0 or lam[0] == 0.0:
        warn("NC1: all class means coincide (Σ_B = 0); returning NaN")
        return math.nan
    keep = lam > max(g.k, g.m.shape[1]) * np.finfo(np.float64).eps * lam[0]
    lam, v = lam[keep], v[:, keep]
    quad = np.einsum("dj,dj->j", (g.scatter / g.n.sum()) @ v, v)
    return float((quad / lam).sum() / g.k)


@register("nc1_tr", family="variability", label="tr Σ_W / tr Σ_B", log_axis=True,
          definition="tr(Σ_W) / tr(Σ_B) = ((1/N) Σ_k n_k var_k) / ((1/K) Σ_k ‖m_k‖²)",
          source="Rangamani et al. 2023")
def nc1_tr(g: Geometry) -> float:
    tr_b = float(np.square(g.norms).sum()) / max(g.k, 1)
    if not g.pairs_defined("NC1 (trace ratio)") or not g.means_apart(tr_b, "NC1 (trace ratio)"):
        return math.nan
    return float(g.q.sum() / g.n.sum()) / tr_b


# ----------------------------------------------------------------------------- geometry
@register("nc2", family="geometry", label="NC2", default=True,
          definition="‖G/‖G‖_F − (I_K − 11ᵀ/K)/√(K−1)‖_F, G = MᵀM",
          source="paper eq. 8; Papyan et al. 2020")
def nc2(g: Geometry) -> float:
    gram = g.m @ g.m.T
    gn = float(np.linalg.norm(gram))
    if not g.pairs_defined("NC2") or not g.means_apart(gn, "NC2"):
        return math.nan
    etf = (np.eye(g.k) - 1.0 / g.k) / math.sqrt(g.k - 1)
    return float(np.linalg.norm(gram / gn - etf))


@register("equinorm", family="geometry", label="equinorm (CV of ‖m_k‖)",
          definition="std_k ‖m_k‖ / mean_k ‖m_k‖ (population std)",
          source="Papyan et al. 2020, Fig. 2")
def equinorm(g: Geometry) -> float:
    mean = float(g.norms.mean()) if g.k else 0.0
    if not g.pairs_defined("equinorm") or not g.means_apart(mean, "equinorm"):
        return math.nan
    return float(g.norms.std()) / mean


@register("equiangle", family="geometry", label="equiangularity (std of cos)",
          definition="std over pairs k<k' of cos(m_k, m_k') (population std)",
          source="Papyan et al. 2020, Fig. 3")
def equiangle(g: Geometry) -> float:
    c = g.pair_cosines("equiangle")
    return math.nan if c is None else float(c.std())


@register("max_angle", family="geometry", label="max-angle (|cos + 1/(K−1)|)",
          definition="mean over pairs k<k' of |cos(m_k, m_k') + 1/(K−1)|",
          source="Papyan et al. 2020, Fig. 4")
def max_angle(g: Geometry) -> float:
    c = g.pair_cosines("max_angle")
    return math.nan if c is None else float(np.abs(c + 1.0 / (g.k - 1)).mean())


@register("gnc2", family="geometry", label="GNC2 (log-kernel energy)",
          definition="mean over pairs k<k' of log(1 / ‖u_k − u_k'‖), u_k = m_k / ‖m_k‖; "
                     "−½ log(2K/(K−1)) on a simplex ETF",
          source="Liu et al. 2023 (hyperspherical uniformity, logarithmic kernel)")
def gnc2(g: Geometry) -> float:
    if not g.pairs_defined("GNC2") or g.unit is None:
        return math.nan
    d2 = pair_sq_distances(g.unit)[g.upper]
    if np.any(d2 == 0):
        warn("GNC2: two class means point the same way; returning inf")
        return math.inf
    return float(np.mean(-0.5 * np.log(d2)))


# ----------------------------------------------------------------------------- duality
@register("nc3", family="duality", label="NC3 (self-duality)", needs=("classifier",),
          definition="‖Wᵀ/‖W‖_F − M/‖M‖_F‖_F, rows w_k of the layer's classifier W (present classes)",
          source="Papyan et al. 2020, Fig. 5; per layer with a least-squares classifier: Harun et al. 2025")
def nc3(g: Geometry) -> float:
    w = g.classifier_rows("NC3")
    wn, mn = (float(np.linalg.norm(w)), float(np.linalg.norm(g.m))) if w is not None else (0.0, 0.0)
    if w is None or not g.means_apart(mn, "NC3") or not g.means_apart(wn, "NC3 (the classifier)"):
        return math.nan
    return float(np.linalg.norm(w / wn - g.m / mn))


@register("unc3", family="duality", label="UNC3 (CV of cos(w_k, m_k))", needs=("classifier",),
          definition="std_k cos(w_k, m_k) / mean_k cos(w_k, m_k) (population std)",
          source="Wu & Papyan 2024")
def unc3(g: Geometry) -> float:
    w = g.classifier_rows("UNC3")
    if w is None:
        return math.nan
    wn = np.sqrt(np.einsum("ij,ij->i", w, w))
    if np.any(wn == 0) or np.any(g.norms == 0):
        warn("UNC3: a classifier row or a centred class mean is zero; returning NaN")
        return math.nan
    c = np.einsum("ij,ij->i", w, g.m) / (wn * g.norms)
    mean = float(c.mean())
    if mean == 0.0:
        warn("UNC3: the mean cosine is 0; returning NaN")
        return math.nan
    return float(c.std()) / mean


# ----------------------------------------------------------------------------- scored in the passes
declare("ncc", key="ncc_acc", family="probe", label="NCC accuracy", better="higher", needs=("eval_pass",),
        default=True,
        definition="fraction of samples whose nearest (Euclidean) training-split class mean is their label",
        source="Papyan et al. 2020 (NC4); Ben-Shaul & Dekel 2022")
declare("probe", key="probe_acc", family="probe", label="probe accuracy", better="higher",
        needs=("eval_pass",), default=True,
        definition="top-1 accuracy of a linear probe trained on the layer's training features "
                   "(selection on a validation part of the training split only)",
        source="paper sec. 3.2, eq. 5")
declare("nc4", family="agreement", label="NC4 (classifier = NCC)", better="higher", needs=("classifier", "eval_pass"),
        definition="fraction of samples on which argmax_k (w_k·h + b_k) equals the nearest training-split class mean",
        source="Papyan et al. 2020, Fig. 7 (as agreement; ncc_acc stays the accuracy against labels)")
declare("mem_ratio", family="variability", label="memorization ratio Δ", better="lower", needs=("class_stats",),
        selectable=False,
        definition="Δ_l = CDNV_clean,l / CDNV_noisy,l on the training split (label vectors \"noisy\" and "
                   "\"clean\"); memorization layers {l : Δ_l > 1 + 1e−9}",
        source="paper Definitions 1–2")


# ----------------------------------------------------------------------------- memorization (paper Definitions 1-2)
def memorization_ratio(cdnv_clean: Sequence[float], cdnv_noisy: Sequence[float], *,
                       denominator: str = "noisy labels") -> list[float]:
    """Per-layer memorization ratio Delta_l = CDNV_clean,l / CDNV_noisy,l (paper Definition 1), as Python floats.

    Label noise: the training split's CDNV under the clean labels over that under the noisy (trained-on) labels.
    Corrupted inputs: the CDNV of the clean training inputs over that of the corrupted (trained-on) inputs, both
    under the training labels, same network (``docs/metrics.md``). ``denominator`` names the noisy side in the
    warning. CDNV_noisy,l = 0 gives inf (0/0 gives NaN), with a MetricWarning."""
    if len(cdnv_clean) != len(cdnv_noisy):
        raise ValueError(f"memorization_ratio: {len(cdnv_clean)} clean vs {len(cdnv_noisy)} noisy layers")
    out = []
    for c, n in zip(cdnv_clean, cdnv_noisy):
        if n == 0:
            warnings.warn(f"memorization ratio: CDNV on {denominator} is 0 (layer {len(out)})", MetricWarning, stacklevel=2)
            out.append(math.nan if c == 0 else math.inf)
        else:
            out.append(float(c) / float(n))
    return out


ROUNDING_TOL = 1e-9


def memorization_layers(ratios: Sequence[float], tol: float = ROUNDING_TOL) -> list[int]:
    """Memorization layers {l : Delta_l > 1} (paper Definition 2), as 0-based layer indices.

    ``Delta_l > 1 + tol``: identical statistics (clean labels on both sides) give Delta within a few
    ulps of 1, which must not count as memorization. NaN ratios are never counted."""
    return [i for i, r in enumerate(ratios) if r > 1.0 + tol]
