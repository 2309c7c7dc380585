"""Team mode: a real `mlflow server` (SQLite backend, proxied artifacts), a study's cells fanned out
as concurrent `pnc run SPEC --cell ID` processes (ids from `pnc plan SPEC --json`), then the store
is checked through the server: every run once and FINISHED, per-layer histories, registered
versions with tags and aliases, artifacts behind the server; running the cells again adds
nothing; `pnc report` and `pnc lineage` work against the server.
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
from pathlib import Path

import pytest

from health import wait_healthy

ROOT = Path(__file__).resolve().parents[1]
SPEC = "specs/digits_transfer.yaml"
OVERRIDES = ["--set", "models=[resnet8, resnet14]", "--set", "transfer.sources=[handwritten, typeset]",
             "--set", "transfer.targets=[typeset]", "--set", "train.epochs=1"]
LAYERS = {"resnet8": 3, "resnet14": 6}  # residual blocks + penultimate - the last block (merged into penultimate)
RUN_TIMEOUT = 420  # seconds, for all concurrent cells together


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, and everything it started."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


class MlflowServer:
    """`mlflow server` on 127.0.0.1:<free port>, SQLite backend and artifact store under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "artifacts"
        self.log = root / "server.log"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "MLFLOW_TRACKING_URI")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no GenAI job workers (7 processes) on a 2-core machine
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
               "--serve-artifacts", "--artifacts-destination", str(self.artifacts),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "2"]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_healthy(self, timeout: float = 180) -> None:
        wait_healthy(self.proc, self.url, self.log, "mlflow server", timeout)

    def stop(self) -> None:
        stop(self.proc)


def pnc_env(uri: str) -> dict:
    return dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def pnc(args: list[str], cwd: Path, uri: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pnc.cli", *args], cwd=cwd, env=pnc_env(uri), capture_output=True,
                          text=True, timeout=timeout)


def fan_out(cell_ids: list[str], cwd: Path, uri: str, tag: str) -> list[tuple[str, int, str]]:
    """Start one `pnc run SPEC --cell ID` per cell at once (as a job array would); wait for all."""
    procs = []
    for cid in cell_ids:
        log = open(cwd / f"{tag}-{cid}.log", "w")
        p = subprocess.Popen([sys.executable, "-m", "pnc.cli", "run", SPEC, *OVERRIDES, "--cell", cid, "--no-progress"],
                             cwd=cwd, env=pnc_env(uri), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        procs.append((cid, p, log))
    deadline = time.time() + RUN_TIMEOUT
    out = []
    try:
        for _cid, p, _log in procs:
            try:
                p.wait(timeout=max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for _cid, p, _log in procs:
            timed_out = p.poll() is None
            stop(p)
            log.close()
            text = (cwd / f"{tag}-{cid}.log").read_text()
            out.append((cid, -999 if timed_out else p.returncode, text))
    return out


@pytest.mark.slow
def test_team_mode_fan_out_on_mlflow_server(tmp_path: Path) -> None:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(ROOT / "specs", project / "specs")
    server = MlflowServer(tmp_path)
    try:
        server.wait_healthy()
        uri = server.url
        c = MlflowClient(uri)

        # what a team does once before the array (the DVC stage embed@digits_domains)
        emb = pnc(["embed", "digits_domains"], project, uri)
        assert emb.returncode == 0, emb.stderr
        plan = pnc(["plan", SPEC, *OVERRIDES, "--json"], project, uri)
        assert plan.returncode == 0, plan.stderr
        cells = {cell["id"]: cell for cell in json.loads(plan.stdout)["cells"]}
        assert len(cells) == 4

        # (a) four cells at once, one process each
        t0 = time.time()
        results = fan_out(list(cells), project, uri, "first")
        for cid, rc, text in results:
            assert rc == 0, f"cell {cid} exited {rc}:\n{text[-4000:]}"
            assert "Traceback" not in text and "database is locked" not in text, text[-4000:]
        print(f"4 concurrent cells: {time.time() - t0:.0f}s")

        # (b) the store, through the server
        exp = c.get_experiment_by_name("digits_transfer")
        assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
        runs = c.search_runs([exp.experiment_id], max_results=1000)
        by_role: dict[str, list] = {}
        for r in runs:
            by_role.setdefault(r.data.tags.get("pnc.role"), []).append(r)
        assert sorted(by_role) == ["cell", "study", "transfer"], sorted(by_role)
        (parent,) = by_role["study"]  # one parent although four processes started the study at once
        assert len(by_role["cell"]) == 4 and len(by_role["transfer"]) == 4
        assert sorted(r.data.tags["pnc.cell_id"] for r in by_role["cell"]) == sorted(cells)
        assert sorted(r.data.tags["pnc.cell_id"] for r in by_role["transfer"]) == sorted(f"{i}:typeset" for i in cells)
        for r in runs:
            assert r.info.status == "FINISHED", (r.info.run_name, r.info.status)
        for r in by_role["cell"] + by_role["transfer"]:
            assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        for r in by_role["cell"]:
            assert [m.step for m in c.get_metric_history(r.info.run_id, "train/loss")] == [0]
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
        cell_run = {r.data.tags["pnc.cell_id"]: r for r in by_role["cell"]}
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

        # idempotence: the same cells again, again at once, add no run and no version
        all_runs = {r.info.run_id for r in c.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000)}
        n_versions = len(c.search_model_versions("name LIKE 'digits_transfer-%'"))
        t0 = time.time()
        for cid, rc, text in fan_out(list(cells), project, uri, "again"):
            assert rc == 0, f"cell {cid} (again) exited {rc}:\n{text[-4000:]}"
            assert "reusing registered model" in text and "skipped" in text, text[-3000:]
        print(f"4 concurrent cells again (all reused): {time.time() - t0:.0f}s")
        again = {r.info.run_id for r in c.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000)}
        assert again == all_runs
        assert len(c.search_model_versions("name LIKE 'digits_transfer-%'")) == n_versions

        # (c) report and lineage against the server
        rep = pnc(["report", SPEC], project, uri)
        assert rep.returncode == 0, rep.stdout + rep.stderr
        assert (project / "reports" / "digits_transfer" / "index.html").exists()
        trun = sorted(by_role["transfer"], key=lambda r: r.info.run_name)[0]
        lin = pnc(["lineage", trun.info.run_id], project, uri)
        assert lin.returncode == 0, lin.stdout + lin.stderr
        assert trun.data.tags["pnc.model_uri"] in lin.stdout
        assert "data/embedded/digits_domains/typeset/train" in lin.stdout
    finally:
        server.stop()
