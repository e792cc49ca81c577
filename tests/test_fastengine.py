"""The fast engine against the reference engine: same requests' times, iterations and audit.

Hypothesis draws random workloads (bursts, ties at batch boundaries, long prompts, long outputs),
policies (the four systems, current vLLM, random (K_p, K_d)-FCFS knobs) and k_max; both engines
must agree on every request's first-token and finish time (relative 1e-9), on every batch, and on
the work-conservation audit. A user policy without ``repeats_plan`` runs on the reference engine.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from itertools import pairwise

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from llmqueue.cli.app import main
from llmqueue.engines.fast import MAX_REPEAT, FastEngine
from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import CompositionTime, ConstantTime, LinearTime, StaircaseTime
from llmqueue.model.memory import KVCache
from llmqueue.model.specs import make_workload
from llmqueue.model.workload import Request
from llmqueue.policies.fcfs import FASTERTRANSFORMER, KFCFS, ORCA, SARATHI, VLLM, VLLM_CHUNKED
from llmqueue.sim.run import simulate

from .helpers import (
    BATCH_TIMES,
    BURST,
    LONG_RUN,
    TIES,
    TOO_LONG,
    assert_same,
    memory_examples,
)
from .strategies import SHIPPED, policies, workloads

CUT_AT_3_S = [Request(0, 0.0, 1, 3500), Request(1, 0.0, 2, 3400)]
"""Drain 3 s of 1 ms batches: the horizon cuts the run of repeats after 3,000 of them."""
QUEUE_OF_60 = [Request(i, 0.0, 20, 90) for i in range(60)]
"""In a 120-token cache they run about one at a time, with preemptions: the 3 s horizon cuts them."""


def both(requests, policy, batch_time, budget, k_max, **kwargs):
    ref = simulate(requests, policy, batch_time, budget, k_max=k_max, engine="reference", **kwargs)
    fast = simulate(requests, policy, batch_time, budget, k_max=k_max, engine="fast", **kwargs)
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
def test_fast_engine_matches_the_reference(requests, policy, budget, k_max, batch_time) -> None:
    ref, fast = both(requests, policy, batch_time, budget, k_max, keep_batches=True, drain_s=1e6)
    assert_same(ref, fast)
    assert ref.batches == fast.batches


@given(requests=workloads(), policy=st.sampled_from(SHIPPED), budget=st.integers(8, 64))
@example(requests=CUT_AT_3_S, policy=SARATHI, budget=8)
def test_fast_engine_matches_when_cut_at_the_horizon(requests, policy, budget) -> None:
    """A short drain cuts a run of repeats mid-way; both engines stop at the same batch."""
    ref, fast = both(requests, policy, ConstantTime(1.0), budget, None, keep_batches=True, drain_s=3.0)
    assert_same(ref, fast)
    assert ref.batches == fast.batches


@pytest.mark.parametrize("policy", SHIPPED)
def test_fast_engine_matches_on_a_long_poisson_run(policy) -> None:
    """Thousands of requests, real staircase, 0.95 of capacity: identical to the reference."""
    workload = make_workload("poisson", "poisson:129", "geometric:112", 13.0)
    t = StaircaseTime(11.28, 35.47, 128)
    ref, fast = both(workload, policy, t, 512, 64 if policy is VLLM_CHUNKED else None,
                     seed=7, max_requests=1500)
    assert_same(ref, fast)
    assert ref.observed.verdict == fast.observed.verdict
    assert fast.observed.slope_tokens_per_s == pytest.approx(
        ref.observed.slope_tokens_per_s, rel=1e-6, abs=1e-6
    )


def test_a_run_longer_than_the_engines_book_at_once_is_split_exactly() -> None:
    """One decoder with MAX_REPEAT + 2 identical iterations: the fast engine books at most
    MAX_REPEAT repeats per step, so the run is split, and the pieces must add up to the reference
    engine's iterations to the bit (every profile runs it; the reference takes a few seconds)."""
    requests = [Request(0, 0.0, 1, MAX_REPEAT + 2)]
    ref, fast = both(requests, SARATHI, ConstantTime(1.0), 8, None, drain_s=1e6)
    assert ref.metrics.num_batches == 1 + MAX_REPEAT + 2  # the prompt's batch, then the decode run
    assert_same(ref, fast)


def test_undeclared_policy_runs_on_the_reference_engine_with_a_note() -> None:
    def mine(view):
        return {r.id: 1 for r in view.decoding[: view.budget]} or {
            view.prefilling[0].id: min(view.prefilling[0].prefill_left, view.budget)
        }

    requests = [Request(i, float(i), 5, 3) for i in range(10)]
    result = simulate(requests, mine, ConstantTime(1.0), 8)
    assert result.metrics.completed == 10
    assert any("reference per-iteration engine" in note for note in result.notes)
    with pytest.raises(ConfigError, match="repeats_plan"):
        simulate(requests, mine, ConstantTime(1.0), 8, engine="fast")


def test_shipped_policies_run_fast_by_default() -> None:
    requests = [Request(i, float(i), 5, 3) for i in range(10)]
    for policy in SHIPPED:
        result = simulate(requests, policy, ConstantTime(1.0), 8)
        assert not any("reference" in note for note in result.notes)


def test_a_run_of_repeats_is_booked_in_one_step() -> None:
    """One request of 1 + 1000 tokens: 1001 iterations, but only a handful of engine events."""
    engine = FastEngine(SARATHI, ConstantTime(1.0), 8)
    engine.submit(Request(0, 0.0, 1, 1000))
    events = 0
    while engine.next_event_ms() < math.inf:
        engine.step()
        events += 1
    assert engine.now_ms == 1001.0
    assert events <= 3


@given(requests=workloads(), policy=policies, budget=st.integers(1, 64),
       k_max=st.none() | st.integers(1, 9))
def test_declared_repeats_plan_holds(requests, policy, budget, k_max) -> None:
    """The property the fast engine relies on, checked on the reference engine's own batches:
    when no request arrived in between and every planned request kept more than its share, the
    next batch has the same plan."""
    result = simulate(requests, policy, ConstantTime(1.0), budget, k_max=k_max,
                      engine="reference", keep_batches=True, drain_s=1e6)
    prefill_left = {r.id: r.prefill_tokens for r in requests}
    decode_left = {r.id: r.decode_tokens for r in requests}
    arrivals = sorted(r.arrival_ms for r in requests)
    batches = result.batches or ()
    for this, after in pairwise(batches):
        keeps = all(
            prefill_left[rid] >= 2 * n if prefill_left[rid] else decode_left[rid] >= 2
            for rid, n in this.plan
        )
        for rid, n in this.plan:
            if prefill_left[rid]:
                prefill_left[rid] -= n
            else:
                decode_left[rid] -= 1
        quiet = not any(this.start_ms < a <= after.start_ms for a in arrivals)
        if keeps and quiet and after.start_ms == this.end_ms:
            assert after.plan == this.plan


def test_cli_engines_agree() -> None:
    """`--engine fast` and `--engine reference` print the same figures (up to float rounding)."""
    outputs = []
    for engine in ("fast", "reference"):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(["simulate", "--policy", "vllm", "--requests", "400", "--json",
                         "--engine", engine, "--seed", "3"]) == 0
        outputs.append(json.loads(buffer.getvalue()))
    fast, ref = outputs
    for key in ("completed", "num_batches", "wc_violations", "wc_wasted_tokens", "stable_observed"):
        assert fast[key] == ref[key]
    for key in ("mean_ttft_ms", "p99_e2el_ms", "median_itl_ms", "mean_backlog_tokens"):
        assert fast[key] == pytest.approx(ref[key], rel=1e-9)


# ---------------------------------------------------------------- KV-cache memory


@given(
    requests=workloads(prefill_min=0),
    policy=policies,
    budget=st.integers(1, 128),
    k_max=st.none() | st.integers(1, 9),
    blocks=st.integers(1, 40),
    block_tokens=st.sampled_from([1, 3, 16]),
    watermark=st.sampled_from([0.0, 0.05, 0.2]),
    batch_time=BATCH_TIMES,
)
@memory_examples
def test_fast_engine_matches_the_reference_with_memory(requests, policy, budget, k_max, blocks,
                                                       block_tokens, watermark, batch_time) -> None:
    """Admission, watermark, recompute preemption (newest first) and refusal at arrival are
    exact in the fast engine: same requests, same batches, same memory metrics."""
    memory = KVCache(blocks * block_tokens, block_tokens=block_tokens, watermark=watermark)
    ref, fast = both(requests, policy, batch_time, budget, k_max, keep_batches=True, drain_s=1e6,
                     memory=memory)
    assert_same(ref, fast)
    assert ref.batches == fast.batches


@given(requests=workloads(), policy=st.sampled_from(SHIPPED), blocks=st.integers(2, 30))
@example(requests=QUEUE_OF_60, policy=SARATHI, blocks=30)
@example(requests=QUEUE_OF_60, policy=VLLM, blocks=30)
def test_fast_engine_matches_with_memory_when_cut_at_the_horizon(requests, policy, blocks) -> None:
    """A short drain stops a memory-limited run mid-way on the same batch in both engines."""
    memory = KVCache(blocks * 4, block_tokens=4, watermark=0.0)
    ref, fast = both(requests, policy, ConstantTime(1.0), 64, None, keep_batches=True, drain_s=3.0,
                     memory=memory)
    assert_same(ref, fast)
    assert ref.batches == fast.batches


@pytest.mark.parametrize("policy", [VLLM, ORCA, SARATHI, VLLM_CHUNKED])
def test_fast_engine_matches_a_long_thrashing_run(policy) -> None:
    """Hundreds of requests just below the cache's §4 limit, hundreds of preemptions: identical."""
    workload = make_workload("poisson", "64", "512", rate_per_s=11.5)
    memory = KVCache(32000, block_tokens=16, watermark=0.01)
    ref, fast = both(workload, policy, LinearTime(10.0, 0.05), 512, None, seed=1, max_requests=600,
                     memory=memory, keep_batches=True)
    assert ref.metrics.preemptions > 200
    assert_same(ref, fast)
    assert ref.batches == fast.batches


# ---------------------------------------------------------------- composition-aware batch times

SHAPE_TIMES = [
    CompositionTime(c=1.0, prefill=0.05, decode=0.1),
    CompositionTime(c=0.5, prefill=0.02, decode=0.05, kv=0.003, chunk=0.7, logit=0.2, floor=1.5),
    CompositionTime(c=2.0, prefill=0.01, decode=0.01, kv=0.05, floor=2.5),
]
shape_times = st.sampled_from(SHAPE_TIMES)


@given(
    requests=workloads(prefill_min=0),
    policy=policies,
    budget=st.integers(1, 128),
    k_max=st.none() | st.integers(1, 9),
    batch_time=shape_times,
    blocks=st.none() | st.integers(1, 40),
    drain_s=st.sampled_from([1e6, 3.0]),
)
@example(requests=[Request(0, 0.0, 1, 60), Request(1, 0.0, 0, 45)], policy=SARATHI, budget=128, k_max=None,
         batch_time=SHAPE_TIMES[2], blocks=None, drain_s=1e6)  # runs of more than 32 repeats
@example(requests=[Request(0, 0.0, 90, 10), Request(1, 0.5, 70, 5), Request(2, 0.5, 0, 4)],
         policy=VLLM_CHUNKED, budget=32, k_max=3, batch_time=SHAPE_TIMES[1], blocks=40, drain_s=1e6)
@example(requests=CUT_AT_3_S, policy=ORCA, budget=16, k_max=None, batch_time=SHAPE_TIMES[1], blocks=None,
         drain_s=3.0)
def test_fast_engine_matches_the_reference_with_shape_times(requests, policy, budget, k_max, batch_time,
                                                            blocks, drain_s) -> None:
    """A composition-aware batch time times every repeat from its own shape (growing contexts and
    chunk prefixes, a prompt's last chunk adding a logit row): same batches and requests as the
    reference engine, with and without a KV cache, also when the horizon cuts a run."""
    memory = None if blocks is None else KVCache(blocks * 4, block_tokens=4, watermark=0.05)
    ref, fast = both(requests, policy, batch_time, budget, k_max, keep_batches=True, drain_s=drain_s,
                     memory=memory)
    assert_same(ref, fast)
    assert ref.batches == fast.batches
