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
    splits (80/20), batch 128. The two selections alternate ``--repeats`` times in ABBA order; the ratio of the
    minima (background load only ever adds time) and of the medians is reported. Goal <= 1.05. Then the metric
    engine alone: the same features extracted once and measured from memory with each selection, so the extra
    time of the family is seen without the forward passes' noise.
(b) ``scaling``: synthetic features (no network: a random class mean per class plus unit noise, float32,
    ``--n`` training samples, a test split of a quarter of that) of dimension D for K classes, one tapped layer:
    time of ``measure`` (minimum over ``--scaling-repeats`` ABBA alternations) with the default and with every
    metric, the part of it spent after the pass on the
    metrics from class statistics (``geometry`` + every registered function, timed directly on the same summary),
    and the accumulator state (``Measurements.info["state_bytes"]``, train + test), per (K, D). State is
    O(K·D + D²) float64 (class means and, for the ridge probe / NC1, the D x D scatter); the extra cost of the
    family is O(K²·D) once per layer (pairwise distances of the class means, cdnv_matrix) plus, for NC4, one
    B x D x K product per eval batch.

Timings use ``--threads`` torch and BLAS threads (default 1: on a shared 2-core machine OpenMP barriers stall
whenever another process holds a core) and, by default, this process's CPU time (``--clock cpu``; ``wall`` for
elapsed time): on a loaded machine elapsed time varies by +-20% from run to run, CPU time by far less.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnc.metrics import measure  # noqa: E402
from pnc.metrics.collapse import geometry  # noqa: E402
from pnc.metrics.geometry import REGISTRY  # noqa: E402
from pnc.metrics.registry import MetricWarning  # noqa: E402

BATCH = 128
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]  # --clock
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
        order = (("default", DEFAULT), ("all", ALL)) if r % 2 == 0 else (("all", ALL), ("default", DEFAULT))  # ABBA
        for name, metrics in order:
            t0 = clock()
            m = measure(extract, batches(x, y, tr), batches(x, y, te), num_classes=k, metrics=metrics, progress=False)
            times[name].append(clock() - t0)
            out[name] = m
            print(f"  [{model_name}] repeat {r + 1}/{repeats} {name:<7} {times[name][-1]:.1f}s", flush=True)
    # the metric engine alone: the same features extracted once, then measured from memory
    cache = {}
    for split, ids in (("train", tr), ("test", te)):
        parts = [fe(x[j])[1] for j in torch.split(ids, BATCH)]
        cache[split] = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    fe.close()

    def cached(split, ids):
        for i in range(0, len(ids), BATCH):
            j = torch.arange(i, min(i + BATCH, len(ids)))
            yield (split, j), y[ids[j]], ids[j]

    engine: dict[str, list[float]] = {"default": [], "all": []}
    for r in range(repeats):
        order = (("default", DEFAULT), ("all", ALL)) if r % 2 == 0 else (("all", ALL), ("default", DEFAULT))
        for name, metrics in order:
            t0 = clock()
            measure(lambda key: {n: v[key[1]] for n, v in cache[key[0]].items()}, cached("train", tr), cached("test", te),
                    num_classes=k, metrics=metrics, progress=False)
            engine[name].append(clock() - t0)
    stat = {f: {name: f(t) for name, t in times.items()} for f in (min, statistics.median)}
    estat = {f: {name: f(t) for name, t in engine.items()} for f in (min, statistics.median)}
    return {"model": model_name, "layers": len(out["all"].layers), "n": n, "times": times, "engine": engine,
            "min": stat[min], "median": stat[statistics.median], "engine_min": estat[min],
            "ratio_min": stat[min]["all"] / stat[min]["default"],
            "ratio_median": stat[statistics.median]["all"] / stat[statistics.median]["default"],
            "engine_extra_min": estat[min]["all"] - estat[min]["default"],
            "keys_default": len(out["default"].metrics), "keys_all": len(out["all"].metrics),
            "matrices": len(out["all"].matrices),
            "state_default": sum(out["default"].info["state_bytes"].values()),
            "state_all": sum(out["all"].info["state_bytes"].values())}


# ----------------------------------------------------------------------------- (b) growth with K and D
def bench_scaling(k: int, d: int, n: int, seed: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    n_te = n // 4
    means = torch.randn(k, d, generator=g) * 2.0
    y = torch.cat([torch.arange(k), torch.randint(0, k, (n + n_te - k,), generator=g)])  # every class present
    feats = (means[y] + torch.randn(n + n_te, d, generator=g)).float()
    tr, te = torch.arange(n), torch.arange(n, n + n_te)
    extract = lambda j: {"h": feats[j]}  # noqa: E731
    res: dict = {"K": k, "D": d, "n": n, "t_default": math.inf, "t_all": math.inf}
    ids = torch.arange(n + n_te)  # x of a batch = its sample indices; extract looks the features up
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)  # NC1 is NaN above nc1_dim_cap: expected here
        for r in range(repeats):
            order = (("default", DEFAULT), ("all", ALL)) if r % 2 == 0 else (("all", ALL), ("default", DEFAULT))  # ABBA
            for name, metrics in order:
                t0 = clock()
                m = measure(extract, batches(ids, y, tr), batches(ids, y, te), num_classes=k, metrics=metrics, progress=False)
                res[f"t_{name}"] = min(res[f"t_{name}"], clock() - t0)
                res[f"state_{name}"] = sum(m.info["state_bytes"].values())
    # the post-pass part: every class-statistics metric on the training summary, timed alone
    from pnc.metrics import class_summary

    s = class_summary(feats[tr], y[tr], k, scatter=d <= 1024)
    t0 = clock()
    geo = geometry(s)
    for metric in REGISTRY.from_class_stats():
        if "classifier" not in metric.needs and ("scatter" not in metric.needs or s.scatter is not None):
            metric.compute(geo)
    res["t_family_post"] = clock() - t0
    t0 = clock()
    geo = geometry(s)
    for name in ("cdnv", "nc2") + (("nc1",) if s.scatter is not None else ()):
        REGISTRY[name].compute(geo)
    res["t_default_post"] = clock() - t0
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
    ap.add_argument("--repeats", type=int, default=4, help="(a) alternations of the two selections (ABBA order)")
    ap.add_argument("--ks", default="10,100,1000", help="(b) numbers of classes")
    ap.add_argument("--dims", default="512,2048", help="(b) feature dimensions")
    ap.add_argument("--n", type=int, default=8000, help="(b) synthetic training samples (test: a quarter)")
    ap.add_argument("--scaling-repeats", type=int, default=2, help="(b) alternations per (K, D); the minimum is shown")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="cpu",
                    help="cpu: this process's CPU time (default: other processes' load does not inflate it); wall: elapsed")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    a = ap.parse_args(argv)
    if a.quick:
        a.model, a.samples, a.repeats, a.ks, a.dims, a.n, a.scaling_repeats = "resnet20", 600, 2, "10,100", "256,512", 2000, 1
    global clock
    clock = CLOCKS[a.clock]
    if a.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(a.threads)
        threadpool_limits(a.threads)  # numpy's BLAS too: oversubscribed OpenBLAS threads stall on a shared machine
    print(f"pnc family bench: torch {torch.__version__}, {torch.get_num_threads()} thread(s), {a.clock} time; every metric = "
          f"{list(ALL)}; default = {list(DEFAULT)}", flush=True)
    if a.part in ("pass", "both"):
        r = bench_pass(a.model, a.samples, a.repeats, a.seed)
        print(f"\n(a) {r['model']}, {r['layers']} tapped layers, {r['n']} samples (32 px), batch {BATCH}, "
              f"{a.repeats} alternation(s) (ABBA order)")
        print(f"{'selection':<10} {'min s':>7} {'median s':>9} {'passes s':<34} {'engine min s':>12} {'keys':>5} {'state MiB':>10}")
        for name in ("default", "all"):
            print(f"{name:<10} {r['min'][name]:>7.2f} {r['median'][name]:>9.2f} "
                  f"{', '.join(f'{t:.2f}' for t in r['times'][name]):<34} {r['engine_min'][name]:>12.2f} "
                  f"{r['keys_' + name] + (r['matrices'] if name == 'all' else 0):>5} {mib(r['state_' + name]):>10}")
        print(f"ratio every metric / default: {r['ratio_min']:.3f} (min), {r['ratio_median']:.3f} (median); goal <= 1.05: "
              f"{'yes' if r['ratio_min'] <= 1.05 else 'NO'}. The engine alone (features from memory) takes "
              f"{r['engine_extra_min']:+.2f}s more with every metric: "
              f"{r['engine_extra_min'] / r['min']['default']:+.1%} of the default pass.")
    if a.part in ("scaling", "both"):
        rows = [bench_scaling(int(k), int(d), a.n, a.seed, a.scaling_repeats) for d in a.dims.split(",") for k in a.ks.split(",")]
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
