"""Linear probes on layer features: a closed-form ridge probe from streamed statistics, and a
logistic-regression probe on a bounded cache of features.

Both are trained on the training split only: a deterministic *validation part* of the training split
(chosen by a seeded hash of the global sample index, see :func:`validation_part`) selects the
regularisation, the probe is refitted on the whole training split, and only then scored on held-out
splits. The test split never takes part in any selection.

Ridge probe (all layers, one pass)
    Minimises sum_i ||onehot(y_i) - W^T x_i - b||^2 + lambda ||W||_F^2 (unpenalised intercept), with
    lambda = alpha * n * tr(C) / D, C the centred feature covariance, so ``alpha`` is relative to the
    mean feature variance and one grid serves every layer. The sufficient statistics are exactly the
    per-class statistics of :class:`~pnc.metrics.stats.ClassStats` (counts, class means, within-class
    scatter) of the fit and validation parts: total scatter S_xx = S_W + sum_k n_k (mu_k - xbar)(...)^T,
    S_xy[:, k] = n_k (mu_k - xbar), S_yy = diag(n) - n ybar ybar^T. ``alpha`` is chosen by the
    *validation mean squared error*, computed exactly from the validation part's statistics:
    SSE = tr(S_yy) - 2 tr(W^T S_xy) + tr(W^T S_xx W) + n ||ybar_v - W^T xbar_v - b||^2.
    (Validation accuracy would need the validation features; the ridge probe stores none.)

Logistic probe
    Multinomial logistic regression (scikit-learn, L-BFGS) on standardised features cached for at
    most ``max_samples`` training samples per layer (the ones with the smallest seeded hash of their
    index: deterministic, independent of batching and process count), float32. C is chosen by
    validation *accuracy* on the cached validation part, then refitted on the cached fit+validation
    samples.

Layers wider than a cap (default 4096) are first reduced by a seeded count sketch (feature hashing:
Charikar et al. 2002; Weinberger et al. 2009), identical on every process.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from pnc.metrics.comm import Comm
from pnc.metrics.options import LOGISTIC_CS, RIDGE_ALPHAS
from pnc.metrics.stats import F64, ClassSummary

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_VAL_SALT = 0x5EED0001
_CACHE_SALT = 0x5EED0002
_SKETCH_SALT = 0x5EED0003


def _splitmix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def unit_hash(idx: Tensor | np.ndarray, seed: int, salt: int = 0) -> np.ndarray:
    """Deterministic pseudo-uniform numbers in [0, 1), one per global sample index, for (seed, salt)."""
    a = np.asarray(idx.detach().cpu().numpy() if isinstance(idx, Tensor) else idx).astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64((seed * 0x100000001B3 + salt) & 0xFFFFFFFFFFFFFFFF) + np.zeros(1, np.uint64))
        h = _splitmix64(a ^ key)
    return (h >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)


def validation_part(idx: Tensor, fraction: float, seed: int) -> Tensor:
    """(B,) int64 on idx's device: 1 for samples in the validation part of the training split, else 0.

    A sample is in the validation part when a seeded hash of its global index falls below
    ``fraction``, so the split is the same for any batching, order or number of processes."""
    u = unit_hash(idx, seed, _VAL_SALT)
    return torch.from_numpy((u < fraction).astype(np.int64)).to(idx.device)


class CountSketch:
    """Seeded count sketch R^D -> R^r: coordinate i goes to bucket b(i) with sign s(i).
    Inner products are preserved in expectation (Charikar et al. 2002; Weinberger et al. 2009)."""

    def __init__(self, in_dim: int, out_dim: int, seed: int, salt: int = 0):
        g = torch.Generator().manual_seed((seed * 1_000_003 + salt + _SKETCH_SALT) & 0x7FFFFFFFFFFFFFFF)
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.bucket = torch.randint(0, out_dim, (in_dim,), generator=g)
        self.sign = torch.randint(0, 2, (in_dim,), generator=g).to(F64) * 2 - 1

    def __call__(self, h: Tensor) -> Tensor:
        x = h.to(F64)
        if self.bucket.device != x.device:
            self.bucket, self.sign = self.bucket.to(x.device), self.sign.to(x.device)
        return x.new_zeros(x.shape[0], self.out_dim).index_add_(1, self.bucket, x * self.sign)


@dataclass
class LinearProbe:
    """A fitted linear probe: logits = ((sketch(h) - center) / scale) @ weight + bias (float64)."""

    weight: Tensor  # (D', K)
    bias: Tensor  # (K,)
    center: Tensor  # (D',)
    scale: Tensor | None  # (D',) or None
    kind: str  # "ridge" | "logistic"
    reg: float  # chosen alpha (ridge) or C (logistic)
    grid: tuple[float, ...]
    val_scores: list[float]  # validation MSE (ridge) or accuracy (logistic) per grid value
    sketch: CountSketch | None = None
    info: dict = field(default_factory=dict)

    def to(self, device: torch.device | str) -> LinearProbe:
        self.weight, self.bias, self.center = self.weight.to(device), self.bias.to(device), self.center.to(device)
        if self.scale is not None:
            self.scale = self.scale.to(device)
        return self

    def logits(self, h: Tensor) -> Tensor:
        x = self.sketch(h) if self.sketch is not None else h
        x = x.to(device=self.weight.device, dtype=F64) - self.center
        if self.scale is not None:
            x = x / self.scale
        return x @ self.weight + self.bias

    def predict(self, h: Tensor) -> Tensor:
        return self.logits(h).argmax(1)

    def in_feature_space(self) -> tuple[Tensor, Tensor]:
        """The same map as ``logits`` written on the unreduced features: ``(weight (K, D), bias (K,))``
        with logits = h @ weight.T + bias (the sketch, centre and scale folded in), float64."""
        w = self.weight.to(F64)
        if self.scale is not None:
            w = w / self.scale.to(F64).unsqueeze(1)
        bias = self.bias.to(F64) - self.center.to(F64) @ w
        if self.sketch is not None:  # sketch(h)_j = sum_{i: bucket_i = j} sign_i h_i
            sk = self.sketch
            w = w.index_select(0, sk.bucket.to(w.device)) * sk.sign.to(w.device).unsqueeze(1)
        return w.T.contiguous(), bias


# ----------------------------------------------------------------------------- ridge
@dataclass(frozen=True)
class RidgeMoments:
    """Centred moments of (x, onehot(y)) for one sample set, derived exactly from a ClassSummary."""

    n: float
    xbar: Tensor  # (D,)
    ybar: Tensor  # (K,)
    sxx: Tensor  # (D, D)
    sxy: Tensor  # (D, K)
    tr_syy: float


def ridge_moments(s: ClassSummary) -> RidgeMoments:
    """Centred second moments of features and one-hot labels from per-class statistics (exact)."""
    if s.scatter is None:
        raise ValueError("the ridge probe needs the within-class scatter of the probe labels")
    cnt = s.count.to(F64)
    n = float(cnt.sum())
    if n == 0:
        raise ValueError("ridge probe: no samples")
    xbar = (cnt[:, None] * s.mean).sum(0) / n
    dm = s.mean - xbar  # (K, D)
    sxy = (dm * cnt[:, None]).T  # (D, K)
    sxx = s.scatter + (dm * cnt[:, None]).T @ dm
    ybar = cnt / n
    tr_syy = n - n * float(ybar.square().sum())
    return RidgeMoments(n, xbar, ybar, sxx, sxy, tr_syy)


def _ridge_scale(m: RidgeMoments) -> float:
    s = float(torch.diagonal(m.sxx).sum()) / (m.n * m.sxx.shape[0])
    return s if s > 0 else 1.0


def _ridge_weights(m: RidgeMoments, alpha: float) -> Tensor:
    """W = (C + alpha * s * I)^-1 C_xy by a float64 Cholesky solve (C + alpha s I is positive definite)."""
    a = m.sxx / m.n
    a.diagonal().add_(alpha * _ridge_scale(m))
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:  # not numerically positive definite (alpha far too small): use a general solver
        return torch.linalg.lstsq(a, m.sxy / m.n).solution
    return torch.cholesky_solve(m.sxy / m.n, chol)


def ridge_solve(s: ClassSummary, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """Ridge solution on one sample set: (W (D, K), center xbar (D,), bias ybar (K,)), so that
    logits = (x - xbar) @ W + ybar. lambda = alpha * n * tr(C)/D (see module docstring)."""
    m = ridge_moments(s)
    return _ridge_weights(m, alpha), m.xbar, m.ybar


def ridge_val_mse(w: Tensor, fit: RidgeMoments, val: RidgeMoments) -> float:
    """Validation mean squared error (summed over the K outputs, averaged over samples) of the probe
    (W, b = ybar_fit - W^T xbar_fit), from the validation part's centred moments; exact."""
    off = val.ybar - fit.ybar - w.T @ (val.xbar - fit.xbar)
    sse = val.tr_syy - 2.0 * float((w * val.sxy).sum()) + float((w * (val.sxx @ w)).sum()) + val.n * float(off.square().sum())
    return sse / val.n


def fit_ridge(
    fit: ClassSummary, val: ClassSummary, alphas: tuple[float, ...] = RIDGE_ALPHAS, sketch: CountSketch | None = None
) -> LinearProbe:
    """Choose alpha on the validation part by exact validation MSE, refit on fit + validation.

    ``fit`` and ``val`` are the summaries of the probe labels on the two parts, with scatter. Ties in
    validation MSE (relative 1e-12) go to the larger alpha."""
    if val.total == 0:
        raise ValueError("ridge probe: the validation part is empty; raise val_fraction or use more samples")
    if fit.total == 0:
        raise ValueError("ridge probe: the fit part is empty; lower val_fraction or use more samples")
    mf, mv = ridge_moments(fit), ridge_moments(val)
    scores = [ridge_val_mse(_ridge_weights(mf, a), mf, mv) for a in alphas]
    best = min(scores)
    tol = 1e-12 * max(abs(best), 1e-300)
    chosen = max(i for i, v in enumerate(scores) if v <= best + tol)
    alpha = float(alphas[chosen])
    w, xbar, ybar = ridge_solve(fit.merge(val), alpha)
    return LinearProbe(
        weight=w, bias=ybar, center=xbar, scale=None, kind="ridge", reg=alpha, grid=tuple(alphas),
        val_scores=scores, sketch=sketch, info={"n_fit": fit.total, "n_val": val.total},
    )


# ----------------------------------------------------------------------------- logistic
class FeatureCache:
    """Keeps, per layer, the features (float32, CPU) of at most ``max_samples`` training samples: those
    with the smallest seeded hash of their global index (deterministic for any batching/processes)."""

    def __init__(self, max_samples: int, seed: int):
        if max_samples < 1:
            raise ValueError("max_samples must be >= 1")
        self.max_samples, self.seed = int(max_samples), int(seed)
        self._x: list[Tensor] = []
        self._y: list[Tensor] = []
        self._idx: list[Tensor] = []
        self._prio: list[Tensor] = []
        self._n = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in (self._x, self._y, self._idx, self._prio) for t in ts)

    def add(self, x: Tensor, y: Tensor, idx: Tensor) -> None:
        prio = torch.from_numpy(unit_hash(idx, self.seed, _CACHE_SALT))
        self._x.append(x.detach().to("cpu", torch.float32))
        self._y.append(y.detach().to("cpu", torch.int64))
        self._idx.append(idx.detach().to("cpu", torch.int64))
        self._prio.append(prio)
        self._n += x.shape[0]
        if self._n > 2 * self.max_samples:
            self._compact()

    def _cat(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return torch.cat(self._x), torch.cat(self._y), torch.cat(self._idx), torch.cat(self._prio)

    def _compact(self) -> None:
        x, y, idx, prio = self._cat()
        if x.shape[0] > self.max_samples:
            # order by (priority, index): a total order, so the kept set is unique
            order = np.lexsort((idx.numpy(), prio.numpy()))[: self.max_samples]
            sel = torch.from_numpy(order)
            x, y, idx, prio = x[sel], y[sel], idx[sel], prio[sel]
        self._x, self._y, self._idx, self._prio = [x], [y], [idx], [prio]
        self._n = x.shape[0]

    def finalize(self, dim: int, comm: Comm | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Gather over processes, keep the ``max_samples`` smallest-hash samples, sort by index.
        Returns (x float32 (n, dim), y int64 (n,), idx int64 (n,))."""
        if self._x:
            x, y, idx, prio = self._cat()
        else:
            x, y, idx, prio = (torch.zeros(0, dim), torch.zeros(0, dtype=torch.int64),
                               torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=F64))
        if comm is not None and comm.world_size > 1:
            x, y, idx, prio = (torch.cat(comm.all_gather_rows(t)) for t in (x, y, idx, prio))
        self._x, self._y, self._idx, self._prio = [x], [y], [idx], [prio]
        self._compact()
        x, y, idx, _ = self._cat()
        order = torch.argsort(idx)
        return x[order], y[order], idx[order]


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(0, dtype=np.float64)
    sd = x.std(0, dtype=np.float64)
    sd = np.where(sd > 0, sd, 1.0)
    return mu, sd


def _fit_lr(x: np.ndarray, y: np.ndarray, c: float, seed: int, max_iter: int, warm=None):
    """Fit (or, given ``warm``, refit from its solution: warm start along the C grid)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = warm if warm is not None else LogisticRegression(max_iter=max_iter, tol=1e-4, random_state=seed,
                                                           warm_start=True)
    clf.C = c
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    converged = not any(issubclass(i.category, ConvergenceWarning) for i in w)
    return clf, converged


def _lr_to_linear(clf, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    classes = clf.classes_.astype(np.int64)
    coef = clf.coef_.astype(np.float64)
    icpt = clf.intercept_.astype(np.float64)
    if len(classes) == 2 and coef.shape[0] == 1:
        coef = np.vstack([np.zeros_like(coef), coef])
        icpt = np.array([0.0, icpt[0]])
    w = np.zeros((coef.shape[1], num_classes))
    b = np.full(num_classes, -np.inf)
    w[:, classes] = coef.T
    b[classes] = icpt
    return w, b


def _constant_probe(cls: int, dim: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    b = np.full(num_classes, -np.inf)
    b[cls] = 0.0
    return np.zeros((dim, num_classes)), b


def fit_logistic(
    x: Tensor, y: Tensor, is_val: Tensor, num_classes: int, *, cs: tuple[float, ...] = LOGISTIC_CS,
    seed: int = 0, max_iter: int = 300, sketch: CountSketch | None = None,
) -> LinearProbe:
    """Multinomial logistic regression probe: standardise (fit-part statistics), choose C by
    validation accuracy (ties go to the smaller C, i.e. stronger regularisation, whatever the grid's order;
    L-BFGS warm-started along the grid, in the order given), refit on all given
    samples with the chosen C (re-standardised). ``x`` (n, D) float32 features (already sketched),
    ``y`` (n,) labels, ``is_val`` (n,) bool marks the validation part."""
    xn = x.numpy().astype(np.float32, copy=False)
    yn = y.numpy()
    vm = is_val.numpy().astype(bool)
    if vm.sum() == 0 or (~vm).sum() == 0:
        raise ValueError(
            f"logistic probe: the cached {'validation' if vm.sum() == 0 else 'fit'} part is empty "
            f"({len(yn)} samples cached); adjust val_fraction or use more samples"
        )
    xf, yf, xv, yv = xn[~vm], yn[~vm], xn[vm], yn[vm]
    mu, sd = _standardise(xf)
    xfs = ((xf - mu) / sd).astype(np.float32)
    xvs = ((xv - mu) / sd).astype(np.float32)
    scores: list[float] = []
    all_converged = True
    clf = None
    for c in cs:
        if len(np.unique(yf)) < 2:
            pred = np.full(len(yv), yf[0])
        else:
            clf, ok = _fit_lr(xfs, yf, c, seed, max_iter, clf)
            all_converged &= ok
            pred = clf.predict(xvs)
        scores.append(float((pred == yv).mean()))
    best = max(scores)
    c = float(min(cs[i] for i, v in enumerate(scores) if v >= best))  # ties: the smaller C, whatever the grid order
    mu, sd = _standardise(xn)
    xs = ((xn - mu) / sd).astype(np.float32)
    if len(np.unique(yn)) < 2:
        w, b = _constant_probe(int(yn[0]), xn.shape[1], num_classes)
    else:
        clf, ok = _fit_lr(xs, yn, c, seed, max_iter)
        all_converged &= ok
        w, b = _lr_to_linear(clf, num_classes)
    return LinearProbe(
        weight=torch.from_numpy(w), bias=torch.from_numpy(b), center=torch.from_numpy(mu),
        scale=torch.from_numpy(sd), kind="logistic", reg=c, grid=tuple(cs), val_scores=scores, sketch=sketch,
        info={"n_fit": int((~vm).sum()), "n_val": int(vm.sum()), "converged": bool(all_converged)},
    )


__all__ = [
    "RIDGE_ALPHAS", "LOGISTIC_CS", "CountSketch", "LinearProbe", "RidgeMoments", "ridge_moments", "ridge_solve",
    "ridge_val_mse", "fit_ridge", "FeatureCache", "fit_logistic", "validation_part", "unit_hash",
]
