"""Known answers for the paper's proposed analyses: transition detection, efficient depth, noise map."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pnc.analysis import (
    HEAD,
    collapse_by_stage,
    detect_transition,
    efficient_depth,
    estimate_noise,
    fit_noise_map,
    intermediate_profile,
    rank_correlation,
    spearman,
    transfer_correlation,
)


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


def null_curves(family: str, count: int = 200) -> list[np.ndarray]:
    """Seeded noisy curves without a transition: sigma = 0.2 on log CDNV, 6-20 layers.

    "straight": a straight decline of log CDNV; "curved": a smooth plateau-free decline -a x^p
    (p in [0.4, 2.5]: steep-then-flattening or flat-then-steepening, never decline-plateau-decline).
    """
    out = []
    for i in range(count):
        rng = np.random.default_rng([7, i, family == "curved"])
        n = int(rng.integers(6, 21))
        x = np.linspace(0, 1, n)
        a = rng.uniform(1.0, 6.0)
        y = -a * x if family == "straight" else -a * x ** rng.uniform(0.4, 2.5)
        out.append(np.exp(y + rng.normal(0, 0.2, n)))
    return out


@pytest.mark.parametrize("family", ["straight", "curved"])
def test_false_positive_rate_and_calibration_on_curves_without_a_transition(family: str) -> None:
    """At most 2% of noisy transition-free curves are reported as transitions (the pre-fix method, with
    two-point segments and BIC weights as confidence, reported 3.5% of each family at mean confidence 0.6),
    and the confidence is calibrated: P(confidence >= c) <= 1 - c (+ binomial slack) under no transition."""
    ts = [detect_transition(c) for c in null_curves(family)]
    rate = np.mean([t.found for t in ts])
    assert rate <= 0.02, (family, rate)
    conf = np.array([t.confidence for t in ts])
    for c in (0.5, 0.8, 0.9):
        assert np.mean(conf >= c) <= (1 - c) + 0.03, (family, c, np.mean(conf >= c))
    assert all(t.p_value is None or math.isclose(t.confidence, round(1 - t.p_value, 4)) for t in ts)


@pytest.mark.parametrize("n", [6, 7, 8])
def test_short_curves_have_no_transition_even_with_a_perfect_plateau(n: int) -> None:
    """Under three points per segment a line through two points fits any noise: too few layers."""
    t = detect_transition(piecewise(n, 0.3, 0.7, -6.0, 0.0, -8.0))
    assert not t.found and t.confidence == 0.0 and "too few layers" in t.reason


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n=st.integers(16, 40), b1=st.floats(0.2, 0.4), gap=st.floats(0.25, 0.4), s1=st.floats(-10, -3), s2=st.floats(-0.3, 0.3),
       s3=st.floats(-10, -3), noise=st.floats(0.0, 0.05), scale=st.floats(1e-6, 1e6), seed=st.integers(0, 10_000))
def test_planted_breakpoints_are_found_and_detection_is_scale_invariant(n, b1, gap, s1, s2, s3, noise, scale, seed) -> None:
    """Any decline-plateau-decline curve (random breakpoints, slopes, noise) is detected with its breakpoints
    within tolerance, and rescaling CDNV (a shift of log CDNV) changes nothing."""
    b2 = min(b1 + gap, 0.8)
    c = piecewise(n, b1, b2, s1, s2, s3, noise=noise, seed=seed)
    t = detect_transition(c)
    assert t.found, t
    tol = 2.5 / (n - 1) + 0.06
    assert abs(t.start_rel - b1) <= tol and abs(t.end_rel - b2) <= tol, (t.start_rel, t.end_rel, b1, b2)
    assert t.confidence >= 0.99
    u = detect_transition(c * scale)
    assert (u.found, u.start, u.end) == (t.found, t.start, t.end)
    assert abs(u.confidence - t.confidence) <= 2 / 500
    assert detect_transition(c) == t  # deterministic


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


# ----------------------------------------------------------------------------- transfer prediction
def _transfer_frame(curves: dict) -> pd.DataFrame:
    """layer_frame-shaped rows from {(model, source, target): (cdnv per layer, probe accuracy per layer)}."""
    rows = []
    for (model, source, target), (cdnv, acc) in curves.items():
        for key, vals in (("cdnv/target", cdnv), ("probe_acc/target_test", acc)):
            for layer, v in enumerate(vals):
                rows.append({"run_id": f"{model}-{source}-{target}", "cell": "", "model": model, "depth": 0, "noise": "clean",
                             "noise_kind": "clean", "noise_level": "0", "source": source, "target": target, "metric": key,
                             "layer": layer, "rel_depth": layer / max(1, len(vals) - 1), "value": float(v)})
    return pd.DataFrame(rows)


def _points(frame: pd.DataFrame) -> pd.DataFrame:
    piv = frame.pivot_table(index=["model", "source", "target", "layer"], columns="metric", values="value").reset_index()
    return piv.rename(columns={"cdnv/target": "cdnv", "probe_acc/target_test": "probe_acc"})


def _transfer_spec(sources, targets, seed: int = 7) -> SimpleNamespace:
    return SimpleNamespace(name="tr", kind="domain_transfer", experiment="tr", description="",
                           transfer=SimpleNamespace(sources=list(sources), targets=list(targets)), train=SimpleNamespace(seed=seed),
                           measure=SimpleNamespace(metrics=["cdnv", "nc1", "nc2", "ncc", "probe"], epochs=[]))  # the default selection


def _digits_like() -> dict:
    """Three domains as sources and targets, one model. In-domain pairs collapse best and probe best (they
    would make any pooled correlation positive); across sources, on every target, the better-collapsed
    off-domain source probes worse."""
    doms = ["A", "B", "C"]
    curves = {}
    for ti, t in enumerate(doms):
        for si, s in enumerate(doms):
            if s == t:
                cdnv, acc = [0.05, 0.02, 0.01, 0.005], [0.95, 0.97, 0.98, 0.99]
            else:
                q = (si - ti) % 3  # 1 or 2
                cdnv = [(1.0 + ti) * (3 - q) * f for f in (1.0, 0.8, 0.6, 0.5)]  # q = 2 collapses better ...
                acc = [0.3 + 0.1 * ti + 0.05 * (2 - q) + 0.01 * k for k in range(4)]  # ... and probes worse
            curves[("resnet14", s, t)] = (cdnv, acc)
    return curves


def test_transfer_excludes_in_domain_pairs_and_says_when_there_are_too_few_sources(monkeypatch) -> None:
    import pnc.frames as frames
    import pnc.report as report

    monkeypatch.setattr(frames, "layer_frame", lambda *a, **k: _transfer_frame(_digits_like()))
    s = report.study_summary(_transfer_spec("ABC", "ABC"))
    det = s["details"]["transfer"]
    for t in "ABC":  # two off-domain sources per target: no rho, no +-1
        assert all(math.isnan(r["rho"]) and r["n"] == 2 and r["note"] == "n=2: too few sources" for r in det["per_target"][t])
    for r in det["pooled"]:  # within-target ranks, pooled over 3 targets x 2 sources: every target discordant
        assert r["n"] == 6 and r["targets"] == 3 and r["rho"] == pytest.approx(-1.0)
    assert s["metrics"]["transfer/spearman_final_layer"] == pytest.approx(-1.0)
    assert s["details"]["transfer_correlation"]["transfer/spearman"] == pytest.approx([-1.0] * 4)
    assert "n=6 off-domain pairs, 3 targets" in s["tags"]["pnc.transfer_correlation"]
    # 3 sources resampled: 10 distinct resamples, 11% of them one source only: no interval (was -1.00..-1.00)
    assert all(math.isnan(r["lo"]) and math.isnan(r["hi"]) and r["note"] == "interval: too few sources (3)" for r in det["pooled"])
    assert "(interval: too few sources (3); n=6 off-domain pairs" in s["tags"]["pnc.transfer_correlation"]


def test_transfer_pooling_ranks_within_each_target() -> None:
    """Within each target better collapse goes with better probes; across targets the scales are opposite
    (target Y: smaller CDNV, lower accuracy). Ranking within targets gives rho = 1; pooling raw values does not."""
    curves = {}
    for si, s in enumerate(["S1", "S2", "S3", "S4"]):
        curves[("m", s, "X")] = ([1.0 + si] * 3, [0.9 - 0.1 * si] * 3)
        curves[("m", s, "Y")] = ([0.1 + 0.1 * si] * 3, [0.5 - 0.1 * si] * 3)
    r = transfer_correlation(_points(_transfer_frame(curves)))
    assert [row["rho"] for row in r.pooled] == pytest.approx([1.0] * 3)
    assert all(row["rho"] == pytest.approx(1.0) and row["n"] == 4 for t in "XY" for row in r.per_target[t])
    flat = _points(_transfer_frame(curves))
    assert spearman(-flat.cdnv, flat.probe_acc) < 0  # what pooling raw values across targets reports
    assert all(row["lo"] <= row["rho"] <= row["hi"] for row in r.pooled)


def test_transfer_aligns_models_of_different_depth_on_relative_depth() -> None:
    """At the last layer of both models the six (source, model) pairs are concordant; the deeper model's
    layer 3 (what absolute-index alignment pairs with the shallow model's last layer) is reversed."""
    curves = {}
    for si, s in enumerate(["S1", "S2", "S3"]):
        for model, n, q in (("m4", 4, 1 + si), ("m7", 7, 4 + si)):
            cdnv = [1.0] * n
            acc = [0.5] * n
            cdnv[-1], acc[-1] = 1.0 / q, q / 10
            if model == "m7":
                cdnv[3], acc[3] = 1.0 / q, 1 - q / 10
            curves[(model, s, "T")] = (cdnv, acc)
    r = transfer_correlation(_points(_transfer_frame(curves)))
    assert r.layers == {"m4": [0, 1, 2, 3], "m7": [0, 2, 4, 6]}
    assert r.rel_depth == pytest.approx([0, 1 / 3, 2 / 3, 1])
    last = r.per_target["T"][-1]
    assert last["rho"] == pytest.approx(1.0) and last["n"] == 6 and last["sources"] == 3
    assert math.isnan(r.per_target["T"][0]["rho"]) and r.per_target["T"][0]["note"] == "constant values"


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_weighted_ranks_match_spearman_on_repeated_points() -> None:
    """The bootstrap repeats points by multiplicity; its rho equals scipy's on the explicitly repeated sample."""
    from scipy.stats import spearmanr

    from pnc.analysis import _rank_terms, _rho

    rng = np.random.default_rng(5)
    x, y = rng.integers(0, 4, (3, 7)).astype(float), rng.normal(size=(3, 7))
    w = rng.integers(0, 3, (5, 7))
    w[w.sum(1) < 3] = 1
    num, dx, dy, n = _rank_terms(x, y, w)
    rho = _rho(num, dx, dy)
    for b in range(5):
        assert n[b] == w[b].sum()
        for g in range(3):
            ref = spearmanr(np.repeat(x[g], w[b]), np.repeat(y[g], w[b])).statistic
            assert (math.isnan(rho[b, g]) and math.isnan(ref)) or rho[b, g] == pytest.approx(ref)


def test_transfer_report_shows_the_numbers_the_parent_run_logs(monkeypatch, tmp_path) -> None:
    """One computation, one seed: the report's correlation table equals study_summary's (whatever train.seed is)."""
    import pnc.figures as figures
    import pnc.frames as frames
    import pnc.report as report
    from pnc.kinds.transfer import KIND

    curves = {}
    rng = np.random.default_rng(1)
    for s in ["A", "B", "C", "D"]:
        for t in ["A", "B", "C", "D"]:
            q = rng.uniform()
            curves[("m", s, t)] = (np.exp(-np.arange(5) / 2 - q + rng.normal(0, 0.3, 5)), 0.5 + 0.3 * q + rng.normal(0, 0.05, 5))
    monkeypatch.setattr(frames, "layer_frame", lambda *a, **k: _transfer_frame(curves))
    monkeypatch.setattr(figures, "save", lambda chart, folder, stem: chart.to_dict() and [])
    spec = _transfer_spec("ABCD", "ABCD", seed=7)
    logged = report.study_summary(spec)["details"]["transfer_correlation"]
    KIND.report(spec, tmp_path, None)
    csv = pd.read_csv(tmp_path / "correlation.csv")
    pooled = csv[csv.target.str.startswith("pooled")].sort_values("step")
    np.testing.assert_array_equal(pooled.rho.to_numpy(), np.array(logged["transfer/spearman"]))
    np.testing.assert_array_equal(pooled["90% CI low"].to_numpy(), np.array(logged["transfer/spearman_lo"]))
    np.testing.assert_array_equal(pooled["90% CI high"].to_numpy(), np.array(logged["transfer/spearman_hi"]))
    per_a = csv[csv.target == "A"].sort_values("step")
    np.testing.assert_array_equal(per_a.rho.to_numpy(), np.array(logged["transfer/spearman/A"]))
    assert (per_a.n == 3).all()
    assert report.study_summary(_transfer_spec("ABCD", "ABCD", seed=0))["details"]["transfer_correlation"] == logged


# ----------------------------------------------------------------------------- noise maps from MLflow rows
def _noise_frames(cells: list[tuple[str, str, str, float | None]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(layer_frame, run_frame) for cells (noise tag, kind, nominal level, realised rate or None) of model r18;
    CDNV profile rises linearly with the realised rate (or with the nominal level for input corruption)."""
    rows, runs = [], []
    for tag, kind, nominal, realized in cells:
        run_id = f"run-{tag}"
        shift = realized if realized is not None else (0.0 if tag == "clean" else float(nominal) / 10 if nominal[0].isdigit() else 0.5)
        for layer, v in enumerate(np.exp(np.linspace(0, -3, 10) + 2.0 * shift)):
            rows.append({"run_id": run_id, "cell": tag, "model": "r18", "depth": 18, "noise": tag, "noise_kind": kind,
                         "noise_level": nominal, "source": "", "target": "", "metric": "cdnv/train_noisy", "layer": layer,
                         "rel_depth": layer / 9, "value": float(v)})
        runs.append({"run_id": run_id, "pnc.model": "r18", "pnc.noise": tag,
                     **({"noise/realized_rate": realized} if realized is not None else {})})
    return pd.DataFrame(rows), pd.DataFrame(runs)


def test_noise_map_for_human_label_sets_uses_the_realised_rate(monkeypatch) -> None:
    import pnc.frames as frames
    import pnc.report as report

    frame, runs = _noise_frames([("clean", "clean", "0", None), ("human:worse", "human", "worse", 0.40),
                                 ("human:aggre", "human", "aggre", 0.09), ("human:random1", "human", "random1", 0.17),
                                 ("symmetric:0.3", "symmetric", "0.3", 0.27), ("symmetric:0.6", "symmetric", "0.6", None),
                                 ("gaussian_noise:2", "gaussian_noise", "2", None), ("gaussian_noise:4", "gaussian_noise", "4", None)])
    monkeypatch.setattr(frames, "layer_frame", lambda *a, **k: frame)
    monkeypatch.setattr(frames, "run_frame", lambda *a, **k: runs)
    spec = SimpleNamespace(name="n", kind="noise_sweep", experiment="n", measure=SimpleNamespace(epochs=[]))
    s = report.study_summary(spec)
    human = s["details"]["noise_maps"]["r18/human"]
    assert human["levels"] == pytest.approx([0.0, 0.09, 0.17, 0.40])
    assert human["settings"] == ["clean", "human:aggre", "human:random1", "human:worse"]
    assert human["level_source"] == ["nominal", "realized", "realized", "realized"]
    assert len(human["loo_abs_errors"]) == 4 and human["loo_mae"] < 1e-9 and human["slope"] == pytest.approx(0.5)
    assert "noise_map/r18/human/loo_mae" in s["metrics"]
    sym = s["details"]["noise_maps"]["r18/symmetric"]  # realised rate where logged, nominal rate as the fallback
    assert sym["levels"] == pytest.approx([0.0, 0.27, 0.6]) and sym["level_source"] == ["nominal", "realized", "nominal"]
    assert s["details"]["noise_maps"]["r18/gaussian_noise"]["levels"] == [0.0, 2.0, 4.0]  # input corruption: severity


def test_human_label_set_without_a_realised_rate_is_left_out_and_said(monkeypatch) -> None:
    import pnc.frames as frames
    import pnc.report as report

    frame, runs = _noise_frames([("clean", "clean", "0", None), ("human:aggre", "human", "aggre", None)])
    monkeypatch.setattr(frames, "layer_frame", lambda *a, **k: frame)
    monkeypatch.setattr(frames, "run_frame", lambda *a, **k: runs)
    s = report.study_summary(SimpleNamespace(name="n", kind="noise_sweep", experiment="n", measure=SimpleNamespace(epochs=[])))
    assert s["details"]["noise_maps"] == {}
    assert any("human:aggre" in x for x in s["details"]["noise_map_skipped"])


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_transfer_interval_only_with_enough_sources_to_resample(k: int) -> None:
    """The interval resamples sources: with 2 or 3 (3 or 10 distinct resamples) it is not computed and the note says
    so; from 4 sources (MIN_BOOT_UNITS) it is, and it holds rho. rho itself needs only 3 points (2 models x k)."""
    from pnc.analysis import MIN_BOOT_UNITS

    rng = np.random.default_rng(k)
    curves = {}
    for s in range(k):
        for m in ("m1", "m2"):
            q = rng.uniform(1, 2)
            curves[(m, f"S{s}", "T")] = ([q, q / 2, q / 3], [0.5 + 0.2 * q + rng.normal(0, 0.1), 0.6, 0.7 + rng.normal(0, 0.1)])
    r = transfer_correlation(_points(_transfer_frame(curves)), n_boot=400)
    for rows in (r.per_target["T"], r.pooled):
        for row in rows:
            assert row["n"] == 2 * k
            if math.isnan(row["rho"]):
                continue
            if k < MIN_BOOT_UNITS:
                assert math.isnan(row["lo"]) and math.isnan(row["hi"]) and row["note"] == f"interval: too few sources ({k})"
            else:
                assert row["lo"] <= row["rho"] <= row["hi"] and row["lo"] < row["hi"] and row["note"] == ""
    assert any(not math.isnan(row["rho"]) for row in r.pooled), "rho is given from 3 points"


# ----------------------------------------------------------------------------- where collapse happens
def test_collapse_by_stage_on_a_planted_curve_with_known_shares() -> None:
    # log CDNV planted tap by tap (natural log): stage a flat then rising by 0.5, boundary a-b falls 2, stage b
    # falls 1 per block over 3 blocks, boundary b-c falls 1, stage c falls 0.5 per block over 2 blocks, and the
    # pooled head repeats the last block.
    logs = [3.0, 3.0, 3.0, 3.5, 1.5, 0.5, -0.5, -1.5, -2.5, -3.0, -3.5, -3.5]
    labels = ["a"] * 4 + ["b"] * 4 + ["c"] * 3 + [HEAD]
    total = -0.5 + 2.0 + 3.0 + 1.0 + 1.0  # 6.5
    c = collapse_by_stage(np.exp(logs), labels)
    assert c.total_decline == pytest.approx(total, abs=1e-12)
    assert [p["name"] for p in c.parts] == ["a", "a-b", "b", "b-c", "c", "c-head"]
    want = {"a": -0.5, "a-b": 2.0, "b": 3.0, "b-c": 1.0, "c": 1.0, "c-head": 0.0}
    for p in c.parts:
        assert p["decline"] == pytest.approx(want[p["name"]], abs=1e-12)
        assert p["share"] == pytest.approx(want[p["name"]] / total, abs=1e-12)
    assert sum(p["share"] for p in c.parts) == pytest.approx(1.0, abs=1e-12)
    slopes = {p["name"]: p["slope_per_block"] for p in c.parts if p["kind"] == "stage"}
    assert slopes["b"] == pytest.approx(-1.0, abs=1e-12) and slopes["c"] == pytest.approx(-0.5, abs=1e-12)
    # stage a: log values 3, 3, 3, 3.5 at blocks 0..3: least-squares slope 0.15 (by hand: sum (x - 1.5)(y - 3.125) / 5)
    assert slopes["a"] == pytest.approx(0.75 / 5, abs=1e-12)
    assert [p["blocks"] for p in c.parts if p["kind"] == "stage"] == [3, 3, 2]
    assert c.share("a-b") == pytest.approx(2.0 / 6.5)


def test_collapse_by_stage_is_scale_invariant_and_uses_only_the_curve_and_labels() -> None:
    rng = np.random.default_rng(3)
    curve = np.exp(np.cumsum(-rng.uniform(0, 1, 10)))
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    a, b = collapse_by_stage(curve, labels), collapse_by_stage(7.5 * curve, labels)
    assert [p["share"] for p in a.parts] == pytest.approx([p["share"] for p in b.parts], abs=1e-12)
    assert a.total_decline == pytest.approx(float(np.log(curve[0] / curve[-1])), abs=1e-12)


def test_collapse_by_stage_without_an_overall_decline_and_bad_input() -> None:
    c = collapse_by_stage([1.0, 2.0, 3.0, 4.0], ["a", "a", "b", "b"])
    assert c.total_decline < 0 and all(p["share"] is None for p in c.parts) and "does not decline" in c.reason
    assert "non-positive" in collapse_by_stage([1.0, 0.0, 0.5], ["a", "a", "b"]).reason
    with pytest.raises(ValueError, match="consecutive"):
        collapse_by_stage([3.0, 2.0, 1.0, 0.5], ["a", "b", "a", "b"])
    with pytest.raises(ValueError, match="stage labels"):
        collapse_by_stage([3.0, 2.0, 1.0], ["a", "b"])
    # one tap per stage (measure.layers: stages): only boundaries, each step its own part
    c = collapse_by_stage([8.0, 4.0, 1.0], ["s1", "s2", "s3"])
    assert [p["kind"] for p in c.parts] == ["boundary", "boundary"]
    assert [p["share"] for p in c.parts] == pytest.approx([1 / 3, 2 / 3], rel=1e-12)  # ln 2 and ln 4 of ln 8


def staged(n: int, stages: list[tuple[float, float]], noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """exp of a log CDNV curve planted stage by stage: per stage (step into it, change along its n taps), then a
    pooled head repeating the last tap; seeded Gaussian noise on the taps."""
    y, level = [], 0.0
    for step, along in stages:
        level += step
        y += list(level + along * np.arange(n) / (n - 1))
        level = y[-1]
    y = np.array(y) + np.random.default_rng(seed).normal(0, noise, len(y))
    return np.exp(np.append(y, y[-1]))


@pytest.mark.parametrize("n", [5, 9, 18])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_plateau_between_downsampling_steps_is_found_after_a_rising_first_stage(n: int, seed: int) -> None:
    """Stage 1 rises (+0.5), the step into stage 2 falls 1.5, stage 2 is flat, the step into stage 3 falls 1, stage 3
    falls 1.5: a reader sees decline, plateau (stage 2), decline; the fitted segments' own slopes are +, 0, -."""
    c = staged(n, [(0.0, 0.5), (-1.5, 0.0), (-1.0, -1.5)], noise=0.05, seed=seed)
    t = detect_transition(c)
    assert t.found, t.reason
    assert abs(t.start - n) <= 1 and abs(t.end - (2 * n - 1)) <= 1  # the plateau is stage 2 (taps n .. 2n-1)
    assert t.phases[0] > 0.5 and t.phases[2] > 1.5 and abs(t.phases[1]) < 0.3
    assert t.confidence >= 0.99


@pytest.mark.parametrize("n", [5, 9, 18])
def test_flat_then_decline_is_not_a_transition_and_says_why(n: int) -> None:
    """No initial decline: stages 1 and 2 flat, then one decline. A plateau, but not the paper's three phases."""
    for seed in range(3):
        t = detect_transition(staged(n, [(0.0, 0.0), (0.0, 0.0), (-1.0, -3.0)], noise=0.05, seed=seed))
        assert not t.found and t.reason, t


def test_phases_are_the_fitted_falls_before_along_and_after_the_plateau() -> None:
    # noise-free: log CDNV falls 0.5 per tap over 5 taps, steps down 1 onto a plateau of 5 taps, steps down 1 and
    # falls 0.5 per tap over the last 5
    y = np.concatenate([-0.5 * np.arange(5), np.full(5, -3.0), -4.0 - 0.5 * np.arange(5)])
    t = detect_transition(np.exp(y))
    assert t.found and (t.start, t.end) == (5, 9)
    # before: first point (0) to the plateau's first (-3); along: 0; after: the plateau's last (-3) to the last (-6)
    assert t.phases == pytest.approx([3.0, 0.0, 3.0], abs=1e-9)
    assert t.slopes == pytest.approx([-0.5 * 14, 0.0, -0.5 * 14], abs=1e-9)  # per unit relative depth: 14 steps


def test_tap_stages_and_collapse_read_back_from_a_run() -> None:
    """Stages come from the model's module tree (layer2.1 -> layer2), the head is its own; a run's per-layer stage
    indices and its pnc.stages tag give back the same decomposition; metric keys are ones MLflow accepts."""
    import json
    import re

    from pnc.kinds.depth import DepthSweep, collapse_metrics, tap_stages

    names = ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "penultimate"]
    labels = tap_stages(names, "blocks")
    assert labels == ["layer1", "layer1", "layer2", "layer2", "layer3", "layer3", HEAD]
    assert tap_stages(["layer1", "layer2", "penultimate"], "stages") == ["layer1", "layer2", HEAD]
    assert tap_stages(["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0"], "blocks") == ["layers.0"] * 2 + ["layers.1"]
    from pnc.features import LayerNames

    merged = LayerNames(["layer1.0", "layer2.0", "penultimate"], {"layer3.0": "penultimate"})  # penultimate = layer3.0
    assert tap_stages(merged, "blocks") == ["layer1", "layer2", "layer3"]
    assert tap_stages(LayerNames(["layer1", "penultimate"], {"layer2": "penultimate"}), "stages") == ["layer1", "layer2"]
    curve = np.exp([2.0, 2.1, 1.0, 0.9, 0.2, -0.3, -0.3])
    order = list(dict.fromkeys(labels))
    stages = pd.DataFrame({"layer": range(7), "value": [float(order.index(s)) for s in labels]}).iloc[::-1]  # any row order
    c = DepthSweep().stage_collapse(list(curve), stages, json.dumps(order))
    assert [p["name"] for p in c.parts] == ["layer1", "layer1-layer2", "layer2", "layer2-layer3", "layer3", "layer3-head"]
    assert c.share("layer1-layer2") == pytest.approx(1.1 / 2.3) and c.share("layer1") == pytest.approx(-0.1 / 2.3)
    assert DepthSweep().stage_collapse(list(curve), stages.iloc[:0], None) is None  # a run that logged no stages
    m = collapse_metrics(c)
    assert m["collapse/share/layer2-layer3"] == pytest.approx(0.7 / 2.3) and m["collapse/slope_per_block/layer3"] == pytest.approx(-0.5)
    assert all(re.fullmatch(r"[\w\-. :/]+", k) for k in m)
