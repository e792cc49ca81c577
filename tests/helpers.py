"""Helpers shared by the test modules (import them from here, not from another test module).

Two kinds of numbers appear in the tests. The engines' own arithmetic is compared exactly where the
contract is exact (the engines agree to the bit). Numbers that come out of a numerical library
(scipy's nnls, linprog, qhull, numpy's LAPACK) differ in their last digits between releases and
BLAS/LAPACK builds (seen: relative 1e-14 on the shipped fits across OpenBLAS kernels): those are
compared with the tolerances below, generous for rounding, far too tight for a real change.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import example, settings
from hypothesis import strategies as st

from llmqueue.model.batchtime import ConstantTime, LinearTime, StaircaseTime
from llmqueue.model.workload import Request, SizeDist
from llmqueue.policies.fcfs import ORCA, SARATHI, VLLM, VLLM_CHUNKED

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

FIT_REL = 1e-9
"""Relative tolerance on a fitted coefficient (library least squares)."""
FIT_ABS = 1e-12
"""Absolute tolerance on a fitted coefficient, for coefficients at or near 0 (ms per token or less)."""

# ---------------------------------------------------------------- hypothesis example counts

CI_EXAMPLES = 30
"""max_examples of the default (CI) hypothesis profile; tests/conftest.py registers the profiles."""


def examples(ci: int) -> int:
    """``ci`` examples in the CI profile, scaled like the profile's default in the others (a test
    that must stay cheaper than the default asks for ``examples(n)``, not a fixed count)."""
    return max(1, round(ci * settings.default.max_examples / CI_EXAMPLES))


# ---------------------------------------------------------------- specs of fitted models

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_ITEM = rf"[a-z][a-z0-9_]*={_NUMBER}"
_SPEC = re.compile(rf"\b([a-z][a-z0-9_-]*):((?:{_ITEM},)*{_ITEM})(?![\w.])")


def spec_numbers(spec: str) -> dict[str, float]:
    """The ``key=value`` numbers of a model spec such as ``composition:c=2.3,prefill=0.026,...``
    (the kind before the colon is left out: :func:`spec_kind`)."""
    _, sep, body = spec.strip().partition(":")
    assert sep, f"not a spec: {spec!r}"
    numbers: dict[str, float] = {}
    for item in body.split(","):
        key, eq, value = item.partition("=")
        assert eq and key.strip() not in numbers, f"bad item {item!r} in {spec!r}"
        numbers[key.strip()] = float(value)
    return numbers


def spec_kind(spec: str) -> str:
    """The kind of a model spec: ``composition`` for ``composition:c=...``."""
    return spec.strip().partition(":")[0].strip()


def assert_spec_close(actual: str, expected: str, rel: float = FIT_REL, abs: float = FIT_ABS) -> None:
    """Same kind, same keys, every number within the fit tolerances."""
    assert spec_kind(actual) == spec_kind(expected), (actual, expected)
    got, want = spec_numbers(actual), spec_numbers(expected)
    assert got.keys() == want.keys(), (actual, expected)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=rel, abs=abs), (key, actual, expected)


def specs_in(text: str, kind: str) -> list[str]:
    """Every spec of ``kind`` printed in ``text`` (``piecewise:c=...,a=...,b0=...``)."""
    return [m.group(0) for m in _SPEC.finditer(text) if m.group(1) == kind]


def assert_spec_printed(text: str, expected: str) -> None:
    """``text`` prints a spec of the kind of ``expected`` whose numbers are within the fit tolerances."""
    printed = specs_in(text, spec_kind(expected))
    assert printed, f"no {spec_kind(expected)} spec in the output"
    errors = []
    for spec in printed:
        try:
            assert_spec_close(spec, expected)
            return
        except AssertionError as err:
            errors.append(str(err))
    raise AssertionError(f"no printed spec matches {expected}: {errors}")


def rounds_to(expected: float, places: int) -> Any:
    """A comparison that holds for a value printed (or rounded) to ``places`` decimals as
    ``expected``: within half a unit of the last place (``round(x, places) == expected`` without
    its flip when a last-digit difference crosses the rounding boundary)."""
    return pytest.approx(expected, rel=0, abs=0.5 * 10.0**-places * (1 + 1e-9))


# ---------------------------------------------------------------- engines

BATCH_TIMES = st.sampled_from(
    [ConstantTime(1.0), LinearTime(0.5, 0.0625), StaircaseTime(1.0, 3.0, 8), LinearTime(0.3, 0.01)]
)
"""Batch-time models of the engine exactness properties."""


# Explicit hypothesis cases for the engine exactness properties (``@example``: they run in every
# profile, before the drawn examples): situations the fast engine and the compiled loop must get
# exactly right (docs/fastpath.md) that random workloads reach only now and then.
R = Request
TIES = [R(0, 0.0, 5, 3), R(1, 1.0, 0, 4), R(2, 1.0, 7, 0), R(3, 2.0, 3, 2), R(4, 3.0, 0, 1), R(5, 3.0, 9, 6)]
"""Arrivals on batch boundaries (1 ms batches), prompt-less and prompt-only requests."""
LONG_RUN = [R(0, 0.0, 1, 60), R(1, 0.0, 2, 58), R(2, 40.0, 90, 5), R(3, 40.0, 0, 3)]
"""A long run of identical repeats that arrivals interrupt."""
CUT_MID_RUN = [*LONG_RUN[:2], R(2, 30.0, 5, 3)]
"""With drain 0 the horizon is the last arrival, 30 ms: mid-way through a run of repeats."""
BURST = [R(i, 0.0, 1 + i % 4, 1 + i % 3) for i in range(12)]
"""Twelve requests at once (budget and k_max of 1 serve them one token a batch)."""
TOO_LONG = [R(0, 0.0, 90, 3), R(1, 0.5, 3, 2), R(2, 0.5, 0, 2)]
"""A 90-token prompt that a non-chunking policy with budget 64 can never serve (the engine stalls)."""
PREEMPT = [R(0, 0.0, 16, 32), R(1, 0.0, 16, 32)]
"""tests/test_memory.py's hand-worked preemption (4 blocks of 16 tokens: B is preempted at 17 ms)."""
CUT_AFTER_PREEMPTION = [*PREEMPT, R(2, 20.0, 4, 2)]
"""With drain 0 the horizon is 20 ms, after the preemption."""
NEVER_FITS = [R(0, 0.0, 0, 5), R(1, 0.0, 20, 3), R(2, 1.0, 60, 40), R(3, 2.0, 4, 2), R(4, 2.0, 0, 1)]
"""In a 30-token cache: a request refused at arrival, prompt-less decoders holding no blocks."""
WATERMARK = [R(0, 0.0, 60, 1), R(1, 0.0, 8, 1), R(2, 0.0, 0, 2)]
"""In 5 blocks of 16 with a 0.2 watermark the 8-token prompt waits (without it, it would not)."""
REFUSED_LAST = [R(0, 0.0, 10, 700), R(1, 1.0, 600, 400)]
"""In an 800-token cache the last request is refused and does not move the horizon (drain 0.5 s)."""


def memory_examples(test: Callable[..., None]) -> Callable[..., None]:
    """The explicit KV-cache cases of an exactness property taking (requests, policy, budget, k_max,
    blocks, block_tokens, watermark, batch_time): preemption, refusal, the watermark, ties."""
    cases = [
        dict(requests=PREEMPT, policy=SARATHI, budget=64, k_max=None, blocks=4, block_tokens=16,
             watermark=0.0, batch_time=ConstantTime(1.0)),
        dict(requests=NEVER_FITS, policy=VLLM_CHUNKED, budget=16, k_max=2, blocks=10, block_tokens=3,
             watermark=0.2, batch_time=LinearTime(0.5, 0.0625)),
        dict(requests=WATERMARK, policy=VLLM, budget=128, k_max=None, blocks=5, block_tokens=16,
             watermark=0.2, batch_time=ConstantTime(1.0)),
        dict(requests=TIES, policy=ORCA, budget=16, k_max=None, blocks=3, block_tokens=3, watermark=0.0,
             batch_time=StaircaseTime(1.0, 3.0, 8)),
    ]
    for case in reversed(cases):  # decorators apply bottom-up: keep this order in the report
        test = example(**case)(test)
    return test


@dataclass(frozen=True)
class SometimesZero:
    """A size distribution that draws 0 with probability ``p`` (else ``inner``): parsed size specs
    are at least 1, so prompt-less requests or skipped visits (0 + 0 tokens) need one of these."""

    inner: SizeDist
    p: float

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        values = self.inner.sample(rng, n)
        return np.where(rng.random(n) < self.p, 0, values)

    @property
    def mean(self) -> float:
        return (1 - self.p) * self.inner.mean

    @property
    def spec(self) -> str:
        return f"zero {self.p} else {self.inner.spec}"


def assert_same(ref: Any, fast: Any) -> None:
    """Two simulation results agree: every request's times to the bit (docs/fastpath.md: batch end
    times come from the same sequential float additions), the batch counts, the work-conservation
    audit and every count exactly; float metrics and the backlog series within rounding."""
    assert fast.requests is not None and ref.requests is not None
    for a, b in zip(ref.requests, fast.requests, strict=True):
        assert a.id == b.id
        for field in ("first_token_ms", "finish_ms"):
            x, y = getattr(a, field), getattr(b, field)
            assert (math.isnan(x) and math.isnan(y)) or y == x, (a.id, field, x, y)
    m, f = ref.metrics, fast.metrics
    assert (f.num_batches, f.wc_violations, f.wc_wasted_tokens) == (
        m.num_batches, m.wc_violations, m.wc_wasted_tokens
    )
    assert (f.completed, f.incomplete, f.arrivals) == (m.completed, m.incomplete, m.arrivals)
    for key, value in m.as_dict().items():
        other = f.as_dict()[key]
        if isinstance(value, float):
            # Within rounding by design (docs/fastpath.md): a run of k repeats books k - 1
            # inter-token gaps as t(n) where the reference subtracts consecutive end times, and the
            # backlog integral of a run in closed form where the reference sums per iteration.
            assert (math.isnan(value) and math.isnan(other)) or other == pytest.approx(
                value, rel=1e-9, abs=1e-9
            ), key
        elif key != "backlog_series":
            assert other == value, key
    for (t1, b1), (t2, b2) in zip(m.backlog_series, f.backlog_series, strict=True):
        assert t2 == pytest.approx(t1) and b2 == pytest.approx(b1, rel=1e-9, abs=1e-6)


def same_doc(a: object, b: object, path: str = "") -> None:
    """Equal JSON-like documents, floats to a relative 1e-9 (the Python engines' float rounding)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            same_doc(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or b == pytest.approx(a, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


def record_net_run_codes(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """Wrap the compiled network loop's entry (``netkernel.net_run``) so that every code it returns
    to the driver (a resumable step, or done) is added to the set returned."""
    from llmqueue.engines import netkernel as kernel

    seen: set[int] = set()
    net_run = kernel.net_run

    def counting(*args: object) -> int:
        code = net_run(*args)
        seen.add(code)
        return code

    monkeypatch.setattr(kernel, "net_run", counting)
    return seen


# ---------------------------------------------------------------- numba


ENGINE_READY = "warm-up: single-engine loop ready"
"""The line ``warm_up`` prints once the single-engine loop is in numba's cache (conftest waits
for it before the single-engine tests, and for the whole warm-up before the network tests)."""


def warm_up() -> float:
    """Compile every compiled event loop (llmqueue.sim.warmup: about a minute and a half on a cold
    cache) or load them from numba's on-disk cache; the seconds it took. The single-engine loop
    comes first and ``ENGINE_READY`` is printed when it is done. tests/conftest.py runs this once
    per session, in a process of its own."""
    import time

    from llmqueue.engines import compiled
    from llmqueue.sim.warmup import warm_up_engine, warm_up_network

    start = time.perf_counter()
    if compiled.available():
        warm_up_engine()
        print(ENGINE_READY, flush=True)
        warm_up_network()
    return time.perf_counter() - start


# ---------------------------------------------------------------- CLI


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``llmqueue ARGS`` in-process: (exit code, stdout, stderr)."""
    from llmqueue.cli.app import main

    capsys.readouterr()  # drop anything printed before
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _no_constants(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token!r}")


def strict_json(text: str) -> Any:
    """Parse exactly one strict JSON document (no NaN/Infinity tokens)."""
    return json.loads(text, parse_constant=_no_constants)


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    """``llmqueue ARGS --json`` in-process: the one JSON document it printed (exit 0, no stderr)."""
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    assert err == ""
    return strict_json(out)
