"""`noise.corrupted_test`: a corrupted-input cell is also measured on the published corrupted test set
(CIFAR-10-C) at its corruption and severity; the files are checked before anything runs and traced by
`pnc lineage`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fakedata import write_cifar10, write_cifar10c

SPEC = """\
kind: noise_sweep
name: c10c
dataset: {{name: cifar10, root: {root}}}
models: [resnet8]
noise:
  input:
    - {{corruption: gaussian_noise, severities: [0, 2]}}
  corrupted_test: true
train: {{epochs: 1, batch_size: 50}}
"""


def pnc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{cwd / 'mlflow.db'}", PYTHONUNBUFFERED="1")
    env.pop("PNC_DATA_ROOT", None)
    return subprocess.run([sys.executable, "-m", "pnc.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _project(tmp_path: Path) -> Path:
    root = tmp_path / "raw" / "cifar10"
    write_cifar10(root, n_per_batch=40, n_test=50)
    write_cifar10c(root / "CIFAR-10-C", corruptions=("gaussian_noise",), n=50)
    (tmp_path / "c10c.yaml").write_text(SPEC.format(root=root))
    return root


@pytest.mark.slow
def test_corrupted_cells_are_measured_on_cifar10c_and_traced(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    root = _project(tmp_path)
    r = pnc(["run", "c10c.yaml", "--results", "results.json", "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    cells = {c["name"].split("noise=")[1]: c for c in json.loads((tmp_path / "results.json").read_text())["cells"]}
    assert set(cells) == {"clean", "gaussian_noise:2"}
    assert 0.0 <= cells["gaussian_noise:2"]["cifar10c_acc"] <= 1.0 and "cifar10c_acc" not in cells["clean"]

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = c.get_run(cells["gaussian_noise:2"]["run_id"])
    assert "test/cifar10c_acc" in run.data.metrics
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "probe_acc/cifar10c")]
    assert sorted(steps) == list(range(3)), "one probe accuracy per tapped layer (3 blocks + penultimate - the last block, merged)"
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} for d in run.inputs.dataset_inputs}
    assert inputs["cifar10-c/gaussian_noise/2"]["mlflow.data.context"] == "evaluation", inputs
    clean = c.get_run(cells["clean"]["run_id"])
    assert "test/cifar10c_acc" not in clean.data.metrics and not any("cifar10-c" in d.dataset.name for d in clean.inputs.dataset_inputs)

    ok = pnc(["lineage", run.info.run_id], tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "gaussian_noise.npy" in ok.stdout, ok.stdout
    # severity 2 is rows 10..19 of the fake file: change one byte there
    f = root / "CIFAR-10-C" / "gaussian_noise.npy"
    x = np.load(f)
    x[12, 0, 0, 0] ^= 0xFF
    np.save(f, x)
    drift = pnc(["lineage", run.info.run_id], tmp_path)
    assert drift.returncode == 1 and "drift" in drift.stdout.lower(), drift.stdout + drift.stderr


def test_missing_cifar10c_stops_before_anything_runs(tmp_path: Path) -> None:
    root = _project(tmp_path)
    shutil.rmtree(root / "CIFAR-10-C")
    r = pnc(["run", "c10c.yaml", "--no-progress"], tmp_path)
    assert r.returncode == 1, r.stderr
    assert f"missing file {root / 'CIFAR-10-C' / 'gaussian_noise.npy'}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "mlflow.db").exists(), "nothing written to MLflow"


@pytest.mark.parametrize("dataset, noise, message", [
    ("{name: digits}", "input: [{corruption: gaussian_noise, severities: [0, 1]}]",
     "noise.corrupted_test: a published corrupted test set exists only for cifar10 (CIFAR-10-C), not digits"),
    ("{name: cifar10}", "label: [{kind: symmetric, rates: [0.0, 0.2]}]",
     "noise.corrupted_test: corrupted_test needs an entry under noise.input"),
])
def test_corrupted_test_rules(tmp_path: Path, dataset: str, noise: str, message: str) -> None:
    (tmp_path / "s.yaml").write_text(f"kind: noise_sweep\nname: n\ndataset: {dataset}\nmodels: [resnet8]\n"
                                     f"noise:\n  {noise}\n  corrupted_test: true\n")
    r = pnc(["validate", "s.yaml"], tmp_path)
    assert r.returncode == 1 and message in r.stderr, r.stderr
