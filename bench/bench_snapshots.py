"""Cost of snapshots (``measure.epochs``): a training run with 6 snapshots vs the same run without, side by side
in one process (ABBA order, so that load on a shared machine affects both alike), on the embedded digits data.

Prints the overhead ratio (median time with snapshots / median time without) next to the predicted bound
1 + 6 x (measurement pass / training epoch) + 5%, where the measurement pass (the cell's one-pass measurement of
every tapped layer on the measured splits, as a snapshot runs it) and the training epoch are timed in the same run.

    python bench/bench_snapshots.py                              # resnet8, 16 px, 12 epochs, the spec's metrics
    python bench/bench_snapshots.py --model resnet20 --epochs 18 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="specs/digits_depth.yaml")
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--snapshots", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2, help="pairs of runs (ABBA order)")
    args = ap.parse_args()

    import torch

    from pnc.cells import expand
    from pnc.data.registry import load_cell_data
    from pnc.data.torchdata import ImageDataset
    from pnc.engine import build_cell_model, measure_model
    from pnc.snapshots import Snapshots
    from pnc.spec import load_spec
    from pnc.train import make_accelerator, seed_everything, train

    every = max(1, args.epochs // args.snapshots)
    epochs = [i * every for i in range(args.snapshots)]  # 0 (initialisation) ... , all before the final epoch
    spec = load_spec(args.spec, [f"models=[{args.model}]", f"train.epochs={args.epochs}", f"measure.epochs={epochs}"])
    cell = expand(spec)[0]
    data = load_cell_data(spec, cell)
    size, ch, k = spec.dataset.size, spec.dataset.info.channels, spec.dataset.info.num_classes
    splits = {"train": ImageDataset(data.train, image_size=size, channels=ch),
              "test": ImageDataset(data.test, image_size=size, channels=ch)}
    acc = make_accelerator(spec.train.precision, spec.train.grad_accum_steps)

    def measure(model):
        return measure_model(model, spec, splits, accelerator=acc, num_classes=k, label_names=("train",), progress=False)

    def run(with_snapshots: bool) -> float:
        seed_everything(spec.train.seed)
        model = build_cell_model(spec, cell.model)
        ds = ImageDataset(data.train, image_size=size, channels=ch)
        snaps = Snapshots(epochs, args.epochs, measure) if with_snapshots else None
        t0 = time.perf_counter()
        train(model, ds, spec.train, accelerator=acc, progress=False, snapshots=snaps)
        seconds = time.perf_counter() - t0
        if with_snapshots:
            assert sorted(snaps.taken) == epochs, snaps.taken.keys()
        return seconds

    def measurement_pass() -> float:
        seed_everything(spec.train.seed)
        model = build_cell_model(spec, cell.model).to(acc.device)
        measure(model)  # first-call overheads, as in training (where the network has run already)
        t0 = time.perf_counter()
        measure(model)
        return time.perf_counter() - t0

    print(f"{args.model}, {spec.dataset.name} {size} px, {len(data.train.labels)} training samples, {args.epochs} epochs, "
          f"snapshots at {epochs}, metrics {list(spec.measure.metrics)}, torch threads {torch.get_num_threads()}", flush=True)
    run(False)  # warm-up (allocator, first-call overheads)
    plain, snap, passes = [], [], []
    for i in range(args.repeats):
        for with_snapshots in ((False, True) if i % 2 == 0 else (True, False)):
            (snap if with_snapshots else plain).append(run(with_snapshots))
            print(f"  run {'with' if with_snapshots else 'without'} snapshots: "
                  f"{(snap if with_snapshots else plain)[-1]:.2f} s", flush=True)
        passes.append(measurement_pass())
    t_plain, t_snap, t_pass = statistics.median(plain), statistics.median(snap), statistics.median(passes)
    t_epoch = t_plain / args.epochs
    ratio = t_snap / t_plain
    bound = 1 + args.snapshots * t_pass / t_epoch + 0.05
    print(f"training epoch {t_epoch:.3f} s, measurement pass {t_pass:.3f} s (median of {len(passes)})")
    print(f"overhead ratio {ratio:.3f} (with {t_snap:.2f} s / without {t_plain:.2f} s); predicted bound "
          f"1 + {args.snapshots} x {t_pass:.3f} / {t_epoch:.3f} + 5% = {bound:.3f}: {'within' if ratio <= bound else 'ABOVE'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
