#!/usr/bin/env python
"""Benchmark of pnc's metric engine on this machine's CPU (a script, not a test).

    python bench/bench_metrics.py                    # resnet20 and resnet56, 5000 samples
    python bench/bench_metrics.py --quick            # resnet20, 1000 samples
    python bench/bench_metrics.py --models resnet20 --samples 8000 --baseline-layers 2
    python bench/bench_metrics.py --models none --wide resnet50   # only the ResNet-50-width case

Data: random 32x32x3 images, 10 classes (a random template per class plus unit Gaussian noise, so
the features carry some class signal), split 80/20 into "train" and "test". Models:
``pnc.models.build_model(name, num_classes=10, in_chans=3, image_size=32)`` at initialisation, taps
``pnc.features.FeatureExtractor(model, layers="blocks", reduction="avgpool")``. Batch size 128.

(i)   Overhead: ``pnc.metrics.measure`` with every metric (CDNV, NC1, NC2 on train and test, NCC,
      ridge probe) over all blocks, divided by a plain ``model(x)`` forward over the same batches.
      The plain forward of each batch runs right before the measured one (inside the batch
      iterator, its time subtracted), so background load hits both alike. Goal <= 1.15.
      (i-b) The same as the depth sweep runs it, with ncc_acc/train (it scores the finished class
      means), against one plain forward over train + test, side by side: scored from the training
      features kept in the first pass (``keep_features_bytes``, the default when they fit), and with
      a second forward pass over the training split (``keep_features_bytes=0``). Goal <= 1.15 kept.
(ii)  Against a naive baseline modelled on public neural-collapse code (Papyan et al.'s measurement
      loop, run once per layer): for each layer, one forward pass over train storing the layer's
      features per class in float32 and taking class means with a per-class Python loop, a second
      forward pass accumulating the within-class covariance with a per-class loop, a float32 full
      pinv for NC1, pairwise loops for CDNV, and a forward pass over test for NCC. Its time is
      measured on ``--baseline-layers`` layers (default 3: first, middle, last) and scaled to the layer count (every layer costs
      the same full forward passes). Goal >= 5x faster. Also reported: a *stronger* naive variant
      that extracts all layers in one forward pass, stores them (float32), then runs the same
      per-class loops per layer. Memory is *accounted*, not sampled: bytes of the tensors each method
      keeps (stored features vs pnc's float64 accumulators, ``Measurements.info["state_bytes"]``);
      torch's CPU allocator is invisible to tracemalloc, so tracemalloc would be misleading here.
(iv)  ResNet-50 widths (``--wide``, default resnet50): torchvision ResNet-50 with its ImageNet stem at
      32 px (the issue's setting: the lightest forward at these widths, so the hardest ratio; taps of
      D = 256 ... 2048), every default metric with ``nc1_dim_cap=2048`` (NC1 on every layer) and the
      ridge probe, ``--wide-samples`` samples. The metric engine's time (measure minus the feature
      taps minus the plain forward) split into the streaming part (the per-batch updates, which
      scale with N) and the final part (NC1's SVD and the ridge probe's ten Cholesky solves per layer,
      once per measurement, independent of N), each over the plain forward, with float64 and with
      float32 scatter products. Goal: streaming engine <= 0.1 of the plain forward.
(iii) All-layer ridge probes (streamed statistics, one pass) against a logistic-regression probe
      trained per layer (scikit-learn, C chosen on the same validation part), both on the same
      features (extracted once for this comparison, so only the probe work is timed): time ratio
      and test-accuracy difference.
"""
from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnc.metrics import measure  # noqa: E402

K = 10
BATCH = 128


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(K, 3, 32, 32, generator=g) * 0.5
    y = torch.randint(0, K, (n,), generator=g)
    x = templates[y] + torch.randn(n, 3, 32, 32, generator=g)
    return x, y


def loader(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, bs: int = BATCH):
    for i in range(0, len(idx), bs):
        j = idx[i:i + bs]
        yield x[j], y[j], j


def build(name: str):
    from pnc.features import FeatureExtractor
    from pnc.models import build_model

    torch.manual_seed(0)
    model = build_model(name, num_classes=K, in_chans=3, image_size=32).eval()
    return model, FeatureExtractor(model, layers="blocks", reduction="avgpool")


class Timed:
    """Batch iterator that runs (and times) a plain forward of each batch before yielding it."""

    def __init__(self, model, batches):
        self.model, self.batches, self.plain = model, batches, 0.0
        self.start = self.end = None

    def __iter__(self):
        self.start = time.perf_counter()
        for b in self.batches:
            t = time.perf_counter()
            with torch.inference_mode():
                self.model(b[0])
            self.plain += time.perf_counter() - t
            yield b
        self.end = time.perf_counter()


# ----------------------------------------------------------------------------- naive baseline
def naive_metrics_from_class_lists(per_class: list[list[torch.Tensor]], second_pass, test_pass):
    """Papyan-style: means from stored per-class features, covariance in a second pass, per-class loops."""
    feats = [torch.cat(f) if f else None for f in per_class]
    present = [c for c in range(K) if feats[c] is not None]
    means = {c: feats[c].mean(0) for c in present}
    n_total = sum(feats[c].shape[0] for c in present)
    mu_g = sum(feats[c].sum(0) for c in present) / n_total
    d = next(iter(means.values())).shape[0]
    sw = torch.zeros(d, d)
    var = {c: 0.0 for c in present}
    cnt = {c: 0 for c in present}
    for h, y in second_pass():
        for c in present:
            z = h[y == c] - means[c]
            sw += z.T @ z
            var[c] += float((z * z).sum())
            cnt[c] += z.shape[0]
    sw /= n_total
    var = {c: var[c] / cnt[c] for c in present}
    sb = torch.zeros(d, d)
    for c in present:
        m = (means[c] - mu_g).unsqueeze(1)
        sb += m @ m.T
    sb /= len(present)
    nc1 = float(torch.trace(sw @ torch.linalg.pinv(sb))) / len(present)
    vals = []
    for i in present:
        for j in present:
            if i < j:
                vals.append((var[i] + var[j]) / (2 * float(((means[i] - means[j]) ** 2).sum())))
    cdnv = float(np.mean(vals))
    mc = torch.stack([means[c] - mu_g for c in present])
    g = mc @ mc.T
    kp = len(present)
    nc2 = float(torch.linalg.matrix_norm(g / torch.linalg.matrix_norm(g) - (torch.eye(kp) - 1 / kp) / math.sqrt(kp - 1)))
    m_stack = torch.stack([means[c] for c in present])
    correct = total = 0
    for h, y in test_pass():
        pred = torch.tensor(present)[torch.cdist(h, m_stack).argmin(1)]
        correct += int((pred == y).sum())
        total += len(y)
    return {"cdnv": cdnv, "nc1": nc1, "nc2": nc2, "ncc": correct / total}


def naive_per_layer(model, layer: str, x, y, tr, te):
    """One layer, Papyan-style: full forward passes with a hook on that layer."""
    from pnc.features import FeatureExtractor

    fe = FeatureExtractor(model, layers=[layer], reduction="avgpool")

    def run(idx):
        for xb, yb, _ in loader(x, y, idx):
            _, f = fe(xb)
            yield f[layer].float(), yb

    per_class: list[list[torch.Tensor]] = [[] for _ in range(K)]
    for h, yb in run(tr):
        for c in range(K):
            per_class[c].append(h[yb == c].clone())
    stored = sum(t.numel() * t.element_size() for f in per_class for t in f)
    res = naive_metrics_from_class_lists(per_class, lambda: run(tr), lambda: run(te))
    return res, stored


def naive_stored(stored_train: dict, stored_test: dict, ytr, yte):
    out = {}
    for name in stored_train:
        h, ht = stored_train[name], stored_test[name]
        per_class = [[h[ytr == c]] for c in range(K)]
        out[name] = naive_metrics_from_class_lists(
            per_class,
            lambda h=h: ((h[i:i + BATCH], ytr[i:i + BATCH]) for i in range(0, len(ytr), BATCH)),
            lambda ht=ht: ((ht[i:i + BATCH], yte[i:i + BATCH]) for i in range(0, len(yte), BATCH)),
        )
    return out


# ----------------------------------------------------------------------------- (i-b) and (iv)
def supports(option: str) -> bool:
    """Whether this checkout's ``measure`` has ``option`` (so the bench also runs on older checkouts)."""
    return option in inspect.signature(measure).parameters


def sweep_ratio(model, extract, x, y, tr, te, *, keep: bool) -> float:
    """measure with {"train", "test"} eval splits (ncc_acc/train), over one plain forward of train + test; the plain
    forwards the Timed iterators run are subtracted (a second-pass iterator that is never consumed runs none)."""
    kw = {} if keep or not supports("keep_features_bytes") else {"keep_features_bytes": 0}
    if keep and not supports("keep_features_bytes"):
        return math.nan
    t1, t2, t3 = Timed(model, loader(x, y, tr)), Timed(model, loader(x, y, tr)), Timed(model, loader(x, y, te))
    t0 = time.perf_counter()
    m = measure(extract, t1, {"train": t2, "test": t3}, num_classes=K, progress=False, **kw)
    total = time.perf_counter() - t0
    assert m.info.get("train_eval", "second pass") == ("kept features" if keep else "second pass"), m.info
    return (total - (t1.plain + t2.plain + t3.plain)) / (t1.plain + t3.plain)


def bench_wide(name: str, n: int, seed: int) -> dict:
    """(iv): the metric engine at ResNet-50 widths, streaming and final parts, float64 and float32 products."""
    from pnc.features import FeatureExtractor
    from pnc.models import build_model

    x, y = make_data(n, seed)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    n_tr = int(0.8 * n)
    tr, te = idx[:n_tr], idx[n_tr:]
    torch.manual_seed(0)
    model = build_model(name, num_classes=K, in_chans=3, image_size=32, cifar_stem=False).eval()
    fe = FeatureExtractor(model, layers="blocks", reduction="avgpool")
    with torch.inference_mode():
        model(x[:BATCH])
    fe(x[:BATCH])
    res: dict = {"model": name, "layers": len(fe.layer_names)}
    for prec in ("float64", "float32"):
        if prec != "float64" and not supports("scatter_products"):
            continue
        t_ext = [0.0]

        def extract(xb, t_ext=t_ext):
            t = time.perf_counter()
            f = fe(xb)[1]
            t_ext[0] += time.perf_counter() - t
            return f

        kw = {"scatter_products": prec} if supports("scatter_products") else {}
        ttr, tte = Timed(model, loader(x, y, tr)), Timed(model, loader(x, y, te))
        t0 = time.perf_counter()
        m = measure(extract, ttr, tte, num_classes=K, nc1_dim_cap=2048, progress=False, **kw)
        t1 = time.perf_counter()
        plain = ttr.plain + tte.plain
        engine = (t1 - t0) - plain - t_ext[0]
        # final part: between the end of the training stream and the start of the test stream, and after it
        final = (tte.start - ttr.end) + (t1 - tte.end)
        res[prec] = {"plain": plain, "taps": t_ext[0], "engine": engine, "final": final, "stream": engine - final,
                     "state": sum(m.info["state_bytes"].values()), "dims": m.dims,
                     "nc1_nan": sum(v != v for v in m["nc1/train"])}
        r = res[prec]
        print(f"  [{name} {prec}] plain {plain:.1f}s, taps {r['taps']:.1f}s, engine stream {r['stream']:.1f}s + final "
              f"{r['final']:.1f}s", flush=True)
    for prec, t in gram_floor(fe, loader(x, y, idx)).items():
        if prec in res:
            res[prec]["floor"] = t
    fe.close()
    return res


def gram_floor(fe, batches) -> dict[str, float]:
    """The arithmetic the scatter cannot avoid: one full D x D product over every sample's features per tap (NC1 on
    train and test, the ridge probe sharing the training one), in products of ``GRAM_ROWS`` rows as the engine takes
    them; only the products are timed (the features are extracted first). A symmetric product needs half of it."""
    from pnc.metrics.stats import GRAM_ROWS

    feats: list[list[torch.Tensor]] = []
    for xb, *_ in batches:
        feats.append([h.to(torch.float64) for h in fe(xb)[1].values()])
    n_rows = sum(b[0].shape[0] for b in feats)
    out = {}
    for dtype in (torch.float64, torch.float32):
        t = 0.0
        for tap in range(len(feats[0])):
            h = torch.cat([b[tap] for b in feats]).to(dtype)
            for i in range(0, n_rows, GRAM_ROWS):
                c = h[i:i + GRAM_ROWS]
                t0 = time.perf_counter()
                c.T @ c
                t += time.perf_counter() - t0
        out[str(dtype).removeprefix("torch.")] = t
    return out


# ----------------------------------------------------------------------------- main
def bench_model(name: str, n: int, baseline_layers: int, seed: int) -> dict:
    x, y = make_data(n, seed)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    n_tr = int(0.8 * n)
    tr, te = idx[:n_tr], idx[n_tr:]
    model, fe = build(name)
    layers = list(fe.layer_names)
    t_extract = [0.0]

    def extract(xb):
        t = time.perf_counter()
        f = fe(xb)[1]
        t_extract[0] += time.perf_counter() - t
        return f
    res: dict = {"model": name, "layers": len(layers)}
    # warm-up
    with torch.inference_mode():
        model(x[:BATCH])
    fe(x[:BATCH])

    # (i) overhead of the full measurement pass
    ttr, tte = Timed(model, loader(x, y, tr)), Timed(model, loader(x, y, te))
    t0 = time.perf_counter()
    m = measure(extract, ttr, tte, num_classes=K, progress=False)
    total = time.perf_counter() - t0
    plain = ttr.plain + tte.plain
    res["t_plain"], res["t_measure"] = plain, total - plain
    res["overhead"] = res["t_measure"] / plain
    res["taps_ratio"] = t_extract[0] / plain
    res["engine_ratio"] = (res["t_measure"] - t_extract[0]) / plain
    res["state_bytes"] = sum(m.info["state_bytes"].values())
    res["dims"] = m.dims
    print(f"  [{name}] (i) plain {plain:.1f}s, measure {res['t_measure']:.1f}s", flush=True)
    # (i-b) as the depth sweep runs it, with ncc_acc/train: from kept features, and with a second train pass
    res["overhead_sweep"] = sweep_ratio(model, extract, x, y, tr, te, keep=True)
    res["overhead_sweep_2pass"] = sweep_ratio(model, extract, x, y, tr, te, keep=False)
    print(f"  [{name}] (i-b) with ncc_acc/train: kept features {res['overhead_sweep']:.2f}x, second pass "
          f"{res['overhead_sweep_2pass']:.2f}x one plain forward", flush=True)

    # stored features for (ii-b) and (iii)
    t0 = time.perf_counter()
    store_tr: dict[str, list] = {k: [] for k in layers}
    store_te: dict[str, list] = {k: [] for k in layers}
    for src, dst in ((tr, store_tr), (te, store_te)):
        for xb, _, _ in loader(x, y, src):
            _, f = fe(xb)
            for k, v in f.items():
                dst[k].append(v.float().clone())
    s_tr = {k: torch.cat(v) for k, v in store_tr.items()}
    s_te = {k: torch.cat(v) for k, v in store_te.items()}
    t_store = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive_all = naive_stored(s_tr, s_te, y[tr], y[te])
    t_naive_compute = time.perf_counter() - t0
    res["t_naive_stored"] = t_store + t_naive_compute
    res["naive_stored_bytes"] = sum(t.numel() * t.element_size() for t in list(s_tr.values()) + list(s_te.values()))
    # agreement of the naive float32 numbers with pnc (sanity; pnc is float64-exact)
    rel, ncc = [], []
    for i, k in enumerate(layers):
        for key, nk in (("cdnv/train", "cdnv"), ("nc2/train", "nc2"), ("nc1/train", "nc1")):
            a, b = m[key][i], naive_all[k][nk]
            rel.append(abs(a - b) / max(abs(a), 1e-30))
        ncc.append(abs(m["ncc_acc/test"][i] - naive_all[k]["ncc"]))
    res["naive_vs_pnc_max_rel"] = max(rel)
    res["naive_vs_pnc_ncc"] = max(ncc)
    print(f"  [{name}] (ii-b) store {t_store:.1f}s + naive compute {t_naive_compute:.1f}s", flush=True)

    # (ii-a) per-layer naive baseline on a few layers, extrapolated to all
    pick = np.unique(np.linspace(0, len(layers) - 1, baseline_layers).round().astype(int)).tolist()
    per_layer, per_bytes = [], []
    for li in pick:
        t0 = time.perf_counter()
        _, stored = naive_per_layer(model, layers[li], x, y, tr, te)
        per_layer.append(time.perf_counter() - t0)
        per_bytes.append(stored)
    res["t_naive_per_layer"] = float(np.mean(per_layer)) * len(layers)
    res["naive_per_layer_measured"] = len(pick)
    # the per-layer baseline stores n_train x D float32 for the layer it measures (checked on the timed ones)
    for li, b in zip(pick, per_bytes):
        assert b == n_tr * m.dims[li] * 4, (b, n_tr, m.dims[li])
    res["naive_per_layer_peak_bytes"] = n_tr * max(m.dims) * 4
    # pnc's state does not depend on N; the naive baseline's grows as 4 N D bytes
    res["mem_ratio_50k"] = 50_000 * max(m.dims) * 4 / res["state_bytes"]
    print(f"  [{name}] (ii-a) naive per layer {np.mean(per_layer):.1f}s x {len(layers)} layers", flush=True)

    # (iii) ridge (all layers, one pass) vs logistic per layer, on the stored features
    def stored_loader(store, labels, bs=BATCH):
        n_ = len(labels)
        for i in range(0, n_, bs):
            j = torch.arange(i, min(n_, i + bs))
            yield j, labels[j], j

    ytr, yte = y[tr], y[te]
    ext_tr = lambda j: {k: v[j] for k, v in s_tr.items()}  # noqa: E731
    ext_te_offset = lambda j: {k: v[j - n_tr] for k, v in s_te.items()}  # noqa: E731

    def two_split_extract(j):
        return ext_tr(j) if int(j[0]) < n_tr else ext_te_offset(j)

    def test_loader():
        for i in range(0, len(yte), BATCH):
            j = torch.arange(i, min(len(yte), i + BATCH))
            yield j + n_tr, yte[j], j + n_tr

    timings = {}
    accs = {}
    for kind in ("ridge", "logistic"):
        t0 = time.perf_counter()
        r = measure(two_split_extract, stored_loader(s_tr, ytr), test_loader(), num_classes=K, metrics=("probe",),
                    probe=kind, progress=False)
        timings[kind] = time.perf_counter() - t0
        accs[kind] = np.array(r["probe_acc/test"])
    res["t_ridge"], res["t_logistic"] = timings["ridge"], timings["logistic"]
    res["acc_ridge"], res["acc_logistic"] = accs["ridge"], accs["logistic"]
    res["probe_acc_main"] = np.array(m["probe_acc/test"])
    print(f"  [{name}] (iii) ridge {timings['ridge']:.2f}s, logistic {timings['logistic']:.2f}s", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=5000, help="total random samples (80%% train, 20%% test)")
    ap.add_argument("--models", default="resnet20,resnet56", help="comma-separated pnc model names")
    ap.add_argument("--baseline-layers", type=int, default=3,
                    help="layers timed for the per-layer naive baseline (spread from first to last, then scaled)")
    ap.add_argument("--quick", action="store_true", help="resnet20 on 1000 samples, resnet50 widths on 256")
    ap.add_argument("--wide", default="resnet50", help="model for the ResNet-50-width case (iv); 'none' skips it")
    ap.add_argument("--wide-samples", type=int, default=1280, help="samples of case (iv) (80%% train)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core machine, OpenMP barriers stall "
                         "whenever another process holds a core, which swamps every timing; 0 = torch's default)")
    a = ap.parse_args(argv)
    if a.quick:
        a.samples, a.models, a.wide_samples = 1000, "resnet20", 320
    if a.threads:
        torch.set_num_threads(a.threads)
        from threadpoolctl import threadpool_limits

        threadpool_limits(a.threads)  # numpy's BLAS too (the metric functions, the naive baselines)
    print(f"pnc metric bench: {a.samples} samples (train {int(0.8 * a.samples)}, test {a.samples - int(0.8 * a.samples)}),"
          f" {K} classes, batch {BATCH}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    models = [] if a.models == "none" else [name.strip() for name in a.models.split(",")]
    results = [bench_model(name, a.samples, a.baseline_layers, a.seed) for name in models]
    wide = None if a.wide == "none" else bench_wide(a.wide, a.wide_samples, a.seed)

    print()
    hdr = f"{'model':<10} {'layers':>6} {'metric':<58} {'value':>10} {'goal':>10} {'ok':>4}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        rows = [
            ("(i) measure pass / plain forward (time)", r["overhead"], "<= 1.15", r["overhead"] <= 1.15),
            ("(i)   of which: feature taps (FeatureExtractor) / plain", r["taps_ratio"], "(info)", True),
            ("(i-b) + ncc_acc/train from kept features / one plain fwd", r["overhead_sweep"], "<= 1.15",
             r["overhead_sweep"] <= 1.15),
            ("(i-b) + ncc_acc/train by a 2nd train pass / one plain fwd", r["overhead_sweep_2pass"], "(info)", True),
            ("(i)   of which: metric engine / plain", r["engine_ratio"], "(info)", True),
            (f"(ii) speed-up vs naive per-layer ({r['naive_per_layer_measured']} layer(s) timed, x{r['layers']})",
             r["t_naive_per_layer"] / r["t_measure"], ">= 5", r["t_naive_per_layer"] / r["t_measure"] >= 5),
            ("(ii) memory: naive per-layer peak stored / pnc state",
             r["naive_per_layer_peak_bytes"] / r["state_bytes"], "", True),
            ("(ii) memory at N=50,000 train samples (accounted): same ratio", r["mem_ratio_50k"], "", True),
            ("(ii) speed-up vs naive all-layers-stored (1 pass + loops)",
             r["t_naive_stored"] / r["t_measure"], "(info)", True),
            ("(ii) memory: naive all-layers stored / pnc state", r["naive_stored_bytes"] / r["state_bytes"], "", True),
            ("(ii) naive float32 vs pnc: max rel. diff (cdnv/nc1/nc2)", r["naive_vs_pnc_max_rel"], "(info)", True),
            ("(ii) naive float32 vs pnc: max |diff| NCC test accuracy", r["naive_vs_pnc_ncc"], "(info)", True),
            ("(iii) time logistic-per-layer / ridge-all-layers", r["t_logistic"] / r["t_ridge"], "(info)", True),
            ("(iii) test acc ridge - logistic: mean over layers", float(np.mean(r["acc_ridge"] - r["acc_logistic"])),
             "(info)", True),
            ("(iii) test acc ridge - logistic: max |diff|", float(np.max(np.abs(r["acc_ridge"] - r["acc_logistic"]))),
             "(info)", True),
        ]
        for label, v, goal, ok in rows:
            print(f"{r['model']:<10} {r['layers']:>6} {label:<58} {v:>10.3g} {goal:>10} {'yes' if ok else 'NO':>4}")
        print(f"{'':<17} times: plain {r['t_plain']:.1f}s, measure {r['t_measure']:.1f}s, naive per-layer "
              f"{r['t_naive_per_layer']:.0f}s (extrapolated), naive stored {r['t_naive_stored']:.1f}s, ridge "
              f"{r['t_ridge']:.2f}s, logistic {r['t_logistic']:.2f}s")
        print(f"{'':<17} bytes: pnc state {r['state_bytes'] / 2**20:.2f} MiB, naive per-layer peak "
              f"{r['naive_per_layer_peak_bytes'] / 2**20:.2f} MiB, naive stored {r['naive_stored_bytes'] / 2**20:.2f} MiB")
        print(f"{'':<17} probe test acc per layer: ridge {np.round(r['acc_ridge'], 3).tolist()}")
        print(f"{'':<17}                           logistic {np.round(r['acc_logistic'], 3).tolist()}")
    if wide is not None:
        print()
        w64 = wide["float64"]
        print(f"(iv) {wide['model']}, {wide['layers']} taps (D = {sorted(set(w64['dims']))}), {a.wide_samples} samples, "
              f"batch {BATCH}, all default metrics + NC1 on every layer (nc1_dim_cap 2048), ridge probe")
        print(f"{'products':<9} {'plain fwd s':>11} {'taps/plain':>10} {'stream engine/plain':>20} {'goal':>6} {'ok':>4} "
              f"{'final s':>8} {'final/plain':>11} {'state':>10} {'Gram floor/plain':>17}")
        for prec in ("float64", "float32"):
            if prec not in wide:
                continue
            r = wide[prec]
            ratio = r["stream"] / r["plain"]
            print(f"{prec:<9} {r['plain']:>11.1f} {r['taps'] / r['plain']:>10.3f} {ratio:>20.3f} {'<= 0.1':>6} "
                  f"{'yes' if ratio <= 0.1 else 'NO':>4} {r['final']:>8.1f} {r['final'] / r['plain']:>11.3f} "
                  f"{r['state'] / 2**20:>7.0f} MiB {r.get('floor', float('nan')) / r['plain']:>17.3f}")
        print("  (final: once per measurement, independent of N; over a full training split it is a small share)")
        print("  (Gram floor: full D x D products over every sample's features per tap, 512 rows each, the least any exact"
              " NC1 + ridge probe must multiply; a symmetric product does half of it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
