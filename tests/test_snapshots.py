"""Collapse during training (``measure.epochs``, pnc/snapshots.py): the table's final epoch is the logged curves, a
snapshot is its epoch's network measured (float64 reference from that epoch's checkpoint), snapshots do not change
training, a run killed with SIGKILL and resumed ends with the same table, 2 processes give 1's table within the
2-process training tolerances, and bad ``measure.epochs`` are rejected with their position."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import metrics_reference as ref

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = [0, 1, 3]
SETS = ["--set", "models=[resnet8]", "--set", "dataset.image_size=8", "--set", "train.epochs=5",
        "--set", "train.batch_size=64", "--set", "measure.metrics=[cdnv, nc2]", "--set", f"measure.epochs={EPOCHS}"]


def _project(tmp: Path, name: str) -> Path:
    d = tmp / name
    d.mkdir()
    shutil.copytree(ROOT / "specs", d / "specs")
    return d


def _env(d: Path) -> dict:
    return dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{d / 'mlflow.db'}", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _pnc(d: Path, *args: str, torchrun: bool = False, sets: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    pre = [sys.executable]
    if torchrun:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        pre += ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return subprocess.run([*pre, "-m", "pnc.cli", "run", "specs/digits_depth.yaml", *SETS, *sets, *args], cwd=d, env=_env(d),
                          capture_output=True, text=True, timeout=600)


def _cell_run(d: Path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{d / 'mlflow.db'}")
    exp = c.get_experiment_by_name("digits_depth")
    runs = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("pnc.role") == "cell"]
    assert len(runs) == 1
    return c, runs[0]


def _table(d: Path):
    import pandas as pd

    c, run = _cell_run(d)
    path = c.download_artifacts(run.info.run_id, "layer_metrics.parquet", str(d))
    return pd.read_parquet(path).sort_values(["epoch", "metric", "split", "layer"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """One uninterrupted run with snapshots (shared by the tests below)."""
    d = _project(tmp_path_factory.mktemp("snap"), "straight")
    r = _pnc(d)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


@pytest.mark.slow
def test_table_layout_and_its_final_epoch_equals_the_logged_curves(straight: Path) -> None:
    c, run = _cell_run(straight)
    t = _table(straight)
    assert list(t.columns) == ["epoch", "layer", "module", "metric", "split", "value"]
    assert sorted(t.epoch.unique()) == [*EPOCHS, 5], "the chosen epochs and the final one"
    names = json.loads(Path(c.download_artifacts(run.info.run_id, "layers.json", str(straight))).read_text())
    for epoch, d in t.groupby("epoch"):
        assert {(m, s) for m, s in zip(d.metric, d.split)} >= {("cdnv", "train"), ("nc2", "train"), ("cdnv", "test")}, epoch
        for key, dk in d.groupby(["metric", "split"]):
            assert dk.layer.tolist() == list(range(len(names))), (epoch, key)
            assert dk.module.tolist() == [names[str(i)] for i in range(len(names))]
    final = t[t.epoch == 5]
    for (metric, split), dk in final.groupby(["metric", "split"]):
        logged = {m.step: m.value for m in c.get_metric_history(run.info.run_id, f"{metric}/{split}")}
        assert logged and {i: v for i, v in zip(dk.layer, dk.value) if v == v} == logged, f"{metric}/{split}"  # exact
    # the per-epoch summaries, step = epoch: the geometric mean of CDNV over the intermediate layers (relative depth 0.2..0.8)
    hist = {m.step: m.value for m in c.get_metric_history(run.info.run_id, "cdnv_mean_intermediate/train")}
    assert sorted(hist) == [*EPOCHS, 5]
    for epoch, v in hist.items():
        vals = t[(t.epoch == epoch) & (t.metric == "cdnv") & (t.split == "train")].value.to_numpy()
        x = np.linspace(0, 1, len(vals))
        mid = vals[(x >= 0.2) & (x <= 0.8)]
        assert v == pytest.approx(float(np.exp(np.mean(np.log(mid)))), rel=1e-12)
    assert t[t.metric == "cdnv"].groupby("epoch").value.mean().iloc[-1] < t[t.metric == "cdnv"].groupby("epoch").value.mean().iloc[0], \
        "training collapses the classes"


def _reference_features(model, split, names: list[str]) -> np.ndarray:
    """float64 per-tap features of ``model`` (eval mode) on ``split``: spatial means of each tapped module's output, the
    classifier's input for 'penultimate'; written here with plain forward hooks."""
    import torch

    from pnc.data.torchdata import ImageDataset

    ds = ImageDataset(split, image_size=8, channels=1)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    got: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = []
    for n in names:
        if n == "penultimate":
            hooks.append(model.fc.register_forward_pre_hook(lambda m, a: got.__setitem__("penultimate", a[0].detach())))
        else:
            hooks.append(modules[n].register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, o.detach())))
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out = []
    for n in names:
        f = got[n].double().numpy()
        out.append(f.reshape(f.shape[0], f.shape[1], -1).mean(axis=2) if f.ndim > 2 else f)
    return out


def test_snapshot_equals_recomputation_from_the_checkpoint_of_its_epoch(tmp_path: Path) -> None:
    """Snapshots at epochs 0 and 1 of a 2-epoch training: each equals CDNV and NC2 recomputed in float64 from the network
    of that epoch (built afresh for 0; the checkpoint a 1-epoch training leaves for 1), the checkpoint keeps them, and
    the network trained with snapshots is bit for bit the one trained without."""
    import torch

    from pnc.data.base import ImageSplit
    from pnc.data.torchdata import ImageDataset
    from pnc.engine import measure_model
    from pnc.models import build_model
    from pnc.snapshots import Snapshots
    from pnc.spec import load_spec
    from pnc.train import make_accelerator, seed_everything, train

    (tmp_path / "s.yaml").write_text(
        "kind: depth_sweep\nname: snap\ndataset: {name: digits, image_size: 8}\nmodels: [resnet8]\n"
        "train: {epochs: 2, batch_size: 32, schedule: {name: constant}, optimizer: {lr: 0.05}}\n"
        "measure: {metrics: [cdnv, nc2], epochs: [0, 1]}\n")
    spec = load_spec(tmp_path / "s.yaml")
    rng = np.random.default_rng(0)
    split = ImageSplit("synthetic", [str(i) for i in range(4)], rng.integers(0, 4, 96),
                       images=rng.integers(0, 256, (96, 8, 8, 1), dtype=np.uint8))
    acc = make_accelerator("fp32", 1)

    def measure(model):
        return measure_model(model, spec, {"train": ImageDataset(split, image_size=8, channels=1)}, accelerator=acc,
                             num_classes=4, label_names=("train",), progress=False)

    def fresh():
        seed_everything(0)
        return build_model("resnet8", num_classes=4, in_chans=1, image_size=8)

    def run(epochs: int, ckpt: Path | None, snaps=None):
        model = fresh()
        train(model, ImageDataset(split, image_size=8, channels=1), spec.train.model_copy(update={"epochs": epochs}),
              accelerator=acc, checkpoint=ckpt, progress=False, snapshots=snaps)
        return model

    snaps = Snapshots(spec.measure.epochs, spec.train.epochs, measure)
    with_snaps = run(2, tmp_path / "a.pt", snaps)
    without = run(2, None)
    for (k, a), b in zip(with_snaps.state_dict().items(), without.state_dict().values()):
        assert torch.equal(a, b), f"snapshots changed training ({k})"
    assert sorted(snaps.taken) == [0, 1]
    kept = Snapshots(spec.measure.epochs, spec.train.epochs, measure)
    kept.load(torch.load(tmp_path / "a.pt", weights_only=True)["snapshots"])
    assert kept.taken == snaps.taken, "the checkpoint keeps the snapshots exactly"

    run(1, tmp_path / "b.pt")
    state = torch.load(tmp_path / "b.pt", weights_only=True)
    assert state["epoch"] == 0  # the checkpoint after 1 epoch
    at_one = build_model("resnet8", num_classes=4, in_chans=1, image_size=8)
    at_one.load_state_dict(state["model"])
    y = np.asarray(split.labels)
    for epoch, net in ((0, fresh()), (1, at_one)):
        s = snaps.taken[epoch]
        feats = _reference_features(net, split, s["names"])
        assert s["names"] == ["layer1.0", "layer2.0", "penultimate"]  # layer3.0's pooled output is the head's input
        want_cdnv = [ref.cdnv(f, y, 4) for f in feats]
        want_nc2 = [ref.nc2(f, y, 4) for f in feats]
        assert s["results"]["cdnv/train"] == pytest.approx(want_cdnv, rel=1e-5), epoch
        assert s["results"]["nc2/train"] == pytest.approx(want_nc2, rel=1e-5, abs=1e-7), epoch
    assert snaps.taken[0]["results"]["cdnv/train"] != snaps.taken[1]["results"]["cdnv/train"]


@pytest.mark.slow
def test_kill_9_and_resume_gives_the_same_table(straight: Path, tmp_path: Path) -> None:
    import torch

    d = _project(tmp_path, "killed")
    p = subprocess.Popen([sys.executable, "-m", "pnc.cli", "run", "specs/digits_depth.yaml", *SETS], cwd=d, env=_env(d),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpts = d / ".pnc" / "checkpoints" / "digits_depth"

    def saved() -> dict | None:
        files = list(ckpts.glob("*.pt")) if ckpts.exists() else []
        try:
            return torch.load(files[0], weights_only=True) if files else None
        except Exception:  # noqa: BLE001 - being written; try again
            return None

    deadline = time.time() + 400
    while time.time() < deadline and (saved() or {}).get("epoch", -1) < 1:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    state = saved()
    assert state is not None and 1 <= state["epoch"] < 4, "killed during training"
    kept = sorted(int(e) for e in json.loads(state["snapshots"]))
    assert kept == [e for e in EPOCHS if e <= state["epoch"] + 1], "the checkpoint holds the snapshots taken so far"
    r = _pnc(d, "--results", "results.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((d / "results.json").read_text())["cells"][0]["resumed_from"] == state["epoch"] + 1
    a, b = _table(d), _table(straight)
    assert a[["epoch", "layer", "module", "metric", "split"]].equals(b[["epoch", "layer", "module", "metric", "split"]])
    assert a.value.to_numpy().tobytes() == b.value.to_numpy().tobytes(), "bit-identical table"


@pytest.mark.slow
def test_two_processes_give_the_table_of_one(tmp_path: Path) -> None:
    """A network without BatchNorm (tests/snapshot_net.py), as tests/test_train_distributed.py trains one: 1 and 2
    processes follow the same path up to float rounding, so their tables agree: to rounding at initialisation, within
    about its tolerance (rel 1e-5 on the weights after 2 epochs there) after the first epoch, and the rounding's
    growth after that stays far below any collapse effect. (With BatchNorm each process normalises its half batch on its
    own; the tables then drift apart as training does: measured with resnet8 here, CDNV up to 19% at epoch 3.)"""
    plain = ("--set", f"models=[{{name: plain, factory: '{ROOT / 'tests' / 'snapshot_net.py'}:plain'}}]",
             "--set", "measure.layers=['1', '3', penultimate]")
    one, two = _project(tmp_path, "one"), _project(tmp_path, "two")
    r = _pnc(one, sets=plain)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _pnc(two, torchrun=True, sets=plain)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _table(two), _table(one)
    assert a[["epoch", "layer", "module", "metric", "split"]].equals(b[["epoch", "layer", "module", "metric", "split"]])
    assert sorted(a.epoch.unique()) == [*EPOCHS, 5] and sorted(a.module.unique()) == ["1", "penultimate"]  # '3' pooled is the head's input
    at_init = a.epoch == 0
    assert a[at_init].value.tolist() == pytest.approx(b[at_init].value.tolist(), rel=1e-12)
    # float rounding (a global batch's gradient summed in two parts) grows as training goes on; measured: relative
    # differences 1e-15 at epoch 0, 8.6e-6 at epoch 1, 1.4e-4 at epochs 3 and 5
    for epoch, rel in ((1, 1e-5 * 2), (3, 1e-3), (5, 1e-3)):
        sel = a.epoch == epoch
        assert a[sel].value.tolist() == pytest.approx(b[sel].value.tolist(), rel=rel), f"epoch {epoch}"


@pytest.mark.parametrize("epochs, where, message", [
    ("[0, 9]", "measure.epochs[1]", "epoch 9 is beyond train.epochs (5)"),
    ("[1, 1]", "measure.epochs", "duplicate entries: 1"),
    ("[-2]", "measure.epochs[0]", "greater than or equal to 0"),
])
def test_bad_epochs_are_rejected_with_their_position(tmp_path: Path, epochs: str, where: str, message: str) -> None:
    from pnc.errors import SpecError
    from pnc.spec import load_spec

    f = tmp_path / "s.yaml"
    f.write_text(f"kind: depth_sweep\nname: s\ndataset: {{name: digits}}\nmodels: [resnet8]\ntrain: {{epochs: 5}}\n"
                 f"measure:\n  epochs: {epochs}\n")
    with pytest.raises(SpecError) as e:
        load_spec(f)
    text = str(e.value)
    assert f"{f}:7:" in text and where in text and message in text, text


def test_a_measure_study_takes_no_snapshots(tmp_path: Path) -> None:
    from pnc.errors import SpecError
    from pnc.spec import load_spec

    f = tmp_path / "s.yaml"
    f.write_text("kind: measure\nname: s\ndataset: {name: digits}\nmodels: [{uri: 'models:/m/1'}]\nmeasure: {epochs: [1]}\n")
    with pytest.raises(SpecError, match=r"s\.yaml:5:\d+: measure\.epochs: a measure study measures given networks"):
        load_spec(f)


def test_measure_epochs_leave_cell_ids_alone_when_unset_and_change_them_when_set(tmp_path: Path) -> None:
    from pnc.cells import expand
    from pnc.spec import load_spec

    base = "kind: depth_sweep\nname: s\ndataset: {name: digits}\nmodels: [resnet8]\ntrain: {epochs: 5}\n"
    (tmp_path / "a.yaml").write_text(base)
    (tmp_path / "b.yaml").write_text(base + "measure: {epochs: []}\n")
    (tmp_path / "c.yaml").write_text(base + "measure: {epochs: [1]}\n")
    a, b, c = (expand(load_spec(tmp_path / f"{x}.yaml"))[0] for x in "abc")
    assert a.id == b.id and a.train_key == b.train_key
    assert c.id != a.id and c.train_key != a.train_key, "snapshots are taken while training: a new cell trains again"


def test_analyses_over_time() -> None:
    from pnc import analysis

    assert analysis.first_epoch_reaching([1, 2, 3, 4], [0.5, 0.99, 1.0, 1.0], 1.0) == 3
    assert analysis.first_epoch_reaching([1, 2], [0.5, float("nan")], 1.0) is None
    ratios = [[0.5, 0.9, 1.0], [0.8, 1.2, 1.0 + 1e-12], [1.1, 0.9, float("nan")]]
    assert analysis.first_crossings([0, 2, 5], ratios, 1e-9) == [5, 2, None]
    flat = [1.0] * 12
    shaped = list(np.exp(np.concatenate([np.linspace(2, 0, 4), np.full(4, 0.0) + [0, 0.001, -0.001, 0], np.linspace(-0.5, -3, 4)])))
    assert analysis.detect_transition(shaped).found and not analysis.detect_transition(flat).found
    onset = analysis.transition_onset([0, 1, 2, 3], [flat, shaped, flat, shaped])
    assert onset.found == [False, True, False, True]
    assert onset.first_found == 1 and onset.stable_from == 3, "found at 1, lost at 2, found from 3 on"
    assert analysis.transition_onset([0, 5], [shaped, flat]).stable_from is None


def test_a_shorter_training_by_override_leaves_out_the_later_snapshots(tmp_path: Path, capsys) -> None:
    from pnc.errors import SpecError
    from pnc.spec import load_spec

    spec = load_spec(ROOT / "specs" / "digits_noise.yaml", ["train.epochs=3"])
    assert spec.measure.epochs == [0, 2] and "measure.epochs 5, 10, 20, 25 left out" in capsys.readouterr().err
    with pytest.raises(SpecError, match="epoch 5 is beyond train.epochs"):  # both given: the user's own list
        load_spec(ROOT / "specs" / "digits_noise.yaml", ["train.epochs=3", "measure.epochs=[0, 5]"])
    f = tmp_path / "s.yaml"
    f.write_text((ROOT / "specs" / "digits_noise.yaml").read_text().replace("epochs: 30", "epochs: 22"))
    with pytest.raises(SpecError, match="epoch 25 is beyond train.epochs"):  # in the file itself
        load_spec(f)


@pytest.mark.slow
def test_transfer_source_training_takes_snapshots_and_the_report_shows_them(tmp_path: Path) -> None:
    """A transfer study's source training: its table in the source cell run, the analyses over time in the parent
    run (one name per model and source) and the over-time sections in the report."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    d = _project(tmp_path, "transfer")
    sets = ["--set", "models=[resnet8]", "--set", "dataset.image_size=8", "--set", "train.epochs=2",
            "--set", "transfer.sources=[handwritten]", "--set", "transfer.targets=[typeset]",
            "--set", "measure.metrics=[cdnv, nc2]", "--set", "measure.epochs=[0, 1]"]
    r = subprocess.run([sys.executable, "-m", "pnc.cli", "run", "specs/digits_transfer.yaml", *sets], cwd=d, env=_env(d),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    c = MlflowClient(f"sqlite:///{d / 'mlflow.db'}")
    exp = c.get_experiment_by_name("digits_transfer")
    runs = c.search_runs([exp.experiment_id])
    (source,) = [x for x in runs if x.data.tags.get("pnc.role") == "cell"]
    table = pd.read_parquet(c.download_artifacts(source.info.run_id, "layer_metrics.parquet", str(d)))
    assert sorted(table.epoch.unique()) == [0, 1, 2] and set(table.metric) == {"cdnv", "nc2"}
    (parent,) = [x for x in runs if x.data.tags.get("pnc.role") == "study"]
    assert "pnc.dynamics.resnet8.handwritten" in parent.data.tags, sorted(parent.data.tags)
    rep = subprocess.run([sys.executable, "-m", "pnc.cli", "report", "specs/digits_transfer.yaml", *sets], cwd=d,
                         env=_env(d), capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    page = (d / "reports" / "digits_transfer" / "index.html").read_text()
    assert "Collapse during training" in page and "When the pattern forms" in page
