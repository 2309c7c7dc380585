"""The paper's proposed uses of progressive collapse, as deterministic analyses of per-layer curves.

* :func:`detect_transition` - the "initial decline, plateau, renewed decline" shape of a CDNV curve
  (paper sec. 4.1), by a segmented least-squares fit of log CDNV against relative depth, with a
  Monte Carlo p-value against transition-free fits (confidence = 1 - p).
* :func:`collapse_by_stage` - how much of the decline of log CDNV happens inside each stage of a network and
  across each stage boundary (downsampling block), and each stage's slope per block.
* :func:`efficient_depth` - the smallest depth whose curve shows the transition, next to the depth a
  validation split picks, and the test-accuracy cost of choosing the former.
* :func:`fit_noise_map` / :func:`estimate_noise` - a calibrated map from the intermediate-layer CDNV
  profile to the noise level (sec. 4.2), evaluated by leave-one-level-out.
* :func:`transfer_correlation` - per relative depth, Spearman's rho across off-domain sources between
  target collapse and target probe accuracy, per target and pooled within targets, with bootstrap
  intervals over sources (sec. 4.3); :func:`rank_correlation` for one pair of samples.

Numpy/scipy (pandas for the transfer table); no MLflow, no torch, every result deterministic (fixed
seeds). The report and the runner feed these from MLflow.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


class _Result:
    """A dataclass result of an analysis; ``as_dict`` is its JSON-able form (analysis.json, reports)."""

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- transition detection

MIN_SEGMENT = 3  # points per segment: a line through two points fits any noise exactly
PLATEAU_RATIO = 0.35  # plateau slope must be below this fraction of the flanking slopes
MIN_POINTS = 3 * MIN_SEGMENT
ALPHA = 0.01  # a transition is reported when the Monte Carlo p-value is at most this
N_SIM = 499  # simulated no-transition curves per test (p-values are multiples of 1 / (N_SIM + 1))
SEED = 0  # seed of those simulations: every result is deterministic


@dataclass
class Transition(_Result):
    """Result of :func:`detect_transition` on one curve.

    ``found``: whether the decline-plateau-decline shape is present. ``start``/``end``: first and
    last layer index of the plateau (relative depths in ``start_rel``/``end_rel``). ``slopes``: the
    three segment slopes of log CDNV per unit relative depth. ``phases``: the fall of the fitted log CDNV before the
    plateau (first point to plateau start, the step into it included), along it, and after it (plateau end to last
    point, the step out of it included); positive = decline. ``p_value``: Monte Carlo p-value of
    the plateau-shaped fit against the best transition-free (one- or two-piece) fit; ``confidence``
    = 1 - ``p_value`` (0 when the best three-piece fit does not have the shape). ``reason`` says
    why when nothing is found.
    """

    found: bool
    confidence: float
    start: int | None = None
    end: int | None = None
    start_rel: float | None = None
    end_rel: float | None = None
    slopes: list[float] = field(default_factory=list)
    phases: list[float] = field(default_factory=list)
    reason: str = ""
    p_value: float | None = None

def _segment_fits(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares lines through every run of consecutive points, for each row of ``y`` (B, n).

    Returns (sse, slope, first, last), each (B, n + 1, n + 1): entry [b, a, e] fits points a..e-1 of row b;
    ``first``/``last``: the fitted line's value at x[a] / x[e-1]. Runs shorter than MIN_SEGMENT hold inf / nan.
    Prefix sums, so O(B n^2).
    """
    b, n = y.shape
    cum = lambda v: np.concatenate([np.zeros(v.shape[:-1] + (1,)), np.cumsum(v, axis=-1)], axis=-1)  # noqa: E731
    X1, X2 = cum(x), cum(x * x)
    Y1, Y2, XY = cum(y), cum(y * y), cum(x * y)
    a, e = np.triu_indices(n + 1, MIN_SEGMENT)
    m = (e - a).astype(np.float64)
    sx = X1[e] - X1[a]
    cxx = (X2[e] - X2[a]) - sx * sx / m
    sy = Y1[:, e] - Y1[:, a]
    cxy = (XY[:, e] - XY[:, a]) - sx * sy / m
    cyy = (Y2[:, e] - Y2[:, a]) - sy * sy / m
    sse = np.full((b, n + 1, n + 1), np.inf)
    slope = np.full((b, n + 1, n + 1), np.nan)
    first, last = np.full((b, n + 1, n + 1), np.nan), np.full((b, n + 1, n + 1), np.nan)
    sse[:, a, e] = np.maximum(cyy - cxy * cxy / cxx, 0.0)
    slope[:, a, e] = cxy / cxx
    first[:, a, e] = sy / m + slope[:, a, e] * (x[a] - sx / m)
    last[:, a, e] = sy / m + slope[:, a, e] * (x[e - 1] - sx / m)
    return sse, slope, first, last


def _three_piece(x: np.ndarray, y: np.ndarray, floor: float, plateau_ratio: float) -> dict:
    """Best one-, two- and three-piece fits of each row of ``y``; the shape test and its statistic."""
    n = y.shape[1]
    sse, slope, first, last = _segment_fits(x, y)
    sse1 = sse[:, 0, n]
    cut2 = np.arange(MIN_SEGMENT, n - MIN_SEGMENT + 1)
    s2 = sse[:, 0, cut2] + sse[:, cut2, n]
    k2 = np.argmax(s2 <= s2.min(axis=1, keepdims=True) + floor, axis=1)  # ties (within rounding): the earliest
    i3, j3 = np.array([(i, j) for i in range(MIN_SEGMENT, n - 2 * MIN_SEGMENT + 1)
                       for j in range(i + MIN_SEGMENT, n - MIN_SEGMENT + 1)]).T
    s3 = sse[:, 0, i3] + sse[:, i3, j3] + sse[:, j3, n]
    k3 = np.argmax(s3 <= s3.min(axis=1, keepdims=True) + floor, axis=1)  # ties (within rounding): the earliest split
    rows = np.arange(y.shape[0])
    i, j = i3[k3], j3[k3]
    slopes = np.stack([slope[rows, 0, i], slope[rows, i, j], slope[rows, j, n]], axis=1)
    # The three phases as a reader sees them: the fitted curve's fall from the first point to the plateau's start
    # (the first segment and the step into the plateau), along the plateau, and from the plateau's end to the last
    # point (the step out of it and the last segment); per unit of relative depth. Segments are fitted independently,
    # so a decline that happens in one step between segments (a downsampling block) counts as a decline.
    p_first, p_last = first[rows, i, j], last[rows, i, j]
    phases = np.stack([first[rows, 0, i] - p_first, p_first - p_last, p_last - last[rows, j, n]], axis=1)
    spans = np.stack([x[i] - x[0], x[j - 1] - x[i], x[-1] - x[j - 1]], axis=1)
    rates = phases / spans
    flank = np.minimum(rates[:, 0], rates[:, 2])
    declines = (rates[:, 0] > 0) & (rates[:, 2] > 0)
    flat = np.abs(rates[:, 1]) < plateau_ratio * flank
    best2 = s2[rows, k2]
    simpler = np.minimum(sse1, best2)
    stat = np.log(np.maximum(simpler, floor)) - np.log(np.maximum(s3[rows, k3], floor))
    return dict(sse1=sse1, sse2=best2, cut2=cut2[k2], split=(i, j), slopes=slopes, phases=phases, declines=declines, flat=flat,
                stat=np.where(declines & flat, stat, -np.inf))


def _null_fit(x: np.ndarray, y: np.ndarray, fit: dict, floor: float) -> tuple[np.ndarray, float]:
    """The best transition-free fit (one line, or two by BIC) and its residual standard deviation."""
    n = len(y)

    def line(xs, ys):
        return np.polyval(np.polyfit(xs, ys, 1), xs)

    bic1 = n * math.log(max(float(fit["sse1"][0]), floor) / n) + 2 * math.log(n)
    bic2 = n * math.log(max(float(fit["sse2"][0]), floor) / n) + 5 * math.log(n)
    if bic1 <= bic2:
        return line(x, y), math.sqrt(float(fit["sse1"][0]) / (n - 2))
    c = int(fit["cut2"][0])
    return np.concatenate([line(x[:c], y[:c]), line(x[c:], y[c:])]), math.sqrt(float(fit["sse2"][0]) / (n - 5))


def detect_transition(cdnv: Sequence[float], *, plateau_ratio: float = PLATEAU_RATIO, alpha: float = ALPHA,
                      n_sim: int = N_SIM, seed: int = SEED) -> Transition:
    """Find the initial decline, the plateau and the final decline of a per-layer CDNV curve.

    Method (deterministic): y = log CDNV against x = relative depth in [0, 1]. Fit every split of the
    layers into three contiguous segments of at least MIN_SEGMENT (3) points with an independent
    least-squares line each, and keep the split with the smallest squared error (ties within 1e-12 of
    the total sum of squares: the earliest). Fewer than 9 layers: "too few layers", no transition.
    The fit has the transition *shape* when the fitted curve declines before the middle segment (from its
    first point to the middle segment's start) and after it (from the middle segment's end to the last point),
    and the middle segment is flat: its change per unit relative depth is below ``plateau_ratio`` x the smaller of
    those two declines per unit relative depth. The lines are fitted independently, so a decline may happen
    inside a segment or in the step between two (a downsampling block that drops CDNV at once, after a first
    stage where it is flat or rises: a reader calls that a decline too). Its *evidence* is
    T = log(SSE of the best one- or two-piece fit) - log(SSE of the three-piece fit), -inf without
    the shape. A parametric bootstrap gives its p-value: ``n_sim`` curves are simulated from the best
    transition-free fit (one line, or two lines when BIC prefers them) plus Gaussian noise of that
    fit's residual standard deviation (seeded by ``seed``), each is put through the same fit, and
    p = (1 + #{simulated T >= observed T}) / (n_sim + 1). A transition is reported when the shape
    holds and p <= ``alpha``; confidence = 1 - p (0 without the shape). So on curves without a
    transition P(confidence >= c) is about 1 - c or less, and about ``alpha`` or fewer of them are
    reported (tests/test_analysis.py checks both on seeded noisy curves).
    A final value equal to its predecessor (the pooled penultimate tap repeating the last block) is
    dropped first; indices refer to the curve as given.
    """
    y_raw = np.asarray(cdnv, dtype=np.float64)
    # The "penultimate" tap (pooled classifier input) often repeats the last block's pooled features
    # exactly; a repeated final value is one layer, not a plateau.
    while len(y_raw) > 1 and np.isfinite(y_raw[-1]) and abs(y_raw[-1] - y_raw[-2]) <= 1e-9 * abs(y_raw[-2]):
        y_raw = y_raw[:-1]
    if not np.all(np.isfinite(y_raw)) or np.any(y_raw <= 0):
        return Transition(False, 0.0, reason="curve has non-positive or non-finite values")
    if len(y_raw) < MIN_POINTS:
        return Transition(False, 0.0, reason=f"too few layers ({len(y_raw)} < {MIN_POINTS}: three segments of {MIN_SEGMENT})")
    y = np.log(y_raw)
    y = y - y.mean()  # rescaling CDNV shifts y: centring makes the fit see the same numbers (and the prefix sums small)
    n = len(y)
    x = np.linspace(0.0, 1.0, n)
    floor = 1e-12 * max(float((y * y).sum()), 1e-300)  # squared errors below this are rounding
    obs = _three_piece(x, y[None, :], floor, plateau_ratio)
    i, j = (int(v[0]) for v in obs["split"])
    slopes = [float(s) for s in obs["slopes"][0]]
    out = dict(start=i, end=j - 1, start_rel=float(x[i]), end_rel=float(x[j - 1]), slopes=slopes,
               phases=[float(v) for v in obs["phases"][0]])
    if not obs["declines"][0]:
        return Transition(False, 0.0, reason="the curve does not decline both before and after the middle segment "
                                             f"(fall of log CDNV before / after: {out['phases'][0]:.2f} / {out['phases'][2]:.2f})", p_value=1.0, **out)
    if not obs["flat"][0]:
        falls = ", ".join(f"{v:.2f}" for v in out["phases"])
        return Transition(False, 0.0, reason="no plateau: the middle segment declines nearly as fast as its flanks "
                                             f"(fall of log CDNV before / along / after it: {falls})", p_value=1.0, **out)
    fitted, sigma = _null_fit(x, y, obs, floor)
    sims = fitted[None, :] + sigma * np.random.default_rng(seed).standard_normal((n_sim, n))
    t_sim = _three_piece(x, sims, floor, plateau_ratio)["stat"]
    p = float((1 + np.count_nonzero(t_sim >= obs["stat"][0])) / (n_sim + 1))
    conf = round(1.0 - p, 4)
    if p > alpha:
        return Transition(False, conf, reason=f"a plateau-shaped fit is not significantly better than a transition-free one "
                                              f"(Monte Carlo p = {p:.3g} > {alpha:g})", p_value=p, **out)
    return Transition(True, conf, p_value=p, **out)


# ----------------------------------------------------------------------------- where collapse happens
HEAD = "head"  # the part of a curve after the last stage: the pooled classifier input ("penultimate")


@dataclass
class StageCollapse(_Result):
    """Result of :func:`collapse_by_stage` on one curve.

    ``total_decline``: log CDNV at the first tap minus at the last (natural log; > 0 when CDNV falls).
    ``parts``: in depth order, one dict per stage (``kind`` "stage": the steps between consecutive taps of that
    stage) and per boundary between two stages (``kind`` "boundary": the one step from a stage's last tap to the
    next stage's first tap, i.e. across the next stage's first, downsampling, block), with ``name``, ``decline``
    (log units) and ``share`` (decline / total_decline; the shares sum to 1, a rise is a negative share; None when
    the curve does not decline overall). A stage also has ``taps`` (how many), ``blocks`` (steps inside it) and
    ``slope_per_block``: the least-squares slope of log CDNV against block index over its taps. A stage of one tap
    has no steps inside it and no part of its own (only its boundaries).
    """

    total_decline: float
    parts: list[dict]
    reason: str = ""
    def share(self, name: str) -> float | None:
        return next((p["share"] for p in self.parts if p["name"] == name), None)


def collapse_by_stage(cdnv: Sequence[float], stages: Sequence[Any]) -> StageCollapse:
    """Split the decline of log CDNV from the first tap to the last into what happens inside each stage and what
    happens across each stage boundary (paper sec. 3: "earlier layers learn universal features, the last few
    task-specific ones", made measurable).

    ``stages``: the stage label of each tap (any hashable: the model's own stage names or indices, as
    :func:`pnc.features.stage_name` gives them; ``HEAD`` for the pooled classifier input). Taps of one stage must
    be consecutive. Every step between consecutive taps belongs to exactly one part (its stage when both taps are
    in it, else the boundary between their stages), so the parts' declines add up to the total exactly.
    """
    y_raw = np.asarray(cdnv, dtype=np.float64)
    labels = list(stages)
    if len(labels) != len(y_raw):
        raise ValueError(f"{len(y_raw)} CDNV values but {len(labels)} stage labels")
    if len(y_raw) < 2:
        raise ValueError("a curve of fewer than 2 taps has no decline to split")
    runs = [labels[0]] + [b for a, b in zip(labels, labels[1:]) if b != a]
    if len(set(runs)) != len(runs):
        raise ValueError(f"the taps of a stage must be consecutive, got stages {labels}")
    if not np.all(np.isfinite(y_raw)) or np.any(y_raw <= 0):
        return StageCollapse(math.nan, [], reason="curve has non-positive or non-finite values")
    y = np.log(y_raw)
    total = float(y[0] - y[-1])
    share = (lambda d: d / total) if total > 0 else (lambda d: None)
    parts: list[dict] = []
    start = 0
    for k in range(1, len(y) + 1):
        if k < len(y) and labels[k] == labels[start]:
            continue
        seg = y[start:k]  # one stage's taps
        d = float(seg[0] - seg[-1])
        if len(seg) > 1:  # a one-tap stage (the head; each tap under ``measure.layers: stages``) has no steps inside
            slope = float(np.polyfit(np.arange(len(seg), dtype=np.float64), seg, 1)[0])
            parts.append({"kind": "stage", "name": str(labels[start]), "taps": len(seg), "blocks": len(seg) - 1,
                          "decline": d, "share": share(d), "slope_per_block": slope})
        if k < len(y):
            d = float(y[k - 1] - y[k])
            parts.append({"kind": "boundary", "name": f"{labels[start]}-{labels[k]}", "decline": d, "share": share(d)})
        start = k
    return StageCollapse(total, parts, reason="" if total > 0 else "CDNV does not decline from the first tap to the last")


# ----------------------------------------------------------------------------- efficient depth
@dataclass
class EfficientDepth(_Result):
    transition_depth: int | None  # smallest depth whose curve shows the transition
    validation_depth: int  # depth a validation split picks (best val accuracy; smallest on ties)
    transition_test_acc: float | None
    validation_test_acc: float
    cost: float | None  # validation_test_acc - transition_test_acc (accuracy given up by the intrinsic choice)
    per_depth: list[dict]

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
    """Linear map noise level = a + b * mean intermediate log CDNV, fitted per (model, noise kind).

    ``levels``: one per calibration cell (for label noise, the realised fraction of changed labels);
    ``settings``: those cells' noise tags; ``level_source``: "realized" or "nominal" per cell.
    """

    model: str
    kind: str
    intercept: float
    slope: float
    levels: list[float]
    profiles: list[float]
    loo_abs_errors: list[float]
    settings: list[str] = field(default_factory=list)
    level_source: list[str] = field(default_factory=list)

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
MIN_CORR_POINTS = 3  # fewer points give rho = +-1 by construction: reported as "too few sources"
# A bootstrap interval resamples sources: with k sources there are C(2k-1, k) distinct resamples (3, 10, 35, 126 for
# k = 2..5), and a resample draws one source k times with probability k^(1-k) (50%, 11%, 1.6%, 0.16%). Below 4
# sources the 5% / 95% quantiles of a 90% interval fall among a handful of resamples, or on resamples holding a
# single source's points: not an interval. docs/metrics.md.
MIN_BOOT_UNITS = 4
N_BOOT = 2000
CI_LEVEL = 0.9
# The pooled rho's permutation p-value: the models' probe accuracies shuffled within each (source, target) group,
# exactly (every permutation) when there are at most N_PERM of them, else N_PERM seeded random ones. docs/metrics.md.
N_PERM = 9999
TIE_TOL = 1e-12  # |rho_perm| >= |rho_obs| - TIE_TOL: a permutation equal to the data up to rounding counts


def _ranks(v: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(v, axis=-1)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho (Pearson correlation of average ranks); NaN below MIN_CORR_POINTS points or for a constant input."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < MIN_CORR_POINTS or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def rank_correlation(a: Sequence[float], b: Sequence[float], *, n_boot: int = N_BOOT, seed: int = SEED,
                     level: float = CI_LEVEL) -> tuple[float, float, float]:
    """Spearman rho of (a, b) and a percentile bootstrap interval over resampled pairs (seeded)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rho = spearman(a, b)
    if math.isnan(rho):
        return rho, math.nan, math.nan
    rng = np.random.default_rng(seed)
    boots = [spearman(a[i], b[i]) for i in (rng.integers(0, len(a), len(a)) for _ in range(n_boot))]
    boots = [r for r in boots if not math.isnan(r)]
    if not boots:
        return rho, math.nan, math.nan
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return rho, float(lo), float(hi)


# ----------------------------------------------------------------------------- transfer prediction
def depth_grid(n_layers: Sequence[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Common relative-depth grid for curves of different lengths, and each curve's layer at each grid point.

    The grid has as many points as the shortest curve (relative depths g / (G - 1)); a curve of n layers
    contributes its layer round(r (n - 1)) (halves up) at relative depth r. Equal lengths: the identity.
    """
    g = min(n_layers)
    rel = np.linspace(0.0, 1.0, g) if g > 1 else np.zeros(1)
    return rel, [np.floor(rel * (n - 1) + 0.5).astype(int) for n in n_layers]


def _rank_terms(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Spearman terms of weighted samples, vectorised over weightings.

    x, y: (G, m) values of m points at G grid points; w: (B, m) multiplicities (a bootstrap draw
    repeats a point w times; w = 1: the data). Average ranks within each weighted sample, centred:
    returns sums over the sample of rx*ry, rx^2, ry^2, each (B, G), and the sample sizes (B,).
    """
    n = w.sum(1).astype(np.float64)
    out = []
    for v in (x, y):
        less = (v[:, None, :] < v[:, :, None]).astype(np.float64)  # [g, i, j]: v_j < v_i
        same = (v[:, None, :] == v[:, :, None]).astype(np.float64)
        r = np.einsum("gij,bj->bgi", less, w) + (np.einsum("gij,bj->bgi", same, w) + 1) / 2
        out.append(r - (n[:, None, None] + 1) / 2)
    rx, ry = out
    return (np.einsum("bi,bgi->bg", w, rx * ry), np.einsum("bi,bgi->bg", w, rx * rx),
            np.einsum("bi,bgi->bg", w, ry * ry), n)


def _rho(num: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    den = np.sqrt(dx * dy)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-12, num / np.where(den > 1e-12, den, 1.0), np.nan)


@dataclass
class TransferCorrelation(_Result):
    """Per relative depth: Spearman's rho between target collapse (-CDNV) and target probe accuracy.

    ``per_target[t]``: one row per grid point with rho across the off-domain (source, model) pairs
    measured on target t, its bootstrap interval (sources resampled), the number of points ``n``
    and a ``note`` when there is no rho. ``pooled``: the same after ranking within each target
    (centred ranks of every target with at least two points, pooled; weighted Spearman), the
    interval from resampling sources jointly for all targets. ``layers[model]``: the layer index
    used at each grid point.
    """

    rel_depth: list[float]
    layers: dict[str, list[int]]
    pooled: list[dict]
    per_target: dict[str, list[dict]]
    level: float = CI_LEVEL
    n_boot: int = N_BOOT
    seed: int = SEED
    n_perm: int = N_PERM
    def curves(self) -> dict[str, list[float]]:
        """MLflow per-step curves (step = grid point): pooled and per-target rho, interval and n."""
        import re

        out: dict[str, list[float]] = {}
        for name, rows in [("", self.pooled)] + [("/" + re.sub(r"[^A-Za-z0-9_. -]", "_", t), r) for t, r in self.per_target.items()]:
            for key, col in (("transfer/spearman", "rho"), ("transfer/spearman_lo", "lo"), ("transfer/spearman_hi", "hi"),
                             ("transfer/n", "n")):
                out[key + name] = [float(r[col]) for r in rows]
        p = [float(r.get("p", math.nan)) for r in self.pooled]
        if any(v == v for v in p):  # none where nothing could be permuted (one model per source)
            out["transfer/spearman_p"] = p
        return out


def within_group_permutations(groups: np.ndarray, n_perm: int, seed: int) -> tuple[np.ndarray, bool]:
    """Permutations of positions 0..P-1 that move each position only within its group (``groups``: (P,) labels).

    All of them (the identity included) when there are at most ``n_perm`` (prod over groups of size!), else
    ``n_perm`` seeded random ones. Returns ((B, P) index arrays, exact)."""
    import itertools

    groups = np.asarray(groups)
    members = [np.flatnonzero(groups == g) for g in dict.fromkeys(groups.tolist())]
    total = math.prod(math.factorial(len(m)) for m in members)
    P = len(groups)
    if total <= n_perm:
        per_group = [list(itertools.permutations(m.tolist())) for m in members]
        out = np.empty((total, P), dtype=np.int64)
        for b, choice in enumerate(itertools.product(*per_group)):
            for m, perm in zip(members, choice):
                out[b, m] = perm
        return out, True
    rng = np.random.default_rng(seed)
    out = np.tile(np.arange(P), (n_perm, 1))
    for m in members:
        if len(m) > 1:
            out[:, m] = m[rng.permuted(np.tile(np.arange(len(m)), (n_perm, 1)), axis=1)]
    return out, False


def permutation_p(rx: np.ndarray, ry: np.ndarray, groups: np.ndarray, *, n_perm: int = N_PERM,
                  seed: int = SEED) -> tuple[np.ndarray, bool]:
    """Two-sided permutation p-value of the pooled rho = sum rx ry / sqrt(sum rx^2 sum ry^2) at each grid point.

    rx, ry: (G, P) centred within-target ranks of P pooled points; ``groups``: (P,) each point's (source, target)
    group. The null: within a group, which model has which probe accuracy is exchangeable. ry is permuted within
    groups (the ranks within a target, so sum ry^2, stay as they are) and rho recomputed. Exact enumeration:
    p = #{|rho_perm| >= |rho_obs|} / #perms (the identity among them); random permutations: p = (1 + #{...}) /
    (1 + n_perm). Returns ((G,) p, exact); NaN where rho is undefined or every group holds one point."""
    p = np.full(rx.shape[0], math.nan)
    if n_perm < 1:  # asked for no permutation test
        return p, False
    perms, exact = within_group_permutations(groups, n_perm, seed)
    den = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    if len(perms) <= 1 and exact:  # nothing to permute
        return p, exact
    with np.errstate(invalid="ignore", divide="ignore"):
        obs = np.where(den > 1e-12, (rx * ry).sum(1) / np.where(den > 1e-12, den, 1.0), np.nan)
        perm = np.einsum("gp,bgp->bg", rx, ry[:, perms].transpose(1, 0, 2)) / np.where(den > 1e-12, den, 1.0)
    hits = (np.abs(perm) >= np.abs(obs)[None, :] - TIE_TOL).sum(0)
    p = hits / len(perms) if exact else (1.0 + hits) / (1.0 + len(perms))
    return np.where(np.isfinite(obs), p, np.nan), exact


def transfer_correlation(points: Any, *, n_boot: int = N_BOOT, seed: int = SEED, level: float = CI_LEVEL,
                         n_perm: int = N_PERM) -> TransferCorrelation:
    """Rank correlation across sources between target collapse and target probe accuracy (paper sec. 4.3).

    ``points``: a DataFrame with columns model, source, target, layer, cdnv, probe_acc (one row per
    measured layer of each (model, source, target) run). In-domain pairs (source == target) are
    excluded: they are not transfer and would dominate any correlation. Curves are aligned on
    relative depth (:func:`depth_grid`). Per target and grid point: Spearman's rho of -CDNV vs probe
    accuracy across the (source, model) pairs, NaN with note "n=K: too few sources" below
    MIN_CORR_POINTS; percentile interval from ``n_boot`` resamples of that target's sources, given only with
    at least MIN_BOOT_UNITS sources (else NaN with note "interval: too few sources (K)").
    Pooled: ranks are taken within each target (so targets' scales never mix), centred, and pooled
    over the targets with at least two points; rho = sum rx ry / sqrt(sum rx^2 sum ry^2); its
    interval resamples the study's sources jointly for all targets (again only with MIN_BOOT_UNITS sources or
    more). The pooled rho also gets a two-sided permutation p-value ``p`` (:func:`permutation_p`: each (source,
    target) group's models shuffled, ``n_perm``; NaN with ``p_note`` "one model per source: nothing to permute" when
    no group has two models, and with ``n_perm=0``). One fixed ``seed``.
    """
    d = points.dropna(subset=["cdnv", "probe_acc"])
    d = d[d.source != d.target]
    curves = sorted({(str(m), str(s), str(t)) for m, s, t in zip(d.model, d.source, d.target)})
    if not curves:
        return TransferCorrelation([], {}, [], {}, level, n_boot, seed, n_perm)
    by_curve = {k: g.sort_values("layer") for k, g in d.groupby(["model", "source", "target"])}
    lengths = [int(by_curve[c].layer.max()) + 1 for c in curves]
    rel, idx = depth_grid(lengths)
    layers: dict[str, list[int]] = {}
    xs, ys = [], []
    for c, ix in zip(curves, idx):
        g = by_curve[c].set_index("layer").reindex(range(int(by_curve[c].layer.max()) + 1))
        xs.append(-g.cdnv.to_numpy()[ix])
        ys.append(g.probe_acc.to_numpy()[ix])
        layers.setdefault(c[0], ix.tolist())
    X, Y = np.array(xs).T, np.array(ys).T  # (G, curves)
    ok = np.isfinite(X).all(0) & np.isfinite(Y).all(0)  # a curve missing a grid layer is left out
    src = np.array([c[1] for c in curves])
    tgt = np.array([c[2] for c in curves])
    targets = sorted(set(tgt[ok]))
    sources = sorted(set(src[ok]))
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    G = len(rel)

    def terms(t: str, counts: np.ndarray, srcs: list[str]) -> tuple:
        """Rank terms of target t's points, each repeated as often as its source was drawn (counts: (B, len(srcs)))."""
        cols = np.flatnonzero((tgt == t) & ok)
        pos = {s: k for k, s in enumerate(srcs)}
        w = np.stack([counts[:, pos[s]] if s in pos else np.zeros(len(counts)) for s in src[cols]], axis=1)
        return _rank_terms(X[:, cols], Y[:, cols], w)

    def draws(rng_key: list[int], srcs: list[str]) -> np.ndarray:
        """(1 + n_boot, len(srcs)) source multiplicities: the data itself, then n_boot resamples of the sources."""
        k = len(srcs)
        idx = np.random.default_rng(rng_key).integers(0, k, (n_boot, k))
        boot = np.stack([np.bincount(r, minlength=k) for r in idx]) if n_boot else np.zeros((0, k), int)
        return np.vstack([np.ones((1, k), int), boot])

    def rows(rho: np.ndarray, n: np.ndarray, units: int, extra: dict) -> list[dict]:
        """rho: (1 + n_boot, G), n: (1 + n_boot,); row 0 is the data. ``units``: the sources resampled."""
        out = []
        n0 = int(n[0])
        for g in range(G):
            r = float(rho[0, g]) if n0 >= MIN_CORR_POINTS else math.nan
            b = rho[1:, g][(n[1:] >= MIN_CORR_POINTS) & np.isfinite(rho[1:, g])]
            enough = units >= MIN_BOOT_UNITS
            lo, hi = (float(v) for v in np.quantile(b, q)) if (enough and len(b) and r == r) else (math.nan, math.nan)
            why = f"n={n0}: too few sources" if n0 < MIN_CORR_POINTS else ("constant values" if r != r else
                                                                           "" if enough else f"interval: too few sources ({units})")
            out.append({"step": g, "rel_depth": float(rel[g]), "n": n0, **extra, "rho": r, "lo": lo, "hi": hi, "note": why})
        return out

    per_target: dict[str, list[dict]] = {}
    for ti, t in enumerate(targets):
        srcs = sorted(set(src[(tgt == t) & ok]))
        num, dx, dy, n = terms(t, draws([seed, ti + 1], srcs), srcs)
        per_target[t] = rows(_rho(num, dx, dy), n, len(srcs), {"sources": len(srcs)})

    counts = draws([seed, 0], sources)  # one draw of sources serves every target: their errors are shared
    num, dx, dy = (np.zeros((len(counts), G)) for _ in range(3))
    n, k = np.zeros(len(counts)), 0
    for t in targets:
        a, b, c, m = terms(t, counts, sources)
        use = m >= 2  # a target contributes once it has two points to rank
        num, dx, dy, n = num + a * use[:, None], dx + b * use[:, None], dy + c * use[:, None], n + m * use
        k += int(use[0])
    pooled = rows(_rho(num, dx, dy), n, len(sources), {"targets": k})
    rx, ry, groups = [], [], []
    for t in targets:  # the pooled points (targets with at least two), centred ranks within their target
        cols = np.flatnonzero((tgt == t) & ok)
        if len(cols) >= 2:
            for v, out in ((X[:, cols], rx), (Y[:, cols], ry)):
                out.append(_ranks(v) - (len(cols) + 1) / 2)
            groups += [f"{s}\0{t}" for s in src[cols]]
    p = np.full(G, math.nan)
    if groups:
        p, _ = permutation_p(np.hstack(rx), np.hstack(ry), np.array(groups), n_perm=n_perm, seed=seed)
    single = len(set(groups)) == len(groups)
    for row, pv in zip(pooled, p):
        row["p"] = float(pv) if row["rho"] == row["rho"] else math.nan
        row["p_note"] = "one model per source: nothing to permute" if single and row["rho"] == row["rho"] else ""
    return TransferCorrelation(rel.tolist(), layers, pooled, per_target, level, n_boot, seed, n_perm)


# ----------------------------------------------------------------------------- collapse over training time
def first_epoch_reaching(epochs: Sequence[int], values: Sequence[float], level: float) -> int | None:
    """The first of ``epochs`` (ascending) whose value is at least ``level`` (NaN never is); None when none is."""
    return next((int(e) for e, v in zip(epochs, values) if v >= level), None)


@dataclass
class TransitionOnset(_Result):
    """When the transition forms during training: ``first_found`` is the first measured epoch at which
    :func:`detect_transition` finds it in that epoch's CDNV curve, ``stable_from`` the first measured epoch from
    which it is found at every later measured epoch too (None: not at the last one). ``found``: per epoch."""

    epochs: list[int]
    found: list[bool]
    first_found: int | None
    stable_from: int | None

def transition_onset(epochs: Sequence[int], curves: Sequence[Sequence[float]]) -> TransitionOnset:
    """:class:`TransitionOnset` of per-epoch CDNV curves (``epochs`` ascending, one curve each)."""
    found = [detect_transition(c).found for c in curves]
    first = next((int(e) for e, f in zip(epochs, found) if f), None)
    stable = None
    for e, f in zip(reversed(list(epochs)), reversed(found)):
        if not f:
            break
        stable = int(e)
    return TransitionOnset([int(e) for e in epochs], found, first, stable)


def first_crossings(epochs: Sequence[int], ratios: Sequence[Sequence[float]], tol: float) -> list[int | None]:
    """Per layer, the first of ``epochs`` (ascending; ``ratios`` is epochs x layers) at which the memorization ratio
    exceeds ``1 + tol`` (the rule of :func:`pnc.metrics.geometry.memorization_layers`); None when it never does."""
    r = np.asarray(ratios, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != len(epochs):
        raise ValueError(f"first_crossings: {len(epochs)} epochs vs ratios of shape {r.shape}")
    above = r > 1.0 + tol  # NaN compares False
    return [int(epochs[int(np.argmax(above[:, j]))]) if above[:, j].any() else None for j in range(r.shape[1])]
