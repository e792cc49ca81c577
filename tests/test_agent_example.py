"""The agent network example (examples/networks/agent.toml): parsing, the analysis against a hand
computation of the traffic equations, a short simulation, conservation and reproducibility."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llmqueue.model.network import Network, load_network
from llmqueue.sim.network import NetworkResult, simulate_network
from llmqueue.theory.network import analyze

AGENT = Path(__file__).resolve().parent.parent / "examples" / "networks" / "agent.toml"
ENGINE_OF_NODE = {"plan": "planner", "tool": "tools", "sub": "subagent", "review": "critic"}


@pytest.fixture(scope="module")
def net() -> Network:
    return load_network(AGENT)


@pytest.fixture(scope="module")
def completed_run(net: Network) -> NetworkResult:
    """1,500 tasks at the file's load (0.8 of the critical scale), drained to the end."""
    return simulate_network(net, seed=3, max_requests=1_500)


def _back_probability(net: Network) -> float:
    review = net.classes["task"].nodes["review"]
    return dict(review.next)["plan"]


def test_file_parses_into_the_agent(net: Network) -> None:
    assert set(net.engines) == {"planner", "tools", "subagent", "critic"}
    task = net.classes["task"]
    assert task.start == "plan"
    kinds = {nid: n.kind for nid, n in task.nodes.items()}
    assert kinds == {"plan": "visit", "split": "fork", "tool": "visit", "sub": "visit",
                     "merge": "join", "review": "visit"}
    assert set(task.nodes["split"].branches) == {"tool", "sub"}
    assert task.nodes["merge"].fork == "split"
    assert dict(task.nodes["review"].next) == pytest.approx({"plan": 0.3, "exit": 0.7})
    for nid, engine in ENGINE_OF_NODE.items():
        assert task.nodes[nid].engine == engine
    for e in net.engines.values():
        assert (e.budget, e.k_max, e.policy) == (2048, 256, "vllm-chunked")


def test_analysis_matches_the_traffic_equations_by_hand(net: Network) -> None:
    a = analyze(net)
    p = _back_probability(net)
    visits = 1.0 / (1.0 - p)  # every node: the loop plan -> ... -> review -> plan with probability p
    task = net.classes["task"]
    for nid in ("plan", "split", "tool", "sub", "merge", "review"):
        assert a.visits["task"][nid] == pytest.approx(visits, rel=1e-12)
    # the uniform prompts of the 70B engines have their textbook mean
    assert task.nodes["plan"].prefill.mean == pytest.approx((1024 + 2048) / 2)
    assert task.nodes["review"].prefill.mean == pytest.approx((1536 + 2048) / 2)

    # t(n) by hand: staircase c + a * ceil(n / b0), piecewise c + a * max(0, n - b0)
    def t_ms(engine: str, n: int) -> float:
        if engine in ("planner", "critic"):
            return 12.82 + 13.70 * math.ceil(n / 128)
        if engine == "tools":
            return 7.40 + 0.0291 * max(0, n - 16)
        return 22.64 + 0.117 * max(0, n - 81)

    b, k = 2048, 256
    rho: dict[str, float] = {}
    binding: set[str] = set()
    for nid, engine in ENGINE_OF_NODE.items():
        node = task.nodes[nid]
        prefill_per_s = task.rate_per_s * visits * node.prefill.mean
        decode_per_s = task.rate_per_s * visits * node.decode.mean
        capacity_per_s = b / t_ms(engine, b) * 1000.0
        plain = (prefill_per_s + decode_per_s) / capacity_per_s
        load = a.engines[engine]
        assert load.capacity_tokens_per_s == pytest.approx(capacity_per_s, rel=1e-9)
        assert load.tokens_per_s == pytest.approx(prefill_per_s + decode_per_s, rel=1e-9)
        # k_max: a batch holds at most k - 1 decode tokens next to a prompt chunk. A full batch at
        # this engine's mix needs b * decode share decode tokens; below k - 1, k_max does not bind.
        share = decode_per_s / (prefill_per_s + decode_per_s)
        if share * b <= k - 1:
            assert load.rho == pytest.approx(plain, rel=1e-6)
            rho[engine] = plain
        else:
            # a feasible mix of two batch kinds bounds the region load from above: full batches
            # (b - k + 1 prefill, k - 1 decode) for all the prefill, decode-only batches of k
            full = (b - k + 1) / t_ms(engine, b) * 1000.0, (k - 1) / t_ms(engine, b) * 1000.0
            decode_only = k / t_ms(engine, k) * 1000.0
            w_full = prefill_per_s / full[0]
            bound = w_full + (decode_per_s - w_full * full[1]) / decode_only
            binding.add(engine)
            assert plain < load.rho <= bound * (1 + 1e-9)
            if engine == "planner":  # staircase: the two batch kinds are the optimum
                assert load.rho == pytest.approx(bound, rel=1e-6)
            rho[engine] = bound
    assert binding == {"planner", "subagent"}  # the decode-heavy ones; critic and tools are plain
    # the bottleneck by hand (upper bounds where k_max binds): the critic, at its plain token load
    assert a.bottleneck == max(rho, key=rho.__getitem__) == "critic"
    assert a.critical_scale == pytest.approx(1.0 / rho["critic"], rel=1e-6)
    assert 1.0 / a.critical_scale == pytest.approx(0.8, abs=0.005)  # the file sits at 0.8
    assert a.cyclic and {"planner", "critic"} <= set(a.cycle)
    assert any("cyclic" in w for w in a.warnings)


def test_short_run_at_08_completes_nearly_all_tasks(net: Network, completed_run: NetworkResult) -> None:
    task = completed_run.classes["task"]
    assert task.arrivals == 1_500
    assert task.completed >= 0.99 * task.arrivals
    assert completed_run.observed.verdict != "unstable"
    assert completed_run.predicted.verdict == "no guarantee"  # cyclic routing: no theorem
    lat = task.latency
    assert 0 < lat["median_e2el_ms"] <= lat["p90_e2el_ms"] <= lat["p99_e2el_ms"]


def test_visits_per_engine_follow_the_expected_ratio(net: Network, completed_run: NetworkResult) -> None:
    task = completed_run.classes["task"]
    expected = 1.0 / (1.0 - _back_probability(net))
    arrivals = {name: e.metrics.arrivals for name, e in completed_run.engines.items()}
    if task.completed == task.arrivals:  # every finished task visited each engine equally often
        assert len(set(arrivals.values())) == 1
    assert sum(arrivals.values()) == completed_run.visits
    for count in arrivals.values():
        # visits per task: geometric with mean 1/(1-p), sd sqrt(p)/(1-p); 1,500 tasks: se about 1.4 %
        assert count / task.arrivals == pytest.approx(expected, rel=0.05)


def test_conservation_with_requests_left_in_the_network(net: Network) -> None:
    r = simulate_network(net, seed=5, duration_s=200.0, drain_s=0.0)
    task = r.classes["task"]
    in_network = task.arrivals - task.completed
    assert in_network > 0  # cut without drain: some tasks are still inside
    assert any(f"{in_network} request(s) still in the network" in n for n in r.notes)
    incomplete = 0
    for e in r.engines.values():
        m = e.metrics
        assert m.arrivals == m.completed + m.incomplete
        incomplete += m.incomplete
    # a task inside is at one engine, or (forked) at one or two of tools / subagent
    assert in_network <= incomplete <= 2 * in_network
    assert sum(e.metrics.arrivals for e in r.engines.values()) == r.visits


def test_same_seed_same_result(net: Network) -> None:
    def run(seed: int) -> str:
        return json.dumps(simulate_network(net, seed=seed, max_requests=300).to_dict(), sort_keys=True)

    first = run(11)
    assert run(11) == first
    assert run(12) != first
