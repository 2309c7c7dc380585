"""Reports: MLflow -> tidy DataFrame -> Altair charts (offline HTML + PNG) in ``reports/<study>/``.

Reads MLflow only (never torch). Each study's report is rendered into a temporary folder and
moved into place in one rename, so an interrupted report never leaves a half-written folder.
"""
from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import PncError

DEPTH_KEYS = [("cdnv/train", "CDNV (train)", True), ("nc2/train", "NC2 (train)", False), ("probe_acc/test", "probe accuracy (test)", False)]
NOISE_KEYS = [("cdnv/train_noisy", "CDNV (noisy)", True), ("nc2/train_noisy", "NC2 (noisy)", False),
              ("mem_ratio/train", "memorization ratio", True), ("probe_acc/test", "probe accuracy (test)", False)]
TRANSFER_KEYS = [("cdnv/target", "CDNV (target)", True), ("nc2/target", "NC2 (target)", False),
                 ("probe_acc/target_test", "probe accuracy (target test)", False)]


# ----------------------------------------------------------------------------- MLflow -> DataFrame
def _runs(experiment: str, role: str) -> list:
    from . import tracking

    c = tracking.client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_ROLE}` = '{role}' and attributes.status = 'FINISHED'",
                         max_results=5000, order_by=["attributes.start_time ASC"])
    return runs


def layer_frame(experiment: str, keys: list[str], role: str = "cell") -> pd.DataFrame:
    """One row per (run, metric, layer): run_id, cell, model, noise, source, target, metric, layer, rel_depth, value."""
    from . import tracking

    rows = []
    latest: dict[str, Any] = {}
    for r in _runs(experiment, role):  # newest run per cell name wins
        latest[r.data.tags.get(tracking.TAG_CELL_NAME, r.info.run_id) + r.data.tags.get("target", "")] = r
    for r in latest.values():
        tags = r.data.tags
        for key in keys:
            if key not in r.data.metrics:
                continue
            vals = tracking.layer_history(r.info.run_id, key)
            n = len(vals)
            for layer, v in enumerate(vals):
                rows.append({
                    "run_id": r.info.run_id, "cell": tags.get(tracking.TAG_CELL_NAME, ""), "model": tags.get("pnc.model", ""),
                    "depth": int(tags.get("pnc.depth", "0") or 0), "noise": tags.get("pnc.noise", "clean"),
                    "noise_kind": tags.get("pnc.noise_kind", "clean"), "noise_level": tags.get("pnc.noise_level", "0"),
                    "source": tags.get("source", ""), "target": tags.get("target", ""),
                    "metric": key, "layer": layer, "rel_depth": layer / max(1, n - 1), "value": v,
                })
    return pd.DataFrame(rows)


def run_frame(experiment: str, role: str = "cell") -> pd.DataFrame:
    """One row per finished run: tags and final scalar metrics."""
    rows = []
    for r in _runs(experiment, role):
        row = {"run_id": r.info.run_id, **{k: v for k, v in r.data.tags.items() if k.startswith("pnc.") or k in ("source", "target")}}
        row.update({k: v for k, v in r.data.metrics.items() if "/" not in k or k.startswith(("train/", "test/", "val/", "noise/", "final/", "best/", "efficient_depth/", "noise_map/", "transfer/"))})
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- charts
def _curves(df: pd.DataFrame, key: str, title: str, log: bool, color: str, color_sort: list[str] | None,
            width: int = 220, height: int = 150, rule: float | None = None):
    import altair as alt

    d = df[df.metric == key]
    if log:
        d = d[d.value > 0]
    y = alt.Y("value:Q", title=title, scale=alt.Scale(type="log") if log else alt.Undefined)
    base = alt.Chart(d).mark_line(point=alt.OverlayMarkDef(size=18)).encode(
        x=alt.X("layer:Q", title="layer (tapped block)", axis=alt.Axis(tickMinStep=1, format="d")),
        y=y,
        color=alt.Color(f"{color}:N", sort=color_sort, title=color),
        tooltip=["cell", "layer", alt.Tooltip("value:Q", format=".4g")],
    ).properties(width=width, height=height)
    if rule is not None:
        base = base + alt.Chart(pd.DataFrame({"y": [rule]})).mark_rule(strokeDash=[4, 4], color="gray").encode(y="y:Q")
    return base


def depth_chart(df: pd.DataFrame, title: str):
    """The paper's Figure 1 layout: rows CDNV (log), NC2, probe accuracy; x = layer; one line per model."""
    import altair as alt

    order = df.drop_duplicates("model").sort_values("depth").model.tolist()
    rows = [_curves(df, k, t, log, "model", order, width=420, height=170) for k, t, log in DEPTH_KEYS if k in set(df.metric)]
    return alt.vconcat(*rows).properties(title=title)


def noise_chart(df: pd.DataFrame, title: str):
    """Figures 2, 6-9: rows CDNV (noisy, log), NC2, memorization ratio (Delta = 1 line), probe accuracy; columns = models."""
    import altair as alt

    models = df.drop_duplicates("model").sort_values("depth").model.tolist()
    levels = df.drop_duplicates("noise").sort_values(["noise_kind", "noise_level"]).noise.tolist()
    if "clean" in levels:
        levels = ["clean"] + [x for x in levels if x != "clean"]
    grid = []
    for key, t, log in NOISE_KEYS:
        if key not in set(df.metric):
            continue
        row = [_curves(df[df.model == m], key, f"{t}", log, "noise", levels, rule=1.0 if key.startswith("mem_ratio") else None)
               .properties(title=m if key == NOISE_KEYS[0][0] else "") for m in models]
        grid.append(alt.hconcat(*row))
    return alt.vconcat(*grid).properties(title=title)


def _save(chart: Any, folder: Path, stem: str) -> list[str]:
    chart.save(str(folder / f"{stem}.html"), inline=True)
    chart.save(str(folder / f"{stem}.png"), scale_factor=1.5)
    return [f"{stem}.html", f"{stem}.png"]


def _page(title: str, sections: list[tuple[str, str]]) -> str:
    body = "\n".join(f"<section><h2>{html.escape(h)}</h2>\n{content}</section>" for h, content in sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
            "img{max-width:100%}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>\n{body}\n<p><a href='../index.html'>all reports</a></p></body></html>")


def _figure(stem: str) -> str:
    return (f"<p><a href='{stem}.html'>interactive chart</a></p>"
            f"<img src='{stem}.png' alt='{html.escape(stem)}'>")


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, escape=True)


# ----------------------------------------------------------------------------- study reports
def _render_depth(spec: Any, folder: Path) -> list[tuple[str, str]]:
    df = layer_frame(spec.experiment, [k for k, _, _ in DEPTH_KEYS] + ["nc1/train", "ncc_acc/train", "ncc_acc/test"])
    if df.empty:
        raise PncError(f"no finished runs of study {spec.name!r} in MLflow ({_where()}); run `pnc run` or `dvc repro` first")
    _save(depth_chart(df, f"{spec.name}: progressive collapse by depth"), folder, "layers")
    sections = [("Per-layer collapse and probe accuracy (Figure 1 layout)", _figure("layers"))]
    extra = [k for k in ("nc1/train", "ncc_acc/train", "ncc_acc/test") if k in set(df.metric)]
    if extra:
        import altair as alt

        order = df.drop_duplicates("model").sort_values("depth").model.tolist()
        ch = alt.hconcat(*[_curves(df, k, k, k.startswith("nc1"), "model", order) for k in extra])
        _save(ch, folder, "extra")
        sections.append(("NC1 and nearest-class-centre accuracy", _figure("extra")))
    runs = run_frame(spec.experiment)
    cols = [c for c in ["pnc.model", "train/final_acc", "test/acc", "val/acc", "test/holdout_acc", "final/probe_acc_test",
                        "best/probe_acc_test"] if c in runs]
    if cols:
        sections.append(("Final accuracies per model", _table(runs[cols].sort_values(cols[0]))))
    summary = study_summary(spec)
    det = summary["details"]
    if det.get("transitions"):
        t = pd.DataFrame([{"model": m, **{k: v for k, v in d.items() if k != "slopes"},
                           "slopes (log CDNV / rel. depth)": ", ".join(f"{s:.2f}" for s in d["slopes"])}
                          for m, d in det["transitions"].items()])
        sections.append(("Transition phase (segmented fit of log CDNV; see README)", _table(t)))
    if det.get("efficient_depth"):
        e = det["efficient_depth"]
        text = (f"<p>Smallest depth whose CDNV curve shows the transition: <b>{e['transition_depth']}</b>; depth the "
                f"validation half of the test split picks: <b>{e['validation_depth']}</b>; holdout test accuracy given up by "
                f"the intrinsic choice: <b>{_fmt(e['cost'])}</b>.</p>")
        sections.append(("Efficient depth", text + _table(pd.DataFrame(e["per_depth"]))))
    return sections


def _render_noise(spec: Any, folder: Path) -> list[tuple[str, str]]:
    keys = [k for k, _, _ in NOISE_KEYS] + ["cdnv/train_clean"]
    df = layer_frame(spec.experiment, keys)
    if df.empty:
        raise PncError(f"no finished runs of study {spec.name!r} in MLflow ({_where()}); run `pnc run` or `dvc repro` first")
    sections = []
    kinds = [k for k in df.noise_kind.unique() if k != "clean"]
    for kind in kinds:
        sub = df[(df.noise_kind == kind) | (df.noise == "clean")]
        stem = f"noise_{kind}"
        _save(noise_chart(sub, f"{spec.name}: {kind}"), folder, stem)
        sections.append((f"{kind}: collapse on noisy data, memorization ratio, probe accuracy", _figure(stem)))
    runs = run_frame(spec.experiment)
    cols = [c for c in ["pnc.model", "pnc.noise", "noise/realized_rate", "train/final_acc", "train/clean_input_acc", "test/acc",
                        "pnc.memorization_layers"] if c in runs]
    if cols:
        sections.append(("Memorization layers and final accuracies per cell", _table(runs[cols].sort_values(cols[:2]))))
    maps = study_summary(spec)["details"].get("noise_maps")
    if maps:
        def levels(v: dict) -> str:
            names = v.get("settings") or [""] * len(v["levels"])
            srcs = v.get("level_source") or [""] * len(v["levels"])
            return ", ".join(f"{n}: {x:.4g}" + (" (nominal)" if s == "nominal" and n != "clean" and v["kind"] in LABEL_NOISE_KINDS else "")
                             for n, x, s in zip(names, v["levels"], srcs))

        t = pd.DataFrame([{"model / kind": k, "slope": v["slope"], "intercept": v["intercept"],
                           "leave-one-level-out MAE": v["loo_mae"], "cells: level": levels(v)} for k, v in maps.items()])
        sections.append(("Noise-level estimation from the intermediate-layer CDNV profile",
                          "<p>Label noise is measured by each cell's realised fraction of changed training labels "
                          "(<code>noise/realized_rate</code>; human label sets included), input corruption by its severity. "
                          "The error is leave-one-level-out, in the same units.</p>" + _table(t)))
    return sections


def _render_transfer(spec: Any, folder: Path) -> list[tuple[str, str]]:
    from .transfer_report import render_transfer

    return render_transfer(spec, folder)


def _where() -> str:
    from .tracking import tracking_uri

    return tracking_uri()


def publish(out: Path, name: str, fill) -> Path:
    """Render into a temporary folder beside ``out/name`` with ``fill(tmp)``, then swap it in.

    Never leaves a half-written ``out/name``: an interrupt before the swap keeps the previous
    folder; one between the two renames puts the previous folder back.
    """
    out.mkdir(parents=True, exist_ok=True)
    final = out / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    old = None
    try:
        fill(tmp)
        if final.exists():
            old = out / f".{name}-old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        if old is not None and old.exists():
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:  # interrupted between the two renames: put the previous report back
                os.replace(old, final)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def render_study(spec: Any, out: Path) -> Path:
    """Write ``out/<study>/index.html`` (+ chart HTML/PNG files) atomically; returns the folder."""

    def fill(tmp: Path) -> None:
        render = {"depth_sweep": _render_depth, "noise_sweep": _render_noise, "domain_transfer": _render_transfer}[spec.kind]
        sections = render(spec, tmp)
        (tmp / "index.html").write_text(_page(f"{spec.name} ({spec.kind})", [("About", html.escape(spec.description or ""))] + sections))

    return publish(out, spec.name, fill)


def render_index(out: Path) -> Path:
    """``out/index.html`` linking every study report found under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for d in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "index.html").exists()):
        items.append(f"<li><a href='{html.escape(d.name)}/index.html'>{html.escape(d.name)}</a></li>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>pnc reports</title></head><body>"
            "<h1>pnc reports</h1><ul>" + "\n".join(items) + "</ul></body></html>")
    path = out / "index.html"
    tmp = path.with_name(f".index.html.{os.getpid()}")
    tmp.write_text(page)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- study-level analyses
def study_summary(spec: Any) -> dict:
    """The paper's proposed analyses for one study, from MLflow: {"metrics": {...}, "tags": {...}, "details": {...}}.

    depth_sweep: transition per model and the efficient depth; noise_sweep: the per-(model, kind)
    noise-level map and its leave-one-level-out error; domain_transfer: per-layer rank correlation.
    """
    from . import analysis

    metrics: dict[str, Any] = {}
    tags: dict[str, str] = {}
    details: dict[str, Any] = {}
    if spec.kind == "depth_sweep":
        df = layer_frame(spec.experiment, ["cdnv/train"])
        runs = run_frame(spec.experiment)
        if df.empty or runs.empty:
            return {"metrics": metrics, "tags": tags, "details": details}
        rows = []
        for model, d in df.groupby("model"):
            r = runs[runs["pnc.model"] == model]
            if r.empty or "val/acc" not in r:
                continue
            r = r.iloc[-1]
            curve = d.sort_values("layer").value.tolist()
            t = analysis.detect_transition(curve)
            details.setdefault("transitions", {})[model] = t.as_dict()
            tags[f"pnc.transition.{model}"] = (f"layers {t.start}-{t.end} (confidence {t.confidence:.2f})" if t.found
                                              else f"none: {t.reason}")
            rows.append((int(d.depth.iloc[0]), model, curve, float(r["val/acc"]), float(r["test/holdout_acc"])))
        if rows:
            rows.sort()
            e = analysis.efficient_depth([x[0] for x in rows], [x[2] for x in rows], [x[3] for x in rows], [x[4] for x in rows])
            details["efficient_depth"] = e.as_dict()
            metrics["efficient_depth/validation"] = e.validation_depth
            if e.transition_depth is not None:
                metrics["efficient_depth/transition"] = e.transition_depth
                metrics["efficient_depth/test_acc_cost"] = e.cost
            tags["pnc.efficient_depth"] = (f"transition: {e.transition_depth}, validation: {e.validation_depth}, "
                                           f"cost: {e.cost if e.cost is None else round(e.cost, 4)}")
    elif spec.kind == "noise_sweep":
        df = layer_frame(spec.experiment, ["cdnv/train_noisy"])
        if df.empty:
            return {"metrics": metrics, "tags": tags, "details": details}
        maps, skipped = noise_maps(df, run_frame(spec.experiment))
        for name, m in maps.items():
            model, kind = m["model"], m["kind"]
            if m["loo_abs_errors"]:
                metrics[f"noise_map/{model}/{kind}/loo_mae"] = m["loo_mae"]
            metrics[f"noise_map/{model}/{kind}/slope"] = m["slope"]
        details["noise_maps"] = maps
        if skipped:
            details["noise_map_skipped"] = skipped
    elif spec.kind == "domain_transfer":
        corr = analysis.transfer_correlations(spec)
        details["transfer_correlation"] = corr.curves()  # per-step curves, logged to the parent run
        details["transfer"] = corr.as_dict()
        rho = [r["rho"] for r in corr.pooled if r["rho"] == r["rho"]]
        if rho:
            metrics["transfer/spearman_mean"] = sum(rho) / len(rho)
        if corr.pooled:
            last = corr.pooled[-1]
            if last["rho"] == last["rho"]:
                metrics["transfer/spearman_final_layer"] = last["rho"]
                tags["pnc.transfer_correlation"] = (f"final layer: rho {last['rho']:.2f} ({corr.level:.0%} CI {last['lo']:.2f}"
                                                    f"..{last['hi']:.2f}; n={last['n']} off-domain pairs, {last['targets']} targets)")
            else:
                tags["pnc.transfer_correlation"] = f"final layer: no rho ({last['note']})"
    return {"metrics": {k: float(v) for k, v in metrics.items() if v is not None}, "tags": tags, "details": details}


LABEL_NOISE_KINDS = ("symmetric", "class_dependent", "human")


def noise_maps(df: pd.DataFrame, runs: pd.DataFrame) -> tuple[dict, list[str]]:
    """Noise-level maps per (model, noise kind) from a noise sweep's ``cdnv/train_noisy`` curves.

    The level of a label-noise cell (symmetric, class-dependent, human label sets) is the fraction of
    its training labels that differ from the clean ones, as logged (``noise/realized_rate``); the
    nominal rate is the fallback when that metric is missing (a cell of a human label set without it is
    skipped). Input corruptions use their severity; the clean cell is level 0 of every kind.
    Returns ({"model/kind": NoiseMap.as_dict()}, reasons for cells left out).
    """
    from . import analysis

    realized: dict[str, float] = {}
    if not runs.empty and "noise/realized_rate" in runs:
        realized = {r: float(v) for r, v in zip(runs.run_id, runs["noise/realized_rate"]) if v == v}
    maps: dict[str, dict] = {}
    skipped: list[str] = []
    for model, dm in df.groupby("model"):
        for kind in sorted(k for k in dm.noise_kind.unique() if k != "clean"):
            label_noise = kind in LABEL_NOISE_KINDS
            cells = []
            for noise, dn in dm[(dm.noise_kind == kind) | (dm.noise == "clean")].groupby("noise"):
                run_id, nominal = dn.run_id.iloc[0], "0" if noise == "clean" else str(dn.noise_level.iloc[0])
                if label_noise and run_id in realized:
                    level, source = realized[run_id], "realized"
                else:
                    try:
                        level, source = float(nominal), "nominal"
                    except ValueError:
                        skipped.append(f"{model} {noise}: no noise/realized_rate logged and no numeric nominal level")
                        continue
                cells.append((level, str(noise), source, dn.sort_values("layer").value.tolist()))
            if len(cells) < 2:
                continue
            cells.sort(key=lambda c: (c[0], c[1]))
            m = analysis.fit_noise_map(model, kind, [c[0] for c in cells], [c[3] for c in cells])
            m.settings = [c[1] for c in cells]
            m.level_source = [c[2] for c in cells]
            maps[f"{model}/{kind}"] = m.as_dict()
    return maps, skipped


# ----------------------------------------------------------------------------- cross-study comparison
CURVE_KEYS = ("cdnv/train", "cdnv/train_noisy", "cdnv/target")


def _experiment_of(study: str) -> tuple[str, str]:
    """(label, experiment) for a spec path or a study/experiment name."""
    from .spec import load_spec

    if study.endswith((".yaml", ".yml")) or "/" in study:
        spec = load_spec(study)
        return spec.name, spec.experiment
    return study, study


def render_compare(studies: list[str], out: Path, metric: str | None = None) -> Path:
    """One report overlaying a per-layer metric of several studies on relative depth."""
    import altair as alt

    frames = []
    for s in studies:
        label, exp = _experiment_of(s)
        keys = [metric] if metric else list(CURVE_KEYS)
        df = pd.concat([layer_frame(exp, keys, role=r) for r in ("cell", "transfer")], ignore_index=True)
        if df.empty:
            raise PncError(f"study {label!r} has no finished runs with {', '.join(keys)} in MLflow ({_where()})")
        key = next(k for k in keys if k in set(df.metric))
        df = df[df.metric == key]
        if key == "cdnv/train_noisy":
            df = df[df.noise == "clean"] if (df.noise == "clean").any() else df
        df = df.assign(study=label, curve=df.model + df.source.map(lambda x: f" from {x}" if x else "")
                       + df.target.map(lambda x: f" on {x}" if x else ""), key=key)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    name = "compare-" + "-".join(_experiment_of(s)[0] for s in studies)

    def fill(tmp: Path) -> None:
        log = (df.value > 0).all()
        chart = alt.Chart(df).mark_line(point=alt.OverlayMarkDef(size=12)).encode(
            x=alt.X("rel_depth:Q", title="relative depth (layer / last layer)"),
            y=alt.Y("value:Q", title=", ".join(sorted(df.key.unique())), scale=alt.Scale(type="log") if log else alt.Undefined),
            color=alt.Color("study:N"), detail="curve:N", strokeDash=alt.StrokeDash("study:N"),
            tooltip=["study", "curve", "layer", alt.Tooltip("value:Q", format=".4g")],
        ).properties(width=520, height=300, title=f"{', '.join(sorted(df.key.unique()))} on relative depth")
        _save(chart, tmp, "compare")
        table = (df.sort_values("layer").groupby(["study", "key", "curve"])
                 .agg(layers=("layer", "max"), first=("value", "first"), last=("value", "last")).reset_index()
                 .rename(columns={"key": "metric"}))
        table["layers"] += 1
        (tmp / "index.html").write_text(_page(name, [("Overlay on relative depth", _figure("compare")), ("Curves", _table(table))]))

    return publish(out, name, fill)


def estimate_noise_for_run(run_id: str, calibration: str | None = None) -> list[dict]:
    """Apply the noise maps calibrated on noise studies to one run's intermediate-layer CDNV profile."""
    from . import analysis, tracking

    c = tracking.client()
    try:
        run = c.get_run(run_id)
    except Exception as e:  # noqa: BLE001
        raise PncError(f"no MLflow run {run_id!r} in {tracking.tracking_uri()} ({str(e).splitlines()[0]})") from None
    model = run.data.tags.get("pnc.model")
    key = next((k for k in ("cdnv/train_noisy", "cdnv/train") if k in run.data.metrics), None)
    if key is None or model is None:
        raise PncError(f"run {run_id} has no per-layer CDNV curve (cdnv/train or cdnv/train_noisy); is it a pnc cell run?")
    curve = tracking.layer_history(run_id, key)
    exps = [c.get_experiment_by_name(_experiment_of(calibration)[1])] if calibration else c.search_experiments()
    maps = []
    for exp in exps:
        if exp is None:
            continue
        for parent in c.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_ROLE}` = 'study'"):
            try:
                path = c.download_artifacts(parent.info.run_id, "analysis.json", tempfile.mkdtemp(prefix="pnc-"))
            except Exception:  # noqa: BLE001 - no analysis logged
                continue
            for name, m in (json.loads(Path(path).read_text()).get("noise_maps") or {}).items():
                if m["model"] == model:
                    maps.append((exp.name, m))
    if not maps:
        where = f"study {calibration!r}" if calibration else "any noise study in this store"
        raise PncError(f"no noise calibration for model {model!r} in {where}; run a noise_sweep with this model first "
                       "(e.g. `pnc run specs/digits_noise.yaml`)")
    out = []
    for exp_name, m in maps:
        nm = analysis.NoiseMap(m["model"], m["kind"], m["intercept"], m["slope"], m["levels"], m["profiles"], m["loo_abs_errors"])
        out.append({"calibration": exp_name, "model": model, "kind": nm.kind, "estimate": analysis.estimate_noise(nm, curve),
                    "loo_mae": nm.loo_mae, "levels": nm.levels, "curve_key": key})
    return out
