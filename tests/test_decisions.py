"""Decisions the command line used to make itself, now the library's: the KV cache's verdict
(``theory.stability.predict_memory``, in :func:`~llmqueue.theory.stability.predict`'s labels), a
run's arrival limit (``sim.settings.arrival_limit``) and whether a run compiles first
(``sim.warmup.compiles_first``)."""

from __future__ import annotations

import math
from typing import get_args

import pytest

from llmqueue.theory.stability import Predicted, predict_memory

KV = {"kv_tokens": 32000, "kv_requests": 96}


def _saturated(rate: float, sat: float, preemptions: int) -> dict[str, float]:
    return {"rate_per_s": rate, "saturated_rate_per_s": sat, "preemptions": preemptions,
            "recomputed_tokens_per_request": 123.4}


@pytest.mark.parametrize(("loads", "saturation", "label", "binding"), [
    ((1.2, 3.0), None, "unstable (token budget)", "memory"),
    ((1.2, 0.5), None, "unstable (token budget)", "token budget"),
    ((0.5, 1.0), None, "unstable (memory)", "memory"),
    ((0.5, 0.8), _saturated(5.0, 4.0, 10), "unstable (preemption thrash)", "memory"),
    ((0.5, 0.8), None, "no guarantee (memory binds; saturated run skipped)", "memory"),
    ((0.5, 0.8), _saturated(5.0, 6.0, 10), "stable", "memory"),
    ((0.5, 0.8), _saturated(5.0, 4.0, 0), "stable", "memory"),
    ((0.5, 0.4), None, "stable", "token budget"),
])
def test_every_verdict_in_predicts_labels(loads, saturation, label, binding) -> None:
    load, memory_load = loads
    got = predict_memory(load_full_batches=load, memory_load=memory_load, **KV, **(saturation or {}))
    assert got.label == label and got.binding == binding
    assert got.verdict in get_args(Predicted)
    assert (got.cause is None) == (got.verdict == "stable")


def test_kmax_load_decides_over_the_full_batch_load() -> None:
    """With k_max the region's load is the memory-free one, as in ``predict``."""
    got = predict_memory(load_full_batches=0.5, kmax_load=1.1, memory_load=0.9, **KV)
    assert got.label == "unstable (token budget)" and got.binding == "token budget"
    got = predict_memory(load_full_batches=1.1, kmax_load=0.5, memory_load=0.9, **KV)
    assert got.verdict == "no guarantee" and got.binding == "memory"


def test_warnings_say_what_binds() -> None:
    memory = predict_memory(load_full_batches=0.8, memory_load=1.25, **KV)
    assert memory.warning == (
        "memory binds: load 0.800 is stable for the token budget, but 32000 KV tokens hold only "
        "about 96 decoding requests (load 1.250 >= 1): unstable"
    )
    thrash = predict_memory(load_full_batches=0.5, memory_load=0.8, **KV, **_saturated(5.0, 4.0, 10))
    assert thrash.warning == (
        "preemption thrash: memory load 0.800 < 1, but the saturated engine completes only 4 req/s "
        "(123 tokens recomputed per request; load 1.250 >= 1): unstable (preemption thrash, "
        "docs/memory.md)"
    )
    for saturation, tail in ((None, ""), (_saturated(5.0, 6.0, 10), ", saturated_rate includes that cost")):
        bound = predict_memory(load_full_batches=0.5, memory_load=0.8, **KV, **(saturation or {}))
        assert bound.warning == ("memory binds before the token budget; its limit is an upper bound: "
                                 f"preemption (recompute) costs capacity near it{tail} (docs/memory.md)")
    assert predict_memory(load_full_batches=0.5, memory_load=0.4, **KV).warning is None
    assert predict_memory(load_full_batches=1.5, memory_load=1.2, **KV).warning is None


def test_unknown_rate_is_no_thrash() -> None:
    """Without an arrival rate (NaN) a saturated run cannot show thrash."""
    got = predict_memory(load_full_batches=0.5, memory_load=0.8, **KV, saturated_rate_per_s=4.0,
                         preemptions=3, rate_per_s=math.nan)
    assert got.label == "stable"


def test_arrival_limit_defaults_only_an_unbounded_synthetic_run() -> None:
    from llmqueue.model.specs import make_workload
    from llmqueue.sim.settings import DEFAULT_NETWORK_REQUESTS, DEFAULT_REQUESTS, arrival_limit

    poisson = make_workload("poisson", "129", "112", 5.0)
    assert arrival_limit(None, None, poisson) == DEFAULT_REQUESTS
    assert arrival_limit(None, None) == DEFAULT_REQUESTS
    assert arrival_limit(None, None, default=DEFAULT_NETWORK_REQUESTS) == DEFAULT_NETWORK_REQUESTS
    assert arrival_limit(300, None, poisson) == 300 and arrival_limit(300, 10.0, poisson) == 300
    assert arrival_limit(None, 10.0, poisson) is None


def test_arrival_limit_leaves_a_trace_to_end_by_itself(tmp_path) -> None:
    from llmqueue.model.specs import make_workload
    from llmqueue.sim.settings import arrival_limit

    path = tmp_path / "t.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,5\n0.5,20,3\n")
    assert arrival_limit(None, None, make_workload(f"trace:{path}", None, None, None)) is None


def test_compiles_first_only_where_the_compiled_loop_runs(monkeypatch) -> None:
    from llmqueue.engines import compiled
    from llmqueue.model.batchtime import parse_batch_time
    from llmqueue.policies.fcfs import SARATHI
    from llmqueue.sim.warmup import compiles_first

    monkeypatch.setattr(compiled, "available", lambda: True)
    monkeypatch.setattr(compiled, "needs_compiling", lambda: True)
    t = parse_batch_time("linear:c=10,a=0.05")
    assert compiles_first(SARATHI, t, 512, "auto")
    assert compiles_first(SARATHI, t, 512, "compiled")
    assert not compiles_first(SARATHI, t, 512, "fast")
    assert not compiles_first(SARATHI, t, 512, "reference")
    assert not compiles_first(SARATHI, t, 512, "auto", max_concurrency=4)
    monkeypatch.setattr(compiled, "needs_compiling", lambda: False)
    assert not compiles_first(SARATHI, t, 512, "auto")
