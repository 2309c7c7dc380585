"""``noise_sweep``: train on noisy labels or corrupted inputs, compare collapse on noisy vs clean data (sec. 4.2).

Label noise (symmetric, class-dependent, CIFAR-N human label sets) and input corruption (CIFAR-10-C formulas)
come as derived splits (DVC stage ``derive@<study>``). A label-noise cell accumulates both label vectors in one
pass; a corrupted-input cell is measured on the corrupted and on the clean images. Logged: ``cdnv/train_noisy``,
``cdnv/train_clean``, ``nc2/train_noisy``, ``mem_ratio/train`` (Delta, ``docs/metrics.md``), the memorization
layers (Delta > 1). Analyses: the noise-level map from the intermediate-layer CDNV profile, and
``pnc estimate-noise`` applying it to another run.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator

from .. import catalog
from ..catalog import model_order
from ..cells import NoiseSetting
from ..errors import PncError, did_you_mean
from ..spec import SpecBlock, StudySpecBase, Unique, no_duplicates, strings_of
from .base import CellData, model_cells
from .depth import DepthSweep

if TYPE_CHECKING:
    import pandas as pd

KEYS = [("cdnv/train_noisy", "CDNV (noisy)", True), ("nc2/train_noisy", "NC2 (noisy)", False),
        ("mem_ratio/train", "memorization ratio", True), ("probe_acc/test", "probe accuracy (test)", False)]


# ----------------------------------------------------------------------------- spec
class _RateNoiseSpec(SpecBlock):
    rates: list[float] = Field(min_length=1)

    @field_validator("rates")
    @classmethod
    def _rates(cls, v: list[float]) -> list[float]:
        bad = [r for r in v if not (0.0 <= r <= 1.0)]
        if bad:
            raise ValueError(f"rates must lie in [0, 1]; got {', '.join(map(str, bad))}")
        return no_duplicates(v)


class SymmetricNoiseSpec(_RateNoiseSpec):
    """A fraction r of training samples gets a uniformly random label (Zhang et al. 2017)."""

    kind: Literal["symmetric"]


class ClassDependentNoiseSpec(_RateNoiseSpec):
    """Each class flips with probability p to confusable classes (a seeded transition matrix)."""

    kind: Literal["class_dependent"]


class HumanNoiseSpec(SpecBlock):
    """CIFAR-10N / CIFAR-100N human label sets."""

    kind: Literal["human"]
    label_sets: Unique[str] = Field(min_length=1)


LabelNoiseSpec = Annotated[
    SymmetricNoiseSpec | ClassDependentNoiseSpec | HumanNoiseSpec, Field(discriminator="kind")
]


class InputNoiseSpec(SpecBlock):
    """CIFAR-10-C corruption applied to training images; severity 0 = clean."""

    corruption: str
    severities: list[int] = Field(min_length=1)

    @field_validator("corruption")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in catalog.CORRUPTIONS:
            raise ValueError(f"unknown corruption {v!r}.{did_you_mean(v, catalog.CORRUPTIONS)}")
        return v

    @field_validator("severities")
    @classmethod
    def _sev(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if not (0 <= s <= catalog.MAX_SEVERITY)]
        if bad:
            raise ValueError(f"severities must lie in 0..{catalog.MAX_SEVERITY} (the published range); got {bad}")
        return no_duplicates(v)


class NoiseSpec(SpecBlock):
    label: list[LabelNoiseSpec] = Field(default_factory=list)
    input: list[InputNoiseSpec] = Field(default_factory=list)
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of every derived split.")
    corrupted_test: bool = Field(
        False, description="Also measure each corrupted-input cell on the published corrupted test set at its corruption "
                           "and severity (CIFAR-10-C .npy files; cifar10 only): network and probe accuracy, NCC.")


class NoiseSweepSpec(StudySpecBase):
    """Train on noisy labels or corrupted inputs; compare collapse on noisy vs clean data (sec. 4.2)."""

    kind: Literal["noise_sweep"]
    noise: NoiseSpec


def noise_settings(spec: Any) -> list[NoiseSetting]:
    """Every distinct noise setting of a noise_sweep, clean first, in spec order."""
    clean = NoiseSetting("clean", "clean", 0)
    found: list[NoiseSetting] = []
    for ln in spec.noise.label:
        if ln.kind == "human":
            found += [clean if s == "clean" else NoiseSetting("label", "human", s) for s in ln.label_sets]
        else:
            found += [clean if r == 0 else NoiseSetting("label", ln.kind, float(r)) for r in ln.rates]
    for inp in spec.noise.input:
        found += [clean if s == 0 else NoiseSetting("input", inp.corruption, int(s)) for s in inp.severities]
    out = list(dict.fromkeys(found))  # each setting once, at its first place
    return ([clean] if clean in out else []) + [s for s in out if s != clean]


def data_key(cell: Any) -> str:
    return cell.noise.tag if cell.noise is not None else "base"


class NoiseSweep(DepthSweep):
    name = "noise_sweep"
    spec_class = NoiseSweepSpec
    params_key = "noise_studies"
    ncc_train = False
    curve_key = "cdnv/train_noisy"
    by_noise = True

    def rules(self, spec: Any) -> list[tuple[tuple, str]]:
        out: list[tuple[tuple, str]] = []
        info = spec.dataset.info
        if getattr(spec, "noise", None) is None:
            return out
        noise = spec.noise
        if not noise.label and not noise.input:
            out.append((("noise",), "a noise_sweep needs at least one entry under noise.label or noise.input"))
        for i, ln in enumerate(noise.label):
            if ln.kind is None:  # an entry that failed its own validation (partial specs only)
                continue
            allowed = catalog.LABEL_NOISE_KINDS[ln.kind]
            if allowed is not None and info.name not in allowed:
                out.append((("noise", "label", i, "kind"), f"label noise {ln.kind!r} exists only for {', '.join(allowed)}, not {info.name}"))
            elif ln.kind == "human":
                for j, s in enumerate(ln.label_sets):
                    if s is not None and s not in info.label_sets:
                        out.append((("noise", "label", i, "label_sets", j), f"{info.name} has no human label set {s!r}.{did_you_mean(s, info.label_sets)}"))
        kinds = [ln.kind for ln in noise.label if ln.kind is not None]
        for k in sorted({k for k in kinds if kinds.count(k) > 1}):
            out.append((("noise", "label"), f"label noise kind {k!r} appears twice; merge its rates into one entry"))
        if getattr(noise, "corrupted_test", False):
            if info.name != "cifar10":
                out.append((("noise", "corrupted_test"), f"a published corrupted test set exists only for cifar10 (CIFAR-10-C), "
                                                         f"not {info.name}; remove corrupted_test"))
            elif not noise.input:
                out.append((("noise", "corrupted_test"), "corrupted_test needs an entry under noise.input (a corruption to test on)"))
            else:
                for i, x in enumerate(noise.input):
                    if x.corruption is not None and x.corruption not in catalog.CIFAR10C_CORRUPTIONS:
                        out.append((("noise", "input", i, "corruption"), f"CIFAR-10-C has no {x.corruption!r} files"))
        corr = [x.corruption for x in noise.input if x.corruption is not None]
        for c in sorted({c for c in corr if corr.count(c) > 1}):
            out.append((("noise", "input"), f"corruption {c!r} appears twice; merge its severities into one entry"))
        return out

    def partial(self, data: dict) -> dict:
        from types import SimpleNamespace

        from pydantic import TypeAdapter, ValidationError

        if not isinstance(data.get("noise"), dict):
            return {"noise": None}
        # each entry on its own: one bad rate must not hide a label set that does not exist
        raw = data["noise"]
        label, inputs = [], []
        label_adapter = TypeAdapter(LabelNoiseSpec)
        for entry in raw.get("label") if isinstance(raw.get("label"), list) else []:
            try:
                label.append(label_adapter.validate_python(entry))
            except ValidationError:
                # keeps indices; an entry that fails for another reason (a duplicate label set, a bad rate) still
                # has its kind and label set names checked
                kind = entry.get("kind") if isinstance(entry, dict) else None
                sets = entry.get("label_sets") if isinstance(entry, dict) else None
                label.append(SimpleNamespace(kind=kind if isinstance(kind, str) and kind in catalog.LABEL_NOISE_KINDS else None,
                                             label_sets=strings_of(sets)))
        for entry in raw.get("input") if isinstance(raw.get("input"), list) else []:
            try:
                inputs.append(InputNoiseSpec.model_validate(entry))
            except ValidationError:
                corruption = entry.get("corruption") if isinstance(entry, dict) else None
                inputs.append(SimpleNamespace(corruption=corruption if isinstance(corruption, str)
                                              and corruption in catalog.CORRUPTIONS else None))
        noise = SimpleNamespace(label=label, input=inputs, corrupted_test=raw.get("corrupted_test") is True)
        return {"noise": noise}

    def expand(self, spec: Any) -> list:
        def settings(model: Any) -> list:
            out = []
            for ns in noise_settings(spec):
                cfg = {"noise": {"type": ns.type, "kind": ns.kind, "level": ns.level, "seed": spec.noise.seed}}
                if spec.noise.corrupted_test and ns.type == "input" and ns.level:  # measured on CIFAR-10-C too
                    cfg["noise"]["corrupted_test"] = True
                out.append(((("noise", ns.tag),), cfg, {"noise": ns}))
            return out

        return model_cells(spec, settings)

    def cell_tags(self, cell: Any) -> dict[str, str]:
        ns = cell.noise
        return {"pnc.noise": ns.tag, "pnc.noise_type": ns.type, "pnc.noise_kind": ns.kind, "pnc.noise_level": str(ns.level)}

    def cell_params(self, cell: Any) -> dict[str, str]:
        ns = cell.noise
        return {"noise.type": ns.type, "noise.kind": ns.kind, "noise.level": str(ns.level)}

    def prepare(self, spec: Any, cells: list) -> CellData:
        from ..data.registry import check_corrupted_test

        data = CellData(lambda cell: self.load_data(spec, cell), key=data_key)
        data(cells[0])
        check_corrupted_test(spec, noise_settings(spec))
        # Every other cell's data too (derived splits written and checked, e.g. a CIFAR-10N file in the wrong
        # order), then dropped: a bad file stops the study before anything trains, not hours into it.
        seen = {data_key(cells[0])}
        for cell in cells[1:]:
            if data_key(cell) not in seen:
                seen.add(data_key(cell))
                self.load_data(spec, cell)
        return data

    def derive(self, spec: Any, out_root: Path) -> list[Path]:
        from ..data.registry import materialise_derived

        return materialise_derived(spec, [ns for ns in noise_settings(spec) if not ns.is_clean], out_root)

    # ------------------------------------------------------------------ one cell
    def measure_cell(self, study: Any, model: Any, data: Any, info: dict | None = None) -> tuple[dict, list[str], dict]:
        """Label noise, and the clean cell (noisy = clean labels, so Delta should come out 1): both label vectors
        accumulated in the one pass. Corrupted inputs: one label vector, measured on the corrupted and the clean
        images (probes train on the clean ones). Delta = CDNV(clean) / CDNV(noisy) per layer."""
        from ..data.torchdata import ImageDataset
        from ..engine import measure_model

        spec = study.spec
        size, ch, k = spec.dataset.size, spec.dataset.info.channels, spec.dataset.info.num_classes
        sets = self.datasets(spec, data)
        noisy_labels = data.clean_inputs is None
        if noisy_labels:
            clean = data.clean_labels if data.clean_labels is not None else data.train.labels
            sets["train"] = ImageDataset(data.train, image_size=size, channels=ch, label_columns=[data.train.labels, clean])
        layers, names, accs = measure_model(model, spec, sets, accelerator=study.accelerator, num_classes=k,
                                            label_names=("noisy", "clean") if noisy_labels else ("train",),
                                            progress=study.progress, info=info)
        if noisy_labels:
            results = dict(layers)
        else:
            clean_ds = ImageDataset(data.clean_inputs, image_size=size, channels=ch)
            clean_layers, _, clean_accs = measure_model(model, spec, {"train": clean_ds, "test": sets["test"]},
                                                        accelerator=study.accelerator, num_classes=k, label_names=("train",),
                                                        progress=study.progress)
            results = corrupted_input_results(layers, clean_layers, data.extra_eval)
            accs["train_clean"] = clean_accs["train"]
        results.pop("memorization_layers", None)
        return results, names, accs

    def log_cell_extras(self, study: Any, run_id: str, results: dict, names: list[str], accs: dict, data: Any) -> dict:
        from .. import tracking
        from ..metrics.geometry import memorization_layers

        mem_layers = memorization_layers(results["mem_ratio/train"]) if "mem_ratio/train" in results else None
        if study.main:  # log_metrics leaves out the values that are None (no realised rate, no clean inputs)
            tracking.log_metrics(run_id, {"noise/realized_rate": data.noise_rate, "train/clean_input_acc": accs.get("train_clean")})
            if mem_layers is not None:
                tracking.log_tags(run_id, {"pnc.memorization_layers": ",".join(map(str, mem_layers)) or "none"})
                tracking.log_json_artifact(run_id, "memorization_layers.json",
                                           {"memorization_layers": mem_layers, "layer_names": [names[i] for i in mem_layers],
                                            "mem_ratio": results["mem_ratio/train"]})
            if data.manifest is not None:
                tracking.log_json_artifact(run_id, "derived_split_manifest.json", data.manifest)
        return {"memorization_layers": mem_layers}

    # ------------------------------------------------------------------ reading back
    def analyses(self, spec: Any, selection: Any = None) -> dict:
        """Noise-level maps per (model, noise kind) and their leave-one-level-out error."""
        from ..frames import RunSelection, layer_frame, run_frame

        sel = selection if selection is not None else RunSelection(spec)
        out: dict = {"metrics": {}, "tags": {}, "details": {}, "curves": {}}
        df = layer_frame(spec.experiment, ["cdnv/train_noisy"], runs=sel)
        if df.empty:
            return out
        maps, skipped = noise_maps(df, run_frame(spec.experiment, runs=sel))
        for m in maps.values():
            model, kind = m["model"], m["kind"]
            if m["loo_abs_errors"]:
                out["metrics"][f"noise_map/{model}/{kind}/loo_mae"] = float(m["loo_mae"])
            out["metrics"][f"noise_map/{model}/{kind}/slope"] = float(m["slope"])
        out["details"]["noise_maps"] = maps
        if skipped:
            out["details"]["noise_map_skipped"] = skipped
        return self.over_time(spec, sel, out)

    def headline(self, spec: Any, analyses: dict, selection: Any = None) -> dict[str, float]:
        """Final accuracies, the noise maps' errors and slopes, and per cell the number of memorization layers."""
        from .. import tracking
        from ..cells import cell_label
        from ..frames import RunSelection, run_frame

        out = super().headline(spec, analyses, selection)
        runs = run_frame(spec.experiment, runs=selection if selection is not None else RunSelection(spec))
        for _, run in runs.iterrows():
            layers = run.get("pnc.memorization_layers")
            if isinstance(layers, str):
                out[f"memorization_layers@{cell_label(run[tracking.TAG_CELL_NAME])}"] = float(0 if layers == "none" else len(layers.split(",")))
        return out

    def report(self, spec: Any, folder: Path, selection: Any) -> list[tuple[str, str]]:
        return render_noise(self, spec, folder, selection)


def corrupted_input_results(layers: dict, clean_layers: dict, extra_roles: Any = ()) -> dict[str, list]:
    """A corrupted-input cell's per-layer results from its two measurements of the same network with the same
    (training) labels: ``layers`` on the corrupted training inputs it was trained on, ``clean_layers`` on the clean
    inputs. ``<m>/train_noisy`` and ``<m>/train_clean`` per collapse metric, the probes of the clean measurement
    (and, per further test set in ``extra_roles``, the corrupted one's), and ``mem_ratio/train`` = CDNV(clean inputs)
    / CDNV(corrupted inputs) per layer through :func:`pnc.metrics.geometry.memorization_ratio`, the function of
    label-noise cells (``docs/metrics.md``: a zero denominator gives inf, or NaN for 0/0, with a MetricWarning)."""
    from ..metrics.geometry import memorization_ratio

    results = {key.replace("/train", "/train_noisy") if key.endswith("/train") else key: v for key, v in layers.items()
               if not key.startswith("probe_acc")}
    results.update({key.replace("/train", "/train_clean"): v for key, v in clean_layers.items() if key.endswith("/train")})
    results.update({key: v for key, v in clean_layers.items() if key.startswith("probe_acc")})
    for role in extra_roles:  # probes on the corrupted training inputs, scored on the published corrupted test set
        results.update({key: v for key, v in layers.items() if key.startswith("probe_acc/") and key.endswith("/" + role)})
    results["mem_ratio/train"] = memorization_ratio(results["cdnv/train_clean"], results["cdnv/train_noisy"],
                                                    denominator="corrupted inputs")
    return results


def noise_maps(df: pd.DataFrame, runs: pd.DataFrame) -> tuple[dict, list[str]]:
    """Noise-level maps per (model, noise kind) from a noise sweep's ``cdnv/train_noisy`` curves.

    The level of a label-noise cell (symmetric, class-dependent, human label sets) is the fraction of
    its training labels that differ from the clean ones, as logged (``noise/realized_rate``); the
    nominal rate is the fallback when that metric is missing (a cell of a human label set without it is
    skipped). Input corruptions use their severity; the clean cell is level 0 of every kind.
    Returns ({"model/kind": NoiseMap.as_dict()}, reasons for cells left out).
    """
    from .. import analysis

    realized: dict[str, float] = {}
    if not runs.empty and "noise/realized_rate" in runs:
        realized = {r: float(v) for r, v in zip(runs.run_id, runs["noise/realized_rate"]) if v == v}
    maps: dict[str, dict] = {}
    skipped: list[str] = []
    for model in model_order(df.model.unique()):
        dm = df[df.model == model]
        for kind in sorted(k for k in dm.noise_kind.unique() if k != "clean"):
            label_noise = kind in catalog.LABEL_NOISE_KINDS
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


def noise_chart(df: pd.DataFrame, title: str):
    """Figures 2, 6-9: rows CDNV (noisy, log), NC2, memorization ratio (Delta = 1 line), probe accuracy; columns = models."""
    import altair as alt

    from ..figures import curves
    from ..frames import noise_key

    models = df.drop_duplicates("model").sort_values("depth").model.tolist()
    levels = sorted(df.noise.unique(), key=noise_key)  # clean first, then numeric levels per kind
    grid = []
    for key, t, log in KEYS:
        if key not in set(df.metric):
            continue
        row = [curves(df[df.model == m], key, f"{t}", log, "noise", levels, rule=1.0 if key.startswith("mem_ratio") else None)
               .properties(title=m if key == KEYS[0][0] else "") for m in models]
        grid.append(alt.hconcat(*row))
    return alt.vconcat(*grid).properties(title=title)


def render_noise(kind: NoiseSweep, spec: Any, folder: Path, sel: Any) -> list[tuple[str, str]]:
    import pandas as pd

    from ..figures import figure, no_runs, save, table
    from ..frames import layer_frame, noise_key, run_frame

    keys = [k for k, _, _ in KEYS] + ["cdnv/train_clean"]
    df = layer_frame(spec.experiment, keys, runs=sel)
    if df.empty:
        raise no_runs(spec)
    sections = []
    for nk in [k for k in df.noise_kind.unique() if k != "clean"]:
        sub = df[(df.noise_kind == nk) | (df.noise == "clean")]
        stem = f"noise_{nk}"
        save(noise_chart(sub, f"{spec.name}: {nk}"), folder, stem)
        sections.append((f"{nk}: collapse on noisy data, memorization ratio, probe accuracy", figure(stem)))
    sections += family_sections(spec, folder, sel, shown=set(keys), levels=sorted(df.noise.unique(), key=noise_key))
    runs = run_frame(spec.experiment, runs=sel)
    cols = [c for c in ["pnc.model", "pnc.noise", "epochs", "overrides", "noise/realized_rate", "train/final_acc",
                        "train/clean_input_acc", "test/acc", "pnc.memorization_layers"] if c in runs]
    if cols:
        sections.append(("Memorization layers and final accuracies per cell", table(runs[cols])))
    details = kind.analyses(spec, sel)["details"]
    maps = details.get("noise_maps")
    if maps:
        def levels(v: dict) -> str:
            names = v.get("settings") or [""] * len(v["levels"])
            srcs = v.get("level_source") or [""] * len(v["levels"])
            return ", ".join(f"{n}: {x:.4g}" + (" (nominal)" if s == "nominal" and n != "clean" and v["kind"] in catalog.LABEL_NOISE_KINDS else "")
                             for n, x, s in zip(names, v["levels"], srcs))

        t = pd.DataFrame([{"model / kind": k, "slope": v["slope"], "intercept": v["intercept"],
                           "leave-one-level-out MAE": v["loo_mae"], "cells: level": levels(v)} for k, v in maps.items()])
        sections.append(("Noise-level estimation from the intermediate-layer CDNV profile",
                          "<p>Label noise is measured by each cell's realised fraction of changed training labels "
                          "(<code>noise/realized_rate</code>; human label sets included), input corruption by its severity. "
                          "The error is leave-one-level-out, in the same units.</p>" + table(t)))
    return sections + kind.report_over_time(spec, folder, sel, details)


def family_sections(spec: Any, folder: Path, sel: Any, shown: set[str], levels: list[str]) -> list[tuple[str, str]]:
    """The depth report's family panels (variability, geometry, duality, agreement) for the registry metrics the spec
    selects beyond the noise figure's, on the noisy and clean training labels and the test split (the test split's
NCC/NC4 per training label vector where there are two): a row per metric,
    a column per model, a line per noise setting; and the heatmaps of a selected matrix metric (``cdnv_matrix``) on
    the noisy training labels, a row per cell."""
    from ..figures import family_keys, family_panels
    from ..frames import layer_frame
    from .depth import matrix_sections

    # label noise: two label vectors, so NCC/NC4 on the test split per training label vector (test_noisy, test_clean)
    splits = ["train_noisy", "train_clean", "test", "test_noisy", "test_clean"]
    keys = [k for k in family_keys(spec.measure.metrics, splits) if k not in shown]
    df = layer_frame(spec.experiment, keys, runs=sel)
    models = model_order(df.model.unique()) if not df.empty else []
    order = df.sort_values(["depth", "model"], kind="stable").drop_duplicates("cell").cell.tolist() if not df.empty else None
    return (family_panels(df, keys, folder, color="noise", order=levels, facet="model", facet_order=models)
            + matrix_sections(spec, folder, sel, order, rows="cell", split="train_noisy"))


def _sig(x: Any, digits: int = 3) -> Any:
    """``x`` rounded to ``digits`` significant digits (NaN and None unchanged)."""
    if x is None or x != x or x in (float("inf"), float("-inf")):
        return x
    return float(f"{float(x):.{digits}g}")


# run params whose difference from the calibration runs' makes a noise estimate doubtful: (param, what)
_CALIBRATION_PARAMS = (("dataset.name", "dataset"), ("dataset.image_size", "image size"), ("model.name", "model"),
                       ("model.source", "model source"), ("model.cifar_stem", "model stem (model.cifar_stem)"),
                       ("model.pretrained", "pretraining"), ("model.weights", "model weights"), ("model.kwargs", "model kwargs"))


def _study_kind(c: Any, calibration: str) -> tuple[Any, str | None]:
    """(experiment, kind) of the study ``calibration`` names; kind from its spec or its parent run's ``pnc.kind`` tag."""
    from .. import tracking
    from ..frames import study_of

    label, exp_name, spec = study_of(calibration)
    exp = c.get_experiment_by_name(exp_name)
    if spec is not None:
        return exp, spec.kind
    if exp is None:
        raise PncError(f"no study {calibration!r} in {tracking.tracking_uri()}; give a {KIND.name} spec or study name")
    parents = c.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_ROLE}` = 'study'", max_results=5)
    kinds = {p.data.tags.get("pnc.kind") for p in parents} - {None}
    return exp, (kinds.pop() if len(kinds) == 1 else None)


def _calibration_mismatches(c: Any, exp: Any, run: Any, model: str) -> list[str]:
    """How ``run``'s dataset, image size and model settings differ from those of the calibration study's runs of ``model``."""
    from .. import tracking

    cal = c.search_runs([exp.experiment_id], max_results=500,
                        filter_string=f"tags.`{tracking.TAG_ROLE}` = 'cell' and tags.`pnc.model` = '{model}' "
                                      "and attributes.status = 'FINISHED'")
    out = []
    for param, what in _CALIBRATION_PARAMS:
        mine = run.data.params.get(param)
        theirs = sorted({r.data.params[param] for r in cal if param in r.data.params})
        if mine is not None and theirs and mine not in theirs:
            out.append(f"the run's {what} ({mine}) differs from the calibration runs' ({', '.join(theirs)})")
    return out


def estimate_noise_for_run(run_id: str, calibration: str | None = None, *, echo: bool = True) -> list[dict]:
    """Apply the noise maps calibrated on noise studies to one run's intermediate-layer CDNV profile.

    Each row: calibration study, model, kind, ``estimate`` (3 significant digits), ``calibrated_range``,
    ``extrapolated`` and ``warnings``: an estimate outside the calibrated levels, and a run whose dataset,
    image size or model settings differ from the calibration runs'. With ``echo`` the warnings also go to stderr.
    """
    from .. import analysis, tracking

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
    if calibration:
        exp, kind = _study_kind(c, calibration)
        if kind is not None and kind != KIND.name:
            raise PncError(f"{calibration} is a {kind}; calibrate on a {KIND.name} study (e.g. specs/digits_noise.yaml)")
        exps = [exp]
    else:
        exps = c.search_experiments()
    maps = []
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per tiny analysis.json is noise
    for exp in exps:
        if exp is None:
            continue
        for parent in c.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_ROLE}` = 'study'"):
            try:
                path = c.download_artifacts(parent.info.run_id, "analysis.json", tempfile.mkdtemp(prefix="pnc-"))
            except Exception:  # noqa: BLE001 - no analysis logged
                continue
            for _name, m in (json.loads(Path(path).read_text()).get("noise_maps") or {}).items():
                if m["model"] == model:
                    maps.append((exp, m))
    if not maps:
        where = f"study {calibration!r}" if calibration else "any noise study in this store"
        raise PncError(f"no noise calibration for model {model!r} in {where}; run a {KIND.name} with this model first "
                       "(e.g. `pnc run specs/digits_noise.yaml`)")
    out = []
    mismatch: dict[str, list[str]] = {}
    for exp, m in maps:
        nm = analysis.NoiseMap(m["model"], m["kind"], m["intercept"], m["slope"], m["levels"], m["profiles"], m["loo_abs_errors"])
        est = analysis.estimate_noise(nm, curve)
        lo, hi = (min(nm.levels), max(nm.levels)) if nm.levels else (math.nan, math.nan)
        span = hi - lo if hi == hi else 0.0
        outside = bool(nm.levels) and not (lo - 1e-9 * max(1.0, span) <= est <= hi + 1e-9 * max(1.0, span))
        warnings = []
        if outside:
            warnings.append(f"{_sig(est):g} is outside the calibrated levels {_sig(lo):g}..{_sig(hi):g}: extrapolated")
        if exp.experiment_id not in mismatch:
            mismatch[exp.experiment_id] = _calibration_mismatches(c, exp, run, model)
        warnings += mismatch[exp.experiment_id]
        out.append({"calibration": exp.name, "model": model, "kind": nm.kind, "estimate": _sig(est),
                    "calibrated_range": [_sig(lo), _sig(hi)], "extrapolated": outside, "warnings": warnings,
                    "loo_mae": _sig(nm.loo_mae), "levels": [_sig(x) for x in nm.levels], "curve_key": key})
        if echo:
            for w in warnings:
                print(f"warning: {exp.name} {nm.kind}: {w}", file=sys.stderr)
    return out


KIND = NoiseSweep()
