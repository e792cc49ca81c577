"""The compiled event loop against the reference engine: same requests' times, same metrics.

The compiled loop (``llmqueue.engines.kernel``) ports the fast engine and the shipped policies to numba;
hypothesis checks it against the reference per-iteration engine on random workloads, including
prompt-less requests (they reorder the decoders), horizon cuts, k_max and every policy knob, and
the driver paths that only long runs reach (slot growth, output drains, chunked arrivals); also
with a KV-cache limit (admission, watermark, preemption, refusal at arrival, KV usage).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from llmqueue.engines import compiled
from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import ConstantTime, LinearTime, StaircaseTime
from llmqueue.model.memory import KVCache
from llmqueue.model.specs import make_workload
from llmqueue.model.workload import Request
from llmqueue.policies.fcfs import FASTERTRANSFORMER, KFCFS, ORCA, SARATHI, VLLM, VLLM_CHUNKED, make_policy
from llmqueue.sim.run import simulate

from .helpers import (
    BATCH_TIMES,
    BURST,
    CUT_AFTER_PREEMPTION,
    CUT_MID_RUN,
    LONG_RUN,
    REFUSED_LAST,
    TIES,
    TOO_LONG,
    assert_same,
    memory_examples,
)
from .strategies import SHIPPED, policies
from .strategies import workloads as shared_workloads


def workloads() -> st.SearchStrategy[list[Request]]:
    """Random workloads with prompt-less and prompt-only requests (they reorder the decoders)."""
    return shared_workloads(prefill_min=0, decode_min=0)


def against_reference(requests, policy, batch_time, budget, k_max, **kwargs):
    ref = simulate(requests, policy, batch_time, budget, k_max=k_max, engine="reference", **kwargs)
    fast = simulate(requests, policy, batch_time, budget, k_max=k_max, engine="compiled", **kwargs)
    assert_same(ref, fast)
    assert fast.notes == ref.notes
    return ref, fast


@given(
    requests=workloads(),
    policy=policies,
    budget=st.integers(1, 64),
    k_max=st.none() | st.integers(1, 9),
    batch_time=BATCH_TIMES,
)
@example(requests=TIES, policy=SARATHI, budget=4, k_max=2, batch_time=ConstantTime(1.0))
@example(requests=LONG_RUN, policy=VLLM, budget=8, k_max=None, batch_time=LinearTime(0.5, 0.0625))
@example(requests=BURST, policy=KFCFS(priority="decode", mixed=False, k_p=1, k_d=1), budget=1, k_max=1,
         batch_time=StaircaseTime(1.0, 3.0, 8))
@example(requests=TOO_LONG, policy=FASTERTRANSFORMER, budget=64, k_max=None, batch_time=ConstantTime(1.0))
def test_compiled_matches_the_reference(requests, policy, budget, k_max, batch_time) -> None:
    against_reference(requests, policy, batch_time, budget, k_max, drain_s=1e6)


@given(requests=workloads(), policy=st.sampled_from(SHIPPED), budget=st.integers(4, 64),
       k_max=st.none() | st.integers(1, 9), drain_s=st.sampled_from([0.0, 0.5, 3.0, 20.0]))
@example(requests=CUT_MID_RUN, policy=SARATHI, budget=8, k_max=None, drain_s=0.0)
@example(requests=TIES, policy=VLLM_CHUNKED, budget=4, k_max=2, drain_s=0.0)
def test_compiled_matches_when_cut_at_the_horizon(requests, policy, budget, k_max, drain_s) -> None:
    against_reference(requests, policy, ConstantTime(1.0), budget, k_max, drain_s=drain_s)


@pytest.mark.parametrize("policy", [*SHIPPED, KFCFS(k_p=2, k_d=40), KFCFS(priority="prefill",
                                                                            chunked=False)])
@pytest.mark.parametrize("k_max", [None, 24])
def test_compiled_matches_on_long_poisson_runs(policy, k_max) -> None:
    """Thousands of requests near capacity, hundreds present at once (slots grow past their
    first 1024), output buffers drained mid-run: identical to the reference."""
    workload = make_workload("poisson", "poisson:129", "geometric:112", 14.5)
    ref, fast = against_reference(workload, policy, StaircaseTime(11.28, 35.47, 128), 512, k_max,
                                  seed=7, max_requests=2500)
    assert ref.observed.verdict == fast.observed.verdict


def test_slots_grow_and_outputs_drain() -> None:
    """20,000 requests arrive at once: 20x the first slot capacity, outputs drained repeatedly."""
    requests = [Request(i, 0.0, 3, 2) for i in range(20_000)]
    _, fast = against_reference(requests, SARATHI, ConstantTime(1.0), 64, None)
    assert fast.metrics.completed == 20_000


def test_arrival_chunks_equal_the_request_stream() -> None:
    workload = make_workload("gamma:2.5", "lognormal:100,1.0", "geometric:50", 3.0)
    chunks = list(workload.chunks(4, max_requests=10_000))
    ids, times, prefill, decode = (np.concatenate(c) for c in zip(*chunks, strict=True))
    stream = list(workload.requests(4, max_requests=10_000))
    assert ids.tolist() == [r.id for r in stream]
    assert times.tolist() == [r.arrival_ms for r in stream]
    assert prefill.tolist() == [r.prefill_tokens for r in stream]
    assert decode.tolist() == [r.decode_tokens for r in stream]
    timed = list(workload.requests(4, duration_ms=60_000.0))
    chunked = np.concatenate([c[1] for c in workload.chunks(4, duration_ms=60_000.0)])
    assert chunked.tolist() == [r.arrival_ms for r in timed]


def test_auto_picks_the_compiled_loop_for_shipped_policies_only() -> None:
    assert compiled.supports(SARATHI, 128, keep_batches=False)
    assert compiled.supports(make_policy("kfcfs", k_p=3), 128, keep_batches=False)
    assert not compiled.supports(SARATHI, 128, keep_batches=True)
    assert not compiled.supports(SARATHI, compiled.MAX_BUDGET + 1, keep_batches=False)

    class Mine(KFCFS):  # a subclass may plan differently: not ported
        pass

    assert not compiled.supports(Mine(), 128, keep_batches=False)


def test_compiled_refuses_what_it_cannot_run() -> None:
    requests = [Request(0, 0.0, 5, 3)]
    with pytest.raises(ConfigError, match=r"^engine: .*numba"):
        simulate(requests, SARATHI, ConstantTime(1.0), 8, engine="compiled", keep_batches=True)
    with pytest.raises(ConfigError, match=r"^engine:"):
        simulate(requests, lambda view: {}, ConstantTime(1.0), 8, engine="compiled")


def test_a_bad_batch_time_is_the_same_error_on_both_engines() -> None:
    """A user's t(n) must be positive: the first batch of such n stops the run, one line."""

    class ZeroForOneToken:
        spec = "user"

        def __call__(self, n: int) -> float:
            return 0.0 if n == 1 else 1.0

        def times_ms(self, n: np.ndarray) -> np.ndarray:
            return np.where(n == 1, 0.0, 1.0)

    zero_for_one_token = ZeroForOneToken()

    requests = [Request(0, 0.0, 4, 1)]
    messages = []
    for engine in ("reference", "compiled"):
        with pytest.raises(ConfigError, match=r"^batch-time: .*t\(1\)") as caught:
            simulate(requests, SARATHI, zero_for_one_token, 8, engine=engine)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]


def test_unstable_overload_stops_at_the_horizon() -> None:
    """Vanilla vLLM at twice capacity: the run ends at the horizon with requests left over."""
    workload = make_workload("poisson", "129", "112", 2 * 13.87)
    _, fast = against_reference(workload, VLLM, StaircaseTime(11.28, 35.47, 128), 512, None,
                                  seed=1, max_requests=3000, drain_s=5.0)
    assert fast.metrics.incomplete > 0
    assert math.isclose(fast.metrics.duration_s, 3000 / 27.74 + 5.0, rel_tol=0.1)


def test_vllm_chunked_with_k_max_matches_on_a_trace_like_mix() -> None:
    workload = make_workload("poisson", "lognormal:900,1.2", "lognormal:200,1.0", 6.0)
    against_reference(workload, VLLM_CHUNKED, StaircaseTime(12.82, 13.70, 128), 2048, 16,
                      seed=2, max_requests=1500)


# ---------------------------------------------------------------- KV-cache memory


@given(
    requests=workloads(),
    policy=policies,
    budget=st.integers(1, 128),
    k_max=st.none() | st.integers(1, 9),
    blocks=st.integers(1, 40),
    block_tokens=st.sampled_from([1, 3, 16]),
    watermark=st.sampled_from([0.0, 0.01, 0.05, 0.2]),
    batch_time=BATCH_TIMES,
)
@memory_examples
def test_compiled_matches_the_reference_with_memory(requests, policy, budget, k_max, blocks,
                                                    block_tokens, watermark, batch_time) -> None:
    """Admission, watermark, recompute preemption (newest first, decoders and prompts), the
    resident-only re-plan, prompt-less requests holding no blocks and refusal at arrival are
    exact in the compiled loop: same requests, same metrics (KV usage included), same notes."""
    memory = KVCache(blocks * block_tokens, block_tokens=block_tokens, watermark=watermark)
    against_reference(requests, policy, batch_time, budget, k_max, drain_s=1e6, memory=memory)


@given(requests=workloads(), policy=st.sampled_from(SHIPPED), blocks=st.integers(2, 30),
       block_tokens=st.sampled_from([1, 4]), k_max=st.none() | st.integers(2, 9),
       drain_s=st.sampled_from([0.0, 0.5, 3.0, 20.0]))
@example(requests=REFUSED_LAST, policy=SARATHI, blocks=200, block_tokens=4, k_max=None, drain_s=0.5)
@example(requests=CUT_AFTER_PREEMPTION, policy=VLLM_CHUNKED, blocks=14, block_tokens=4, k_max=2, drain_s=0.0)
def test_compiled_matches_with_memory_when_cut_at_the_horizon(requests, policy, blocks, block_tokens,
                                                              k_max, drain_s) -> None:
    """A short drain stops a memory-limited run mid-way (maybe mid-run of repeats, or after a
    refused last request, which does not move the horizon) at the same batch in both engines."""
    memory = KVCache(blocks * block_tokens, block_tokens=block_tokens, watermark=0.0)
    against_reference(requests, policy, ConstantTime(1.0), 64, k_max, drain_s=drain_s, memory=memory)


@pytest.mark.parametrize("policy", [VLLM, ORCA, SARATHI, VLLM_CHUNKED])
def test_compiled_matches_a_long_thrashing_run(policy) -> None:
    """Hundreds of requests just below the cache's §4 limit, hundreds of preemptions: identical."""
    workload = make_workload("poisson", "64", "512", rate_per_s=11.5)
    memory = KVCache(32000, block_tokens=16, watermark=0.01)
    ref, fast = against_reference(workload, policy, LinearTime(10.0, 0.05), 512, None, seed=1,
                                  max_requests=600, memory=memory)
    assert ref.metrics.preemptions > 200
    assert fast.metrics.preemptions == ref.metrics.preemptions


def test_memory_runs_grow_slots_and_drain_outputs(monkeypatch) -> None:
    """Thousands present at once in a small cache, in chunks of arrivals: the slots grow while a
    run of repeats of a long prompt is underway, outputs are drained repeatedly, requests are
    preempted and refused."""
    calls = {"drain": 0, "grow": 0}
    drain, grow = compiled._drain, compiled._State.more_slots

    def counted_drain(state, recorder) -> None:
        calls["drain"] += 1
        drain(state, recorder)

    def counted_grow(state) -> None:
        calls["grow"] += 1
        grow(state)

    monkeypatch.setattr(compiled, "_drain", counted_drain)
    monkeypatch.setattr(compiled._State, "more_slots", counted_grow)
    # the long prompt runs alone until 20.5 ms, when the last free slot is taken; its next run
    # (cached tokens > 0) is underway at 50.5 ms, when the slots grow
    requests = [Request(0, 0.0, 3600, 2)] + [Request(i, 0.0, 3, 2) for i in range(1, 1023)]
    requests += [Request(1023, 20.5, 3, 2)]
    requests += [Request(1024 + i, 50.5 + 0.25 * (i // 50), 3 + i % 7, 20 + i % 50) for i in range(6000)]
    requests += [Request(7024 + i, 200.0 + i, 4000, 400) for i in range(3)]  # can never fit: refused
    memory = KVCache(3700, block_tokens=5, watermark=0.02)  # 64-token chunks straddle blocks
    _, fast = against_reference(requests, ORCA, ConstantTime(1.0), 64, None, memory=memory,
                                drain_s=1e6)
    assert fast.metrics.completed == 7024
    assert fast.metrics.rejected_requests == 3
    assert fast.metrics.preemptions > 0
    assert calls["grow"] >= 2 and calls["drain"] >= 3


def test_auto_runs_memory_in_the_compiled_loop(monkeypatch) -> None:
    """``engine="auto"`` picks the compiled loop for memory runs of shipped policies."""
    runs = []
    run = compiled.run

    def counted_run(*args, **kwargs):
        runs.append(kwargs.get("memory"))
        return run(*args, **kwargs)

    monkeypatch.setattr(compiled, "run", counted_run)
    requests = [Request(i, float(i), 30, 20) for i in range(40)]
    memory = KVCache(64, block_tokens=4, watermark=0.0)
    auto = simulate(requests, SARATHI, ConstantTime(1.0), 32, memory=memory)
    assert runs == [memory]
    ref = simulate(requests, SARATHI, ConstantTime(1.0), 32, memory=memory, engine="reference")
    assert_same(ref, auto)
    assert auto.notes == ref.notes
    assert auto.metrics.preemptions > 0
