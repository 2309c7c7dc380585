"""Reports and study analyses use the runs of the spec's own cells; compare draws distinguishable curves;
estimate-noise flags extrapolation and mismatched calibration; published reports are readable by others.

Each test builds a small MLflow store of its own (no training): runs tagged the way ``pnc run`` tags them.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPTH = str(ROOT / "specs/digits_depth.yaml")
NOISE = str(ROOT / "specs/digits_noise.yaml")


def _spec(path: str, *overrides: str):
    from pnc.spec import load_spec

    return load_spec(path, list(overrides))


def _parent(spec) -> tuple[str, str]:
    """(experiment id, the study's parent run), created on first use in this store."""
    from pnc import tracking

    exp_id = tracking.experiment_id(spec.experiment)
    found = tracking.client().search_runs([exp_id], filter_string=f"tags.`{tracking.TAG_ROLE}` = 'study'")
    if found:
        return exp_id, found[0].info.run_id
    run = tracking.client().create_run(exp_id, run_name=spec.name, tags={tracking.TAG_STUDY: spec.name,
                                                                         tracking.TAG_ROLE: "study", "pnc.kind": spec.kind})
    return exp_id, run.info.run_id


def _cell_run(spec, cell, overrides: list[str], layers: dict[str, list[float]], finals: dict[str, float]) -> str:
    """A FINISHED cell run as ``pnc run SPEC --set ...`` leaves it."""
    from pnc import tracking
    from pnc.engine import cell_params, cell_tags

    exp_id, parent = _parent(spec)
    time.sleep(0.01)  # distinct start times: "newest" is well defined
    run_id = tracking.start_cell_run(exp_id, parent, cell, {**cell_tags(spec, cell), "pnc.overrides": json.dumps(overrides)})
    tracking.log_params(run_id, cell_params(spec, cell))
    tracking.log_layer_metrics(run_id, layers)
    tracking.log_metrics(run_id, finals)
    tracking.end_run(run_id)
    return run_id


def _depth_runs(spec, overrides: list[str], val: dict[str, float]) -> dict[str, str]:
    from pnc.cells import expand

    out = {}
    for cell in expand(spec):
        m = cell.model.name
        n = 4 + int(re.sub(r"\D", "", m)) // 4
        curve = [math.exp(-k / 2) for k in range(n)]
        out[m] = _cell_run(spec, cell, overrides, {"cdnv/train": curve, "nc2/train": [0.5] * n, "probe_acc/test": [0.8] * n},
                           {"val/acc": val[m], "test/holdout_acc": val[m] - 0.01, "test/acc": val[m], "train/final_acc": 1.0})
    return out


def _rows(page: str, section: str) -> list[list[str]]:
    """The body cells of the table under heading ``section``."""
    part = page.split(f"<h2>{section}</h2>", 1)[1].split("</table>", 1)[0]
    body = part.split("<tbody>", 1)[1]
    return [re.findall(r"<td>(.*?)</td>", tr, re.S) for tr in body.split("</tr>")[:-1]]


# ----------------------------------------------------------------------------- 1. runs of the spec's cells
def test_study_summary_and_report_use_only_the_spec_cells_runs(store: Path, charts, capsys) -> None:
    import pnc.report as report
    from pnc.cells import expand

    two = _spec(DEPTH, "train.epochs=2")
    four = _spec(DEPTH, "train.epochs=4", "models=[resnet20]")
    ids2, ids4 = {c.id for c in expand(two)}, {c.id for c in expand(four)}
    assert not ids2 & ids4, "a changed recipe is another cell"
    _depth_runs(two, ["train.epochs=2"], {"resnet8": 0.60, "resnet14": 0.70, "resnet20": 0.75, "resnet32": 0.72, "resnet56": 0.71})
    _depth_runs(four, ["train.epochs=4", "models=[resnet20]"], {"resnet20": 0.99})  # newest run named ...@model=resnet20

    s2 = report.study_summary(two)["details"]["efficient_depth"]["per_depth"]
    assert [(r["depth"], r["val_acc"]) for r in s2] == [(8, 0.60), (14, 0.70), (20, 0.75), (32, 0.72), (56, 0.71)], \
        "the 4-epoch resnet20 must not stand in for the 2-epoch one"
    s4 = report.study_summary(four)["details"]["efficient_depth"]["per_depth"]
    assert [(r["depth"], r["val_acc"]) for r in s4] == [(20, 0.99)]
    assert list(report.study_summary(two)["details"]["transitions"]) == ["resnet8", "resnet14", "resnet20", "resnet32", "resnet56"]

    page = (report.render_study(two, store / "reports") / "index.html").read_text()
    assert "Warning:" not in page
    rows = _rows(page, "Final accuracies per model")
    assert [r[0] for r in rows] == ["resnet8", "resnet14", "resnet20", "resnet32", "resnet56"], "models by depth, one row each"
    assert all(r[1] == "2" and r[2] == "--set train.epochs=2" for r in rows), rows
    assert "warning" not in capsys.readouterr().err


def test_report_of_a_spec_whose_cells_never_ran_falls_back_with_a_warning(store: Path, charts, capsys) -> None:
    from pnc import cli

    two = _spec(DEPTH, "train.epochs=2")
    four = _spec(DEPTH, "train.epochs=4", "models=[resnet20]")
    _depth_runs(two, ["train.epochs=2"], {"resnet8": 0.60, "resnet14": 0.70, "resnet20": 0.75, "resnet32": 0.72, "resnet56": 0.71})
    _depth_runs(four, ["train.epochs=4", "models=[resnet20]"], {"resnet20": 0.99})

    assert cli.main(["report", DEPTH, "--out", str(store / "reports")]) == 0  # the spec file: epochs 30, never run
    err = capsys.readouterr().err
    msg = "no runs of this spec's exact cells; showing the newest run of each model, trained with other settings"
    assert msg in err and "epochs 2" in err and "epochs 4" in err, err
    page = (store / "reports/digits_depth/index.html").read_text()
    assert "class='warning'" in page and msg.replace("'", "&#x27;") in page
    rows = _rows(page, "Final accuracies per model")
    assert [(r[0], r[1]) for r in rows] == [("resnet8", "2"), ("resnet14", "2"), ("resnet20", "4"), ("resnet32", "2"), ("resnet56", "2")]
    assert rows[2][2] == "--set train.epochs=4 --set models=[resnet20]"


def test_report_notes_cells_without_a_finished_run(store: Path, charts, capsys) -> None:
    import pnc.report as report
    from pnc.cells import expand

    two = _spec(DEPTH, "train.epochs=2")
    cells = expand(two)
    _cell_run(two, cells[0], ["train.epochs=2"], {"cdnv/train": [1.0, 0.5, 0.2, 0.1]}, {"val/acc": 0.5, "test/holdout_acc": 0.5})
    page = (report.render_study(two, store / "reports") / "index.html").read_text()
    assert "Warning:" not in page and "4 of 5 cells of this spec have no finished run yet" in page
    assert "4 of 5 cells" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 2. compare
def _noise_runs() -> None:
    from pnc.cells import expand

    spec = _spec(NOISE, "train.epochs=2", "models=[resnet8, resnet14]", "noise.label=[{kind: symmetric, rates: [0.0, 0.3]}]",
                 "noise.input=[{corruption: gaussian_noise, severities: [2]}]")
    for cell in expand(spec):
        lvl = 0.0 if cell.noise.is_clean else 0.3 if cell.noise.kind == "symmetric" else 0.2
        n = 4 if cell.model.name == "resnet8" else 7
        _cell_run(spec, cell, [], {"cdnv/train_noisy": [math.exp(-k + lvl) for k in range(n)],
                                   "probe_acc/test": [0.5 + 0.05 * k - lvl for k in range(n)], "nc2/train_noisy": [0.1] * n}, {})


def _encodings(chart: dict) -> list[dict]:
    """Per panel: the encoding of its lines."""
    return [p["layer"][0]["encoding"] for p in chart.get("concat", [chart])]


def test_compare_draws_each_noise_cell_as_its_own_curve_on_a_linear_axis_for_accuracy(store: Path, charts) -> None:
    import pnc.report as report

    _noise_runs()
    out = report.render_compare(["digits_noise"], store / "reports", metric="probe_acc/test")
    assert out.name == "compare-digits_noise-probe_acc_test", "a --metric comparison must not overwrite the default one"
    (enc,) = _encodings(charts[-1][1])
    assert enc["y"]["scale"]["type"] == "linear"
    assert enc["color"]["field"] == "setting" and enc["strokeDash"]["field"] == "model" and enc["detail"]["field"] == "curve"
    assert enc["color"]["sort"] == ["noise=clean", "noise=gaussian_noise:2", "noise=symmetric:0.3"]
    page = (out / "index.html").read_text()
    curves = re.findall(r"<td>(resnet\d+ noise=[^<]*)</td>", page)
    assert curves == [f"{m} noise={n}" for m in ("resnet8", "resnet14") for n in ("clean", "gaussian_noise:2", "symmetric:0.3")]

    default = report.render_compare(["digits_noise"], store / "reports")
    assert default.name == "compare-digits_noise" and out.exists()
    (enc,) = _encodings(charts[-1][1])
    assert enc["y"]["scale"]["type"] == "log", "CDNV spans decades: log axis"
    assert enc["color"]["field"] == "model", "clean CDNV only: one curve per model"


def test_compare_of_several_studies_has_a_panel_and_a_legend_per_study(store: Path, charts) -> None:
    import pnc.report as report

    _noise_runs()
    _depth_runs(_spec(DEPTH, "train.epochs=2"), [], {"resnet8": 0.6, "resnet14": 0.7, "resnet20": 0.75, "resnet32": 0.72, "resnet56": 0.71})
    with pytest.raises(Exception, match="no finished runs"):  # only the depth study has nc2/train
        report.render_compare(["digits_noise"], store / "reports", metric="nc2/train")
    out = report.render_compare(["digits_depth", "digits_noise"], store / "reports")
    chart = charts[-1][1]
    assert len(chart["concat"]) == 2 and chart["resolve"]["scale"]["color"] == "independent"
    assert [p["title"] for p in chart["concat"]] == ["digits_depth", "digits_noise"]
    assert all(e["y"]["scale"]["type"] == "log" for e in _encodings(chart))
    assert _encodings(chart)[0]["color"]["sort"] == ["resnet8", "resnet14", "resnet20", "resnet32", "resnet56"]
    assert out.name == "compare-digits_depth-digits_noise"


def test_log_axis_only_for_variability_metrics() -> None:
    from pnc.figures import log_axis

    assert log_axis("cdnv/train") and log_axis("cdnv/train_noisy") and log_axis("nc1/train")
    assert not any(log_axis(k) for k in ("probe_acc/test", "ncc_acc/test", "nc2/train", "mem_ratio/train"))


# ----------------------------------------------------------------------------- 3. estimate-noise
def _calibration(image_size: str = "16") -> None:
    """A noise study calibrated for resnet8: level = log-CDNV profile, on levels 0..5."""
    from pnc import tracking
    from pnc.cells import expand

    spec = _spec(NOISE, "models=[resnet8]", f"dataset.image_size={image_size}")
    _, parent = _parent(spec)
    _cell_run(spec, expand(spec)[0], [], {"cdnv/train_noisy": [1.0, 1.0, 1.0]}, {})
    maps = {"resnet8/gaussian_noise": {"model": "resnet8", "kind": "gaussian_noise", "intercept": 0.0, "slope": 1.0,
                                       "levels": [0.0, 3.0, 5.0], "profiles": [0.0, 3.0, 5.0], "loo_abs_errors": [0.1, 0.2, 0.3]}}
    tracking.log_json_artifact(parent, "analysis.json", {"noise_maps": maps})


def _target_run(profile: float, image_size: str = "16") -> str:
    from pnc.cells import expand

    spec = _spec(DEPTH, "models=[resnet8]", f"dataset.image_size={image_size}")
    return _cell_run(spec, expand(spec)[0], [], {"cdnv/train": [math.exp(profile)] * 5}, {})


def test_estimate_noise_flags_extrapolation_and_other_image_sizes(store: Path, capsys) -> None:
    from pnc.kinds.noise import estimate_noise_for_run

    _calibration("16")
    (row,) = estimate_noise_for_run(_target_run(52.94321, image_size="32"))
    assert row["estimate"] == 52.9 and row["extrapolated"] and row["calibrated_range"] == [0.0, 5.0]
    assert "52.9 is outside the calibrated levels 0..5: extrapolated" in row["warnings"]
    assert "the run's image size (32) differs from the calibration runs' (16)" in row["warnings"]
    err = capsys.readouterr().err
    assert "outside the calibrated levels 0..5: extrapolated" in err and "image size (32)" in err

    (row,) = estimate_noise_for_run(_target_run(2.345678))
    assert row["estimate"] == 2.35 and not row["extrapolated"] and row["warnings"] == []
    assert row["loo_mae"] == 0.2 and row["levels"] == [0.0, 3.0, 5.0]


def test_estimate_noise_refuses_a_calibration_study_that_is_not_a_noise_sweep(store: Path) -> None:
    from pnc.errors import PncError
    from pnc.kinds.noise import estimate_noise_for_run

    _calibration()
    run = _target_run(1.0)  # its study, digits_depth, now exists too
    with pytest.raises(PncError, match="digits_depth is a depth_sweep; calibrate on a noise_sweep study"):
        estimate_noise_for_run(run, "digits_depth")
    with pytest.raises(PncError, match=re.escape(f"{DEPTH} is a depth_sweep; calibrate on a noise_sweep study")):
        estimate_noise_for_run(run, DEPTH)
    with pytest.raises(PncError, match="no study 'nope'"):
        estimate_noise_for_run(run, "nope")
    assert estimate_noise_for_run(run, "digits_noise")[0]["kind"] == "gaussian_noise"


# ----------------------------------------------------------------------------- 4. permissions
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_published_report_has_the_umask_default_permissions(tmp_path: Path, mask: int) -> None:
    from pnc.figures import publish

    def fill(d: Path) -> None:
        (d / "index.html").write_text("x")
        (d / "sub").mkdir()
        (d / "sub" / "a.png").write_bytes(b"x")

    old = os.umask(mask)
    try:
        publish(tmp_path, "study", fill)
        out = publish(tmp_path, "study", fill)  # replacing a published report too
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(out) == mode(out / "sub") == 0o777 & ~mask
    assert mode(out / "index.html") == mode(out / "sub" / "a.png") == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["study"], "no temporary folder left behind"


def test_report_draws_a_panel_per_family_of_the_other_selected_metrics(store: Path, charts) -> None:
    """Metrics of the registry the spec selects beyond the Figure 1 ones get a figure per family."""
    import pnc.report as report
    from pnc.cells import expand

    spec = _spec(DEPTH, "models=[resnet8]", "measure.metrics=[cdnv, nc2, probe, equinorm, nc3, nc4]")
    (cell,) = expand(spec)
    _cell_run(spec, cell, ["models=[resnet8]"], {"cdnv/train": [1.0, 0.5, 0.2], "nc2/train": [0.5] * 3,
                                                "probe_acc/test": [0.8] * 3, "equinorm/train": [0.3, 0.2, 0.1],
                                                "nc3/train": [0.9, 0.5, 0.1], "nc4/test": [0.7, 0.8, 0.95]},
              {"val/acc": 0.8, "test/holdout_acc": 0.8, "test/acc": 0.8, "train/final_acc": 1.0})
    page = (report.render_study(spec, store / "reports") / "index.html").read_text()
    stems = [s for s, _ in charts]
    assert {"family_geometry", "family_duality", "family_agreement"} <= set(stems) and "family_variability" not in stems
    assert "Duality: classifier / class-mean duality (NC3)" in page
    geometry = dict(charts)["family_geometry"]
    assert "equinorm/train" in json.dumps(geometry)
