"""The docs name real tests: every `file.py::test_name` (and bare `test_name`) cited in docs/reliability.md
and the README exists, so a renamed or deleted test cannot leave a guarantee pointing at nothing."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "reliability.md", ROOT / "README.md", ROOT / "docs" / "team.md"]


def _tests() -> dict[str, set[str]]:
    """{file name: names of its test functions} for every test file."""
    out: dict[str, set[str]] = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text())
        out[path.name] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    return out


def test_cited_tests_exist() -> None:
    tests = _tests()
    every = set().union(*tests.values())
    missing, cited = [], 0
    for doc in DOCS:
        text = doc.read_text()
        for file, name in re.findall(r"(test_[a-z0-9_]+\.py)::(test_[A-Za-z0-9_]+)", text):
            cited += 1
            if name not in tests.get(file, set()):
                missing.append(f"{doc.name}: {file}::{name}")
        for name in re.findall(r"`(test_[a-z0-9_]+)`", text):
            cited += 1
            if name not in every:
                missing.append(f"{doc.name}: {name}")
        for file in re.findall(r"tests/(?:reliability/)?(test_[a-z0-9_]+\.py)", text):
            if file not in tests:
                missing.append(f"{doc.name}: tests/.../{file}")
    assert cited > 20, "the reliability table cites its tests"
    assert not missing, f"docs cite tests that do not exist: {missing}"


def test_metrics_doc_table_is_the_registry() -> None:
    """docs/metrics.md's metric table is generated from the metric registry (REGISTRY.write_doc_table)."""
    from pnc.metrics.geometry import REGISTRY
    from pnc.metrics.registry import DOC_END, DOC_START

    text = (ROOT / "docs" / "metrics.md").read_text()
    table = text.partition(DOC_START)[2].partition(DOC_END)[0].strip()
    assert table == REGISTRY.doc_table(), ("docs/metrics.md is out of date: python -c \"from pnc.metrics.geometry import "
                                           "REGISTRY as R; R.write_doc_table('docs/metrics.md')\"")
