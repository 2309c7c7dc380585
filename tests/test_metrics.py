"""Streaming statistics and collapse metrics against an independent float64 two-pass reference."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metrics_reference as ref
from pnc.metrics import (
    ClassStats,
    MetricWarning,
    cdnv,
    cdnv_matrix,
    class_summary,
    collapse_metrics,
    memorization_layers,
    memorization_ratio,
    nc1,
    nc2,
    ncc_accuracy,
)

RTOL = 1e-6


def rel_close(a, b, rtol=RTOL, atol=0.0):
    a, b = float(a), float(b)
    return abs(a - b) <= max(rtol * max(abs(a), abs(b)), atol, 1e-300)


def random_data(rng, K=5, D=7, N=400, absent=(), scale=1.0, dtype=np.float64):
    y = rng.integers(0, K, size=N)
    for k in absent:
        y[y == k] = (k + 1) % K
    means = rng.standard_normal((K, D)) * 3
    X = means[y] + rng.standard_normal((N, D)) * rng.uniform(0.2, 2.0, size=K)[y][:, None]
    return (X * scale).astype(dtype), y


def summary_of(X, y, K, batch=37, scatter=True):
    st_ = ClassStats(K, X.shape[1], scatter=scatter)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    for i in range(0, len(y), batch):
        st_.update(Xt[i:i + batch], yt[i:i + batch])
    return st_.summary()


def check_against_reference(s, X, y, K, rtol=RTOL):
    present, n, mu, var = ref.class_stats(X, y, K)
    assert s.count[present].tolist() == n.astype(int).tolist()
    assert int(s.count.sum()) == len(y)
    np.testing.assert_allclose(s.mean[present].numpy(), mu, rtol=rtol, atol=rtol * np.abs(mu).max())
    np.testing.assert_allclose(s.variances()[present].numpy(), var, rtol=rtol)
    assert (s.sq_dist >= 0).all()
    if s.scatter is not None:
        sw = ref.within_scatter(X, y, K)
        np.testing.assert_allclose(s.scatter.numpy(), sw, rtol=rtol, atol=rtol * np.abs(sw).max())
    assert rel_close(cdnv(s), ref.cdnv(X, y, K), rtol)
    assert rel_close(nc1(s), ref.nc1(X, y, K), rtol)
    assert rel_close(nc2(s), ref.nc2(X, y, K), rtol, atol=1e-12)  # NC2 is O(1); 0 for K = 2 balanced


# ----------------------------------------------------------------------------- reference agreement
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_random_data_matches_reference(dtype):
    rng = np.random.default_rng(1)
    X, y = random_data(rng, dtype=dtype)
    s = summary_of(X, y, 5)
    check_against_reference(s, X, y, 5)


def test_bfloat16_features_are_accepted():
    rng = np.random.default_rng(2)
    X, y = random_data(rng)
    xb = torch.as_tensor(X).to(torch.bfloat16)
    s = class_summary(xb, y, 5)
    check_against_reference(s, xb.to(torch.float64).numpy(), y, 5)


@pytest.mark.parametrize("offset,rel_var", [(0.0, 1e-8), (1e2, 1e-8), (1e3, 1e-8), (1e4, 1e-12)])
def test_collapsed_regime_float32_with_offset(offset, rel_var):
    rng = np.random.default_rng(3)
    X, y = ref.collapsed_data(rng, offset=offset, rel_var=rel_var)
    assert X.dtype == np.float32
    s = summary_of(X, y, 5, batch=29)
    check_against_reference(s, X, y, 5)
    assert 0 < cdnv(s) < 1e-2


def test_collapsed_data_defeats_naive_float32_moments():
    """The adversarial data is really adversarial: the naive E[h^2]-E[h]^2 in float32 is off."""
    rng = np.random.default_rng(3)
    X, y = ref.collapsed_data(rng, offset=1e2, rel_var=1e-8)
    _, _, _, var = ref.class_stats(X, y, 5)
    naive = ref.naive_float32_variances(X, y, 5)
    assert np.max(np.abs(naive - var) / var) > 1e-2
    s = summary_of(X, y, 5)
    np.testing.assert_allclose(s.variances().numpy(), var, rtol=1e-9)


def test_absent_classes_are_excluded():
    rng = np.random.default_rng(4)
    X, y = random_data(rng, K=6, absent=(2, 5))
    s = summary_of(X, y, 6)
    assert s.count[2] == 0 and s.count[5] == 0
    assert torch.isnan(s.variances()[2])
    check_against_reference(s, X, y, 6)  # the reference only knows the present classes


def test_undefined_metrics_warn_and_return_nan():
    X = np.random.default_rng(5).standard_normal((20, 3))
    y = np.zeros(20, dtype=int)
    s = summary_of(X, y, 4)
    for fn in (cdnv, nc1, nc2):
        with pytest.warns(MetricWarning):
            assert math.isnan(fn(s))


def test_cdnv_matrix_off_diagonal_mean_is_cdnv():
    rng = np.random.default_rng(20)
    X, y = random_data(rng, K=5, absent=(1,))
    s = summary_of(X, y, 5)
    m = cdnv_matrix(s).numpy()
    assert np.isnan(np.diag(m)).all() and np.isnan(m[1]).all() and np.isnan(m[:, 1]).all()
    np.testing.assert_allclose(m, m.T)
    off = m[~np.isnan(m)]
    assert off.size == 4 * 3
    assert rel_close(off.mean(), cdnv(s), 1e-12)


def test_identical_class_means_give_inf_cdnv_with_warning():
    X = np.array([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0], [-1.0, 0.0]])
    y = np.array([0, 0, 1, 1])
    s = summary_of(X, y, 2)
    with pytest.warns(MetricWarning):
        assert cdnv(s) == math.inf


def test_labels_out_of_range_raise():
    st_ = ClassStats(3, 2)
    with pytest.raises(ValueError, match="num_classes"):
        st_.update(torch.zeros(2, 2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="num_classes"):
        st_.update(torch.zeros(2, 2), torch.tensor([-1, 0]))


def test_mask_drops_padded_rows():
    rng = np.random.default_rng(6)
    X, y = random_data(rng, N=100)
    Xp = np.concatenate([X, X[:13]])
    yp = np.concatenate([y, y[:13]])
    mask = torch.ones(len(yp), dtype=torch.bool)
    mask[100:] = False
    st_ = ClassStats(5, X.shape[1], scatter=True)
    st_.update(torch.as_tensor(Xp), torch.as_tensor(yp), mask=mask)
    check_against_reference(st_.summary(), X, y, 5)


@pytest.mark.parametrize("dense_parts", [False, True])
def test_multiple_label_vectors_and_parts(dense_parts, monkeypatch):
    import pnc.metrics.stats as stats_mod

    monkeypatch.setattr(stats_mod, "_DENSE_PARTS_ON_CPU", dense_parts)  # the CUDA code path, on the CPU
    rng = np.random.default_rng(7)
    X, y0 = random_data(rng, N=300)
    y1 = rng.integers(0, 5, size=300)
    part = rng.integers(0, 2, size=300)
    st_ = ClassStats(5, X.shape[1], num_labelings=2, num_parts=2, scatter=[False, True])
    for i in range(0, 300, 41):
        sl = slice(i, i + 41)
        st_.update(torch.as_tensor(X[sl]), torch.as_tensor(np.stack([y0[sl], y1[sl]], 1)), torch.as_tensor(part[sl]))
    assert st_.summary(0).scatter is None
    check_against_reference(st_.summary(1), X, y1, 5)
    for p in (0, 1):
        m = part == p
        check_against_reference(st_.summary(1, part=p), X[m], y1[m], 5)
        present, n, mu, var = ref.class_stats(X[m], y0[m], 5)
        np.testing.assert_allclose(st_.summary(0, part=p).variances()[present].numpy(), var, rtol=1e-9)


def test_many_classes_sparse_corrections():
    rng = np.random.default_rng(8)
    X, y = random_data(rng, K=100, D=5, N=1500)
    s = summary_of(X, y, 100, batch=64)
    check_against_reference(s, X, y, 100)


# ----------------------------------------------------------------------------- known answers
def test_simplex_etf_gives_zero():
    rng = np.random.default_rng(9)
    K, D = 5, 9
    M = ref.simplex_etf(K, D, rng) * 7.0 + 3.0  # scaled and translated ETF
    y = np.repeat(np.arange(K), 30)
    m = collapse_metrics(M[y], y, K)
    assert abs(m["cdnv"]) < 1e-20
    assert abs(m["nc1"]) < 1e-12
    assert abs(m["nc2"]) < 1e-12


def test_non_etf_geometry_is_not_zero():
    y = np.repeat(np.arange(3), 10)
    M = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])  # collinear means: not an ETF
    assert collapse_metrics(M[y], y, 3)["nc2"] > 0.1


def test_invariance_rotation_translation_scaling():
    rng = np.random.default_rng(10)
    X, y = random_data(rng, K=4, D=6, N=300)
    Q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    Z = 3.7 * X @ Q + rng.standard_normal(6) * 50
    a, b = collapse_metrics(X, y, 4), collapse_metrics(Z, y, 4)
    for k in ("cdnv", "nc1", "nc2"):
        assert rel_close(a[k], b[k], 1e-9), k
    # a non-uniform scaling does change CDNV (the test can fail)
    W = X * np.array([1, 1, 1, 10, 10, 10.0])
    assert not rel_close(collapse_metrics(W, y, 4)["cdnv"], a["cdnv"], 1e-3)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 8), extra=st.integers(0, 6),
       scale=st.floats(1e-3, 1e3), shift=st.floats(-1e4, 1e4), per=st.integers(1, 20))
def test_property_any_simplex_etf_gives_zero(seed, k, extra, scale, shift, per):
    """Collapsed features on a simplex ETF (any K, D >= K, scale, translation, class size): NC2 = 0, CDNV = 0."""
    rng = np.random.default_rng(seed)
    M = ref.simplex_etf(k, k + extra, rng) * scale + shift
    y = np.repeat(np.arange(k), per)
    m = collapse_metrics(M[y], y, k)
    # exact up to the rounding of the inputs themselves: eps * |shift| / scale relative to the means' spread
    rel = np.finfo(np.float64).eps * (1.0 + abs(shift) / scale)
    assert abs(m["nc2"]) < 1e-10 + 100 * rel and m["cdnv"] < 1e-18 + 100 * rel**2, (m, rel)
    if k == 2:  # any two distinct means form a 2-class simplex ETF: nothing to break
        return
    # a perturbed mean breaks the ETF: NC2 grows (so the check above can fail)
    M2 = M.copy()
    M2[0] += scale * 0.5 * rng.standard_normal(M.shape[1])
    assert collapse_metrics(M2[y], y, k)["nc2"] > 1e-4


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 6), d=st.integers(2, 10),
       scale=st.floats(1e-2, 1e2), shift=st.floats(-1e3, 1e3))
def test_property_rotation_translation_scaling_invariance(seed, k, d, scale, shift):
    rng = np.random.default_rng(seed)
    X, y = random_data(rng, K=k, D=d, N=40 * k)
    if len(np.unique(y)) < 2:
        return
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    Z = scale * X @ Q + shift * rng.standard_normal(d)
    a, b = collapse_metrics(X, y, k), collapse_metrics(Z, y, k)
    rel = np.finfo(np.float64).eps * (1.0 + abs(shift) / scale)  # rounding of the transformed inputs
    for key in ("cdnv", "nc1", "nc2"):
        assert rel_close(a[key], b[key], 1e-9 + 1e4 * rel, atol=1e-12 + 100 * rel), (key, a[key], b[key])


def test_cdnv_is_not_squared_again():
    """Doubling all features leaves CDNV unchanged (eq. 7 read literally would scale it by 4)."""
    rng = np.random.default_rng(11)
    X, y = random_data(rng)
    assert rel_close(collapse_metrics(2 * X, y, 5)["cdnv"], collapse_metrics(X, y, 5)["cdnv"], 1e-12)


def test_two_gaussians_cdnv_tends_to_D_over_d2():
    rng = np.random.default_rng(12)
    D, d, n = 20, 5.0, 20000
    mu1 = np.zeros(D)
    mu2 = np.zeros(D)
    mu2[0] = d
    X = np.concatenate([rng.standard_normal((n, D)) + mu1, rng.standard_normal((n, D)) + mu2])
    y = np.repeat([0, 1], n)
    got = collapse_metrics(X, y, 2)["cdnv"]
    assert abs(got - D / d**2) < 0.02 * D / d**2
    assert rel_close(got, ref.cdnv(X, y, 2), 1e-9)


def test_nc1_uses_sample_mean_and_one_over_K():
    """Imbalanced classes: mu_G is the sample mean (not the mean of class means)."""
    rng = np.random.default_rng(13)
    K = 3
    y = np.repeat(np.arange(K), [200, 50, 10])
    X = np.eye(4)[:K][y] * 4 + rng.standard_normal((len(y), 4)) * 0.5
    got = collapse_metrics(X, y, K)
    assert rel_close(got["nc1"], ref.nc1(X, y, K), 1e-9)
    assert rel_close(got["nc2"], ref.nc2(X, y, K), 1e-9)
    # the class-balanced variant gives a different number on imbalanced data
    present, n, mu, _ = ref.class_stats(X, y, K)
    mc = mu - mu.mean(0)
    G = mc @ mc.T
    etf = (np.eye(K) - 1 / K) / np.sqrt(K - 1)
    balanced = np.linalg.norm(G / np.linalg.norm(G) - etf)
    assert abs(balanced - got["nc2"]) > 1e-3


def test_memorization_ratio_and_layers():
    r = memorization_ratio([0.5, 1.0, 3.0, 2.0], [1.0, 2.0, 1.0, 2.0])
    assert r == [0.5, 0.5, 3.0, 1.0]
    assert memorization_layers(r) == [2]
    assert memorization_layers([0.1, float("nan"), 1.5, 1.2]) == [2, 3]
    assert memorization_layers([1.0 + 2.3e-16, 1.0 - 1e-16, 1.0 + 1e-6]) == [2], "rounding of equal statistics is not memorization"
    with pytest.warns(MetricWarning):
        assert memorization_ratio([1.0], [0.0]) == [math.inf]


def test_ncc_accuracy_matches_reference_with_absent_train_class():
    rng = np.random.default_rng(14)
    X, y = random_data(rng, K=5, N=300, absent=(3,))
    Xt, yt = random_data(np.random.default_rng(15), K=5, N=200)
    Xt = Xt + 0.1
    got = ncc_accuracy(X, y, Xt, yt, 5)
    assert got == pytest.approx(ref.ncc_accuracy(X, y, 5, Xt, yt), abs=0)
    assert 0.2 < got < 1.0
    # samples of class 3 (absent from the reference) can never be right
    m = yt == 3
    assert ncc_accuracy(X, y, Xt[m], yt[m], 5) == 0.0


def test_ncc_large_offset_float32():
    rng = np.random.default_rng(16)
    X, y = ref.collapsed_data(rng, offset=1e3, rel_var=1e-9)
    Xt, yt = ref.collapsed_data(np.random.default_rng(16), offset=1e3, rel_var=1e-9)
    assert ncc_accuracy(X, y, Xt, yt, 5) == ref.ncc_accuracy(X, y, 5, Xt, yt) == 1.0


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(17)
    X, y = random_data(rng)
    a = collapse_metrics(X, y, 5)
    b = collapse_metrics(torch.as_tensor(X), torch.as_tensor(y), 5)
    assert a == b


def test_nc1_cap_warns():
    rng = np.random.default_rng(18)
    X, y = random_data(rng, D=12)
    with pytest.warns(MetricWarning, match="nc1_dim_cap"):
        m = collapse_metrics(X, y, 5, nc1_dim_cap=8)
    assert math.isnan(m["nc1"]) and not math.isnan(m["cdnv"])


# ----------------------------------------------------------------------------- merge invariance
def _accumulate(X, y, K, cuts, order):
    """Batches [cuts[i], cuts[i+1]) visited in the given order."""
    st_ = ClassStats(K, X.shape[1], scatter=True)
    chunks = list(zip(cuts[:-1], cuts[1:]))
    assert sorted(order) == list(range(len(chunks)))
    for j in order:
        a, b = chunks[j]
        st_.update(torch.as_tensor(X[a:b]), torch.as_tensor(y[a:b]))
    return st_


def _assert_same(s1, s2, rtol=1e-10):
    assert torch.equal(s1.count, s2.count)
    scale = float(s1.mean.abs().max()) or 1.0
    assert torch.allclose(s1.mean, s2.mean, rtol=rtol, atol=rtol * scale)
    assert torch.allclose(s1.sq_dist, s2.sq_dist, rtol=rtol, atol=0)
    sscale = float(s1.scatter.abs().max()) or 1.0
    assert torch.allclose(s1.scatter, s2.scatter, rtol=rtol, atol=rtol * sscale)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 120),
    d=st.integers(1, 6),
    k=st.integers(2, 5),
    n_cuts=st.integers(0, 12),
    n_shards=st.integers(1, 4),
    collapsed=st.booleans(),
)
def test_batch_order_and_shard_invariance(seed, n, d, k, n_cuts, n_shards, collapsed):
    rng = np.random.default_rng(seed)
    if collapsed:
        X, y = ref.collapsed_data(rng, K=k, D=d, n_per=(1, max(2, n // k + 1)), offset=1e2, rel_var=1e-8)
    else:
        X, y = random_data(rng, K=k, D=d, N=n)
    n = len(y)
    whole = ClassStats(k, d, scatter=True)
    whole.update(torch.as_tensor(X), torch.as_tensor(y))
    ref_s = whole.summary()
    # random batch boundaries, visited in a random order
    cuts = sorted({0, n, *rng.integers(0, n + 1, size=n_cuts).tolist()})
    order = rng.permutation(len(cuts) - 1).tolist()
    _assert_same(ref_s, _accumulate(X, y, k, cuts, order).summary())
    # shards accumulated separately (unequal, possibly empty), merged in a random order
    bounds = sorted({0, n, *rng.integers(0, n + 1, size=n_shards - 1).tolist()})
    shards = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        s = ClassStats(k, d, scatter=True)
        for i in range(a, b, 5):
            s.update(torch.as_tensor(X[i:min(b, i + 5)]), torch.as_tensor(y[i:min(b, i + 5)]))
        shards.append(s)
    shards.append(ClassStats(k, d, scatter=True))  # an empty shard
    rng.shuffle(shards)
    merged = shards[0]
    for s in shards[1:]:
        merged.merge_(s)
    _assert_same(ref_s, merged.summary())
    # and both agree with the two-pass reference
    present, cnt, mu, var = ref.class_stats(X, y, k)
    np.testing.assert_allclose(merged.summary().variances()[present].numpy(), var, rtol=1e-8, atol=1e-300)
    assert (merged.sq_dist >= 0).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 6), d=st.integers(2, 8))
def test_metrics_match_reference_property(seed, k, d):
    rng = np.random.default_rng(seed)
    X, y = random_data(rng, K=k, D=d, N=int(rng.integers(k + 2, 150)))
    if len(np.unique(y)) < 2:
        return
    s = summary_of(X, y, k, batch=int(rng.integers(1, 40)))
    check_against_reference(s, X, y, k)


def test_no_warning_on_regular_data():
    rng = np.random.default_rng(19)
    X, y = random_data(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collapse_metrics(X, y, 5)
