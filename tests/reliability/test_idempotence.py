"""Idempotence: running a study again adds nothing; a changed spec field re-runs exactly the cells it touches;
a failed cell is retried in its own run; a transfer study registers each trained model once.

Every step compares the whole MLflow store (run ids, statuses, end times) before and after, so a
duplicate run, a touched finished run or a re-registered model version shows up.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lean import LEAN

ROOT = Path(__file__).resolve().parents[2]
# two tiny cells (narrow ResNets train an epoch in about a second)
R8 = "{name: resnet8, kwargs: {widths: [4, 8, 16]}}"
R14 = "{name: resnet14, kwargs: {widths: [4, 8, 16]}}"
R14_CHANGED = "{name: resnet14, kwargs: {widths: [4, 8, 8]}}"


def _project(tmp: Path) -> Path:
    d = tmp / "project"
    d.mkdir()
    shutil.copytree(ROOT / "specs", d / "specs")
    return d


def pnc(args: list[str], d: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{d / 'mlflow.db'}", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("PNC_DATA_ROOT", None)
    r = subprocess.run([sys.executable, "-m", "pnc.cli", *args], cwd=d, env=env, capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    return r


def _client(d: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{d / 'mlflow.db'}")


def _runs(d: Path, experiment: str) -> dict[str, object]:
    c = _client(d)
    exp = c.get_experiment_by_name(experiment)
    return {r.info.run_id: r for r in c.search_runs([exp.experiment_id], max_results=1000)}


def _state(runs: dict) -> dict[str, tuple]:
    return {k: (r.info.status, r.info.end_time, r.data.tags.get("pnc.role"), r.data.tags.get("pnc.cell_id")) for k, r in runs.items()}


def _sets(*models: str, epochs: int = 1, extra: tuple[str, ...] = ()) -> list[str]:
    return ["--set", f"models=[{', '.join(models)}]", "--set", f"train.epochs={epochs}", *LEAN, *extra]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_depth_study_rerun_adds_nothing_and_changes_rerun_only_affected_cells(tmp_path: Path) -> None:
    d = _project(tmp_path)
    spec = "specs/digits_depth.yaml"
    first = pnc(["run", spec, *_sets(R8, R14)], d)
    assert first.returncode == 0, first.stderr
    runs0 = _runs(d, "digits_depth")
    cells0 = {r.data.tags["pnc.model"]: r for r in runs0.values() if r.data.tags.get("pnc.role") == "cell"}
    assert len(runs0) == 3 and sorted(cells0) == ["resnet14", "resnet8"]

    # 1. the same study again: every cell is found by id and skipped; the store is unchanged
    again = pnc(["run", spec, *_sets(R8, R14)], d)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("finished earlier") == 2 and "0 cell(s) run, 2 skipped" in again.stderr
    runs1 = _runs(d, "digits_depth")
    assert {k: v for k, v in _state(runs1).items() if v[2] == "cell"} == {k: v for k, v in _state(runs0).items() if v[2] == "cell"}
    assert runs1.keys() == runs0.keys()
    for r in cells0.values():
        assert len(_client(d).get_metric_history(r.info.run_id, "train/loss")) == 1, "nothing logged twice"

    # 2. a field no cell depends on (the description) re-runs nothing, and a study-level param that changed
    #    between invocations does not break the reused parent run
    desc = pnc(["run", spec, *_sets(R8, R14, extra=("--set", "description=another description"))], d)
    assert desc.returncode == 0, desc.stderr
    assert "0 cell(s) run, 2 skipped" in desc.stderr
    assert _runs(d, "digits_depth").keys() == runs0.keys()

    # 3. one model's entry changed: exactly that cell runs, in a new run; the other is untouched
    one = pnc(["run", spec, *_sets(R8, R14_CHANGED)], d)
    assert one.returncode == 0, one.stderr
    assert "1 cell(s) run, 1 skipped" in one.stderr
    runs3 = _runs(d, "digits_depth")
    new = [runs3[k] for k in runs3.keys() - runs0.keys()]
    assert len(new) == 1 and new[0].data.tags["pnc.model"] == "resnet14" and new[0].info.status == "FINISHED"
    assert new[0].data.tags["pnc.cell_id"] != cells0["resnet14"].data.tags["pnc.cell_id"]
    assert new[0].data.params["model.kwargs"] == '{"widths": [4, 8, 8]}'
    assert {k: _state(runs3)[k] for k in runs0 if runs0[k].data.tags.get("pnc.role") == "cell"} == \
        {k: v for k, v in _state(runs0).items() if v[2] == "cell"}

    # 4. a training field every cell depends on: both cells run again, in new runs
    both = pnc(["run", spec, *_sets(R8, R14, epochs=2)], d)
    assert both.returncode == 0, both.stderr
    assert "2 cell(s) run, 0 skipped" in both.stderr
    runs4 = _runs(d, "digits_depth")
    assert len(runs4) == len(runs3) + 2
    assert sum(r.data.tags.get("pnc.role") == "study" for r in runs4.values()) == 1, "one parent run per study"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_failed_cell_is_retried_in_its_own_run(tmp_path: Path) -> None:
    """A cell whose run ended FAILED (e.g. the machine ran out of memory) is retried in the same run, even when a
    field outside the cell changed meanwhile; on success the run is FINISHED and the old failure reason is gone."""
    d = _project(tmp_path)
    spec = "specs/digits_depth.yaml"
    assert pnc(["run", spec, *_sets(R8, R14)], d).returncode == 0
    runs0 = _runs(d, "digits_depth")
    cells = {r.data.tags["pnc.model"]: r for r in runs0.values() if r.data.tags.get("pnc.role") == "cell"}
    c = _client(d)
    bad = cells["resnet8"].info.run_id
    c.set_tag(bad, "pnc.failure", "RuntimeError: out of memory")
    c.set_terminated(bad, "FAILED")

    r = pnc(["run", spec, *_sets(R8, R14, extra=("--set", "description=changed meanwhile"))], d)
    assert r.returncode == 0, r.stderr
    assert "1 cell(s) run, 1 skipped" in r.stderr and f"run {bad})" in r.stderr
    runs1 = _runs(d, "digits_depth")
    assert runs1.keys() == runs0.keys(), "no new run"
    assert runs1[bad].info.status == "FINISHED" and "pnc.failure" not in runs1[bad].data.tags
    other = cells["resnet14"].info.run_id
    assert _state(runs1)[other] == _state(runs0)[other]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_transfer_study_rerun_registers_no_new_model_version(tmp_path: Path) -> None:
    d = _project(tmp_path)
    sets = ["run", "specs/digits_transfer.yaml", "--set", "transfer.sources=[handwritten]", "--set", "transfer.targets=[handwritten]",
            "--set", "train.epochs=1", "--set", "models=[resnet8]"]
    first = pnc(sets, d)
    assert first.returncode == 0, first.stderr
    c = _client(d)
    name = "digits_transfer-resnet8"
    versions = c.search_model_versions(f"name='{name}'")
    assert [str(v.version) for v in versions] == ["1"]
    runs0 = _runs(d, "digits_transfer")
    assert sorted(r.data.tags.get("pnc.role") for r in runs0.values()) == ["cell", "study", "transfer"]
    (trun,) = [r for r in runs0.values() if r.data.tags.get("pnc.role") == "transfer"]
    model_ids = [m.model_id for m in c.get_run(trun.info.run_id).inputs.model_inputs]
    assert model_ids and model_ids == [versions[0].source.split("/")[-1]], "the target run's input is the registered model"

    again = pnc(sets, d)
    assert again.returncode == 0, again.stderr
    assert f"reusing registered model {name} v1" in again.stderr and "finished earlier" in again.stderr
    assert "0 cell(s) run, 1 skipped" in again.stderr, again.stderr
    assert [str(v.version) for v in c.search_model_versions(f"name='{name}'")] == ["1"], "no duplicate model version"
    assert {k: str(v) for k, v in c.get_registered_model(name).aliases.items()} == {"current": "1", "src-handwritten": "1"}
    runs1 = _runs(d, "digits_transfer")
    assert runs1.keys() == runs0.keys()
    assert {k: v for k, v in _state(runs1).items() if v[2] != "study"} == {k: v for k, v in _state(runs0).items() if v[2] != "study"}

    # a probe setting changes: the targets are measured again, the source model is reused (no training)
    probe = pnc([*sets, "--set", "probe.samples_per_class=10"], d)
    assert probe.returncode == 0, probe.stderr
    assert f"reusing registered model {name} v1" in probe.stderr and "trained in" not in probe.stderr, probe.stderr
    assert [str(v.version) for v in c.search_model_versions(f"name='{name}'")] == ["1"]
    runs2 = _runs(d, "digits_transfer")
    new = [r for k, r in runs2.items() if k not in runs0]
    assert [r.data.tags.get("pnc.role") for r in new] == ["transfer"], "only the (source, target) measurement is new"
    # the training recipe changes: a new model version
    retrain = pnc([*sets, "--set", "train.seed=1"], d)
    assert retrain.returncode == 0, retrain.stderr
    assert sorted(str(v.version) for v in c.search_model_versions(f"name='{name}'")) == ["1", "2"]
