"""The team-mode scenario, shared by tests/test_team_mode.py (an `mlflow server` on SQLite) and
tests/test_team_postgres.py (on PostgreSQL, behind MLflow's basic-auth).

A study's cells fanned out as concurrent `pnc run SPEC --cell ID` processes (ids from `pnc plan SPEC --json`), with
a second process racing for one cell's claim and one cell's process SIGKILLed once it holds its run, then taken over
by a new process; then the store is checked through the server: every run once and FINISHED, the killed cell's run
continued (not duplicated), per-layer histories, registered versions with tags and aliases, artifacts behind the
server; running the study again adds nothing; `pnc report` and `pnc lineage` work against the server.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from health import wait_healthy

ROOT = Path(__file__).resolve().parents[1]
SPEC = "specs/digits_transfer.yaml"
OVERRIDES = ["--set", "models=[resnet8, resnet14]", "--set", "transfer.sources=[handwritten, typeset]",
             "--set", "transfer.targets=[typeset]", "--set", "train.epochs=1"]
LAYERS = {"resnet8": 3, "resnet14": 6}  # residual blocks + penultimate - the last block (merged into penultimate)
RUN_TIMEOUT = 900  # seconds, for all concurrent cells together (a generous bound: 2 busy cores train a cell in 3 min)
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process started with start_new_session=True, and everything it started."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


class MlflowServer:
    """`mlflow server` on 127.0.0.1:<free port> with proxied artifacts under ``root/artifacts``; ``backend`` is its
    store URI (default: SQLite ``root/server.db``), ``extra`` more arguments (``--app-name basic-auth``), ``env``
    more environment."""

    def __init__(self, root: Path, backend: str | None = None, extra: list[str] | None = None, env: dict | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "artifacts"
        self.log = root / "server.log"
        server_env = {k: v for k, v in os.environ.items()
                      if k not in ("PYTEST_CURRENT_TEST", "MLFLOW_TRACKING_URI", *CREDENTIAL_VARS)}
        server_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no GenAI job workers (7 processes) on a 2-core machine
        server_env.update(env or {})
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend or f"sqlite:///{root / 'server.db'}",
               "--serve-artifacts", "--artifacts-destination", str(self.artifacts),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "2", *(extra or [])]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=root, env=server_env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_healthy(self, timeout: float = 180) -> None:
        wait_healthy(self.proc, self.url, self.log, "mlflow server", timeout)

    def stop(self) -> None:
        stop(self.proc)


def pnc_env(uri: str, env: dict | None = None) -> dict:
    """The environment of a pnc process on ``uri``: this one's, without MLflow credentials, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARS}
    return dict(base, MLFLOW_TRACKING_URI=uri, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                **(env or {}))


def pnc(args: list[str], cwd: Path, uri: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pnc.cli", *args], cwd=cwd, env=pnc_env(uri, env), capture_output=True,
                          text=True, timeout=timeout)


@dataclass
class Cells:
    """`pnc run SPEC --cell ID` processes started at once (as a job array would), each logging to its own file."""

    cwd: Path
    uri: str
    env: dict | None = None
    procs: list = field(default_factory=list)  # (cell id, Popen, log path)

    def start(self, cid: str, tag: str) -> subprocess.Popen:
        log = self.cwd / f"{tag}-{cid}-{len(self.procs)}.log"
        with open(log, "w") as f:
            p = subprocess.Popen([sys.executable, "-m", "pnc.cli", "run", SPEC, *OVERRIDES, "--cell", cid, "--no-progress"],
                                 cwd=self.cwd, env=pnc_env(self.uri, self.env), stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((cid, p, log))
        return p

    def wait(self) -> list[tuple[str, int, str]]:
        """(cell id, exit code or -9 when killed by the test or -999 when out of time, output) of every process."""
        deadline = time.time() + RUN_TIMEOUT
        out = []
        try:
            for _cid, p, _log in self.procs:
                try:
                    p.wait(timeout=max(1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for cid, p, log in self.procs:
                timed_out = p.poll() is None
                stop(p)
                out.append((cid, -999 if timed_out else p.returncode, log.read_text()))
        return out


def wait_for_claim(c, exp_name: str, cid: str, pid: int, timeout: float = 300) -> str:
    """The run of cell ``cid`` once process ``pid`` holds it (its owner tag names the pid); fails after ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        exp = c.get_experiment_by_name(exp_name)
        if exp is not None:
            for r in c.search_runs([exp.experiment_id], f"tags.`pnc.cell_id` = '{cid}' and tags.`pnc.role` = 'cell'"):
                if r.info.status == "RUNNING" and f":{pid}:" in r.data.tags.get("pnc.owner", ""):
                    return r.info.run_id
        time.sleep(0.5)
    raise AssertionError(f"cell {cid} was not claimed by process {pid} within {timeout:.0f}s")


def team_scenario(tmp_path: Path, server: MlflowServer, env: dict | None = None, *, race_and_kill: bool = True) -> dict:
    """The team-mode scenario against ``server`` (pnc processes get ``env``: e.g. credentials); the test process's
    own MlflowClient must be able to read everything. ``race_and_kill``: also a second process racing for one cell
    and a SIGKILLed cell taken over (two more processes). Returns what later checks need: project folder, cells,
    experiment, outputs."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(ROOT / "specs", project / "specs")
    uri = server.url
    c = MlflowClient(uri)

    # what a team does once before the array (the DVC stage embed@digits_domains)
    emb = pnc(["embed", "digits_domains"], project, uri, env)
    assert emb.returncode == 0, emb.stderr
    plan = pnc(["plan", SPEC, *OVERRIDES, "--json"], project, uri, env)
    assert plan.returncode == 0, plan.stderr
    cells = {cell["id"]: cell for cell in json.loads(plan.stdout)["cells"]}
    assert len(cells) == 4
    ids = sorted(cells)
    killed_cell, raced_cell = ids[0], ids[1]

    # (a) four cells at once, one process each, plus a second process racing for one cell's claim; the process of
    # another cell is SIGKILLed once it holds its run (a node lost), and a new process takes that cell over
    t0 = time.time()
    first = Cells(project, uri, env)
    for cid in ids:
        first.start(cid, "first")
    killed_run = None
    if race_and_kill:
        first.start(raced_cell, "race")
        victim = next(p for cid, p, _ in first.procs if cid == killed_cell)
        killed_run = wait_for_claim(c, "digits_transfer", killed_cell, victim.pid)
        stop(victim, signal.SIGKILL)
        assert c.get_run(killed_run).info.status == "RUNNING"  # left behind by the dead process
        first.start(killed_cell, "takeover")
    results = first.wait()
    print(f"4 concurrent cells{' (+1 racing, 1 killed and taken over)' if race_and_kill else ''}: {time.time() - t0:.0f}s")
    for cid, rc, text in results:
        assert "Traceback" not in text and "database is locked" not in text, text[-4000:]
        if rc == -signal.SIGKILL and cid == killed_cell:
            continue
        if cid == raced_cell and rc == 1:  # the loser of the race leaves the cell to the winner
            assert "being run by another process" in text, text[-4000:]
            continue
        assert rc == 0, f"cell {cid} exited {rc}:\n{text[-4000:]}"
    assert sum(rc == 0 for cid, rc, _ in results if cid == raced_cell) >= 1
    if race_and_kill:
        takeover = next(text for cid, rc, text in results if cid == killed_cell and rc == 0)
        assert f"(run {killed_run})" in takeover, takeover[-3000:]  # continued in the killed process's run

    # (b) the store, through the server
    exp = c.get_experiment_by_name("digits_transfer")
    assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    by_role: dict[str, list] = {}
    for r in runs:
        by_role.setdefault(r.data.tags.get("pnc.role"), []).append(r)
    assert sorted(by_role) == ["cell", "study", "transfer"], sorted(by_role)
    (parent,) = by_role["study"]  # one parent although five processes started the study at once
    assert len(by_role["cell"]) == 4 and len(by_role["transfer"]) == 4  # one run per cell: no duplicate
    assert sorted(r.data.tags["pnc.cell_id"] for r in by_role["cell"]) == ids
    assert sorted(r.data.tags["pnc.cell_id"] for r in by_role["transfer"]) == sorted(f"{i}:typeset" for i in ids)
    for r in runs:
        assert r.info.status == "FINISHED", (r.info.run_name, r.info.status)
    for r in by_role["cell"] + by_role["transfer"]:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
    cell_run = {r.data.tags["pnc.cell_id"]: r for r in by_role["cell"]}
    assert killed_run is None or cell_run[killed_cell].info.run_id == killed_run
    for r in by_role["cell"]:
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "train/loss")]
        assert steps == [0] or (r.info.run_id == killed_run and set(steps) == {0}), steps
    for r in by_role["transfer"]:
        n = LAYERS[r.data.tags["pnc.model"]]
        assert r.data.metrics["layers/count"] == n
        for key in ("cdnv/target", "nc2/target", "probe_acc/target_test"):
            hist = c.get_metric_history(r.info.run_id, key)
            assert sorted(m.step for m in hist) == list(range(n)), (r.info.run_name, key)
            assert all(m.value == m.value for m in hist), "no NaN"
        # artifacts are written and read through the server (proxied), never to a local folder
        assert r.info.artifact_uri.startswith("mlflow-artifacts:"), r.info.artifact_uri
        assert "layers.json" in {a.path for a in c.list_artifacts(r.info.run_id)}
        layers = json.loads(Path(c.download_artifacts(r.info.run_id, "layers.json", str(tmp_path / "dl"))).read_text())
        assert len(layers) == n and layers[str(n - 1)] == "penultimate"
    assert not (project / "mlruns").exists() and not (project / "mlartifacts").exists() and not (project / "mlflow.db").exists()
    assert any(server.artifacts.rglob("layers.json")) and any(server.artifacts.rglob("MLmodel"))

    # registered models: one per architecture, one version per source, tags and aliases
    for model in ("resnet8", "resnet14"):
        name = f"digits_transfer-{model}"
        rm = c.get_registered_model(name)
        assert rm.tags.get("pnc.study") == "digits_transfer"
        versions = c.search_model_versions(f"name='{name}'")
        assert len(versions) == 2 and all(v.status == "READY" for v in versions)
        by_source = {v.tags["source"]: v for v in versions}
        assert sorted(by_source) == ["handwritten", "typeset"]
        for source, v in by_source.items():
            cid = v.tags["pnc.cell_id"]
            assert cells[cid]["model"] == model and cells[cid]["source"] == source
            assert v.tags["pnc.study"] == "digits_transfer" and v.tags["pnc.model"] == model and v.tags["pnc.data_digest"]
            assert v.run_id == cell_run[cid].info.run_id
            assert c.get_model_version_by_alias(name, f"src-{source}").version == v.version
        assert rm.aliases.get("current") in {v.version for v in versions}
    for r in by_role["transfer"]:
        v = c.get_model_version_by_alias(f"digits_transfer-{r.data.tags['pnc.model']}", f"src-{r.data.tags['source']}")
        assert r.data.tags["pnc.model_uri"] == f"models:/{v.name}/{v.version}"

    # idempotence: the whole study again (one process: the races were the first pass's) adds no run and no version
    all_runs = {r.info.run_id for r in c.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000)}
    n_versions = len(c.search_model_versions("name LIKE 'digits_transfer-%'"))
    t0 = time.time()
    rerun = pnc(["run", SPEC, *OVERRIDES, "--no-progress"], project, uri, env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr[-4000:]
    assert rerun.stderr.count("reusing registered model") == 4, rerun.stderr[-4000:]
    assert "0 cell(s) run, 4 skipped" in rerun.stderr, rerun.stderr[-3000:]
    print(f"the study again (all 4 cells reused): {time.time() - t0:.0f}s")
    again = {r.info.run_id for r in c.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000)}
    assert again == all_runs
    assert len(c.search_model_versions("name LIKE 'digits_transfer-%'")) == n_versions

    # (c) report and lineage against the server
    rep = pnc(["report", SPEC], project, uri, env)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert (project / "reports" / "digits_transfer" / "index.html").exists()
    trun = sorted(by_role["transfer"], key=lambda r: r.info.run_name)[0]
    lin = pnc(["lineage", trun.info.run_id], project, uri, env)
    assert lin.returncode == 0, lin.stdout + lin.stderr
    assert trun.data.tags["pnc.model_uri"] in lin.stdout
    assert "data/embedded/digits_domains/typeset/train" in lin.stdout
    return {"project": project, "cells": cells, "experiment": exp, "outputs": [emb, plan, rerun, rep, lin],
            "logs": sorted(project.glob("*.log"))}
