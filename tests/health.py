"""Waiting for a test-started MLflow server (`pnc ui` or `mlflow server`) to answer on /health."""
from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, what: str, timeout: float = 180) -> None:
    """Return once ``url``/health answers 200; fail the test (with the log's tail) if ``proc`` exits or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{what} did not answer /health within {timeout:.0f}s:\n{log.read_text()[-3000:]}")
