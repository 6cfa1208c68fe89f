"""The import graph of eos_jax/ and experiments/ reads top-down, checked on the source text.

Pure Python: every module is parsed with :mod:`ast` (nothing is imported, nothing compiled).
Layers, from the top: ``experiments`` (studies: presets, run directories, findings, plots),
then the engine (training loop, checkpoints, plots), then the maths (models, optimizers,
curvature, data, PDE operators), then the foundation (errors, io, runtime, CLI helpers).
A module may import its own layer or a lower one, never a higher one; the library never
imports ``experiments``, ``benchmarks`` or ``tests``; and there is no import cycle among
the library's modules, counting imports inside functions too (a lazy import still makes a
cycle; the few that are kept are listed in :data:`LAZY_IMPORTS` with the reason).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("eos_jax", "experiments")

# Top-level components of eos_jax (the first name after ``eos_jax.``), lowest layer first.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("foundation", frozenset({"errors", "io", "fma", "runtime", "progress", "cli", "metrics", "distributed"})),
    (
        "maths",
        frozenset(
            {
                "eigen",
                "losses",
                "optim_torch",
                "optim_cfl",
                "optim",
                "hessian",
                "models",
                "data",
                "pde",
                "stability",
                "predict",
            }
        ),
    ),
    ("engine", frozenset({"checkpoint", "train", "plotting"})),
)
# Function-local imports of eos_jax modules that are kept, (importer, imported) -> why. None: the
# shifted convolution both layouts share lives below both (eos_jax.models.shifted).
LAZY_IMPORTS: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages."""
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """``(imported module, at module level?, line)`` for each import (``if TYPE_CHECKING`` skipped).

    ``from pkg import name`` names the submodule ``pkg.name`` when it is one, else ``pkg``.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                out.extend((a.name, top, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    out.append((sub if sub in mods else base, top, child.lineno))
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(tree, True)
    return out


MODS = _modules()
IMPORTS = {m: _imports(m, p, MODS) for m, p in MODS.items()}


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(module: str) -> int:
    if module.split(".")[0] == "experiments":
        return len(LAYERS)
    comp = _component(module)
    for i, (_, names) in enumerate(LAYERS):
        if comp in names:
            return i
    raise AssertionError(f"{module}: component {comp!r} is in no layer of LAYERS; add it where it belongs")


def _library_edges(*, lazy: bool) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODS if m.startswith("eos_jax")}
    for m in edges:
        for target, top, _ in IMPORTS[m]:
            if target in edges and target != m and (top or (lazy and (m, target) not in LAZY_IMPORTS)):
                edges[m].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
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
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_parser_sees_the_packages():
    """The graph is not empty: the checks below look at real modules and real imports."""
    assert "eos_jax.hessian" in MODS and "experiments" in MODS and "eos_jax.data.sources" in MODS
    assert ("eos_jax.errors", True) in {(t, top) for t, top, _ in IMPORTS["eos_jax.hessian"]}


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_library_does_not_import_experiments_benchmarks_or_tests():
    bad = [
        f"{m}:{line} imports {t}"
        for m, imps in IMPORTS.items()
        if m.startswith("eos_jax")
        for t, _, line in imps
        if t.split(".")[0] in ("experiments", "benchmarks", "tests", "helpers")
    ]
    assert not bad, bad


@pytest.mark.parametrize("lazy", [False, True], ids=["module-level", "with-function-local"])
def test_no_import_cycle_in_library(lazy):
    cycles = _cycles(_library_edges(lazy=lazy))
    assert not cycles, f"import cycles among eos_jax modules: {cycles}"


def _layer_violations(imports: dict[str, list[tuple[str, bool, int]]]) -> list[str]:
    """Imports of an eos_jax module of a higher layer than the importer's (within a component: allowed)."""
    bad = []
    for m, imps in imports.items():
        for t, _, line in imps:
            if t.split(".")[0] != "eos_jax" or t == "eos_jax":
                continue
            if m.startswith("eos_jax.") and _component(t) == _component(m):
                continue
            if _layer(t) > _layer(m):
                name = LAYERS[_layer(m)][0] if _layer(m) < len(LAYERS) else "experiments"
                bad.append(f"{m}:{line} ({name}) imports {t} ({LAYERS[_layer(t)][0]})")
    return bad


def test_layer_check_catches_an_import_upwards():
    assert _layer_violations({"eos_jax.hessian": [("eos_jax.train", False, 7)]}) == [
        "eos_jax.hessian:7 (maths) imports eos_jax.train (engine)"
    ]
    assert (
        _layer_violations(
            {"eos_jax.train": [("eos_jax.hessian", True, 3)], "experiments.eos.runner": [("eos_jax.train", True, 1)]}
        )
        == []
    )


def test_layers_read_top_down():
    """Every import of an eos_jax module goes to the importer's layer or a lower one."""
    bad = _layer_violations(IMPORTS)
    assert not bad, bad


def test_library_imports_at_module_top():
    """Imports of eos_jax modules inside functions are only the listed ones (each with its reason)."""
    found = {
        (m, t)
        for m, imps in IMPORTS.items()
        for t, top, _ in imps
        if not top and t.split(".")[0] in PACKAGES and t != m
    }
    assert found <= set(LAZY_IMPORTS), sorted(found - set(LAZY_IMPORTS))
    assert set(LAZY_IMPORTS) <= found, f"stale entries in LAZY_IMPORTS: {sorted(set(LAZY_IMPORTS) - found)}"


def test_package_exposes_its_public_modules_lazily():
    """``eos_jax.__all__`` lists every top-level module, each named in the module map of the
    docstring; ``eos_jax.hessian`` works after a bare ``import eos_jax``."""
    import eos_jax

    top = {p.stem for p in (ROOT / "eos_jax").glob("*.py") if p.stem != "__init__"}
    top |= {p.parent.name for p in (ROOT / "eos_jax").glob("*/__init__.py")}
    assert set(eos_jax.__all__) == top
    doc_names = {line.split()[0] for line in eos_jax.__doc__.splitlines() if line.startswith("      ")}
    assert doc_names == top, sorted(doc_names ^ top)
    assert callable(eos_jax.hessian.top_eigenvalue) and "hessian" in dir(eos_jax)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        eos_jax.nope  # noqa: B018


@pytest.mark.subprocess
def test_bare_import_loads_no_jax():
    code = "import sys, eos_jax; print(sorted(m for m in ('jax', 'flax', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_py_typed_is_shipped():
    """PEP 561: the marker file exists and setuptools installs it (package-data of ``eos_jax``)."""
    assert (ROOT / "eos_jax" / "py.typed").is_file()
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert '"eos_jax" = ["py.typed"]' in section, section


_FLAG = __import__("re").compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*\b")


def _flag_strings(path: Path) -> list[str]:
    """String constants (docstrings excluded) of ``path`` that name a command-line flag."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
            found += [f"{path.relative_to(ROOT)}:{n.lineno}: {m}" for m in _FLAG.findall(n.value)]
    return found


def test_flag_finder_finds_a_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    f = tmp_path / "m.py"
    f.write_text('"""Docs may say --resume."""\nMSG = "continue with --resume"\nOK = "resume=True, --xla_flag"\n')
    assert _flag_strings(f) == ["m.py:2: --resume"]


def test_library_messages_name_arguments_not_flags():
    """Library errors and notes say ``resume=True`` / ``data_dir=DIR``; the entry points translate them
    into their flags (``eos_jax.cli.as_flags``). Only the CLI helper module itself writes flags."""
    found = []
    for m, path in MODS.items():
        if m.startswith("eos_jax.") and m != "eos_jax.cli":
            found += _flag_strings(path)
    assert found == []
