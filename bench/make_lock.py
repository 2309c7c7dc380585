"""Write requirements.lock: the exact version of every package that `pip install -e '.[test]'` installs.

The lock is the closure of pnc's dependencies (``[project] dependencies`` and the ``test`` extra of
pyproject.toml, plus any names given on the command line), read from the environment this script runs in
(``importlib.metadata``: each installed distribution's ``Requires-Dist``, markers evaluated for this
interpreter). `make repro` and `make test` install with ``pip install -c requirements.lock``.

Regenerate with ``make lock`` (a fresh virtualenv, the newest versions pyproject.toml's ranges allow, then this
script and ``bench/make_model_names.py`` in it), or by hand in an environment you trust:

    python bench/make_lock.py [--out requirements.lock] [extra package ...]
"""
from __future__ import annotations

import argparse
import platform
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def roots(pyproject: Path, extras: tuple[str, ...] = ("test",)) -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = [Requirement(r) for r in project.get("dependencies", [])]
    for extra in extras:
        reqs += [Requirement(r) for r in project.get("optional-dependencies", {}).get(extra, [])]
    return reqs


def closure(reqs: list[Requirement]) -> dict[str, str]:
    """Canonical name -> installed version, for ``reqs`` and everything they require (transitively)."""
    env = default_environment()
    pinned: dict[str, str] = {}
    todo = [(r, "") for r in reqs]
    seen: set[tuple[str, str]] = set()
    while todo:
        req, from_extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": from_extra}):
            continue
        name = canonicalize_name(req.name)
        for extra in ("", *sorted(req.extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            try:
                dist = metadata.distribution(req.name)
            except metadata.PackageNotFoundError:
                sys.exit(f"{req.name} (required as '{req}') is not installed here: install pnc first "
                         f"(pip install -e '.[test]'), then run this script in that environment")
            pinned[name] = dist.version
            for sub in dist.requires or []:
                todo.append((Requirement(sub), extra))
    pinned.pop("pnc", None)
    return pinned


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "requirements.lock")
    ap.add_argument("extra", nargs="*", help="further packages to lock with their dependencies")
    args = ap.parse_args(argv)
    pinned = closure(roots(ROOT / "pyproject.toml") + [Requirement(e) for e in args.extra])
    header = [
        "# Exact versions of everything `pip install -e '.[test]'` installs (constraints for `make repro` / `make test`).",
        "# Regenerate with `make lock` (then commit this file and pnc/model_names.json). Do not edit by hand.",
        f"# Resolved on Python {platform.python_version()}, {sys.platform} {platform.machine()}.",
    ]
    lines = [f"{name}=={version}" for name, version in sorted(pinned.items())]
    args.out.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {args.out}: {len(lines)} packages")


if __name__ == "__main__":
    main()
