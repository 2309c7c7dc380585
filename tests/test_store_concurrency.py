"""Several pnc processes writing to one local SQLite store (``sqlite:///.../mlflow.db``) at once:
every process exits 0, nothing says 'database is locked', every run is there once and FINISHED.

The store is fresh in both tests, so the processes also race to create MLflow's tables, the
study's experiment and its parent run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lean import LEAN

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["--set", "train.epochs=1", "--set", "models=[resnet8, resnet14]", *LEAN]
LAYERS = {"resnet8": 3, "resnet14": 6}  # residual blocks + penultimate - the last block (merged into penultimate)


def env_for(db: Path) -> dict:
    return dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{db}", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1")


def run_all(cmds: list[list[str]], cwd: Path, env: dict, timeout: float) -> list[tuple[int, str]]:
    """Start every command at once; wait for all (bounded); return (exit code, output) of each."""
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              stdin=subprocess.DEVNULL) for cmd in cmds]
    deadline = time.time() + timeout
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1, deadline - time.time()))
            out.append((p.returncode, text))
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
            out.append((-999, f"timed out after {timeout}s\n{text}"))
    return out


def check_clean(results: list[tuple[int, str]]) -> None:
    for rc, text in results:
        assert rc == 0, text[-4000:]
        assert "database is locked" not in text.lower(), text[-4000:]
        assert "Traceback" not in text and "internal error" not in text, text[-4000:]


def all_runs(db: Path, experiment: str) -> list:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{db}")
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000)


PNC = [sys.executable, "-m", "pnc.cli"]


def embedded_project(tmp_path: Path, overrides: list[str], **env_extra: str) -> tuple[Path, dict, list[str]]:
    """specs/ and the embedded digits in ``tmp_path``, a fresh SQLite store: (db, env, cell ids of the plan)."""
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    env = dict(env_for(db), **env_extra)
    assert subprocess.run([*PNC, "embed", "digits"], cwd=tmp_path, env=env, capture_output=True, timeout=120).returncode == 0
    plan = subprocess.run([*PNC, "plan", "specs/digits_depth.yaml", *overrides, "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    return db, env, [cell["id"] for cell in json.loads(plan.stdout)["cells"]]


@pytest.mark.slow
def test_two_pnc_runs_share_one_sqlite_store(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    db, env, ids = embedded_project(tmp_path, OVERRIDES)
    pnc = PNC
    assert len(ids) == 2
    cmds = [[*pnc, "run", "specs/digits_depth.yaml", *OVERRIDES, "--cell", i, "--no-progress"] for i in ids]

    t0 = time.time()
    check_clean(run_all(cmds, tmp_path, env, timeout=400))
    print(f"two concurrent pnc runs: {time.time() - t0:.0f}s")
    runs = all_runs(db, "digits_depth")
    assert all(r.info.lifecycle_stage == "active" for r in runs), "nothing created twice and deleted"
    parents = [r for r in runs if r.data.tags.get("pnc.role") == "study"]
    children = [r for r in runs if r.data.tags.get("pnc.role") == "cell"]
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3
    assert sorted(r.data.tags["pnc.cell_id"] for r in children) == sorted(ids)
    c = MlflowClient(f"sqlite:///{db}")
    for r in runs:
        assert r.info.status == "FINISHED", (r.info.run_name, r.info.status)
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        n = LAYERS[r.data.tags["pnc.model"]]
        for key in ("cdnv/train", "nc2/train", "probe_acc/test"):
            assert sorted(m.step for m in c.get_metric_history(r.info.run_id, key)) == list(range(n)), key

    # both again at once: both cells are found and skipped, nothing is added
    again = run_all(cmds, tmp_path, env, timeout=300)
    check_clean(again)
    assert all("skipped" in text for _, text in again)
    assert {r.info.run_id for r in all_runs(db, "digits_depth")} == {r.info.run_id for r in runs}


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from types import SimpleNamespace
    from pnc import tracking

    me, n = sys.argv[1], int(sys.argv[2])
    give_up = time.time() + 120

    def barrier(name):  # every writer waits here until all have arrived, then all go at once
        Path(f"{name}-{me}").touch()
        while len(list(Path(".").glob(f"{name}-*"))) < n and time.time() < give_up:
            time.sleep(0.005)

    import mlflow.tracking  # noqa: F401 - the slow imports before the start line
    barrier("start")
    tracking.client()  # all at once on a store with no tables yet
    barrier("client")
    exp = tracking.experiment_id("race")  # all at once: the experiment
    barrier("experiment")
    parent = tracking.study_parent(exp, "race", {"writer": me})  # all at once: the study's parent run
    cell = SimpleNamespace(id=f"cell-{me}", name=f"race@writer={me}", study="race")
    run = tracking.start_cell_run(exp, parent, cell, {"pnc.data_digest": "x"})
    tracking.log_params(run, {"writer": me})
    for step in range(60):
        tracking.log_metrics(run, {"m": float(step)}, step=step)
    tracking.log_layer_metrics(run, {"cdnv/train": [1.0, 0.5, 0.25]})
    tracking.end_run(run)
    tracking.end_run(parent)  # as every `pnc run` does when its cells are done
    print("parent", parent)
""")


def test_tracking_writers_race_on_a_fresh_sqlite_store(tmp_path: Path) -> None:
    """Four processes released at the same instant on a store that does not exist yet (tables), then
    again at one instant (experiment, parent run): each is created once; 60 small writes each all land."""
    db = tmp_path / "mlflow.db"
    cmds = [[sys.executable, "-c", WRITER, str(i), "4"] for i in range(4)]
    results = run_all(cmds, tmp_path, env_for(db), timeout=240)
    check_clean(results)
    parents = {line.split()[1] for _, text in results for line in text.splitlines() if line.startswith("parent ")}
    assert len(parents) == 1, f"every writer uses one parent run: {parents}"
    runs = [r for r in all_runs(db, "race") if r.info.lifecycle_stage == "active"]
    assert len(runs) == 5 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.info.run_id for r in runs if r.data.tags.get("pnc.role") == "study"} == parents
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{db}")
    for r in runs:
        if r.data.tags.get("pnc.role") == "cell":
            assert [m.step for m in sorted(c.get_metric_history(r.info.run_id, "m"), key=lambda m: m.step)] == list(range(60))
            assert [m.step for m in c.get_metric_history(r.info.run_id, "cdnv/train")] == [0, 1, 2]


@pytest.mark.slow
def test_one_cell_started_twice_at_once_is_trained_once(tmp_path: Path) -> None:
    """A job array submitted twice: two `pnc run --cell ID` of the same cell start together. One trains it;
    the other says who holds it and exits 1 without touching its run; afterwards the cell has one run."""
    overrides = ["--set", "train.epochs=2", "--set", "models=[resnet8]", *LEAN]
    db, env, (cell,) = embedded_project(tmp_path, overrides, PNC_CLAIM_SETTLE_S="2")
    pnc = PNC
    cmd = [*pnc, "run", "specs/digits_depth.yaml", *overrides, "--cell", cell, "--no-progress"]
    results = run_all([cmd, cmd], tmp_path, env, timeout=400)
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 1], [t[-3000:] for _, t in results]
    winner = next(t for rc, t in results if rc == 0)
    loser = next(t for rc, t in results if rc == 1)
    assert "done in" in winner and "being run by another process" in loser and "done in" not in loser, loser
    assert "1 being run by other processes" in loser and "run the study again once they finish" in loser
    assert "Traceback" not in loser + winner and "database is locked" not in (loser + winner).lower()
    runs = all_runs(db, "digits_depth")
    cells = [r for r in runs if r.data.tags.get("pnc.role") == "cell" and r.info.lifecycle_stage == "active"]
    assert len(cells) == 1 and cells[0].info.status == "FINISHED", [(r.info.run_id, r.info.status) for r in cells]
    assert cells[0].info.run_id in loser, "the loser names the run that holds the cell"
    again = run_all([cmd], tmp_path, env, timeout=300)
    check_clean(again)
    assert "finished earlier" in again[0][1]


@pytest.mark.slow
def test_cells_run_one_by_one_close_the_study_with_the_last(tmp_path: Path) -> None:
    """`pnc run --cell` for one cell of two: the parent stays RUNNING with no analyses; running the other
    cell finishes the study: analyses on the parent, parent FINISHED."""
    from mlflow.tracking import MlflowClient

    db, env, ids = embedded_project(tmp_path, OVERRIDES)
    pnc = PNC
    c = MlflowClient(f"sqlite:///{db}")

    def parent():
        (p,) = [r for r in all_runs(db, "digits_depth") if r.data.tags.get("pnc.role") == "study"]
        return c.get_run(p.info.run_id)

    first = run_all([[*pnc, "run", "specs/digits_depth.yaml", *OVERRIDES, "--cell", ids[0], "--no-progress"]], tmp_path, env, 300)
    check_clean(first)
    assert "left RUNNING" in first[0][1]
    p = parent()
    assert p.info.status == "RUNNING", p.info.status
    assert "pnc.efficient_depth" not in p.data.tags and "efficient_depth/validation" not in p.data.metrics, "no analysis of half a study"
    second = run_all([[*pnc, "run", "specs/digits_depth.yaml", *OVERRIDES, "--cell", ids[1], "--no-progress"]], tmp_path, env, 300)
    check_clean(second)
    assert "left RUNNING" not in second[0][1]
    p = parent()
    assert p.info.status == "FINISHED"
    assert "pnc.efficient_depth" in p.data.tags and "efficient_depth/validation" in p.data.metrics, (p.data.tags, p.data.metrics)
