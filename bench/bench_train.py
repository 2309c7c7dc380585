"""Training throughput: pnc's loop (Accelerate, per-epoch checkpoints, divergence checks) vs a plain
PyTorch loop on the same model and data, measured side by side in one run (goal: ratio >= 0.95).

Runs alternate in ABBA order (plain, pnc, pnc, plain, ...) so that load on a shared machine affects both alike;
the ratio of medians is printed. On a GPU, ``--precision bf16`` uses autocast in both loops, and a
measurement pass (all blocks, avgpool, all metrics) is timed too.

    python bench/bench_train.py                      # CPU, CIFAR-style ResNet-20, 32 px
    python bench/bench_train.py --model resnet18 --precision bf16 --samples 20000 --batch-size 256  # GPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnc.data.base import ImageSplit  # noqa: E402
from pnc.data.torchdata import ImageDataset  # noqa: E402
from pnc.models import build_model  # noqa: E402
from pnc.spec import TrainSpec  # noqa: E402
from pnc.train import lr_at, make_accelerator, make_optimizer, train  # noqa: E402


def synthetic(n: int, size: int, classes: int, seed: int = 0) -> ImageSplit:
    rng = np.random.default_rng(seed)
    return ImageSplit("synthetic", [str(i) for i in range(classes)], rng.integers(0, classes, n),
                      images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def plain_loop(model, ds, tspec, device, precision) -> float:
    """The loop a researcher would write by hand: DataLoader, SGD, cross-entropy, optional autocast."""
    from torch.utils.data import DataLoader

    model.to(device).train()
    opt = make_optimizer(model, tspec)
    loader = DataLoader(ds, batch_size=tspec.batch_size, shuffle=True, num_workers=tspec.num_workers,
                        pin_memory=device.type == "cuda")
    loss_fn = torch.nn.CrossEntropyLoss()
    use_amp = precision == "bf16"
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for epoch in range(tspec.epochs):
        for g in opt.param_groups:
            g["lr"] = lr_at(epoch, tspec)
        for x, y, _ in loader:
            x, y = x.to(device, non_blocking=True), y[:, 0].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = loss_fn(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def pnc_loop(model, ds, tspec, precision) -> float:
    acc = make_accelerator(precision)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        train(model, ds, tspec, accelerator=acc, checkpoint=Path(d) / "ckpt.pt", progress=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--measure", action="store_true", help="also time a measurement pass vs a plain forward pass")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    split = synthetic(args.samples, args.image_size, 10)
    ds = ImageDataset(split, image_size=args.image_size, channels=3)
    tspec = TrainSpec(epochs=args.epochs, batch_size=args.batch_size, num_workers=args.workers, precision=args.precision)
    images = args.samples * args.epochs
    plain, ours = [], []
    for r in range(args.repeats + 1):  # the first pair warms up and is discarded; the order alternates (ABBA)
        def run_plain(r: int = r) -> float:
            torch.manual_seed(r)
            return plain_loop(build_model(args.model, num_classes=10, image_size=args.image_size), ds, tspec, device, args.precision)

        def run_pnc(r: int = r) -> float:
            torch.manual_seed(r)
            return pnc_loop(build_model(args.model, num_classes=10, image_size=args.image_size), ds, tspec, args.precision)

        if r % 2:
            t_pnc, t_plain = run_pnc(), run_plain()
        else:
            t_plain, t_pnc = run_plain(), run_pnc()
        if r:
            plain.append(images / t_plain)
            ours.append(images / t_pnc)
        print(f"repeat {r}{' (warm-up)' if r == 0 else ''}: plain {images / t_plain:8.1f} img/s   pnc {images / t_pnc:8.1f} img/s",
              flush=True)
    ratio = statistics.median(ours) / statistics.median(plain)
    print(f"\ndevice {device}, model {args.model}, {args.image_size} px, batch {args.batch_size}, {args.precision}")
    print(f"training throughput: plain {statistics.median(plain):.1f} img/s, pnc {statistics.median(ours):.1f} img/s")
    print(f"ratio pnc / plain = {ratio:.3f}  (goal >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")
    if args.measure:
        bench_measure(args, ds, device)


def bench_measure(args, ds, device) -> None:
    """Measurement pass (all blocks, avgpool, every metric) vs a plain inference pass, same data."""
    from pnc.data.torchdata import shard_loader
    from pnc.features import FeatureExtractor
    from pnc.metrics import measure

    model = build_model(args.model, num_classes=10, image_size=args.image_size).to(device).eval()
    loader = shard_loader(ds, batch_size=256)
    use_amp = args.precision == "bf16"

    def batches():
        for x, y, i in loader:
            yield x.to(device), y.to(device), i.to(device)

    def plain() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            for x, _, _ in batches():
                model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def ours() -> float:
        ex = FeatureExtractor(model, layers="blocks", reduction="avgpool")

        def extract(x):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                return {k: v.float() for k, v in ex(x)[1].items()}

        t0 = time.perf_counter()
        measure(extract, batches(), None, num_classes=10, metrics=("cdnv", "nc1", "nc2"), probe=None, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ex.close()
        return time.perf_counter() - t0

    p, o = [], []
    for r in range(args.repeats + 1):
        tp, to = plain(), ours()
        if r:
            p.append(tp)
            o.append(to)
    n = len(ds)
    print(f"measurement: plain forward {n / statistics.median(p):.1f} img/s, measurement pass {n / statistics.median(o):.1f} img/s, "
          f"time ratio {statistics.median(o) / statistics.median(p):.3f} (goal <= 1.15)")


if __name__ == "__main__":
    main()
