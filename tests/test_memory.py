"""KV-cache memory: sizing, admission with a watermark, recompute preemption (newest first).

A hand-worked example pins the exact dynamics; properties over random workloads and every
shipped policy check the memory invariants at every batch boundary, conservation of requests and
tokens (recomputed tokens included), progress, and that an unlimited cache changes nothing.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from llmqueue.engines.metrics import Recorder
from llmqueue.engines.reference import Engine
from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import ConstantTime, LinearTime, PiecewiseTime
from llmqueue.model.memory import KVCache, ModelShape, kv_bytes_per_token, parse_memory
from llmqueue.model.workload import Request, fixed_requests
from llmqueue.policies.fcfs import ORCA, SARATHI, VLLM, VLLM_CHUNKED
from llmqueue.sim.run import simulate

from .helpers import NEVER_FITS, PREEMPT, TIES, WATERMARK
from .strategies import SHIPPED, policies, workloads

# ---------------------------------------------------------------- sizing


def test_llama3_8b_kv_bytes_per_token() -> None:
    """32 layers x 8 KV heads x 128 dims x 2 (K and V) x 2 bytes = 128 KiB per token."""
    shape = ModelShape(layers=32, kv_heads=8, head_dim=128, dtype_bytes=2, params_billion=8.03)
    assert kv_bytes_per_token(shape) == 131072
    assert kv_bytes_per_token(shape, tensor_parallel=2) == 65536
    assert kv_bytes_per_token(shape, tensor_parallel=8) == 16384
    assert kv_bytes_per_token(shape, tensor_parallel=16) == 16384  # one head per GPU, replicated


def test_gpu_sizing_matches_hand_computation() -> None:
    """80 GiB x 0.9 minus 16.06 GB of weights, over 128 KiB per token, rounded down to blocks."""
    memory = parse_memory("gpu_gib=80,params_b=8.03,layers=32,kv_heads=8,head_dim=128")
    free = 80 * 0.9 * 2**30 - 8.03e9 * 2
    tokens = int(free // 131072)
    assert memory.capacity_tokens == tokens - tokens % 16
    assert memory.block_tokens == 16 and memory.watermark == 0.01
    assert memory.total_blocks == memory.capacity_tokens // 16
    assert memory.watermark_blocks == int(0.01 * memory.total_blocks)


def test_memory_spec_round_trip() -> None:
    memory = parse_memory("tokens=4096,block=32,watermark=0.05")
    assert parse_memory(memory.spec) == memory
    assert memory.blocks_for(33) == 2 and memory.blocks_for(32) == 1 and memory.blocks_for(0) == 0


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("tokens=0", "memory.tokens"),
        ("tokens=abc", "memory.tokens"),
        ("tokens=100,watermark=1.5", "memory.watermark"),
        ("tokens=100,block=0", "memory.block"),
        ("tokens=100,colour=red", "memory"),
        ("gpu_gib=80,layers=32", "memory"),
        ("gpu_gib=4,params_b=8,layers=32,kv_heads=8,head_dim=128", "memory"),
        ("tokens=100,gpu_gib=80", "memory"),
        ("", "memory"),
    ],
)
def test_bad_memory_specs_name_the_field(spec: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_memory(spec)
    assert err.value.field == field
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- exact dynamics


def test_hand_worked_preemption() -> None:
    """4 blocks of 16 tokens, no watermark; two requests of 16 + 32 tokens at t=0, Sarathi b=64,
    1 ms batches. Both prompts run at [0, 1]; decoding, A and B each need a 2nd block at their
    1st token and a 3rd when their context reaches 32 (t=17): the pool is full, so the newest
    (B) is preempted. A finishes at 33 (context 48 = 3 blocks); B, readmitted at 33, recomputes
    its 32 cached tokens in one chunk at [33, 34] and decodes its last 16 tokens by 50."""
    requests = fixed_requests([(0.0, 16, 32), (0.0, 16, 32)])
    memory = KVCache(64, block_tokens=16, watermark=0.0)
    result = simulate(requests, SARATHI, ConstantTime(1.0), 64, memory=memory)
    a, b = result.requests
    assert (a.first_token_ms, a.finish_ms) == (1.0, 33.0)
    assert (b.first_token_ms, b.finish_ms) == (1.0, 50.0)
    m = result.metrics
    assert (m.preemptions, m.recomputed_tokens, m.rejected_requests) == (1, 32, 0)
    assert m.num_batches == 50 and m.peak_kv_usage == 1.0
    # without the limit both finish together
    free = simulate(requests, SARATHI, ConstantTime(1.0), 64)
    assert [r.finish_ms for r in free.requests] == [33.0, 33.0]


def test_watermark_holds_back_admission() -> None:
    """100 blocks with a 10 % watermark: a 1,424-token prompt takes 89 blocks (11 left); a
    32-token prompt would leave 9 < 10, so it waits until the first request has left."""
    memory = KVCache(1600, block_tokens=16, watermark=0.1)
    requests = fixed_requests([(0.0, 1424, 1), (0.0, 32, 1)])
    result = simulate(requests, SARATHI, ConstantTime(1.0), 2048, memory=memory)
    big, small = result.requests
    assert (big.first_token_ms, big.finish_ms) == (1.0, 2.0)
    assert (small.first_token_ms, small.finish_ms) == (3.0, 4.0)
    assert result.metrics.preemptions == 0
    # without the watermark both prompts share the first batch
    loose = simulate(requests, SARATHI, ConstantTime(1.0), 2048,
                     memory=KVCache(1600, block_tokens=16, watermark=0.0))
    assert [r.first_token_ms for r in loose.requests] == [1.0, 1.0]


def test_request_that_can_never_fit_is_refused() -> None:
    memory = KVCache(256, block_tokens=16, watermark=0.0)
    requests = fixed_requests([(0.0, 200, 100), (1.0, 10, 10)])
    result = simulate(requests, SARATHI, ConstantTime(1.0), 512, memory=memory)
    assert result.metrics.rejected_requests == 1
    assert result.metrics.arrivals == 1 and result.metrics.completed == 1
    assert any("refused at arrival" in note for note in result.notes)


def test_vanilla_vllm_decodes_when_memory_refuses_every_prompt() -> None:
    """vLLM's prefill-first plan is all new prompts; with the cache full the engine asks again
    with only resident requests in view and runs their decode batch (no stall)."""
    memory = KVCache(96, block_tokens=16, watermark=0.0)
    requests = fixed_requests([(0.0, 64, 20), (0.5, 64, 5)])
    result = simulate(requests, VLLM, ConstantTime(1.0), 128, memory=memory)
    assert result.metrics.completed == 2 and result.metrics.stall_ms == 0.0
    first, second = result.requests
    assert first.finish_ms == 21.0  # 1 prompt batch + 20 decode batches back to back
    assert second.first_token_ms == 22.0  # admitted once the first freed its blocks


def test_engine_rejects_a_non_cache_memory() -> None:
    with pytest.raises(ConfigError) as err:
        Engine(SARATHI, ConstantTime(1.0), 64, memory=1000)  # type: ignore[arg-type]
    assert err.value.field == "memory"
    for engine in ("compiled", "fast", "auto"):
        with pytest.raises(ConfigError) as err:
            simulate(fixed_requests([(0.0, 1, 1)]), SARATHI, ConstantTime(1.0), 64,
                     memory=1000, engine=engine)  # type: ignore[arg-type]
        assert err.value.field == "memory"
    # a KV cache runs on every engine, the compiled loop included (tests/test_compiled.py)
    result = simulate(fixed_requests([(0.0, 1, 1)]), SARATHI, ConstantTime(1.0), 64,
                      memory=KVCache(64), engine="compiled")
    assert result.metrics.completed == 1


# ---------------------------------------------------------------- properties


def _run_checked(requests: list[Request], policy, memory: KVCache, budget: int,
                 k_max: int | None) -> tuple[Engine, Recorder]:
    """Drive an engine by hand and check the memory invariants at every batch boundary."""
    recorder = Recorder()
    eng = Engine(policy, LinearTime(1.0, 0.1), budget, k_max, recorder=recorder, memory=memory)
    pending = list(requests)
    steps = 0
    while True:
        t = eng.next_event_ms()
        if pending and pending[0].arrival_ms <= t:
            eng.submit(pending.pop(0))
            continue
        if math.isinf(t):
            break
        eng.step()
        steps += 1
        assert steps < 200_000, "no progress"
        jobs = eng.jobs()
        held = sum(job.blocks for job in jobs)
        assert held + eng.state.free_blocks == memory.total_blocks  # blocks are conserved
        assert eng.state.free_blocks >= 0
        for job in jobs:
            if eng.busy:
                continue
            # between batches a request holds exactly the blocks of its cached tokens
            assert job.blocks == memory.blocks_for(job.cached)
            assert job.cached + job.prefill_left + job.decode_left == job.prefill_tokens + job.decode_tokens
    return eng, recorder


@given(
    requests=workloads(prefill_min=0),
    policy=policies,
    blocks=st.integers(1, 30),
    block_tokens=st.sampled_from([1, 4, 16]),
    watermark=st.sampled_from([0.0, 0.05, 0.2]),
    k_max=st.none() | st.integers(1, 5),
)
@example(requests=PREEMPT, policy=SARATHI, blocks=4, block_tokens=16, watermark=0.0, k_max=None)
@example(requests=NEVER_FITS, policy=VLLM_CHUNKED, blocks=10, block_tokens=3, watermark=0.2, k_max=2)
@example(requests=WATERMARK, policy=VLLM, blocks=5, block_tokens=16, watermark=0.2, k_max=None)
@example(requests=TIES, policy=ORCA, blocks=1, block_tokens=16, watermark=0.0, k_max=1)
def test_memory_invariants_and_progress(requests, policy, blocks, block_tokens, watermark,
                                        k_max) -> None:
    budget = 128  # every prompt (<= 90 tokens) fits, so non-chunking policies can serve all
    memory = KVCache(blocks * block_tokens, block_tokens=block_tokens, watermark=watermark)
    eng, recorder = _run_checked(requests, policy, memory, budget, k_max)
    fits = [r for r in requests if memory.fits_alone(r.prefill_tokens + r.decode_tokens)]
    metrics = recorder.finish(max(eng.now_ms, 1.0))
    # every request that can fit completes (progress: the oldest resident is never a victim
    # unless alone); the others were refused at arrival
    assert metrics.completed == len(fits)
    assert metrics.rejected_requests == len(requests) - len(fits)
    assert eng.in_system == 0 and eng.state.free_blocks == memory.total_blocks
    # tokens: every arrived token plus every recomputed one was processed exactly once
    processed = recorder.totals.batch_tokens
    arrived = sum(r.prefill_tokens + r.decode_tokens for r in fits)
    assert processed == arrived + metrics.recomputed_tokens


@given(requests=workloads(prefill_min=0), policy=st.sampled_from(SHIPPED),
       k_max=st.none() | st.integers(1, 5))
@example(requests=TIES, policy=VLLM, k_max=1)
def test_unlimited_memory_changes_nothing(requests, policy, k_max) -> None:
    """A cache larger than everything, with no watermark, gives the paper's model exactly."""
    memory = KVCache(1 << 20, block_tokens=16, watermark=0.0)
    base = simulate(requests, policy, LinearTime(1.0, 0.1), 128, k_max=k_max, engine="reference")
    limited = simulate(requests, policy, LinearTime(1.0, 0.1), 128, k_max=k_max, memory=memory)
    assert limited.requests == base.requests
    assert limited.metrics.preemptions == 0
    assert limited.metrics.num_batches == base.metrics.num_batches


@pytest.mark.parametrize("policy", [SARATHI, ORCA, VLLM_CHUNKED])
def test_tight_memory_costs_latency_not_requests(policy) -> None:
    """Poisson load 0.6 with a cache for ~3 mean requests: all finish, some are preempted."""
    from llmqueue.model.specs import make_workload

    workload = make_workload("poisson", "lognormal:mean=200,sigma=0.5", "lognormal:mean=150,sigma=0.5",
                             rate_per_s=2.0)
    bt = LinearTime(10.0, 0.02)
    base = simulate(workload, policy, bt, 512, seed=3, max_requests=400)
    tight = simulate(workload, policy, bt, 512, seed=3, max_requests=400,
                     memory=KVCache(1600, block_tokens=16, watermark=0.0))
    assert tight.metrics.completed + tight.metrics.rejected_requests == 400
    assert tight.metrics.preemptions > 0
    assert tight.metrics.latency["mean_e2el_ms"] > base.metrics.latency["mean_e2el_ms"]


MEMORY_CASES = [
    ("64", "512", 32000, LinearTime(10.0, 0.05)),
    ("lognormal:mean=300,sigma=0.6", "lognormal:mean=300,sigma=0.6", 40000,
     PiecewiseTime(12.0, 0.04, 128)),
]


@pytest.mark.parametrize(("prefill", "decode", "tokens", "bt"), MEMORY_CASES)
def test_memory_binds_where_the_theory_says(prefill, decode, tokens, bt) -> None:
    """Where the token budget alone gives load < 0.5, a cache of ~90 mean requests binds: at
    1.05 of its §4 limit the run is unstable while the same run without the limit is not; at
    0.6 of it both are stable. (Near the limit preemption thrash costs 13-22 %: the limit is an
    upper bound; the saturated rate, tests/test_saturation.py, is where stability ends.)"""
    from llmqueue.model.specs import make_workload
    from llmqueue.theory import capacity as theory

    memory = KVCache(tokens, block_tokens=16, watermark=0.01)
    probe = make_workload("poisson", prefill, decode, rate_per_s=1.0)
    p, d = probe.mean_prefill_tokens, probe.mean_decode_tokens
    rho, k = theory.memory_load(1.0, p, d, bt, 512, None, memory)
    limit = 1.0 / rho
    assert theory.load(limit, bt, 512, p + d) < 0.7  # the token budget alone is far from binding
    assert k == theory.memory_batch_limit(memory, p, d)
    for fraction, verdict in ((1.05, "unstable"), (0.6, "stable")):
        workload = make_workload("poisson", prefill, decode, rate_per_s=fraction * limit)
        limited = simulate(workload, SARATHI, bt, 512, seed=1, max_requests=2500, memory=memory,
                           keep_requests=False)
        free = simulate(workload, SARATHI, bt, 512, seed=1, max_requests=2500, keep_requests=False)
        assert limited.observed.verdict == verdict
        assert free.observed.verdict != "unstable"
        assert free.predicted.verdict == "stable"  # the scalar condition alone says stable
        assert limited.predicted.verdict == ("unstable" if fraction > 1 else "no guarantee")


def test_memory_batch_limit_closed_form() -> None:
    """Usable (2000 - 20) blocks x 16 tokens over a footprint p + (d + 1)/2 + 7.5 tokens."""
    from llmqueue.theory import capacity as theory

    memory = KVCache(32000, block_tokens=16, watermark=0.01)
    assert theory.memory_batch_limit(memory, 64, 512) == int(1980 * 16 // (64 + 256.5 + 7.5))
    assert theory.memory_batch_limit(memory, 64, 512, decode_context_tokens=100) == int(31680 // 107.5)


def test_cli_memory_warning_region_and_bad_spec() -> None:
    """capacity warns when memory binds where the token budget says stable; region takes the
    cache's batch-size limit; a bad spec exits 2 with one line naming the field."""
    import json

    from click.testing import CliRunner

    from llmqueue.cli.app import cli

    args = ["--prefill", "64", "--decode", "512", "--batch-time", "linear:c=10,a=0.05",
            "--memory", "tokens=32000", "--rate", "12.8", "--json"]
    out = CliRunner().invoke(cli, ["capacity", *args])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["load"] < 1 <= doc["memory_load"] and doc["binding"] == "memory"
    assert doc["effective_k_max"] == 96 and "memory binds" in doc["warning"]
    out = CliRunner().invoke(cli, ["region", *args])
    assert out.exit_code == 0, out.output
    region_doc = json.loads(out.output)
    assert region_doc["k_max"] == 96
    assert region_doc["region_load"] == pytest.approx(doc["memory_load"], rel=1e-9)
    bad = CliRunner().invoke(cli, ["simulate", "--memory", "tokens=lots"])
    assert bad.exit_code == 2
    assert "memory.tokens" in bad.output and "Traceback" not in bad.output
