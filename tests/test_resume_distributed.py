"""Kill-and-resume continues the same MLflow run to the same result; two CPU processes match one."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lean import LEAN

ROOT = Path(__file__).resolve().parents[1]
SETS = ["--set", "models=[resnet8]", "--set", "train.epochs=6", "--set", "train.batch_size=64", *LEAN]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(d: Path) -> dict:
    return dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{d / 'mlflow.db'}", PYTHONUNBUFFERED="1")


def _project(tmp: Path, name: str) -> Path:
    d = tmp / name
    d.mkdir()
    shutil.copytree(ROOT / "specs", d / "specs")
    return d


def _runs(d: Path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{d / 'mlflow.db'}")
    exp = c.get_experiment_by_name("digits_depth")
    return c, [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("pnc.role") == "cell"]


def _by_step(c, run_id: str, key: str) -> dict[int, set[float]]:
    out: dict[int, set[float]] = {}
    for m in c.get_metric_history(run_id, key):
        out.setdefault(m.step, set()).add(m.value)
    return out


def _layer(c, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(tmp_path: Path) -> None:
    """SIGKILL mid-training, then `pnc run` again: the same MLflow run continues from the checkpoint (the resume point
    is asserted: a restart from epoch 0 would reach the same numbers, training being deterministic) and ends with
    the uninterrupted run's metrics, bit for bit."""
    import json

    import torch

    ref = _project(tmp_path, "ref")
    r = subprocess.run([sys.executable, "-m", "pnc.cli", "run", "specs/digits_depth.yaml", *SETS], cwd=ref, env=_env(ref),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr

    d = _project(tmp_path, "killed")
    p = subprocess.Popen([sys.executable, "-m", "pnc.cli", "run", "specs/digits_depth.yaml", *SETS], cwd=d, env=_env(d),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpts = d / ".pnc" / "checkpoints" / "digits_depth"

    def saved_epoch() -> int | None:
        files = list(ckpts.glob("*.pt")) if ckpts.exists() else []
        try:
            return torch.load(files[0], weights_only=True)["epoch"] if files else None
        except Exception:  # noqa: BLE001 - being written; try again
            return None

    deadline = time.time() + 400
    while time.time() < deadline:
        if (saved_epoch() or 0) >= 2:
            break
        time.sleep(0.2)
    else:
        p.kill()
        pytest.fail("no checkpoint appeared")
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    killed_at = saved_epoch()
    assert killed_at is not None and 2 <= killed_at < 5, f"killed during training (last checkpoint: epoch {killed_at})"
    c, runs = _runs(d)
    assert len(runs) == 1 and runs[0].info.status == "RUNNING"
    killed_id = runs[0].info.run_id

    r2 = subprocess.run([sys.executable, "-m", "pnc.cli", "run", "specs/digits_depth.yaml", *SETS, "--results", "results.json"],
                        cwd=d, env=_env(d), capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr
    cell = json.loads((d / "results.json").read_text())["cells"][0]
    assert cell["resumed_from"] == killed_at + 1, "resumed from the last checkpoint, not restarted"
    c, runs = _runs(d)
    assert [x.info.run_id for x in runs] == [killed_id], "the resumed cell continues the same MLflow run"
    assert runs[0].info.status == "FINISHED"
    assert sorted({m.step for m in c.get_metric_history(killed_id, "train/loss")}) == list(range(6))
    assert not list(ckpts.glob("*.pt")), "a finished cell leaves no checkpoint behind"
    rc, rruns = _runs(ref)
    for key in ("cdnv/train", "nc2/train", "nc1/train", "ncc_acc/train", "ncc_acc/test", "probe_acc/test"):
        a, b = _layer(c, killed_id, key), _layer(rc, rruns[0].info.run_id, key)
        assert a and a == b, key  # bit-identical
    for key in ("train/loss", "train/acc"):  # the epoch killed after its log, before its checkpoint, is logged twice
        a, b = _by_step(c, killed_id, key), _by_step(rc, rruns[0].info.run_id, key)
        assert set(a) == set(range(6)) and a == b, (key, a, b)
    finals = {k: v for k, v in rruns[0].data.metrics.items() if "/" in k}
    assert finals and {k: runs[0].data.metrics[k] for k in finals} == finals, "final metrics are bit-identical"


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path) -> None:
    # no snapshots (the embedded spec takes them at epochs 0-2): this test's tolerances were measured on the final
    # measurement alone; snapshots on 2 processes are compared with 1 in tests/test_snapshots.py
    sets = ["--set", "models=[resnet8]", "--set", "train.epochs=3", "--set", "train.batch_size=64", *LEAN]
    one = _project(tmp_path, "one")
    r1 = subprocess.run([sys.executable, "-m", "pnc.cli", "run", "specs/digits_depth.yaml", *sets], cwd=one, env=_env(one),
                        capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr
    two = _project(tmp_path, "two")
    env = dict(_env(two), OMP_NUM_THREADS="1")
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                         "--master_port", str(_free_port()),
                         "-m", "pnc.cli", "run", "specs/digits_depth.yaml", *sets], cwd=two, env=env,
                        capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    c1, runs1 = _runs(one)
    c2, runs2 = _runs(two)
    assert len(runs2) == 1, "only the main process writes to MLflow"
    assert runs2[0].data.params["train.epochs"] == "3"
    # The same global batches in the same order, each sample once per epoch (no padding: train/acc counts the 1347
    # training samples of digits exactly). What remains is BatchNorm: each process normalises its half of a batch
    # with that half's statistics (SyncBatchNorm is GPU-only in torch). Measured after 3 epochs: CDNV up to 10.6%
    # apart, NC2 3.9%, probe accuracy 0.018, train loss 7.4%, train accuracy 0.013; the tolerances sit just above.
    # Re-measured on 2026-12-02 after the training loop gained its snapshot hook: CDNV 12.0% apart at layer2.0.
    # (Without BatchNorm the two paths agree to float rounding: tests/test_train_distributed.py.)
    for key, rel, abs_ in (("cdnv/train", 0.14, 0.0), ("nc2/train", 0.05, 0.0), ("probe_acc/test", 0.0, 0.025),
                           ("train/loss", 0.09, 0.0), ("train/acc", 0.0, 0.02)):
        a, b = _layer(c1, runs1[0].info.run_id, key), _layer(c2, runs2[0].info.run_id, key)
        assert len(a) == len(b) == 3  # 3 epochs; 3 taps (3 blocks + penultimate - the last block, merged)
        assert a == pytest.approx(b, rel=rel, abs=abs_), (key, a, b)
    for acc in _layer(c2, runs2[0].info.run_id, "train/acc"):
        assert acc * 1347 == pytest.approx(round(acc * 1347), abs=1e-6), "train/acc counts real samples, each once"
    assert runs2[0].data.tags["pnc.precision_used"] == "fp32"
    import torch

    for run in (runs1[0], runs2[0]):  # the hardware and numerics context (tests/test_numerics_context.py)
        assert run.data.tags["pnc.torch"] == torch.__version__ and run.data.tags["pnc.threads"] == "1"


@pytest.mark.slow
def test_two_process_transfer_study_runs_then_reuses_its_registered_model(tmp_path: Path) -> None:
    """Under torchrun, every process takes the same branch: train and register on the first run, reuse the
    registered version (no training, no new version) on the second, instead of diverging collectives."""
    sets = ["--set", "models=[resnet8]", "--set", "train.epochs=1", "--set", "transfer.sources=[handwritten]",
            "--set", "transfer.targets=[handwritten, typeset]"]
    d = _project(tmp_path, "two")
    env = dict(_env(d), OMP_NUM_THREADS="1")

    def torchrun() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                               "--master_port", str(_free_port()), "-m", "pnc.cli", "run", "specs/digits_transfer.yaml", *sets],
                              cwd=d, env=env, capture_output=True, text=True, timeout=600)

    first = torchrun()
    assert first.returncode == 0, first.stderr[-3000:]
    again = torchrun()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing registered model digits_transfer-resnet8 v1" in again.stderr, again.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{d / 'mlflow.db'}")
    assert [str(v.version) for v in c.search_model_versions("name='digits_transfer-resnet8'")] == ["1"]
