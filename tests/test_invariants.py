"""Invariants of the engine, checked by an independent replay of every batch (see docs/invariants.md).

Over random workloads and policies (hypothesis): every batch obeys the batch rules; requests and
tokens are conserved; work-conserving policies never leave budget unused while demand waits; an
idle engine starts at an arrival; timestamps agree with the batches.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from llmqueue.engines.reference import Engine
from llmqueue.errors import PlanError
from llmqueue.model.batchtime import ConstantTime, LinearTime, StaircaseTime
from llmqueue.model.workload import Request
from llmqueue.policies.fcfs import FASTERTRANSFORMER, ORCA, SARATHI, VLLM, VLLM_CHUNKED
from llmqueue.policies.view import EngineView
from llmqueue.sim.run import simulate

from .helpers import BURST, TIES
from .strategies import policies


@st.composite
def requests_strategy(draw: st.DrawFn) -> list[Request]:
    n = draw(st.integers(1, 25))
    t = 0.0
    out = []
    for i in range(n):
        t += draw(st.sampled_from([0.0, 0.25, 1.0, 3.0, 17.5]))
        prefill = draw(st.integers(0, 40))
        decode = draw(st.integers(0 if prefill else 1, 12))
        out.append(Request(i, t, prefill, decode))
    return out


batch_time_strategy = st.sampled_from(
    [ConstantTime(1.0), LinearTime(2.0, 0.25), StaircaseTime(1.0, 3.0, 8)]
)


def replay(
    requests: list[Request], result, policy, budget: int, k_max: int | None, batch_time
) -> None:
    """Re-derive the state before every batch and check the rules and the recorded times."""
    prefill_left = {r.id: r.prefill_tokens for r in requests}
    decode_left = {r.id: r.decode_tokens for r in requests}
    first: dict[int, float] = {r.id: r.arrival_ms for r in requests if r.prefill_tokens == 0}
    finish: dict[int, float] = {}
    wc = getattr(policy, "work_conserving", False) and k_max is None
    prev_end = 0.0
    for batch in result.batches:
        present = [
            r for r in requests
            if r.arrival_ms <= batch.start_ms and (prefill_left[r.id] or decode_left[r.id])
        ]
        ids = {r.id for r in present}
        assert batch.start_ms >= prev_end
        if batch.start_ms > prev_end:
            # idle engine: the batch starts at an arrival
            assert any(r.arrival_ms == batch.start_ms for r in requests)
            if wc:  # a work-conserving engine is never idle while work waits
                assert all(
                    r.arrival_ms == batch.start_ms or r.arrival_ms > prev_end for r in present
                )
        demand = sum(prefill_left[i] for i in ids) + sum(
            1 for i in ids if not prefill_left[i] and decode_left[i]
        )
        tokens = 0
        for rid, n in batch.plan:
            assert rid in ids, "plan names a request not present"
            if prefill_left[rid]:
                assert prefill_left[rid] >= n >= 1
                prefill_left[rid] -= n
                if prefill_left[rid] == 0:
                    first[rid] = batch.end_ms
            else:
                assert n == 1 and decode_left[rid] >= 1
                decode_left[rid] -= 1
            if not prefill_left[rid] and not decode_left[rid]:
                finish[rid] = batch.end_ms
            tokens += n
        assert len({rid for rid, _ in batch.plan}) == len(batch.plan)
        assert budget >= tokens >= 1
        assert k_max is None or len(batch.plan) <= k_max
        assert batch.end_ms - batch.start_ms == pytest.approx(batch_time(tokens))
        if wc:
            assert tokens == min(budget, demand)
        prev_end = batch.end_ms
    # Conservation: every request is either finished (all tokens processed) or still present.
    records = {r.id: r for r in result.requests}
    assert len(records) == len(requests) == result.metrics.arrivals
    assert result.metrics.completed + result.metrics.incomplete == len(requests)
    assert result.metrics.completed == len(finish)
    for r in requests:
        rec = records[r.id]
        if r.id in finish:
            assert rec.finish_ms == finish[r.id] and rec.first_token_ms == first[r.id]
        else:
            assert math.isnan(rec.finish_ms)


@given(
    requests=requests_strategy(),
    policy=policies,
    budget=st.integers(1, 48),
    k_max=st.none() | st.integers(1, 8),
    batch_time=batch_time_strategy,
)
@example(requests=TIES, policy=SARATHI, budget=4, k_max=None, batch_time=ConstantTime(1.0))
@example(requests=BURST, policy=VLLM, budget=1, k_max=1, batch_time=StaircaseTime(1.0, 3.0, 8))
def test_every_batch_obeys_the_rules(requests, policy, budget, k_max, batch_time) -> None:
    result = simulate(
        requests, policy, batch_time, budget, k_max=k_max, keep_batches=True, drain_s=1e6
    )
    replay(requests, result, policy, budget, k_max, batch_time)
    wc_policy = getattr(policy, "work_conserving", False) and k_max is None
    if wc_policy:
        assert result.metrics.wc_violations == 0
        assert result.metrics.completed == len(requests)  # a WC engine always drains
    chunking = getattr(policy, "chunks_prefill", True)
    if chunking and k_max is None:
        assert result.metrics.completed == len(requests)


@given(requests=requests_strategy(), budget=st.integers(1, 48))
@example(requests=TIES, budget=3)
def test_work_conserving_policies_fill_the_budget(requests, budget) -> None:
    for policy in (ORCA, SARATHI, VLLM_CHUNKED):
        result = simulate(requests, policy, ConstantTime(1.0), budget, keep_batches=True)
        assert result.metrics.wc_violations == 0
        assert result.metrics.wc_wasted_tokens == 0
        replay(requests, result, policy, budget, None, ConstantTime(1.0))


def test_backlog_integral_matches_requests() -> None:
    """Little's law on a drained run: mean number in system = sum of sojourn times / duration."""
    requests = [Request(i, 3.0 * i, 5 + i % 7, 1 + i % 5) for i in range(60)]
    result = simulate(requests, SARATHI, ConstantTime(2.0), 8)
    recs = result.requests
    assert recs is not None and result.metrics.completed == 60
    sojourn = sum(r.finish_ms - r.arrival_ms for r in recs)
    duration_ms = result.metrics.duration_s * 1000
    assert result.metrics.mean_requests_in_system == pytest.approx(sojourn / duration_ms)


def test_same_seed_same_result() -> None:
    requests = [Request(i, 1.5 * i, 9, 4) for i in range(40)]
    a = simulate(requests, ORCA, ConstantTime(1.0), 16).to_dict()
    b = simulate(requests, ORCA, ConstantTime(1.0), 16).to_dict()
    assert repr(a) == repr(b)


def test_two_engines_do_not_interfere() -> None:
    """No shared state: interleaving two engines gives the same batches as running each alone."""
    reqs = [Request(i, 2.0 * i, 7, 3) for i in range(20)]

    def alone(policy):
        e = Engine(policy, ConstantTime(1.0), 8, keep_batches=True)
        for r in reqs:
            while e.next_event_ms() < r.arrival_ms:
                e.step()
            e.submit(r)
        while e.next_event_ms() < math.inf:
            e.step()
        return e.batches

    e1 = Engine(SARATHI, ConstantTime(1.0), 8, keep_batches=True)
    e2 = Engine(VLLM, ConstantTime(1.0), 8, keep_batches=True)
    for r in reqs:
        for e in (e1, e2):
            while e.next_event_ms() < r.arrival_ms:
                e.step()
            e.submit(r)
    for e in (e1, e2):
        while e.next_event_ms() < math.inf:
            e.step()
    assert e1.batches == alone(SARATHI)
    assert e2.batches == alone(VLLM)


@pytest.mark.parametrize(
    ("bad_plan", "rule"),
    [
        (lambda v: {v.decoding[0].id: 2}, "one decode token per request"),
        (lambda v: {v.prefilling[0].id: 99}, "prefill before decode"),
        (lambda v: {v.prefilling[0].id: 0}, "positive tokens"),
        (lambda v: {12345: 1}, "known request"),
        (lambda v: {r.id: 1 for r in v.decoding}, "token budget"),
        (lambda v: {v.decoding[0].id: 1, v.decoding[1].id: 1}, "batch-size limit"),
    ],
)
def test_broken_plans_are_rejected_naming_the_rule(bad_plan, rule: str) -> None:
    def policy(view: EngineView) -> dict[int, int]:
        return bad_plan(view)

    budget, k_max = (2, None) if rule == "token budget" else (50, 1 if "limit" in rule else None)
    requests = [Request(i, 0.0, 0, 2) for i in range(3)] + [Request(3, 0.0, 5, 1)]
    with pytest.raises(PlanError) as err:
        simulate(requests, policy, ConstantTime(1.0), budget, k_max=k_max)
    assert err.value.rule == rule
    assert rule in str(err.value) and "\n" not in str(err.value)


def test_unservable_prompt_is_reported_not_hung() -> None:
    """A prompt larger than the budget under a non-chunking policy can never be served."""
    requests = [Request(0, 0.0, 10, 2), Request(1, 1.0, 600, 5), Request(2, 2.0, 10, 2)]
    for policy in (VLLM, FASTERTRANSFORMER):
        result = simulate(requests, policy, ConstantTime(1.0), 512)
        assert result.metrics.completed == 1
        assert result.metrics.incomplete == 2
        assert any("can never be served" in note for note in result.notes)
        assert any("stalled" in note for note in result.notes)
    ok = simulate(requests, SARATHI, ConstantTime(1.0), 512)
    assert ok.metrics.completed == 3 and not ok.notes


@given(
    requests=requests_strategy().map(
        lambda rs: [Request(r.id, r.arrival_ms, max(r.prefill_tokens, 1), r.decode_tokens) for r in rs]
    ),
    budget=st.integers(1, 48),
    k_max=st.none() | st.integers(1, 8),
)
def test_vllm_chunked_matches_sarathi_with_the_same_k_max(requests, budget, k_max) -> None:
    """docs/policies.md: without KV limits and with FCFS admission, current vLLM = Sarathi."""
    a = simulate(requests, VLLM_CHUNKED, ConstantTime(1.0), budget, k_max=k_max, keep_batches=True)
    b = simulate(requests, SARATHI, ConstantTime(1.0), budget, k_max=k_max, keep_batches=True)
    assert [(x.start_ms, sorted(x.plan)) for x in a.batches] == [
        (x.start_ms, sorted(x.plan)) for x in b.batches
    ]
