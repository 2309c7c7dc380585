"""pnc lineage: the chain from a run down to raw data, and drift detection after a split changes on disk."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def pnc(args, cwd: Path, timeout: int = 600):
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{cwd / 'mlflow.db'}")
    return subprocess.run([sys.executable, "-m", "pnc.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_ids(cwd: Path, experiment: str, role: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    exp = c.get_experiment_by_name(experiment)
    return [r.info.run_id for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("pnc.role") == role]


@pytest.mark.slow
def test_lineage_of_noise_and_transfer_runs(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    r = pnc(["run", "specs/digits_noise.yaml", "--set", "train.epochs=1", "--set", "models=[resnet8]",
             "--set", "noise.label=[{kind: symmetric, rates: [0.2]}]", "--set", "noise.input=[]"], tmp_path)
    assert r.returncode == 0, r.stderr
    (run_id,) = run_ids(tmp_path, "digits_noise", "cell")
    ok = pnc(["lineage", run_id], tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    out = ok.stdout
    assert "data/derived/digits_noise/symmetric-0.2" in out and "derived: symmetric level 0.2 seed 0" in out
    assert "from:" in out and "data/embedded/digits/train" in out, "the chain goes down to the embedded raw split"
    assert "[changed]" not in out, "the overrides are part of the recorded spec"
    assert "with overrides: --set train.epochs=1 --set models=[resnet8]" in out, out
    info = json.loads(pnc(["lineage", run_id, "--json"], tmp_path).stdout)
    assert info["consistent"] and info["inputs"][0]["check"]["base"]["status"] == "ok"

    labels = tmp_path / "data/derived/digits_noise/symmetric-0.2/labels.npy"
    a = np.load(labels)
    a[0] = (a[0] + 1) % 10
    np.save(labels, a)
    drift = pnc(["lineage", run_id], tmp_path)
    assert drift.returncode == 1
    assert "DRIFT" in drift.stdout and "data/derived/digits_noise/symmetric-0.2 changed since the run" in drift.stdout
    shutil.rmtree(tmp_path / "data/embedded/digits/test")
    missing = pnc(["lineage", run_id, "--json"], tmp_path)
    assert missing.returncode == 1 and any("does not exist" in p for p in json.loads(missing.stdout)["problems"])
    assert any("`pnc embed digits`" in p for p in json.loads(missing.stdout)["problems"]), "the quick fix, not the whole pipeline"
    spec = tmp_path / "specs/digits_noise.yaml"
    spec.write_text(spec.read_text().replace("batch_size: 128", "batch_size: 64"))
    changed = pnc(["lineage", run_id], tmp_path)
    assert "[changed]" in changed.stdout and "the spec file changed since the run" in changed.stdout, changed.stdout

    t = pnc(["run", "specs/digits_transfer.yaml", "--set", "train.epochs=1", "--set", "models=[resnet14]", "--set", "transfer.sources=[handwritten]",
             "--set", "transfer.targets=[typeset]", "--metrics", "metrics/t.json"], tmp_path)
    assert t.returncode == 0, t.stderr
    (trun,) = run_ids(tmp_path, "digits_transfer", "transfer")
    from mlflow.tracking import MlflowClient

    mc = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    finals = mc.get_run(trun).data.metrics
    assert json.loads((tmp_path / "metrics/t.json").read_text()) == {  # DVC's metrics file: the target run's probe
        "final/probe_acc_target_test@model=resnet14,source=handwritten,target=typeset": finals["final/probe_acc_target_test"]}
    tl = pnc(["lineage", trun], tmp_path)
    assert tl.returncode == 0, tl.stdout + tl.stderr
    assert "models:/digits_transfer-resnet14/1" in tl.stdout and "data/embedded/digits_domains/typeset/train" in tl.stdout
    assert "probe: digits_domains/typeset/train" in tl.stdout, tl.stdout

    # the registered model carries its signature (images in, logits out) and the exact versions it needs
    from importlib.metadata import version

    from mlflow.models import Model

    from pnc.spec import load_spec

    mv = mc.get_model_version("digits_transfer-resnet14", "1")
    loc = Path(mc.get_logged_model(mv.source.removeprefix("models:/").split("/")[0]).artifact_location.removeprefix("file://"))
    model = Model.load(str(loc / "MLmodel"))
    channels = load_spec(tmp_path / "specs/digits_transfer.yaml").dataset.info.channels
    assert model.signature.inputs.inputs[0].shape == (-1, channels, 16, 16)
    assert model.signature.outputs.inputs[0].shape == (-1, 10)
    assert model.load_input_example(str(loc)).shape == (1, channels, 16, 16), "an input example (the MLflow UI shows it)"
    reqs = (loc / "requirements.txt").read_text().split()
    assert {f"{d}=={version(d)}" for d in ("torch", "torchvision", "timm")} <= set(reqs), reqs


# ----------------------------------------------------------------------------- raw datasets (in-process, no training)
# A run is simulated the way the runners log one: the cell's params (``runner.cell_params``) and the inputs that
# ``load_cell_data`` returns, through ``tracking.log_inputs``; then ``pnc lineage`` checks it against the disk.

def _dvc(*args: str, cwd: Path) -> None:
    exe = Path(sys.executable).with_name("dvc")
    if not exe.exists():
        pytest.skip("dvc is not installed in this environment")
    r = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh project folder as the working directory, with its own MLflow store and the default data root."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("PNC_DATA_ROOT", raising=False)
    monkeypatch.delenv("PNC_HASH_CACHE", raising=False)
    return tmp_path


def _spec(project: Path, name: str, overrides: list[str]):
    from pnc.spec import load_spec

    (project / "specs").mkdir(exist_ok=True)
    shutil.copy(ROOT / "specs" / name, project / "specs" / name)
    return load_spec(project / "specs" / name, overrides)


def _log_run(spec, cell, inputs, extra_params: dict | None = None) -> str:
    from pnc import tracking
    from pnc.engine import cell_params

    c = tracking.client()
    run_id = c.create_run(tracking.experiment_id(spec.experiment)).info.run_id
    tracking.log_params(run_id, {**cell_params(spec, cell), **(extra_params or {})})
    tracking.log_inputs(run_id, inputs)
    tracking.end_run(run_id)
    return run_id


def _lineage(run_id: str, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    from pnc.lineage import lineage

    capsys.readouterr()
    code = lineage(run_id)
    return code, capsys.readouterr().out


def _flip_cifar_pixel(batch: Path) -> None:
    """Change one pixel byte inside the image array of a CIFAR pickle (the file stays loadable, same size)."""
    import pickle

    with batch.open("rb") as f:
        data = pickle.load(f, encoding="latin1")["data"]
    raw = bytearray(batch.read_bytes())
    at = raw.find(data.tobytes()[:64])
    assert at > 0
    raw[at + 100] = (raw[at + 100] + 1) % 256
    batch.write_bytes(bytes(raw))


def test_lineage_of_a_raw_cifar10_run(project: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from fakedata import write_cifar10
    from pnc.cells import expand
    from pnc.data.registry import load_cell_data

    write_cifar10(project / "data/raw/cifar10")
    spec = _spec(project, "cifar10_depth.yaml", ["models=[resnet8]"])
    (cell,) = expand(spec)
    data = load_cell_data(spec, cell)
    assert {i.context for i in data.inputs} == {"training", "evaluation"}
    run_id = _log_run(spec, cell, data.inputs)
    code, out = _lineage(run_id, capsys)
    assert code == 0, out
    assert "data/raw/cifar10/cifar-10-batches-py" in out and "MISSING" not in out and "[ok]" in out

    _flip_cifar_pixel(project / "data/raw/cifar10/cifar-10-batches-py/data_batch_1")
    code, out = _lineage(run_id, capsys)
    assert code == 1, out
    assert "DRIFT" in out and "raw data changed" in out and "MISSING" not in out

    # the data root moved (PNC_DATA_ROOT): the same data elsewhere is found and consistent
    shutil.move(str(project / "data/raw"), str(project / "shared"))
    monkeypatch.setenv("PNC_DATA_ROOT", str(project / "shared"))
    data = load_cell_data(spec, cell)
    run2 = _log_run(spec, cell, data.inputs)
    code, out = _lineage(run2, capsys)
    assert code == 0, out
    shutil.rmtree(project / "shared/cifar10")
    code, out = _lineage(run2, capsys)
    assert code == 1 and "MISSING" in out and "cifar-10-batches-py" in out, out


def test_lineage_of_a_derived_split_goes_down_to_raw_cifar10(project: Path, capsys: pytest.CaptureFixture) -> None:
    from fakedata import write_cifar10
    from pnc.cells import expand
    from pnc.data.registry import load_cell_data
    from pnc.lineage import trace

    write_cifar10(project / "data/raw/cifar10")
    spec = _spec(project, "cifar10_random_labels.yaml", ["models=[resnet8]", "noise.label=[{kind: symmetric, rates: [0.2]}]"])
    (cell,) = expand(spec)
    data = load_cell_data(spec, cell)
    run_id = _log_run(spec, cell, data.inputs)
    code, out = _lineage(run_id, capsys)
    assert code == 0, out
    assert "data/derived/cifar10_random_labels/symmetric-0.2" in out and "from:" in out
    derived = trace(run_id)["inputs"][0]
    assert derived["context"] == "training" and derived["check"]["status"] == "ok"
    base = derived["check"]["base"]
    assert base["status"] == "ok" and base["path"] == "data/raw/cifar10/cifar-10-batches-py", base

    _flip_cifar_pixel(project / "data/raw/cifar10/cifar-10-batches-py/data_batch_2")
    info = trace(run_id)
    assert not info["consistent"]
    assert info["inputs"][0]["check"]["status"] == "ok" and info["inputs"][0]["check"]["base"]["status"] == "drifted"


def test_lineage_of_an_office_home_transfer_target_run(project: Path, capsys: pytest.CaptureFixture) -> None:
    """A target run re-hashes the target domain with the spec's train_fraction; a changed JPEG byte is drift;
    the DVC hash of the raw folder is recorded and printed; the target's train split is the probe input."""
    from fakedata import write_office_home
    from pnc.cells import expand
    from pnc.data.registry import load_cell_data
    from pnc.lineage import trace

    write_office_home(project / "data/raw/office_home", per_class=4, domains=("Art", "Clipart"))
    _dvc("init", "--no-scm", cwd=project)
    _dvc("add", "data/raw/office_home", cwd=project)
    dvc_md5 = __import__("yaml").safe_load((project / "data/raw/office_home.dvc").read_text())["outs"][0]["md5"]
    spec = _spec(project, "office_home.yaml", ["models=[resnet8]", "transfer.sources=[Art]", "transfer.targets=[Clipart]",
                                               "transfer.train_fraction=0.5"])
    (cell,) = expand(spec)
    tdat = load_cell_data(spec, cell, domain="Clipart")
    assert len(tdat.train) == 65 * 2, "train_fraction 0.5 of 4 images per class"
    inputs = tdat.probe_inputs()
    assert [(i.name, i.context) for i in inputs] == [("office_home/Clipart/train", "probe"), ("office_home/Clipart/test", "evaluation")]
    assert [i.context for i in tdat.inputs] == ["training", "evaluation"], "the source-training view is unchanged"
    assert inputs[0].source()["dvc_md5"] == dvc_md5 and inputs[0].source()["dvc_file"] == "data/raw/office_home.dvc"
    run_id = _log_run(spec, cell, inputs, {"transfer.target": "Clipart", "model_uri": "models:/x/1"})
    code, out = _lineage(run_id, capsys)
    assert code == 0, out
    assert "probe: office_home/Clipart/train" in out and "Clipart" in out
    assert f"data/raw/office_home.dvc md5 {dvc_md5}" in out, out

    jpeg = Path(tdat.train.paths[3])
    raw = bytearray(jpeg.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    jpeg.write_bytes(bytes(raw))
    code, out = _lineage(run_id, capsys)
    assert code == 1 and "raw data changed" in out, out
    assert [i["check"]["status"] for i in trace(run_id)["inputs"]] == ["drifted", "ok"]


def test_image_split_digest_hashes_contents_with_a_cache(project: Path) -> None:
    from pnc.data.base import ImageSplit

    files = []
    for i in range(4):
        p = project / "imgs" / f"{i}.jpg"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(bytes([i]) * 100)
        os.utime(p, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000 + i))
        files.append(p)
    split = ImageSplit(name="train", classes=["a", "b"], labels=[0, 1, 0, 1], paths=files)
    d0 = split.digest()
    assert list((project / ".pnc/hash-cache").iterdir()), "the per-file hashes are cached under .pnc/hash-cache/"
    assert split.digest() == d0

    st = files[2].stat()
    files[2].write_bytes(b"\x07" * 100)  # same size
    changed = split.digest()
    assert changed != d0, "a changed byte changes the digest"
    # same (path, size, mtime_ns) as a cached entry: the cache answers without reading the file (as DVC's state db)
    files[2].write_bytes(bytes([2]) * 100)
    os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert split.digest() == d0
    files[2].write_bytes(b"\x07" * 100)
    os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert split.digest() == changed
    # the same contents under another data root: the same digest (paths are not part of the data)
    moved = project / "elsewhere"
    shutil.copytree(project / "imgs", moved)
    assert ImageSplit(name="train", classes=["a", "b"], labels=[0, 1, 0, 1], paths=[moved / p.name for p in files]).digest() == changed


def test_git_state_counts_untracked_files_as_dirty(project: Path) -> None:
    from pnc.tracking import git_state

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=project, check=True, capture_output=True)

    git("init", "-q")
    (project / ".gitignore").write_text("mlflow.db\n/big/\n")
    git("add", ".gitignore")
    git("commit", "-q", "-m", "init")
    (project / "big").mkdir()
    (project / "big/big.bin").write_bytes(b"x")
    assert git_state()["pnc.git_dirty"] == "false", "ignored files do not count"
    (project / "data/embedded/digits/train").mkdir(parents=True)
    (project / "data/embedded/digits/train/labels.npy").write_bytes(b"x")
    (project / "data/raw/cifar10").mkdir(parents=True)
    (project / "data/raw/cifar10/data_batch_1").write_bytes(b"x")
    (project / "reports/cifar10_depth").mkdir(parents=True)
    (project / "reports/cifar10_depth/index.html").write_text("<html/>")
    (project / "results").mkdir()
    (project / "results/cifar10_depth.json").write_text("{}")
    assert git_state()["pnc.git_dirty"] == "false", "pnc's own untracked outputs do not count"
    (project / "specs").mkdir()
    (project / "specs/new.yaml").write_text("kind: depth_sweep\n")
    assert git_state()["pnc.git_dirty"] == "true", "an untracked new spec is a change"
    (project / "specs/new.yaml").unlink()
    assert git_state()["pnc.git_dirty"] == "false"
    (project / ".gitignore").write_text("mlflow.db\n/big/\n*.tmp\n")
    assert git_state()["pnc.git_dirty"] == "true", "a modified tracked file is a change"


def test_lineage_reads_the_raw_split_from_the_logged_source(project: Path, capsys: pytest.CaptureFixture) -> None:
    """Inputs whose source records dataset, domain, split and train_fraction (``DataInput.source()``) need no
    run params; the md5 of the ``.dvc`` file at run time is shown when it differs from the one on disk."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from fakedata import write_office_home
    from pnc import tracking
    from pnc.cells import expand
    from pnc.data.registry import load_cell_data

    write_office_home(project / "data/raw/office_home", per_class=4, domains=("Product",))
    spec = _spec(project, "office_home.yaml", ["models=[resnet8]", "transfer.sources=[Product]", "transfer.targets=[Product]",
                                               "transfer.train_fraction=0.25"])
    (cell,) = expand(spec)
    inputs = load_cell_data(spec, cell, domain="Product").probe_inputs()
    assert inputs[0].source()["train_fraction"] == 0.25 and inputs[0].source()["domain"] == "Product"
    c = tracking.client()
    run_id = c.create_run(tracking.experiment_id(spec.experiment)).info.run_id
    src = [dict(i.source(), dvc_file="data/raw/office_home.dvc", dvc_md5="0123.dir") for i in inputs]
    c.log_inputs(run_id, datasets=[DatasetInput(Dataset(name=i.name, digest=i.digest[:36], source_type="local", source=json.dumps(s)),
                                                tags=[InputTag("mlflow.data.context", i.context)]) for i, s in zip(inputs, src)])
    (project / "data/raw/office_home.dvc").write_text("outs:\n- md5: 4567.dir\n  path: office_home\n")
    code, out = _lineage(run_id, capsys)
    assert code == 0, out
    assert "train_fraction 0.25" in out and "data/raw/office_home.dvc md5 4567.dir (at run time: 0123.dir)" in out, out
