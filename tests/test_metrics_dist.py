"""Two processes (torchrun, gloo) give the same metrics as one process."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from pnc.metrics import measure
from pnc.metrics.geometry import REGISTRY

WORKER = Path(__file__).with_name("dist_metrics_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(idx, labels, bs):
    idx = np.ascontiguousarray(idx)
    for i in range(0, len(idx), bs):
        j = torch.as_tensor(idx[i:i + bs])
        yield j, torch.as_tensor(labels[j.numpy()]), j


def _close(a, b, key):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert a.shape == b.shape, key
    assert np.array_equal(np.isnan(a), np.isnan(b)), key
    m = ~np.isnan(a)
    np.testing.assert_allclose(a[m], b[m], rtol=1e-9, atol=1e-12, err_msg=key)


def test_two_processes_equal_one(tmp_path):
    rng = np.random.default_rng(0)
    N, K = 900, 5
    clean = rng.choice(K - 1, size=N, p=[0.45, 0.25, 0.2, 0.1])  # imbalanced classes
    noisy = np.where(rng.random(N) < 0.3, rng.integers(0, K - 1, size=N), clean)
    rare = rng.choice(N, size=24, replace=False)  # class K-1: 24 samples, the same under both label vectors
    clean[rare] = noisy[rare] = K - 1
    feats = {}
    for i, d in enumerate((4, 9, 20)):
        means = rng.standard_normal((K, d)) * (1 + i)
        feats[f"feat_b{i}"] = (means[clean] + rng.standard_normal((N, d)) + 30.0).astype(np.float32)
    labels = np.stack([noisy, clean], 1)
    rest = rng.permutation(np.setdiff1d(np.arange(N), rare))
    tr = np.concatenate([rare[:12], rest[:638]])  # class K-1 first: in rank 0's shards only (see the worker)
    te = np.concatenate([rare[12:], rest[638:]])
    assert not np.isin(tr[int(0.37 * len(tr)):], rare).any() and not np.isin(te[int(0.8 * len(te)):], rare).any()
    head_w, head_b = rng.standard_normal((K, 20)), rng.standard_normal(K)
    family = list(REGISTRY.selectable())
    data = tmp_path / "data.npz"
    np.savez(data, labels=labels, train=tr, test=te, K=K, cap=300, head_w=head_w, head_b=head_b, family=family, **feats)
    out = tmp_path / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), str(data), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2 and res["ranks_agree"]

    ft = {k[5:]: torch.as_tensor(v) for k, v in feats.items()}

    def extract(x):
        return {k: v[x] for k, v in ft.items()}

    kw = dict(num_classes=K, label_names=("noisy", "clean"), progress=False)
    single = {
        "ridge_accelerate": measure(extract, _batches(tr, labels, 64), _batches(te, labels[:, 1:], 64), **kw),
        "logistic_dist": measure(extract, _batches(tr, labels, 64), _batches(te, labels[:, 1:], 64),
                                 probe="logistic", logistic_max_samples=300, **kw),
    }
    single["padded_masked"] = measure(extract, _batches(tr[:649], labels, 64), _batches(te[:249], labels[:, 1:], 64), **kw)
    single["family"] = measure(extract, _batches(tr, labels, 64), {"test": _batches(te, labels[:, 1:], 64),
                                                                  "train": _batches(tr, labels, 100)},
                               metrics=tuple(family), classifiers={"b2": (torch.as_tensor(head_w), torch.as_tensor(head_b))},
                               **kw)
    sizes = {"ridge_accelerate": {"train": 650, "test": 250}, "logistic_dist": {"train": 650, "test": 250},
             "padded_masked": {"train": 649, "test": 249}, "family": {"train": 650, "test": 250}}
    for name, one in single.items():
        two = res[name]
        assert two["samples"] == one.samples == sizes[name], name
        d1 = one.as_dict()
        assert set(two["metrics"]) == set(d1), name
        for key, v in d1.items():
            if key in ("layers", "memorization_layers"):
                assert two["metrics"][key] == v, key
            else:
                _close(two["metrics"][key], v, f"{name}:{key}")
        for p1, p2 in zip(one.info["probe"], two["probe"]):
            assert p1["reg"] == p2["reg"] and p1["n_fit"] == p2["n_fit"] and p1["n_val"] == p2["n_val"]
            _close(p2["val_scores"], p1["val_scores"], f"{name}:val_scores")
    assert not math.isnan(single["ridge_accelerate"]["nc1/train_clean"][0])

    # the whole family: every scalar metric on every split it applies to, and cdnv_matrix, equal to 1e-9
    fam, two = single["family"], res["family"]
    assert two["classifier"] == fam.info["classifier"] == ["ridge", "ridge", "given"]
    for m in REGISTRY:
        if m.selectable and m.kind == "scalar":
            assert any(k.startswith(f"{m.key}/") for k in fam.metrics), m.name
            assert all(not math.isnan(v) for k, vs in fam.metrics.items() if k.startswith(f"{m.key}/") for v in vs), m.name
    assert set(two["matrices"]) == set(fam.matrices) == {"cdnv_matrix/train_noisy", "cdnv_matrix/train_clean", "cdnv_matrix/test"}
    for key, per_layer in fam.matrices.items():
        for a, b in zip(per_layer, two["matrices"][key]):
            _close(np.asarray(b, dtype=float), a, f"family:{key}")
            assert np.isfinite(a[K - 1, :K - 1]).all()  # class K-1 is present overall (absent from rank 1 only)
