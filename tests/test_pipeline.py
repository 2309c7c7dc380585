"""The DVC pipeline: params.yaml agrees with the specs; every stage names files that exist."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from pnc.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_params_agree_with_specs() -> None:
    p = params()
    kinds = {"depth_studies": "depth_sweep", "noise_studies": "noise_sweep", "transfer_studies": "domain_transfer"}
    listed = []
    for key, kind in kinds.items():
        for name, entry in p[key].items():
            spec = load_spec(ROOT / "specs" / f"{name}.yaml")
            assert spec.kind == kind, f"params.yaml lists {name} under {key} but it is a {spec.kind}"
            assert spec.dataset.name == entry["dataset"], f"params.yaml: {name} reads {spec.dataset.name}, not {entry['dataset']}"
            assert spec.dataset.info.embedded and spec.dataset.name in p["embedded"]
            listed.append(name)
    assert sorted(listed) == sorted(p["studies"]), "params.yaml 'studies' must list every study stage"


def test_stage_dependencies_exist() -> None:
    r = subprocess.run([str(Path(sys.executable).with_name("dvc")), "stage", "list", "--all"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    stages = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    p = params()
    for name in p["studies"]:
        assert f"report@{name}" in stages
    for ds in p["embedded"]:
        assert f"embed@{ds}" in stages
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for stage in dvc["stages"].values():
        for dep in stage["do"].get("deps", []):
            if dep.startswith("pnc/"):
                assert (ROOT / dep).exists(), f"dvc.yaml names {dep}, which does not exist"
