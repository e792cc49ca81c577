"""The network policies (class priority, max-pressure) in the compiled network loop
(``llmqueue.engines.polkernel``, ``compiled.PolicyEngine``): the same run as the reference engine
with the same policy, to the bit: every visit's record, every request's end-to-end latency, every
engine and class figure (the mean inter-token latency to float rounding, as for the kernel: its
values are summed in another order). Also with the routing in Python, on random networks with
forks, joins and feedback, at every resumable step, and the engine choice."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmqueue.engines import compiled
from llmqueue.engines.compiled import PolicyEngine
from llmqueue.engines.metrics import Recorder
from llmqueue.errors import ConfigError
from llmqueue.model.network import ROUTER_NAMES, Network, parse_network
from llmqueue.paper.reproduce import BAD, GOOD, rs_network
from llmqueue.policies.network import ClassPriority, MaxPressure
from llmqueue.sim import network as netsim
from llmqueue.sim.network import _Run, engine_kind, network_policy, simulate_network
from llmqueue.theory.network import analyze

from .helpers import SometimesZero, examples, record_net_run_codes

ITL_MEAN = "mean_itl_ms"


def _run(net: Network, engine: str, monkeypatch: pytest.MonkeyPatch, *, routing: bool = True,
         seed: int = 1, max_requests: int | None = None, duration_s: float | None = None,
         drain_s: float | None = None, policies: dict | None = None) -> tuple[dict, dict, dict]:
    """(to_dict, every engine's visit records, every class's end-to-end latencies) of a run, with
    the records kept (``routing``: the routing compiled when every engine is)."""
    monkeypatch.setattr(netsim, "Recorder", lambda keep_requests: Recorder(keep_requests=True))
    duration_ms = None if duration_s is None else duration_s * 1000.0
    overrides = policies or {}
    run = _Run(net, analyze(net, {n: p.name for n, p in overrides.items()}), seed, max_requests,
               duration_ms, drain_s, overrides, engine, compiled_routing=routing)  # type: ignore[arg-type]
    doc = run.result().to_dict()
    records = {n: list(rec.completed_records()) for n, rec in run.recorders.items()}
    latency = {c: list(values) for c, values in run.class_latency.items()}
    return doc, records, latency


def _kinds(net: Network, engine: str = "auto") -> dict[str, str]:
    return {n: engine_kind(network_policy(net, n), spec, engine) for n, spec in net.engines.items()}


def _differences(a: object, b: object, path: str = "") -> list[tuple[str, object, object]]:
    """Where two JSON-like documents differ: (path, a's value, b's value)."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return [d for key in a for d in _differences(a[key], b[key], f"{path}.{key}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [(path, a, b)]


def assert_same_run(a: tuple[dict, dict, dict], b: tuple[dict, dict, dict]) -> None:
    """Every visit's record and every request's latency equal; every figure of the network-policy
    engines and of the classes equal to the bit, but the mean inter-token latency (summed in
    another order), to float rounding. Figures that a K-FCFS kernel engine's runs of identical
    iterations enter (integrated in closed form: its engine's, the network's backlog) are equal
    to float rounding, as in tests/test_network.py."""
    doc_a, rec_a, lat_a = a
    doc_b, rec_b, lat_b = b
    assert rec_a == rec_b
    assert lat_a == lat_b
    kernel = {n for n, e in doc_a["engines"].items() if e["policy"] not in ("priority", "max-pressure")}
    for path, x, y in _differences(doc_a, doc_b):
        parts = path.split(".")
        rounding = (parts[-1] == ITL_MEAN
                    or (parts[1] == "engines" and parts[2] in kernel)
                    or (kernel and parts[1] in ("backlog_series", "backlog_slope_tokens_per_s",
                                                "observed_evidence")))
        assert rounding and isinstance(x, float) and isinstance(y, float), (path, x, y)
        assert y == pytest.approx(x, rel=1e-9, abs=1e-12), (path, x, y)


# -- the Rybko-Stolyar network ------------------------------------------------------------------------


@pytest.mark.parametrize(("net", "seed"), [
    (rs_network(0.9, "priority", BAD), 1),  # unstable: queues grow
    (rs_network(0.9, "priority", GOOD), 2),
    (rs_network(0.95, "max-pressure"), 3),
    (rs_network(1.15, "max-pressure"), 4),  # overloaded
])
def test_rs_network_compiled_is_the_reference_run(net, seed, monkeypatch) -> None:
    """Both engines compiled (routing compiled, and in Python) give the reference engines' run."""
    assert set(_kinds(net).values()) == {"compiled"}
    reference = _run(net, "reference", monkeypatch, seed=seed, duration_s=0.25, drain_s=0.05)
    compiled_run = _run(net, "auto", monkeypatch, seed=seed, duration_s=0.25, drain_s=0.05)
    python_routing = _run(net, "compiled", monkeypatch, routing=False, seed=seed, duration_s=0.25,
                          drain_s=0.05)
    assert sum(len(r) for r in reference[1].values()) > 500
    assert json.dumps(compiled_run[0], sort_keys=True) == json.dumps(python_routing[0], sort_keys=True)
    assert compiled_run[1:] == python_routing[1:]
    assert_same_run(reference, compiled_run)


def test_max_pressure_blocks_and_is_woken_as_in_the_reference_engine(monkeypatch) -> None:
    """An engine whose requests all have negative weight forms no batch (stall) until routing
    changes the counts; the compiled engine blocks and wakes at the same moments."""
    data = {
        "engines": {"up": {"budget": 64, "batch_time": "constant:c=1", "policy": "max-pressure"},
                    "down": {"budget": 16, "batch_time": "linear:c=1,a=0.05", "policy": "max-pressure"}},
        "classes": {"t": {"rate": 300.0, "start": "a", "nodes": {
            "a": {"engine": "up", "prefill": "poisson:20", "decode": "poisson:4", "next": "b"},
            "b": {"engine": "down", "prefill": "poisson:40", "decode": "poisson:8", "next": "exit"}}}},
    }
    net = parse_network(data)
    reference = _run(net, "reference", monkeypatch, seed=5, max_requests=300, drain_s=1.0)
    compiled_run = _run(net, "compiled", monkeypatch, seed=5, max_requests=300, drain_s=1.0)
    assert reference[0]["engines"]["up"]["stall_ms"] > 0  # it blocked and was woken
    assert reference[0]["classes"]["t"]["completed"] == 300
    assert_same_run(reference, compiled_run)


def test_policy_engines_next_to_a_kv_cache_engine_route_in_python(monkeypatch) -> None:
    """A KV-cache engine keeps the routing in Python; the policy engines stay compiled there
    (``PolicyEngine`` in the Python loop) and the run is the reference run."""
    data = {
        "engines": {"gen": {"budget": 64, "batch_time": "linear:c=1,a=0.02", "memory": "tokens=2048"},
                    "judge": {"budget": 32, "batch_time": "constant:c=1", "policy": "max-pressure"},
                    "tools": {"budget": 32, "batch_time": "constant:c=1", "policy": "priority",
                              "priority": ["chat.tool"]}},
        "classes": {"chat": {"rate": 60.0, "start": "answer", "nodes": {
            "answer": {"engine": "gen", "prefill": "uniform:10,200", "decode": "uniform:5,60",
                       "next": "split"},
            "split": {"fork": ["tool", "check"]},
            "tool": {"engine": "tools", "prefill": "poisson:20", "decode": "poisson:5", "next": "merge"},
            "check": {"engine": "judge", "prefill": "poisson:30", "decode": "poisson:3", "next": "merge"},
            "merge": {"join": "split", "next": {"answer": 0.3, "exit": 0.7}}}},
                    "side": {"rate": 40.0, "start": "look", "nodes": {
            "look": {"engine": "tools", "prefill": "poisson:10", "decode": "poisson:10", "next": "judge"},
            "judge": {"engine": "judge", "prefill": "poisson:10", "decode": "poisson:2", "next": "exit"}}}},
    }
    net = parse_network(data)
    assert _kinds(net) == {"gen": "fast", "judge": "compiled", "tools": "compiled"}
    reference = _run(net, "reference", monkeypatch, seed=3, max_requests=400, drain_s=2.0)
    auto = _run(net, "auto", monkeypatch, seed=3, max_requests=400, drain_s=2.0)
    assert reference[0]["classes"]["chat"]["completed"] > 100
    assert "KV cache" in auto[0].pop("notes")[0] and not reference[0].pop("notes")
    assert_same_run(reference, auto)


# -- random networks ------------------------------------------------------------------------------------

BATCH_TIMES = ("linear:c=2,a=0.01", "constant:c=2", "staircase:c=1,a=0.5,b0=32")
SIZES = ("poisson:3", "poisson:30", "uniform:1,300", "geometric:20")
POLICIES = ("priority", "max-pressure", "priority", "max-pressure", "sarathi", "vllm-chunked")


def _route(draw: st.DrawFn, engines: list[str]) -> tuple[str, dict[str, dict]]:
    """A class's route: a visit, then 1-2 stages (a visit, or a fork of 2-3 branches of 1-2 visits
    meeting at its join), the last visit looping back with some probability."""
    nodes: dict[str, dict] = {}
    counter = iter(range(1000))

    def visit(then: str) -> str:
        nid = f"v{next(counter)}"
        nodes[nid] = {"engine": draw(st.sampled_from(engines)), "prefill": draw(st.sampled_from(SIZES)),
                      "decode": draw(st.sampled_from(SIZES)), "next": then}
        return nid

    last = visit("exit")
    head = last
    for _ in range(draw(st.integers(1, 2))):
        if draw(st.booleans()):
            head = visit(head)
            continue
        k = next(counter)
        nodes[f"j{k}"] = {"join": f"f{k}", "next": head}
        branches = []
        for _ in range(draw(st.integers(2, 3))):
            branch = f"j{k}"
            for _ in range(draw(st.integers(1, 2))):
                branch = visit(branch)
            branches.append(branch)
        nodes[f"f{k}"] = {"fork": branches}
        head = f"f{k}"
    p_back = draw(st.sampled_from((0.0, 0.3)))
    if p_back:
        nodes[last]["next"] = {head: p_back, "exit": 1 - p_back}
    return head, nodes


@st.composite
def policy_networks(draw: st.DrawFn) -> tuple[Network, dict]:
    """A random network of priority and max-pressure engines (some FCFS ones too), random class
    orders (classes and buffers, some left out), k_max on or off, forks, joins, feedback, visits
    that draw no prompt or no output (or nothing) in some, at a random load, with a random run."""
    names = [f"e{i}" for i in range(draw(st.integers(2, 3)))]
    classes: dict[str, dict] = {}
    for c in range(draw(st.integers(1, 2))):
        start, nodes = _route(draw, names)
        classes[f"c{c}"] = {"rate": 1.0, "start": start, "nodes": nodes}
    labels = [*classes, *(f"{c}.{nid}" for c, spec in classes.items() for nid, node in spec["nodes"].items()
                          if "engine" in node)]
    engines: dict[str, dict] = {}
    for name in names:
        policy = draw(st.sampled_from(POLICIES))
        engines[name] = {"budget": draw(st.sampled_from((16, 64, 256))),
                         "batch_time": draw(st.sampled_from(BATCH_TIMES)), "policy": policy,
                         **({"k_max": draw(st.integers(1, 12))} if draw(st.booleans()) else {})}
        if policy == "priority":
            engines[name]["priority"] = draw(st.lists(st.sampled_from(labels), min_size=1, unique=True))
    net = parse_network({"engines": engines, "classes": classes})
    zero = draw(st.sampled_from((0.0, 0.0, 0.5)))
    if zero:  # prompt-less visits, visits without output, visits of 0 + 0 tokens (skipped)
        specs = {}
        for cname, spec in net.classes.items():
            zeroed = {nid: dataclasses.replace(n, prefill=SometimesZero(n.prefill, zero),
                                               decode=SometimesZero(n.decode, zero))
                      if n.kind == "visit" else n for nid, n in spec.nodes.items()}
            specs[cname] = dataclasses.replace(spec, nodes=zeroed)
        net = Network(net.engines, specs)
    net = net.scaled(draw(st.sampled_from((0.5, 0.9, 1.3))) * analyze(net).critical_scale)
    run = {"seed": draw(st.integers(0, 2**20)), "drain_s": draw(st.sampled_from((None, 0.0, 0.05)))}
    if draw(st.booleans()):
        run["max_requests"] = draw(st.sampled_from((200, 1, 40)))
    else:
        run["duration_s"] = draw(st.sampled_from((0.1, 0.3)))
    return net, run


@given(case=policy_networks())
@settings(max_examples=examples(15))
def test_compiled_network_policies_are_the_reference_run_on_random_networks(case) -> None:
    """Every engine compiled (network policies and FCFS ones), the routing compiled or in Python:
    the reference engines' run."""
    net, run = case
    with pytest.MonkeyPatch.context() as monkeypatch:
        reference = _run(net, "reference", monkeypatch, **run)
        compiled_run = _run(net, "compiled", monkeypatch, **run)
        python_routing = _run(net, "compiled", monkeypatch, routing=False, **run)
    assert json.dumps(compiled_run[0], sort_keys=True) == json.dumps(python_routing[0], sort_keys=True)
    assert compiled_run[1:] == python_routing[1:]
    assert_same_run(reference, compiled_run)


def test_every_resumable_step_of_the_policy_engines(monkeypatch) -> None:
    """With one request slot and the least output room at first, the policy engines return to the
    driver for slots and for draining again and again (NET_SLOTS, NET_ROOM); the run stays the
    reference run."""
    from llmqueue.engines import netkernel as kernel

    monkeypatch.setattr(compiled._PolicyState, "START_SLOTS", 1)
    monkeypatch.setattr(compiled._State, "MIN_ROOM", 0)  # output room 4 b + 64
    for name in ("START_TOKENS", "START_PENDING", "LATENCY_ROOM", "DRAW_CHUNKS"):
        monkeypatch.setattr(compiled.NetworkLoop, name, 1)
    seen = record_net_run_codes(monkeypatch)
    short = {"prefill": "poisson:4", "decode": "poisson:4"}
    long = {"prefill": "poisson:40", "decode": "poisson:4"}

    def tandem(first: str, second: str) -> dict:
        return {"rate": 160.0, "start": "short", "nodes": {
            "short": {"engine": first, **short, "next": "long"},
            "long": {"engine": second, **long, "next": "exit"}}}

    net = parse_network({  # a small Rybko-Stolyar network: budgets of 16, output room of 128 records
        "engines": {"S1": {"budget": 16, "batch_time": "constant:c=1", "policy": "priority",
                           "priority": ["B.long", "A.short"]},
                    "S2": {"budget": 16, "batch_time": "constant:c=1", "policy": "max-pressure"}},
        "classes": {"A": tandem("S1", "S2"), "B": tandem("S2", "S1")},
    })
    run = {"seed": 6, "max_requests": 800, "drain_s": 0.5}
    reference = _run(net, "reference", monkeypatch, **run)
    compiled_run = _run(net, "compiled", monkeypatch, **run)
    python_routing = _run(net, "compiled", monkeypatch, routing=False, **run)
    assert sum(len(r) for r in reference[1].values()) > 1000
    assert {kernel.NET_SLOTS, kernel.NET_ROOM} <= seen
    assert compiled_run[1:] == python_routing[1:]
    assert_same_run(reference, compiled_run)


def test_a_max_pressure_given_by_the_caller_with_its_own_routes_and_sizes(monkeypatch) -> None:
    """Routes to a buffer the network lacks (count 0), several weighted routes, a buffer without
    a size (weight 0): the compiled engine weighs as ``MaxPressure.weight`` does."""
    net = rs_network(0.95, "max-pressure")
    own = {"S1": MaxPressure(routes={"A.short": (("A.long", 0.5), ("B.short", 0.25), ("elsewhere.x", 2.0))},
                             sizes={"A.short": 40.0}),
           "S2": MaxPressure(routes={"B.short": (("B.long", 1.5),), "A.long": (("A.short", 0.1),)},
                             sizes={"B.short": 64.0, "A.long": 300.0})}
    reference = _run(net, "reference", monkeypatch, seed=8, duration_s=0.2, drain_s=0.05, policies=own)
    compiled_run = _run(net, "auto", monkeypatch, seed=8, duration_s=0.2, drain_s=0.05, policies=own)
    assert_same_run(reference, compiled_run)


def test_same_seed_same_compiled_run() -> None:
    net = rs_network(0.9, "priority", BAD)
    one = simulate_network(net, seed=3, duration_s=0.2).to_dict()
    two = simulate_network(net, seed=3, duration_s=0.2).to_dict()
    other = simulate_network(net, seed=4, duration_s=0.2).to_dict()
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)
    assert json.dumps(one, sort_keys=True) != json.dumps(other, sort_keys=True)


def test_a_bad_batch_time_in_a_policy_engine_is_reported_as_in_the_reference_engine() -> None:
    net = rs_network(0.9, "max-pressure")

    def gap(n: int) -> float:  # no valid time for batches of 600..700 tokens
        return math.nan if 600 <= n <= 700 else 1.0

    broken = Network({**net.engines, "S2": dataclasses.replace(net.engines["S2"], batch_time=gap)},
                     net.classes)
    for engine in ("compiled", "reference"):
        with pytest.raises(ConfigError, match=r"^batch-time: t\((6\d\d|700)\) must be a positive finite"):
            simulate_network(broken, seed=1, duration_s=0.2, engine=engine)


# -- the engine choice ------------------------------------------------------------------------------------


class _OwnPressure(MaxPressure):
    """A user's own policy (a subclass): it has no compiled form."""

    __slots__ = ()


def test_network_policies_choose_the_compiled_engine_and_a_users_own_policy_runs_in_python(
        monkeypatch) -> None:
    net = rs_network(0.95, "max-pressure")
    assert _kinds(net) == _kinds(net, "compiled") == {"S1": "compiled", "S2": "compiled"}
    assert _kinds(net, "reference") == _kinds(net, "fast") == {"S1": "pressure", "S2": "pressure"}
    bad = rs_network(0.9, "priority", BAD)
    assert _kinds(bad) == {"S1": "compiled", "S2": "compiled"}
    assert _kinds(bad, "fast") == {"S1": "reference", "S2": "reference"}
    routes, sizes = netsim.pressure_routes(net)
    own = {"S2": _OwnPressure(routes=routes, sizes=sizes)}
    assert engine_kind(own["S2"], net.engines["S2"]) == "pressure"
    assert engine_kind(ClassPriority(("A",)), net.engines["S2"]) == "compiled"
    run = _Run(net, analyze(net), 1, 50, None, None, own, "auto")
    assert isinstance(run.engines["S1"], PolicyEngine) and not isinstance(run.engines["S2"], PolicyEngine)
    with pytest.raises(ConfigError, match=r"^engine: engine S2: policy 'max-pressure' has no compiled form"):
        simulate_network(net, seed=1, max_requests=10, engine="compiled", policies=own)
    # the user's policy on the reference engine next to a compiled engine: the same run
    mixed = _run(net, "auto", monkeypatch, seed=2, duration_s=0.2, drain_s=0.05, policies=own)
    everything = _run(net, "auto", monkeypatch, seed=2, duration_s=0.2, drain_s=0.05)
    assert_same_run(mixed, everything)


def _policy_pool(policy: str, router: str, pair: bool = False) -> dict:
    """A pool of 3 ``policy`` engines behind ``router`` and a max-pressure engine, two classes
    crossing them (one loops back); with ``pair``, B's second visit goes to a prefill/decode pair
    whose prefill side is the pool (a shared link to 2 decode replicas)."""
    pool = {"budget": 256, "batch_time": "linear:c=2,a=0.01", "policy": policy, "replicas": 3,
            "router": router, **({"priority": ["B", "A"]} if policy == "priority" else {})}
    pressure = {"budget": 256, "batch_time": "constant:c=3", "policy": "max-pressure"}
    if pair:
        decode = {"budget": 128, "batch_time": "linear:c=1,a=0.02", "replicas": 2, "router": "jsq-tokens"}
        spec = _policy_pool(policy, router)
        spec["engines"]["D"] = decode
        spec["disaggregated"] = {"pd": {"prefill": "P", "decode": "D",
                                        "transfer": "fixed_ms=3,per_token_ms=0.01,link=shared"}}
        spec["classes"]["B"]["nodes"]["b"]["engine"] = "pd"
        return spec
    return {"engines": {"P": pool, "Q": pressure},
            "classes": {
                "A": {"rate": 40, "start": "a", "nodes": {
                    "a": {"engine": "P", "prefill": "poisson:60", "decode": "poisson:20", "next": "b"},
                    "b": {"engine": "Q", "prefill": "poisson:30", "decode": "poisson:10", "next": "exit"}}},
                "B": {"rate": 30, "start": "a", "nodes": {
                    "a": {"engine": "Q", "prefill": "poisson:40", "decode": "poisson:10", "next": "b"},
                    "b": {"engine": "P", "prefill": "poisson:80", "decode": "poisson:30",
                          "next": {"exit": 0.7, "a": 0.3}}}}}}


@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_pools_of_network_policy_engines_under_every_router_are_the_reference_run(router: str) -> None:
    """A pool of class-priority engines, and one of max-pressure engines, behind each built-in
    router: the compiled loop (auto) gives the reference engines' class results exactly; also when
    the pool is a prefill/decode pair's prefill side."""
    for policy, pair in (("priority", False), ("max-pressure", False), ("priority", True),
                         ("max-pressure", True)):
        net = parse_network(_policy_pool(policy, router, pair))
        auto, ref = (simulate_network(net, seed=3, max_requests=300 if not pair else 200,
                                      engine=e).to_dict() for e in ("auto", "reference"))
        assert auto["classes"] == ref["classes"]
        assert auto["pools"] == ref["pools"]
        assert auto.get("pairs") == ref.get("pairs") and not auto["notes"]
