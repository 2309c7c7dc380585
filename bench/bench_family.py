#!/usr/bin/env python
"""Cost of the whole neural-collapse family (issue 15) on this machine's CPU (a script, not a test).

    python bench/bench_family.py                       # both parts, defaults below
    python bench/bench_family.py --quick               # resnet20, 600 samples; K in {10, 100}, D in {256, 512}
    python bench/bench_family.py --part scaling --ks 10,100,1000 --dims 512,2048

(a) ``pass``: the measurement pass of ``pnc.metrics.measure`` with **every** selectable metric of the registry
    (``REGISTRY.selectable()``: the NC1-NC4 family, the trace ratio, GNC2, UNC3, NC4, ``cdnv_matrix``, NCC,
    ridge probe) against the **default** selection (``REGISTRY.defaults()``: cdnv, nc1, nc2, ncc, probe), on the
    same network and batches, in one run: ResNet-56 (``pnc.models.build_model``, 10 classes) at initialisation on
    random 32 x 32 x 3 inputs (a template per class plus noise), every block tapped with avgpool, train and test
    splits (80/20), batch 128. The two selections alternate ``--repeats`` times (default, all, default, all, ...)
    and the ratio of the medians is reported. Goal <= 1.05.
(b) ``scaling``: synthetic features (no network: a random class mean per class plus unit noise, float32,
    ``--n`` training samples, a test split of a quarter of that) of dimension D for K classes, one tapped layer:
    time of ``measure`` with the default and with every metric, the part of it spent after the pass on the
    metrics from class statistics (``geometry`` + every registered function, timed directly on the same summary),
    and the accumulator state (``Measurements.info["state_bytes"]``, train + test), per (K, D). State is
    O(K·D + D²) float64 (class means and, for the ridge probe / NC1, the D x D scatter); the extra cost of the
    family is O(K²·D) once per layer (pairwise distances of the class means, cdnv_matrix) plus, for NC4, one
    B x D x K product per eval batch.

Timings use ``--threads`` torch and BLAS threads (default 1: on a shared 2-core machine OpenMP barriers stall
whenever another process holds a core).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnc.metrics import measure  # noqa: E402
from pnc.metrics.collapse import geometry  # noqa: E402
from pnc.metrics.geometry import REGISTRY  # noqa: E402

BATCH = 128
ALL = REGISTRY.selectable()
DEFAULT = REGISTRY.defaults()


def batches(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, bs: int = BATCH):
    for i in range(0, len(idx), bs):
        j = idx[i:i + bs]
        yield x[j], y[j], j


# ----------------------------------------------------------------------------- (a) the pass, every metric vs default
def bench_pass(model_name: str, n: int, repeats: int, seed: int) -> dict:
    from pnc.features import FeatureExtractor
    from pnc.models import build_model

    k = 10
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(k, 3, 32, 32, generator=g) * 0.5
    y = torch.randint(0, k, (n,), generator=g)
    x = templates[y] + torch.randn(n, 3, 32, 32, generator=g)
    idx = torch.randperm(n, generator=g)
    tr, te = idx[:int(0.8 * n)], idx[int(0.8 * n):]
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=k, in_chans=3, image_size=32).eval()
    fe = FeatureExtractor(model, layers="blocks", reduction="avgpool")
    extract = lambda xb: fe(xb)[1]  # noqa: E731
    fe(x[:BATCH])  # warm-up: one untimed pass
    measure(extract, batches(x, y, tr[:2 * BATCH]), batches(x, y, te[:BATCH]), num_classes=k, metrics=ALL, progress=False)
    times: dict[str, list[float]] = {"default": [], "all": []}
    out = {}
    for r in range(repeats):
        for name, metrics in (("default", DEFAULT), ("all", ALL)):
            t0 = time.perf_counter()
            m = measure(extract, batches(x, y, tr), batches(x, y, te), num_classes=k, metrics=metrics, progress=False)
            times[name].append(time.perf_counter() - t0)
            out[name] = m
            print(f"  [{model_name}] repeat {r + 1}/{repeats} {name:<7} {times[name][-1]:.1f}s", flush=True)
    fe.close()
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"model": model_name, "layers": len(out["all"].layers), "n": n, "times": times, "median": med,
            "ratio": med["all"] / med["default"], "keys_default": len(out["default"].metrics),
            "keys_all": len(out["all"].metrics), "matrices": len(out["all"].matrices),
            "state_default": sum(out["default"].info["state_bytes"].values()),
            "state_all": sum(out["all"].info["state_bytes"].values())}


# ----------------------------------------------------------------------------- (b) growth with K and D
def bench_scaling(k: int, d: int, n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    n_te = n // 4
    means = torch.randn(k, d, generator=g) * 2.0
    y = torch.cat([torch.arange(k), torch.randint(0, k, (n + n_te - k,), generator=g)])  # every class present
    feats = (means[y] + torch.randn(n + n_te, d, generator=g)).float()
    tr, te = torch.arange(n), torch.arange(n, n + n_te)
    extract = lambda j: {"h": feats[j]}  # noqa: E731
    res: dict = {"K": k, "D": d, "n": n}
    for name, metrics in (("default", DEFAULT), ("all", ALL)):
        t0 = time.perf_counter()
        ids = torch.arange(n + n_te)  # x of a batch = its sample indices; extract looks the features up
        m = measure(extract, batches(ids, y, tr), batches(ids, y, te), num_classes=k, metrics=metrics, progress=False)
        res[f"t_{name}"] = time.perf_counter() - t0
        res[f"state_{name}"] = sum(m.info["state_bytes"].values())
    # the post-pass part: every class-statistics metric on the training summary, timed alone
    from pnc.metrics import class_summary

    s = class_summary(feats[tr], y[tr], k, scatter=d <= 1024)
    t0 = time.perf_counter()
    geo = geometry(s)
    for metric in REGISTRY.from_class_stats():
        if "classifier" not in metric.needs and ("scatter" not in metric.needs or s.scatter is not None):
            metric.compute(geo)
    res["t_family_post"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    geo = geometry(s)
    for name in ("cdnv", "nc2") + (("nc1",) if s.scatter is not None else ()):
        REGISTRY[name].compute(geo)
    res["t_default_post"] = time.perf_counter() - t0
    res["matrix_bytes"] = k * k * 8  # one cdnv_matrix per layer and split, float64 (the artifact, uncompressed)
    print(f"  K={k:<5} D={d:<5} default {res['t_default']:.2f}s, all {res['t_all']:.2f}s", flush=True)
    return res


def mib(b: float) -> str:
    return f"{b / 2**20:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("pass", "scaling", "both"), default="both")
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--samples", type=int, default=2000, help="(a) random images, 80%% train, 20%% test")
    ap.add_argument("--repeats", type=int, default=3, help="(a) alternations of the two selections")
    ap.add_argument("--ks", default="10,100,1000", help="(b) numbers of classes")
    ap.add_argument("--dims", default="512,2048", help="(b) feature dimensions")
    ap.add_argument("--n", type=int, default=8000, help="(b) synthetic training samples (test: a quarter)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    a = ap.parse_args(argv)
    if a.quick:
        a.model, a.samples, a.repeats, a.ks, a.dims, a.n = "resnet20", 600, 1, "10,100", "256,512", 2000
    if a.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(a.threads)
        threadpool_limits(a.threads)  # numpy's BLAS too: oversubscribed OpenBLAS threads stall on a shared machine
    print(f"pnc family bench: torch {torch.__version__}, {torch.get_num_threads()} thread(s); every metric = "
          f"{list(ALL)}; default = {list(DEFAULT)}", flush=True)
    if a.part in ("pass", "both"):
        r = bench_pass(a.model, a.samples, a.repeats, a.seed)
        print(f"\n(a) {r['model']}, {r['layers']} tapped layers, {r['n']} samples (32 px), batch {BATCH}, "
              f"{a.repeats} alternation(s)")
        print(f"{'selection':<10} {'median s':>9} {'runs s':<30} {'keys':>5} {'state MiB':>10}")
        for name in ("default", "all"):
            print(f"{name:<10} {r['median'][name]:>9.2f} {', '.join(f'{t:.2f}' for t in r['times'][name]):<30} "
                  f"{r['keys_' + name] + (r['matrices'] if name == 'all' else 0):>5} {mib(r['state_' + name]):>10}")
        print(f"ratio every metric / default: {r['ratio']:.3f} (goal <= 1.05: {'yes' if r['ratio'] <= 1.05 else 'NO'})")
    if a.part in ("scaling", "both"):
        rows = [bench_scaling(int(k), int(d), a.n, a.seed) for d in a.dims.split(",") for k in a.ks.split(",")]
        print(f"\n(b) synthetic features, one layer, {a.n} train + {a.n // 4} test samples, batch {BATCH}")
        hdr = (f"{'K':>5} {'D':>5} {'state MiB':>9} {'t default s':>11} {'t all s':>8} {'all/def':>7} "
               f"{'post def s':>10} {'post all s':>10} {'matrix MiB':>10}")
        print(hdr)
        print("-" * len(hdr))
        for r in rows:
            assert r["state_all"] == r["state_default"], "the family needs no state beyond the default's"
            print(f"{r['K']:>5} {r['D']:>5} {mib(r['state_all']):>9} {r['t_default']:>11.2f} {r['t_all']:>8.2f} "
                  f"{r['t_all'] / r['t_default']:>7.3f} {r['t_default_post']:>10.3f} {r['t_family_post']:>10.3f} "
                  f"{mib(r['matrix_bytes']):>10}")
        print("state: float64 accumulators of train + test (means K·D, ridge/NC1 scatter D², per part); post: the "
              "class-statistics metrics after the pass (default: cdnv, nc2, nc1 where D <= 1024; all: every one); "
              "matrix: one cdnv_matrix (K² float64) per layer and split")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
