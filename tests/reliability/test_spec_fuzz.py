"""Spec fuzzing: mutated specs end in exit 0 or in exit 1 with FILE:LINE:COL messages, never a traceback.

Whether a mutant is valid is decided here, not by ``load_spec`` (the code under test):

- by construction where the mutation fixes it: an unknown key in a closed mapping, an unknown model or domain
  name, a NUL character are invalid; reordered keys, an inserted comment, the document re-dumped in another YAML
  style are valid (every spec in ``specs/`` is valid, ``tests/test_spec.py`` checks that);
- for the rest (a key dropped, a value of another type, out of range, huge or unicode, YAML truncated, a junk
  line, indentation broken) by the YAML grammar (ruamel's safe loader) and the spec's JSON Schema
  (``pnc/schema/study.schema.json``) through the ``jsonschema`` package: a mutant the schema rejects must be
  rejected. The schema cannot express name lookups and cross-field rules, so a mutant it accepts may still be
  rejected; then at least one message must point at the mutated key (or a key above or below it).

Every line pnc prints for an invalid spec must start ``FILE:LINE:COL:``. Hypothesis runs the ``ci`` profile
(derandomized, no example database; ``tests/conftest.py``) unless ``PNC_HYPOTHESIS_PROFILE=long`` asks for a
longer random run.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pnc.cli import main
from pnc.spec import SCHEMA_PATH

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
POSITION = re.compile(r"^(.+?):(\d+):(\d+): ", re.M)
VALIDATOR = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
UNKNOWN_KEYS = ["modle", "ñame", "kind2", "lrate", "epoch"]  # no property of the schema (checked below)
UNKNOWN_NAMES = ["resnet9000", "swin_huge", "no_such_net", "Ωmega"]  # neither a model nor a domain
EXAMPLES = max(150, settings.default.max_examples)  # the long profile asks for more

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


@dataclass
class Mutant:
    text: str
    how: str
    expected: bool | None  # True valid, False invalid, None: the schema accepts it (see the module docstring)
    path: tuple = ()  # the mutated key path, for path mutations


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


def _dump(doc, **kw) -> str:
    y = YAML(**kw)
    buf = io.StringIO()
    y.dump(doc, buf)
    return buf.getvalue()


def schema_accepts(text: str) -> bool:
    """The oracle for mutants whose validity the mutation does not fix: YAML, then the JSON Schema."""
    try:
        doc = YAML(typ="safe", pure=True).load(text)
    except YAMLError:
        return False
    except ValueError:  # e.g. a number ruamel cannot convert
        return False
    return VALIDATOR.is_valid(doc)


def _is_name(path: tuple) -> bool:
    """A model name (``models[i]`` or ``models[i].name``) or a transfer domain (``transfer.sources[i]``, ``targets``)."""
    return (len(path) >= 2 and path[0] == "models" and isinstance(path[1], int) and path[2:] in ((), ("name",))) or \
        (len(path) == 3 and path[0] == "transfer" and path[1] in ("sources", "targets") and isinstance(path[2], int))


@st.composite
def mutated_spec(draw) -> Mutant:
    path = draw(st.sampled_from(SPECS))
    text = path.read_text()
    how = draw(st.sampled_from(["drop", "retype", "unknown_key", "unknown_name", "text", "nul", "harmless"]))
    if how == "nul":
        i = draw(st.integers(0, len(text)))
        return Mutant(text[:i] + "\x00" + text[i:], how, False)  # YAML allows no NUL anywhere
    if how == "text":  # truncated, junk inserted, indentation broken: the grammar and the schema decide
        lines = text.splitlines(keepends=True)
        op = draw(st.sampled_from(["truncate", "insert", "indent", "tab"]))
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        if op == "truncate":
            out = text[:draw(st.integers(0, len(text)))]
        else:
            if op == "insert":
                junk = draw(st.sampled_from(["{", "]", ": :", "- -", "&a *b", "!!python/object:os.system", "'", '"', "%YAML 9"]))
                lines.insert(i, junk + "\n")
            elif op == "indent":
                lines[i] = "   " + lines[i]
            else:
                lines[i] = "\t" + lines[i]
            out = "".join(lines)
        return Mutant(out, f"text:{op}", None if schema_accepts(out) else False)
    doc = YAML().load(text)
    if how == "harmless":
        op = draw(st.sampled_from(["reorder", "comment", "flow", "block"]))
        if op == "comment":
            lines = text.splitlines(keepends=True)
            lines.insert(draw(st.integers(0, len(lines))), "# a comment the fuzzer added\n")
            return Mutant("".join(lines), "harmless:comment", True)
        if op == "reorder":
            maps = [p for p in _paths(doc) if isinstance(_get(doc, p), dict) and len(_get(doc, p)) > 1]
            target = _get(doc, draw(st.sampled_from(maps)))
            items = list(target.items())
            for k, _ in items:
                del target[k]
            for k, v in reversed(items):
                target[k] = v
            return Mutant(_dump(doc), "harmless:reorder", True)
        plain = YAML(typ="safe", pure=True).load(text)
        return Mutant(_dump(plain, typ="safe", pure=True) if op == "block" else json.dumps(plain), f"harmless:{op}", True)
    paths = [p for p in _paths(doc) if p and "kwargs" not in p]
    if how == "unknown_name":
        names = [p for p in paths if _is_name(p) and isinstance(_get(doc, p), str)
                 and not (isinstance(_get(doc, p[:-1]), dict) and {"factory", "uri"} & set(_get(doc, p[:-1])))]  # free labels
        if not names:
            how = "unknown_key"
        else:
            target = draw(st.sampled_from(names))
            _get(doc, target[:-1])[target[-1]] = draw(st.sampled_from(UNKNOWN_NAMES))
            return Mutant(_dump(doc), how, False, target)
    if how == "unknown_key":
        maps = [p for p in [(), *paths] if isinstance(_get(doc, p), dict) and "kwargs" not in p]
        target = draw(st.sampled_from(maps))
        mapping = _get(doc, target)
        key = draw(st.sampled_from(UNKNOWN_KEYS))
        if mapping and draw(st.booleans()):  # a key renamed
            mapping[key] = mapping.pop(draw(st.sampled_from(sorted(mapping))))
        else:  # a key added
            mapping[key] = draw(WEIRD_VALUES)
        return Mutant(_dump(doc), how, False, target + (key,))
    target = draw(st.sampled_from(paths))
    parent = _get(doc, target[:-1])
    if how == "drop":
        del parent[target[-1]]
    else:
        parent[target[-1]] = draw(WEIRD_VALUES)
    out = _dump(doc)
    return Mutant(out, how, None if schema_accepts(out) else False, target)


def _cli(args: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(args)
    return rc, err.getvalue()


def _key_path(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _related(a: str, b: str) -> bool:
    """Whether key paths ``a`` and ``b`` are equal or one lies above the other."""
    def under(x: str, y: str) -> bool:
        return x == y or x.startswith(y + ".") or x.startswith(y + "[")
    return under(a, b) or under(b, a)


def assert_positioned(err: str, f: Path) -> list[str]:
    """Every line starts FILE:LINE:COL: with this file's name; returns the key paths the messages name."""
    lines = err.splitlines()
    assert lines, "an invalid spec must say why"
    keys = []
    for line in lines:
        m = POSITION.match(line)
        assert m and m.group(1) == str(f), f"a line without FILE:LINE:COL: {line!r}"
        keys.append(line[m.end():].split(": ", 1)[0])
    return keys


def test_unknown_keys_and_names_are_unknown() -> None:
    """The by-construction invalid mutations really are: no schema property has an UNKNOWN_KEYS name, and no model
    or domain an UNKNOWN_NAMES one."""
    from pnc import catalog

    text = SCHEMA_PATH.read_text()
    assert not [k for k in UNKNOWN_KEYS if f'"{k}":' in text]
    domains = {d for info in catalog.DATASETS.values() for d in info.domains}
    assert domains and not set(UNKNOWN_NAMES) & domains
    assert not set(UNKNOWN_NAMES) & set(catalog.all_model_names())


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(m=mutated_spec())
def test_mutated_specs_fail_cleanly(tmp_path_factory, m: Mutant) -> None:
    d = tmp_path_factory.mktemp("fuzz")
    f = d / "spec.yaml"
    f.write_text(m.text, encoding="utf-8")
    rc, err = _cli(["validate", str(f)])
    assert "Traceback" not in err and "internal error" not in err, err
    if m.expected is True:
        assert rc == 0, (m.how, err)
        return
    if m.expected is False:
        assert rc == 1, (m.how, m.path, "pnc accepted a spec invalid by construction or by the JSON Schema")
    elif rc == 0:
        return  # the schema accepts it and so does pnc
    assert rc == 1, err
    keys = assert_positioned(err, f)
    if m.expected is None and m.path:  # rejected by a rule the schema cannot express: it names the mutated key
        assert any(_related(k, _key_path(m.path)) for k in keys), (m.how, m.path, err)
    # `pnc run` stops at validation with the same messages, before importing anything heavy
    rc_run, err_run = _cli(["run", str(f)])
    assert rc_run == 1 and "Traceback" not in err_run, err_run
    assert assert_positioned(err_run, f) == keys


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


@settings(max_examples=max(200, settings.default.max_examples), deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
                                     "!!python/object:os.system\nkind: depth_sweep\nname: ok\ndataset: {name: digits}\nmodels: [resnet8]\n",
                                     "kind: depth_sweep\nname: ok\ndataset: !custom {name: digits}\nmodels: [resnet8]\n",
                                     "kind: depth_sweep\nname: ok\ndataset: {name: digits}\nmodels: [resnet8]\ntrain: {epochs: 1e400}\n"])
def test_odd_files(tmp_path: Path, content: str) -> None:
    f = tmp_path / "odd.yaml"
    f.write_text(content, encoding="utf-8")
    rc, err = _cli(["validate", str(f)])
    assert rc == 1 and "Traceback" not in err, err
    assert_positioned(err, f)


def test_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "latin1.yaml"
    f.write_bytes("name: caf\xe9\n".encode("latin-1"))
    rc, err = _cli(["validate", str(f)])
    assert rc == 1 and "not UTF-8" in err
    assert_positioned(err, f)
