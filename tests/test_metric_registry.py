"""The metric registry and the class-statistics metrics it declares beyond CDNV/NC1/NC2 (nc1_tr, equinorm,
equiangle, max_angle, gnc2): independent float64 references written here with plain loops (not pnc.metrics),
known answers on a simplex ETF, invariances, and measure() logging them per layer from the one pass."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metrics_reference as ref
from pnc.metrics import ClassStats, measure
from pnc.metrics.collapse import geometry
from pnc.metrics.geometry import REGISTRY

NEW = ("nc1_tr", "equinorm", "equiangle", "max_angle", "gnc2")
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- references (loops, float64)
def centred_means(X, y, K):
    present, n, mu, var = ref.class_stats(X, y, K)
    mu_g = ref.f64(X).mean(0)  # the sample mean of all N features
    return n, mu - mu_g, var


def ref_nc1_tr(X, y, K):
    n, m, var = centred_means(X, y, K)
    tr_w = sum(n[k] * var[k] for k in range(len(n))) / n.sum()
    tr_b = sum(float(m[k] @ m[k]) for k in range(len(n))) / len(n)
    return tr_w / tr_b


def ref_equinorm(X, y, K):
    _, m, _ = centred_means(X, y, K)
    norms = [math.sqrt(float(m[k] @ m[k])) for k in range(len(m))]
    mean = sum(norms) / len(norms)
    return math.sqrt(sum((x - mean) ** 2 for x in norms) / len(norms)) / mean


def pair_cosines(m):
    out = []
    for i in range(len(m)):
        for j in range(i + 1, len(m)):
            out.append(float(m[i] @ m[j]) / math.sqrt(float(m[i] @ m[i]) * float(m[j] @ m[j])))
    return out


def ref_equiangle(X, y, K):
    c = pair_cosines(centred_means(X, y, K)[1])
    mean = sum(c) / len(c)
    return math.sqrt(sum((x - mean) ** 2 for x in c) / len(c))


def ref_max_angle(X, y, K):
    _, m, _ = centred_means(X, y, K)
    k = len(m)
    c = pair_cosines(m)
    return sum(abs(x + 1.0 / (k - 1)) for x in c) / len(c)


def ref_gnc2(X, y, K):
    _, m, _ = centred_means(X, y, K)
    u = [m[k] / math.sqrt(float(m[k] @ m[k])) for k in range(len(m))]
    vals = [math.log(1.0 / math.sqrt(float((u[i] - u[j]) @ (u[i] - u[j])))) for i in range(len(u)) for j in range(i + 1, len(u))]
    return sum(vals) / len(vals)


REFS = {"nc1_tr": ref_nc1_tr, "equinorm": ref_equinorm, "equiangle": ref_equiangle, "max_angle": ref_max_angle, "gnc2": ref_gnc2}


def summary(X, y, K, batch=29):
    s = ClassStats(K, X.shape[1], scatter=True)
    for i in range(0, len(y), batch):
        s.update(torch.as_tensor(X[i:i + batch]), torch.as_tensor(y[i:i + batch]))
    return s.summary()


def values(X, y, K, batch=29):
    g = geometry(summary(X, y, K, batch))
    return {name: REGISTRY[name].compute(g) for name in NEW}


def data(rng, K=5, D=7, N=300, dtype=np.float64):
    y = rng.integers(0, K, size=N)
    means = rng.standard_normal((K, D)) * 3
    X = means[y] + rng.standard_normal((N, D)) * rng.uniform(0.2, 2.0, size=K)[y][:, None]
    return X.astype(dtype), y


# ----------------------------------------------------------------------------- agreement with the references
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-9), (np.float32, 1e-5)])
def test_new_metrics_match_loop_references(dtype, rtol) -> None:
    rng = np.random.default_rng(0)
    for K, D in ((2, 3), (5, 7), (10, 4)):
        X, y = data(rng, K, D, dtype=dtype)
        got = values(X, y, K)
        for name in NEW:
            if K == 2 and name in ("equiangle", "max_angle"):  # one pair: its std is 0, |cos + 1| is 0 up to rounding
                assert abs(got[name]) < 1e-6, (name, got[name])
                continue
            assert got[name] == pytest.approx(REFS[name](X, y, K), rel=rtol), name


def test_new_metrics_on_collapsed_data_and_imbalanced_classes_with_an_absent_class() -> None:
    rng = np.random.default_rng(3)
    X, y = ref.collapsed_data(rng, K=6, D=12, n_per=(5, 200), offset=1e2, rel_var=1e-8, dtype=np.float64)
    y[y == 5] = 4  # class 5 absent: K = classes present
    got = values(X, y, 6, batch=17)
    for name in NEW:
        assert got[name] == pytest.approx(REFS[name](X, y, 6), rel=1e-9), name


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(3, 6), d=st.integers(3, 8), batch=st.integers(1, 50))
def test_batch_size_does_not_change_the_new_metrics(seed, k, d, batch) -> None:
    rng = np.random.default_rng(seed)
    X, y = data(rng, k, d, N=int(rng.integers(3 * k, 200)))
    if len(np.unique(y)) < 3:
        return
    whole, parts = values(X, y, k, batch=len(y)), values(X, y, k, batch=batch)
    for name in NEW:
        assert parts[name] == pytest.approx(whole[name], rel=1e-9, abs=1e-12), name


# ----------------------------------------------------------------------------- known answers and invariances
@pytest.mark.parametrize("K,D", [(3, 3), (5, 9), (10, 16)])
def test_simplex_etf_known_answers(K, D) -> None:
    rng = np.random.default_rng(K)
    means = ref.simplex_etf(K, D, rng) * 4.0 + rng.standard_normal(D)  # any scale, any offset
    y = np.repeat(np.arange(K), 30)
    X = means[y] + rng.standard_normal((len(y), D)) * 1e-3
    X -= np.stack([X[y == k].mean(0) for k in range(K)])[y] - means[y]  # class means exactly the ETF's
    got = values(X, y, K)
    assert got["equinorm"] == pytest.approx(0.0, abs=1e-9)
    assert got["equiangle"] == pytest.approx(0.0, abs=1e-9)
    assert got["max_angle"] == pytest.approx(0.0, abs=1e-9)
    assert got["gnc2"] == pytest.approx(-0.5 * math.log(2 * K / (K - 1)), rel=1e-9)  # ||u_k - u_k'||^2 = 2K/(K-1)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(1e-3, 1e3), shift=st.floats(-1e2, 1e2))
def test_new_metrics_are_rotation_translation_and_scale_invariant(seed, scale, shift) -> None:
    rng = np.random.default_rng(seed)
    X, y = data(rng, 5, 6)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    base, moved = values(X, y, 5), values(scale * X @ q + shift, y, 5)
    for name in NEW:
        assert moved[name] == pytest.approx(base[name], rel=1e-7, abs=1e-10), name


def test_coinciding_directions_warn() -> None:
    X = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [2.0, 0.0], [-3.0, 0.0], [-3.0, 0.0]])
    y = np.array([0, 0, 1, 1, 2, 2])  # m_0 and m_1 point the same way from mu_G = 0
    with pytest.warns(Warning, match="GNC2"):
        assert values(X, y, 3)["gnc2"] == math.inf


# ----------------------------------------------------------------------------- the registry drives the rest
def test_measure_logs_every_selected_registry_metric_per_layer() -> None:
    rng = np.random.default_rng(1)
    X, y = data(rng, 4, 5, N=120)
    feats = {"a": torch.as_tensor(X), "b": torch.as_tensor(X[:, :3] ** 2)}
    batches = [(torch.arange(i, min(i + 32, 120)), torch.as_tensor(y[i:i + 32]), torch.arange(i, min(i + 32, 120)))
               for i in range(0, 120, 32)]

    def extract(idx):
        return {k: v[idx] for k, v in feats.items()}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = measure(extract, batches, num_classes=4, metrics=("cdnv", *NEW), probe=None, progress=False).metrics
    assert sorted(out) == sorted(["cdnv/train", *(f"{n}/train" for n in NEW)])
    for name in NEW:
        assert len(out[f"{name}/train"]) == 2
        assert out[f"{name}/train"][0] == pytest.approx(REFS[name](X, y, 4), rel=1e-9)
        assert out[f"{name}/train"][1] == pytest.approx(REFS[name](X[:, :3] ** 2, y, 4), rel=1e-9)


def test_spec_choices_defaults_and_schema_come_from_the_registry() -> None:
    import json

    from pnc.spec import MeasureSpec

    assert tuple(MeasureSpec().metrics) == REGISTRY.defaults() == ("cdnv", "nc1", "nc2", "ncc", "probe")
    schema = json.loads((ROOT / "pnc/schema/study.schema.json").read_text())
    enum = schema["$defs"]["MeasureSpec"]["properties"]["metrics"]["items"]["enum"]
    assert tuple(enum) == REGISTRY.selectable()
    assert set(NEW) <= set(enum) and "mem_ratio" not in enum  # derived metrics are not chosen


def test_figures_log_axis_follows_the_registry() -> None:
    from pnc.figures import log_axis

    for m in REGISTRY:
        assert log_axis(f"{m.key}/train") == m.log_axis, m.name
    assert not log_axis("train/loss")


def test_registering_twice_or_with_an_unknown_family_fails() -> None:
    from pnc.metrics.registry import Metric, Registry

    r = Registry()
    m = Metric("x", "variability", "x", "lower", False, frozenset({"class_stats"}), "d", "s")
    r.add(m)
    with pytest.raises(ValueError, match="declared twice"):
        r.add(m)
    with pytest.raises(ValueError, match="unknown family"):
        r.add(Metric("y", "nope", "y", "lower", False, frozenset(), "d", "s"))


# ----------------------------------------------------------------------------- the classifier metrics (NC3, UNC3, NC4)
def ref_nc3(X, y, K, W):
    present, _, _, _ = ref.class_stats(X, y, K)
    _, m, _ = centred_means(X, y, K)
    w = ref.f64(W)[present]
    wn = math.sqrt(sum(float(r @ r) for r in w))
    mn = math.sqrt(sum(float(r @ r) for r in m))
    return math.sqrt(sum(float(((w[k] / wn - m[k] / mn) ** 2).sum()) for k in range(len(m))))


def ref_unc3(X, y, K, W):
    present, _, _, _ = ref.class_stats(X, y, K)
    _, m, _ = centred_means(X, y, K)
    w = ref.f64(W)[present]
    c = [float(w[k] @ m[k]) / math.sqrt(float(w[k] @ w[k]) * float(m[k] @ m[k])) for k in range(len(m))]
    mean = sum(c) / len(c)
    return math.sqrt(sum((x - mean) ** 2 for x in c) / len(c)) / mean


def test_nc3_and_unc3_match_loop_references() -> None:
    rng = np.random.default_rng(4)
    X, y = data(rng, 5, 6)
    _, m, _ = centred_means(X, y, 5)
    W = m + 0.3 * rng.standard_normal(m.shape)  # a classifier near self-duality
    g = geometry(summary(X, y, 5), (torch.as_tensor(W), torch.zeros(5)))
    assert REGISTRY["nc3"].compute(g) == pytest.approx(ref_nc3(X, y, 5, W), rel=1e-9)
    assert REGISTRY["unc3"].compute(g) == pytest.approx(ref_unc3(X, y, 5, W), rel=1e-9)
    with pytest.warns(Warning, match="needs the layer's classifier"):
        assert math.isnan(REGISTRY["nc3"].compute(geometry(summary(X, y, 5))))


def etf_world(K=4, D=6, per=25, spread=1e-3, seed=0):
    rng = np.random.default_rng(seed)
    means = ref.simplex_etf(K, D, rng) * 3.0 + rng.standard_normal(D)
    y = np.repeat(np.arange(K), per)
    X = means[y] + rng.standard_normal((len(y), D)) * spread
    X -= np.stack([X[y == k].mean(0) for k in range(K)])[y] - means[y]
    mu_g = X.mean(0)
    W = means - mu_g  # W = M^T (rows m_k), b = -W mu_G
    return X, y, W, -W @ mu_g


def test_simplex_etf_with_a_self_dual_classifier_gives_nc3_unc3_zero_and_nc4_one() -> None:
    X, y, W, b = etf_world()
    g = geometry(summary(X, y, 4), (torch.as_tensor(W), torch.as_tensor(b)))
    assert REGISTRY["nc3"].compute(g) == pytest.approx(0.0, abs=1e-9)
    assert REGISTRY["unc3"].compute(g) == pytest.approx(0.0, abs=1e-9)
    feats = {"h": torch.as_tensor(X)}
    batches = [(torch.arange(i, min(i + 30, len(y))), torch.as_tensor(y[i:i + 30]), torch.arange(i, min(i + 30, len(y))))
               for i in range(0, len(y), 30)]
    out = measure(lambda idx: {k: v[idx] for k, v in feats.items()}, batches, {"test": batches}, num_classes=4,
                  metrics=("nc3", "unc3", "nc4"), probe=None, progress=False,
                  classifiers={"h": (torch.as_tensor(W), torch.as_tensor(b))})
    assert out.metrics["nc3/train"][0] == pytest.approx(0.0, abs=1e-9)
    assert out.metrics["nc4/test"] == [1.0] and out.info["classifier"] == ["given"]


def test_nc4_counts_disagreements_with_the_nearest_class_mean() -> None:
    """A classifier that maps class 0's region to class 1: NC4 = the share of samples outside class 0."""
    X, y, W, b = etf_world(K=3, D=5, per=20)
    W2, b2 = W.copy(), b.copy()
    W2[0], b2[0] = W[1], b[1] - 1.0  # class 0's logit is class 1's minus 1: never the argmax
    feats = {"h": torch.as_tensor(X)}
    batches = [(torch.arange(len(y)), torch.as_tensor(y), torch.arange(len(y)))]
    out = measure(lambda idx: {k: v[idx] for k, v in feats.items()}, batches, {"test": batches}, num_classes=3,
                  metrics=("nc4",), probe=None, progress=False, classifiers={"h": (torch.as_tensor(W2), torch.as_tensor(b2))})
    assert out.metrics["nc4/test"] == [pytest.approx(40 / 60)]


def test_probe_in_feature_space_is_the_probe_and_feeds_nc3() -> None:
    rng = np.random.default_rng(2)
    X, y = data(rng, 4, 5, N=200)
    feats = {"a": torch.as_tensor(X)}
    batches = [(torch.arange(i, min(i + 50, 200)), torch.as_tensor(y[i:i + 50]), torch.arange(i, min(i + 50, 200)))
               for i in range(0, 200, 50)]
    out = measure(lambda idx: {k: v[idx] for k, v in feats.items()}, batches, {"test": batches}, num_classes=4,
                  metrics=("nc3", "nc4", "probe"), probe="ridge", progress=False)
    assert out.info["classifier"] == ["ridge"] and 0.0 < out.metrics["nc3/train"][0] < 2.0
    assert 0.0 <= out.metrics["nc4/test"][0] <= 1.0
