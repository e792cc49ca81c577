"""The package's layers (docs/model.md, "Architecture"): each module imports only its own layer and
the layers below it, and no import cycle exists, lazy imports (inside functions) included."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "llmqueue"
LAYERS = ("errors", "limits", "io", "model", "policies", "engines", "theory", "sim", "studies", "paper",
          "cli")
"""Bottom to top. ``errors`` and ``limits`` are modules, the rest folders; ``llmqueue/__init__.py``
(the public API, above everything) is not a layer and no module imports it."""


def _modules() -> dict[str, Path]:
    return {
        ".".join(("llmqueue", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The llmqueue modules ``path`` imports anywhere (top level, in functions, under TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        found.update(n for n in names if n.startswith("llmqueue") and n in modules)
    return found


MODULES = _modules()
GRAPH = {name: _imports(path, MODULES) for name, path in MODULES.items() if name != "llmqueue"}


def test_every_module_is_in_a_layer() -> None:
    top = sorted(p.name for p in PACKAGE.iterdir() if not p.name.startswith(("_", ".")))
    assert top == sorted([*(f"{n}.py" for n in LAYERS[:2]), *LAYERS[2:]])


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_arrow_runs_up(module: str) -> None:
    up = sorted(m for m in GRAPH[module] if m == "llmqueue" or _layer(m) > _layer(module))
    assert not up, f"{module} imports a layer above it: {up}"


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH.get(m, ())):
            if n == m or n not in GRAPH:
                continue
            if state.get(n) == 1:
                cycle = [*stack[stack.index(n):], n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_start_up_imports_no_heavy_library() -> None:
    """``import llmqueue`` and ``llmqueue --help`` load neither scipy, numba, matplotlib nor torch."""
    code = (
        "import sys, llmqueue\n"
        "from llmqueue.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('scipy', 'numba', 'matplotlib', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_the_architecture_table_lists_every_module() -> None:
    table = (PACKAGE.parents[1] / "docs" / "model.md").read_text()
    listed = set(re.findall(r"^\| [^|]+ \| `([a-z0-9_.]+)` \|", table, re.M))
    modules = {name.removeprefix("llmqueue.") for name, path in MODULES.items() if path.name != "__init__.py"}
    assert listed == modules


def test_no_test_module_imports_a_compiled_loop_at_its_top() -> None:
    """Collecting the tests loads no compiled loop's module (conftest.KERNELS): the first test
    that needs one waits for the separate compile while the kernel-free modules run; an import at
    a module's top would make collection itself wait for the whole compile."""
    from .conftest import KERNELS

    tests = sorted(p.stem for p in Path(__file__).parent.glob("test_*.py"))
    code = ("import importlib, sys\n"
            f"for name in {tests!r}:\n"
            "    importlib.import_module('tests.' + name)\n"
            f"print(sorted(set({sorted(KERNELS)!r}) & set(sys.modules)))")
    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=root, env={**os.environ, "PYTHONPATH": str(root / "src")}).stdout
    assert out.strip().splitlines()[-1] == "[]"
