"""The MLflow UI in a real browser: a tiny study into a local store, `pnc ui`, then headless Chromium
(Debian's `chromium`, installed by `make test`) opens the link `pnc ui` prints for the experiment (its runs page
in the UI's "Model training" view), a cell run's page with its per-layer figure, the parent run's description and
report, the compare view of the study's child runs and the metric view with x-axis = step, where the per-layer
curves are drawn (step = layer index). Screenshots go to test-artifacts/browser/.

What the pages show is the UI of the MLflow that requirements.lock pins (3.17: the "GenAI" / "Model training"
toggle, `workflowType`); `make lock` moves that pin, and this test says so when the installed MLflow is another.

Chromium is driven through its command line (--dump-dom and --screenshot after
--virtual-time-budget, which lets the React app fetch from the server and render first).
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from health import wait_healthy

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
LAYERS = {"resnet8": 3, "resnet14": 6}  # residual blocks + penultimate - the last block (merged into penultimate)
# the metrics this test reads in the UI (the embedded spec logs the whole family and takes snapshots: the UI's
# compare table then shows only the first few dozen metric rows)
FOCUS = ["--set", "measure.metrics=[cdnv, nc1, nc2, ncc, probe]", "--set", "measure.epochs=[]"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1920,1200"]


def chromium_binary() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
    if path is None:
        pytest.fail("headless Chromium is not installed (Debian package `chromium`): run `make test`, which installs "
                    "it (apt-get install -y --no-install-recommends chromium)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_text(dom: str) -> str:
    """The visible text of a dumped DOM, whitespace collapsed."""
    t = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S | re.I)
    t = re.sub(r"<[^>]+>", " ", t)
    return re.sub(r"\s+", " ", html.unescape(t))


def browse(chromium: str, url: str, screenshot: Path, profile: Path, expect: list[str], attempts: int = 3,
           expect_dom: tuple[str, ...] = ()) -> str:
    """Load ``url`` in headless Chromium, save a screenshot, return the page text once it shows every
    string of ``expect`` and its DOM holds every string of ``expect_dom`` (retried with a longer virtual-time
    budget: the app renders after its fetches)."""
    text = ""
    for attempt in range(attempts):
        shutil.rmtree(profile, ignore_errors=True)  # a fresh profile every time: no state carried over
        budget = 15000 * (attempt + 1)
        r = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget}",
                            f"--screenshot={screenshot}", "--dump-dom", url],
                           capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
        text = page_text(r.stdout)
        if r.returncode == 0 and all(e in text for e in expect) and all(e in r.stdout for e in expect_dom) and screenshot.exists():
            return text
    missing = [e for e in expect if e not in text] + [f"(DOM) {e}" for e in expect_dom if e not in r.stdout]
    pytest.fail(f"{url}: the page never showed {missing} (exit {r.returncode}); page text: {text[:3000]}\n"
                f"stderr: {r.stderr[-2000:]}")


def q(obj) -> str:
    return urllib.parse.quote(json.dumps(obj, separators=(",", ":")), safe="")


@pytest.mark.slow
def test_mlflow_ui_shows_the_study_and_its_layer_curves(tmp_path: Path) -> None:
    from importlib.metadata import version

    from mlflow.tracking import MlflowClient

    from lock import locked_version

    assert version("mlflow") == locked_version("mlflow"), "these pages are MLflow's of requirements.lock: `make install`"
    chromium = chromium_binary()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # the code's commit
    r = subprocess.run([sys.executable, "-m", "pnc.cli", "run", "specs/digits_depth.yaml", "--set", "train.epochs=1",
                        "--set", "models=[resnet8, resnet14]", *FOCUS, "--no-progress"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "pnc.cli", "report", "specs/digits_depth.yaml", "--set", "train.epochs=1",
                        "--set", "models=[resnet8, resnet14]", *FOCUS], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("digits_depth")
    runs = c.search_runs([exp.experiment_id])
    children = sorted((x for x in runs if x.data.tags.get("pnc.role") == "cell"), key=lambda x: x.info.run_name)
    assert [x.info.run_name for x in children] == ["digits_depth@model=resnet14", "digits_depth@model=resnet8"]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ui_env = {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}
    ui_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no GenAI job workers on a 2-core machine
    with open(tmp_path / "ui.log", "w") as log:
        ui = subprocess.Popen([sys.executable, "-m", "pnc.cli", "ui", "--port", str(port)], cwd=tmp_path, env=ui_env,
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(ui, base, tmp_path / "ui.log", "`pnc ui`")
        profile = tmp_path / "chromium-profile"
        ids = [x.info.run_id for x in children]

        # the link `pnc ui` prints: the experiment's runs page in the "Model training" view (not GenAI's traces and
        # evaluation runs), with the study's parent run and its two cells nested under it, and its description
        printed = dict(re.findall(r"^  (\S+): (http\S+)$", (tmp_path / "ui.log").read_text(), flags=re.M))
        assert printed["digits_depth"] == f"{base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        text = browse(chromium, printed["digits_depth"], ARTIFACTS / "1-experiment-runs.png", profile,
                      expect=["digits_depth", "3 matching runs", "Model registry", "a pnc depth_sweep study"])
        assert "Evaluation runs" not in text and "Sessions" not in text, "the GenAI view"
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

        # a cell run's page: its per-layer figure (the image artifact, loaded), and MLflow's context tags
        ml = "?workflowType=machine_learning"
        run = children[0]
        browse(chromium, f"{base}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}/artifacts/layers.png{ml}",
               ARTIFACTS / "2-run-figure.png", profile, expect=[run.info.run_name, "layers.png"],
               expect_dom=('<img alt="layers.png" src="blob:',))
        assert run.data.tags["mlflow.source.git.commit"] == head
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"].endswith("cli.py")
        text = browse(chromium, f"{base}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}{ml}",
                      ARTIFACTS / "3-run-overview.png", profile, expect=[run.info.run_name, "cli.py"])
        assert run.data.tags["mlflow.source.git.commit"][:7] in text or run.data.tags["mlflow.source.git.commit"] in text

        # the parent run: its description (cells, verdicts, the command) and the study report among its artifacts
        (parent,) = [x for x in runs if x.data.tags.get("pnc.role") == "study"]
        note = c.get_run(parent.info.run_id).data.tags["mlflow.note.content"]
        assert "pnc.transition.resnet14" in note and "pnc run specs/digits_depth.yaml --set 'train.epochs=1'" in note
        browse(chromium, f"{base}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}{ml}", ARTIFACTS / "4-parent.png",
               profile, expect=["Reproduce", "pnc.transition.resnet14", "digits_depth@model=resnet8"])
        browse(chromium, f"{base}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifacts/report/layers.png{ml}",
               ARTIFACTS / "4-parent-report.png", profile, expect=["index.html", "layers.png"],
               expect_dom=('<img alt="report/layers.png" src="blob:',))

        # the compare view of the two child runs: names, per-layer metric keys, their tags
        text = browse(chromium, f"{base}/#/compare-runs?runs={q(ids)}&experiments={q([exp.experiment_id])}",
                      ARTIFACTS / "5-compare-runs.png", profile,
                      expect=["Comparing 2 Runs", *[x.info.run_name for x in children]])
        # the metrics table scrolls inside a box of fixed height: only its first rows (alphabetical: cdnv/train,
        # collapse/..., layer/stage, layers/count, nc1/train) are in the page; nc2 and probe curves are checked below
        for key in ("cdnv/train", "collapse/total_decline", "layers/count", "nc1/train", "pnc.cell_id"):
            assert key in text, key

        # the metric view with x-axis = step: one curve per run and metric over the layers
        keys = ["cdnv/train", "nc2/train", "probe_acc/test"]
        url = (f"{base}/#/metric?runs={q(ids)}&metric={q(keys[0])}&experiments={q([exp.experiment_id])}"
               f"&plot_metric_keys={q(keys)}&plot_layout=%7B%7D&x_axis=step&y_axis_scale=linear&line_smoothness=1"
               f"&show_point=true&deselected_curves=%5B%5D&last_linear_y_axis_range=%5B%5D")
        text = browse(chromium, url, ARTIFACTS / "6-layer-curves.png", profile,
                      expect=[f"{x.info.run_name} ({k})" for x in children for k in keys])
        assert "Step" in text
        for x in children:  # the last step of each curve is the network's last tapped layer
            last = LAYERS[x.data.tags["pnc.model"]] - 1
            assert re.search(rf"{re.escape(x.info.run_name)} \S+ \(step={last}\)", text), (x.info.run_name, last)
        for png in ARTIFACTS.glob("*.png"):
            assert png.stat().st_size > 20_000, f"{png} looks empty"
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGTERM)
            try:
                ui.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(ui.pid, signal.SIGKILL)
                ui.wait(timeout=10)
