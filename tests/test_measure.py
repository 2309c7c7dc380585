"""`kind: measure`: networks pnc did not train (checkpoints, factory architectures, models logged in MLflow) on the
catalog's data or the researcher's own (image_folder, arrays). Each model source on tiny models and fakes of each
data layout; a factory model on an image folder end to end, its logged CDNV recomputed from the same model's hooked
features with the independent float64 reference; every bad input an exit 1 with FILE:LINE:COL, no traceback, no run
left RUNNING."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metrics_reference as ref

ROOT = Path(__file__).resolve().parents[1]
K = 3

FACTORY = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes, in_chans, width=8):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)
        self.pnc_blocks = ["b1", "b2"]

    def forward(self, x):
        return self.fc(self.b2(self.b1(x)).mean((2, 3)))


def build(num_classes, in_chans, width=8):
    torch.manual_seed(1)
    return Tiny(num_classes, in_chans, width)


def broken(num_classes):
    raise RuntimeError("my factory is broken")


def not_a_module():
    return 42
'''


def pnc(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{cwd / 'mlflow.db'}", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "pnc.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def write_image_folder(root: Path, per_class: int = 8) -> None:
    """Three classes of coloured squares at different positions, images of two sizes and modes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for k, name in enumerate(["circle", "square", "triangle"]):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                size = 20 if i % 2 else 24
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                img[4 + 4 * k: 10 + 4 * k, 4:14, k] = 255
                Image.fromarray(img).convert("L" if i % 3 == 0 else "RGB").save(d / f"{i}.png")


def write_arrays(root: Path, n: int = 24) -> None:
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        labels = np.arange(n) % K
        images = (rng.random((n, 12, 12, 1)) * 40 + labels[:, None, None, None] * 70).astype(np.uint8)
        np.save(root / split / "images.npy", images)
        np.save(root / split / "labels.npy", labels)
    (root / "classes.json").write_text(json.dumps(["a", "b", "c"]))


def write_spec(project: Path, name: str, dataset: str, models: str, extra: str = "") -> str:
    path = project / "specs" / f"{name}.yaml"
    path.write_text(f"kind: measure\nname: {name}\ndataset: {dataset}\nmodels:\n{models}\n"
                    "measure: {layers: blocks, batch_size: 16}\n" + extra)
    return f"specs/{name}.yaml"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("measure")
    (d / "specs").mkdir()
    (d / "nets.py").write_text(FACTORY)
    write_image_folder(d / "shapes")
    write_arrays(d / "arr")
    return d


def _client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def _cells(project: Path, study: str) -> list:
    c = _client(project)
    exp = c.get_experiment_by_name(study)
    return [] if exp is None else [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("pnc.role") == "cell"]


def _no_running(project: Path) -> None:
    c = _client(project)
    for exp in c.search_experiments():
        assert not [r.info.run_id for r in c.search_runs([exp.experiment_id]) if r.info.status == "RUNNING"]


# ----------------------------------------------------------------------------- the two data layouts
def test_image_folder_and_arrays_loaders(tmp_path: Path) -> None:
    from pnc.data.user import describe, load_arrays, load_image_folder

    write_image_folder(tmp_path / "f")
    s = load_image_folder(tmp_path / "f")
    assert s["train"].classes == ["circle", "square", "triangle"] and len(s["train"]) == 24 and len(s["test"]) == 12
    assert s["train"].labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert s["train"].image(0).shape[2] == 3  # greyscale files are read as RGB
    assert describe("image_folder", str(tmp_path / "f"), None) == (3, 3, 0)  # sizes vary: 0
    write_arrays(tmp_path / "a")
    a = load_arrays(tmp_path / "a")
    assert a["test"].classes == ["a", "b", "c"] and a["test"].images.shape == (24, 12, 12, 1)
    assert describe("arrays", str(tmp_path / "a"), None) == (3, 1, 12)
    assert load_arrays(tmp_path / "a")["train"].digest() == a["train"].digest()


@pytest.mark.parametrize("fault,message", [
    ("empty_class", "empty class folder"),
    ("unreadable", "not a readable image"),
    ("missing_split", "split 'test' has no folder"),
    ("class_mismatch", "class folders differ"),
])
def test_image_folder_faults_name_the_file(tmp_path: Path, fault: str, message: str) -> None:
    from pnc.data.user import load_image_folder
    from pnc.errors import DataError

    root = tmp_path / "f"
    write_image_folder(root)
    if fault == "empty_class":
        for p in (root / "train" / "square").iterdir():
            p.unlink()
    elif fault == "unreadable":
        (root / "train" / "circle" / "0.png").write_bytes(b"not a png")
    elif fault == "missing_split":
        shutil.rmtree(root / "test")
    else:
        (root / "test" / "circle").rename(root / "test" / "oval")
    with pytest.raises(DataError, match=message):
        load_image_folder(root)


def test_arrays_label_out_of_range_names_the_file(tmp_path: Path) -> None:
    from pnc.data.user import load_arrays
    from pnc.errors import DataError

    write_arrays(tmp_path / "a")
    labels = np.load(tmp_path / "a" / "test" / "labels.npy")
    labels[5] = 7
    np.save(tmp_path / "a" / "test" / "labels.npy", labels)
    with pytest.raises(DataError, match=r"test/labels.npy: label 7 at index 5 is out of range 0..2"):
        load_arrays(tmp_path / "a")


# ----------------------------------------------------------------------------- end to end, value-checked
@pytest.mark.slow
def test_factory_model_on_an_image_folder_logs_cdnv_equal_to_a_float64_recomputation(project: Path) -> None:
    spec = write_spec(project, "shapes_tiny", "{name: image_folder, root: shapes, image_size: 16}",
                      "  - {name: tiny, factory: nets.py:build, kwargs: {width: 6}}")
    plan = pnc(["plan", spec], project)
    assert plan.returncode == 0, plan.stderr
    assert "b1" in plan.stdout and "6 x 16 x 16" in plan.stdout  # taps and shapes
    assert "penultimate (= b2)" in plan.stdout and "2 taps" in plan.stdout  # b2's pooled output is the head's input
    r = pnc(["run", spec, "--no-progress"], project)
    assert r.returncode == 0, r.stderr
    (run,) = _cells(project, "shapes_tiny")
    c = _client(project)
    names = json.loads(Path(c.download_artifacts(run.info.run_id, "layers.json", str(project))).read_text())
    assert list(names.values()) == ["b1", "penultimate"]  # b2's pooled output is the head's input: one tap
    assert run.data.tags["pnc.merged_taps"] == "b2 -> penultimate"
    # the same network, the same images (resized by the same pipeline), hooked here, CDNV by the loop reference
    sys.path.insert(0, str(project))
    try:
        import nets
    finally:
        sys.path.remove(str(project))
    from pnc.data.torchdata import ImageDataset
    from pnc.data.user import load_image_folder

    net = nets.build(K, 3, width=6).eval()
    train = load_image_folder(project / "shapes")["train"]
    ds = ImageDataset(train, image_size=16, channels=3)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    feats = {}
    hooks = [net.b1.register_forward_hook(lambda m, a, o: feats.__setitem__("b1", o.mean((2, 3)))),
             net.b2.register_forward_hook(lambda m, a, o: feats.__setitem__("b2", o.mean((2, 3)))),
             net.fc.register_forward_hook(lambda m, a, o: feats.__setitem__("penultimate", a[0]))]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    logged = [m.value for m in sorted(c.get_metric_history(run.info.run_id, "cdnv/train"), key=lambda m: m.step)]
    assert torch.equal(feats["b2"], feats["penultimate"])
    expected = [ref.cdnv(feats[n].double().numpy(), train.labels, K) for n in ("b1", "penultimate")]
    np.testing.assert_allclose(logged, expected, rtol=1e-4)  # float32 features: the pass's own rounding
    assert "train/last_epoch_acc" not in run.data.metrics and run.data.tags["pnc.kind"] == "measure"
    again = pnc(["run", spec, "--no-progress"], project)  # same model bytes, data and settings: skipped
    assert again.returncode == 0 and "skipped" in again.stderr and len(_cells(project, "shapes_tiny")) == 1
    (project / "nets.py").write_text(FACTORY.replace("torch.manual_seed(1)", "torch.manual_seed(2)"))
    try:
        changed = pnc(["plan", spec, "--json"], project)
        assert json.loads(changed.stdout)["cells"][0]["id"] != run.data.tags["pnc.cell_id"], "the factory source is in the id"
    finally:
        (project / "nets.py").write_text(FACTORY)
    rep = pnc(["report", spec], project)
    assert rep.returncode == 0, rep.stderr
    assert (project / "reports" / "shapes_tiny" / "layers.png").exists()


@pytest.mark.slow
def test_checkpoint_and_logged_models_are_measured_and_lineage_reaches_the_training_run(project: Path) -> None:
    """A checkpoint file of a pnc ResNet (bare state dict, {"model": ...} wrapper, safetensors) and the same network
    logged to MLflow and registered: measured by version, by alias and by runs:/ URI, each run naming its input model."""
    from safetensors.torch import save_file

    from pnc import tracking
    from pnc.models import build_model
    from pnc.modelstore import register

    torch.manual_seed(0)
    net = build_model("resnet8", num_classes=K, in_chans=1, image_size=12)
    torch.save(net.state_dict(), project / "r8.pt")
    torch.save({"model": net.state_dict(), "epoch": 3}, project / "r8_wrapped.pth")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(project / "r8.safetensors"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    try:
        run = tracking.client().create_run(tracking.experiment_id("trainer"), run_name="trained elsewhere")
        mv = register(net, run.info.run_id, "r8-registered", {"pnc.study": "trainer"}, "arrays")
        tracking.end_run(run.info.run_id, "FINISHED")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    models = "\n".join(f"  - {m}" for m in ["{name: resnet8, weights: r8.pt}", "{uri: 'models:/r8-registered/1'}",
                                             "{uri: 'models:/r8-registered@current'}",
                                             f"{{uri: 'runs:/{run.info.run_id}/model', name: r8_by_run}}"])
    spec = write_spec(project, "arrays_models", "{name: arrays, root: arr}", models)
    r = pnc(["run", spec, "--no-progress"], project)
    assert r.returncode == 0, r.stderr
    cells = {x.data.tags["pnc.model"]: x for x in _cells(project, "arrays_models")}
    assert set(cells) == {"resnet8", "r8-registered-1", "r8-registered-current", "r8_by_run"}
    curves = {m: [v.value for v in sorted(_client(project).get_metric_history(x.info.run_id, "cdnv/train"),
                                            key=lambda v: v.step)] for m, x in cells.items()}
    for m in curves:  # one network four ways: the same curve
        np.testing.assert_allclose(curves[m], curves["resnet8"], rtol=1e-6)
    for m in ("r8-registered-1", "r8-registered-current"):
        tags = cells[m].data.tags
        assert tags["pnc.model_uri"] == "models:/r8-registered/1" and tags["pnc.model_run"] == run.info.run_id
        assert tags["pnc.registered_version"] == str(mv.version)
    lin = pnc(["lineage", cells["r8-registered-current"].info.run_id], project)
    assert lin.returncode == 0, lin.stdout + lin.stderr
    assert f"trained in run {run.info.run_id}" in lin.stdout
    for variant in ("r8_wrapped.pth", "r8.safetensors"):
        spec2 = write_spec(project, f"v_{variant.split('.')[1]}", "{name: arrays, root: arr}",
                           f"  - {{name: resnet8, weights: {variant}}}")
        r2 = pnc(["run", spec2, "--no-progress"], project)
        assert r2.returncode == 0, r2.stderr
        (x,) = _cells(project, f"v_{variant.split('.')[1]}")
        got = [v.value for v in sorted(_client(project).get_metric_history(x.info.run_id, "cdnv/train"), key=lambda v: v.step)]
        np.testing.assert_allclose(got, curves["resnet8"], rtol=1e-6)


# ----------------------------------------------------------------------------- bad input: exit 1, where, no run left
@pytest.mark.parametrize("models,where,message", [
    ("  - {name: tiny, factory: nets.py:nope}", ":5:", "defines no function 'nope'"),
    ("  - {name: tiny, factory: missing.py:build}", ":5:", "file 'missing.py' not found"),
    ("  - {name: resnet8, weights: nowhere.pt}", ":5:", "weights file 'nowhere.pt' does not exist"),
    ("  - {name: resnet8}", ":5:", "nothing to measure"),
    ("  - {uri: 'models:/x/1', weights: a.pt}", ":5:", "loaded as logged"),
])
def test_bad_model_entries_are_spec_errors_with_their_position(project: Path, models: str, where: str, message: str) -> None:
    spec = write_spec(project, "bad_entry", "{name: arrays, root: arr}", models)
    r = pnc(["validate", spec], project)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"specs/bad_entry.yaml{where}" in r.stderr and message in r.stderr, r.stderr


def test_user_dataset_errors_point_at_the_spec(project: Path) -> None:
    spec = write_spec(project, "bad_data", "{name: image_folder, root: nowhere, image_size: 16}",
                      "  - {name: tiny, factory: nets.py:build}")
    r = pnc(["validate", spec], project)
    assert r.returncode == 1 and "specs/bad_data.yaml:3:" in r.stderr and "nowhere: no such folder" in r.stderr, r.stderr
    spec = write_spec(project, "bad_size", "{name: image_folder, root: shapes}", "  - {name: tiny, factory: nets.py:build}")
    r = pnc(["validate", spec], project)
    assert r.returncode == 1 and "vary in size: set dataset.image_size" in r.stderr, r.stderr
    depth = project / "specs" / "depth_uri.yaml"
    depth.write_text("kind: depth_sweep\nname: depth_uri\ndataset: {name: digits}\nmodels:\n  - {uri: 'models:/x/1'}\n")
    r = pnc(["validate", "specs/depth_uri.yaml"], project)
    assert r.returncode == 1 and "depth_uri.yaml:5:" in r.stderr and "trains its networks" in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("models,message", [
    ("  - {name: tiny, factory: nets.py:broken}", "raised RuntimeError: my factory is broken"),
    ("  - {name: tiny, factory: nets.py:not_a_module}", "returned a int, not a torch.nn.Module"),
    ("  - {uri: 'models:/does-not-exist/3'}", "models:/does-not-exist/3 is not in"),
    ("  - {name: resnet8, weights: wrong_classes.pt}", "key 'fc.weight' has shape (5, 64) in the file but (3, 64)"),
    ("  - {name: resnet8, weights: missing_key.pt}", "key 'conv1.weight' is missing from the file"),
])
def test_bad_networks_exit_1_without_traceback_or_running_run(project: Path, models: str, message: str) -> None:
    from pnc.models import build_model

    torch.save(build_model("resnet8", num_classes=5, in_chans=1, image_size=12).state_dict(), project / "wrong_classes.pt")
    sd = build_model("resnet8", num_classes=K, in_chans=1, image_size=12).state_dict()
    del sd["conv1.weight"]
    torch.save(sd, project / "missing_key.pt")
    spec = write_spec(project, "bad_net", "{name: arrays, root: arr}", models)
    r = pnc(["run", spec, "--no-progress"], project)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr and message in r.stderr, r.stderr
    _no_running(project)
