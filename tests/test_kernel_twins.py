"""The compiled kernels' twin tables: every numba function of ``llmqueue.engines.kernel``,
``llmqueue.engines.netkernel`` and ``llmqueue.engines.polkernel`` is paired with the Python function
or method it ports (or with a note saying why it has none), and every named twin exists, so a
rename on either side shows up here.

Read by parsing the source (no numba needed: the tables are plain data, but the modules import numba)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from .helpers import ROOT

KERNEL_FILES = ("kernel.py", "netkernel.py", "polkernel.py")


def _module(name: str) -> ast.Module:
    return ast.parse((Path(ROOT) / "src" / "llmqueue" / "engines" / name).read_text())


def _njit_functions(tree: ast.Module) -> set[str]:
    """Names of the module-level functions decorated with ``@njit`` (with or without arguments)."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                target = deco.func if isinstance(deco, ast.Call) else deco
                if isinstance(target, ast.Name) and target.id == "njit":
                    found.add(node.name)
    return found


def _twins(tree: ast.Module) -> dict[str, tuple[str | None, str]]:
    """The module's ``TWINS`` table, evaluated from its source with the module's string constants."""
    names: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                names[node.targets[0].id] = eval(compile(ast.Expression(node.value), "<twins>", "eval"),
                                                 {"__builtins__": {}}, dict(names))
            except Exception:  # arrays, ranges of other names: not needed here
                continue
        named = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        if named and node.target.id == "TWINS":
            assert node.value is not None
            return eval(compile(ast.Expression(node.value), "<twins>", "eval"), {"__builtins__": {}}, names)
    raise AssertionError("no TWINS table")


def _resolve(twin: str) -> object:
    """``"package.module:Qual.name"`` -> the attribute (import the module, then a getattr chain)."""
    module_name, _, qualname = twin.partition(":")
    value: object = importlib.import_module(module_name)
    for part in qualname.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("name", KERNEL_FILES)
def test_every_compiled_function_has_an_entry_and_no_entry_is_stale(name: str) -> None:
    tree = _module(name)
    njit, twins = _njit_functions(tree), _twins(tree)
    assert njit, f"{name}: no @njit function found"
    assert sorted(njit - twins.keys()) == [], f"{name}: compiled functions missing from TWINS"
    assert sorted(twins.keys() - njit) == [], f"{name}: TWINS entries with no compiled function"


@pytest.mark.parametrize("name", KERNEL_FILES)
def test_every_twin_exists_and_every_kernel_only_helper_says_why(name: str) -> None:
    for function, (twin, note) in _twins(_module(name)).items():
        if twin is None:
            assert note.strip(), f"{name}: {function} has no twin and no note saying why"
            continue
        assert ":" in twin, f"{name}: {function}'s twin {twin!r} is not 'module:qualified.name'"
        assert callable(_resolve(twin)), f"{name}: {function}'s twin {twin} is not a function"


def test_the_tables_are_the_modules_own() -> None:
    """The parsed tables are the ones the modules define (when numba is there to import them)."""
    pytest.importorskip("numba")
    for name in KERNEL_FILES:
        module = importlib.import_module(f"llmqueue.engines.{name.removesuffix('.py')}")
        assert _twins(_module(name)) == module.TWINS
