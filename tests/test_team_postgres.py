"""Team mode on a lab's stack: `mlflow server` on a throwaway PostgreSQL cluster, behind MLflow's basic-auth app.

One cluster (`initdb` + `pg_ctl`, 127.0.0.1 and a free port; as root through the `postgres` user), one server
(`--app-name basic-auth`, its user store in a second database). As user alice (the study's owner): the shared
team-mode scenario of tests/team.py. Then the refusals, each exit 1 with one message naming the user, the resource
and the permission missing, no traceback, no run left RUNNING, none of alice's runs touched:
- alice with a wrong password;
- carol (credentials in ~/.mlflow/credentials, READ on the experiment, MLflow's default) trying to run a cell;
- bob (in his own experiment) trying to register a version of alice's registered model (READ only).
Last, no password anywhere: the whole PostgreSQL store, the artifacts, the reports and every captured output.
`make postgres` (part of `make test`) installs Debian's PostgreSQL where it is missing.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from team import OVERRIDES, SPEC, MlflowServer, free_port, pnc, team_scenario

ADMIN = ("admin", "admin-Pw-0f1e2d3c")
USERS = {"alice": "alice-Pw-9a8b7c6d", "bob": "bob-Pw-5e4f3a2b", "carol": "carol-Pw-1c2d3e4f"}


def postgres_bin() -> Path:
    """The folder of PostgreSQL's server programs (initdb, pg_ctl): on PATH (/usr/local/bin here) or Debian's
    /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    dirs = ([Path(found).parent] if found else []) + [Path(d) for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for d in dirs:
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    pytest.fail("PostgreSQL's initdb / pg_ctl are not installed (Debian package `postgresql`): run `make test`, "
                "which installs them (`make postgres`)")


class PostgresCluster:
    """A throwaway cluster in a temporary folder, listening on 127.0.0.1:<free port> only, trust authentication
    (nothing else can reach it). initdb refuses root: as root, it runs as the `postgres` system user."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="pnc-pg-"))
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        data = self.dir / "data"
        self._run([str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off -c max_connections=200"
        self._run([str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "postgres.log"), "-w", "-t", "60",
                   "-o", opts, "start"])
        self.data = data

    def _run(self, cmd: list[str]) -> None:
        r = subprocess.run(self.as_user + cmd, capture_output=True, text=True, timeout=120, cwd=self.dir)
        assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        con.close()

    def dump_text(self, database: str) -> str:
        """Every row of every table of ``database``, as text (what a grep of the store reads)."""
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=database)
        out = []
        with con.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            for (table,) in cur.fetchall():
                cur.execute(f'SELECT t::text FROM "{table}" t')
                out += [f"{table}: {row}" for (row,) in cur.fetchall()]
        con.close()
        return "\n".join(out)

    def stop(self) -> None:
        subprocess.run(self.as_user + [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60, cwd=self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


def creds(user: str, password: str | None = None) -> dict:
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password or USERS[user]}


def snapshot(c, exp_ids: list[str]) -> dict:
    """Every run of the experiments (also deleted ones): status, end time, params, tags, metrics."""
    from mlflow.entities import ViewType

    runs = c.search_runs(exp_ids, run_view_type=ViewType.ALL, max_results=1000)
    return {r.info.run_id: (r.info.status, r.info.end_time, r.info.lifecycle_stage, r.data.params, r.data.tags,
                            r.data.metrics) for r in runs}


def refused(out: subprocess.CompletedProcess, *words: str) -> str:
    """The error line of a refused pnc command: exit 1, no traceback, every one of ``words`` in it."""
    text = out.stdout + out.stderr
    assert out.returncode == 1, f"exit {out.returncode}:\n{text[-4000:]}"
    assert "Traceback" not in text and "internal error" not in text, text[-4000:]
    line = next((ln for ln in out.stderr.splitlines() if ln.startswith("error:")), "")
    for w in words:
        assert w in line, f"{w!r} not in the error line {line!r}:\n{text[-3000:]}"
    return line


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a bound for a hang only: 6 min wall, 2.4 min CPU on 2 cores shared with other jobs
def test_team_mode_on_postgres_behind_basic_auth(tmp_path: Path, monkeypatch) -> None:
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    t_start = time.time()
    pg = PostgresCluster()
    server = None
    try:
        pg.create_database("mlflow")
        pg.create_database("mlflow_auth")
        ini = tmp_path / "basic_auth.ini"
        ini.write_text("[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = {pg.url('mlflow_auth')}\n"
                       f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                       "auth_cache_ttl_seconds = 300\n")  # no PBKDF2 check of the password on every request
        server = MlflowServer(tmp_path, backend=pg.url("mlflow"), extra=["--app-name", "basic-auth"],
                              env={"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "pnc-test-csrf"})
        server.wait_healthy()
        uri = server.url
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])  # this process reads the store as the admin
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
        admin = AuthServiceClient(uri)
        for user, password in USERS.items():
            admin.create_user(user, password)
        c = MlflowClient(uri)
        print(f"PostgreSQL cluster + basic-auth server up: {time.time() - t_start:.0f}s")

        # the team-mode scenario, as alice: she creates the experiment and the registered models (MANAGE on them)
        done = team_scenario(tmp_path, server, creds("alice"))
        project, cells, exp = done["project"], done["cells"], done["experiment"]
        resnet8 = sorted(cid for cid, cell in cells.items() if cell["model"] == "resnet8")[0]
        before = snapshot(c, [exp.experiment_id])
        versions = len(c.search_model_versions("name LIKE 'digits_transfer-%'"))
        outputs = [o.stdout + o.stderr for o in done["outputs"]] + [p.read_text() for p in done["logs"]]

        # a wrong password
        wrong = pnc(["run", SPEC, *OVERRIDES, "--cell", resnet8], project, uri, creds("alice", "not-her-password"))
        refused(wrong, "'alice'", "wrong password", "401")

        # carol, credentials the MLflow way in ~/.mlflow/credentials, READ only on the experiment: runs a cell again
        home = tmp_path / "carol-home"
        (home / ".mlflow").mkdir(parents=True)
        (home / ".mlflow" / "credentials").write_text(
            f"[mlflow]\nmlflow_tracking_username = carol\nmlflow_tracking_password = {USERS['carol']}\n")
        read_only = pnc(["run", SPEC, *OVERRIDES, "--cell", resnet8, "--force"], project, uri, {"HOME": str(home)})
        refused(read_only, "'carol'", "EDIT permission", "experiment 'digits_transfer'")

        # bob, in his own experiment (he owns it), registers a version of alice's model: READ only there
        grab = pnc(["run", SPEC, *OVERRIDES, "--set", "tracking.experiment=bob_scratch", "--cell", resnet8, "--force"],
                   project, uri, creds("bob"))
        refused(grab, "'bob'", "EDIT permission", "registered model 'digits_transfer-resnet8'")
        bob_exp = c.get_experiment_by_name("bob_scratch")
        assert bob_exp is not None
        bob_runs = snapshot(c, [bob_exp.experiment_id])
        assert bob_runs and all(status != "RUNNING" for status, *_ in bob_runs.values()), bob_runs
        assert any(status == "FAILED" and "permission" in tags.get("pnc.failure", "")
                   for status, _, _, _, tags, _ in bob_runs.values()), bob_runs

        # nothing of alice's touched, nothing added, nothing left RUNNING
        assert snapshot(c, [exp.experiment_id]) == before
        assert len(c.search_model_versions("name LIKE 'digits_transfer-%'")) == versions

        # credentials in the tracking URI (user:password@host) are used (no other credentials here), and the URI
        # pnc prints has them removed
        host = uri.split("://", 1)[1]
        in_uri = pnc(["report", SPEC], project, f"http://alice:{USERS['alice']}@{host}")
        assert in_uri.returncode == 0, in_uri.stdout + in_uri.stderr
        shown = pnc(["ui"], project, f"http://alice:{USERS['alice']}@{host}")
        assert shown.returncode == 0 and f"open {uri} in a browser" in shown.stdout, shown.stdout + shown.stderr

        # no password anywhere pnc wrote: the store (params, tags, metrics, every table), artifacts, reports, outputs
        outputs += [o.stdout + o.stderr for o in (wrong, read_only, grab, in_uri, shown)]
        store = pg.dump_text("mlflow")
        assert "digits_transfer" in store and "pnc.cell_id" in store  # the dump does read the runs
        files = [p for p in [*server.artifacts.rglob("*"), *(project / "reports").rglob("*"), *(project / ".pnc").rglob("*")]
                 if p.is_file()]
        assert any(p.name == "index.html" for p in files) and any(p.name == "layers.json" for p in files)
        texts = {"store": store, **{str(p): p.read_bytes().decode("utf-8", "replace") for p in files},
                 **{f"output {i}": t for i, t in enumerate(outputs)}}
        for password in [*USERS.values(), ADMIN[1], "not-her-password"]:
            leaks = [where for where, text in texts.items() if password in text]
            assert not leaks, f"a password is written in {leaks}"
        print(f"PostgreSQL + basic-auth test: {time.time() - t_start:.0f}s")
    finally:
        if server is not None:
            server.stop()
        pg.stop()


def test_transient_store_errors_are_retried_and_refusals_are_not(monkeypatch) -> None:
    """`tracking.retrying` on the errors an MLflow client raises (built as MLflow's REST client builds them):
    PostgreSQL's serialization failure and deadlock (HTTP 500) are retried until the call succeeds; HTTP 401 and
    403 are not retried and become AccessDenied naming the user, the resource and the permission."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, PERMISSION_DENIED, UNAUTHENTICATED

    from pnc import tracking
    from pnc.errors import AccessDenied

    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:s3cret-pw@mlflow.lab.example:5000")
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # restored after the test: pnc sets them
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    assert tracking.tracking_uri() == "http://mlflow.lab.example:5000"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "bob" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret-pw"

    def failing(errors: list[Exception]):
        calls = []

        def fn():
            calls.append(1)
            if len(calls) <= len(errors):
                raise errors[len(calls) - 1]
            return "done"
        return fn, calls

    pg = [MlflowException("(psycopg2.errors.SerializationFailure) could not serialize access due to concurrent update",
                          error_code=INTERNAL_ERROR),
          MlflowException("(psycopg2.errors.DeadlockDetected) deadlock detected", error_code=INTERNAL_ERROR)]
    fn, calls = failing(pg)
    assert tracking.retrying(fn) == "done" and len(calls) == 3
    fn, calls = failing([MlflowException("no such run", error_code=INTERNAL_ERROR)])
    with pytest.raises(MlflowException):
        tracking.retrying(fn)
    assert len(calls) == 1

    body = "API request to endpoint {} failed with error code {} != 200. Response body: '{}'"
    fn, calls = failing([MlflowException(body.format("/api/2.0/mlflow/model-versions/create", 403, "Permission denied"),
                                         error_code=PERMISSION_DENIED)])
    with pytest.raises(AccessDenied) as e:
        tracking.retrying(fn, resource="registered model 'digits_transfer-resnet8'")
    assert len(calls) == 1
    msg = str(e.value)
    assert "user 'bob'" in msg and "EDIT permission on registered model 'digits_transfer-resnet8'" in msg, msg
    assert "s3cret-pw" not in msg and "http://mlflow.lab.example:5000" in msg
    fn, _ = failing([MlflowException(body.format("/api/2.0/mlflow/runs/delete", 403, "Permission denied"),
                                     error_code=PERMISSION_DENIED)])
    with pytest.raises(AccessDenied, match="lacks MANAGE permission on experiment 'x'"):
        tracking.retrying(fn, resource="experiment 'x'")
    fn, _ = failing([MlflowException(body.format("/api/2.0/mlflow/runs/search", 401, "You are not authenticated"),
                                     error_code=UNAUTHENTICATED)])
    with pytest.raises(AccessDenied, match="refused user 'bob': unknown user or wrong password"):
        tracking.retrying(fn, resource="experiment 'x'")
