"""Networks stored in MLflow as safetensors weights + a recipe (pnc/modelstore.py): loading runs no stored code.
Round trips are bit-identical; a pickled model (one that would run code when unpickled) registered under a pnc
model name is refused by a measure study, and a transfer study does not reuse it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
MARKER = "pnc-unpickled-marker"


class Evil(nn.Module):
    """Unpickling this runs code: it writes a marker file (what a malicious registered model could do)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.flatten(1)[:, :4])

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def _run(name: str) -> str:
    from pnc import tracking

    return tracking.client().create_run(tracking.experiment_id(name), run_name=name).info.run_id


def test_catalog_model_round_trip_is_bit_identical_and_pyfunc_loads_it(store: Path) -> None:
    import mlflow.pyfunc

    from pnc import modelstore, tracking
    from pnc.models import build_model

    torch.manual_seed(0)
    net = build_model("resnet8", num_classes=4, in_chans=1, image_size=12).eval()
    run = _run("rt")
    mv = modelstore.register(net, run, "rt-resnet8", {"pnc.study": "rt"}, "digits")
    tracking.end_run(run, "FINISHED")
    assert mv.tags[modelstore.TAG_FORMAT] == modelstore.FORMAT
    for uri in ("models:/rt-resnet8/1", "models:/rt-resnet8@current", "models:/rt-resnet8@src-digits", f"runs:/{run}/model"):
        back = modelstore.load(uri)
        assert back.state_dict().keys() == net.state_dict().keys()
        assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items()), uri
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        want = net(x).numpy()
    got = mlflow.pyfunc.load_model("models:/rt-resnet8/1").predict(x.numpy())  # MLflow's own API, through pnc's loader
    assert (got == want).all()


def test_factory_model_round_trip_and_a_changed_source_is_refused(store: Path) -> None:
    from pnc import modelstore
    from pnc.errors import PncError
    from pnc.models import build_factory_model

    src = store / "net.py"
    src.write_text("from torch import nn\n\ndef build(num_classes, in_chans, width=5):\n"
                   "    return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * 16, width), nn.ReLU(), nn.Linear(width, num_classes))\n")
    net = build_factory_model("net.py:build", num_classes=3, in_chans=1, width=7)
    run = _run("fac")
    modelstore.register(net, run, "fac-net", {}, "x")
    back = modelstore.load("models:/fac-net/1")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())
    src.write_text(src.read_text() + "# edited\n")
    with pytest.raises(PncError, match="its source file here has digest"):
        modelstore.load("models:/fac-net/1")


def test_a_pickled_model_is_refused_without_running_its_code(store: Path) -> None:
    import mlflow
    import mlflow.pytorch

    from pnc import modelstore, tracking
    from pnc.errors import PncError

    run = _run("evil")
    with mlflow.start_run(run_id=run):
        info = mlflow.pytorch.log_model(Evil(), name="model", serialization_format="pickle")
    c = tracking.client()
    c.create_registered_model("digits_transfer-resnet8")
    c.create_model_version("digits_transfer-resnet8", info.model_uri, run_id=run, model_id=info.model_id)
    c.set_registered_model_alias("digits_transfer-resnet8", "src-handwritten", "1")
    (store / MARKER).unlink(missing_ok=True)  # MLflow may load the model once while logging it: the uploader's side
    with pytest.raises(PncError, match="refusing to load models:/digits_transfer-resnet8/1: it is a torch model saved by mlflow.pytorch"):
        modelstore.load("models:/digits_transfer-resnet8/1")
    assert not (store / MARKER).exists(), "nothing was unpickled"
    # the embedded measure study, pointed at that registered name: exit 1, the reason, no code run, no run RUNNING
    (store / "specs").mkdir()
    (store / "specs" / "m.yaml").write_text("kind: measure\nname: m\ndataset: {name: digits, image_size: 16}\nmodels:\n"
                                            "  - uri: models:/digits_transfer-resnet8@src-handwritten\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run([sys.executable, "-m", "pnc.cli", "embed", "digits"], cwd=store, env=env, check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "pnc.cli", "run", "specs/m.yaml", "--no-progress"], cwd=store, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "refusing to load" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (store / MARKER).exists()
    exp = c.get_experiment_by_name("m")
    assert all(x.info.status != "RUNNING" for x in c.search_runs([exp.experiment_id]))


def test_transfer_does_not_reuse_a_version_stored_another_way(store: Path) -> None:
    """find_registered only returns versions in pnc's format: a pickled version with matching tags is not reused."""
    from types import SimpleNamespace

    import mlflow
    import mlflow.pytorch

    from pnc import tracking
    from pnc.kinds.transfer import find_registered

    run = _run("old")
    with mlflow.start_run(run_id=run):
        info = mlflow.pytorch.log_model(nn.Linear(2, 2), name="model", serialization_format="pickle")
    c = tracking.client()
    c.create_registered_model("old-resnet8")
    cell = SimpleNamespace(id="abc", train_key="k1")
    c.create_model_version("old-resnet8", info.model_uri, run_id=run, model_id=info.model_id,
                           tags={tracking.TAG_DATA: "d1", "pnc.train_key": "k1", tracking.TAG_CELL: "abc"})
    assert find_registered("old-resnet8", cell, "d1") is None


def test_an_alias_set_at_once_by_two_processes_ends_on_one_version(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes registering versions of one model at once both set its ``current`` alias: the loser of
    MLflow's find-then-insert gets a duplicate key (PostgreSQL's words, from a failed run of
    tests/test_team_postgres.py) and, tried again, moves the alias; other errors are not retried."""
    from mlflow.exceptions import MlflowException

    from pnc import modelstore, tracking

    c = tracking.client()
    c.create_registered_model("m")
    v1 = c.create_model_version("m", "runs:/x/model").version
    v2 = c.create_model_version("m", "runs:/y/model").version
    real = c.set_registered_model_alias
    calls: list[str] = []

    def racing(name, alias, version):
        calls.append(str(version))
        if len(calls) == 1:  # the other process sets the alias first
            real(name, alias, v1)
            raise MlflowException('(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint '
                                  '"registered_model_alias_pk"')
        return real(name, alias, version)

    monkeypatch.setattr(c, "set_registered_model_alias", racing)
    modelstore.set_alias("m", "current", v2)
    assert calls == [str(v2), str(v2)] and str(c.get_model_version_by_alias("m", "current").version) == str(v2)

    def refused(name, alias, version):
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: registered model 'm' not found")

    monkeypatch.setattr(c, "set_registered_model_alias", refused)
    with pytest.raises(MlflowException, match="not found"):
        modelstore.set_alias("m", "current", v1)
