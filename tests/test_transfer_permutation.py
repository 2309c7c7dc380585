"""The transfer correlation's permutation p-value (docs/metrics.md, "Transfer correlation"): the pooled rho's
two-sided p from shuffling the models' probe accuracies within each (source, target) group.

Checked against a brute force written here (every assignment of probe curves to models, the pooled
within-target Spearman rho from scipy's ranks, no pnc code), exactly where pnc enumerates and within binomial
error where it samples, and for uniformity under a null with strong source effects (which a permutation across
sources would call significant)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kstest, rankdata

from pnc.analysis import transfer_correlation

DOMAINS = ("A", "B", "C")


def frame(cdnv: dict, acc: dict) -> pd.DataFrame:
    """transfer_correlation's input from {(model, source, target): per-layer values}."""
    rows = [{"model": m, "source": s, "target": t, "layer": layer, "cdnv": c, "probe_acc": a}
            for (m, s, t), cs in cdnv.items() for layer, (c, a) in enumerate(zip(cs, acc[(m, s, t)]))]
    return pd.DataFrame(rows)


def random_study(rng, models, layers=3, source_effect=0.0, ties=False, domains=DOMAINS):
    cdnv, acc = {}, {}
    for s in domains:
        for t in domains:
            shift = rng.normal(0, 1)  # a (source, target) level shared by x and y: no within-group association
            for m in models:
                c = np.exp(rng.normal(0, 1, layers) - source_effect * shift)
                a = rng.normal(0, 1, layers) + source_effect * shift
                if ties:
                    c, a = np.round(c, 1) + 0.1, np.round(a)
                cdnv[(m, s, t)], acc[(m, s, t)] = c, a
    return cdnv, acc


def targets_of(cdnv: dict) -> list[str]:
    return sorted({k[2] for k in cdnv})


def pooled_rho(cdnv: dict, acc: dict) -> np.ndarray:
    """Pooled Spearman per layer: average ranks of -CDNV and probe accuracy within each target (off-domain points),
    centred, pooled; rho = sum rx ry / sqrt(sum rx^2 sum ry^2)."""
    num = sx = sy = 0.0
    for t in targets_of(cdnv):
        keys = [k for k in cdnv if k[2] == t and k[1] != t]
        x = rankdata(-np.array([cdnv[k] for k in keys]), axis=0)  # (points, layers)
        y = rankdata(np.array([acc[k] for k in keys]), axis=0)
        x, y = x - x.mean(0), y - y.mean(0)
        num, sx, sy = num + (x * y).sum(0), sx + (x * x).sum(0), sy + (y * y).sum(0)
    return num / np.sqrt(sx * sy)


def brute_force_p(cdnv: dict, acc: dict) -> list[float]:
    """Exact two-sided p per layer: every assignment of each (source, target) group's probe curves to its models."""
    models = sorted({k[0] for k in cdnv})
    groups = [(s, t) for t in targets_of(cdnv) for s in targets_of(cdnv) if s != t]
    obs = pooled_rho(cdnv, acc)
    hits, total = np.zeros(len(obs)), 0
    for choice in itertools.product(*[list(itertools.permutations(models)) for _ in groups]):
        perm_acc = dict(acc)
        for (s, t), order in zip(groups, choice):
            for m, m2 in zip(models, order):
                perm_acc[(m, s, t)] = acc[(m2, s, t)]
        total += 1
        hits += np.abs(pooled_rho(cdnv, perm_acc)) >= np.abs(obs) - 1e-12
    return list(hits / total)


@pytest.mark.parametrize("ties", [False, True])
def test_exact_p_equals_brute_force_enumeration(ties: bool) -> None:
    """Two models per group, six off-domain groups: 2^6 = 64 assignments, fewer than n_perm: pnc enumerates them."""
    rng = np.random.default_rng(3 + ties)
    cdnv, acc = random_study(rng, ["m1", "m2"], layers=3, ties=ties)
    r = transfer_correlation(frame(cdnv, acc), n_boot=0)
    got = [row["p"] for row in r.pooled]
    assert [row["rho"] for row in r.pooled] == pytest.approx(list(pooled_rho(cdnv, acc)))
    assert got == pytest.approx(brute_force_p(cdnv, acc), abs=1e-12)
    assert all(row["p_note"] == "" for row in r.pooled)
    assert min(got) < 1.0, "the case must discriminate"


def test_sampled_p_is_within_binomial_error_of_the_exact_one() -> None:
    """Four domains, two models: 2^12 = 4096 assignments, more than n_perm = 1000: sampled, p = (1 + hits) / 1001."""
    rng = np.random.default_rng(11)
    cdnv, acc = random_study(rng, ["m1", "m2"], layers=2, domains=("A", "B", "C", "D"))
    for key in cdnv:  # a planted within-group association on layer 1, none on layer 0
        acc[key][1] = -math.log(cdnv[key][1]) + rng.normal(0, 1.0)
    r = transfer_correlation(frame(cdnv, acc), n_boot=0, n_perm=1000)
    exact = brute_force_p(cdnv, acc)
    for row, p in zip(r.pooled, exact):
        assert abs(row["p"] - p) <= 4 * math.sqrt(p * (1 - p) / 1000) + 1 / 1000, (row["p"], p)
    assert exact[1] < 0.05 < exact[0], exact


def test_p_is_uniform_under_the_null_even_with_source_effects() -> None:
    """No association between a model's CDNV and its probe accuracy within a (source, target) group, but a shared
    per-group level that makes sources differ a lot (rho across sources is strong): the p-values are uniform
    (P(p <= a) <= a, and a KS test), so the source effect is not taken for evidence."""
    rng = np.random.default_rng(0)
    ps, rhos = [], []
    for _ in range(150):
        cdnv, acc = random_study(rng, ["m1", "m2", "m3"], layers=4, source_effect=3.0)
        r = transfer_correlation(frame(cdnv, acc), n_boot=0, n_perm=199)
        ps += [row["p"] for row in r.pooled]
        rhos += [row["rho"] for row in r.pooled]
    ps = np.array(ps)
    assert np.mean(rhos) > 0.5, "the source effect alone makes the pooled rho large"
    for a in (0.05, 0.1, 0.25, 0.5):
        assert np.mean(ps <= a) <= a + 3 * math.sqrt(a * (1 - a) / len(ps)), (a, np.mean(ps <= a))
    assert np.mean(ps <= 0.5) > 0.4
    assert kstest(ps, "uniform").pvalue > 1e-3


def test_one_model_per_source_has_no_p_and_says_why() -> None:
    rng = np.random.default_rng(2)
    cdnv, acc = random_study(rng, ["m1"], layers=2)
    r = transfer_correlation(frame(cdnv, acc), n_boot=0)
    assert all(math.isnan(row["p"]) and row["p_note"] == "one model per source: nothing to permute" for row in r.pooled)
    assert all(not math.isnan(row["rho"]) for row in r.pooled)
    assert "transfer/spearman_p" not in r.curves()
    cdnv, acc = random_study(rng, ["m1", "m2"], layers=2)
    assert all(math.isnan(row["p"]) for row in transfer_correlation(frame(cdnv, acc), n_boot=0, n_perm=0).pooled)


def test_report_and_parent_run_show_the_same_p(monkeypatch, tmp_path) -> None:
    """The report's "permutation p" column, the parent run's curve, metric and tag: one computation."""
    from types import SimpleNamespace

    import pnc.figures as figures
    import pnc.frames as frames
    import pnc.report as report
    from pnc.kinds.transfer import KIND

    rng = np.random.default_rng(4)
    cdnv, acc = random_study(rng, ["m1", "m2"], layers=3)
    rows = [{"run_id": f"{m}-{s}-{t}", "cell": "", "model": m, "depth": 0, "noise": "clean", "noise_kind": "clean",
             "noise_level": "0", "source": s, "target": t, "metric": key, "layer": layer, "rel_depth": layer / 2, "value": float(v)}
            for (m, s, t), cs in cdnv.items() for key, vals in (("cdnv/target", cs), ("probe_acc/target_test", acc[(m, s, t)]))
            for layer, v in enumerate(vals)]
    monkeypatch.setattr(frames, "layer_frame", lambda *a, **k: pd.DataFrame(rows))
    monkeypatch.setattr(figures, "save", lambda chart, folder, stem: chart.to_dict() and [])
    spec = SimpleNamespace(name="tr", kind="domain_transfer", experiment="tr", description="", train=SimpleNamespace(seed=0),
                           transfer=SimpleNamespace(sources=list(DOMAINS), targets=list(DOMAINS)),
                           measure=SimpleNamespace(metrics=["cdnv", "nc1", "nc2", "ncc", "probe"], epochs=[]))
    summary = report.study_summary(spec)
    logged = summary["details"]["transfer_correlation"]["transfer/spearman_p"]
    assert logged == pytest.approx(brute_force_p(cdnv, acc), abs=1e-12)
    assert summary["metrics"]["transfer/spearman_final_layer_p"] == logged[-1]
    assert summary["tags"]["pnc.transfer_correlation"].endswith(f"permutation p {logged[-1]:.3g}")
    KIND.report(spec, tmp_path, None)
    csv = pd.read_csv(tmp_path / "correlation.csv")
    pooled = csv[csv.target.str.startswith("pooled")].sort_values("step")
    np.testing.assert_array_equal(pooled["permutation p"].to_numpy(), np.array(logged))
    assert csv[~csv.target.str.startswith("pooled")]["permutation p"].isna().all(), "p is the pooled rho's only"
