"""pnc lineage: the chain from a run down to raw data, and drift detection after a split changes on disk."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def pnc(args, cwd: Path, timeout: int = 600):
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{cwd / 'mlflow.db'}")
    return subprocess.run([sys.executable, "-m", "pnc.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_ids(cwd: Path, experiment: str, role: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    exp = c.get_experiment_by_name(experiment)
    return [r.info.run_id for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("pnc.role") == role]


@pytest.mark.slow
def test_lineage_of_noise_and_transfer_runs(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    r = pnc(["run", "specs/digits_noise.yaml", "--set", "train.epochs=1", "--set", "models=[resnet8]",
             "--set", "noise.label=[{kind: symmetric, rates: [0.2]}]", "--set", "noise.input=[]"], tmp_path)
    assert r.returncode == 0, r.stderr
    (run_id,) = run_ids(tmp_path, "digits_noise", "cell")
    ok = pnc(["lineage", run_id], tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    out = ok.stdout
    assert "data/derived/digits_noise/symmetric-0.2" in out and "derived: symmetric level 0.2 seed 0" in out
    assert "from:" in out and "data/embedded/digits/train" in out, "the chain goes down to the embedded raw split"
    assert "[changed]" not in out, "the overrides are part of the recorded spec"
    info = json.loads(pnc(["lineage", run_id, "--json"], tmp_path).stdout)
    assert info["consistent"] and info["inputs"][0]["check"]["base"]["status"] == "ok"

    labels = tmp_path / "data/derived/digits_noise/symmetric-0.2/labels.npy"
    a = np.load(labels)
    a[0] = (a[0] + 1) % 10
    np.save(labels, a)
    drift = pnc(["lineage", run_id], tmp_path)
    assert drift.returncode == 1
    assert "DRIFT" in drift.stdout and "data/derived/digits_noise/symmetric-0.2 changed since the run" in drift.stdout
    shutil.rmtree(tmp_path / "data/embedded/digits/test")
    missing = pnc(["lineage", run_id, "--json"], tmp_path)
    assert missing.returncode == 1 and any("does not exist" in p for p in json.loads(missing.stdout)["problems"])

    t = pnc(["run", "specs/digits_transfer.yaml", "--set", "train.epochs=1", "--set", "transfer.sources=[handwritten]",
             "--set", "transfer.targets=[typeset]"], tmp_path)
    assert t.returncode == 0, t.stderr
    (trun,) = run_ids(tmp_path, "digits_transfer", "transfer")
    tl = pnc(["lineage", trun], tmp_path)
    assert tl.returncode == 0, tl.stdout + tl.stderr
    assert "models:/digits_transfer-resnet14/1" in tl.stdout and "data/embedded/digits_domains/typeset/train" in tl.stdout
