"""The logistic probe (pnc.metrics.probes.fit_logistic) against scikit-learn's LogisticRegression run here, step by
step, on the same standardised features: the validation accuracy of every C, the choice of C (ties to the smaller
C, whatever the grid's order), the refit on all samples, and ``converged``.

The reference fits each C from scratch to a tight tolerance; pnc warm-starts along the grid with tol 1e-4. On
these data no validation sample lies near a decision boundary, so the accuracies agree exactly, and the refitted
probabilities agree to 2e-3."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from pnc.metrics.probes import fit_logistic


def _data(seed: int, n: int, d: int, k: int, spread: float, informative: int):
    """Gaussian classes whose means differ in the first ``informative`` coordinates only (the rest is noise)."""
    rng = np.random.default_rng(seed)
    means = np.zeros((k, d))
    means[:, :informative] = rng.normal(0, spread, (k, informative))
    y = rng.integers(0, k, n)
    x = (means[y] + rng.normal(0, 1, (n, d))) * rng.uniform(0.5, 20, d) + rng.normal(0, 5, d)  # unequal scales, offsets
    is_val = rng.random(n) < 0.4
    return x.astype(np.float32), y, is_val


def _standardised(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    mu, sd = ref.astype(np.float64).mean(0), ref.astype(np.float64).std(0)
    return (x.astype(np.float64) - mu) / np.where(sd > 0, sd, 1.0)


def _reference(x, y, is_val, cs):
    """(validation accuracy per C, chosen C, refitted classifier, its standardisation source) by scikit-learn."""
    xf, yf, xv, yv = x[~is_val], y[~is_val], x[is_val], y[is_val]
    scores = []
    for c in cs:
        clf = LogisticRegression(C=c, max_iter=10_000, tol=1e-10).fit(_standardised(xf, xf), yf)
        scores.append(float((clf.predict(_standardised(xv, xf)) == yv).mean()))
    best = max(scores)
    chosen = min(c for c, s in zip(cs, scores) if s == best)  # ties: the smaller C (stronger regularisation)
    final = LogisticRegression(C=chosen, max_iter=10_000, tol=1e-10).fit(_standardised(x, x), y)
    return scores, chosen, final


def _probe(x, y, is_val, k, cs, **kw):
    return fit_logistic(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(is_val), k, cs=cs, **kw)


def _probabilities(probe, x) -> np.ndarray:
    return torch.softmax(probe.logits(torch.from_numpy(x)), 1).numpy()


def test_c_selection_and_refit_match_scikit_learn() -> None:
    """Few fit samples and many noise coordinates: a small C underfits, a large one overfits, and validation
    accuracy picks one in between, as the reference does; the refit on all samples matches the reference's."""
    x, y, is_val = _data(seed=3, n=200, d=40, k=3, spread=1.2, informative=4)
    cs = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    scores, chosen, final = _reference(x, y, is_val, cs)
    probe = _probe(x, y, is_val, 3, cs)
    assert probe.val_scores == scores
    assert chosen not in (cs[0], cs[-1]), f"the data must make the choice matter: {scores}"
    assert probe.reg == chosen
    assert probe.info == {"n_fit": int((~is_val).sum()), "n_val": int(is_val.sum()), "converged": True}
    ref = final.predict_proba(_standardised(x, x))
    assert np.abs(_probabilities(probe, x) - ref).max() < 2e-3
    assert (probe.predict(torch.from_numpy(x)).numpy() == final.predict(_standardised(x, x))).mean() > 0.99


@pytest.mark.parametrize("cs", [(0.1, 1.0, 10.0, 100.0), (100.0, 10.0, 1.0, 0.1), (1.0, 100.0, 0.1, 10.0)],
                         ids=["ascending", "descending", "shuffled"])
def test_ties_go_to_the_smaller_c_whatever_the_grid_order(cs) -> None:
    """Well-separated classes: every C in the grid classifies the validation part perfectly; the smallest C wins."""
    x, y, is_val = _data(seed=1, n=150, d=6, k=3, spread=12.0, informative=6)
    scores, chosen, final = _reference(x, y, is_val, cs)
    assert scores == [1.0] * len(cs) and chosen == 0.1
    probe = _probe(x, y, is_val, 3, cs)
    assert probe.val_scores == scores and probe.reg == 0.1
    assert np.abs(_probabilities(probe, x) - final.predict_proba(_standardised(x, x))).max() < 2e-3


def test_converged_is_false_when_lbfgs_stops_early() -> None:
    x, y, is_val = _data(seed=3, n=200, d=40, k=3, spread=1.2, informative=4)
    assert _probe(x, y, is_val, 3, (1.0,), max_iter=300).info["converged"] is True
    assert _probe(x, y, is_val, 3, (1.0,), max_iter=2).info["converged"] is False
