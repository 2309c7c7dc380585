"""The single-pass orchestrator `measure` and the probes, against the numpy reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import metrics_reference as ref
from pnc.metrics import ClassStats, MetricWarning, fit_ridge, measure, validation_part


class FakeNet:
    """extract(x): x holds global sample indices; returns fixed per-layer features (float32)."""

    def __init__(self, feats: dict[str, np.ndarray]):
        self.feats = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in feats.items()}
        self.calls = 0

    def __call__(self, x):
        assert torch.is_inference_mode_enabled()
        self.calls += 1
        return {k: v[x] for k, v in self.feats.items()}


def batches(idx, labels, bs, *, pad_to=None):
    """(x, y, idx[, mask]) batches over the given global indices; labels (N, L) indexed globally."""
    idx = np.ascontiguousarray(idx)
    for i in range(0, len(idx), bs):
        j = torch.as_tensor(idx[i:i + bs])
        y = torch.as_tensor(labels[j.numpy()])
        if pad_to is not None and len(j) < pad_to:
            extra = pad_to - len(j)
            jj = torch.cat([j, j[:1].repeat(extra)])
            yy = torch.cat([y, y[:1].repeat(extra, *([1] * (y.ndim - 1)))])
            mask = torch.cat([torch.ones(len(j), dtype=torch.bool), torch.zeros(extra, dtype=torch.bool)])
            yield jj, yy, jj, mask
        else:
            yield j, y, j


def make_world(seed=0, N=700, K=4, dims=(6, 3, 40), noise=0.3):
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, K, size=N)
    noisy = np.where(rng.random(N) < noise, rng.integers(0, K, size=N), clean)
    feats = {}
    for i, d in enumerate(dims):
        means = rng.standard_normal((K, d)) * (1.0 + i)
        feats[f"layer{i}"] = means[clean] + rng.standard_normal((N, d)) + 5.0
    labels = np.stack([noisy, clean], 1)
    perm = rng.permutation(N)
    return feats, labels, perm[: int(0.7 * N)], perm[int(0.7 * N):]


def test_measure_matches_reference_single_label():
    feats, labels, tr, te = make_world()
    net = FakeNet(feats)
    lab = labels[:, 1:]  # one label vector
    r = measure(net, batches(tr, lab, 64), batches(te, lab, 50), num_classes=4, progress=False)
    assert net.calls == math.ceil(len(tr) / 64) + math.ceil(len(te) / 50)  # one pass per split
    assert r.layers == ["layer0", "layer1", "layer2"] and r.dims == [6, 3, 40]
    assert r.samples == {"train": len(tr), "test": len(te)}
    expected = {"cdnv/train", "nc1/train", "nc2/train", "cdnv/test", "nc1/test", "nc2/test", "ncc_acc/test",
                "probe_acc/test"}
    assert set(r.metrics) == expected
    for i, name in enumerate(r.layers):
        X = np.asarray(feats[name], dtype=np.float32)
        for split, ix in (("train", tr), ("test", te)):
            Xs, ys = X[ix], lab[ix, 0]
            assert r[f"cdnv/{split}"][i] == pytest.approx(ref.cdnv(Xs, ys, 4), rel=1e-9)
            assert r[f"nc1/{split}"][i] == pytest.approx(ref.nc1(Xs, ys, 4), rel=1e-9)
            assert r[f"nc2/{split}"][i] == pytest.approx(ref.nc2(Xs, ys, 4), rel=1e-9)
        acc = ref.ncc_accuracy(X[tr], lab[tr, 0], 4, X[te], lab[te, 0])
        assert r["ncc_acc/test"][i] == acc
    assert r.memorization_layers is None


def test_measure_noisy_clean_keys_and_eval_columns():
    feats, labels, tr, te = make_world()
    test_labels = labels[:, 1:]  # the test split only has clean labels
    r = measure(FakeNet(feats), batches(tr, labels, 64), batches(te, test_labels, 64), num_classes=4,
                label_names=("noisy", "clean"), progress=False)
    for k in ("cdnv", "nc1", "nc2"):
        assert f"{k}/train_noisy" in r and f"{k}/train_clean" in r and f"{k}/test" in r
    assert {"ncc_acc/test_noisy", "ncc_acc/test_clean", "probe_acc/test", "mem_ratio/train"} <= set(r.keys())
    X = np.asarray(feats["layer0"], dtype=np.float32)
    assert r["cdnv/train_noisy"][0] == pytest.approx(ref.cdnv(X[tr], labels[tr, 0], 4), rel=1e-9)
    assert r["cdnv/train_clean"][0] == pytest.approx(ref.cdnv(X[tr], labels[tr, 1], 4), rel=1e-9)
    # NCC with the noisy-label means, scored against the (clean) test labels
    assert r["ncc_acc/test_noisy"][0] == ref.ncc_accuracy(X[tr], labels[tr, 0], 4, X[te], labels[te, 1])
    ratio = [c / n for c, n in zip(r["cdnv/train_clean"], r["cdnv/train_noisy"])]
    assert r["mem_ratio/train"] == pytest.approx(ratio, rel=1e-12)
    assert r.info["probe_labels"] == "clean"
    # with both columns in the test split, collapse keys carry the label suffix
    r2 = measure(FakeNet(feats), batches(tr, labels, 64), {"test": batches(te, labels, 64)}, num_classes=4,
                 label_names=("noisy", "clean"), metrics=("cdnv", "ncc"), progress=False)
    assert set(r2.keys()) == {"cdnv/train_noisy", "cdnv/train_clean", "mem_ratio/train", "cdnv/test_noisy",
                              "cdnv/test_clean", "ncc_acc/test_noisy", "ncc_acc/test_clean"}


def test_memorization_layers_detected():
    """Layer 0 clusters by clean labels, layer 1 by the noisy labels it memorised."""
    rng = np.random.default_rng(1)
    N, K = 800, 4
    clean = rng.integers(0, K, size=N)
    noisy = np.where(rng.random(N) < 0.5, (clean + 1) % K, clean)
    means = rng.standard_normal((K, 5)) * 4
    feats = {"early": means[clean] + rng.standard_normal((N, 5)),
             "late": means[noisy] + rng.standard_normal((N, 5))}
    labels = np.stack([noisy, clean], 1)
    r = measure(FakeNet(feats), batches(np.arange(N), labels, 100), num_classes=K, label_names=("noisy", "clean"),
                metrics=("cdnv",), progress=False)
    assert r["mem_ratio/train"][0] < 1 < r["mem_ratio/train"][1]
    assert r.memorization_layers == [1]
    assert r.as_dict()["memorization_layers"] == [1]


def test_measure_invariant_to_batching_order_and_padding():
    feats, labels, tr, te = make_world(seed=2)
    kw = dict(num_classes=4, label_names=("noisy", "clean"), progress=False)
    a = measure(FakeNet(feats), batches(tr, labels, 700), batches(te, labels[:, 1:], 700), **kw)
    rng = np.random.default_rng(3)
    tr2, te2 = rng.permutation(tr), rng.permutation(te)
    b = measure(FakeNet(feats), batches(tr2, labels, 13, pad_to=13), batches(te2, labels[:, 1:], 7, pad_to=7), **kw)
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        np.testing.assert_allclose(a[k], b[k], rtol=1e-9, err_msg=k)
    assert [p["reg"] for p in a.info["probe"]] == [p["reg"] for p in b.info["probe"]]
    assert a.samples == b.samples


def _ridge_world(seed=4, N=900, K=3, D=5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, size=N)
    means = rng.standard_normal((K, D)) * 1.5
    X = (means[y] + rng.standard_normal((N, D)) * 1.3 + 100.0).astype(np.float32)  # large offset
    return X, y


def test_ridge_probe_equals_lstsq_and_selects_on_validation():
    X, y = _ridge_world()
    K = 3
    idx = torch.arange(len(y))
    part = validation_part(idx, 0.2, seed=7).numpy()
    st_ = ClassStats(K, X.shape[1], num_parts=2, scatter=True)
    for i in range(0, len(y), 50):
        st_.update(torch.as_tensor(X[i:i + 50]), torch.as_tensor(y[i:i + 50]), torch.as_tensor(part[i:i + 50]))
    alphas = tuple(10.0 ** e for e in range(-6, 4))
    p = fit_ridge(st_.summary(part=0), st_.summary(part=1), alphas)
    f, v = part == 0, part == 1
    chosen, mses = ref.ridge_select(X[f], y[f], X[v], y[v], K, alphas)
    np.testing.assert_allclose(p.val_scores, mses, rtol=1e-8)
    assert p.reg == alphas[chosen]
    W, b = ref.ridge_fit(X, y, K, alphas[chosen])  # refit on fit + validation
    np.testing.assert_allclose(p.weight.numpy(), W, rtol=1e-8, atol=1e-10)
    logits_ref = X.astype(np.float64) @ W + b
    np.testing.assert_allclose(p.logits(torch.as_tensor(X)).numpy(), logits_ref, rtol=1e-8, atol=1e-9)
    # a different alpha would have given different weights: the comparison can fail
    W2, _ = ref.ridge_fit(X, y, K, alphas[0] if chosen != 0 else alphas[-1])
    assert not np.allclose(W2, W, rtol=1e-6)


def test_ridge_probe_in_measure_matches_reference_accuracy_and_ignores_test():
    X, y = _ridge_world(seed=5)
    K, N = 3, len(y)
    tr, te = np.arange(0, 600), np.arange(600, N)
    net = FakeNet({"f": X})
    lab = y[:, None]
    r1 = measure(net, batches(tr, lab, 64), batches(te, lab, 64), num_classes=K, metrics=("probe",), seed=11,
                 progress=False)
    alpha = r1.info["probe"][0]["reg"]
    part = validation_part(torch.as_tensor(tr), 0.2, seed=11).numpy().astype(bool)
    chosen, _ = ref.ridge_select(X[tr][~part], y[tr][~part], X[tr][part], y[tr][part], K,
                                 r1.info["probe"][0]["grid"])
    assert alpha == r1.info["probe"][0]["grid"][chosen]
    W, b = ref.ridge_fit(X[tr], y[tr], K, alpha)
    acc = float(np.mean((X[te].astype(np.float64) @ W + b).argmax(1) == y[te]))
    assert r1["probe_acc/test"][0] == acc
    # a different test set (even with scrambled labels) changes nothing about the selection
    lab2 = np.random.default_rng(0).integers(0, K, size=(N, 1))
    r2 = measure(net, batches(tr, lab, 64), batches(te[::-1], lab2, 10), num_classes=K, metrics=("probe",), seed=11,
                 progress=False)
    r3 = measure(net, batches(tr, lab, 64), None, num_classes=K, metrics=("probe",), seed=11, progress=False)
    assert r2.info["probe"] == r1.info["probe"] == r3.info["probe"]
    assert r2["probe_acc/test"][0] != r1["probe_acc/test"][0]
    assert "probe_acc/test" not in r3


def test_validation_part_is_deterministic_and_sized():
    idx = torch.arange(20000)
    v = validation_part(idx, 0.2, seed=3)
    assert 0.19 < v.float().mean() < 0.21
    assert torch.equal(v[5000:6000], validation_part(idx[5000:6000], 0.2, seed=3))
    assert not torch.equal(v, validation_part(idx, 0.2, seed=4))


def _blobs(seed, N=1200, K=4, D=8, sep=6.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, size=N)
    means = rng.standard_normal((K, D)) * sep
    return (means[y] + rng.standard_normal((N, D))).astype(np.float32), y


def test_logistic_probe_on_separable_data():
    X, y = _blobs(6)
    N = len(y)
    Xr = np.random.default_rng(7).standard_normal((N, 8)).astype(np.float32)  # uninformative layer
    net = FakeNet({"good": X, "noise": Xr})
    lab = y[:, None]
    tr, te = np.arange(900), np.arange(900, N)
    r = measure(net, batches(tr, lab, 100), batches(te, lab, 100), num_classes=4, metrics=("probe",),
                probe="logistic", progress=False)
    good, noise = r["probe_acc/test"]
    assert good >= 0.97
    assert noise < 0.45
    info = r.info["probe"][0]
    assert info["kind"] == "logistic" and info["val_metric"] == "accuracy"
    assert info["n_fit"] + info["n_val"] == len(tr)
    assert info["reg"] in info["grid"]


def test_logistic_cache_cap_is_deterministic():
    X, y = _blobs(8, N=600)
    lab = y[:, None]
    kw = dict(num_classes=4, metrics=("probe",), probe="logistic", logistic_max_samples=150, progress=False)
    r1 = measure(FakeNet({"f": X}), batches(np.arange(500), lab, 500), batches(np.arange(500, 600), lab, 50), **kw)
    perm = np.random.default_rng(1).permutation(500)
    r2 = measure(FakeNet({"f": X}), batches(perm, lab, 17), batches(np.arange(500, 600), lab, 7), **kw)
    i1, i2 = r1.info["probe"][0], r2.info["probe"][0]
    assert i1["n_fit"] + i1["n_val"] == 150
    assert i1 == i2
    assert r1["probe_acc/test"] == r2["probe_acc/test"]


@pytest.mark.parametrize("probe", ["ridge", "logistic"])
def test_wide_layers_are_sketched(probe):
    X, y = _blobs(9, N=800, D=6, sep=5.0)
    rng = np.random.default_rng(10)
    wide = np.concatenate([X, rng.standard_normal((800, 60)).astype(np.float32) * 0.1], 1)  # D = 66
    lab = y[:, None]
    with pytest.warns(MetricWarning, match="nc1_dim_cap"):
        r = measure(FakeNet({"wide": wide}), batches(np.arange(600), lab, 64), batches(np.arange(600, 800), lab, 64),
                    num_classes=4, probe=probe, probe_dim_cap=32, nc1_dim_cap=16, progress=False)
    assert r.info["probe"][0]["sketched_to"] == 32
    assert r["probe_acc/test"][0] > 0.9
    assert math.isnan(r["nc1/train"][0]) and not math.isnan(r["cdnv/train"][0])
    assert r["cdnv/train"][0] == pytest.approx(ref.cdnv(wide[:600], y[:600], 4), rel=1e-9)


def test_train_as_eval_split_gives_train_ncc():
    feats, labels, tr, te = make_world(seed=12)
    lab = labels[:, 1:]
    r = measure(FakeNet(feats), batches(tr, lab, 64), {"train": batches(tr, lab, 64), "test": batches(te, lab, 64)},
                num_classes=4, progress=False)
    X = np.asarray(feats["layer1"], dtype=np.float32)
    assert r["ncc_acc/train"][1] == ref.ncc_accuracy(X[tr], lab[tr, 0], 4, X[tr], lab[tr, 0])
    assert "probe_acc/train" in r and "cdnv/test" in r
    assert r["probe_acc/train"][0] >= r["probe_acc/test"][0] - 0.1


def test_argument_errors_name_the_fix():
    feats, labels, tr, te = make_world()
    net = FakeNet(feats)
    with pytest.raises(ValueError, match="unknown metrics"):
        measure(net, batches(tr, labels, 64), num_classes=4, metrics=("cdvn",))
    with pytest.raises(ValueError, match="label_names has 3"):
        measure(net, batches(tr, labels, 64), num_classes=4, label_names=("a", "b", "c"), progress=False)
    with pytest.raises(ValueError, match="num_classes"):
        measure(net, batches(tr, labels, 64), num_classes=3, progress=False)
    with pytest.raises(ValueError, match="probe_labels"):
        measure(net, batches(tr, labels, 64), num_classes=4, probe_labels="clean", progress=False)
    with pytest.raises(ValueError, match="no batches"):
        measure(net, [], num_classes=4, progress=False)

    no_idx = [(j, y, None) for j, y, _ in batches(tr, labels[:, 1:], 64)]
    with pytest.raises(ValueError, match="global sample indices"):
        measure(net, no_idx, num_classes=4, progress=False)
    r = measure(net, no_idx, num_classes=4, metrics=("cdnv",), progress=False)  # no probe: idx not needed
    assert r.samples["train"] == len(tr)

    def bad(x):
        return {"conv": torch.zeros(len(x), 2, 3, 3)}

    with pytest.raises(ValueError, match="already reduced"):
        measure(bad, batches(tr, labels, 64), num_classes=4, progress=False)


def test_progress_bar_runs(monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    feats, labels, tr, te = make_world()
    r = measure(FakeNet(feats), list(batches(tr, labels[:, 1:], 128)), list(batches(te, labels[:, 1:], 128)),
                num_classes=4, metrics=("cdnv",), progress=True)
    assert len(r["cdnv/train"]) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("probe", ["ridge", "logistic"])
def test_measure_on_cuda_equals_cpu(probe):
    feats, labels, tr, te = make_world(seed=13)
    cpu = FakeNet(feats)
    gpu = FakeNet(feats)
    gpu.feats = {k: v.cuda() for k, v in gpu.feats.items()}
    kw = dict(num_classes=4, label_names=("noisy", "clean"), probe=probe, progress=False)
    a = measure(cpu, batches(tr, labels, 64), batches(te, labels[:, 1:], 64), **kw)
    b = measure(lambda x: gpu(x.cuda()), batches(tr, labels, 64), batches(te, labels[:, 1:], 64), **kw)
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        np.testing.assert_allclose(a[k], b[k], rtol=1e-7, err_msg=k)


def test_nonfinite_features_are_reported():
    feats, labels, tr, te = make_world(seed=14)
    feats["layer1"] = feats["layer1"].copy()
    feats["layer1"][tr[5], 0] = np.nan
    with pytest.warns(MetricWarning, match="layer1"):
        r = measure(FakeNet(feats), batches(tr, labels[:, 1:], 64), num_classes=4, metrics=("cdnv", "nc2"),
                    progress=False)
    assert math.isnan(r["cdnv/train"][1]) and not math.isnan(r["cdnv/train"][0])
