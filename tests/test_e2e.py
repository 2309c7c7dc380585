"""End to end on the embedded default: pnc run -> MLflow store -> report; re-running adds nothing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pnc(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{cwd / 'mlflow.db'}", PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "pnc.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("project")
    shutil.copytree(ROOT / "specs", d / "specs")
    return d


def _client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


@pytest.mark.slow
def test_depth_sweep_smoke(project: Path) -> None:
    r = pnc(["run", "specs/digits_depth.yaml", "--set", "train.epochs=1", "--set", "models=[resnet8, resnet14]",
             "--results", "results/digits_depth.json"], project)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    c = _client(project)
    exp = c.get_experiment_by_name("digits_depth")
    runs = c.search_runs([exp.experiment_id])
    parents = [x for x in runs if x.data.tags.get("pnc.role") == "study"]
    children = [x for x in runs if x.data.tags.get("pnc.role") == "cell"]
    assert len(parents) == 1 and len(children) == 2
    # MLflow's UI conventions: a model-training experiment with a description; runs with the standard context tags
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development" and "digits_depth" in exp.tags["mlflow.note.content"]
    note = parents[0].data.tags["mlflow.note.content"]
    assert "**Reproduce**: `pnc run specs/digits_depth.yaml --set 'train.epochs=1' --set 'models=[resnet8, resnet14]'`" in note
    assert all(ch.data.tags.get("mlflow.source.git.commit") and ch.data.tags.get("mlflow.user") for ch in [*parents, *children])
    expected_layers = {"resnet8": 3, "resnet14": 6}  # residual blocks + penultimate - the last block, merged into it
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.data.tags["pnc.study"] == "digits_depth" and child.data.tags["pnc.spec_digest"]
        assert child.data.params["train.epochs"] == "1" and child.data.params["dataset.name"] == "digits"
        assert child.data.tags["pnc.ncc_train"] == "kept features"  # ncc_acc/train without a second pass
        n = expected_layers[child.data.tags["pnc.model"]]
        for key in ("cdnv/train", "nc2/train", "probe_acc/test", "nc1/train", "ncc_acc/train", "ncc_acc/test"):
            hist = c.get_metric_history(child.info.run_id, key)
            assert sorted(m.step for m in hist) == list(range(n)), key
            assert all(m.value == m.value for m in hist)  # no NaN
        assert [m.step for m in c.get_metric_history(child.info.run_id, "train/loss")] == [0]
        assert 0.0 <= child.data.metrics["train/final_acc"] <= 1.0
        arts = {a.path for a in c.list_artifacts(child.info.run_id)}
        assert {"layers.json", "layers.png"} <= arts
        layers = json.loads(Path(c.download_artifacts(child.info.run_id, "layers.json", str(project / "dl"))).read_text())
        assert len(layers) == n and layers[str(n - 1)] == "penultimate"
        assert child.data.tags["pnc.merged_taps"] == f"layer3.{n // 3 - 1} -> penultimate"
        assert {d.dataset.name for d in child.inputs.dataset_inputs} == {"digits/train", "digits/test"}
    lin = pnc(["lineage", children[0].info.run_id], project)
    assert lin.returncode == 0, lin.stdout + lin.stderr
    assert "data/embedded/digits/train" in lin.stdout and "consistent" in lin.stdout
    res = json.loads((project / "results" / "digits_depth.json").read_text())
    assert [cell["status"] for cell in res["cells"]] == ["FINISHED", "FINISHED"]

    # running the same study again adds no run: every cell is found by id and skipped
    again = pnc(["run", "specs/digits_depth.yaml", "--set", "train.epochs=1", "--set", "models=[resnet8, resnet14]"], project)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("skipped") >= 2
    assert len(c.search_runs([exp.experiment_id])) == len(runs)

    # a changed field re-runs exactly the affected cell
    changed = pnc(["run", "specs/digits_depth.yaml", "--set", "train.epochs=1",
                   "--set", "models=[resnet8, {name: resnet14, source: pnc}]"], project)
    assert changed.returncode == 0, changed.stderr
    assert len(c.search_runs([exp.experiment_id])) == len(runs) + 1

    rep = pnc(["report", "specs/digits_depth.yaml"], project)
    assert rep.returncode == 0, rep.stderr
    out = project / "reports" / "digits_depth"
    assert (out / "index.html").exists() and (out / "layers.png").stat().st_size > 10_000
    html = (out / "layers.html").read_text()
    assert "vega" in html and "<script" in html and "https://cdn" not in html, "the report must work offline"
    assert "digits_depth/index.html" in (project / "reports" / "index.html").read_text()
    page = (out / "index.html").read_text()
    assert "Transition phase" in page and "Efficient depth" in page and "Final accuracies per model" in page
