"""The paper's proposed uses of progressive collapse, as deterministic analyses of per-layer curves.

* :func:`detect_transition` - the "initial decline, plateau, renewed decline" shape of a CDNV curve
  (paper sec. 4.1), by a segmented least-squares fit of log CDNV against relative depth.
* :func:`efficient_depth` - the smallest depth whose curve shows the transition, next to the depth a
  validation split picks, and the test-accuracy cost of choosing the former.
* :func:`fit_noise_map` / :func:`estimate_noise` - a calibrated map from the intermediate-layer CDNV
  profile to the noise level (sec. 4.2), evaluated by leave-one-level-out.
* :func:`rank_correlation` - Spearman correlation with a bootstrap interval (sec. 4.3: does better
  target collapse go with better target probe accuracy?).

Pure numpy; no MLflow, no torch. The report and the runner feed these from MLflow.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

# ----------------------------------------------------------------------------- transition detection

MIN_SEGMENT = 2  # points per segment
PLATEAU_RATIO = 0.35  # plateau slope must be below this fraction of the flanking slopes
MIN_POINTS = 3 * MIN_SEGMENT


@dataclass
class Transition:
    """Result of :func:`detect_transition` on one curve.

    ``found``: whether the decline-plateau-decline shape is present. ``start``/``end``: first and
    last layer index of the plateau (relative depths in ``start_rel``/``end_rel``). ``slopes``: the
    three segment slopes of log CDNV per unit relative depth. ``confidence`` in [0, 1]: the weight
    of the three-segment model against the best one- or two-segment model (BIC weights), times
    how flat the plateau is relative to its flanks. ``reason`` says why when nothing is found.
    """

    found: bool
    confidence: float
    start: int | None = None
    end: int | None = None
    start_rel: float | None = None
    end_rel: float | None = None
    slopes: list[float] = field(default_factory=list)
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _line_sse(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares line through (x, y): (sse, slope)."""
    if len(x) < 2:
        return 0.0, 0.0
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - ym)).sum() / sxx) if sxx > 0 else 0.0
    resid = y - (ym + slope * (x - xm))
    return float((resid ** 2).sum()), slope


def _bic(sse: float, n: int, k: int) -> float:
    return n * math.log(max(sse, 1e-12) / n) + k * math.log(n)


def detect_transition(cdnv: Sequence[float], *, plateau_ratio: float = PLATEAU_RATIO) -> Transition:
    """Find the initial decline, the plateau and the final decline of a per-layer CDNV curve.

    Method (deterministic): y = log CDNV against x = relative depth in [0, 1]. Fit every split of
    the layers into three contiguous segments of at least two points with an independent least-
    squares line each, and keep the split with the smallest squared error. A transition is
    reported when (1) both outer segments decline (slope < 0), (2) the middle segment is flat:
    its slope's magnitude is below ``plateau_ratio`` times the smaller of the outer slopes'
    magnitudes, and (3) the three-segment model beats the one- and two-segment models by BIC.
    Confidence = BIC weight of the three-segment model x (1 - |middle slope| / min outer |slope|).
    A final value equal to its predecessor (the pooled penultimate tap repeating the last block) is
    dropped first; indices refer to the curve as given.
    """
    y_raw = np.asarray(cdnv, dtype=np.float64)
    # The "penultimate" tap (pooled classifier input) often repeats the last block's pooled features
    # exactly; a repeated final value is one layer, not a plateau.
    while len(y_raw) > 1 and np.isfinite(y_raw[-1]) and abs(y_raw[-1] - y_raw[-2]) <= 1e-9 * abs(y_raw[-2]):
        y_raw = y_raw[:-1]
    if len(y_raw) < MIN_POINTS:
        return Transition(False, 0.0, reason=f"too few layers ({len(y_raw)} < {MIN_POINTS})")
    if not np.all(np.isfinite(y_raw)) or np.any(y_raw <= 0):
        return Transition(False, 0.0, reason="curve has non-positive or non-finite values")
    y = np.log(y_raw)
    n = len(y)
    x = np.linspace(0.0, 1.0, n)
    sse1, _ = _line_sse(x, y)
    best2 = min(_line_sse(x[:i], y[:i])[0] + _line_sse(x[i:], y[i:])[0] for i in range(MIN_SEGMENT, n - MIN_SEGMENT + 1))
    best3, split = math.inf, None
    for i in range(MIN_SEGMENT, n - 2 * MIN_SEGMENT + 1):
        for j in range(i + MIN_SEGMENT, n - MIN_SEGMENT + 1):
            sse = _line_sse(x[:i], y[:i])[0] + _line_sse(x[i:j], y[i:j])[0] + _line_sse(x[j:], y[j:])[0]
            if sse < best3 - 1e-15:
                best3, split = sse, (i, j)
    i, j = split
    slopes = [_line_sse(x[:i], y[:i])[1], _line_sse(x[i:j], y[i:j])[1], _line_sse(x[j:], y[j:])[1]]
    # BIC: 2 params per segment + breakpoints
    bics = np.array([_bic(sse1, n, 2), _bic(best2, n, 5), _bic(best3, n, 8)])
    w = np.exp(-(bics - bics.min()) / 2)
    w3 = float(w[2] / w.sum())
    out = dict(start=i, end=j - 1, start_rel=float(x[i]), end_rel=float(x[j - 1]), slopes=[float(s) for s in slopes])
    if not (slopes[0] < 0 and slopes[2] < 0):
        return Transition(False, 0.0, reason="the curve does not decline both before and after the middle segment", **out)
    flank = min(abs(slopes[0]), abs(slopes[2]))
    flatness = 1.0 - abs(slopes[1]) / flank
    if abs(slopes[1]) >= plateau_ratio * flank:
        return Transition(False, 0.0, reason="no plateau: the middle segment declines nearly as fast as its flanks", **out)
    if bics[2] > bics[:2].min():
        return Transition(False, round(w3 * flatness, 4), reason="a plateau-shaped fit does not beat a single or two-piece line (BIC)", **out)
    return Transition(True, round(w3 * flatness, 4), **out)


# ----------------------------------------------------------------------------- efficient depth
@dataclass
class EfficientDepth:
    transition_depth: int | None  # smallest depth whose curve shows the transition
    validation_depth: int  # depth a validation split picks (best val accuracy; smallest on ties)
    transition_test_acc: float | None
    validation_test_acc: float
    cost: float | None  # validation_test_acc - transition_test_acc (accuracy given up by the intrinsic choice)
    per_depth: list[dict]

    def as_dict(self) -> dict:
        return asdict(self)


def efficient_depth(depths: Sequence[int], curves: Sequence[Sequence[float]], val_acc: Sequence[float],
                    test_acc: Sequence[float], *, tie: float = 1e-9) -> EfficientDepth:
    """Compare the transition-based depth choice with a validation-based one (paper sec. 4.1)."""
    order = np.argsort(depths)
    rows = []
    for k in order:
        t = detect_transition(curves[k])
        rows.append({"depth": int(depths[k]), "transition": t.found, "confidence": t.confidence,
                     "val_acc": float(val_acc[k]), "test_acc": float(test_acc[k])})
    found = [r for r in rows if r["transition"]]
    best_val = max(r["val_acc"] for r in rows)
    vpick = next(r for r in rows if r["val_acc"] >= best_val - tie)
    tpick = found[0] if found else None
    return EfficientDepth(
        transition_depth=tpick["depth"] if tpick else None,
        validation_depth=vpick["depth"],
        transition_test_acc=tpick["test_acc"] if tpick else None,
        validation_test_acc=vpick["test_acc"],
        cost=(vpick["test_acc"] - tpick["test_acc"]) if tpick else None,
        per_depth=rows,
    )


# ----------------------------------------------------------------------------- noise-level estimation
INTERMEDIATE = (0.2, 0.8)  # relative-depth window of the "intermediate" layers


def intermediate_profile(cdnv: Sequence[float], window: tuple[float, float] = INTERMEDIATE) -> float:
    """Mean log CDNV over the layers whose relative depth lies in ``window`` (at least one layer)."""
    y = np.log(np.asarray(cdnv, dtype=np.float64))
    x = np.linspace(0.0, 1.0, len(y))
    sel = (x >= window[0]) & (x <= window[1])
    if not sel.any():
        sel[len(y) // 2] = True
    return float(y[sel].mean())


@dataclass
class NoiseMap:
    """Linear map noise level = a + b * mean intermediate log CDNV, fitted per (model, noise kind)."""

    model: str
    kind: str
    intercept: float
    slope: float
    levels: list[float]
    profiles: list[float]
    loo_abs_errors: list[float]

    @property
    def loo_mae(self) -> float:
        return float(np.mean(self.loo_abs_errors)) if self.loo_abs_errors else math.nan

    def predict(self, profile: float) -> float:
        return float(self.intercept + self.slope * profile)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["loo_mae"] = self.loo_mae
        return d


def _fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if len(x) < 2 or np.ptp(x) == 0:
        return float(y.mean()), 0.0
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def fit_noise_map(model: str, kind: str, levels: Sequence[float], curves: Sequence[Sequence[float]]) -> NoiseMap:
    """Calibrate the profile -> level map on one model's noise sweep; leave-one-level-out errors."""
    lv = np.asarray(levels, dtype=np.float64)
    prof = np.array([intermediate_profile(c) for c in curves])
    a, b = _fit_line(prof, lv)
    errs = []
    if len(lv) >= 3:
        for k in range(len(lv)):
            keep = np.arange(len(lv)) != k
            a_k, b_k = _fit_line(prof[keep], lv[keep])
            errs.append(float(abs(a_k + b_k * prof[k] - lv[k])))
    return NoiseMap(model, kind, a, b, lv.tolist(), prof.tolist(), errs)


def estimate_noise(noise_map: NoiseMap, cdnv: Sequence[float]) -> float:
    return noise_map.predict(intermediate_profile(cdnv))


# ----------------------------------------------------------------------------- rank correlation
def _ranks(v: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(v)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def rank_correlation(a: Sequence[float], b: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.9) -> tuple[float, float, float]:
    """Spearman rho of (a, b) and a percentile bootstrap interval over resampled pairs (seeded)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rho = spearman(a, b)
    if len(a) < 3 or math.isnan(rho):
        return rho, math.nan, math.nan
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(a), len(a))
        r = spearman(a[idx], b[idx])
        if not math.isnan(r):
            boots.append(r)
    if not boots:
        return rho, math.nan, math.nan
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return rho, float(lo), float(hi)


def transfer_correlations(spec) -> dict:
    """Per layer, Spearman rho across (source, target) pairs of -CDNV(target) vs target probe accuracy."""
    from .report import layer_frame

    df = layer_frame(spec.experiment, ["cdnv/target", "probe_acc/target_test"], role="transfer")
    if df.empty:
        return {}
    piv = df.pivot_table(index=["source", "target", "model", "layer"], columns="metric", values="value").reset_index()
    out: dict[str, list] = {"transfer/spearman": [], "transfer/spearman_lo": [], "transfer/spearman_hi": []}
    for layer in sorted(piv.layer.unique()):
        d = piv[piv.layer == layer].dropna()
        rho, lo, hi = rank_correlation(-d["cdnv/target"].to_numpy(), d["probe_acc/target_test"].to_numpy())
        out["transfer/spearman"].append(rho)
        out["transfer/spearman_lo"].append(lo)
        out["transfer/spearman_hi"].append(hi)
    return out
