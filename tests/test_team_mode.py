"""Team mode on an `mlflow server` with a SQLite backend and proxied artifacts: the shared scenario of
tests/team.py (four cells at once from separate processes, a re-run adding nothing, registry versions and aliases,
report and lineage through the server). tests/test_team_postgres.py runs the same scenario on PostgreSQL behind
MLflow's basic-auth, with a racing claim and a SIGKILLed cell taken over on top (here left out to keep the suite's
time: tests/test_claims.py and tests/test_store_concurrency.py check those on SQLite).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from team import MlflowServer, team_scenario


@pytest.mark.slow
def test_team_mode_fan_out_on_mlflow_server(tmp_path: Path) -> None:
    server = MlflowServer(tmp_path)
    try:
        server.wait_healthy()
        team_scenario(tmp_path, server, race_and_kill=False)
    finally:
        server.stop()
