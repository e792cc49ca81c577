"""Composition-aware batch times in the engine: each batch is timed from its shape (prompt and
decode tokens, chunks, KV tokens read, logit rows), and the theory's token view of a mix."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import (
    BatchShape,
    CompositionTime,
    LinearTime,
    decode_context_tokens,
    mix_batch_time,
    parse_batch_time,
)
from llmqueue.model.specs import make_workload
from llmqueue.model.workload import fixed_requests
from llmqueue.policies.fcfs import ORCA, SARATHI, VLLM_CHUNKED
from llmqueue.sim.run import simulate

from .strategies import workloads


def test_hand_worked_shapes() -> None:
    """Sarathi b=8, one request of 10 prompt + 2 output tokens; t = 1 + 0.1 P + 0.2 D +
    0.01 KV + 0.5 C + 0.05 L. Chunk 8 (no logits): 2.3 ms; chunk 2 ending the prompt: 1.75 ms;
    decodes reading 11 and 12 cached tokens: 1.36 and 1.37 ms."""
    model = CompositionTime(c=1.0, prefill=0.1, decode=0.2, kv=0.01, chunk=0.5, logit=0.05)
    result = simulate(fixed_requests([(0.0, 10, 2)]), SARATHI, model, 8, keep_batches=True,
                      engine="reference")
    ends = [b.end_ms for b in result.batches]
    assert ends == pytest.approx([2.3, 4.05, 5.41, 6.78], abs=1e-12)
    (record,) = result.requests
    assert record.first_token_ms == pytest.approx(4.05) and record.finish_ms == pytest.approx(6.78)


def test_token_only_composition_equals_linear_time() -> None:
    """With only c and a per-token cost for both phases the model is LinearTime: same run."""
    requests = fixed_requests([(0.0, 30, 5), (1.0, 12, 9), (1.5, 7, 3)])
    a = simulate(requests, ORCA, CompositionTime(c=2.0, prefill=0.25, decode=0.25), 16)
    b = simulate(requests, ORCA, LinearTime(2.0, 0.25), 16, engine="reference")
    assert a.requests == b.requests


@given(requests=workloads(), kv=st.sampled_from([0.0, 0.003]), chunk=st.sampled_from([0.0, 0.7]))
def test_shape_runs_conserve_and_are_deterministic(requests, kv, chunk) -> None:
    model = CompositionTime(c=1.0, prefill=0.02, decode=0.05, kv=kv, chunk=chunk, logit=0.01)
    first = simulate(requests, VLLM_CHUNKED, model, 64)
    again = simulate(requests, VLLM_CHUNKED, model, 64)
    assert first.requests == again.requests
    assert first.metrics.completed == len(requests)


def test_decode_context_tokens_closed_form() -> None:
    """Request (p=4, d=3) reads 5, 6, 7 entries; (p=0, d=1) reads 1: mean 19 / 4."""
    assert decode_context_tokens([4, 0], [3, 1]) == pytest.approx(19 / 4)
    assert decode_context_tokens([5], [0]) == 0.0


def test_mix_time_is_the_steady_sarathi_batch() -> None:
    """129 + 112 tokens per request: 512 tokens split 238 decode + 274 prompt in 3 chunks."""
    model = CompositionTime(c=5.7, prefill=0.0, decode=0.036, chunk=4.6, floor=9.6)
    mix = mix_batch_time(model, 129, 112)
    shape = mix.shape(512)
    assert (shape.decode_tokens, shape.prefill_tokens, shape.prefill_chunks) == (238, 274, 3)
    assert mix(512) == pytest.approx(5.7 + 0.036 * 238 + 4.6 * 3)
    assert mix_batch_time(LinearTime(1, 2), 10, 10) == LinearTime(1, 2)


def test_mix_capacity_matches_saturated_simulation() -> None:
    """Overloaded Sarathi with a composition model sustains b / t_mix(b) tokens/s (within 3 %)."""
    model = CompositionTime(c=5.7, prefill=0.001, decode=0.036, kv=2e-5, chunk=4.6, floor=9.6)
    workload = make_workload("poisson", "129", "112", rate_per_s=150.0)
    mix = mix_batch_time(model, 129, 112, decode_context_tokens([129], [112]))
    predicted = 512 / mix(512) * 1000.0
    result = simulate(workload, SARATHI, model, 512, seed=2, max_requests=6000, drain_s=0.0)
    measured = result.metrics.total_token_throughput
    busy_rate = (result.metrics.mean_batch_tokens * result.metrics.num_batches
                 / result.metrics.duration_s)
    assert busy_rate == pytest.approx(predicted, rel=0.03)
    assert measured < predicted * 1.03


def test_composition_spec_errors() -> None:
    for spec in ("composition:c=1", "composition:c=1,prefill=0,decode=x",
                 "composition:c=1,prefill=0,decode=0,warp=2", "composition:c=0,prefill=1,decode=1",
                 "composition:c=1,prefill=-1,decode=0"):
        with pytest.raises(ConfigError) as err:
            parse_batch_time(spec)
        assert err.value.field == "batch-time"
    model = parse_batch_time("composition:c=1,prefill=0.5,decode=0.25,kv=0.001,chunk=2,logit=0,floor=3")
    assert parse_batch_time(model.spec) == model
    assert model.shape_time_ms(BatchShape(0, 1, decode_kv_tokens=10)) == 3.0  # the floor
