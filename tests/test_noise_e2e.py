"""A small noise sweep end to end: per-layer keys, memorization, parent-run analyses, estimate-noise, compare."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lean import LEAN

ROOT = Path(__file__).resolve().parents[1]
SETS = ["--set", "train.epochs=2", "--set", "models=[resnet8]", "--set", "noise.label=[{kind: symmetric, rates: [0.0, 0.3, 0.6]}]",
        "--set", "noise.input=[{corruption: gaussian_noise, severities: [2]}]", *LEAN]


def pnc(args, cwd: Path, timeout: int = 900):
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{cwd / 'mlflow.db'}")
    return subprocess.run([sys.executable, "-m", "pnc.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_noise_sweep_end_to_end(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    r = pnc(["run", "specs/digits_noise.yaml", *SETS, "--metrics", "metrics/n.json", "--curves", "plots/n.csv"], tmp_path)
    assert r.returncode == 0, r.stderr
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment_by_name("digits_noise")
    runs = {x.data.tags.get("pnc.noise"): x for x in c.search_runs([exp.experiment_id]) if x.data.tags.get("pnc.role") == "cell"}
    assert set(runs) == {"clean", "symmetric:0.3", "symmetric:0.6", "gaussian_noise:2"}
    n_layers = 3  # resnet8's 3 blocks + penultimate, the last block's pooled output merged into penultimate
    for tag, run in runs.items():
        for key in ("cdnv/train_noisy", "cdnv/train_clean", "nc2/train_noisy", "mem_ratio/train", "probe_acc/test"):
            steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, key))
            assert steps == list(range(n_layers)), (tag, key)
        assert "pnc.memorization_layers" in run.data.tags
        arts = {a.path for a in c.list_artifacts(run.info.run_id)}
        assert "memorization_layers.json" in arts
        if tag != "clean":
            assert "derived_split_manifest.json" in arts
            names = {d.dataset.name for d in run.inputs.dataset_inputs}
            assert f"digits_noise/{tag.replace(':', '-')}" in names
    rate = runs["symmetric:0.6"].data.metrics["noise/realized_rate"]
    assert 0.6 * 0.9 - 0.03 < rate < 0.6 * 0.9 + 0.03, "a fraction r gets a uniformly random label: E[changed] = r (K-1)/K"
    mem = [m.value for m in sorted(c.get_metric_history(runs["clean"].info.run_id, "mem_ratio/train"), key=lambda m: m.step)]
    assert len(mem) == n_layers and all(abs(d - 1.0) < 1e-12 for d in mem), "measured with both label vectors: Delta = 1 up to rounding"
    assert runs["clean"].data.tags["pnc.memorization_layers"] == "none"
    clean_keys = set(c.get_run(runs["clean"].info.run_id).data.metrics)
    assert {"cdnv/train_clean", "cdnv/train_noisy", "nc2/train_noisy", "nc2/train_clean"} <= clean_keys, clean_keys
    assert "train/clean_input_acc" in runs["gaussian_noise:2"].data.metrics

    parent = next(x for x in c.search_runs([exp.experiment_id]) if x.data.tags.get("pnc.role") == "study")
    assert parent.info.status == "FINISHED"
    assert "noise_map/resnet8/symmetric/loo_mae" in parent.data.metrics
    analysis = json.loads(Path(c.download_artifacts(parent.info.run_id, "analysis.json", str(tmp_path))).read_text())
    m = analysis["noise_maps"]["resnet8/symmetric"]
    assert m["settings"] == ["clean", "symmetric:0.3", "symmetric:0.6"], m
    assert m["levels"][0] == 0.0 and m["levels"][2] == rate, "levels are the realised noise rates"

    # DVC's metrics and plots files of the study: what the runs logged, per cell
    headline = json.loads((tmp_path / "metrics/n.json").read_text())
    for tag, run in runs.items():
        label = f"model=resnet8,noise={tag}"
        layers = run.data.tags["pnc.memorization_layers"]
        assert headline[f"memorization_layers@{label}"] == (0 if layers == "none" else len(layers.split(",")))
        assert headline[f"test/acc@{label}"] == run.data.metrics["test/acc"]
    assert headline["noise_map/resnet8/symmetric/loo_mae"] == parent.data.metrics["noise_map/resnet8/symmetric/loo_mae"]
    import pandas as pd

    curves = pd.read_csv(tmp_path / "plots/n.csv")
    assert list(curves.columns) == ["cell", "model", "layer", "cdnv"]
    for tag, run in runs.items():
        d = curves[curves.cell == f"model=resnet8,noise={tag}"].sort_values("layer")
        logged = sorted(c.get_metric_history(run.info.run_id, "cdnv/train_noisy"), key=lambda m: m.step)
        assert d.layer.tolist() == [m.step for m in logged] and d.cdnv.tolist() == pytest.approx([m.value for m in logged])

    est = pnc(["estimate-noise", runs["symmetric:0.3"].info.run_id, "--json"], tmp_path)
    assert est.returncode == 0, est.stderr
    rows = json.loads(est.stdout)
    assert {r["kind"] for r in rows} >= {"symmetric"} and all(r["model"] == "resnet8" for r in rows)
    assert all(isinstance(r["warnings"], list) and len(r["calibrated_range"]) == 2 for r in rows)

    rep = pnc(["report", "specs/digits_noise.yaml"], tmp_path)
    assert rep.returncode == 0, rep.stderr
    page = (tmp_path / "reports/digits_noise/index.html").read_text()
    assert "Memorization layers" in page and "Noise-level estimation" in page
    # the spec file's own cells (epochs 30, ...) never ran: the report says it shows the --set runs instead
    assert "no runs of this spec&#x27;s exact cells" in page and "no runs of this spec's exact cells" in rep.stderr
    assert (tmp_path / "reports/digits_noise/noise_symmetric.png").exists()
    exact = pnc(["report", "specs/digits_noise.yaml", *SETS], tmp_path)  # the run's overrides: its exact cells
    assert exact.returncode == 0 and "no runs of this spec's exact cells" not in exact.stderr, exact.stderr
    text = pnc(["estimate-noise", runs["symmetric:0.3"].info.run_id], tmp_path)
    assert text.returncode == 0 and "symmetric noise level ~" in text.stdout, text.stdout + text.stderr

    cmp_ = pnc(["compare", "specs/digits_noise.yaml", "specs/digits_noise.yaml", "--metric", "nc2/train_noisy"], tmp_path)
    assert cmp_.returncode == 0, cmp_.stderr
    assert (tmp_path / "reports/compare-digits_noise-digits_noise-nc2_train_noisy/compare.png").exists()
    missing = pnc(["compare", "specs/digits_depth.yaml"], tmp_path)
    assert missing.returncode == 1 and "no finished runs" in missing.stderr
    # two different studies on one relative-depth axis: each with its own metric (cdnv/train, clean cdnv/train_noisy)
    depth = pnc(["run", "specs/digits_depth.yaml", "--set", "train.epochs=1", "--set", "models=[resnet8]", *LEAN], tmp_path)
    assert depth.returncode == 0, depth.stderr
    both = pnc(["compare", "specs/digits_depth.yaml", "digits_noise"], tmp_path)
    assert both.returncode == 0, both.stderr
    page = (tmp_path / "reports/compare-digits_depth-digits_noise/index.html").read_text()
    assert "<td>digits_depth</td>" in page and "<td>digits_noise</td>" in page, page[-3000:]
    assert "<td>cdnv/train</td>" in page and "<td>cdnv/train_noisy</td>" in page, page[-3000:]
