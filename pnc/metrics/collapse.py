"""Torch-side access to the registered metrics (:mod:`pnc.metrics.geometry`) for a
:class:`~pnc.metrics.stats.ClassSummary`, the nearest-class-mean classifier and the memorization ratio.

Conventions follow ``docs/metrics.md``:

* var_k is the mean squared distance to the class mean, no Bessel correction;
* mu_G is the *sample* mean of all N features; Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T is a
  plain average over classes (so with imbalanced classes the centred means need not sum to zero);
* classes with no sample in the split are *excluded*: K below means the number of classes present.
  A metric that is undefined (fewer than two classes present, coinciding class means, no scatter)
  returns NaN or inf and emits a :class:`MetricWarning`, never silently.
All arithmetic is float64.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pnc.metrics import geometry as geometry_metrics
from pnc.metrics.geometry import Geometry
from pnc.metrics.stats import F64, ClassSummary


def geometry(s: ClassSummary, classifier: tuple[Tensor, Tensor] | None = None) -> Geometry:
    """The float64 numpy :class:`~pnc.metrics.geometry.Geometry` of a summary (and of the layer's classifier
    ``(weight (K, D), bias (K,))``), on which every registered metric is computed."""
    w, b = (None, None) if classifier is None else (t.detach().to("cpu", F64).numpy() for t in classifier)
    return Geometry(s.count.cpu().numpy(), s.mean.to("cpu", F64).numpy(), s.sq_dist.to("cpu", F64).numpy(),
                    None if s.scatter is None else s.scatter.to("cpu", F64).numpy(), w, b)


def class_variances(s: ClassSummary) -> Tensor:
    """Per-class variance var_k = (1/n_k) sum_i ||h_i - mu_k||^2, no Bessel correction (paper eq. 6;
    Galanti et al. 2021). (K,) float64; NaN marks classes with no sample."""
    return s.variances()


def cdnv_matrix(s: ClassSummary) -> Tensor:
    """(K, K) float64 matrix of pairwise CDNV values (``docs/metrics.md``); NaN on the diagonal and for
    absent classes, inf for coinciding means."""
    return torch.from_numpy(geometry_metrics.cdnv_matrix(geometry(s)))


def cdnv(s: ClassSummary) -> float:
    """Class-distance normalised variance (``docs/metrics.md``: paper eq. 7; Galanti et al. 2021)."""
    return geometry_metrics.cdnv(geometry(s))


def nc1(s: ClassSummary) -> float:
    """NC1 = (1/K) tr(Sigma_W pinv(Sigma_B)) (``docs/metrics.md``); NaN without ``s.scatter``."""
    return geometry_metrics.nc1(geometry(s))


def nc2(s: ClassSummary) -> float:
    """NC2, the distance of the normalised Gram of centred means to the simplex ETF's (``docs/metrics.md``)."""
    return geometry_metrics.nc2(geometry(s))


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
