"""Training on several processes: each sample once per epoch, no padding; a loss diverging on one process stops all.

The two-process runs go through torchrun (gloo on the CPU, ``tests/dist_train_worker.py``)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pnc.data.torchdata import EpochShuffle, ShardedBatches, shard_bounds

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_train_worker.py"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), *args]
    env = dict(env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and its workers: a hung worker must not outlive the test
        p.communicate()
        pytest.fail(f"torchrun did not finish within {timeout:.0f}s (a process waiting for the others?)")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@pytest.mark.parametrize("n,batch,world", [(1347, 128, 2), (1347, 128, 3), (129, 128, 2), (10, 4, 3), (7, 8, 5),
                                           (5, 2, 4), (64, 64, 2), (1, 1, 2)])
def test_sharded_batches_cover_each_sample_once_in_the_global_batches(n: int, batch: int, world: int) -> None:
    """Each process takes a contiguous part of every global batch (the 1-process batch); real samples weigh
    world / b (b = the global batch's size); a process left without a sample gets one masked sample (weight 0)."""
    for epoch in (0, 3):
        shuffle = EpochShuffle(n, 11)
        shuffle.set_epoch(epoch)
        one = ShardedBatches(n, batch, 11)
        one.set_epoch(epoch)
        single = list(one)
        assert [k for b in single for k, _ in b] == list(shuffle), "1 process: the epoch's permutation, in batches"
        parts = []
        for rank in range(world):
            s = ShardedBatches(n, batch, 11, rank=rank, world=world)
            s.set_epoch(epoch)
            parts.append(list(s))
            assert len(parts[-1]) == len(s) == len(single), "every process takes part in every global batch"
        seen = Counter()
        for j, global_batch in enumerate(single):
            b = len(global_batch)
            real = [[(k, w) for k, w in p[j] if w > 0] for p in parts]
            assert [k for r in real for k in r] == [(k, world / b) for k, _ in global_batch], "the same global batch"
            assert sorted(len(r) for r in real)[-1] - sorted(len(r) for r in real)[0] <= 1
            for p in parts:
                assert len(p[j]) >= 1
                if not [w for _, w in p[j] if w > 0]:
                    assert p[j] == [(global_batch[0][0], 0.0)], "the masked stand-in weighs nothing"
            assert sum(w for p in parts for _, w in p[j]) == pytest.approx(world)
            seen.update(k for r in real for k, _ in r)
        assert sorted(seen) == list(range(n)) and set(seen.values()) == {1}, "each sample exactly once per epoch"


def test_shard_bounds() -> None:
    assert [shard_bounds(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [shard_bounds(1, r, 3) for r in range(3)] == [(0, 1), (1, 1), (1, 1)]
    assert [shard_bounds(6, r, 3) for r in range(3)] == [(0, 2), (2, 4), (4, 6)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_train_on_each_sample_once_per_epoch_and_follow_the_one_process_path(tmp_path: Path) -> None:
    """1347 samples in global batches of 128 (as digits_depth): Accelerate's prepared loader padded the last batch
    with 61 repeated samples per epoch on 2 processes, trained on them and counted them in train/acc. pnc's
    sharding fetches each sample once per epoch over both processes, train/acc counts the 1347 real samples, and a
    network without BatchNorm ends with the weights, loss and accuracy of the same training on 1 process up to
    float rounding (the gradient of a global batch is summed in two parts, then averaged over the processes)."""
    import torch

    from dist_train_worker import train_plain

    n, batch, epochs = 1347, 128, 2
    r = _torchrun(["visits", str(tmp_path), str(n), str(batch), str(epochs)], tmp_path, dict(os.environ), timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [x["world"] for x in ranks] == [2, 2]
    for epoch in range(epochs):
        got = Counter(k % n for x in ranks for k in x["keys"] if k // n == epoch)
        assert sorted(got) == list(range(n)) and set(got.values()) == {1}, f"epoch {epoch}: {sum(got.values()) - n} repeats"
    correct = ranks[0]["acc"] * n
    assert correct == pytest.approx(round(correct), abs=1e-6), "train/acc counts the real samples only"
    assert ranks[0]["acc"] == ranks[1]["acc"] and ranks[0]["loss"] == ranks[1]["loss"]

    _, one, result, _ = train_plain(n, batch, epochs)  # the same training on this (one) process
    two = torch.load(tmp_path / "weights.pt", weights_only=True)
    for k, v in one.state_dict().items():
        assert torch.allclose(two[k], v, rtol=1e-5, atol=1e-6), (k, (two[k] - v).abs().max().item())
    assert ranks[0]["acc"] == result.acc
    assert ranks[0]["loss"] == pytest.approx(result.loss, rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_loss_diverging_on_one_process_fails_the_cell_on_every_process(tmp_path: Path) -> None:
    """Rank 1's logits are 1e4 times too large (its loss about 7e3), rank 0's loss stays near 2.3, max_loss is 50.
    Every process raises the same TrainingError after the epoch (one collective decides), the cell's run ends
    FAILED with that reason, and torchrun returns within the timeout. Before the check was reduced, rank 1 raised
    alone and rank 0 waited in the next collective until the timeout."""
    d = tmp_path / "project"
    d.mkdir()
    shutil.copytree(ROOT / "specs", d / "specs")
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{d / 'mlflow.db'}")
    sets = ["--set", "models=[resnet8]", "--set", "train.epochs=1", "--set", "train.batch_size=2048",
            "--set", "train.max_loss=50"]
    t0 = time.time()
    r = _torchrun(["diverge", str(tmp_path), *sets], d, env, timeout=300)
    took = time.time() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [x["rc"] for x in ranks] == [1, 1], ranks
    assert ranks[0]["error"] is not None and ranks[0]["error"] == ranks[1]["error"], ranks
    assert ranks[0]["error"].startswith("loss became ") and "at epoch 0 (max_loss 50)" in ranks[0]["error"]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{d / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("digits_depth").experiment_id])
    cells = [x for x in runs if x.data.tags.get("pnc.role") == "cell"]
    assert [x.info.status for x in cells] == ["FAILED"] and cells[0].data.tags["pnc.failure"] == ranks[0]["error"]
    assert [x.info.status for x in runs if x.data.tags.get("pnc.role") == "study"] == ["FAILED"]
    print(f"diverging on one of 2 processes: FAILED in {took:.0f}s")
