"""Test settings: hypothesis profiles (derandomized in CI, so the suite never flakes), and numba's
event loops compiled once per session, ahead of the tests that use them, reported in the summary.

Hypothesis profiles, chosen with the environment variable ``LLMQUEUE_HYPOTHESIS``:

- ``ci`` (the default): derandomized (each property's examples are fixed by its name, so a run is
  repeatable), no example database, ``CI_EXAMPLES`` examples per property plus the explicit
  ``@example`` cases of the tricky situations (tests/helpers.py).
- ``thorough``: random examples, ten times as many (``LLMQUEUE_HYPOTHESIS=thorough pytest``),
  for longer local runs; a failure prints the blob that reproduces it.

numba: with a cold cache (a fresh clone, or engines/kernel.py, polkernel.py or netkernel.py edited) the
compiled event loops (``KERNELS``) take about a minute and a half to compile. A process of its own
compiles them (``helpers.warm_up``, filling numba's on-disk cache), the single-engine loop first
and then the network loop, while the modules that never touch a compiled loop run first, then the
single-engine modules, then the network ones (``NETWORK_MODULES``); a test waits for the stage it
needs (outside any test's timing) and loads the compiled code from the cache. With numba's cache
up to date nothing of this happens (loading takes a fraction of a second); ``LLMQUEUE_WARMUP=0``
turns it off (each process then compiles on first use, as numba does).
"""

from __future__ import annotations

import importlib.abc
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from .helpers import CI_EXAMPLES, ENGINE_READY, ROOT, SHARED_DATA

__all__ = ["ROOT", "SHARED_DATA"]  # re-exported: some test modules import them from here

_COMMON = dict(database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("ci", derandomize=True, max_examples=CI_EXAMPLES, **_COMMON)
settings.register_profile("thorough", derandomize=False, max_examples=10 * CI_EXAMPLES, **_COMMON)
PROFILE = os.environ.get("LLMQUEUE_HYPOTHESIS", "ci").strip() or "ci"
if PROFILE not in ("ci", "thorough"):
    raise ValueError(f"LLMQUEUE_HYPOTHESIS={PROFILE!r}: use 'ci' (the default) or 'thorough'")
settings.load_profile(PROFILE)


# ---------------------------------------------------------------- numba: compile once, visibly

KERNEL_FREE = frozenset({
    "test_batchtime.py", "test_composition.py", "test_decisions.py", "test_fit.py", "test_gpuprofile.py",
    "test_layers.py", "test_netpolicies.py",
    "test_paper_example.py", "test_realfig1.py", "test_theory.py", "test_trace_stream.py",
    "test_validate.py", "test_workload.py",
})
"""Modules that never run the compiled loop (shape-model and Python-only engines, fits, parsers):
they run first, while the loop compiles. A module listed here that starts using the loop only
waits for the compile; one missing from the list only runs later. No test module may import a
compiled loop's module at its top: collection would wait for the whole compile (tested)."""


KERNELS = {"llmqueue.engines.kernel": ("run", "stop"), "llmqueue.engines.polkernel": ("run", "wake"),
           "llmqueue.engines.netkernel": ("net_run",)}
"""The modules of numba's compiled loops -> their entry points (the single-engine loop, the network
policies' engine, the network loop: the warm-up compiles them all; the network loop's cached code
includes both engine loops)."""


WAIT_LIMIT_S = 900.0
"""The longest the tests wait for the compiling process (it takes about a minute and a half)."""

ENGINE_ONLY = frozenset({"llmqueue.engines.kernel"})
"""The compiled modules ready at the warm-up's first stage (the single-engine loop, about half of
the compile); the others (the network loop and the network policies' engine) at its end."""

NETWORK_MODULES = frozenset({
    "test_agent_example.py", "test_disagg.py", "test_kernel_twins.py", "test_netpolicies_compiled.py",
    "test_network.py", "test_network_verdict.py", "test_plan.py", "test_pools.py", "test_reproduce.py",
    "test_split.py",
})
"""Modules that run the network loop: they run last, so the single-engine tests run while it
compiles; so do the tests of other modules whose code mentions a network (``_NETWORK_WORDS``). A
test missing from both only waits longer (the import guard waits for the whole compile before the
network loop's module is imported); one wrongly counted here only runs later."""

_NETWORK_WORDS = re.compile(r"network|Network|pool|plan|split|reproduce|warm_up|agent")


def _runs_a_network(item: pytest.Item) -> bool:
    """Whether a test probably runs the network loop (its module is a network one, or its code
    says so): a guess that only orders the tests."""
    if Path(str(item.path)).name in NETWORK_MODULES:
        return True
    function = getattr(item, "function", None)
    try:
        source = inspect.getsource(function) if function is not None else ""
    except (OSError, TypeError):
        return True
    return bool(_NETWORK_WORDS.search(source))


class _WarmUp:
    """``helpers.warm_up`` in a child process. :meth:`wait` blocks until the single-engine loop is
    ready (``stage="engine"``: its ``ENGINE_READY`` line) or until the whole warm-up is done."""

    def __init__(self) -> None:
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (read in the summary, closed at exit)
        self.started = time.perf_counter()
        code = "from tests.helpers import warm_up; print(f'{warm_up():.1f}')"
        self.process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=self.log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.engine_ready = False
        self.waited = 0.0  # seconds the tests spent waiting, both stages
        self.finished: float | None = None

    def _printed_engine_ready(self) -> bool:
        self.log.seek(0)
        return ENGINE_READY in self.log.read()

    def wait(self, stage: str = "all") -> None:
        if self.finished is not None or (stage == "engine" and self.engine_ready):
            return
        start = time.perf_counter()
        try:
            if stage == "engine":
                while self.process.poll() is None and not self._printed_engine_ready():
                    if time.perf_counter() - start > WAIT_LIMIT_S:
                        raise subprocess.TimeoutExpired(self.process.args, WAIT_LIMIT_S)
                    time.sleep(0.05)
                self.engine_ready = True
            else:
                self.process.wait(timeout=WAIT_LIMIT_S)
        except subprocess.TimeoutExpired:  # stuck: end it, the tests compile on first use instead
            self.process.kill()
            self.process.wait()
        self.waited += time.perf_counter() - start
        if self.process.poll() is not None:
            self.finished = time.perf_counter()
            self.engine_ready = True
            _remove_import_guard()

    def stop(self) -> None:
        """End the child if the session ends before any test needed it (its finished functions
        stay in numba's cache)."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        _remove_import_guard()

    def summary(self) -> str:
        self.log.seek(0)
        output = self.log.read().strip().splitlines()
        if self.finished is None and not self.engine_ready:
            return "numba warm-up: not needed by the tests run (stopped)"
        if self.process.returncode not in (0, None):
            tail = " | ".join(output[-3:])
            return (f"numba warm-up FAILED (exit {self.process.returncode}); each compiled run compiled "
                    f"on first use instead: {tail}")
        compile_s = output[-1] if output else "?"
        ended = ("" if self.finished is None
                 else f" of {self.finished - self.started:.1f} s from the start of the session")
        return (f"numba event loops: compiled or loaded from cache in a separate process ({compile_s} s"
                f"{ended}, the single-engine loop first, while the kernel-free modules ran); the "
                f"tests waited {self.waited:.1f} s for it")


_STATE: dict[str, _WarmUp] = {}
_NOTES: list[str] = []


class _ImportGuard(importlib.abc.MetaPathFinder):
    """Whatever imports a compiled loop first waits for the warm-up (the single-engine loop: its
    first stage; the network loop: all of it): it then loads the compiled code from numba's cache
    instead of compiling it a second time, in parallel."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name in KERNELS and "warm-up" in _STATE:
            _STATE["warm-up"].wait("engine" if name in ENGINE_ONLY else "all")
        return None


_GUARD = _ImportGuard()


def _remove_import_guard() -> None:
    if _GUARD in sys.meta_path:
        sys.meta_path.remove(_GUARD)


def _cache_is_fresh() -> bool:
    """Whether numba's on-disk cache has the entry points of the compiled loops (``KERNELS``),
    written after the last edit of their modules (of kernel.py too for the network loop, which
    includes its code), so the first test that needs them loads them in a fraction of a second,
    and a separate process would only add its start-up. Best effort: False when unsure."""
    edited = 0.0
    for module, names in KERNELS.items():  # engines first: netkernel's code depends on them
        spec = find_spec(module)
        if spec is None or spec.origin is None:
            return False
        source = Path(spec.origin)
        folders = [source.parent / "__pycache__"]
        if os.environ.get("NUMBA_CACHE_DIR"):
            folders = [Path(os.environ["NUMBA_CACHE_DIR"])]
        edited = max(edited, source.stat().st_mtime)
        stem = module.rsplit(".", 1)[1]
        for name in names:
            indexes = [p for folder in folders for p in folder.rglob(f"{stem}.{name}-*.nbi")]
            if not any(p.stat().st_mtime >= edited for p in indexes):
                return False
    return True


def pytest_configure(config: pytest.Config) -> None:
    if (config.option.collectonly or os.environ.get("LLMQUEUE_WARMUP", "1").strip() == "0"
            or find_spec("numba") is None or "llmqueue.engines.kernel" in sys.modules):
        return
    if _cache_is_fresh():
        _NOTES.append("numba event loops: on-disk cache up to date, loaded by the first test that runs them")
        return
    _STATE["warm-up"] = _WarmUp()
    sys.meta_path.insert(0, _GUARD)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if "warm-up" in _STATE:  # the kernel-free modules first, each module's order kept
        def order(item: pytest.Item) -> int:
            name = Path(str(item.path)).name
            return 0 if name in KERNEL_FREE else 2 if _runs_a_network(item) else 1

        items.sort(key=order)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> None:
    if "warm-up" in _STATE and Path(str(item.path)).name not in KERNEL_FREE:
        _STATE["warm-up"].wait("all" if Path(str(item.path)).name in NETWORK_MODULES else "engine")


def pytest_unconfigure(config: pytest.Config) -> None:
    if "warm-up" in _STATE:
        _STATE["warm-up"].stop()
        _STATE.pop("warm-up").log.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if "warm-up" in _STATE:
        terminalreporter.write_line(_STATE["warm-up"].summary())
    for note in _NOTES:
        terminalreporter.write_line(note)
    default = settings.default
    how = "derandomized (LLMQUEUE_HYPOTHESIS=thorough: more, random)" if default.derandomize else "random"
    terminalreporter.write_line(f"hypothesis: {default.max_examples} examples per property by default, {how}")
