"""Pools of engines behind a router: the file format and its errors, the built-in routers on
hand-made views, the same routing on the three engines (and compiled), user routers, the pool
theory's verdicts checked by simulation, and the CLI's pool rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmqueue.errors import ConfigError
from llmqueue.model.network import ROUTER_NAMES, parse_network
from llmqueue.policies.routers import (
    ROUTERS,
    THROUGHPUT_OPTIMAL,
    MemberView,
    PoolView,
    jsq,
    kv_fraction,
    least_kv,
    p2c,
    random_router,
    round_robin,
    vllm_dp,
)
from llmqueue.sim.network import _Run, predict_pool, simulate_network
from llmqueue.theory.network import analyze

from .helpers import run_cli
from .helpers import same_doc as _same

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "networks" / "pool.toml")
FAST = "linear:c=2,a=0.01"  # capacity 512 / 7.12 ms = 71.9 tokens/ms at b = 512
SLOW = "linear:c=6,a=0.03"  # three times slower


def pool_net(engine: dict, rate: float = 1.0, *, post: bool = False) -> dict:
    """One class through the pool ``chat`` (then, with ``post``, through a plain engine)."""
    nodes = {"a": {"engine": "chat", "prefill": "poisson:100", "decode": "geometric:20",
                   "next": {"b": 0.5, "exit": 0.5} if post else "exit"}}
    engines = {"chat": engine}
    if post:
        nodes["b"] = {"engine": "post", "prefill": "50", "decode": "5", "next": "exit"}
        engines["post"] = {"budget": 128, "batch_time": FAST}
    return {"engines": engines, "classes": {"c": {"rate": rate, "start": "a", "nodes": nodes}}}


def at_load(spec: dict, load: float):
    """The network scaled so that its bottleneck (or the pool, under a capacity split) is at ``load``."""
    net = parse_network(spec)
    return net.scaled(load * analyze(net).critical_scale)


# -- the file format ----------------------------------------------------------------------------------


def test_a_pool_expands_into_member_engines_with_group_overrides() -> None:
    net = parse_network(pool_net({"budget": 256, "batch_time": FAST, "router": "p2c", "groups": [
        {"replicas": 2}, {"replicas": 1, "budget": 128, "batch_time": SLOW, "memory": "tokens=20000"}]}))
    assert list(net.engines) == ["chat/0", "chat/1", "chat/2"]
    assert net.pools["chat"].members == ("chat/0", "chat/1", "chat/2")
    assert net.pools["chat"].router == "p2c"
    assert [(e.budget, e.batch_time.spec, e.memory is not None) for e in net.engines.values()] == [
        (256, FAST, False), (256, FAST, False), (128, SLOW, True)]
    assert net.members_of("chat") == net.pools["chat"].members and net.pool_of("chat/2") == "chat"
    plain = parse_network(pool_net({"budget": 256, "router": "p2c", "replicas": 1}))
    assert list(plain.engines) == ["chat"] and not plain.pools  # a router on one engine is fine


@pytest.mark.parametrize(("engine", "message"), [
    ({"budget": 64, "replicas": 0}, r"^engines\.chat\.replicas: .*greater than or equal to 1"),
    ({"budget": 64, "replicas": 2, "router": "fastest"},
     r"^engines\.chat\.router: unknown router; choose from jsq, jsq-tokens, p2c, least-kv, vllm-dp, "
     r"round-robin, random \(got 'fastest'\)$"),
    ({"budget": 64, "groups": [{"replicas": 0}]}, r"^engines\.chat\.groups\.0\.replicas: "),
    ({"budget": 64, "groups": [{"replicas": 1, "speed": 2}]},
     r"^engines\.chat\.groups\.0\.speed: unknown key"),
    ({"groups": [{"replicas": 2}]}, r"^engines\.chat\.groups\.0\.budget: an engine needs a budget"),
    ({"budget": 64, "groups": [{"replicas": 1, "policy": "magic"}]}, r"^engines\.chat\.groups\.0\.policy: "),
    ({"budget": 64, "replicas": 2, "groups": [{"replicas": 1}]},
     r"^engines\.chat\.replicas: give replicas or groups"),
    ({"budget": 64, "groups": []}, r"^engines\.chat\.groups: "),
])
def test_bad_pools_are_one_line_errors_naming_the_key(engine, message) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        parse_network(pool_net(engine))
    assert "\n" not in str(err.value)


def test_member_names_cannot_clash_with_engine_names() -> None:
    spec = pool_net({"budget": 64, "replicas": 2})
    spec["engines"]["chat/0"] = {"budget": 64}
    with pytest.raises(ConfigError, match=r"^engines\.chat/0: engine names must not contain '/'"):
        parse_network(spec)
    spec = pool_net({"budget": 64, "replicas": 2})
    spec["classes"]["c"]["nodes"]["a"]["engine"] = "chat/0"  # a visit names the pool, not a member
    with pytest.raises(ConfigError, match=r"^classes\.c\.nodes\.a\.engine: unknown engine, pool or pair"):
        parse_network(spec)


# -- the routers on hand-made views ---------------------------------------------------------------------


def view(*members: tuple[int, int, int], routed: int = 0, draws: tuple[float, float] = (0.0, 0.0),
         kv: tuple[int | None, ...] | None = None) -> PoolView:
    """A pool view from (in_system, waiting, outstanding tokens) per member (budget 100)."""
    kv = kv or (None,) * len(members)
    return PoolView("p", 0.0, 10, 5, tuple(
        MemberView(i, f"p/{i}", n, w, tok, 1000.0, 100, kv[i]) for i, (n, w, tok) in enumerate(members)
    ), routed, draws)


def test_the_built_in_routers_pick_as_documented() -> None:
    assert tuple(ROUTERS) == ROUTER_NAMES and set(THROUGHPUT_OPTIMAL) == set(ROUTERS)
    v = view((3, 0, 50), (2, 2, 90), (2, 0, 40), (5, 1, 10))
    assert jsq(v) == 1  # fewest in system, ties to the lowest index
    assert ROUTERS["jsq-tokens"](v) == 3
    assert vllm_dp(v) == 2  # scores 3, 8, 2, 8
    assert vllm_dp(view((1, 1, 0), (4, 0, 0))) == 0  # 4 * 1 + 0 = 4 ties 4: the first scanned
    assert round_robin(view((0, 0, 0), (0, 0, 0), (0, 0, 0), routed=7)) == 1
    assert random_router(view((0, 0, 0), (0, 0, 0), draws=(0.5, 0.0))) == 1
    assert random_router(view((0, 0, 0), (0, 0, 0), (0, 0, 0), draws=(0.999999, 0.0))) == 2
    # p2c: draws 0.6 -> member 2 of 4; 0.5 -> 1 of the other 3 (skipping 2: member 1); fewer in system
    assert p2c(view((0, 0, 0), (4, 0, 0), (3, 0, 0), (0, 0, 0), draws=(0.6, 0.5))) == 2
    assert p2c(view((0, 0, 0), (3, 0, 0), (3, 0, 0), (0, 0, 0), draws=(0.6, 0.5))) == 1  # tie: lower
    assert p2c(view((0, 0, 0), (3, 0, 0), (3, 0, 0), (0, 0, 0), draws=(0.6, 0.9))) == 3  # j = 2 -> 3
    assert p2c(view((7, 0, 0),)) == 0
    # least-kv: tokens over the cache (or the budget without one)
    v = view((0, 0, 500), (0, 0, 30), kv=(10_000, None))
    assert [kv_fraction(m) for m in v.members] == [0.05, 0.3] and least_kv(v) == 0
    assert v.members[1].running == 0 and view((5, 2, 0),).members[0].running == 3


# -- the same routing on every engine -------------------------------------------------------------------


@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_every_router_routes_alike_on_the_three_engines_and_compiled(router) -> None:
    """A heterogeneous pool (two members, one slower and smaller) feeding a plain engine: the
    reference and fast engines and the compiled loop (its routing compiled or in Python) route
    every visit to the same member; the compiled routing gives the Python routing's run to the bit."""
    net = at_load(pool_net({"budget": 256, "batch_time": FAST, "router": router, "groups": [
        {"replicas": 2}, {"replicas": 1, "budget": 128, "batch_time": SLOW}]}, post=True), 0.9)
    run = {"seed": 3, "max_requests": 400}
    runs = {e: simulate_network(net, engine=e, **run).to_dict() for e in ("reference", "fast", "compiled")}
    python = _Run(net, analyze(net), 3, 400, None, None, {}, "compiled", compiled_routing=False)
    python_doc = python.result().to_dict()
    assert json.dumps(python_doc, sort_keys=True) == json.dumps(runs["compiled"], sort_keys=True)
    _same(runs["reference"], runs["fast"])
    _same(runs["fast"], runs["compiled"])
    visits = runs["compiled"]["pools"]["chat"]["visits"]
    assert sum(visits) == runs["compiled"]["pools"]["chat"]["completed"] + sum(
        runs["compiled"]["engines"][m]["arrivals"] - runs["compiled"]["engines"][m]["completed"]
        for m in ("chat/0", "chat/1", "chat/2"))
    if router == "round-robin":
        assert max(visits) - min(visits) <= 1


@pytest.mark.parametrize("router", ["least-kv", "vllm-dp"])
def test_pools_with_kv_caches_route_alike_on_the_python_engines(router) -> None:
    """Members with small KV caches (one refuses the largest visits; vllm-dp, blind to KV, makes
    members preempt): the reference and fast engines route every visit alike."""
    spec = pool_net({"budget": 256, "batch_time": FAST, "router": router, "groups": [
        {"replicas": 2, "memory": "tokens=2000,block=16"}, {"replicas": 1, "memory": "tokens=400,block=16"}]})
    spec["classes"]["c"]["nodes"]["a"]["prefill"] = "uniform:1,500"
    net = at_load(spec, 0.8)
    ref = simulate_network(net, seed=2, max_requests=300, engine="reference").to_dict()
    fast = simulate_network(net, seed=2, max_requests=300, engine="fast").to_dict()
    _same(ref, fast)
    assert fast["engines"]["chat/2"]["rejected_requests"] > 0
    preempted = sum(fast["engines"][m]["preemptions"] for m in ("chat/0", "chat/1", "chat/2"))
    assert preempted > 0 if router == "vllm-dp" else preempted == 0  # least-kv balances the caches


def test_a_user_router_sees_the_view_the_built_in_one_sees() -> None:
    """A Python callable routing as jsq gives exactly the compiled jsq run (so the Python view
    equals the compiled routing's state); calls see the documented fields."""
    net = at_load(pool_net({"budget": 256, "batch_time": FAST, "replicas": 3}, post=True), 0.9)
    seen: list[PoolView] = []

    def mine(v: PoolView) -> int:
        seen.append(v)
        return jsq(v)

    built_in = simulate_network(net, seed=5, max_requests=300).to_dict()
    user = simulate_network(net, seed=5, max_requests=300, engine="compiled",
                            routers={"chat": mine}).to_dict()
    for key in ("engines", "classes", "visits", "duration_s"):  # the verdicts differ: a user router
        assert json.dumps(user[key], sort_keys=True) == json.dumps(built_in[key], sort_keys=True)
    assert user["pools"]["chat"]["visits"] == built_in["pools"]["chat"]["visits"]
    assert user["pools"]["chat"]["stable_predicted"] == "no guarantee"
    assert [v.routed for v in seen] == list(range(len(seen)))
    assert all(sum(m.in_system for m in v.members) >= 0 and 0 <= v.draws[0] < 1 for v in seen)
    assert any(m.waiting > 0 and m.running > 0 for v in seen for m in v.members)


@pytest.mark.parametrize(("router", "message"), [
    (lambda v: 3, r"^routers\.chat: a router must return a member index 0\.\.2 \(got 3\)$"),
    (lambda v: True, r"^routers\.chat: a router must return a member index"),
    (lambda v: 1.0, r"^routers\.chat: a router must return a member index"),
    ("fastest", r"^routers\.chat: unknown router; choose from jsq, "),
    (42, r"^routers\.chat: must be a router's name or a callable"),
])
def test_a_bad_user_router_names_the_pool(router, message) -> None:
    net = parse_network(pool_net({"budget": 256, "batch_time": FAST, "replicas": 3}))
    with pytest.raises(ConfigError, match=message):
        simulate_network(net, seed=1, max_requests=20, routers={"chat": router})
    with pytest.raises(ConfigError, match=r"^routers: unknown pool"):
        simulate_network(net, seed=1, max_requests=20, routers={"post": "jsq"})


def test_pool_streams_come_after_the_others() -> None:
    """Turning an engine into a pool adds a stream after the existing ones: the class's arrivals
    and sizes are drawn as before (the same visits, split between the members)."""
    one = simulate_network(parse_network(pool_net({"budget": 256, "batch_time": FAST})), seed=2,
                           max_requests=200).to_dict()
    two = simulate_network(parse_network(pool_net({"budget": 256, "batch_time": FAST, "replicas": 2,
                                                   "router": "round-robin"})), seed=2, max_requests=200)
    members = [two.engines[m].metrics for m in ("chat/0", "chat/1")]
    assert sum(m.arrivals for m in members) == one["engines"]["chat"]["arrivals"] == 200
    assert [m.arrivals for m in members] == [100, 100]


# -- the theory, checked by simulation ----------------------------------------------------------------


def hetero(router: str) -> dict:
    """One fast member and one three times slower, at 0.8 of their summed capacity."""
    return pool_net({"budget": 512, "router": router, "groups": [
        {"replicas": 1, "batch_time": FAST}, {"replicas": 1, "batch_time": SLOW}]})


def _at_pool_load(spec: dict, load: float):
    net = parse_network(spec)
    return net.scaled(load / analyze(net).pools["chat"].rho)


@pytest.mark.parametrize(("router", "verdict"), [("round-robin", "unstable"), ("random", "unstable"),
                                                  ("jsq", "stable"), ("vllm-dp", "stable"),
                                                  ("jsq-tokens", "stable"), ("least-kv", "stable"),
                                                  ("p2c", "stable")])
def test_heterogeneous_pool_at_0_8_of_its_capacity(router, verdict) -> None:
    """Round robin and random send the slow member half the visits, 1.6 times what it serves: it
    diverges (predicted and observed); the load-aware routers keep the pool stable (p2c with two
    members compares both: it is jsq)."""
    net = _at_pool_load(hetero(router), 0.8)
    analysis = analyze(net)
    assert analysis.pools["chat"].rho == pytest.approx(0.8)
    predicted = predict_pool(net, analysis, "chat")
    assert predicted.verdict == verdict
    if verdict == "unstable":
        assert analysis.overloaded_members("chat") == ("chat/1",)
        assert analysis.engines["chat/1"].rho == pytest.approx(1.6)  # half of 0.8 x (1 + 1/3) over 1/3
    result = simulate_network(net, seed=7, duration_s=60.0)
    assert result.pools["chat"].observed.verdict == verdict
    assert result.pools["chat"].predicted.verdict == verdict
    assert result.predicted.verdict == verdict
    if verdict == "unstable":
        assert result.predicted.reason.startswith(f"pool chat: router '{router}' sends each of the 2")


@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_identical_members_are_stable_at_0_9_under_every_router(router) -> None:
    net = _at_pool_load(pool_net({"budget": 512, "batch_time": FAST, "replicas": 3, "router": router}), 0.9)
    result = simulate_network(net, seed=4, duration_s=60.0)
    assert result.pools["chat"].predicted.verdict == "stable"
    assert result.pools["chat"].observed.verdict == "stable"
    assert result.predicted.verdict == "stable"


def test_p2c_over_unequal_members_and_user_routers_promise_nothing() -> None:
    spec = pool_net({"budget": 512, "router": "p2c", "groups": [
        {"replicas": 1, "batch_time": FAST}, {"replicas": 2, "batch_time": SLOW}]})
    net = _at_pool_load(spec, 0.5)
    verdict = predict_pool(net, analyze(net), "chat")
    assert verdict.verdict == "no guarantee" and "at most 2/3" in verdict.reason
    result = simulate_network(net, seed=1, max_requests=50, routers={"chat": lambda v: 0})
    assert result.pools["chat"].predicted.verdict == "no guarantee"
    assert result.predicted.verdict == "no guarantee"
    over = _at_pool_load(spec, 1.1)
    assert predict_pool(over, analyze(over), "chat").verdict == "unstable"


# -- the CLI ------------------------------------------------------------------------------------------


def test_cli_prints_one_row_per_pool_and_members_on_request(capsys) -> None:
    code, out, _ = run_cli(capsys, "network", "simulate", EXAMPLE, "--requests", "400")
    assert code == 0
    assert "chat (16 x)" in out and "chat/3" not in out and "pool chat: router jsq" in out
    code, out, _ = run_cli(capsys, "network", "analyze", EXAMPLE, "--members")
    assert code == 0 and "chat (16 x, jsq)" in out and "chat/15" in out
    assert "pool chat predicted: stable" in out
    code, out, _ = run_cli(capsys, "network", "analyze", EXAMPLE, "--json")
    doc = json.loads(out)
    assert doc["pools"]["chat"]["members"][0] == "chat/0" and doc["pools"]["chat"]["predicted"] == "stable"


def test_cli_bad_router_is_one_line(capsys, tmp_path) -> None:
    path = tmp_path / "pool.toml"
    text = (ROOT / "examples" / "networks" / "pool.toml").read_text()
    path.write_text(text.replace('router = "jsq"', 'router = "best"'))
    code, out, err = run_cli(capsys, "network", "analyze", str(path))
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0 and "engines.chat.router" in err and "'best'" in err
