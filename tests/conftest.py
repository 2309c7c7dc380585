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

# Hypothesis: the "ci" profile (the default) is derandomized, without an example database: every run of the suite
# tries the same examples, so a failure is reproducible and a pass means the same thing each time. The "long"
# profile (PNC_HYPOTHESIS_PROFILE=long) searches at random, with more examples where a test takes them from the
# profile (tests/reliability/test_spec_fuzz.py), keeping found failures in .hypothesis/ to replay them.
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("long", derandomize=False, max_examples=2000, print_blob=True)
settings.load_profile(os.environ.get("PNC_HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items) -> None:
    """Modules with a test marked ``slow`` run first, each module's tests kept together and in order (so a module's
    fixtures are set up once per worker). With pytest-xdist the many quick tests then fill in behind the long ones,
    instead of a long end-to-end test running alone at the end of the suite."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    position = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (item.module.__name__ not in slow_modules, position[id(item)]))


# ----------------------------------------------------------------------------- fixtures of the report tests
@pytest.fixture
def store(tmp_path: Path, monkeypatch) -> Path:
    """A private SQLite MLflow store in ``tmp_path``, which is also the working directory (tests/test_claims.py
    and tests/test_modelstore.py have their own ``store``)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


@pytest.fixture
def charts(monkeypatch) -> list:
    """Skip writing HTML/PNG; keep each chart's Vega-Lite dict."""
    import pnc.figures as figures

    saved: list = []
    monkeypatch.setattr(figures, "save", lambda chart, folder, stem: saved.append((stem, chart.to_dict())) or [])
    return saved
