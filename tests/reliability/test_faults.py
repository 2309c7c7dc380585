"""Fault injection: diverging training and broken data.

Training faults use real spec settings only (no test hook in pnc): with ``train.optimizer.lr=3`` the
first SGD step of a ResNet-20 on the digits sends its loss to about 12, while a narrow ResNet-8
(``kwargs: {widths: [4, 8, 16]}``) stays near ln(10) = 2.3 for the whole epoch; ``train.max_loss=5``
sits between the two, so exactly one cell of the study diverges, deterministically (fixed seed, CPU).

Data faults: a CIFAR-10 study on a machine without CIFAR-10, or with a truncated or incomplete copy
under ``$PNC_DATA_ROOT``, must stop before torch is imported (so before any model is built) and
before the MLflow store is touched.

Fault cases run here: 2 diverging cells (depth study, run twice), 2 in-process loss faults (NaN,
loss above max_loss), 1 diverging transfer source, 3 data faults: 8 in all.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import fakedata as F  # noqa: E402
from lean import LEAN  # noqa: E402

DIVERGE = ["--set", "train.epochs=1", "--set", "train.optimizer.lr=3", "--set", "train.max_loss=5",
           "--set", "models=[resnet20, {name: resnet8, kwargs: {widths: [4, 8, 16]}}]", *LEAN]


def _project(tmp: Path) -> Path:
    d = tmp / "project"
    d.mkdir()
    shutil.copytree(ROOT / "specs", d / "specs")
    return d


def _env(d: Path, **extra: str) -> dict:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{d / 'mlflow.db'}", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("PNC_DATA_ROOT", None)
    env.update(extra)
    return env


def pnc(args: list[str], d: Path, *, py: tuple[str, ...] = (), timeout: int = 400, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *py, "-m", "pnc.cli", *args], cwd=d, env=_env(d, **extra), capture_output=True,
                          text=True, timeout=timeout)


def _store(d: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{d / 'mlflow.db'}")
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    return c, c.search_runs([exp.experiment_id], max_results=1000)


def _role(runs, role: str) -> list:
    return [r for r in runs if r.data.tags.get("pnc.role") == role]


def _clean_exit(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    assert "internal error" not in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------ training faults
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_diverging_cell_fails_alone_and_the_study_goes_on(tmp_path: Path) -> None:
    d = _project(tmp_path)
    r = pnc(["run", "specs/digits_depth.yaml", *DIVERGE, "--results", "results/digits_depth.json"], d)
    assert r.returncode == 1, r.stderr
    _clean_exit(r)

    c, runs = _store(d, "digits_depth")
    cells = {x.data.tags["pnc.model"]: x for x in _role(runs, "cell")}
    assert sorted(cells) == ["resnet20", "resnet8"] and len(_role(runs, "cell")) == 2
    bad, good = cells["resnet20"], cells["resnet8"]
    assert bad.info.status == "FAILED"
    reason = bad.data.tags.get("pnc.failure", "")
    assert re.search(r"loss became [0-9.e+]+ at epoch 0 \(max_loss 5\)", reason), reason
    assert "lower train.optimizer.lr" in reason
    assert "cdnv/train" not in bad.data.metrics, "a failed cell logs no layer metrics"
    assert good.info.status == "FINISHED" and "pnc.failure" not in good.data.tags
    assert "cdnv/train" in good.data.metrics and "probe_acc/test" in good.data.metrics
    (parent,) = _role(runs, "study")
    assert parent.info.status == "FAILED"

    # the failed cell came first and the study went on with the next one
    err = r.stderr
    assert err.index("FAILED: loss became") < err.index("[2/2] digits_depth@model=resnet8")
    # the failed cells are listed at the end, with run id and reason
    tail = err[err.index("1 cell(s) run, 0 skipped, 1 failed"):]
    assert f"FAILED digits_depth@model=resnet20 (run {bad.info.run_id}): loss became" in tail
    res = json.loads((d / "results" / "digits_depth.json").read_text())
    assert [(x["name"].split("=")[1], x["status"]) for x in res["cells"]] == [("resnet20", "FAILED"), ("resnet8", "FINISHED")]
    assert "loss became" in res["cells"][0]["reason"]
    assert not list((d / ".pnc" / "checkpoints" / "digits_depth").glob("*.pt")), "no checkpoint of the failed cell is kept"

    # running again retries only the failed cell, in its own run; the finished cell is skipped; no new run
    again = pnc(["run", "specs/digits_depth.yaml", *DIVERGE], d)
    assert again.returncode == 1, again.stderr
    _clean_exit(again)
    assert f"finished earlier (run {good.info.run_id}), skipped" in again.stderr
    assert f"(cell {bad.data.tags['pnc.cell_id']}, run {bad.info.run_id})" in again.stderr
    c, runs2 = _store(d, "digits_depth")
    assert sorted(x.info.run_id for x in runs2) == sorted(x.info.run_id for x in runs)
    after = {x.info.run_id: x for x in runs2}
    assert after[bad.info.run_id].info.status == "FAILED" and "loss became" in after[bad.info.run_id].data.tags["pnc.failure"]
    assert after[good.info.run_id].info.end_time == good.info.end_time, "the finished cell was not touched"


class _Digits(torch.utils.data.Dataset):
    """Eight 1x4x4 images with label columns (as pnc's ImageDataset yields: x, y[:, k], index)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return torch.full((1, 4, 4), float(i) / 8), torch.tensor([i % 2]), i


@pytest.mark.parametrize("fault,match", [("nan", r"loss became nan at epoch 0"), ("huge", r"loss became [0-9.e+]+ at epoch 0 \(max_loss 10000\)")],
                         ids=["nan", "huge"])
def test_nan_or_huge_loss_raises_training_error(tmp_path: Path, fault: str, match: str) -> None:
    from pnc.errors import TrainingError
    from pnc.spec import load_spec
    from pnc.train import make_accelerator, train

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(16, 2)

        def forward(self, x):
            out = self.fc(x.flatten(1))
            return out * float("nan") if fault == "nan" else out * 1e9 + torch.tensor([1e9, -1e9])

    tspec = load_spec(ROOT / "specs" / "digits_depth.yaml", ["train.epochs=2", "train.batch_size=4"]).train
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(TrainingError, match=match):
        train(Net(), _Digits(), tspec, accelerator=make_accelerator(), checkpoint=ckpt, progress=False)
    assert not ckpt.exists(), "a diverged epoch is never checkpointed"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_diverging_transfer_source_fails_without_registering(tmp_path: Path) -> None:
    d = _project(tmp_path)
    sets = ["--set", "transfer.sources=[handwritten]", "--set", "transfer.targets=[handwritten]", "--set", "train.epochs=1",
            "--set", "models=[resnet8]", "--set", "train.max_loss=1e-3"]
    r = pnc(["run", "specs/digits_transfer.yaml", *sets], d)
    assert r.returncode == 1, r.stderr
    _clean_exit(r)
    c, runs = _store(d, "digits_transfer")
    (src,) = _role(runs, "cell")
    assert src.info.status == "FAILED" and "loss became" in src.data.tags["pnc.failure"]
    assert not _role(runs, "transfer"), "no target is measured with a model that failed to train"
    assert _role(runs, "study")[0].info.status == "FAILED"
    assert f"FAILED digits_transfer@model=resnet8,source=handwritten (run {src.info.run_id}): loss became" in r.stderr
    assert not c.search_model_versions("name='digits_transfer-resnet8'"), "a failed cell registers no model version"


# ------------------------------------------------------------------------------------------ data faults
def _no_cifar(d: Path) -> dict:
    return {}


def _truncated_cifar(d: Path) -> dict:
    root = d.parent / "lab-disk"
    F.write_cifar10(root / "cifar10", n_per_batch=6)
    f = root / "cifar10" / "cifar-10-batches-py" / "data_batch_2"
    f.write_bytes(f.read_bytes()[:5000])
    return {"PNC_DATA_ROOT": str(root)}


def _incomplete_cifar(d: Path) -> dict:
    root = d.parent / "lab-disk"
    F.write_cifar10(root / "cifar10", n_per_batch=6)
    (root / "cifar10" / "cifar-10-batches-py" / "test_batch").unlink()
    return {"PNC_DATA_ROOT": str(root)}


@pytest.mark.parametrize("fault,needles", [
    (_no_cifar, ["data/raw/cifar10/cifar-10-batches-py", "does not exist"]),
    (_truncated_cifar, ["lab-disk/cifar10/cifar-10-batches-py/data_batch_2: cannot unpickle", "truncated"]),
    (_incomplete_cifar, ["test_batch", "missing file"]),
], ids=["missing", "truncated", "incomplete"])
def test_data_fault_stops_before_torch_model_or_mlflow(tmp_path: Path, fault, needles: list[str]) -> None:
    d = _project(tmp_path)
    extra = fault(d)
    t0 = time.monotonic()
    # -X importtime lists every module imported: torch must not be among them (no model can have been built)
    r = pnc(["run", "specs/cifar10_depth.yaml"], d, py=("-X", "importtime"), timeout=120, **extra)
    wall = time.monotonic() - t0
    assert r.returncode == 1, r.stderr[-3000:]
    msg = "\n".join(line for line in r.stderr.splitlines() if not line.startswith("import time:"))
    _clean_exit(r)
    for s in needles + ["Expected layout:", "README.md section 'Real datasets'", "PNC_DATA_ROOT"]:
        assert s in msg, f"{s!r} not in:\n{msg}"
    imported = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "pnc.spec" in imported, "importtime output expected"
    assert not {"torch", "accelerate", "mlflow"} & imported, sorted({"torch", "accelerate", "mlflow"} & imported)
    assert not (d / "mlflow.db").exists() and not (d / "mlruns").exists(), "no MLflow store, experiment or run was created"
    assert not (d / ".pnc" / "checkpoints").exists()
    assert wall < 30, f"the data check took {wall:.1f}s"


@pytest.mark.parametrize("spec", ["digits_depth", "digits_transfer"])
def test_layer_selection_that_taps_nothing_stops_before_training(tmp_path: Path, spec: str) -> None:
    """`measure.layers` matching no module of some model of the study: exit 1 naming the modules that exist,
    before any network trains, any MLflow run starts or any checkpoint is written."""
    d = _project(tmp_path)
    r = pnc(["run", f"specs/{spec}.yaml", "--set", "models=[resnet8, resnet14]", "--set", "measure.layers=['layer3.2']"], d)
    assert r.returncode == 1, r.stderr
    assert "layer pattern 'layer3.2'" in r.stderr and "matches no module of CifarResNet" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "done in" not in r.stderr and "trained in" not in r.stderr
    assert not (d / "mlflow.db").exists() and not (d / ".pnc" / "checkpoints").exists()
