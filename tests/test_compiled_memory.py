"""The compiled loop's compact tails (``llmqueue.engines.kernel``, "Compact tails") against the reference.

The compiled loop keeps request slots only for the heads of its queues (the prompts and waiting
decoders a step can reach); deeper requests are compact records, moved into slots as the heads
shorten. Here the margin past that depth is 0, the slots and the record rings start tiny (every
kind of growth, rings that wrap) and budgets are small, so requests move in and out of the compact
tails all the time: the runs must equal the reference engine's, and equal to the bit the compiled
runs that keep every request in a slot. With and without a KV cache (preemption, watermark, refusal,
prompt-less requests arriving while prompts are compact), cut at the horizon, on long vanilla-vLLM
and Sarathi-Serve queues, with a binding k_max, and in a network.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from llmqueue.engines import compiled
from llmqueue.model.batchtime import ConstantTime, LinearTime
from llmqueue.model.memory import KVCache
from llmqueue.model.network import Network, parse_network
from llmqueue.model.specs import make_workload
from llmqueue.model.workload import Request
from llmqueue.policies.fcfs import KFCFS, ORCA, SARATHI, VLLM, VLLM_CHUNKED
from llmqueue.sim.network import simulate_network
from llmqueue.sim.run import simulate
from llmqueue.theory.capacity import critical_rate_per_s
from llmqueue.theory.network import analyze

from .helpers import BATCH_TIMES, TIES, SometimesZero, assert_same, examples
from .strategies import policies
from .strategies import workloads as shared_workloads

NEVER = 1 << 40
"""A margin that keeps every request in a slot."""


@contextmanager
def tails(margin: int = 0, slots: int = 2, ring: int = 1) -> Iterator[list[compiled._State]]:
    """Compiled runs with this slotted margin, starting with this many slots and ring records;
    yields the list of the kernel states created meanwhile (to check the tails were used)."""
    saved = compiled.SLOTTED_MARGIN, compiled._State.START_SLOTS, compiled._State.START_RING
    init = compiled._State.__init__
    states: list[compiled._State] = []

    def recording(self: compiled._State, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)
        states.append(self)

    compiled.SLOTTED_MARGIN, compiled._State.START_SLOTS, compiled._State.START_RING = margin, slots, ring
    compiled._State.__init__ = recording  # type: ignore[method-assign]
    try:
        yield states
    finally:
        compiled.SLOTTED_MARGIN, compiled._State.START_SLOTS, compiled._State.START_RING = saved
        compiled._State.__init__ = init  # type: ignore[method-assign]


def used_tails(states: list[compiled._State]) -> tuple[bool, bool]:
    """Whether any prompt, any waiting decoder was ever a compact record (rings keep what was
    written: prompts and decoders have tokens > 0 there)."""
    from llmqueue.engines import kernel  # here, not at the top: collecting must not wait for the compile
    prompts = any((s.lp_i[:, kernel.LZ_PRE] > 0).any() for s in states)
    decoders = any((s.lw_i[:, kernel.LZ_DEC] > 0).any() for s in states)
    return prompts, decoders


def _text(result) -> str:
    """Everything a run reports, floats exactly (repr), NaN included."""
    metrics = json.dumps(result.metrics.as_dict(), sort_keys=True, default=repr)
    return metrics + repr(result.requests) + repr(result.notes)


def compact_run(requests, policy, batch_time, budget, k_max, **kwargs):
    """The reference run, and the compiled run with compact tails: the same (assert_same), and the
    same to the bit as the compiled run without them. Returns (reference, compiled, states)."""
    ref = simulate(requests, policy, batch_time, budget, k_max=k_max, engine="reference", **kwargs)
    with tails() as states:
        fast = simulate(requests, policy, batch_time, budget, k_max=k_max, engine="compiled", **kwargs)
    assert_same(ref, fast)
    assert fast.notes == ref.notes
    with tails(margin=NEVER, slots=1024, ring=1024):
        slotted = simulate(requests, policy, batch_time, budget, k_max=k_max, engine="compiled", **kwargs)
    assert _text(fast) == _text(slotted)
    return ref, fast, states


@st.composite
def short_requests(draw: st.DrawFn) -> list[Request]:
    """Up to 60 requests of 0-4 prompt and 0-8 output tokens, mostly in bursts: a budget of a few
    tokens plans many prompts at once, and the batch that finishes them drops them all from the
    head of the queue just before the next plan reads it."""
    out = []
    t = 0.0
    for i in range(draw(st.integers(1, 60))):
        t += draw(st.sampled_from([0.0, 0.0, 0.0, 0.5, 1.0, 3.0]))
        prefill = draw(st.integers(0, 4))
        out.append(Request(i, t, prefill, draw(st.integers(0 if prefill else 1, 8))))
    return out


def workloads() -> st.SearchStrategy[list[Request]]:
    """Random workloads with prompt-less and prompt-only requests (they reorder the decoders), and
    deep queues of short requests."""
    return shared_workloads(prefill_min=0, decode_min=0) | short_requests()


BURST_OF_ONES = [Request(i, 0.0, 1, 1 + i % 3) for i in range(24)]
"""A budget of 4 plans four 1-token prompts; they finish and leave together: the next plan reads
the queue right after the head lost a whole budget of prompts."""


QUEUE = [Request(i, 0.0, 1 + i % 5, 1 + i % 7) for i in range(30)] + [
    Request(30, 2.0, 0, 3), Request(31, 2.0, 4, 2), Request(32, 5.0, 0, 1), Request(33, 9.0, 3, 0)]
"""A queue far deeper than a budget of 2 reaches, then prompt-less requests younger than waiting
prompts (with a KV cache they slot the compact prompts), and a prompt-only one."""
TIES_4 = [Request(6 * k + r.id, r.arrival_ms + 4.0 * k, r.prefill_tokens, r.decode_tokens)
          for k in range(4) for r in TIES]
"""helpers.TIES four times over: arrivals on batch boundaries, prompt-less and prompt-only ones."""


@given(requests=workloads(), policy=policies, budget=st.integers(1, 6), k_max=st.none() | st.integers(1, 9),
       batch_time=BATCH_TIMES, drain_s=st.sampled_from([1e6, 0.0, 0.5, 3.0]))
@settings(max_examples=examples(35))
@example(requests=QUEUE, policy=VLLM, budget=2, k_max=None, batch_time=ConstantTime(1.0), drain_s=1e6)
@example(requests=BURST_OF_ONES, policy=VLLM, budget=4, k_max=None, batch_time=ConstantTime(1.0), drain_s=1e6)
@example(requests=BURST_OF_ONES, policy=VLLM_CHUNKED, budget=4, k_max=None, batch_time=ConstantTime(1.0),
         drain_s=1e6)
@example(requests=QUEUE, policy=VLLM_CHUNKED, budget=3, k_max=2, batch_time=ConstantTime(1.0), drain_s=0.0)
@example(requests=TIES_4, policy=SARATHI, budget=1, k_max=1, batch_time=LinearTime(0.5, 0.0625),
         drain_s=1e6)
def test_compact_tails_match_the_reference(requests, policy, budget, k_max, batch_time, drain_s) -> None:
    """Every shipped policy and random (K_p, K_d)-FCFS knobs, k_max, prompt-less requests younger
    than compact decoders (inserted among them), runs cut at the horizon (compact requests are
    pending records)."""
    compact_run(requests, policy, batch_time, budget, k_max, drain_s=drain_s)


@given(requests=workloads(), policy=policies, budget=st.integers(1, 8), k_max=st.none() | st.integers(1, 9),
       blocks=st.integers(1, 40), block_tokens=st.sampled_from([1, 3, 16]),
       watermark=st.sampled_from([0.0, 0.05, 0.2]), drain_s=st.sampled_from([1e6, 0.0, 3.0]))
@settings(max_examples=examples(35))
@example(requests=QUEUE, policy=ORCA, budget=2, k_max=None, blocks=12, block_tokens=3, watermark=0.0,
         drain_s=1e6)
@example(requests=BURST_OF_ONES, policy=VLLM, budget=4, k_max=None, blocks=40, block_tokens=1, watermark=0.0,
         drain_s=1e6)
@example(requests=QUEUE, policy=VLLM, budget=4, k_max=3, blocks=6, block_tokens=1, watermark=0.2,
         drain_s=0.0)
def test_compact_tails_match_the_reference_with_memory(requests, policy, budget, k_max, blocks, block_tokens,
                                                       watermark, drain_s) -> None:
    """A KV cache: admission and the watermark, preemption pushing requests back among the slotted
    prompts, the resident-only re-plan, refusal at arrival, and prompt-less requests arriving
    while prompts are compact (they move into slots first)."""
    memory = KVCache(blocks * block_tokens, block_tokens=block_tokens, watermark=watermark)
    compact_run(requests, policy, ConstantTime(1.0), budget, k_max, drain_s=drain_s, memory=memory)


@pytest.mark.parametrize(("policy", "k_max", "decoders"), [(VLLM, None, True), (SARATHI, None, False),
                                                          (VLLM_CHUNKED, 6, False)])
def test_long_unstable_queues_match_the_reference(policy, k_max, decoders) -> None:
    """Twice the critical load, cut at the horizon with most requests left: vanilla vLLM piles up
    waiting decoders, Sarathi-Serve and current vLLM (a binding k_max: its work-conservation audit
    reads the compact prompts' sizes) pile up prompts."""
    batch_time = LinearTime(2.0, 0.1)
    rate = 2.0 * critical_rate_per_s(batch_time, 16, 8 + 20)
    workload = make_workload("poisson", "poisson:8", "geometric:20", rate)
    _, fast, states = compact_run(workload, policy, batch_time, 16, k_max, seed=3, max_requests=1500,
                                  drain_s=1.0)
    assert fast.metrics.incomplete > 500
    assert used_tails(states)[1 if decoders else 0]


@pytest.mark.parametrize(("policy", "tokens"), [(VLLM, 200), (SARATHI, 60)])
def test_prompt_less_arrivals_slot_the_compact_prompts_under_memory(policy, tokens) -> None:
    """With a KV cache, a prompt-less request arriving behind compact prompts moves them into slots
    (if it were preempted it would wait behind them): hundreds of preemptions and of requests
    present."""
    requests = [Request(i, 0.5 * i, 0 if i % 9 == 4 else 1 + i % 8, 4 + i % 23) for i in range(600)]
    memory = KVCache(tokens, block_tokens=4, watermark=0.0)
    _, fast, states = compact_run(requests, policy, ConstantTime(1.0), 8, None, memory=memory, drain_s=1e6)
    assert fast.metrics.completed == 600
    assert fast.metrics.preemptions > 500
    assert used_tails(states)[0]


def test_a_long_compiled_run_is_the_same_with_and_without_compact_tails() -> None:
    """20,000 requests of vanilla vLLM at 1.5 times capacity: identical to the bit, rings grown
    many times (wrapped), almost every request compact."""
    batch_time = LinearTime(2.0, 0.1)
    workload = make_workload("poisson", "poisson:10", "geometric:40",
                             1.5 * critical_rate_per_s(batch_time, 32, 10 + 40))
    runs = []
    for margin, slots, ring in ((0, 2, 1), (compiled.SLOTTED_MARGIN, 1024, 1024), (NEVER, 1024, 1024)):
        with tails(margin, slots, ring) as states:
            runs.append(simulate(workload, VLLM, batch_time, 32, seed=5, max_requests=20_000,
                                 drain_s=1.0, engine="compiled"))
        if margin == 0:
            assert states[0].lw_i.shape[0] > 5000 and states[0].cap < 200
    assert runs[0].metrics.incomplete > 5000
    assert _text(runs[0]) == _text(runs[1]) == _text(runs[2])


def test_a_ring_that_wraps_keeps_its_order_when_it_grows() -> None:
    """_State._grow_ring: a full ring whose records wrap past its end keeps them in order."""
    from llmqueue.engines import kernel
    state = compiled._State(SARATHI, ConstantTime(1.0), 8, None)
    rows = state.lp_i.shape[0]
    state.lp_i[:, kernel.LZ_SEQ] = (np.arange(rows) - 700) % rows  # record k at row (700 + k) % rows
    state.lp_f[:, kernel.LZ_ARR] = state.lp_i[:, kernel.LZ_SEQ]
    state.si[kernel.LP_HEAD], state.si[kernel.LP_LEN] = 700, rows
    state.si[kernel.WANT_LP] = rows + 1
    state.more_slots()
    head, size = int(state.si[kernel.LP_HEAD]), state.lp_i.shape[0]
    order = (head + np.arange(rows)) % size
    assert size >= rows * compiled._State.RING_GROWTH
    assert state.lp_i[order, kernel.LZ_SEQ].tolist() == list(range(rows))
    assert state.lp_f[order, kernel.LZ_ARR].tolist() == list(range(rows))


def test_an_overloaded_network_is_the_same_with_compact_tails() -> None:
    """Two vanilla-vLLM engines in series, overloaded, some visits prompt-less: the compiled network
    loop with compact tails equals the one without (to the bit) and the Python engines' run."""
    data = {
        "engines": {"a": {"budget": 16, "batch_time": "linear:c=2,a=0.05", "policy": "vllm"},
                    "b": {"budget": 16, "batch_time": "linear:c=2,a=0.05", "policy": "sarathi"}},
        "classes": {"task": {"rate": 1.0, "start": "first", "nodes": {
            "first": {"engine": "a", "prefill": "poisson:6", "decode": "geometric:30", "next": "second"},
            "second": {"engine": "b", "prefill": "poisson:40", "decode": "poisson:5", "next": "exit"}}}},
    }
    net = parse_network(data)
    spec = net.classes["task"]
    first = spec.nodes["first"]
    nodes = {**spec.nodes, "first": dataclasses.replace(first, prefill=SometimesZero(first.prefill, 0.2))}
    net = Network(net.engines, {"task": dataclasses.replace(spec, nodes=nodes)})
    net = net.scaled(2.0 * analyze(net).critical_scale)
    run = {"seed": 2, "max_requests": 1500, "drain_s": 0.5}
    with tails() as states:
        compact = simulate_network(net, engine="compiled", **run).to_dict()
    with tails(margin=NEVER, slots=1024, ring=1024):
        slotted = simulate_network(net, engine="compiled", **run).to_dict()
    assert json.dumps(compact, sort_keys=True) == json.dumps(slotted, sort_keys=True)
    assert all(used_tails(states))
    fast = simulate_network(net, engine="fast", **run).to_dict()
    _close(fast, compact)


def _close(a: object, b: object, path: str = "") -> None:
    """Equal JSON-like documents, floats to a relative 1e-9."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or b == pytest.approx(a, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


def test_kfcfs_knobs_with_compact_tails() -> None:
    """Prefill-first non-mixed and k_p/k_d limits on a deep queue with prompt-less requests."""
    for policy in (KFCFS(priority="prefill", mixed=False, chunked=False), KFCFS(k_p=2, k_d=3)):
        compact_run(QUEUE, policy, ConstantTime(1.0), 3, None, drain_s=1e6)
