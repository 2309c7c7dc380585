"""Pure neural-collapse metrics computed from :class:`~pnc.metrics.stats.ClassSummary` statistics.

Conventions follow ``design/METRICS.md`` (see ``docs/metrics.md``):

* var_k is the mean squared distance to the class mean, no Bessel correction;
* mu_G is the *sample* mean of all N features; Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T is a
  plain average over classes (so with imbalanced classes the centred means need not sum to zero);
* classes with no sample in the split are *excluded*: K below means the number of classes present.
  A metric that is undefined (fewer than two classes present, coinciding class means, no scatter)
  returns NaN or inf and emits a :class:`MetricWarning`, never silently.
All arithmetic is float64.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from pnc.metrics.stats import F64, ClassSummary


class MetricWarning(UserWarning):
    """A metric is undefined or degenerate for the given statistics (the value is NaN or inf)."""


def _warn(msg: str) -> None:
    warnings.warn(msg, MetricWarning, stacklevel=3)


def _present(s: ClassSummary) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, sq_dist) restricted to the classes present, float64."""
    keep = s.count > 0
    return s.count[keep].to(F64), s.mean[keep].to(F64), s.sq_dist[keep].to(F64)


def pairwise_sq_distances(means: Tensor, *, chunk_elems: int = 1 << 24) -> Tensor:
    """(K, K) float64 squared Euclidean distances between rows, from explicit differences (no
    ||a||^2 + ||b||^2 - 2ab cancellation), computed in row chunks of bounded memory."""
    m = means.to(F64)
    k, d = m.shape
    out = torch.empty(k, k, dtype=F64, device=m.device)
    step = max(1, chunk_elems // max(1, k * d))
    for i in range(0, k, step):
        out[i:i + step] = (m[i:i + step, None, :] - m[None, :, :]).square().sum(-1)
    return out


def class_variances(s: ClassSummary) -> Tensor:
    """Per-class variance var_k = (1/n_k) sum_i ||h_i - mu_k||^2, no Bessel correction (paper eq. 6;
    Galanti et al. 2021). (K,) float64; NaN marks classes with no sample."""
    return s.variances()


def cdnv_matrix(s: ClassSummary) -> Tensor:
    """(K, K) matrix of CDNV_{k,k'} = (var_k + var_k') / (2 ||mu_k - mu_k'||^2) (paper eq. 7 with
    sigma^2 read as the variance of eq. 6, as in Galanti et al. 2021). Entries involving an absent
    class and the diagonal are NaN; coinciding means give inf."""
    var = s.variances()
    d2 = pairwise_sq_distances(s.mean)
    m = (var[:, None] + var[None, :]) / (2.0 * d2)
    m = torch.where(d2 == 0, torch.full_like(m, math.inf), m)
    absent = ~s.present
    m[absent, :] = math.nan
    m[:, absent] = math.nan
    m.fill_diagonal_(math.nan)
    return m


def cdnv(s: ClassSummary) -> float:
    """Class-distance normalised variance: the mean over the K(K-1)/2 unordered pairs k < k' of
    (var_k + var_k') / (2 ||mu_k - mu_k'||^2).

    Source: paper eq. 7 (average of the off-diagonal entries); Galanti et al. 2021 (variance = mean
    squared distance, not squared again, so CDNV is scale invariant). Classes absent from the split
    are excluded from the pairs. Fewer than two classes present: NaN with a MetricWarning. A pair
    with coinciding means makes the result inf (with a MetricWarning).
    """
    n, mu, q = _present(s)
    k = int(n.shape[0])
    if k < 2:
        _warn(f"CDNV is undefined with {k} class(es) present; returning NaN")
        return math.nan
    var = q / n
    d2 = pairwise_sq_distances(mu)
    iu = torch.triu_indices(k, k, offset=1, device=mu.device)
    num = var[iu[0]] + var[iu[1]]
    den = 2.0 * d2[iu[0], iu[1]]
    if bool((den == 0).any()):
        _warn("CDNV: two classes have identical means; returning inf")
        return math.inf
    return float((num / den).mean())


def between_class_eig(s: ClassSummary) -> tuple[Tensor, Tensor]:
    """Top K-1 eigenpairs of Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T over present classes,
    float64, from the thin SVD of the K x D centred mean matrix (Sigma_B = V diag(S^2 / K) V^T).
    Eigenvalues at or below max(K, D) * eps * lambda_max are dropped, as a float64 pinv would.
    Returns (eigenvalues (r,), eigenvectors (D, r)), r <= K - 1."""
    n, mu, _ = _present(s)
    k = int(n.shape[0])
    mu_g = (n[:, None] * mu).sum(0) / n.sum()
    mc = (mu - mu_g) / math.sqrt(k)
    _, sv, vh = torch.linalg.svd(mc, full_matrices=False)
    lam = sv.square()[: max(k - 1, 0)]
    vecs = vh[: max(k - 1, 0)].T
    if lam.numel() == 0 or float(lam[0]) == 0.0:
        return lam[:0], vecs[:, :0]
    tol = max(k, mu.shape[1]) * torch.finfo(F64).eps * float(lam[0])
    keep = lam > tol
    return lam[keep], vecs[:, keep]


def nc1(s: ClassSummary) -> float:
    """NC1 = (1/K) tr(Sigma_W pinv(Sigma_B)), Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T,
    Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T with mu_G the sample mean of all N features;
    pinv over the top K-1 eigenpairs of Sigma_B, in float64.

    Source: Papyan, Han & Donoho 2020 (with the 1/K of Papyan; Zhu et al. 2021); paper appendix
    (Fig. 4). K = classes present. Needs the within-class scatter (``s.scatter``); without it, or with
    fewer than two classes present or all class means equal, returns NaN with a MetricWarning.
    """
    if s.scatter is None:
        _warn("NC1 needs the within-class scatter, which was not accumulated (D above the cap); returning NaN")
        return math.nan
    n, _, _ = _present(s)
    k = int(n.shape[0])
    if k < 2:
        _warn(f"NC1 is undefined with {k} class(es) present; returning NaN")
        return math.nan
    lam, v = between_class_eig(s)
    if lam.numel() == 0:
        _warn("NC1: all class means coincide (Sigma_B = 0); returning NaN")
        return math.nan
    sigma_w = s.scatter.to(F64) / n.sum()
    quad = ((sigma_w @ v) * v).sum(0)  # v_j^T Sigma_W v_j
    return float((quad / lam).sum() / k)


def nc2(s: ClassSummary) -> float:
    """NC2 = || G/||G||_F - (I_K - 1 1^T / K)/sqrt(K-1) ||_F with G = Mc^T Mc and
    Mc = [mu_1 - mu_G, ..., mu_K - mu_G], mu_G the sample mean of all N features.

    Source: paper eq. 8 (Papyan et al. 2020's equiangularity/ETF distance, Gram form). K = classes
    present; fewer than two present or all means equal: NaN with a MetricWarning.
    """
    n, mu, _ = _present(s)
    k = int(n.shape[0])
    if k < 2:
        _warn(f"NC2 is undefined with {k} class(es) present; returning NaN")
        return math.nan
    mu_g = (n[:, None] * mu).sum(0) / n.sum()
    mc = mu - mu_g
    g = mc @ mc.T
    gn = torch.linalg.matrix_norm(g)
    if float(gn) == 0.0:
        _warn("NC2: all class means coincide; returning NaN")
        return math.nan
    etf = (torch.eye(k, dtype=F64, device=g.device) - 1.0 / k) / math.sqrt(k - 1)
    return float(torch.linalg.matrix_norm(g / gn - etf))


class NearestClassMean:
    """Nearest-class-mean classifier (Euclidean) built from one split's class means (NC4: Papyan et
    al. 2020; Ben-Shaul & Dekel 2022). Only classes present in the reference split are candidates.

    Distances are compared as ||h - mu_k||^2 - ||h - mu_G||^2 = ||c_k||^2 - 2 (h - mu_G).c_k with
    c_k = mu_k - mu_G, in float64, i.e. centred on the reference sample mean, so a large common
    offset does not cancel digits.
    """

    def __init__(self, s: ClassSummary):
        keep = s.count > 0
        if not bool(keep.any()):
            raise ValueError("NearestClassMean needs at least one class with samples")
        self.classes = torch.nonzero(keep).squeeze(1)
        self.center = s.global_mean()
        self.centred_means = s.mean[keep].to(F64) - self.center
        self.sq_norms = self.centred_means.square().sum(1)

    def to(self, device: torch.device | str) -> NearestClassMean:
        for name in ("classes", "center", "centred_means", "sq_norms"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def predict(self, features: Tensor) -> Tensor:
        """(B,) int64 predicted class ids for (B, D) features."""
        h = features.to(device=self.center.device, dtype=F64) - self.center
        score = self.sq_norms.unsqueeze(0) - 2.0 * (h @ self.centred_means.T)
        return self.classes[score.argmin(1)]


def memorization_ratio(cdnv_clean: Sequence[float], cdnv_noisy: Sequence[float]) -> list[float]:
    """Per-layer memorization ratio Delta_l = CDNV_clean,l / CDNV_noisy,l (paper Definition 1).

    CDNV_noisy,l = 0 gives inf (0/0 gives NaN), with a MetricWarning."""
    if len(cdnv_clean) != len(cdnv_noisy):
        raise ValueError(f"memorization_ratio: {len(cdnv_clean)} clean vs {len(cdnv_noisy)} noisy layers")
    out = []
    for c, n in zip(cdnv_clean, cdnv_noisy):
        if n == 0:
            _warn("memorization ratio: CDNV on noisy labels is 0")
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
