"""Known answers for the paper's proposed analyses: transition detection, efficient depth, noise map."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pnc.analysis import (detect_transition, efficient_depth, estimate_noise, fit_noise_map, intermediate_profile,
                          rank_correlation, spearman)


def piecewise(n: int, b1: float, b2: float, s1: float, s2: float, s3: float, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """exp of a continuous piecewise-linear log curve over relative depth with breakpoints b1 < b2."""
    x = np.linspace(0, 1, n)
    y = np.where(x < b1, s1 * x, s1 * b1 + np.where(x < b2, s2 * (x - b1), s2 * (b2 - b1) + s3 * (x - b2)))
    y = y + np.random.default_rng(seed).normal(0, noise, n)
    return np.exp(y + 1.0)


@pytest.mark.parametrize("n, b1, b2", [(16, 0.25, 0.75), (24, 0.3, 0.8), (12, 0.35, 0.7), (33, 0.2, 0.85)])
def test_known_breakpoints_are_found(n: int, b1: float, b2: float) -> None:
    t = detect_transition(piecewise(n, b1, b2, -6.0, 0.0, -8.0, noise=0.02))
    assert t.found, t.reason
    step = 1 / (n - 1)
    assert abs(t.start_rel - b1) <= 2.5 * step and abs(t.end_rel - b2) <= 2.5 * step
    assert t.slopes[0] < 0 and t.slopes[2] < 0 and abs(t.slopes[1]) < 1.5
    assert 0.5 < t.confidence <= 1.0


@pytest.mark.parametrize("curve, why", [
    (np.exp(-4 * np.linspace(0, 1, 16) + 1), "straight decline"),
    (np.exp(-6 * np.linspace(0, 1, 16) ** 0.5), "smooth concave decline"),
    (np.exp(np.linspace(0, 1, 16)), "rising"),
    (np.full(16, 2.0), "flat"),
    (np.exp(np.where(np.linspace(0, 1, 16) < 0.5, -5 * np.linspace(0, 1, 16), -2.5)), "decline then plateau only"),
])
def test_curves_without_a_transition(curve: np.ndarray, why: str) -> None:
    t = detect_transition(curve)
    assert not t.found, (why, t)
    assert t.reason


def test_short_or_invalid_curves() -> None:
    assert not detect_transition([1.0, 0.5, 0.3]).found
    assert "non-positive" in detect_transition([1.0, 0.5, 0.0, 0.2, 0.1, 0.05, 0.01]).reason


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(1e-6, 1e6), seed=st.integers(0, 1000))
def test_detection_is_scale_invariant_and_deterministic(scale: float, seed: int) -> None:
    c = piecewise(20, 0.3, 0.7, -5.0, -0.2, -7.0, noise=0.05, seed=seed)
    a, b = detect_transition(c), detect_transition(c * scale)
    assert a.found == b.found and a.start == b.start and a.end == b.end
    assert detect_transition(c) == a


def test_efficient_depth_picks_the_first_transition() -> None:
    depths = [8, 14, 20, 32]
    curves = [np.exp(-3 * np.linspace(0, 1, n)) for n in (4, 7, 10)] + [piecewise(16, 0.25, 0.75, -6, 0, -8)]
    curves[2] = piecewise(10, 0.25, 0.75, -6, 0, -8)
    r = efficient_depth(depths, curves, val_acc=[0.90, 0.95, 0.96, 0.97], test_acc=[0.89, 0.94, 0.955, 0.965])
    assert r.transition_depth == 20 and r.validation_depth == 32
    assert r.cost == pytest.approx(0.965 - 0.955)
    none = efficient_depth(depths[:2], curves[:2], [0.9, 0.9], [0.8, 0.85])
    assert none.transition_depth is None and none.cost is None and none.validation_depth == 8  # ties -> smallest


def test_noise_map_recovers_a_linear_relation() -> None:
    levels = [0.0, 0.2, 0.4, 0.6]
    curves = [np.exp(np.linspace(0, -3, 12) + 2.0 * lv) for lv in levels]
    m = fit_noise_map("resnet8", "symmetric", levels, curves)
    assert m.loo_mae < 1e-9 and m.slope == pytest.approx(0.5)
    assert estimate_noise(m, np.exp(np.linspace(0, -3, 12) + 2.0 * 0.3)) == pytest.approx(0.3)
    assert intermediate_profile(np.exp(np.full(10, 1.5))) == pytest.approx(1.5)


def test_rank_correlation_and_bootstrap() -> None:
    a = np.arange(10.0)
    rho, lo, hi = rank_correlation(a, a ** 3)
    assert rho == pytest.approx(1.0) and lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=40), rng.normal(size=40)
    rho, lo, hi = rank_correlation(x, y, seed=3)
    assert lo < rho < hi and lo < 0 < hi
    assert rank_correlation(x, y, seed=3) == (rho, lo, hi)
