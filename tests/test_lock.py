"""requirements.lock: exact versions for `make repro` / `make test`, within pyproject.toml's ranges, and the
environment the tests run in is the locked one."""
from __future__ import annotations

import importlib.util
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from lock import LOCK_FILE, locked_versions

ROOT = Path(__file__).resolve().parents[1]


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for r in project["optional-dependencies"]["test"]]
    env = default_environment()
    return [r for r in reqs if r.marker is None or r.marker.evaluate({**env, "extra": ""})]


def load_make_lock():
    spec = importlib.util.spec_from_file_location("make_lock", ROOT / "bench" / "make_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_declared_dependency_is_locked_within_its_range():
    locked = locked_versions()
    assert "rich" not in {canonicalize_name(r.name) for r in pyproject_requirements()}, "rich is never imported"
    for req in pyproject_requirements():
        name = canonicalize_name(req.name)
        assert name in locked, f"{req} is declared in pyproject.toml but not in {LOCK_FILE.name}: run `make lock`"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"{LOCK_FILE.name} pins {name}=={locked[name]}, outside pyproject.toml's '{req}': run `make lock`")


def test_installed_environment_is_the_locked_one():
    """What `make test` installed (`pip install -c requirements.lock`) is exactly the lock."""
    wrong = {}
    for name, version in locked_versions().items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have != version:
            wrong[name] = (version, have)
    assert not wrong, (f"installed versions differ from {LOCK_FILE.name} (locked, installed): {wrong}; "
                       f"reinstall with `make install` (pip install -c {LOCK_FILE.name} -e '.[test]')")


def test_lock_holds_the_whole_dependency_closure():
    """Every package pnc[test] pulls in (transitively, as installed here) is pinned: nothing floats."""
    closure = load_make_lock().closure(pyproject_requirements())
    missing = sorted(set(closure) - set(locked_versions()))
    assert not missing, f"not pinned in {LOCK_FILE.name}: {missing}; run `make lock`"


def test_closure_follows_extras_and_markers(tmp_path, monkeypatch):
    """bench/make_lock.py walks Requires-Dist: extras requested are followed, others and false markers are not."""
    for name, requires in {
        "top": ["mid[fast]", "never ; python_version < '3'"],
        "mid": ["leaf", "speedup ; extra == 'fast'", "docsy ; extra == 'docs'"],
        "leaf": [], "speedup": [], "docsy": [], "never": [],
    }.items():
        info = tmp_path / f"{name}-1.{len(name)}.dist-info"
        info.mkdir()
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: 1.{len(name)}"]
        lines += [f"Requires-Dist: {r}" for r in requires]
        (info / "METADATA").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    closure = load_make_lock().closure([Requirement("top")])
    assert closure == {"top": "1.3", "mid": "1.3", "leaf": "1.4", "speedup": "1.7"}
