"""The metric registry and the class-statistics metrics it declares beyond CDNV/NC1/NC2 (nc1_tr, equinorm,
equiangle, max_angle, gnc2): independent float64 references written here with plain loops (not pnc.metrics),
known answers on a simplex ETF, invariances, and measure() logging them per layer from the one pass."""
from __future__ import annotations

import json
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


# ----------------------------------------------------------------------------- cdnv_matrix (a matrix metric: an artifact)
def ref_cdnv_matrix(X, y, K):
    """K x K pairwise CDNV with plain loops over all K classes: NaN on the diagonal and for absent classes."""
    X, y = ref.f64(X), np.asarray(y)
    out = np.full((K, K), np.nan)
    stats = {}
    for k in range(K):
        rows = [X[i] for i in range(len(y)) if y[i] == k]
        if rows:
            mu = sum(rows) / len(rows)
            stats[k] = (mu, sum(float((r - mu) @ (r - mu)) for r in rows) / len(rows))
    for i in stats:
        for j in stats:
            if i != j:
                diff = stats[i][0] - stats[j][0]
                out[i, j] = (stats[i][1] + stats[j][1]) / (2.0 * float(diff @ diff))
    return out


def _batches(n, y, bs):
    return [(torch.arange(i, min(i + bs, n)), torch.as_tensor(y[i:i + bs]), torch.arange(i, min(i + bs, n)))
            for i in range(0, n, bs)]


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-9), (np.float32, 1e-5)])
def test_cdnv_matrix_matches_the_loop_reference_and_averages_to_the_logged_cdnv(dtype, rtol) -> None:
    rng = np.random.default_rng(11)
    X, y = data(rng, K=6, D=5, N=240, dtype=dtype)
    y[y == 4] = 1  # class 4 absent
    y[:150][y[:150] == 2] = 0  # imbalanced
    feats = {"a": torch.as_tensor(X), "b": torch.as_tensor(np.abs(X[:, :3]) ** 1.5)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = measure(lambda idx: {k: v[idx] for k, v in feats.items()}, _batches(240, y, 37),
                      {"test": _batches(240, y, 53)}, num_classes=6, metrics=("cdnv", "cdnv_matrix"), probe=None,
                      progress=False)
    assert "cdnv_matrix/train" not in out.metrics and set(out.matrices) == {"cdnv_matrix/train", "cdnv_matrix/test"}
    for li, name in enumerate(("a", "b")):
        want = ref_cdnv_matrix(feats[name].numpy(), y, 6)
        got = out.matrices["cdnv_matrix/train"][li]
        assert got.shape == (6, 6) and got.dtype == np.float64
        assert np.array_equal(np.isnan(got), np.isnan(want))  # diagonal and class 4's row and column
        assert np.isnan(np.diag(got)).all() and np.isnan(got[4]).all() and np.isnan(got[:, 4]).all()
        np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)], rtol=rtol, atol=0)
        off = got[~np.isnan(got)]
        assert off.size == 5 * 4
        assert off.mean() == pytest.approx(out.metrics["cdnv/train"][li], rel=1e-12)
        assert np.nanmean(out.matrices["cdnv_matrix/test"][li]) == pytest.approx(out.metrics["cdnv/test"][li], rel=1e-12)


def test_cdnv_matrix_on_collapsed_data_and_coinciding_means() -> None:
    rng = np.random.default_rng(5)
    X, y = ref.collapsed_data(rng, K=5, D=9, n_per=(4, 90), offset=1e3, rel_var=1e-8, dtype=np.float64)
    got = REGISTRY["cdnv_matrix"].compute(geometry(summary(X, y, 5, batch=13)))
    want = ref_cdnv_matrix(X, y, 5)
    mask = ~np.isnan(want)
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-9, atol=0)
    X2 = np.array([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0], [-1.0, 0.0], [5.0, 5.0], [5.0, 6.0]])
    m = REGISTRY["cdnv_matrix"].compute(geometry(summary(X2, np.array([0, 0, 1, 1, 2, 2]), 3)))
    assert m[0, 1] == m[1, 0] == math.inf and np.isfinite(m[0, 2]) and np.isnan(m[2, 2])


def test_cdnv_matrix_artifact_round_trip_and_tidy_columns(tmp_path: Path) -> None:
    import pandas as pd

    from pnc.metrics.matrices import matrix_arrays, read_npz, tidy_columns, write_npz

    rng = np.random.default_rng(0)
    mats = {"cdnv_matrix/train": [rng.random((3, 3)) for _ in range(4)], "cdnv_matrix/test": [rng.random((3, 3)) for _ in range(4)]}
    curves, matrices = REGISTRY.split({"cdnv/train": [1.0] * 4, **mats})
    assert list(curves) == ["cdnv/train"] and matrices == mats
    (name, arrays), = matrix_arrays(matrices, ["l0", "l1", "l2", "fc"]).items()
    assert name == REGISTRY["cdnv_matrix"].artifact == "cdnv_matrix.npz"
    back = read_npz(write_npz(tmp_path / name, arrays))
    assert list(back["split"]) == ["test", "train"] and list(back["module"]) == ["l0", "l1", "l2", "fc"]
    assert np.array_equal(back["value"][1, 2], mats["cdnv_matrix/train"][2])
    df = pd.DataFrame(tidy_columns(back, layers=[3], splits=["train"]))
    assert len(df) == 9 and set(df.module) == {"fc"} and set(df.layer) == {3}
    row = df[(df.class_i == 2) & (df.class_j == 0)].iloc[0]
    assert row.value == mats["cdnv_matrix/train"][3][2, 0]
    with pytest.raises(ValueError, match="not the key of a matrix metric"):
        matrix_arrays({"cdnv/train": [np.zeros((3, 3))] * 4}, ["l0", "l1", "l2", "fc"])
    np.savez(tmp_path / "bad.npz", value=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="not a matrix-metric artifact"):
        read_npz(tmp_path / "bad.npz")


# ----------------------------------------------------------------------------- reports: family panels and heatmaps
def finished_run(spec, cell, layers: dict, finals: dict, *, role: str = "cell", tags: dict | None = None,
                 matrices: dict | None = None, cell_id: str | None = None) -> str:
    """A FINISHED run tagged as ``pnc run`` tags it, with per-layer curves and (optionally) matrix artifacts."""
    from pnc import tracking
    from pnc.engine import cell_tags

    exp_id = tracking.experiment_id(spec.experiment)
    found = tracking.client().search_runs([exp_id], filter_string=f"tags.`{tracking.TAG_ROLE}` = 'study'")
    parent = found[0].info.run_id if found else tracking.client().create_run(
        exp_id, run_name=spec.name, tags={tracking.TAG_STUDY: spec.name, tracking.TAG_ROLE: "study"}).info.run_id
    run_id = tracking.start_cell_run(exp_id, parent, cell, {**cell_tags(spec, cell), **(tags or {})}, role=role,
                                     cell_id=cell_id)
    tracking.log_layer_metrics(run_id, layers)
    tracking.log_metrics(run_id, finals)
    if matrices:
        tracking.log_matrix_artifacts(run_id, matrices, [f"block{i}" for i in range(len(next(iter(layers.values()))))])
    tracking.end_run(run_id)
    return run_id


def load(path: str, *overrides: str):
    from pnc.spec import load_spec

    return load_spec(str(ROOT / path), list(overrides))


def test_depth_report_draws_the_cdnv_matrix_heatmap_from_the_runs_artifact(store: Path, charts) -> None:
    import pnc.report as report
    from pnc.cells import expand

    spec = load("specs/digits_depth.yaml", "models=[resnet8]", "measure.metrics=[cdnv, nc2, probe, cdnv_matrix, gnc2]")
    (cell,) = expand(spec)
    rng = np.random.default_rng(0)
    mats = [rng.random((10, 10)) + 0.1 for _ in range(5)]
    for m in mats:
        np.fill_diagonal(m, np.nan)
    finished_run(spec, cell, {"cdnv/train": [1.0, 0.6, 0.4, 0.2, 0.1], "nc2/train": [0.5] * 5, "probe_acc/test": [0.8] * 5,
                              "gnc2/train": [-0.4] * 5},
                 {"val/acc": 0.8, "test/holdout_acc": 0.8, "test/acc": 0.8, "train/final_acc": 1.0},
                 matrices={"cdnv_matrix/train": mats, "cdnv_matrix/test": mats})
    page = (report.render_study(spec, store / "reports") / "index.html").read_text()
    heat = dict(charts)["heatmap_cdnv_matrix"]
    titles = [h["title"] for row in heat["vconcat"] for h in row["hconcat"]]
    assert titles == ["resnet8, train: first, layer 0 (block0)", "resnet8, train: middle, layer 2 (block2)",
                      "resnet8, train: last, layer 4 (block4)"]
    values = heat["datasets"][heat["vconcat"][0]["hconcat"][2]["data"]["name"]]
    assert len(values) == 90 and all(v["layer"] == 4 for v in values)  # the diagonal's NaNs left out
    assert {(v["class_i"], v["class_j"]): v["value"] for v in values}[(3, 7)] == pytest.approx(mats[4][3, 7])
    assert "pairwise CDNV (cdnv_matrix) at the first, middle and last tapped layer" in page
    assert "gnc2/train" in json.dumps(dict(charts)["family_geometry"])


def test_noise_and_transfer_reports_draw_the_family_panels(store: Path, charts) -> None:
    from pnc.cells import expand
    from pnc.kinds import noise, transfer

    spec = load("specs/digits_noise.yaml", "models=[resnet8]", "noise.label=[{kind: symmetric, rates: [0.0, 0.4]}]",
                "noise.input=[]", "measure.metrics=[cdnv, nc2, probe, equinorm, nc1_tr, nc3, nc4]")
    for cell in expand(spec):
        finished_run(spec, cell, {"cdnv/train_noisy": [1.0, 0.5], "equinorm/train_noisy": [0.3, 0.2],
                                  "equinorm/train_clean": [0.31, 0.21], "nc1_tr/train_clean": [2.0, 1.0],
                                  "nc3/train_noisy": [0.9, 0.4], "nc4/test_clean": [0.6, 0.9]}, {"test/acc": 0.9})
    secs = noise.family_sections(spec, store, sel=None, shown={"cdnv/train_noisy"}, levels=["clean", "symmetric:0.4"])
    assert [t for t, _ in secs] == ["Variability: within-class variability (NC1)", "Geometry: geometry of the class means (NC2)",
                                    "Duality: classifier / class-mean duality (NC3)",
                                    "Agreement: classifier / nearest-class-mean agreement (NC4)"]
    geo = json.dumps(dict(charts)["family_geometry"])
    assert "equinorm/train_noisy" in geo and "equinorm/train_clean" in geo and "model resnet8" in geo
    assert "nc4/test_clean" in json.dumps(dict(charts)["family_agreement"])

    charts.clear()
    tspec = load("specs/digits_transfer.yaml", "models=[resnet8]", "measure.metrics=[cdnv, nc2, probe, max_angle, cdnv_matrix]")
    mats = [np.where(np.eye(10) > 0, np.nan, 0.5) for _ in range(3)]
    for cell in expand(tspec):
        for target in tspec.transfer.targets:
            finished_run(tspec, transfer.target_cell(cell, target),
                         {"cdnv/target": [1.0, 0.5, 0.2], "max_angle/target": [0.3, 0.2, 0.1]}, {},
                         role=transfer.ROLE, tags={"source": cell.source, "target": target}, cell_id=f"{cell.id}:{target}",
                         matrices={"cdnv_matrix/target": mats})
    secs = transfer.family_sections(tspec, store, sel=None, shown={"cdnv/target"}, models=["resnet8"])
    assert [t for t, _ in secs] == ["Geometry: geometry of the class means (NC2)",
                                    "pairwise CDNV (cdnv_matrix) at the first, middle and last tapped layer"]
    geo = dict(charts)["family_geometry"]
    assert [c["hconcat"][0]["title"] for c in geo["vconcat"]] == ["target handwritten"]
    assert len(geo["vconcat"][0]["hconcat"]) == 3  # a column per target, a line per source
    assert len(dict(charts)["heatmap_cdnv_matrix"]["vconcat"]) == 9  # a row per (source, target) run


def test_the_embedded_depth_study_selects_the_whole_family() -> None:
    """`make repro`'s depth run logs every metric of the registry for every layer (issue 15)."""
    assert set(load("specs/digits_depth.yaml").measure.metrics) == set(REGISTRY.selectable())
