#!/usr/bin/env python
"""How the metric engine's cost grows with N, K, D and L (a script, not a test; issue #18 part 2).

    python bench/bench_scale.py                  # the grid below, a few minutes on 2 CPU cores
    python bench/bench_scale.py --quick          # smoke run (seconds)
    python bench/bench_scale.py --device cuda    # the same on a GPU

Synthetic features are streamed through ``pnc.metrics.measure`` (no network): ``extract`` returns, for
each of L layers, a pre-generated (B, D) float32 block (class templates plus unit noise; generating it
is outside the timing), labels uniform over K classes, batch B = 256. The metrics are every one computed
from class statistics that needs no classifier (cdnv, nc1, nc1_tr, nc2, equinorm, equiangle, max_angle,
gnc2), no probe, ``nc1_dim_cap`` = D (NC1 on every layer). Reported per configuration:

* ``stream``: seconds in the training pass (the per-batch statistics update), measured from the first
  batch handed out to the last; ``final``: seconds after the pass (the merge and every metric from the
  summaries: pair distances, the SVD of NC1, ...); ``state``: bytes of accumulator state
  (``Measurements.info["state_bytes"]``), which does not depend on N.
* the naive stored-features baseline: keep every layer's features (float32, N x D per layer), then at
  the end compute the same statistics in float64 from the stored matrix (class means, centred
  features, one D x D product) and the same metric functions; its bytes are the stored features; run
  only where they fit ``--naive-max-bytes``.

One factor varies at a time around the base point (N = 10^4, K = 100, D = 512, L = 1). L is measured
up to ``--max-l`` and extrapolated linearly to 50 (each layer has its own accumulator and the pass
does the same work per layer, so time and state are linear in L; the fitted exponent of the measured
points says how linear). Fitted exponents: least squares of log(time) and log(bytes) on log(factor).
Last, a projection: per-batch stream time and per-layer final time measured at K = 1000 for
D = 256, 512, 1024, 2048 (ResNet-152's stage widths, 3 / 8 / 36 / 3 blocks) give the engine's cost of a
measurement pass over ImageNet's 1.28M training images.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnc.metrics import measure  # noqa: E402
from pnc.metrics.collapse import geometry  # noqa: E402
from pnc.metrics.geometry import REGISTRY  # noqa: E402
from pnc.metrics.stats import ClassSummary  # noqa: E402

B = 256
BASE = {"N": 10_000, "K": 100, "D": 512, "L": 1}
METRICS = tuple(m.name for m in REGISTRY.from_class_stats() if "classifier" not in m.needs and m.kind == "scalar")
RESNET152 = {256: 3, 512: 8, 1024: 36, 2048: 3}  # block output widths of ResNet-152's four stages
IMAGENET_N = 1_281_167


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Source:
    """Pre-generated batches: a few distinct (B, D) blocks cycled over N samples."""

    def __init__(self, n: int, k: int, d: int, device: torch.device, blocks: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        templates = torch.randn(k, d, generator=g) * 2.0
        self.blocks = []
        for _ in range(blocks):
            y = torch.randint(0, k, (B,), generator=g)
            x = templates[y] + torch.randn(B, d, generator=g)
            self.blocks.append((x.to(device), y.to(device)))
        self.n, self.device = n, device

    def batches(self, clock: dict):
        sync(self.device)
        clock["start"] = time.perf_counter()
        for i, s in enumerate(range(0, self.n, B)):
            x, y = self.blocks[i % len(self.blocks)]
            m = min(B, self.n - s)
            yield x[:m], y[:m], torch.arange(s, s + m, device=self.device)
        sync(self.device)
        clock["end"] = time.perf_counter()


def run_engine(n: int, k: int, d: int, layers: int, device: torch.device) -> dict:
    src = Source(n, k, d, device)
    names = [f"layer{i}" for i in range(layers)]
    clock: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        m = measure(lambda x: {nm: x for nm in names}, src.batches(clock), num_classes=k, metrics=METRICS,
                    probe=None, nc1_dim_cap=d, progress=False)
        sync(device)
        t1 = time.perf_counter()
    assert m.samples["train"] == n
    return {"stream": clock["end"] - clock["start"], "final": t1 - clock["end"], "total": t1 - t0,
            "state": m.info["state_bytes"]["train"]}


def run_naive(n: int, k: int, d: int, layers: int, device: torch.device) -> dict:
    """Store every layer's features (float32), then the same statistics and metrics at the end."""
    src = Source(n, k, d, device)
    clock: dict = {}
    t0 = time.perf_counter()
    store: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    ys = []
    for x, y, _ in src.batches(clock):
        for li in range(layers):
            store[li].append(x.float().clone())
        ys.append(y)
    yy = torch.cat(ys)
    feats = [torch.cat(s) for s in store]
    del store
    stored = sum(f.numel() * f.element_size() for f in feats) + yy.numel() * yy.element_size()
    t_store = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in feats:
            h = f.double()
            cnt = torch.bincount(yy, minlength=k)
            mean = torch.zeros(k, d, dtype=torch.float64, device=device).index_add_(0, yy, h)
            mean /= cnt.clamp_min(1).unsqueeze(1)
            u = h - mean[yy]
            q = torch.zeros(k, dtype=torch.float64, device=device).index_add_(0, yy, u.square().sum(1))
            g = geometry(ClassSummary(cnt, mean, q, u.T @ u))
            for name in METRICS:
                REGISTRY[name].compute(g)
    sync(device)
    return {"total": time.perf_counter() - t0, "store": t_store, "bytes": stored}


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    """Slope of the least-squares line of log(y) on log(x)."""
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    return float(np.polyfit(lx, ly, 1)[0]) if len(xs) >= 2 else math.nan


def fmt_bytes(b: float) -> str:
    for unit, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= s:
            return f"{b / s:.1f} {unit}"
    return f"{b:.0f} B"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: a tiny grid")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--max-n", type=int, default=1_000_000)
    ap.add_argument("--max-l", type=int, default=8, help="largest L measured (then extrapolated linearly to 50)")
    ap.add_argument("--naive-max-bytes", type=float, default=2**30, help="largest stored-features baseline run")
    ap.add_argument("--no-projection", action="store_true", help="skip the ResNet-152 / ImageNet projection")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
        from threadpoolctl import threadpool_limits

        threadpool_limits(a.threads)  # numpy's BLAS too (the metric functions, the naive baselines)
    if a.quick:
        grid = {"N": [2_000, 8_000], "K": [10, 100], "D": [64, 256], "L": [1, 2]}
        base = {"N": 2_000, "K": 10, "D": 64, "L": 1}
    else:
        grid = {"N": [n for n in (10_000, 100_000, 1_000_000) if n <= a.max_n],
                "K": [10, 100, 1000], "D": [64, 256, 512, 1024, 2048],
                "L": [n for n in (1, 2, 4, 8, 16, 32, 50) if n <= a.max_l]}
        base = dict(BASE)
    print(f"pnc scale bench: device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {B}, "
          f"metrics {','.join(METRICS)}; base point {base}", flush=True)
    run_engine(1_000, 10, 64, 1, device)  # warm-up
    rows = []
    for factor, values in grid.items():
        for v in values:
            cfg = {**base, factor: v}
            n, k, d, nl = cfg["N"], cfg["K"], cfg["D"], cfg["L"]
            r = run_engine(n, k, d, nl, device)
            naive_bytes = n * d * 4 * nl
            nv = run_naive(n, k, d, nl, device) if naive_bytes <= a.naive_max_bytes else None
            rows.append({"factor": factor, **cfg, **r, "naive": nv})
            nv_txt = f"naive {nv['total']:.2f}s {fmt_bytes(nv['bytes'])}" if nv else "naive: too large"
            print(f"  {factor}={v}: stream {r['stream']:.2f}s final {r['final']:.2f}s state {fmt_bytes(r['state'])}; "
                  f"{nv_txt}", flush=True)

    print()
    hdr = (f"{'vary':<4} {'N':>9} {'K':>5} {'D':>5} {'L':>3} {'stream s':>9} {'ms/batch/layer':>14} {'final s':>8} "
           f"{'state':>10} {'naive s':>8} {'naive bytes':>11} {'naive/pnc time':>14}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        nb = math.ceil(r["N"] / B)
        nv = r["naive"]
        nv_t = f"{nv['total']:.3f}" if nv else "-"
        nv_b = fmt_bytes(nv["bytes"]) if nv else "-"
        nv_r = f"{nv['total'] / r['total']:.2f}" if nv else "-"
        print(f"{r['factor']:<4} {r['N']:>9} {r['K']:>5} {r['D']:>5} {r['L']:>3} {r['stream']:>9.3f} "
              f"{1e3 * r['stream'] / nb / r['L']:>14.2f} {r['final']:>8.3f} {fmt_bytes(r['state']):>10} "
              f"{nv_t:>8} {nv_b:>11} {nv_r:>14}")
    print()
    print("fitted exponents (log-log least squares, one factor varied around the base point):")
    for factor in grid:
        sel = [r for r in rows if r["factor"] == factor]
        xs = [r[factor] for r in sel]
        print(f"  {factor}: stream time ~ {factor}^{fit_exponent(xs, [r['stream'] for r in sel]):.2f}, "
              f"final time ~ {factor}^{fit_exponent(xs, [r['final'] for r in sel]):.2f}, "
              f"state ~ {factor}^{fit_exponent(xs, [r['state'] for r in sel]):.2f}")
    lrows = [r for r in rows if r["factor"] == "L"]
    if lrows and max(r["L"] for r in lrows) < 50:
        last = max(lrows, key=lambda r: r["L"])
        f = 50 / last["L"]
        print(f"  L = 50 extrapolated linearly from L = {last['L']}: stream {last['stream'] * f:.1f}s, "
              f"final {last['final'] * f:.1f}s, state {fmt_bytes(last['state'] * f)} (at N, K, D of the base point)")

    if not a.no_projection:
        print()
        print("projection: ResNet-152 taps (D = 256 x3, 512 x8, 1024 x36, 2048 x3), K = 1000, ImageNet train "
              f"N = {IMAGENET_N:,}, batch {B}")
        n_proj = 8 * B if a.quick else 40 * B
        per_batch, per_final, per_state = {}, {}, {}
        for d in RESNET152:
            r = run_engine(n_proj, 1000, d, 1, device)
            per_batch[d] = r["stream"] / (n_proj / B)
            per_final[d], per_state[d] = r["final"], r["state"]
            print(f"  D={d}: {1e3 * per_batch[d]:.1f} ms per batch per layer, final {per_final[d]:.2f}s per layer, "
                  f"state {fmt_bytes(per_state[d])} per layer", flush=True)
        batches = math.ceil(IMAGENET_N / B)
        stream = batches * sum(c * per_batch[d] for d, c in RESNET152.items())
        final = sum(c * per_final[d] for d, c in RESNET152.items())
        state = sum(c * per_state[d] for d, c in RESNET152.items())
        print(f"  => engine cost of one ResNet-152 ImageNet training pass on {device}: stream {stream / 60:.1f} min "
              f"({1e3 * stream / batches:.0f} ms per batch of {B}), final {final:.0f}s, state {fmt_bytes(state)} "
              "(without a probe; the ridge probe keeps its label vector's scatter in two parts, which NC1 "
              "shares: 2x the D^2 state, about the same stream cost, plus ten D x D Cholesky solves per layer)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
