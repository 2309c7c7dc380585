"""DVC's own experiment commands on the pipeline: a spec field changed with `dvc exp run -S` in a temporary copy of
the project (`--temp`, so the stage runs under .dvc/tmp/exps), then `dvc exp show`, `dvc params diff`,
`dvc metrics` and `dvc plots` read the study back, and the runs land in the project's MLflow store, named by the
experiment. The stage layout itself (spec as params, metrics, plots, the whole `pnc` package as code) is checked
for every study kind."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pnc.registry import KINDS

ROOT = Path(__file__).resolve().parents[1]
SPEC = "specs/digits_depth.yaml"


def dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def study_stages() -> dict[str, dict]:
    """{params.yaml group: the stage template iterating over it} of the stages that run studies."""
    return {stage["foreach"][2:-1]: stage["do"] for stage in dvc_yaml().values()
            if "foreach" in stage and stage["do"]["cmd"].startswith("pnc run ")}


def test_every_study_kind_has_a_stage_of_the_same_shape() -> None:
    stages = study_stages()
    assert sorted(stages) == sorted(k.params_key for k in KINDS.all())
    for group, do in stages.items():
        assert do["params"] == [{"specs/${key}.yaml": None}], f"{group}: the whole spec file must be the stage's params"
        assert "pnc" in do["deps"], f"{group}: the stage must depend on the whole pnc package (every module it imports)"
        assert "specs/${key}.yaml" not in do["deps"], f"{group}: the spec is a params file, not a dep"
        assert do["outs"] == ["results/${key}.json"]
        assert do["metrics"] == [{"metrics/${key}.json": {"cache": False}}]
        ((plot, opts),) = do["plots"][0].items()
        assert plot == "plots/${key}.csv" and opts["x"] == "layer" and opts["y"] == "cdnv" and opts["cache"] is False
        assert (ROOT / ".dvc" / "plots" / f"{opts['template']}.json").exists()
        cmd = do["cmd"]
        for flag, path in (("--results", do["outs"][0]), ("--metrics", "metrics/${key}.json"), ("--curves", plot)):
            assert f"{flag} {path}" in cmd, (group, flag)
    for name, stage in dvc_yaml().items():  # no stage lists a few pnc modules by hand (they went stale before)
        deps = stage.get("do", stage).get("deps", [])
        assert not [d for d in deps if d.startswith("pnc/")], f"{name}: depend on the whole pnc package"


def copy_project(repo: Path) -> None:
    repo.mkdir()
    shutil.copytree(ROOT / "pnc", repo / "pnc", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "specs", repo / "specs")
    for f in ("pyproject.toml", "dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / f, repo / f)


@pytest.mark.slow
def test_dvc_exp_run_set_param_records_the_study_in_the_project_store(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    repo = tmp_path / "repo"
    copy_project(repo)
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org")
    for var in ("MLFLOW_TRACKING_URI", "PNC_DATA_ROOT", "DVC_ROOT", "DVC_EXP_NAME"):
        env.pop(var, None)  # the project's own store, found through DVC_ROOT
    dvc = str(bin_dir / "dvc")

    def run(*args: str) -> str:
        r = subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{' '.join(args)}:\n{r.stdout}\n{r.stderr}"
        return r.stdout

    run("git", "init", "-q")
    run(dvc, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "project")

    assert not (repo / "mlflow.db").exists()
    run(dvc, "exp", "run", "--temp", "--name", "two-epochs", "-S", f"{SPEC}:train.epochs=2",
        "-S", f"{SPEC}:measure.epochs=[0,1]", "-S", f"{SPEC}:models=[resnet8]", "depth@digits_depth")
    rows = json.loads(run(dvc, "exp", "show", "--json"))
    exps = [r for row in rows for e in (row.get("experiments") or []) for r in e["revs"]]
    (exp,) = [r for r in exps if r["name"] == "two-epochs"]
    spec_params = exp["data"]["params"][SPEC]["data"]
    assert spec_params["train"]["epochs"] == 2 and spec_params["models"] == ["resnet8"]
    baseline = next(row for row in rows if row["rev"] != "workspace")
    assert baseline["data"]["params"][SPEC]["data"]["train"]["epochs"] == 30  # the committed spec is untouched
    metrics = exp["data"]["metrics"]["metrics/digits_depth.json"]["data"]
    assert set(metrics) >= {"train/final_acc@model=resnet8", "test/acc@model=resnet8", "transition/found@model=resnet8",
                            "efficient_depth/validation"}
    assert metrics["efficient_depth/validation"] == 8  # the only depth of the experiment

    # the runs are in the project's store (not in the experiment's temporary copy), named by the experiment
    assert (repo / "mlflow.db").exists()
    c = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    mexp = c.get_experiment_by_name("digits_depth")
    assert Path(mexp.artifact_location.removeprefix("file://")) == repo / "mlruns"
    runs = c.search_runs([mexp.experiment_id])
    (cell,) = [r for r in runs if r.data.tags.get("pnc.role") == "cell"]
    assert cell.info.status == "FINISHED" and cell.data.params["train.epochs"] == "2"
    assert cell.data.tags["pnc.dvc_experiment"] == "two-epochs"
    assert cell.info.artifact_uri.removeprefix("file://").startswith(str(repo / "mlruns"))
    assert "layers.json" in {a.path for a in c.list_artifacts(cell.info.run_id)}
    assert metrics["test/acc@model=resnet8"] == pytest.approx(cell.data.metrics["test/acc"])
    assert metrics["train/final_acc@model=resnet8"] == pytest.approx(cell.data.metrics["train/final_acc"])

    # `dvc params diff` names the changed fields; the experiment's per-layer curve, as `dvc plots diff` reads it from
    # the experiment, is the run's logged CDNV; `dvc metrics show` finds the metrics file (here in the workspace: absent)
    changed = run(dvc, "params", "diff", "HEAD", "two-epochs")
    assert "train.epochs" in changed and "models" in changed and "batch_size" not in changed
    plots = json.loads(run(dvc, "plots", "diff", "two-epochs", "--json", "--targets", "plots/digits_depth.csv"))
    (plot,) = plots["data"]["plots/digits_depth.csv"]
    values = [v for v in plot["content"]["data"]["values"] if v["rev"] == "two-epochs"]
    logged = sorted(c.get_metric_history(cell.info.run_id, "cdnv/train"), key=lambda m: m.step)
    assert [int(v["layer"]) for v in values] == [m.step for m in logged]
    assert [float(v["cdnv"]) for v in values] == pytest.approx([m.value for m in logged])
    assert {v["cell"] for v in values} == {"model=resnet8"}
    assert plot["content"]["encoding"]["color"]["field"] == "cell"
    assert plot["content"]["encoding"]["strokeDash"]["field"] == "rev"  # `dvc plots diff`: one dash per experiment
