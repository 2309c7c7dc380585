"""Which files a cell reads: base splits (embedded or raw), derived noisy/corrupted splits, digests.

Embedded datasets live in ``data/embedded/<name>`` and derived splits in
``data/derived/<study>/<setting>``, both written by DVC stages (``pnc embed``, ``pnc derive``)
in pnc's split format (:mod:`pnc.data.store`). ``pnc run`` outside DVC writes a missing one the
same way, so both paths read identical bytes. The list of derived splits has one source of
truth: the noise settings of the study specs (:func:`pnc.study.noise_settings`).
"""
from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..catalog import TRAIN_FRACTION
from ..errors import DataError
from .base import ImageSplit

EMBEDDED_ROOT = Path("data") / "embedded"
DERIVED_ROOT = Path("data") / "derived"


@dataclass(frozen=True)
class DataInput:
    """One split a run read, as logged to MLflow and checked by ``pnc lineage``."""

    name: str  # e.g. "digits/train" or "digits_noise/symmetric-0.2"
    path: str  # folder or file it was read from
    digest: str
    context: str  # "training", "evaluation" or "probe"
    stage: str | None = None  # the DVC stage that writes it (embed@.., derive@..), or the .dvc file tracking raw data
    # how to find the data again: raw splits {"dataset", "domain", "split", "root", "train_fraction", "dvc_file",
    # "dvc_md5"}; derived splits {"base"}. Part of the logged source, not of the input's identity.
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def source(self) -> dict:
        """The MLflow dataset source: path, DVC stage, and ``meta`` (keys with a value)."""
        return {"uri": self.path, "dvc_stage": self.stage, **{k: v for k, v in self.meta.items() if v is not None}}


@dataclass
class CellData:
    train: ImageSplit  # what the network is trained on (labels possibly noisy, inputs possibly corrupted)
    test: ImageSplit
    clean_labels: np.ndarray | None = None  # clean labels of ``train`` when its labels are noisy
    clean_inputs: ImageSplit | None = None  # clean images of ``train`` when its inputs are corrupted
    noise_rate: float | None = None  # realised fraction of changed labels (label noise)
    manifest: dict | None = None
    inputs: list[DataInput] = field(default_factory=list)
    extra_eval: dict[str, ImageSplit] = field(default_factory=dict)  # more test sets, e.g. {"cifar10c": ...}

    def probe_inputs(self) -> list[DataInput]:
        """The inputs of a transfer-target run: the train split feeds only collapse measurement and probe fitting
        (context "probe"), the test split scores the probes ("evaluation")."""
        return [replace(i, context="probe") if i.context == "training" else i for i in self.inputs]


def setting_dirname(tag: str) -> str:
    return tag.replace(":", "-")


def _embedded_splits(name: str, domain: str | None) -> dict[str, tuple[ImageSplit, Path]]:
    from .embedded import write_embedded
    from .store import read_split

    root = EMBEDDED_ROOT / name
    base = root / domain if domain else root
    if not (base / "train" / "manifest.json").exists():
        print(f"pnc: writing embedded dataset {name} to {root} (normally the DVC stage `embed@{name}` does this)", file=sys.stderr)
        write_embedded(root, name)
    return {s: (read_split(base / s), base / s) for s in ("train", "test")}


def raw_splits(ds: Any, domain: str | None, train_fraction: float = TRAIN_FRACTION, seed: int = 0) -> dict[str, ImageSplit]:
    """The splits of a dataset's raw files, read by the loader its catalog entry names (``DatasetInfo.loader``)."""
    module, _, attr = ds.info.loader.partition(":")
    if not module:  # pragma: no cover - every non-embedded catalog entry names its loader (tests/test_loaders.py)
        raise DataError(f"no loader for dataset {ds.name!r}")
    load = getattr(importlib.import_module(module), attr)
    if ds.info.user:
        return load(ds.root, splits=ds.split_folders)
    return load(ds.root, **({"domain": domain, "train_fraction": train_fraction, "seed": seed} if ds.info.domains else {}))


def _base_splits(ds: Any, domain: str | None, train_fraction: float) -> dict[str, tuple[ImageSplit, str, str, dict]]:
    """{split: (ImageSplit, path, digest, raw)}; ``raw`` says how to reload a raw split ({} for embedded ones)."""
    from .store import split_digest

    if ds.info.embedded:
        return {s: (sp, str(p), split_digest(p), {}) for s, (sp, p) in _embedded_splits(ds.name, domain).items()}
    from .base import dvc_tracking
    from .cifar import dataset_root

    splits = raw_splits(ds, domain, train_fraction)
    dvc = dvc_tracking(dataset_root(ds.name, ds.root)) or {}
    out = {}
    for s, sp in splits.items():
        raw = {"dataset": ds.name, "domain": domain, "split": s, "root": ds.root,
               "train_fraction": train_fraction if ds.name == "office_home" else None, **dvc}
        out[s] = (sp, sp.source or str(ds.root or ""), sp.digest(), raw)
    return out


def _stage_of(path: str, raw: dict | None = None) -> str | None:
    """The DVC stage that writes ``path``; for raw data, the ``.dvc`` file that tracks it (``dvc add``)."""
    p = Path(path)
    parts = p.parts
    if len(parts) >= 3 and parts[0] == "data" and parts[1] == "embedded":
        return f"embed@{parts[2]}"
    if len(parts) >= 3 and parts[0] == "data" and parts[1] == "derived":
        return f"derive@{parts[2]}"
    return (raw or {}).get("dvc_file")


def derived_dir(study: str, tag: str, root: Path = DERIVED_ROOT) -> Path:
    return root / study / setting_dirname(tag)


def derive_one(spec: Any, setting: Any, base_train: ImageSplit, base_digest: str, out: Path, base_path: str | None = None,
               base_raw: dict | None = None) -> Path:
    """Write one derived split (idempotent: an existing, intact split is kept).

    ``base_raw`` (a raw base split: dataset, domain, split, root, train_fraction, DVC file) is recorded in the
    manifest as ``base_raw`` with the base's path and digest, so ``pnc lineage`` follows the chain down to the
    raw data; a base in pnc's split format is linked by ``base.path`` instead.
    """
    from .derive import derive_split
    from .store import read_manifest, write_split

    if (out / "manifest.json").exists():
        try:
            m = read_manifest(out)
            if m.get("base_digest") == base_digest and m.get("seed") == spec.noise.seed and (not base_raw or "base_raw" in m):
                return out
        except DataError:
            pass
    kwargs: dict[str, Any] = {"base_name": spec.dataset.name}
    if base_path and (Path(base_path) / "manifest.json").exists():
        kwargs["base_path"] = base_path
    if setting.kind == "human":
        from .cifar10n import load_cifar_n

        kwargs["label_sets"] = load_cifar_n(spec.dataset.root, dataset=spec.dataset.name, train_labels=base_train.labels)
    split, manifest = derive_split(base_train, transform=setting.kind, level=setting.level, seed=spec.noise.seed, **kwargs)
    manifest = dict(manifest, base_digest=base_digest, base_name=base_train.name, study=spec.name, setting=setting.tag)
    if base_raw:
        manifest["base_raw"] = {**{k: v for k, v in base_raw.items() if v is not None}, "path": base_path, "digest": base_digest}
    write_split(out, split, manifest)
    return out


def materialise_derived(spec: Any, settings: list, out_root: Path = DERIVED_ROOT) -> list[Path]:
    """The derived split of each noise setting of ``spec`` (the DVC stage ``derive@<study>``)."""
    train, path, digest, raw = _base_splits(spec.dataset, spec.dataset.domain, TRAIN_FRACTION)["train"]
    return [derive_one(spec, ns, train, digest, derived_dir(spec.name, ns.tag, out_root), path, raw)
            for ns in settings if not ns.is_clean]


def materialise_embedded(name: str, out_root: Path = EMBEDDED_ROOT) -> Path:
    from .embedded import write_embedded

    write_embedded(out_root / name, name)
    return out_root / name


def load_cell_data(spec: Any, cell: Any, *, domain: str | None = None) -> CellData:
    """The splits one cell trains and measures on, with their digests for MLflow/lineage. Datasets without official
    splits are split by the cell's ``train_fraction`` (its config's, else the catalog default)."""
    from .store import read_manifest, read_split, split_digest

    dom = domain if domain is not None else (cell.source if cell.source else spec.dataset.domain)
    splits = _base_splits(spec.dataset, dom, json.loads(cell.config).get("train_fraction", TRAIN_FRACTION))
    train_name, test_name = spec.dataset.train_split, spec.dataset.test
    for s in (train_name, test_name):
        if s not in splits:
            raise DataError(f"{spec.dataset.name} has no split {s!r}; found {', '.join(splits)}")
    train, tpath, tdig, traw = splits[train_name]
    test, epath, edig, eraw = splits[test_name]
    label = f"{spec.dataset.name}/{dom}" if dom else spec.dataset.name
    base_inputs = [
        DataInput(f"{label}/{train_name}", tpath, tdig, "training", _stage_of(tpath, traw), traw),
        DataInput(f"{label}/{test_name}", epath, edig, "evaluation", _stage_of(epath, eraw), eraw),
    ]
    noise = cell.noise
    if noise is None or noise.is_clean:
        return CellData(train=train, test=test, inputs=base_inputs)
    out = derived_dir(spec.name, noise.tag)
    derive_one(spec, noise, train, tdig, out, tpath, traw)
    derived = read_split(out)
    manifest = read_manifest(out)
    dig = split_digest(out)
    d_input = DataInput(f"{spec.name}/{setting_dirname(noise.tag)}", str(out), dig, "training", _stage_of(str(out)), {"base": tpath})
    base_inputs[0] = replace(base_inputs[0], context="evaluation")
    clean_labels = derived.meta.get("clean_labels", train.labels)  # read_split sets it only when the folder has them
    if noise.type == "label":
        return CellData(train=derived, test=test, clean_labels=np.asarray(clean_labels), noise_rate=manifest.get("realized_noise_rate"),
                        manifest=manifest, inputs=[d_input] + base_inputs)
    extra: dict[str, ImageSplit] = {}
    if getattr(spec.noise, "corrupted_test", False) and noise.level:
        split, c_input = corrupted_test_split(spec.dataset, noise.kind, int(noise.level))
        extra["cifar10c"] = split
        base_inputs.append(c_input)
    return CellData(train=derived, test=test, clean_inputs=train, manifest=manifest, inputs=[d_input] + base_inputs,
                    extra_eval=extra)


def check_corrupted_test(spec: Any, settings: list) -> None:
    """Open every published corrupted test set a noise study will read, so a missing file stops it at once."""
    if not spec.noise.corrupted_test:
        return
    for ns in settings:
        if ns.type == "input" and ns.level:
            corrupted_test_split(spec.dataset, ns.kind, int(ns.level))


def corrupted_test_split(ds: Any, corruption: str, severity: int) -> tuple[ImageSplit, DataInput]:
    """The published corrupted test set (CIFAR-10-C) at ``corruption`` and ``severity``, with its input record."""
    from .base import dvc_tracking
    from .cifar import dataset_root
    from .cifar10c import CIFAR10C_DIR, load_cifar10c

    folder = dataset_root(ds.name, ds.root) / CIFAR10C_DIR
    split = load_cifar10c(folder, corruption=corruption, severity=severity)
    raw = {"dataset": ds.name, "domain": None, "split": f"cifar10c:{corruption}:{severity}", "root": ds.root,
           **(dvc_tracking(folder) or dvc_tracking(dataset_root(ds.name, ds.root)) or {})}
    return split, DataInput(f"{ds.name}-c/{corruption}/{severity}", split.source, split.digest(), "evaluation",
                            _stage_of(split.source, raw), raw)
