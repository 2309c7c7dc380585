"""Worker for tests/test_train_distributed.py, started by torchrun with 2 processes (gloo, CPU).

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/dist_train_worker.py MODE OUT_DIR [N BATCH EPOCHS]

MODE ``visits``: trains a small network without BatchNorm (:func:`plain_net`) with :func:`pnc.train.train` on N
synthetic samples for EPOCHS epochs with global batch BATCH, records every sample key the training loop fetches on
this process and writes them, with the training result, to ``OUT_DIR/rank<R>.json``; rank 0 saves the trained
weights to ``OUT_DIR/weights.pt``.

MODE ``diverge``: runs ``pnc run specs/digits_depth.yaml`` (one ResNet-8 cell, one epoch of one global batch) with
the network's logits multiplied by 1e4 on rank 1 only: rank 1's loss is far above ``train.max_loss``, rank 0's is
not. Each rank writes what it saw (``rank<R>.json``: the TrainingError's message or none, and pnc's exit code).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np


def plain_net():
    """A small network without BatchNorm: its gradient over a global batch does not depend on how the batch is
    split between processes, so 1 and 2 processes must follow the same path up to float rounding."""
    import torch

    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(32, 4))


def synthetic_dataset(n: int):
    from pnc.data.base import ImageSplit
    from pnc.data.torchdata import ImageDataset

    rng = np.random.default_rng(0)
    split = ImageSplit("synthetic", [str(i) for i in range(4)], rng.integers(0, 4, n),
                       images=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8))

    class Recording(ImageDataset):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.seen: list[int] = []

        def __getitem__(self, key: int):
            self.seen.append(int(key))
            return super().__getitem__(key)

    return Recording(split, image_size=8, channels=1)


def train_plain(n: int, batch: int, epochs: int):
    """(dataset, model, TrainResult, accelerator) of the plain network trained on ``n`` synthetic samples."""
    import torch

    from pnc.spec import TrainSpec
    from pnc.train import make_accelerator, train

    ds = synthetic_dataset(n)
    tspec = TrainSpec(epochs=epochs, batch_size=batch, seed=5, optimizer={"lr": 0.05})
    acc = make_accelerator("fp32", 1)
    torch.manual_seed(0)
    model = plain_net()
    result = train(model, ds, tspec, accelerator=acc, progress=False)
    return ds, acc.unwrap_model(model), result, acc


def visits(out: Path, n: int, batch: int, epochs: int) -> None:
    import torch

    from pnc.train import shutdown

    ds, model, result, acc = train_plain(n, batch, epochs)
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(
        {"world": acc.num_processes, "n": n, "keys": ds.seen, "loss": result.loss, "acc": result.acc}))
    if acc.is_main_process:
        torch.save(model.state_dict(), out / "weights.pt")
    shutdown(acc)


def diverge(out: Path, sets: list[str]) -> None:
    from pnc import engine
    from pnc.cli import main

    rank = int(os.environ["RANK"])
    build = engine.build_cell_model

    def exploding(*a, **k):  # rank 1's data "diverges": its logits are 1e4 times too large
        model = build(*a, **k)
        if rank == 1:
            model.register_forward_hook(lambda m, i, o: o * 1e4)
        return model

    engine.build_cell_model = exploding
    seen: dict = {"error": None}
    execute = engine.StudyRun.execute

    def recording(self, run_id, work, **kw):
        def wrapped():
            try:
                return work()
            except engine.TrainingError as e:
                seen["error"] = str(e)
                raise
        return execute(self, run_id, wrapped, **kw)

    engine.StudyRun.execute = recording
    rc = main(["run", "specs/digits_depth.yaml", "--no-progress", *sets])
    (out / f"rank{rank}.json").write_text(json.dumps({**seen, "rc": rc}))
    # exit 0 whatever pnc returned (the test reads rc from the file): a worker exiting non-zero makes torchrun
    # terminate the other one, which may not have written its file yet


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    if mode == "visits":
        visits(out_dir, *(int(a) for a in sys.argv[3:6]))
    else:
        diverge(out_dir, sys.argv[3:])
