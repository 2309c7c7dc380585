"""Test-wide settings: one intra-op thread per test process (pytest-xdist runs one process per core),
no MLflow telemetry (no network here), and a private MLflow store per test session."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")
# Claiming a cell waits this long for concurrent claims to land (pnc's default is 2 s). Tests that race
# processes on one cell set their own value; everywhere else one process claims, so keep the suite quick.
os.environ.setdefault("PNC_CLAIM_SETTLE_S", "0.3")
