"""The shape of the code: imports point one way (no cycles, counting imports inside functions), study kinds are
named only by their own module and the registry, and `pnc --help` / `pnc validate` stay free of torch and MLflow."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from pnc.registry import KINDS

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pnc"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every pnc module ``name`` imports, at module level or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from x import y`: the module x.y when it is one, else x itself
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_pnc() -> None:
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert graph["pnc.engine"] and "pnc.cells" in graph["pnc.frames"], "the import walker sees imports"
    assert cycles(graph) == [], "import cycles (imports inside functions count)"


def test_presentation_is_not_imported_by_execution() -> None:
    known = modules()
    for name in ("pnc.engine", "pnc.train", "pnc.features", "pnc.tracking", "pnc.results", "pnc.analysis"):
        bad = imports_of(name, known[name], known) & {"pnc.report", "pnc.figures", "pnc.frames"}
        assert not bad, f"{name} imports {bad}"
    assert imports_of("pnc.analysis", known["pnc.analysis"], known) == set(), "analysis.py stays pure (numpy/scipy)"


def dispatch_strings(path: Path) -> list[tuple[int, str]]:
    """String constants (not docstrings) with a flag: dispatched on a kind (compared with ``kind`` / ``x.kind``, or
    keys of a dict literal looked up by it) or not (NUL-prefixed). Kind names that no English word shares
    (``depth_sweep``) count anywhere; ``measure`` is also the spec's measurement block, so it counts in dispatch only."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    def is_kind(x: ast.AST) -> bool:
        return isinstance(x, ast.Attribute) and x.attr == "kind" or isinstance(x, ast.Name) and x.id == "kind"

    compared: set[int] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Compare) and any(is_kind(x) for x in [n.left, *n.comparators]):  # kind == / in ...
            for side in [n.left, *n.comparators]:
                compared |= {id(x) for x in ast.walk(side)}
        elif isinstance(n, ast.Subscript) and isinstance(n.value, ast.Dict) and is_kind(n.slice):  # {...}[kind]
            compared |= {id(k) for k in n.value.keys if k is not None}
        elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Dict)
              and any(is_kind(a) for a in n.args)):  # {...}.get(kind)
            compared |= {id(k) for k in n.func.value.keys if k is not None}
    return [(n.lineno, n.value if id(n) in compared else f"\0{n.value}") for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_study_kinds_are_named_only_by_their_module_and_the_registry() -> None:
    owner = {name: PKG / (KINDS.entries[name].split(":")[0].replace(".", "/")[len("pnc/"):] + ".py") for name in KINDS.names()}
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "registry.py":
            continue
        for line, text in dispatch_strings(path):
            for name, home in owner.items():
                dispatch = text == name  # compared, or a dict key (texts of other constants start with NUL)
                if (dispatch or "_" in name and name in text) and path != home:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {text.lstrip(chr(0))[:60]!r}")
    assert not bad, "study-kind names outside their module:\n" + "\n".join(bad)


def test_every_registered_kind_implements_the_protocol() -> None:
    from pnc.kinds.base import StudyKind

    for name in KINDS.names():
        kind = KINDS.get(name)
        assert isinstance(kind, StudyKind) and kind.name == name
        assert kind.spec_class.model_fields["kind"].annotation.__args__ == (name,)
        for method in ("expand", "prepare", "run_cell", "report"):
            assert getattr(type(kind), method) is not getattr(StudyKind, method), f"{name} does not implement {method}"


def test_cli_start_up_imports_neither_torch_nor_mlflow() -> None:
    code = ("import sys; from pnc.cli import main; main(['validate', 'specs/digits_depth.yaml']); "
            "print(sorted(m for m in ('torch', 'mlflow', 'pandas', 'altair') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_ruff_is_clean() -> None:
    """ruff (configured in pyproject.toml) on pnc/, tests/ and bench/."""
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "pnc", "tests", "bench"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_dataset_with_raw_files_names_a_loader_that_exists() -> None:
    import importlib

    from pnc.catalog import DATASETS

    for d in DATASETS.values():
        if d.embedded:
            continue
        module, _, attr = d.loader.partition(":")
        assert callable(getattr(importlib.import_module(module), attr, None)), f"{d.name}: loader {d.loader!r}"
