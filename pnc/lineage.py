"""``pnc lineage RUN_ID``: from an MLflow run back through derived splits to the raw data.

For every dataset input the run logged, re-hash the data on disk and compare with the logged
digest; follow a derived split's manifest to its base split (a pnc split folder, or a raw dataset
reloaded from its files); name the DVC stage that writes each folder and the hashes ``dvc.lock``
recorded for it, and the ``.dvc`` file (``dvc add``) and md5 of raw data. Exit 0 when everything
still matches, 1 when something drifted or is missing.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .catalog import LABEL_NOISE_KINDS, TRAIN_FRACTION
from .errors import PncError


def _lock_entry(path: str) -> dict | None:
    """The dvc.lock stage whose output contains ``path``: {"stage", "out", "md5", "deps"}."""
    lock = Path("dvc.lock")
    if not lock.exists():
        return None
    import yaml

    doc = yaml.safe_load(lock.read_text()) or {}
    p = Path(path)
    for stage, entry in (doc.get("stages") or {}).items():
        for out in entry.get("outs", []) or []:
            op = Path(out["path"])
            if p == op or op in p.parents:
                deps = [{"path": d["path"], "md5": d.get("md5")} for d in entry.get("deps", []) or []]
                return {"stage": stage, "out": out["path"], "md5": out.get("md5"), "deps": deps, "cmd": entry.get("cmd")}
    return None


def _check_store_split(path: str, logged: str | None) -> dict:
    from .data.store import read_manifest, split_digest

    node: dict[str, Any] = {"path": path, "logged_digest": logged}
    p = Path(path)
    if not (p / "manifest.json").exists():
        parts = Path(path).parts
        quick = (f"`pnc embed {parts[2]}`" if parts[:2] == ("data", "embedded") and len(parts) > 2
                 else f"`dvc repro derive@{parts[2]}`" if parts[:2] == ("data", "derived") and len(parts) > 2 else "`dvc repro`")
        node.update(status="missing", message=f"{path} does not exist; re-create it with {quick} (or `dvc checkout`)")
        return node
    try:
        now = split_digest(p)
    except Exception as e:  # noqa: BLE001 - corrupt split: report it as drift
        node.update(status="drifted", message=f"cannot hash {path}: {e}")
        return node
    node["current_digest"] = now
    if logged is not None and not now.startswith(logged) and not logged.startswith(now[: len(logged)]):
        node.update(status="drifted", message=f"{path} changed since the run: logged {logged[:16]}, now {now[:16]}")
    else:
        node["status"] = "ok"
    try:
        m = read_manifest(p)
    except Exception:  # noqa: BLE001
        m = {}
    node["manifest"] = {k: m[k] for k in ("transform", "level", "seed", "realized_noise_rate", "parameters", "dataset", "domain",
                                          "source", "num_samples") if k in m}
    lock = _lock_entry(path)
    if lock:
        node["dvc"] = lock
    base = m.get("base") if isinstance(m.get("base"), dict) else None
    raw = m.get("base_raw") if isinstance(m.get("base_raw"), dict) else None
    if base and base.get("path"):
        node["base"] = _check_store_split(base["path"], base.get("split_digest") or base.get("digest"))
    elif raw and raw.get("dataset"):
        node["base"] = _check_raw(str(raw.get("path") or raw["dataset"]), raw.get("digest"), _raw_ref(raw, "", {}), raw)
    return node


def _param(params: dict, key: str) -> str | None:
    v = params.get(key)
    return None if v in (None, "None", "") else v


def _raw_ref(src: dict, name: str, params: dict) -> dict:
    """Which raw split an input is: dataset, root, domain, split, train_fraction (from the logged source, else the run's params).

    A transfer-target run (param ``transfer.target``) read the target domain; a source-training run
    (``transfer.source``) the source domain; other runs ``dataset.domain``.
    """
    if src.get("dataset"):
        ref = {k: src.get(k) for k in ("dataset", "root", "domain", "split", "train_fraction")}
    else:
        ref = {"dataset": _param(params, "dataset.name"), "root": _param(params, "dataset.root"),
               "domain": _param(params, "transfer.target") or _param(params, "transfer.source") or _param(params, "dataset.domain"),
               "split": name.rsplit("/", 1)[-1], "train_fraction": _param(params, "transfer.train_fraction")}
    ref["train_fraction"] = float(ref["train_fraction"]) if ref.get("train_fraction") is not None else TRAIN_FRACTION
    return ref


def _dvc_node(logged_file: str | None, logged_md5: str | None, folder: str | None) -> dict | None:
    """The ``.dvc`` file tracking a raw folder: its md5 now and at run time."""
    from .data.base import dvc_tracking

    now = dvc_tracking(folder) if folder else None
    if now is None and logged_file and Path(logged_file).is_file():
        now = dvc_tracking(Path(logged_file).with_suffix(""))
    if not now and not logged_file:
        return None
    return {"file": (now or {}).get("dvc_file") or logged_file, "md5": (now or {}).get("dvc_md5"), "logged_md5": logged_md5}


def _check_raw(path: str, logged: str | None, ref: dict, dvc: dict | None = None) -> dict:
    """Reload one raw split with its loader and compare its digest with ``logged``."""
    from .catalog import DATASETS

    node: dict[str, Any] = {"path": path, "logged_digest": logged, "raw": ref}
    name = ref.get("dataset")
    if name not in DATASETS or DATASETS[name].embedded:
        node.update(status="unknown", message="not a pnc split folder and no raw dataset to reload")
        return node
    from .data.cifar import dataset_root
    from .data.registry import raw_splits
    from .spec import DatasetSpec

    folder = dataset_root(name, ref.get("root"))
    dvc = dvc or {}
    logged_file = dvc.get("dvc_file") or (dvc["dvc_stage"] if str(dvc.get("dvc_stage") or "").endswith(".dvc") else None)
    d = _dvc_node(logged_file, dvc.get("dvc_md5"), str(folder))
    if d:
        node["dvc_tracked"] = d
    gone = not Path(path).exists() and not folder.exists()
    fix = f"restore it ({'`dvc checkout ' + d['file'] + '`' if d else 'see docs/datasets.md'})"
    try:
        ds = DatasetSpec(name=name, root=ref.get("root"))
        if str(ref.get("split", "")).startswith("cifar10c:"):  # a published corrupted test set
            from .data.registry import corrupted_test_split

            _, corruption, severity = ref["split"].split(":")
            now = corrupted_test_split(ds, corruption, int(severity))[0].digest()
        else:
            splits = raw_splits(ds, ref.get("domain"), ref["train_fraction"])
            if ref["split"] not in splits:
                raise PncError(f"{name} has no split {ref['split']!r}")
            now = splits[ref["split"]].digest()
    except (PncError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        status = "missing" if gone or isinstance(e, FileNotFoundError) else "drifted"
        what = "is missing" if status == "missing" else "can no longer be read"
        node.update(status=status, message=f"raw data {path} {what} ({first}); {fix}")
        return node
    node["current_digest"] = now
    if logged is None or now.startswith(logged):
        node["status"] = "ok"
    else:
        node.update(status="drifted", message=f"raw data changed: {path} logged {logged[:16]}, now {now[:16]}; {fix} "
                                              "or re-run the study on the new data")
    return node


def _is_store_split(uri: str, stage: str | None) -> bool:
    """A pnc split folder (embedded or derived, with manifest.json), as opposed to raw data in its original format."""
    from .data.registry import DERIVED_ROOT, EMBEDDED_ROOT

    p = Path(uri)
    if (p / "manifest.json").exists() or (stage or "").startswith(("embed@", "derive@")):
        return True
    return any(p == r or r in p.parents for r in (EMBEDDED_ROOT, DERIVED_ROOT))


def trace(run_id: str, depth: int = 0) -> dict:
    """The lineage of one run as a JSON-able dict with an overall ``consistent`` flag; a run that measured a logged
    model walks on to the run that trained it (``model_run``, its own lineage)."""
    from . import tracking

    c = tracking.client()
    try:
        run = c.get_run(run_id)
    except Exception as e:  # noqa: BLE001 - MLflow raises its own types for unknown ids
        raise PncError(f"no MLflow run {run_id!r} in {tracking.tracking_uri()} ({str(e).splitlines()[0]}); "
                       "list runs with `pnc ui` or set MLFLOW_TRACKING_URI") from None
    tags, params = run.data.tags, run.data.params
    inputs = []
    for di in (run.inputs.dataset_inputs if run.inputs else []):
        src = json.loads(di.dataset.source) if di.dataset.source.startswith("{") else {"uri": di.dataset.source}
        ctx = next((t.value for t in di.tags if t.key == "mlflow.data.context"), "")
        inp = {"name": di.dataset.name, "digest": di.dataset.digest, "uri": src.get("uri"), "stage": src.get("dvc_stage"), "context": ctx}
        uri = inp["uri"] or ""
        if _is_store_split(uri, inp["stage"]):
            node = _check_store_split(uri, inp["digest"])
        else:
            node = _check_raw(uri, inp["digest"], _raw_ref(src, inp["name"], params), src)
        inputs.append({**inp, "check": node})
    spec_path = tags.get(tracking.TAG_SPEC)
    spec_node: dict[str, Any] = {"path": spec_path, "logged_digest": tags.get(tracking.TAG_SPEC_DIGEST)}
    if spec_path and Path(spec_path).exists():
        try:
            from .spec import load_spec, spec_digest

            overrides = json.loads(tags.get("pnc.overrides") or "[]")
            spec_node["overrides"] = overrides
            spec_node["current_digest"] = spec_digest(load_spec(spec_path, overrides))
            spec_node["status"] = "ok" if spec_node["current_digest"] == spec_node["logged_digest"] else "changed"
        except PncError as e:
            spec_node.update(status="invalid", message=str(e).splitlines()[0])
    else:
        spec_node["status"] = "missing"
    model_uri = tags.get(tracking.TAG_MODEL_URI)
    model_run = trace(tags[tracking.TAG_MODEL_RUN], depth + 1) if tags.get(tracking.TAG_MODEL_RUN) and depth < 4 else None

    def bad(node: dict) -> list[str]:
        out = [node["message"]] if node.get("status") in ("drifted", "missing") else []
        return out + (bad(node["base"]) if "base" in node else [])

    problems = [m for i in inputs for m in bad(i["check"])] + (model_run["problems"] if model_run else [])
    return {
        "run_id": run_id, "run_name": run.info.run_name, "status": run.info.status,
        "cell": tags.get(tracking.TAG_CELL_NAME), "cell_id": tags.get(tracking.TAG_CELL),
        "git_commit": tags.get("pnc.git_commit"), "git_dirty": tags.get("pnc.git_dirty"), "pnc_version": tags.get("pnc.version"),
        "spec": spec_node, "model_uri": model_uri, "model_run": model_run, "inputs": inputs, "problems": problems,
        "consistent": not problems,
    }


def _print_node(node: dict, indent: str) -> None:
    mark = {"ok": "ok", "drifted": "DRIFTED", "missing": "MISSING"}.get(node.get("status", ""), node.get("status", "?"))
    digest = (node.get("current_digest") or node.get("logged_digest") or "")[:16]
    print(f"{indent}{node['path']}  sha256:{digest}  [{mark}]" + (f"  {node['message']}" if node.get("message") and mark != "ok" else ""))
    m = node.get("manifest") or {}
    if "transform" in m:
        label_noise = m.get("realized_noise_rate") is not None and m.get("transform") in LABEL_NOISE_KINDS
        extra = f", realised noise rate {m['realized_noise_rate']:.4f}" if label_noise else ""
        print(f"{indent}  derived: {m['transform']} level {m.get('level')} seed {m.get('seed')}{extra}")
    raw = node.get("raw")
    if raw and raw.get("dataset"):
        where = ", ".join(f"{k} {raw[k]}" for k in ("domain", "split") if raw.get(k))
        frac = f", train_fraction {raw['train_fraction']}" if raw.get("dataset") == "office_home" else ""
        print(f"{indent}  raw dataset {raw['dataset']} ({where}{frac})")
    if node.get("dvc_tracked"):
        t = node["dvc_tracked"]
        then = f" (at run time: {t['logged_md5']})" if t.get("logged_md5") and t["logged_md5"] != t.get("md5") else ""
        print(f"{indent}  tracked by DVC: {t['file']} md5 {t.get('md5') or t.get('logged_md5') or '?'}{then}")
    if node.get("dvc"):
        d = node["dvc"]
        print(f"{indent}  written by DVC stage {d['stage']} ({d['cmd']}); dvc.lock: {d['out']} md5 {d['md5']}")
        for dep in d["deps"]:
            if not dep["path"].startswith("pnc/"):
                print(f"{indent}    dep {dep['path']} md5 {dep['md5']}")
    if "base" in node:
        print(f"{indent}  from:")
        _print_node(node["base"], indent + "    ")


def _print_run(info: dict, indent: str) -> None:
    """The model a run measured (and, walking on, the run that trained it), then its data inputs."""
    if info["model_uri"]:
        print(f"{indent}model: {info['model_uri']}")
        m = info.get("model_run")
        if m:
            print(f"{indent}  trained in run {m['run_id']} ({m['cell'] or m['run_name']}, {m['status']}), "
                  f"spec {m['spec']['path']}, git {m['git_commit']}")
            _print_run(m, indent + "    ")
    for i in info["inputs"]:
        print(f"{indent}{i['context']}: {i['name']}")
        _print_node(i["check"], indent + "  ")


def lineage(run_id: str, *, as_json: bool = False) -> int:
    info = trace(run_id)
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
    else:
        print(f"run {info['run_id']} ({info['cell'] or info['run_name']}), {info['status']}")
        s = info["spec"]
        print(f"  spec {s['path']} digest {s['logged_digest']} [{s.get('status')}]")
        if s.get("overrides"):
            print(f"    with overrides: {' '.join('--set ' + o for o in s['overrides'])}")
        if s.get("status") == "changed":
            print(f"    the spec file changed since the run (digest now {s.get('current_digest')}): to reproduce the run, "
                  f"use the spec of git commit {info['git_commit']}")
        print(f"  code: pnc {info['pnc_version']}, git {info['git_commit']} (dirty: {info['git_dirty']})")
        _print_run(info, "  ")
        print("consistent: every input still has the hash the run logged" if info["consistent"]
              else "DRIFT:\n" + "\n".join(f"  - {p}" for p in info["problems"]))
    if not info["consistent"]:
        print("lineage: data drifted or missing (see above)", file=sys.stderr)
    return 0 if info["consistent"] else 1
