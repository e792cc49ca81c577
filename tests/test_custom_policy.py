"""The documented way to plug in your own policy (examples/custom_policy.py) works as documented."""

from __future__ import annotations

import importlib.util

from hypothesis import given
from hypothesis import strategies as st

from llmqueue import SARATHI, ConstantTime, StaircaseTime, make_workload
from llmqueue.model.workload import Request
from llmqueue.sim.run import simulate

from .conftest import ROOT

_spec = importlib.util.spec_from_file_location("custom_policy", ROOT / "examples" / "custom_policy.py")
assert _spec is not None and _spec.loader is not None
custom = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(custom)
policy = custom.shortest_prompt_first


@given(
    sizes=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 8)), min_size=1, max_size=30),
    budget=st.integers(1, 64),
    k_max=st.none() | st.integers(1, 6),
)
def test_custom_policy_obeys_the_rules_and_conserves_work(sizes, budget, k_max) -> None:
    requests = [Request(i, 2.0 * i, p, d) for i, (p, d) in enumerate(sizes)]
    result = simulate(requests, policy, ConstantTime(1.0), budget, k_max=k_max, keep_batches=True)
    assert result.metrics.completed == len(requests)  # the engine checked every plan
    assert result.policy == "shortest-prompt-first"
    if k_max is None:
        assert result.metrics.wc_violations == 0
    for batch in result.batches or ():
        assert len(batch.plan) <= (k_max or len(requests))


def test_shortest_prompt_first_cuts_mean_ttft() -> None:
    """Serving short prompts first lowers mean TTFT against FCFS Sarathi at the same load."""
    workload = make_workload("poisson", "lognormal:mean=400,sigma=1", "geometric:120", 5.0)
    t = StaircaseTime(11.28, 35.47, 128)
    spf = simulate(workload, policy, t, 512, seed=4, max_requests=3000)
    fcfs = simulate(workload, SARATHI, t, 512, seed=4, max_requests=3000)
    assert spf.predicted.verdict == fcfs.predicted.verdict == "stable"
    assert spf.metrics.latency["mean_ttft_ms"] < fcfs.metrics.latency["mean_ttft_ms"]
    assert spf.metrics.completed == fcfs.metrics.completed == 3000
