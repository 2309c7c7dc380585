"""The pinned environment: versions from requirements.lock (written by `make lock`, bench/make_lock.py).

Tests that hold for one version of a library (timm's model list, MLflow's UI) read that version here and say so.
"""
from __future__ import annotations

from pathlib import Path

from packaging.utils import canonicalize_name

LOCK_FILE = Path(__file__).resolve().parents[1] / "requirements.lock"


def locked_versions() -> dict[str, str]:
    """Canonical package name -> exact version, as requirements.lock pins it."""
    out = {}
    for line in LOCK_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"{LOCK_FILE}: '{line}' is not name==version (regenerate it with `make lock`)"
        out[canonicalize_name(name)] = version
    return out


def locked_version(name: str) -> str:
    return locked_versions()[canonicalize_name(name)]
