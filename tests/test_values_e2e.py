"""Logged values recomputed from the trained networks, one tiny study per kind (issue #17).

One subprocess runs four studies through pnc's CLI (``pnc run``, one MLflow store in a temporary project):
digits_depth, digits_noise (a label-noise cell symmetric:0.5 and a corrupted-input cell gaussian_noise:3),
digits_transfer (source handwritten, target typeset) and a measure study, each with ResNet-8, one epoch, 8 px
images (digits natively; the transfer domains resized). The test then takes back the network each run measured
from what the run left:

* depth and noise cells: the cell's checkpoint, written after the last epoch and holding the run id (pnc deletes it
  once the run is FINISHED; the subprocess wraps ``StudyRun.execute`` so that it is kept, nothing else changes);
* a domain-transfer target sub-run: the registered model version its tag ``pnc.model_uri`` names (loaded through
  the model store), checked to be the one the source cell's run registered, with the weights of the source cell's
  last checkpoint bit for bit (a source cell logs no per-layer metrics of its own);
* a measure study: the weights file its spec names (the depth cell's trained weights).

It reads the splits from the folders the run logged as its MLflow inputs (digests compared), turns the images into
tensors itself (bilinear antialiased resize, [-1, 1]), hooks the modules named in the run's ``layers.json`` (the
classifier's input for "penultimate"), averages over positions in float64, and recomputes the per-layer metrics
with the independent float64 reference ``tests/metrics_reference.py`` (it does not import pnc.metrics). pnc's
features are float32, so rel 1e-4 (measured: at most 1.7e-7, on NC1; CDNV and NC2 below 3e-8); NCC accuracies and
the network's accuracies to the sample. Noise cells: ``<m>/train_noisy`` with the noisy label vector,
``<m>/train_clean`` with the clean one (they differ on every layer); corrupted-input cells: the corrupted and the
clean training images under the training labels, and ``mem_ratio/train`` = clean / corrupted (docs/metrics.md).
About 28 s of CPU for the whole file.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import metrics_reference as ref
from lean import LEAN

ROOT = Path(__file__).resolve().parents[1]
K = 10
RTOL = 1e-4  # float32 features (pnc casts every tap to float32 before its float64 statistics)
COMMON = ["--set", "train.epochs=1", "--set", "models=[resnet8]", "--set", "dataset.image_size=8", "--no-progress"]
STUDIES = [
    ["specs/digits_depth.yaml", *COMMON, *LEAN],
    ["specs/digits_noise.yaml", *COMMON, *LEAN, "--set", "noise.label=[{kind: symmetric, rates: [0.5]}]",
     "--set", "noise.input=[{corruption: gaussian_noise, severities: [3]}]"],
    ["specs/digits_transfer.yaml", *COMMON, "--set", "transfer.sources=[handwritten]", "--set", "transfer.targets=[typeset]"],
]
MEASURE_SPEC = """kind: measure
name: v_measure
dataset: {name: digits, image_size: 8}
models:
  - {name: resnet8, weights: trained_resnet8.pt}
measure: {layers: blocks, reduction: avgpool}
"""
# One process runs the studies one after the other through pnc's CLI (imports and the store's set-up once), keeping
# each cell's last checkpoint (StudyRun.execute deletes it once the run is closed; nothing else changes), and hands
# the depth cell's trained weights to the measure study as a checkpoint file.
RUNNER = """
import glob, json, sys
import torch
import pnc.engine as e
from pnc.cli import main
execute = e.StudyRun.execute
e.StudyRun.execute = lambda self, run_id, work, checkpoint=None: execute(self, run_id, work)
for args in json.loads(sys.argv[1]):
    if args[0] == "specs/v_measure.yaml":
        (ckpt,) = glob.glob(".pnc/checkpoints/digits_depth/*.pt")
        torch.save(torch.load(ckpt, weights_only=True)["model"], "trained_resnet8.pt")
    code = main(["run", *args])
    if code:
        sys.exit(f"pnc run {args} exited {code}")
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("values")
    shutil.copytree(ROOT / "specs", d / "specs")
    (d / "specs" / "v_measure.yaml").write_text(MEASURE_SPEC)
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{d / 'mlflow.db'}", PYTHONUNBUFFERED="1")
    studies = json.dumps([*STUDIES, ["specs/v_measure.yaml", "--no-progress"]])
    r = subprocess.run([sys.executable, "-c", RUNNER, studies], cwd=d, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr[-3000:]
    return d


# ----------------------------------------------------------------------------- what the runs left
def client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def cell_runs(project: Path, study: str, role: str = "cell") -> list:
    c = client(project)
    exp = c.get_experiment_by_name(study)
    runs = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("pnc.role") == role]
    assert runs and all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    return runs


def checkpoint_of(project: Path, study: str, run) -> dict:
    """The cell's checkpoint after its last epoch, checked to be this run's."""
    path = project / ".pnc" / "checkpoints" / study / f"{run.data.tags['pnc.cell_id']}.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["run_id"] == run.info.run_id and state["epoch"] == int(run.data.params["train.epochs"]) - 1
    return state


def trained_resnet8(state_dict: dict) -> torch.nn.Module:
    from pnc.models import build_model  # the architecture; the weights are the run's (strict load)

    net = build_model("resnet8", num_classes=K, in_chans=1, image_size=8)
    net.load_state_dict(state_dict, strict=True)
    return net.eval()


def layer_names(project: Path, run) -> list[str]:
    path = client(project).download_artifacts(run.info.run_id, "layers.json", str(project / "dl" / run.info.run_id))
    names = json.loads(Path(path).read_text())
    return [names[str(i)] for i in range(len(names))]


def logged(project: Path, run, key: str) -> list[float]:
    hist = client(project).get_metric_history(run.info.run_id, key)
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == list(range(len(hist))), key
    return [m.value for m in sorted(hist, key=lambda m: m.step)]


def inputs(project: Path, run) -> dict[str, tuple[Path, str]]:
    """The run's MLflow dataset inputs: name -> (split folder, context), each folder's digest checked."""
    from pnc.data.store import split_digest

    out = {}
    for di in run.inputs.dataset_inputs:
        path = project / json.loads(di.dataset.source)["uri"]
        assert split_digest(path)[:36] == di.dataset.digest, f"{path} is not the split the run logged"
        out[di.dataset.name] = (path, {t.key: t.value for t in di.tags}["mlflow.data.context"])
    return out


def images(folder: Path, size: int = 8) -> torch.Tensor:
    """A split folder's images.npy (N, H, W, C uint8) as the network's input: [0, 1], resized bilinearly with
    antialiasing to ``size``, channels averaged to one, mapped to [-1, 1]."""
    x = torch.from_numpy(np.load(folder / "images.npy")).permute(0, 3, 1, 2).double() / 255.0
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False).clamp(0.0, 1.0).double()
    return (x.mean(1, keepdim=True) * 2.0 - 1.0).float()


def labels(folder: Path, name: str = "labels.npy") -> np.ndarray:
    return np.load(folder / name).astype(np.int64)


def features(net: torch.nn.Module, names: list[str], x: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """float64 features of every named layer (block outputs averaged over positions; "penultimate": the input of the
    network's last Linear) and the network's predictions."""
    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    got: dict[str, list] = {n: [] for n in names}
    hooks = []
    for n in names:
        if n == "penultimate":
            hooks.append(head.register_forward_pre_hook(lambda m, a, n=n: got[n].append(a[0].double().flatten(1))))
        else:
            hooks.append(net.get_submodule(n).register_forward_hook(
                lambda m, a, o, n=n: got[n].append(o.double().mean((2, 3)) if o.dim() == 4 else o.double())))
    preds = []
    try:
        with torch.no_grad():
            for chunk in torch.split(x, 512):
                preds.append(net(chunk).argmax(1))
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v).numpy() for n, v in got.items()}, torch.cat(preds).numpy()


def check(project: Path, run, key: str, expected: list[float], rtol: float = RTOL) -> None:
    values = logged(project, run, key)
    assert len(values) == len(expected), (key, values, expected)
    np.testing.assert_allclose(values, expected, rtol=rtol, atol=0, err_msg=key)


def collapse(feats: dict, names: list[str], y: np.ndarray) -> dict[str, list[float]]:
    return {"cdnv": [ref.cdnv(feats[n], y, K) for n in names], "nc1": [ref.nc1(feats[n], y, K) for n in names],
            "nc2": [ref.nc2(feats[n], y, K) for n in names]}


def ncc(feats: dict, names: list[str], y: np.ndarray, feats_eval: dict, y_eval: np.ndarray) -> list[float]:
    return [ref.ncc_accuracy(feats[n], y, K, feats_eval[n], y_eval) for n in names]


def check_trained_cell(project: Path, run, net: torch.nn.Module) -> None:
    """A depth-sweep or measure cell: collapse metrics on the training split, NCC on train and test, accuracies."""
    names = layer_names(project, run)
    # ResNet-8: three blocks + penultimate, the last block's pooled output (= the head's input) merged into penultimate
    assert names == ["layer1.0", "layer2.0", "penultimate"] and run.data.tags["pnc.merged_taps"] == "layer3.0 -> penultimate"
    data = inputs(project, run)
    train, test = data["digits/train"][0], data["digits/test"][0]
    ytr, yte = labels(train), labels(test)
    ftr, ptr = features(net, names, images(train))
    fte, pte = features(net, names, images(test))
    for metric, values in collapse(ftr, names, ytr).items():
        check(project, run, f"{metric}/train", values)
    assert logged(project, run, "ncc_acc/train") == pytest.approx(ncc(ftr, names, ytr, ftr, ytr), abs=1e-12)
    assert logged(project, run, "ncc_acc/test") == pytest.approx(ncc(ftr, names, ytr, fte, yte), abs=1e-12)
    assert run.data.metrics["train/final_acc"] == pytest.approx(np.mean(ptr == ytr), abs=1e-12)
    assert run.data.metrics["test/acc"] == pytest.approx(np.mean(pte == yte), abs=1e-12)


# ----------------------------------------------------------------------------- per study kind
@pytest.mark.slow
def test_depth_cell_values_recomputed_from_its_checkpoint(project: Path) -> None:
    (run,) = cell_runs(project, "digits_depth")
    check_trained_cell(project, run, trained_resnet8(checkpoint_of(project, "digits_depth", run)["model"]))


@pytest.mark.slow
def test_measure_cell_values_recomputed_from_the_weights_it_names(project: Path) -> None:
    (run,) = cell_runs(project, "v_measure")
    assert run.data.tags["pnc.kind"] == "measure"
    check_trained_cell(project, run, trained_resnet8(torch.load(project / "trained_resnet8.pt", weights_only=True)))


def noise_cell(project: Path, tag: str):
    runs = {r.data.tags["pnc.noise"]: r for r in cell_runs(project, "digits_noise")}
    assert set(runs) == {"symmetric:0.5", "gaussian_noise:3"}
    run = runs[tag]
    return run, trained_resnet8(checkpoint_of(project, "digits_noise", run)["model"]), layer_names(project, run), inputs(project, run)


@pytest.mark.slow
def test_label_noise_cell_values_use_the_noisy_and_the_clean_label_vectors(project: Path) -> None:
    run, net, names, data = noise_cell(project, "symmetric:0.5")
    derived, context = data["digits_noise/symmetric-0.5"]
    assert context == "training"
    noisy, clean = labels(derived), labels(derived, "clean_labels.npy")
    base, _ = data["digits/train"]
    assert np.array_equal(clean, labels(base)) and np.array_equal(np.load(derived / "images.npy"), np.load(base / "images.npy"))
    assert run.data.metrics["noise/realized_rate"] == pytest.approx(np.mean(noisy != clean), abs=1e-12)
    feats, _ = features(net, names, images(derived))
    on_noisy, on_clean = collapse(feats, names, noisy), collapse(feats, names, clean)
    for metric in ("cdnv", "nc1", "nc2"):
        check(project, run, f"{metric}/train_noisy", on_noisy[metric])
        check(project, run, f"{metric}/train_clean", on_clean[metric])
    check(project, run, "mem_ratio/train", [c / n for c, n in zip(on_clean["cdnv"], on_noisy["cdnv"])])
    noisy_logged, clean_logged = logged(project, run, "cdnv/train_noisy"), logged(project, run, "cdnv/train_clean")
    assert all(abs(c - n) > 1e-3 * max(c, n) for c, n in zip(clean_logged, noisy_logged)), (clean_logged, noisy_logged)
    test = data["digits/test"][0]
    fte, _ = features(net, names, images(test))
    assert logged(project, run, "ncc_acc/test_noisy") == pytest.approx(ncc(feats, names, noisy, fte, labels(test)), abs=1e-12)
    assert logged(project, run, "ncc_acc/test_clean") == pytest.approx(ncc(feats, names, clean, fte, labels(test)), abs=1e-12)


@pytest.mark.slow
def test_corrupted_input_cell_values_use_the_corrupted_and_the_clean_images(project: Path) -> None:
    run, net, names, data = noise_cell(project, "gaussian_noise:3")
    corrupted, context = data["digits_noise/gaussian_noise-3"]
    clean, clean_context = data["digits/train"]
    assert (context, clean_context) == ("training", "evaluation")
    y = labels(corrupted)
    assert np.array_equal(y, labels(clean)), "input noise keeps the labels"
    assert not np.array_equal(np.load(corrupted / "images.npy"), np.load(clean / "images.npy"))
    f_corrupted, p_corrupted = features(net, names, images(corrupted))
    f_clean, p_clean = features(net, names, images(clean))
    on_corrupted, on_clean = collapse(f_corrupted, names, y), collapse(f_clean, names, y)
    for metric in ("cdnv", "nc1", "nc2"):
        check(project, run, f"{metric}/train_noisy", on_corrupted[metric])
        check(project, run, f"{metric}/train_clean", on_clean[metric])
    check(project, run, "mem_ratio/train", [c / n for c, n in zip(on_clean["cdnv"], on_corrupted["cdnv"])])
    assert all(abs(c - n) > 1e-3 * max(c, n) for c, n in zip(on_clean["cdnv"], on_corrupted["cdnv"]))
    test = data["digits/test"][0]
    fte, _ = features(net, names, images(test))
    assert logged(project, run, "ncc_acc/test") == pytest.approx(ncc(f_corrupted, names, y, fte, labels(test)), abs=1e-12)
    assert run.data.metrics["train/final_acc"] == pytest.approx(np.mean(p_corrupted == y), abs=1e-12)
    assert run.data.metrics["train/clean_input_acc"] == pytest.approx(np.mean(p_clean == y), abs=1e-12)


@pytest.mark.slow
def test_transfer_target_values_recomputed_from_the_registered_model(project: Path) -> None:
    from pnc import modelstore

    (source,) = cell_runs(project, "digits_transfer")
    (target,) = cell_runs(project, "digits_transfer", role="transfer")
    assert (source.data.tags["source"], target.data.tags["target"]) == ("handwritten", "typeset")
    uri = target.data.tags["pnc.model_uri"]
    name, version = uri.removeprefix("models:/").split("/")
    mv = client(project).get_model_version(name, version)
    assert mv.run_id == source.info.run_id == target.data.tags["pnc.model_run"], "the target measured the source's model"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    try:
        net = modelstore.load(uri).eval()
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    trained = checkpoint_of(project, "digits_transfer", source)["model"]  # the source cell's network after its last epoch
    stored = net.state_dict()
    assert set(stored) == set(trained) and all(torch.equal(stored[k], trained[k]) for k in trained), \
        "the registered version holds the source cell's trained weights"
    names = layer_names(project, target)
    data = inputs(project, target)
    train, test = data["digits_domains/typeset/train"], data["digits_domains/typeset/test"]
    assert (train[1], test[1]) == ("probe", "evaluation")
    y = labels(train[0])
    feats, _ = features(net, names, images(train[0]))
    for metric, values in collapse(feats, names, y).items():
        check(project, target, f"{metric}/target", values)
    _, pte = features(net, names, images(test[0]))
    assert target.data.metrics["test/source_head_acc"] == pytest.approx(np.mean(pte == labels(test[0])), abs=1e-12)


# ----------------------------------------------------------------------------- corrupted-input mem_ratio
def test_corrupted_input_mem_ratio_is_the_shared_function() -> None:
    """A corrupted-input cell's Delta goes through memorization_ratio (docs/metrics.md): clean-input CDNV over
    corrupted-input CDNV, Python floats, and a zero denominator warns (MetricWarning naming the layer) instead of
    numpy's silent inf / NaN."""
    from pnc.kinds.noise import corrupted_input_results
    from pnc.metrics.registry import MetricWarning

    corrupted = {"cdnv/train": [0.0, 0.0, 2.0], "nc2/train": [0.1, 0.2, 0.3], "probe_acc/test": [0.5, 0.5, 0.5]}
    clean = {"cdnv/train": [0.0, 1.0, 1.0], "nc2/train": [0.4, 0.5, 0.6], "probe_acc/test": [0.7, 0.8, 0.9]}
    with pytest.warns(MetricWarning) as caught:
        out = corrupted_input_results(corrupted, clean)
    assert [str(w.message) for w in caught] == [f"memorization ratio: CDNV on corrupted inputs is 0 (layer {i})" for i in (0, 1)]
    assert math.isnan(out["mem_ratio/train"][0]) and out["mem_ratio/train"][1:] == [math.inf, 0.5]
    assert all(type(v) is float for v in out["mem_ratio/train"])
    assert out["cdnv/train_noisy"] == corrupted["cdnv/train"] and out["cdnv/train_clean"] == clean["cdnv/train"]
    assert out["nc2/train_noisy"] == corrupted["nc2/train"] and out["probe_acc/test"] == clean["probe_acc/test"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no zero: no warning of any kind
        assert corrupted_input_results({"cdnv/train": [4.0]}, {"cdnv/train": [1.0]})["mem_ratio/train"] == [0.25]
