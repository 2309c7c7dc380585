"""The DVC pipeline: params.yaml agrees with the specs; every stage names files that exist."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from pnc.registry import KINDS
from pnc.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_params_agree_with_specs() -> None:
    p = params()
    kinds = {k.params_key: k.name for k in KINDS.all()}  # each registered kind has its group in params.yaml
    listed = []
    for key, kind in kinds.items():
        assert key in p, f"params.yaml has no {key} group for the {kind} studies"
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


def test_every_embedded_spec_is_in_the_pipeline() -> None:
    """No embedded study is left out of `dvc repro` by forgetting params.yaml (the specs are the source of truth)."""
    p = params()
    for path in sorted((ROOT / "specs").glob("*.yaml")):
        spec = load_spec(path)
        if spec.dataset.info.embedded:
            assert spec.name in p["studies"], f"{path.name} runs on embedded data but params.yaml does not list it"


def test_dvc_repro_derives_the_noise_splits_once_and_locks_them(tmp_path) -> None:
    """`dvc repro derive@digits_noise` on a fresh copy writes every derived split the spec asks for, records its
    hash in dvc.lock, and a second repro reuses it (nothing re-run, same bytes)."""
    import json
    import os
    import shutil

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(ROOT / "pnc", repo / "pnc", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "specs", repo / "specs")
    for f in ("pyproject.toml", "dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / f, repo / f)
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PNC_DATA_ROOT", None)
    dvc = str(bin_dir / "dvc")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=600)

    assert run("git", "init", "-q").returncode == 0
    assert run(dvc, "init", "-q").returncode == 0
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    first = run(dvc, "repro", "derive@digits_noise")
    assert first.returncode == 0, first.stdout + first.stderr
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    (out,) = lock["derive@digits_noise"]["outs"]
    assert out["path"] == "data/derived/digits_noise" and out["md5"].endswith(".dir") and out["nfiles"] > 0
    assert "embed@digits" in lock, "the derived splits' lineage starts at the embedded dataset's stage"
    spec = load_spec(repo / "specs" / "digits_noise.yaml")
    from pnc.kinds.noise import noise_settings

    tags = sorted(n.tag.replace(":", "-") for n in noise_settings(spec) if n.tag != "clean")
    on_disk = sorted(p.name for p in (repo / "data" / "derived" / "digits_noise").iterdir() if p.is_dir())
    assert on_disk == tags, "one derived split per noise setting of the spec, and nothing else"
    for t in tags:
        manifest = json.loads((repo / "data" / "derived" / "digits_noise" / t / "manifest.json").read_text())
        assert manifest["base_digest"] and "seed" in manifest
    before = {p: p.read_bytes() for p in (repo / "data" / "derived").rglob("*") if p.is_file()}
    again = run(dvc, "repro", "derive@digits_noise")
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout, again.stdout + again.stderr
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["derive@digits_noise"]["outs"][0]["md5"] == out["md5"]
    assert {p: p.read_bytes() for p in (repo / "data" / "derived").rglob("*") if p.is_file()} == before
