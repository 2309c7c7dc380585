"""Spec fuzzing: mutated specs always end in exit 1 with FILE:LINE:COL messages, never a traceback.

Mutations: dropped keys, wrong types, out-of-range and huge numbers, unknown names, unicode,
broken YAML (truncation, stray characters, bad indentation). Valid results of a mutation are
fine; they must then pass validation (exit 0) instead.
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from pnc.cli import main
from pnc.errors import SpecError
from pnc.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
POSITION = re.compile(r"^(.+?):(\d+):(\d+): ", re.M)
COUNTER = {"validate": 0, "run": 0, "valid": 0}

WEIRD_VALUES = st.one_of(
    st.integers(min_value=-10**30, max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["résnet50", "😀", "Ωmega", "", " ", "null", "~", "yes", "1e999", "-0", "\u202e"]),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _get(node, path):
    for p in path:
        node = node[p]
    return node


def _dump(doc) -> str:
    y = YAML()
    buf = io.StringIO()
    y.dump(doc, buf)
    return buf.getvalue()


@st.composite
def mutated_spec(draw) -> str:
    path = draw(st.sampled_from(SPECS))
    text = path.read_text()
    kind = draw(st.sampled_from(["drop", "retype", "rename", "text"]))
    if kind == "text":  # broken YAML: cut, insert garbage, break indentation
        lines = text.splitlines(keepends=True)
        op = draw(st.sampled_from(["truncate", "insert", "indent", "tab"]))
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        if op == "truncate":
            cut = draw(st.integers(0, len(text)))
            return text[:cut]
        if op == "insert":
            junk = draw(st.sampled_from(["{", "]", ": :", "- -", "&a *b", "!!python/object:os.system", "\x00", "'", '"', "%YAML 9"]))
            lines.insert(i, junk + "\n")
        elif op == "indent":
            lines[i] = "   " + lines[i]
        else:
            lines[i] = "\t" + lines[i]
        return "".join(lines)
    doc = YAML().load(text)
    paths = [p for p in _paths(doc) if p]
    target = draw(st.sampled_from(paths))
    parent = _get(doc, target[:-1])
    key = target[-1]
    if kind == "drop":
        del parent[key]
    elif kind == "retype":
        parent[key] = draw(WEIRD_VALUES)
    else:  # unknown key name
        if isinstance(parent, dict):
            parent[draw(st.sampled_from(["epoch", "modle", "ñame", "lr", "rates", "kind2"]))] = parent.pop(key)
        else:
            parent[key] = draw(st.sampled_from(["resnet9000", "swin_huge", "Art2", "gaussian", "clean_labels"]))
    return _dump(doc)


def _cli(args: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(args)
    return rc, err.getvalue()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text=mutated_spec())
def test_mutated_specs_fail_cleanly(tmp_path_factory, text: str) -> None:
    d = tmp_path_factory.mktemp("fuzz")
    f = d / "spec.yaml"
    f.write_text(text, encoding="utf-8")
    try:
        load_spec(f)
        valid = True
    except SpecError:
        valid = False
    rc, err = _cli(["validate", str(f)])
    COUNTER["validate"] += 1
    assert "Traceback" not in err
    if valid:
        COUNTER["valid"] += 1
        assert rc == 0, err
        return
    assert rc == 1, err
    assert POSITION.search(err), err
    assert all(m.group(1) == str(f) for m in POSITION.finditer(err)), err
    # `pnc run` stops at validation with the same messages, before importing anything heavy
    rc_run, err_run = _cli(["run", str(f)])
    COUNTER["run"] += 1
    assert rc_run == 1 and "Traceback" not in err_run and POSITION.search(err_run), err_run


KEY_PARTS = st.one_of(st.sampled_from(["train", "epochs", "noise", "seed", "foo", "models", "name", "dataset", "transfer",
                                         "label", "[0]", "[7]", "", " ", "a[1]", "x]", "[", "kind", "ñ",
                                         "a\x85b", "\u2028", "\t"]),
                      st.text(alphabet="ab.[]0 =", max_size=4))
SET_VALUES = st.one_of(st.sampled_from(["1", "abc", "", "[]", "{}", "[resnet8]", "{a: 1}", "null", "{", "- x", "a: b: c",
                                        "!!binary x", "&a *b", "1e999", "domain_transfer", "[[[[", "'"]),
                       st.text(max_size=8))


@st.composite
def override(draw) -> tuple[str, str]:
    path = draw(st.sampled_from(SPECS))
    doc = YAML().load(path.read_text())
    real = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in draw(st.sampled_from([q for q in _paths(doc) if q])))
    real = real.replace(".[", "[")
    key = draw(st.one_of(st.just(real), st.lists(KEY_PARTS, min_size=1, max_size=4).map(".".join),
                         st.builds(lambda a, b: f"{a}.{b}", st.just(real), KEY_PARTS)))
    return str(path), f"{key}={draw(SET_VALUES)}"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=override(), other=st.sampled_from(SPECS))
def test_fuzzed_overrides_fail_cleanly(case: tuple[str, str], other: Path) -> None:
    """Any --set on any spec: exit 0 or 1, every message names its file, and a second file is still checked."""
    path, ov = case
    rc, err = _cli(["validate", path, str(other), "--set", ov])
    assert rc in (0, 1) and "internal error" not in err and "Traceback" not in err, (ov, err)
    lines = [line for line in err.splitlines() if not re.match(r"^\d+ valid, \d+ invalid$", line)]
    assert all(line.startswith((path, str(other))) for line in lines), (ov, err)
    assert re.search(r"^\d+ valid, \d+ invalid$", err, re.M) or rc == 0, (ov, err)


@pytest.mark.parametrize("content", ["\x00\x01\x02", "\ufeffkind: depth_sweep\n", "a: b: c\n", "---\n---\n", "kind: !!binary x\n",
                                     "kind: depth_sweep\nname: ok\ndataset: {name: digits}\nmodels: [resnet8]\ntrain: {epochs: 1e400}\n"])
def test_odd_files(tmp_path: Path, content: str) -> None:
    f = tmp_path / "odd.yaml"
    f.write_text(content, encoding="utf-8")
    rc, err = _cli(["validate", str(f)])
    assert rc == 1 and "Traceback" not in err and POSITION.search(err), err


def test_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "latin1.yaml"
    f.write_bytes("name: caf\xe9\n".encode("latin-1"))
    rc, err = _cli(["validate", str(f)])
    assert rc == 1 and "not UTF-8" in err and POSITION.search(err)


def test_report_fuzz_counts() -> None:
    """Prints how many fuzzed specs ran (pytest -s shows it); runs last in this file."""
    print(f"fuzzed specs: {COUNTER}")
