"""The only module that writes to MLflow: studies, cells, params, metrics, inputs, artifacts, registry.

Conventions (ARCHITECTURE.md): one parent run per study, one nested child run per cell;
per-layer metrics ``<metric>/<split>`` with step = layer index (0 = first tapped layer);
per-epoch ``train/loss`` and ``train/acc`` with step = epoch. Tags ``pnc.*`` identify the
study, spec file and digest, cell id and the digest of the data a cell read, so a finished cell
is found again and skipped.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from . import __version__
from .errors import AccessDenied

TAG_STUDY = "pnc.study"
TAG_ROLE = "pnc.role"  # "study" (parent), "cell", "transfer"
TAG_CELL = "pnc.cell_id"
TAG_CELL_NAME = "pnc.cell"
TAG_DATA = "pnc.data_digest"
TAG_SPEC = "pnc.spec_path"
TAG_SPEC_DIGEST = "pnc.spec_digest"
TAG_FAILURE = "pnc.failure"
TAG_PRECISION = "pnc.precision_used"  # the precision training really ran in (train.precision fp16 on a CPU: fp32)
TAG_OWNER = "pnc.owner"  # host:pid:token of the process that holds a cell's run while it trains
TAG_HEARTBEAT = "pnc.heartbeat"  # unix seconds, refreshed by the owner while it holds the run
TAG_MODEL_URI = "pnc.model_uri"  # the logged model a run measured (transfer targets, measure studies)
TAG_MODEL_RUN = "pnc.model_run"  # the run that trained it: lineage walks on from there
TAG_NCC_TRAIN = "pnc.ncc_train"  # how ncc_acc/train was scored: "kept features" (one pass) or "second pass"
TAG_NOTE = "mlflow.note.content"  # MLflow's description of an experiment or a run (markdown; shown by the UI)
# MLflow's experiment kind: the UI opens such an experiment in its "Model training" view (not the GenAI one)
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}

_MAX_BATCH = 900  # MLflow allows 1000 metrics per log_batch

# pnc's machines have no network: MLflow's usage telemetry would only wait for time-outs.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def project_root() -> Path:
    """The project folder: ``$DVC_ROOT`` when DVC runs the command (the parent repository also for ``dvc exp run
    --temp`` / ``--queue``, whose stages run in a copy under ``.dvc/tmp/exps``), else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd())


def project_store() -> str:
    """The project's own store: SQLite ``mlflow.db`` in :func:`project_root`."""
    return f"sqlite:///{(project_root() / 'mlflow.db').as_posix()}"


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else :func:`project_store`; never with a password in it.

    Credentials are MLflow's own: ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, or
    ``~/.mlflow/credentials`` (never a spec). A ``user:password@`` part of an http(s) URI is moved into those
    variables of this process (unless they are set already) and left out of the URI returned: the URI pnc prints,
    logs and writes into reports carries no secret.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return project_store()
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    if user and not os.environ.get("MLFLOW_TRACKING_USERNAME"):
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
        if password:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    return urlunsplit(parts._replace(netloc=host))


def tracking_user() -> str | None:
    """The MLflow user pnc authenticates as (``MLFLOW_TRACKING_USERNAME``, else ``~/.mlflow/credentials``), or None."""
    tracking_uri()  # a user in the URI counts
    try:
        from mlflow.utils.credentials import read_mlflow_creds

        return read_mlflow_creds().username or None
    except Exception:  # noqa: BLE001 - an unreadable credentials file: MLflow reports it on its first request
        return os.environ.get("MLFLOW_TRACKING_USERNAME") or None


def artifact_location() -> str | None:
    """Where a new experiment of the project's store keeps its artifacts: ``mlruns/`` beside ``mlflow.db``
    (MLflow's default is relative to the working directory, which DVC's temporary experiment copies delete).
    None for another store (``$MLFLOW_TRACKING_URI``): that store's, or server's, default applies."""
    if tracking_uri() != project_store():
        return None
    return (project_root() / "mlruns").resolve().as_uri()


def dvc_tags() -> dict[str, str]:
    """The DVC experiment a run belongs to, when ``dvc exp run`` started it (DVC sets ``DVC_EXP_NAME`` and
    ``DVC_EXP_BASELINE_REV`` for the stages of an experiment)."""
    tags = {"DVC_EXP_NAME": "pnc.dvc_experiment", "DVC_EXP_BASELINE_REV": "pnc.dvc_baseline_rev"}
    return {tag: os.environ[var] for var, tag in tags.items() if os.environ.get(var)}


def _sqlite_path(uri: str) -> str | None:
    """The database file of a ``sqlite:///`` URI (query string dropped), or None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else path


def _prepare_sqlite(uri: str) -> None:
    """WAL journal + busy timeout so that several pnc processes can share one local store."""
    path = _sqlite_path(uri)
    if path is None:
        return
    import sqlite3

    for attempt in range(20):
        try:
            con = sqlite3.connect(path, timeout=30)
            try:
                con.execute("PRAGMA journal_mode=WAL")
            finally:
                con.close()
            return
        except sqlite3.OperationalError:
            time.sleep(0.2 * (attempt + 1))


def _init_store(uri: str, make_client):
    """Create the client and, for a local SQLite store, its tables under an exclusive file lock.

    MLflow 3.x creates and migrates a fresh SQLite store's tables when the store is first opened,
    without a lock: two processes starting on a new ``mlflow.db`` at once both migrate, and one
    fails ('duplicate column name', 'table ... already exists'). The lock file sits beside the
    database (``mlflow.db-pnc-init.lock``), so it serialises every pnc process on that store.
    """
    path = _sqlite_path(uri)
    if path is None:
        return make_client()
    try:  # import the SQL stores before taking the lock: the lock is held for less time
        import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    except ImportError:  # pragma: no cover - other MLflow layouts: imported under the lock instead
        pass
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}-pnc-init.lock"):
        _prepare_sqlite(uri)
        c = make_client()
        # open both stores now (tracking and model registry): this is what creates the tables
        retrying(lambda: c.search_experiments(max_results=1))
        retrying(lambda: c.search_registered_models(max_results=1))
        return c


_CLIENT = None
_CLIENT_URI = None


def client():
    """An MlflowClient on :func:`tracking_uri` (created once per process)."""
    global _CLIENT, _CLIENT_URI
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    if _CLIENT is None or _CLIENT_URI != uri:
        mlflow.set_tracking_uri(uri)
        _CLIENT = _init_store(uri, lambda: retrying(lambda: MlflowClient(tracking_uri=uri)))
        _CLIENT_URI = uri
    return _CLIENT


# Transient store errors, retried: SQLite's lock; PostgreSQL's deadlocks and serialization failures, which an
# MLflow server on PostgreSQL answers with HTTP 500 and the driver's message (docs/team.md).
_TRANSIENT = ("locked", "deadlock detected", "could not serialize access", "serializationfailure",
              "deadlockdetected")


def retrying(fn, attempts: int = 8, *, resource: str = ""):
    """``fn()``, retrying transient store errors (:data:`_TRANSIENT`) with backoff.

    A request the server refuses (HTTP 401: unknown user or wrong password; 403: a permission missing) is not
    retried: it raises :class:`AccessDenied` naming the user, ``resource`` (what ``fn`` touches: ``experiment
    'x'``, ``run <id>``, ``registered model 'y'``) and the permission missing."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - only transient errors are retried
            refused = access_denied(e, resource)
            if refused is not None:
                raise refused from None
            if not any(t in str(e).lower() for t in _TRANSIENT) or i == attempts - 1:
                raise
            time.sleep(0.25 * 2**i)


def _needed_permission(endpoint: str, method: str = "") -> str:
    """The MLflow permission a refused request to ``endpoint`` needed, by MLflow's basic-auth rules: READ to read,
    EDIT to create and update (tags, metrics, artifacts, model versions, aliases), MANAGE to delete runs,
    experiments, models and versions, and to manage permissions."""
    e = endpoint.lower().split("?", 1)[0].rstrip("/")
    if "permission" in e or e.endswith("/delete"):
        return "MANAGE"
    if method.upper() in ("GET", "HEAD") or any(w in e.rsplit("/", 1)[-1] for w in ("get", "search", "list")):
        return "READ"
    return "EDIT"


def _run_resource(run_id: str) -> str:
    """``experiment 'name' (run <id>)`` when the run can still be read, else ``run <id>``."""
    try:
        c = client()
        exp = c.get_experiment(c.get_run(run_id).info.experiment_id)
        return f"experiment {exp.name!r} (run {run_id})"
    except Exception:  # noqa: BLE001 - not readable either: name the run alone
        return f"run {run_id}"


def access_denied(exc: BaseException, resource: str = "") -> Exception | None:
    """An :class:`~pnc.errors.AccessDenied` for an MLflow request refused with HTTP 401 or 403, else None."""
    import re

    text = str(exc)
    code = str(getattr(exc, "error_code", "") or "")
    status = re.search(r"error code (\d{3})", text) or re.search(r"\b(\d{3}) Client Error", text)
    status_code = status.group(1) if status else ""
    if code not in ("UNAUTHENTICATED", "PERMISSION_DENIED") and status_code not in ("401", "403"):
        return None
    user = tracking_user()
    who = f"user {user!r}" if user else "no user (neither MLFLOW_TRACKING_USERNAME nor ~/.mlflow/credentials is set)"
    if code == "UNAUTHENTICATED" or status_code == "401":
        return AccessDenied(f"the MLflow server {tracking_uri()} refused {who}: unknown user or wrong password "
                            "(HTTP 401). Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
                            "~/.mlflow/credentials (docs/team.md)")
    m = re.search(r"endpoint (\S+)", text) or re.search(r"for url: (\S+?)\.?(?:\s|$)", text)
    endpoint = m.group(1) if m else "a request"
    if endpoint.startswith(("http://", "https://")):
        from urllib.parse import urlsplit

        endpoint = urlsplit(endpoint).path
    request = getattr(exc, "request", None)
    method = getattr(request, "method", "") or ""
    what = resource or f"the resource of {endpoint}"
    if what.startswith("run ") and " " not in what[4:]:
        what = _run_resource(what[4:])
    return AccessDenied(f"MLflow {who} lacks {_needed_permission(endpoint, method)} permission on {what}: the server "
                        f"{tracking_uri()} refused {endpoint} (HTTP 403). Ask its admin to grant it "
                        "(docs/team.md, 'Accounts and permissions')")


# Untracked files here are what pnc and DVC write (data, reports, results), not code: they leave the tree clean.
# ``.dvc`` files are the exception (a new ``dvc add`` not yet committed is a change).
_GIT_OUTPUT_DIRS = ("data/", "reports/", "results/", "metrics/", "plots/")


def git_state() -> dict[str, str]:
    """Commit of the working tree and whether it has uncommitted changes.

    Dirty means modified, staged or untracked files (a new spec not yet added counts); ignored files
    (mlflow.db, .pnc/) and untracked outputs under :data:`_GIT_OUTPUT_DIRS` do not. One ``git status``
    with ``--untracked-files=normal``: an untracked folder is one line, not one per file, and ignored
    folders are not read.
    """
    out = {"pnc.version": __version__}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["pnc.git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal"],
                                    capture_output=True, text=True, timeout=10)
            if status.returncode == 0:
                def counts(line: str) -> bool:
                    if not line.startswith("?? "):
                        return bool(line.strip())
                    path = line[3:].strip().strip('"')
                    return not path.startswith(_GIT_OUTPUT_DIRS) or path.endswith(".dvc")

                out["pnc.git_dirty"] = str(any(counts(line) for line in status.stdout.splitlines())).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def numerics_context() -> dict[str, str]:
    """What a run's numbers depend on beyond the code and the data: the CPU model, the GPU, the torch / CUDA /
    cuDNN versions, whether deterministic algorithms are enforced, the intra-op thread count. Results are
    bit-identical between runs only when these agree (same machine, same versions); README 'Reproducibility'."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    cuda = torch.cuda.is_available()
    cudnn = torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None
    return {"pnc.cpu": cpu, "pnc.gpu": torch.cuda.get_device_name(0) if cuda else "none",
            "pnc.torch": torch.__version__, "pnc.cuda": str(torch.version.cuda) if cuda else "none",
            "pnc.cudnn": str(cudnn) if cudnn else "none",
            "pnc.deterministic": str(torch.are_deterministic_algorithms_enabled()).lower(),
            "pnc.threads": str(torch.get_num_threads()), "pnc.python": platform.python_version()}


def experiment_id(name: str, description: str | None = None) -> str:
    """The experiment ``name`` (created, or restored when deleted), tagged as a model-training experiment
    (:data:`EXPERIMENT_TAGS`) and, when given, with its ``description``."""
    c = client()
    res = f"experiment {name!r}"
    exp = retrying(lambda: c.get_experiment_by_name(name), resource=res)
    tags = {**EXPERIMENT_TAGS, **({TAG_NOTE: description} if description else {})}
    if exp is None:
        try:
            exp_id = retrying(lambda: c.create_experiment(name, artifact_location=artifact_location(), tags=tags),
                              resource=res)
            _EXPERIMENTS[exp_id] = name
            return exp_id
        except AccessDenied:
            raise
        except Exception:  # noqa: BLE001 - a concurrent process created it first
            exp = retrying(lambda: c.get_experiment_by_name(name), resource=res)
    if exp.lifecycle_stage == "deleted":
        retrying(lambda: c.restore_experiment(exp.experiment_id), resource=res)
    for k, v in tags.items():
        if exp.tags.get(k) != v:
            retrying(lambda k=k, v=v: c.set_experiment_tag(exp.experiment_id, k, v), resource=res)
    _EXPERIMENTS[exp.experiment_id] = name
    return exp.experiment_id


_EXPERIMENTS: dict[str, str] = {}  # experiment id -> name, for messages


def _experiment(exp_id: str) -> str:
    """An experiment, as messages name it."""
    return f"experiment {_EXPERIMENTS[exp_id]!r}" if exp_id in _EXPERIMENTS else f"experiment {exp_id}"


def ui_links(base: str) -> list[tuple[str, str]]:
    """(experiment, URL) of every pnc experiment of the store in the MLflow UI at ``base``, on its runs page in the
    UI's "Model training" view: MLflow 3's UI picks GenAI or model training from its own toggle (``workflowType``,
    remembered by the browser), not from the experiment's kind, so the link sets it."""
    c = client()
    tag = next(iter(EXPERIMENT_TAGS))
    exps = retrying(lambda: c.search_experiments(filter_string=f"tags.`{tag}` = '{EXPERIMENT_TAGS[tag]}'"))
    return [(e.name, f"{base}/#/experiments/{e.experiment_id}/runs?workflowType=machine_learning") for e in exps]


def context_tags(tags: dict[str, str]) -> dict[str, str]:
    """``tags`` over MLflow's standard context tags of a new run (user, source name and type, git commit), as
    MLflow's own run-context resolver finds them (what ``mlflow.start_run`` adds)."""
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags(tags)


def _search(exp_id: str, filter_string: str, max_results: int = 1000) -> list:
    c = client()
    return retrying(lambda: c.search_runs([exp_id], filter_string=filter_string, max_results=max_results,
                                          order_by=["attributes.start_time DESC"]), resource=_experiment(exp_id))


_PARENT_SETTLE_S = 2.0  # longer than any create_run takes to commit


def _study_parents(exp_id: str, study: str) -> list:
    """The study's parent runs, the canonical one (oldest start time, then smallest run id) first."""
    runs = _search(exp_id, f"tags.`{TAG_STUDY}` = '{study}' and tags.`{TAG_ROLE}` = 'study'")
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def study_parent(exp_id: str, study: str, tags: dict[str, str]) -> str:
    """The study's parent run (reused across invocations: running a study twice adds no runs).

    Several processes may start cells of one study at once (``pnc run --cell`` fanned out): each
    may find no parent and create one. So a process that created a parent (or found a young one)
    waits until concurrent creations have committed, then every process takes the same canonical
    parent (the oldest), and a process whose own new parent lost deletes it. On a local SQLite store the
    find-or-create is serialised by a file lock beside the database, so no parent is created twice there and
    nothing needs to settle.
    """
    path = _sqlite_path(tracking_uri())
    if path is None:
        return _study_parent(exp_id, study, tags, _PARENT_SETTLE_S)
    with FileLock(f"{path}-pnc-parent.lock"):
        return _study_parent(exp_id, study, tags, 0.0)


def _study_parent(exp_id: str, study: str, tags: dict[str, str], settle_s: float) -> str:
    c = client()
    runs = _study_parents(exp_id, study)
    mine = None
    try:
        if not runs:
            run = retrying(lambda: c.create_run(exp_id, run_name=study, tags=context_tags({TAG_STUDY: study, TAG_ROLE: "study", **tags})),
                           resource=_experiment(exp_id))
            mine = run.info.run_id
        if settle_s and (mine is not None or time.time() * 1000 - (runs[0].info.start_time or 0) < 30_000):
            time.sleep(settle_s)
            runs = _study_parents(exp_id, study) or runs
    except KeyboardInterrupt:  # Ctrl-C while settling: the parent this process created must not stay RUNNING
        if mine is not None:
            end_run(mine, "KILLED")
        raise
    run_id = runs[0].info.run_id if runs else mine
    if mine is not None and mine != run_id:
        retrying(lambda: c.delete_run(mine), resource=f"run {mine}")
    log_tags(run_id, tags)
    return run_id


def _cell_runs(exp_id: str, cell_id: str, role: str) -> list:
    """The runs of a cell (any status), newest first."""
    return _search(exp_id, f"tags.`{TAG_CELL}` = '{cell_id}' and tags.`{TAG_ROLE}` = '{role}'")


def find_cell_run(exp_id: str, cell_id: str, role: str = "cell") -> Any | None:
    """The newest run of a cell (any status), or None."""
    return next(iter(_cell_runs(exp_id, cell_id, role)), None)


def start_cell_run(exp_id: str, parent_id: str, cell: Any, tags: dict[str, str], *, role: str = "cell",
                   run_name: str | None = None, reuse: Any | None = None, cell_id: str | None = None) -> str:
    """A nested child run for a cell; ``reuse`` continues an unfinished run instead of creating one."""
    c = client()
    all_tags = {"mlflow.parentRunId": parent_id, TAG_ROLE: role, TAG_CELL: cell_id or cell.id, TAG_CELL_NAME: cell.name,
                TAG_STUDY: cell.study, **tags}
    if reuse is not None:
        run_id = reuse.info.run_id
        retrying(lambda: c.update_run(run_id, status="RUNNING"), resource=f"run {run_id}")
        log_tags(run_id, all_tags)
        return run_id
    run = retrying(lambda: c.create_run(exp_id, run_name=run_name or cell.name, tags=context_tags(all_tags)), resource=_experiment(exp_id))
    return run.info.run_id


# ------------------------------------------------------------------ claiming a cell (one process per cell)
def _float(text: str | None, default: float) -> float:
    """``text`` as a float; ``default`` when it is missing or not a number."""
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


LEASE_S = _float(os.environ.get("PNC_LEASE_S"), 300.0)  # a holder silent for this long (other host) has died
SETTLE_S = _float(os.environ.get("PNC_CLAIM_SETTLE_S"), 2.0)  # longer than a process takes from its check to its claim (at least)
_TOKEN = uuid.uuid4().hex[:8]
_BEATS: dict[str, tuple[threading.Event, threading.Thread]] = {}


def owner_id() -> str:
    """This process, as written in a claimed run's ``pnc.owner`` tag."""
    return f"{socket.gethostname()}:{os.getpid()}:{_TOKEN}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def holder(run: Any, now: float | None = None) -> str | None:
    """The other live process that holds ``run``, or None (finished, closed, unclaimed, or its holder died).

    On this host the holder's pid must exist; on another host its heartbeat must be under ``PNC_LEASE_S`` old.
    """
    if run.info.status != "RUNNING":
        return None
    owner = run.data.tags.get(TAG_OWNER, "")
    if not owner or owner == owner_id():
        return None
    host, _, rest = owner.partition(":")
    if (now if now is not None else time.time()) - _float(run.data.tags.get(TAG_HEARTBEAT), 0.0) >= LEASE_S:
        return None
    if host == socket.gethostname():
        pid = rest.partition(":")[0]
        return owner if pid.isdigit() and _pid_alive(int(pid)) else None
    return owner


@dataclass
class Claim:
    """What to do with a cell: ``run`` it in ``run_id`` (continuing ``reused`` if set), ``skip`` it (finished
    in ``run_id``), or leave it: ``busy`` (``holder`` is running it in ``run_id``)."""

    decision: str
    run_id: str | None
    reused: Any | None = None
    holder: str = ""

    @property
    def reason(self) -> str:
        """Why the cell is left to another process (:func:`busy_message`); "" unless ``busy``."""
        return busy_message(self) if self.decision == "busy" else ""


def claim_cell_run(exp_id: str, parent_id: str, cell: Any, tags: dict[str, str], *, role: str = "cell",
                   run_name: str | None = None, cell_id: str | None = None, usable=lambda run: True,
                   force: bool = False) -> Claim:
    """Find or start the run of a cell, so that one process at a time works on it.

    The newest run of the cell decides: held by another live process -> busy; FINISHED (and ``usable``:
    e.g. the same data) -> skip, unless ``force``; unfinished and usable -> continued; else a new run.
    Two processes may pass the check at the same moment (a job array submitted twice). So each writes its
    owner tag, waits ``PNC_CLAIM_SETTLE_S``, and reads back: of the RUNNING runs whose holders live, the
    oldest wins, and of a run claimed twice the last owner written wins; the loser deletes the run it
    created and reports busy. While the winner holds the run, a thread refreshes its heartbeat tag.
    """
    cid = cell_id or cell.id
    t_check = time.monotonic()
    runs = _cell_runs(exp_id, cid, role)
    now = time.time()
    for r in runs:
        h = holder(r, now)
        if h:
            return Claim("busy", r.info.run_id, holder=h)
    prev = runs[0] if runs and usable(runs[0]) else None
    if prev is not None and prev.info.status == "FINISHED" and not force:
        return Claim("skip", prev.info.run_id, prev)
    reuse = prev if prev is not None and prev.info.status != "FINISHED" else None
    me = owner_id()
    run_id = start_cell_run(exp_id, parent_id, cell, {**tags, TAG_OWNER: me, TAG_HEARTBEAT: f"{time.time():.3f}"},
                            role=role, run_name=run_name, reuse=reuse, cell_id=cid)
    try:
        if SETTLE_S > 0:  # a loaded store slows every process alike: wait at least 3x this process's check-to-claim
            time.sleep(max(SETTLE_S, 3 * (time.monotonic() - t_check)))
        now = time.time()
        live = [r for r in _cell_runs(exp_id, cid, role)
                if r.info.status == "RUNNING" and (r.data.tags.get(TAG_OWNER) == me or holder(r, now))]
    except KeyboardInterrupt:  # Ctrl-C while settling: the run just claimed must not stay RUNNING
        end_run(run_id, "KILLED")
        raise
    winner = min(live, key=lambda r: (r.info.start_time or 0, r.info.run_id)) if live else None
    if winner is None or winner.data.tags.get(TAG_OWNER) != me:
        if reuse is None:
            retrying(lambda: client().delete_run(run_id), resource=f"run {run_id}")
        return Claim("busy", winner.info.run_id if winner else run_id,
                     holder=winner.data.tags.get(TAG_OWNER, "?") if winner else "another process")
    _heartbeat(run_id)
    return Claim("run", run_id, reuse)


def _heartbeat(run_id: str) -> None:
    """Refresh ``pnc.heartbeat`` on ``run_id`` every ``PNC_LEASE_S / 10`` seconds until :func:`end_run`."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(max(LEASE_S / 10, 0.05)):
            try:
                retrying(lambda: client().set_tag(run_id, TAG_HEARTBEAT, f"{time.time():.3f}"))
            except Exception:  # noqa: BLE001 - a missed beat only shortens the lease
                pass

    thread = threading.Thread(target=beat, name=f"pnc-heartbeat-{run_id[:8]}", daemon=True)
    _BEATS[run_id] = (stop, thread)
    thread.start()


def _stop_heartbeat(run_id: str) -> None:
    """Stop ``run_id``'s heartbeat and wait for a beat in flight, so nothing is written after the run ends."""
    entry = _BEATS.pop(run_id, None)
    if entry is not None:
        stop, thread = entry
        stop.set()
        if thread is not threading.current_thread():
            thread.join(timeout=30)


def get_run(run_id: str) -> Any:
    """A run, read with the store's retries."""
    return retrying(lambda: client().get_run(run_id), resource=f"run {run_id}")


def delete_tag(run_id: str, key: str) -> None:
    retrying(lambda: client().delete_tag(run_id, key), resource=f"run {run_id}")


def busy_message(claim: Claim) -> str:
    return f"being run by another process ({claim.holder}, run {claim.run_id}); left to it"


def _log_batch(run_id: str, what: str, items: list, size: int) -> None:
    """MLflow entities (``what``: "tags", "params" or "metrics") in ``log_batch`` calls of ``size`` at most."""
    c = client()
    for i in range(0, len(items), size):
        retrying(lambda i=i: c.log_batch(run_id, **{what: items[i:i + size]}), resource=f"run {run_id}")


def log_tags(run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    _log_batch(run_id, "tags", [RunTag(k, str(v)) for k, v in tags.items()], 90)


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log the params ``run_id`` does not hold yet. MLflow params are immutable; a reused run (the study's
    parent, a resumed cell) keeps a key's first value: the cell id pins every field that changes a cell's
    results, and the parent's ``pnc.spec_digest`` tag names the latest spec."""
    from mlflow.entities import Param

    def missing() -> None:
        have = get_run(run_id).data.params
        _log_batch(run_id, "params", [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have], 90)

    # processes starting cells of one study at once log the parent's params at once: the loser's insert
    # of a key the winner logged meanwhile fails; read again and log what is still missing
    again_on_duplicate(missing)


def log_metrics(run_id: str, values: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    _log_batch(run_id, "metrics", [Metric(k, float(v), ts, step) for k, v in values.items() if v is not None], _MAX_BATCH)


def log_layer_metrics(run_id: str, results: dict[str, Iterable[float]]) -> None:
    """Per-layer curves: ``key`` -> values per layer, logged with step = layer index (None and NaN left out)."""
    import math

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    _log_batch(run_id, "metrics", [Metric(key, float(v), ts, layer) for key, values in results.items()
                                   for layer, v in enumerate(values)
                                   if v is not None and not (isinstance(v, float) and math.isnan(v))], _MAX_BATCH)


def log_inputs(run_id: str, inputs: Iterable[Any]) -> None:
    """One MLflow dataset input per split read: digest, source (path + DVC stage), context."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    c = client()
    items = []
    for inp in inputs:
        source = json.dumps(inp.source() if hasattr(inp, "source") else {"uri": inp.path, "dvc_stage": inp.stage}, sort_keys=True)
        ds = Dataset(name=inp.name, digest=inp.digest[:36], source_type="local", source=source)
        items.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", inp.context)]))
    if items:
        # Two processes logging the same dataset (experiment, name, digest) at once race inside MLflow's
        # insert; the loser succeeds on retry, when the dataset row exists and is only linked.
        again_on_duplicate(lambda: retrying(lambda: c.log_inputs(run_id, datasets=items), resource=f"run {run_id}"))


def duplicate_key(exc: BaseException) -> bool:
    """Whether a store error is a unique-key violation: two processes inserted the same row at once
    (SQLite: 'UNIQUE constraint failed'; PostgreSQL: 'duplicate key value violates unique constraint')."""
    return any(t in str(exc) for t in ("UNIQUE constraint", "IntegrityError", "duplicate key", "UniqueViolation"))


def again_on_duplicate(fn, attempts: int = 6):
    """``fn()``, tried again (after a short wait, ``attempts`` times in all) while it fails with a unique-key
    violation (:func:`duplicate_key`): the loser of two concurrent inserts finds the row on its next try."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - only duplicate keys are tried again
            if not duplicate_key(e) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def log_json_artifact(run_id: str, name: str, obj: Any) -> None:
    """Write ``obj`` as JSON to a temporary folder, then upload it under ``name`` (never half-written)."""
    c = client()
    with tempfile.TemporaryDirectory(prefix="pnc-artifact-") as d:
        path = Path(d) / name
        path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        retrying(lambda: c.log_artifact(run_id, str(path)), resource=f"run {run_id}")


def log_matrix_artifacts(run_id: str, matrices: dict[str, Any], modules: list[str]) -> list[str]:
    """The matrix metrics of a run (``{"cdnv_matrix/<split>": [K x K array per layer]}``, the second half of
    :meth:`pnc.metrics.registry.Registry.split`) as one compressed ``<metric>.npz`` artifact each (layout:
    :mod:`pnc.metrics.matrices`); returns the artifact names."""
    from .metrics.matrices import matrix_arrays, write_npz

    c = client()
    names = []
    for name, arrays in matrix_arrays(matrices, modules).items():
        with tempfile.TemporaryDirectory(prefix="pnc-artifact-") as d:
            path = write_npz(Path(d) / name, arrays)
            retrying(lambda path=path: c.log_artifact(run_id, str(path)))
        names.append(name)
    return names


def log_figure(run_id: str, figure: Any, name: str) -> None:
    """A matplotlib figure as the image artifact ``name`` of ``run_id`` (shown on the run page)."""
    retrying(lambda: client().log_figure(run_id, figure, name), resource=f"run {run_id}")


def log_folder(run_id: str, folder: Path, artifact_path: str) -> None:
    """Every file of ``folder`` under ``artifact_path`` of ``run_id``."""
    retrying(lambda: client().log_artifacts(run_id, str(folder), artifact_path), resource=f"run {run_id}")


def find_study_parent(experiment: str, study: str) -> str | None:
    """The study's parent run (the canonical one, see :func:`study_parent`), or None."""
    exp = retrying(lambda: client().get_experiment_by_name(experiment), resource=f"experiment {experiment!r}")
    runs = _study_parents(exp.experiment_id, study) if exp is not None else []
    return runs[0].info.run_id if runs else None


def end_run(run_id: str, status: str = "FINISHED") -> None:
    _stop_heartbeat(run_id)
    c = client()
    retrying(lambda: c.set_terminated(run_id, status=status), resource=f"run {run_id}")


def layer_history(run_id: str, key: str) -> list[float]:
    """A per-layer curve back from MLflow, ordered by layer (step)."""
    c = client()
    hist = retrying(lambda: c.get_metric_history(run_id, key))
    by_step = {m.step: m.value for m in sorted(hist, key=lambda m: m.timestamp)}  # a step logged twice: the last value
    return [by_step[s] for s in sorted(by_step)]


# ----------------------------------------------------------------------------- models as inputs
def registered_model_id(mv: Any) -> str | None:
    """The logged model (``m-...``) behind a model version: ``mv.model_id`` where the store fills it in,
    else from its source URI ``models:/m-...`` (MLflow 3 leaves model_id empty on versions it reads back)."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = getattr(mv, "source", "") or ""
    if source.startswith("models:/m-"):
        return source[len("models:/"):].split("/")[0]
    return None


def log_model_input(run_id: str, mv: Any) -> None:
    """Record the registered version ``mv`` as the input model of ``run_id`` (and name it in tags)."""
    from mlflow.entities import LoggedModelInput

    model_id = registered_model_id(mv)
    if model_id:
        retrying(lambda: client().log_inputs(run_id, models=[LoggedModelInput(model_id)]), resource=f"run {run_id}")
    log_tags(run_id, {"pnc.registered_model": mv.name, "pnc.registered_version": mv.version})
