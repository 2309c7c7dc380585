"""One process per cell: `tracking.claim_cell_run` on a real SQLite store.

A cell held by a live process (this host: its pid exists; another host: its heartbeat is fresh) is
left to it; a dead holder's run is continued; processes that claim the same cell at the same moment
end with exactly one winner and no duplicate run.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pnc import tracking

CELL = SimpleNamespace(id="c0ffee", name="claims@model=resnet8", study="claims")


@pytest.fixture()
def store(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(tracking, "SETTLE_S", 0.0)  # one process here: nothing to settle
    exp = tracking.experiment_id("claims")
    parent = tracking.study_parent(exp, "claims", {})
    yield exp, parent
    for run_id in list(tracking._BEATS):
        tracking._stop_heartbeat(run_id)


def _held_run(exp: str, parent: str, owner: str, beat: float, status: str = "RUNNING") -> str:
    run = tracking.start_cell_run(exp, parent, CELL, {tracking.TAG_OWNER: owner, tracking.TAG_HEARTBEAT: f"{beat:.3f}",
                                                      tracking.TAG_DATA: "d"})
    if status != "RUNNING":
        tracking.end_run(run, status)
    return run


def _active(exp: str) -> list:
    return tracking._cell_runs(exp, CELL.id, "cell")


def test_holder_rules(store) -> None:
    exp, parent = store
    now = time.time()
    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cases = {
            "other host, fresh heartbeat": ("elsewhere.example:4242:abcd1234", now - 5, "RUNNING", True),
            "other host, heartbeat older than the lease": ("elsewhere.example:4242:abcd1234", now - tracking.LEASE_S - 1, "RUNNING", False),
            "this host, live pid": (f"{host}:{sleeper.pid}:abcd1234", now - 5, "RUNNING", True),
            "this host, dead pid (SIGKILL)": (f"{host}:{_dead_pid()}:abcd1234", now - 5, "RUNNING", False),
            "closed cleanly": ("elsewhere.example:4242:abcd1234", now - 5, "KILLED", False),
            "finished": ("elsewhere.example:4242:abcd1234", now - 5, "FINISHED", False),
            "this very process": (tracking.owner_id(), now - 5, "RUNNING", False),
            "no owner (older pnc)": ("", now - 5, "RUNNING", False),
        }
        for what, (owner, beat, status, held) in cases.items():
            run = tracking.client().get_run(_held_run(exp, parent, owner, beat, status))
            assert (tracking.holder(run) == owner) is held, what
    finally:
        sleeper.kill()
        sleeper.wait()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_live_holder_elsewhere_means_busy_and_nothing_is_created(store) -> None:
    exp, parent = store
    run = _held_run(exp, parent, "node7.cluster:4242:abcd1234", time.time())
    claim = tracking.claim_cell_run(exp, parent, CELL, {tracking.TAG_DATA: "d"})
    assert (claim.decision, claim.run_id, claim.holder) == ("busy", run, "node7.cluster:4242:abcd1234")
    assert "node7.cluster:4242" in tracking.busy_message(claim) and run in tracking.busy_message(claim)
    assert [r.info.run_id for r in _active(exp)] == [run]
    assert tracking.client().get_run(run).info.status == "RUNNING"


def test_dead_holders_run_is_continued_with_a_heartbeat(store, monkeypatch) -> None:
    exp, parent = store
    monkeypatch.setattr(tracking, "LEASE_S", 0.5)  # heartbeat every 0.05 s
    run = _held_run(exp, parent, "node7.cluster:4242:abcd1234", time.time() - 3600)
    claim = tracking.claim_cell_run(exp, parent, CELL, {tracking.TAG_DATA: "d"})
    assert (claim.decision, claim.run_id) == ("run", run) and claim.reused.info.run_id == run
    tags = tracking.client().get_run(run).data.tags
    assert tags[tracking.TAG_OWNER] == tracking.owner_id()
    first = float(tags[tracking.TAG_HEARTBEAT])
    time.sleep(0.4)
    assert float(tracking.client().get_run(run).data.tags[tracking.TAG_HEARTBEAT]) > first, "the heartbeat refreshes"
    tracking.end_run(run, "FINISHED")
    assert run not in tracking._BEATS
    last = float(tracking.client().get_run(run).data.tags[tracking.TAG_HEARTBEAT])
    time.sleep(0.3)
    assert float(tracking.client().get_run(run).data.tags[tracking.TAG_HEARTBEAT]) == last, "stopped with the run"


def test_finished_is_skipped_force_and_new_data_start_new_runs(store) -> None:
    exp, parent = store
    done = _held_run(exp, parent, "node7.cluster:4242:abcd1234", time.time(), status="FINISHED")
    assert tracking.claim_cell_run(exp, parent, CELL, {}).decision == "skip"
    assert tracking.claim_cell_run(exp, parent, CELL, {}).run_id == done
    forced = tracking.claim_cell_run(exp, parent, CELL, {tracking.TAG_DATA: "d"}, force=True)
    assert forced.decision == "run" and forced.run_id != done and forced.reused is None
    tracking.end_run(forced.run_id, "KILLED")
    new_data = tracking.claim_cell_run(exp, parent, CELL, {tracking.TAG_DATA: "e"},
                                       usable=lambda r: r.data.tags.get(tracking.TAG_DATA) == "e")
    assert new_data.decision == "run" and new_data.run_id not in (done, forced.run_id) and new_data.reused is None
    tracking.end_run(new_data.run_id)


CLAIMER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from types import SimpleNamespace
    from pnc import tracking

    me, n = sys.argv[1], int(sys.argv[2])
    exp = tracking.experiment_id("claims")
    parent = tracking.study_parent(exp, "claims", {})
    Path(f"ready-{me}").touch()  # then all claim at once
    give_up = time.time() + 120
    while len(list(Path(".").glob("ready-*"))) < n and time.time() < give_up:
        time.sleep(0.002)
    cell = SimpleNamespace(id="c0ffee", name="claims@model=resnet8", study="claims")
    claim = tracking.claim_cell_run(exp, parent, cell, {tracking.TAG_DATA: "d"})
    print(claim.decision, claim.run_id, flush=True)
    if claim.decision == "run":
        time.sleep(1.0)  # "trains"
        tracking.end_run(claim.run_id)
""")


@pytest.mark.slow
@pytest.mark.parametrize("start", ["fresh", "killed run to continue"])
def test_processes_claiming_one_cell_at_once_elect_one(tmp_path: Path, start: str) -> None:
    """Four processes claim one cell in the same few milliseconds: one runs it, three are told it is busy;
    no duplicate run is left (a loser deletes the run it created), the winner's run is FINISHED."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PNC_CLAIM_SETTLE_S="1.0", PYTHONPATH=str(Path(__file__).parents[1]))
    c = MlflowClient(uri)
    old = None
    if start != "fresh":
        setup = ("from types import SimpleNamespace\nfrom pnc import tracking\n"
                 "exp = tracking.experiment_id('claims'); parent = tracking.study_parent(exp, 'claims', {})\n"
                 "cell = SimpleNamespace(id='c0ffee', name='claims@model=resnet8', study='claims')\n"
                 "run = tracking.start_cell_run(exp, parent, cell, {tracking.TAG_DATA: 'd'}); tracking.end_run(run, 'KILLED')\n"
                 "print(run)")
        old = subprocess.run([sys.executable, "-c", setup], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120, check=True).stdout.split()[-1]
    (tmp_path / "claimer.py").write_text(CLAIMER)
    n = 4
    procs = [subprocess.Popen([sys.executable, "claimer.py", str(i), str(n)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    decisions = [out.split() for out, _ in outs]
    winners = [d for d in decisions if d[0] == "run"]
    assert len(winners) == 1, decisions
    assert sorted(d[0] for d in decisions) == ["busy", "busy", "busy", "run"], decisions
    assert {d[1] for d in decisions} == {winners[0][1]}, "every loser names the winner's run"
    exp = c.get_experiment_by_name("claims").experiment_id
    cells = [r for r in c.search_runs([exp], "tags.`pnc.role` = 'cell'", run_view_type=ViewType.ACTIVE_ONLY)]
    assert [r.info.run_id for r in cells] == [winners[0][1]], "one run of the cell, the winner's"
    assert cells[0].info.status == "FINISHED"
    if old is not None:
        assert winners[0][1] == old, "the killed run is continued, not duplicated"


def test_ctrl_c_while_settling_leaves_no_run_running(store, monkeypatch) -> None:
    """An interrupt during the settle wait of a claim or of a new study's parent ends what was created KILLED."""
    exp, parent = store

    def interrupted(_seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(tracking, "SETTLE_S", 1.0)
    monkeypatch.setattr(tracking.time, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tracking.claim_cell_run(exp, parent, CELL, {tracking.TAG_DATA: "d"})
    assert [r.info.status for r in _active(exp)] == ["KILLED"]
    # a parent settles on a server's store (on a local SQLite store the file lock serialises its creation instead)
    monkeypatch.setattr(tracking, "_sqlite_path", lambda uri: None)
    with pytest.raises(KeyboardInterrupt):
        tracking.study_parent(exp, "another-study", {})
    assert [r.info.status for r in tracking._study_parents(exp, "another-study")] == ["KILLED"]


def test_params_logged_at_once_by_two_processes_end_with_each_key_once(store, monkeypatch) -> None:
    """Processes starting cells of one study at once log the parent's params at once. The one whose insert loses
    (a key the other logged between its read and its write: 'UNIQUE constraint failed', as the SQLite-backed MLflow
    server of tests/test_team_mode.py answered) reads the run again and logs only what is still missing."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    _exp, parent = store
    c = tracking.client()
    real = c.log_batch
    calls: list[list[str]] = []

    def racing(run_id, **kw):
        calls.append(sorted(p.key for p in kw.get("params", [])))
        if len(calls) == 1:  # the other process logs "a" first
            real(run_id, params=[Param("a", "1")])
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: params.key, params.run_uuid")
        return real(run_id, **kw)

    monkeypatch.setattr(c, "log_batch", racing)
    tracking.log_params(parent, {"a": 1, "b": 2})
    assert calls == [["a", "b"], ["b"]]
    assert {k: v for k, v in tracking.get_run(parent).data.params.items() if k in ("a", "b")} == {"a": "1", "b": "2"}

    def refused(run_id, **kw):  # any other store error is not retried
        raise MlflowException("Changing param values is not allowed")

    monkeypatch.setattr(c, "log_batch", refused)
    with pytest.raises(MlflowException, match="Changing param values"):
        tracking.log_params(parent, {"c": 3})
