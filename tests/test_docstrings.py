"""Every public function and class of eos_jax has a docstring with an example, and the examples run.

The examples in the experiments' docstrings run too (they need not cover every definition).

"Public" is a module's ``__all__`` when it has one, else its top-level functions and classes
whose names do not start with ``_`` and that are defined in that module (not imported).
An example is a ``>>>`` block; :mod:`doctest` runs every module's examples as a notebook
user would: under JAX's defaults (x64 off, standard dtype promotion, rank promotion
allowed), whatever the suite's own settings, with ``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``.
"""

from __future__ import annotations

import ast
import doctest
import importlib
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module_names(package: str = "eos_jax") -> list[str]:
    out = []
    for f in sorted((ROOT / package).rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


MODULES = _module_names()


def _public_defs(path: Path) -> list[tuple[str, ast.AST]]:
    tree = ast.parse(path.read_text())
    exported = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            exported = {ast.literal_eval(e) for e in node.value.elts}
    defs = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name.startswith("_") or (exported is not None and node.name not in exported):
                continue
            defs.append((node.name, node))
    return defs


def _path(module: str) -> Path:
    p = ROOT / Path(*module.split("."))
    return p / "__init__.py" if p.is_dir() else p.with_suffix(".py")


EXPERIMENT_MODULES = [m for m in _module_names("experiments") if ">>>" in _path(m).read_text()]


@pytest.mark.parametrize("module", MODULES)
def test_public_definitions_have_examples(module):
    missing = [name for name, node in _public_defs(_path(module)) if ">>>" not in (ast.get_docstring(node) or "")]
    assert not missing, f"{module}: public definitions without a '>>>' example in their docstring: {missing}"


def test_the_check_finds_a_missing_example(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        'def f():\n    """No example."""\n\ndef _g():\n    pass\n\ndef h():\n    """\n    >>> 1\n    1\n    """\n'
    )
    names = [n for n, node in _public_defs(f) if ">>>" not in (ast.get_docstring(node) or "")]
    assert names == ["f"]


@pytest.mark.parametrize("module", MODULES + EXPERIMENT_MODULES)
def test_examples_run(module):
    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(mod, module) if t.examples]
    with (
        jax.enable_x64(False),
        jax.numpy_dtype_promotion("standard"),
        jax.numpy_rank_promotion("allow"),
        jax.default_matmul_precision(None),
    ):
        for t in tests:
            runner.run(t)
    res = runner.summarize(verbose=False)
    assert res.failed == 0, f"{module}: {res.failed} of {res.attempted} doctest examples failed (see the output above)"
