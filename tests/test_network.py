"""Networks of engines: validation, traffic equations against simulation, the RS contrast,
fork-join stability up to nominal capacity, conservation through forks and joins, determinism."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmqueue.cli.app import main
from llmqueue.errors import ConfigError
from llmqueue.model.network import ROUTER_NAMES, Network, parse_network, visit_counts
from llmqueue.paper.reproduce import BAD, GOOD, rs_network
from llmqueue.sim.network import _Run, simulate_network
from llmqueue.theory.network import analyze

from .helpers import SometimesZero, examples, record_net_run_codes, run_cli
from .helpers import same_doc as _same

LINEAR = "linear:c=2,a=0.01"  # t(n) = 2 + 0.01 n ms: capacity about 1 token per 0.01 ms at large b


def fork_join(rate: float, *, policy: str = "sarathi", p_back: float = 0.0) -> dict:
    """planner -> fork(tool, sub) -> join -> critic -> back to planner (p_back) or exit."""
    critic_next: str | dict[str, float] = "exit" if p_back == 0 else {"plan": p_back, "exit": 1 - p_back}
    return {
        "engines": {
            "planner": {"budget": 512, "batch_time": LINEAR, "policy": policy},
            "tools": {"budget": 512, "batch_time": LINEAR, "policy": policy},
            "sub": {"budget": 512, "batch_time": LINEAR, "policy": policy},
            "critic": {"budget": 512, "batch_time": LINEAR, "policy": policy},
        },
        "classes": {
            "task": {
                "rate": rate, "start": "plan", "nodes": {
                    "plan": {"engine": "planner", "prefill": "poisson:200", "decode": "poisson:40",
                             "next": "split"},
                    "split": {"fork": ["tool", "research"]},
                    "tool": {"engine": "tools", "prefill": "poisson:100", "decode": "poisson:20",
                             "next": "merge"},
                    "research": {"engine": "sub", "prefill": "poisson:300", "decode": "poisson:60",
                                 "next": "merge"},
                    "merge": {"join": "split", "next": "review"},
                    "review": {"engine": "critic", "prefill": "poisson:400", "decode": "poisson:10",
                               "next": critic_next},
                },
            },
        },
    }


def capacity_tokens_per_s(budget: int = 512) -> float:
    return budget / (2 + 0.01 * budget) * 1000.0


# -- validation ---------------------------------------------------------------------------------


def _broken(path: list[str], value: object) -> dict:
    data = fork_join(1.0)
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


NODES = ["classes", "task", "nodes"]


@pytest.mark.parametrize(
    ("data", "field", "problem"),
    [
        (_broken([*NODES, "tool", "engine"], "gpu9"), "classes.task.nodes.tool.engine", "unknown engine"),
        (_broken([*NODES, "orphan"], {"engine": "tools", "prefill": "1", "decode": "1", "next": "exit"}),
         "classes.task.nodes", "unreachable"),
        (_broken([*NODES, "merge", "join"], "plan"), "classes.task.nodes.merge.join", "must name its fork"),
        (_broken([*NODES, "review", "next"], "plan"), "classes.task", "loop forever"),
        (_broken([*NODES, "review", "next"], {"plan": 0.5, "exit": 0.4}), "classes.task.nodes.review.next",
         "sum to 1"),
        (_broken([*NODES, "tool", "next"], "exit"), "classes.task.nodes.split.fork", "before its join"),
        (_broken([*NODES, "plan", "next"], "nowhere"), "classes.task.nodes.plan.next", "unknown node"),
        (_broken(["engines", "tools", "policy"], "fifo"), "engines.tools.policy", "choose from"),
        (_broken(["engines", "tools", "colour"], "red"), "engines.tools.colour", "unknown key"),
        (_broken(["engines", "tools", "policy"], "priority"), "engines.tools.priority", "needs a priority"),
        (_broken([*NODES, "tool", "prefill"], "zipf:2"), "classes.task.nodes.tool.prefill", ""),
        (_broken(["classes", "task", "start"], "begin"), "classes.task.start", "unknown node"),
        (_broken([*NODES, "split", "fork"], ["tool"]), "classes.task.nodes.split.fork", "at least 2"),
    ],
)
def test_bad_networks_are_refused_naming_the_key(data, field, problem) -> None:
    with pytest.raises(ConfigError) as err:
        parse_network(data)
    assert err.value.field == field
    assert problem in err.value.problem


def test_a_join_without_its_fork_and_a_fork_without_its_join() -> None:
    data = fork_join(1.0)
    del data["classes"]["task"]["nodes"]["merge"]
    with pytest.raises(ConfigError, match="unknown node"):
        parse_network(data)
    data = fork_join(1.0)
    data["classes"]["task"]["nodes"]["extra"] = {"join": "split", "next": "exit"}
    with pytest.raises(ConfigError, match="exactly one join"):
        parse_network(data)


def test_priority_must_name_known_buffers() -> None:
    data = copy.deepcopy(fork_join(1.0))
    data["engines"]["tools"].update(policy="priority", priority=["task.nope"])
    with pytest.raises(ConfigError) as err:
        parse_network(data)
    assert err.value.field == "engines.tools.priority"


# -- traffic equations -------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.9])
def test_visit_counts_solve_the_traffic_equations(p) -> None:
    net = parse_network(fork_join(1.0, p_back=p))
    v = visit_counts(net.classes["task"])
    expected = 1 / (1 - p)
    for node in ("plan", "split", "tool", "research", "merge", "review"):
        assert v[node] == pytest.approx(expected)


def test_loads_bottleneck_and_critical_scale() -> None:
    rate = 2.0
    net = parse_network(fork_join(rate, p_back=0.5))
    a = analyze(net)
    visits = 2.0  # 1 / (1 - 0.5)
    tokens = {"planner": 240, "tools": 120, "sub": 360, "critic": 410}
    cap = capacity_tokens_per_s()
    for engine, t in tokens.items():
        assert a.engines[engine].rho == pytest.approx(rate * visits * t / cap)
    assert a.bottleneck == "critic"
    assert a.critical_scale == pytest.approx(cap / (rate * visits * 410))
    assert a.cyclic  # planner -> ... -> critic -> planner
    assert any("cyclic" in w for w in a.warnings)
    assert not analyze(parse_network(fork_join(rate))).cyclic


def test_rs_analysis_finds_the_virtual_station() -> None:
    bad, good = analyze(rs_network(0.9, "priority", BAD)), analyze(rs_network(0.9, "priority", GOOD))
    assert [e.rho for e in bad.engines.values()] == pytest.approx([0.9, 0.9], rel=1e-9)
    (vs,) = bad.virtual_stations
    assert set(vs.buffers) == {"A.long", "B.long"}
    assert vs.load == pytest.approx(2 * 0.9 * 544 / 608)
    assert not good.virtual_stations
    assert bad.cyclic and good.cyclic


def test_engine_loads_match_simulation() -> None:
    """Each engine's processed token rate equals its analytic offered rate (stable, long run)."""
    rate = 3.0
    net = parse_network(fork_join(rate, p_back=0.3))
    a = analyze(net)
    r = simulate_network(net, seed=4, max_requests=6000)
    for name, e in r.engines.items():
        offered = a.engines[name].tokens_per_s
        processed = e.metrics.total_token_throughput
        # relative error of a Poisson count of ~6000 tasks x visits: well under 5 % at 3 sigma
        assert processed == pytest.approx(offered, rel=0.05), name
    visits = r.engines["planner"].metrics.arrivals / r.classes["task"].arrivals
    assert visits == pytest.approx(1 / 0.7, rel=0.05)


# -- stability ------------------------------------------------------------------------------------


def test_fork_join_network_is_stable_up_to_nominal_capacity() -> None:
    """Work-conserving K-FCFS engines on a fork-join DAG: stable at 0.9 of the critical scale,
    the bottleneck unstable at 1.15 (v3 §5)."""
    base = parse_network(fork_join(1.0))
    scale = analyze(base).critical_scale
    stable = simulate_network(base.scaled(0.9 * scale), seed=2, max_requests=20000)
    assert stable.predicted.verdict == "stable"
    assert stable.observed.verdict == "stable"
    assert all(e.observed.verdict != "unstable" for e in stable.engines.values())
    over = simulate_network(base.scaled(1.15 * scale), seed=2, max_requests=20000)
    assert over.predicted.verdict == "unstable"
    assert over.engines[analyze(base).bottleneck].observed.verdict == "unstable"


def _done(r) -> float:
    return sum(c.completed for c in r.classes.values()) / sum(c.arrivals for c in r.classes.values())


def test_rs_contrast_bad_priority_diverges_good_and_max_pressure_do_not() -> None:
    bad = simulate_network(rs_network(0.9, "priority", BAD), seed=1, duration_s=3.0, drain_s=0.0)
    good = simulate_network(rs_network(0.9, "priority", GOOD), seed=1, duration_s=3.0, drain_s=0.0)
    pressure = simulate_network(rs_network(0.95, "max-pressure"), seed=1, duration_s=3.0, drain_s=0.0)
    assert _done(bad) < 0.85
    assert _done(good) > 0.95 and _done(pressure) > 0.95
    peak = {name: max(b for _, b in r.backlog_series) for name, r in
            (("bad", bad), ("good", good), ("pressure", pressure))}
    assert peak["bad"] > 10 * max(peak["good"], peak["pressure"])
    assert good.observed.verdict == "stable" and pressure.observed.verdict == "stable"


# -- conservation and determinism -------------------------------------------------------------------------


def test_requests_are_conserved_through_forks_and_joins() -> None:
    net = parse_network(fork_join(4.0, p_back=0.3))
    r = simulate_network(net, seed=7, max_requests=3000, drain_s=0.5)
    task = r.classes["task"]
    for e in r.engines.values():
        assert e.metrics.arrivals == e.metrics.completed + e.metrics.incomplete
    visits = sum(e.metrics.arrivals for e in r.engines.values())
    assert visits == r.visits
    # every finished planner visit forked exactly one tool and one research visit at once
    planner, tools, sub = (r.engines[n].metrics for n in ("planner", "tools", "sub"))
    assert tools.arrivals == sub.arrivals == planner.completed
    in_network = task.arrivals - task.completed
    assert in_network >= 0
    drained = simulate_network(net, seed=7, max_requests=3000)  # default drain: everything ends
    assert drained.classes["task"].completed == drained.classes["task"].arrivals == 3000


def test_same_seed_same_result_and_seeds_differ() -> None:
    net = parse_network(fork_join(3.0, p_back=0.3))
    one = json.dumps(simulate_network(net, seed=5, max_requests=1500).to_dict(), sort_keys=True)
    two = json.dumps(simulate_network(net, seed=5, max_requests=1500).to_dict(), sort_keys=True)
    other = json.dumps(simulate_network(net, seed=6, max_requests=1500).to_dict(), sort_keys=True)
    assert one == two and one != other


def test_bad_run_arguments() -> None:
    net = parse_network(fork_join(1.0))
    with pytest.raises(ConfigError, match=r"^requests"):
        simulate_network(net)
    with pytest.raises(ConfigError, match=r"^policies"):
        simulate_network(net, max_requests=10, policies={"gpu9": object()})  # type: ignore[dict-item]


# -- CLI -----------------------------------------------------------------------------------------------


def test_network_cli(tmp_path, capsys) -> None:
    path = tmp_path / "net.json.yaml"
    import yaml

    path.write_text(yaml.safe_dump(fork_join(2.0, p_back=0.2)), encoding="utf-8")
    code, out, _ = run_cli(capsys, "network", "analyze", str(path), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["bottleneck"] == "critic" and doc["cyclic"]
    code, out, _ = run_cli(capsys, "network", "simulate", str(path), "--requests", "500", "--json")
    doc = json.loads(out)
    assert code == 0 and set(doc["engines"]) == {"planner", "tools", "sub", "critic"}
    assert doc["classes"]["task"]["completed"] == 500
    assert not math.isnan(doc["classes"]["task"]["p99_e2el_ms"])
    png = tmp_path / "n.png"
    code, out, _ = run_cli(capsys, "network", "simulate", str(path), "--requests", "200", "--plot", str(png))
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    bad = tmp_path / "bad.toml"
    bad.write_text("[engines.a]\nbudget = 0\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "network", "analyze", str(bad))
    assert code == 2 and err.count("\n") == 1 and "engines.a.budget" in err
    assert main(["network", "analyze", str(tmp_path / "missing.toml")]) == 2


def test_overrides_and_oversized_prompts_are_in_the_analysis() -> None:
    """A run with vanilla vLLM put in by override is warned about like one from the file, and a
    prompt that can exceed the budget of a non-chunking engine is named."""
    from llmqueue.policies.fcfs import make_policy

    data = fork_join(1.0)
    data["classes"]["task"]["nodes"]["review"]["prefill"] = "uniform:100,700"  # > b = 512 possible
    net = parse_network(data)
    plain = simulate_network(net, seed=1, max_requests=50, policies={"critic": make_policy("sarathi")})
    assert plain.predicted.verdict == "stable"
    assert not any("critic" in w for w in plain.analysis.warnings)
    run = simulate_network(net, seed=1, max_requests=50, drain_s=5.0,
                           policies={"critic": make_policy("vllm")})
    assert run.predicted.verdict == "no guarantee"
    assert any("engine critic: policy 'vllm' is not work-conserving" in w for w in run.analysis.warnings)
    assert any("prompts of task.review can exceed the budget 512" in w for w in run.analysis.warnings)
    assert any("critic stalled" in n for n in run.notes)
    assert run.classes["task"].in_network > 0


@pytest.mark.parametrize(
    ("scale", "p_back", "drain_s"),
    [(3.0, 0.3, None), (5.0, 0.0, 0.5), (4.0, 0.5, None)],
)
def test_compiled_network_engines_match_the_python_engines(scale, p_back, drain_s) -> None:
    """The compiled engines, advanced alone between routing points, give exactly the run of the
    Python fast engines (routing order, visit ids, per-engine and per-class figures)."""
    net = parse_network(fork_join(scale, p_back=p_back))
    fast = simulate_network(net, seed=4, max_requests=1000, drain_s=drain_s, engine="fast")
    kernel = simulate_network(net, seed=4, max_requests=1000, drain_s=drain_s, engine="compiled")
    _same(fast.to_dict(), kernel.to_dict())
    reference = simulate_network(net, seed=4, max_requests=600, drain_s=drain_s, engine="reference")
    compiled_small = simulate_network(net, seed=4, max_requests=600, drain_s=drain_s, engine="compiled")
    _same(reference.to_dict(), compiled_small.to_dict())


def test_mixed_compiled_and_python_engines_match() -> None:
    """A max-pressure engine next to K-FCFS ones, ties at shared instants included: the Python
    engines' run, and all compiled (max-pressure too) under ``auto`` as under ``compiled``."""
    from llmqueue.policies.fcfs import make_policy

    data = fork_join(3.0, p_back=0.2)
    data["engines"]["sub"]["policy"] = "max-pressure"
    data["engines"]["tools"]["batch_time"] = "constant:c=2"  # batch ends on a shared grid
    data["engines"]["critic"]["batch_time"] = "constant:c=2"
    net = parse_network(data)
    fast = simulate_network(net, seed=9, max_requests=800, engine="fast")
    kernel = simulate_network(net, seed=9, max_requests=800)
    _same(fast.to_dict(), kernel.to_dict())
    forced = simulate_network(net, seed=9, max_requests=800, engine="compiled")
    assert json.dumps(forced.to_dict(), sort_keys=True) == json.dumps(kernel.to_dict(), sort_keys=True)
    assert make_policy("sarathi")  # the override path is covered elsewhere
    with pytest.raises(ConfigError, match=r"^engine"):
        simulate_network(net, seed=9, max_requests=10, engine="warp")  # type: ignore[arg-type]


# -- the compiled routing (every engine compiled: compiled.NetworkLoop) -------------------------------


BATCH_TIMES = ("linear:c=2,a=0.01", "constant:c=2", "staircase:c=1,a=0.5,b0=32")
SIZES = ("poisson:3", "poisson:30", "uniform:1,300", "lognormal:mean=50,sigma=0.8", "geometric:20")
POLICIES = ("sarathi", "orca", "vllm-chunked", "sarathi", "vllm-chunked", "vllm", "fastertransformer")
TRANSFERS = ("fixed_ms=2,per_token_ms=0.01,link=shared", "fixed_ms=0.5,per_token_ms=0.02", "fixed_ms=1",
             "fixed_ms=0,link=shared", "per_token_ms=0.005")  # shared link or pure delays; 0 ms transfers


def _random_route(draw: st.DrawFn, engines: list[str]) -> tuple[str, dict[str, dict]]:
    """A class's route: 2-3 stages (a visit, or a fork whose 2-3 branches chain 1-2 stages, nested
    up to depth 2, and meet at its join), the last visit looping back with some probability."""
    nodes: dict[str, dict] = {}
    counter = iter(range(1000))

    def visit(then: str) -> str:
        nid = f"v{next(counter)}"
        nodes[nid] = {"engine": draw(st.sampled_from(engines)), "prefill": draw(st.sampled_from(SIZES)),
                      "decode": draw(st.sampled_from(SIZES)), "next": then}
        return nid

    def stage(then: str, depth: int) -> str:
        if depth >= 2 or draw(st.integers(0, 2)) == depth:  # a fork: 2/3 at depth 0, 1/3 at 1
            return visit(then)
        k = next(counter)
        join, fork = f"j{k}", f"f{k}"
        nodes[join] = {"join": fork, "next": then}
        heads = []
        for _ in range(draw(st.integers(2, 3))):
            head = join
            for _ in range(draw(st.integers(1, 2))):
                head = stage(head, depth + 1)
            heads.append(head)
        nodes[fork] = {"fork": heads}
        return fork

    last = visit("exit")
    head = last
    for _ in range(draw(st.integers(1, 2))):  # 1 or 2 stages before the last visit
        head = stage(head, 0)
    p_back = draw(st.sampled_from((0.0, 0.2, 0.5)))
    if p_back:
        nodes[last]["next"] = {head: p_back, "exit": 1 - p_back}
    return head, nodes


@st.composite
def random_networks(draw: st.DrawFn) -> tuple[Network, dict]:
    """A random valid network (engines of every compiled policy, one of them a pool half the time,
    prefill/decode pairs of them half the time, 1-2 classes on random routes (a visit names an
    engine, a pool or a pair; in forks and loops too), visits that draw no tokens, no prompt or no
    output in some) at a random load, with a random run length, seed, drain."""
    engines = {
        f"e{i}": {
            "budget": draw(st.sampled_from((64, 128, 512))),
            "batch_time": draw(st.sampled_from(BATCH_TIMES)),
            "policy": draw(st.sampled_from(POLICIES)),
            **({"k_max": draw(st.integers(2, 40))} if draw(st.booleans()) else {}),
        }
        for i in range(draw(st.integers(2, 4)))
    }
    if draw(st.booleans()):  # a pool of 2-4 replicas (1/3 with a second, different group) behind any router
        pool = engines["e0"]
        pool["router"] = draw(st.sampled_from(ROUTER_NAMES))
        first = draw(st.integers(1, 3))
        if draw(st.integers(0, 2)) == 0:
            pool["groups"] = [{"replicas": first}, {"replicas": 1, "budget": 64,
                                                     "batch_time": draw(st.sampled_from(BATCH_TIMES))}]
        else:
            pool["replicas"] = first + 1
    pairs: dict[str, dict] = {}
    if draw(st.booleans()):  # 1-2 prefill/decode pairs over the engines (and the pool)
        for k in range(draw(st.integers(1, 2))):
            prefill, decode = draw(st.permutations(sorted(engines)))[:2]
            pairs[f"pd{k}"] = {"prefill": prefill, "decode": decode,
                               "transfer": draw(st.sampled_from(TRANSFERS))}
    classes: dict[str, dict] = {}
    for c in range(draw(st.integers(1, 2))):
        start, nodes = _random_route(draw, sorted(engines) + sorted(pairs))
        classes[f"c{c}"] = {"rate": 1.0, "arrival": draw(st.sampled_from(("poisson", "deterministic"))),
                            "start": start, "nodes": nodes}
    net = parse_network({"engines": engines, "classes": classes, "disaggregated": pairs})
    zero = draw(st.sampled_from((0.0, 0.0, 0.5)))
    if zero:  # visits draw 0 + 0 tokens with probability 1/4: skipped (0 + d, p + 0: one pair side)
        specs = {}
        for cname, spec in net.classes.items():
            nodes_z = {nid: dataclasses.replace(n, prefill=SometimesZero(n.prefill, zero),
                                                decode=SometimesZero(n.decode, zero))
                       if n.kind == "visit" else n for nid, n in spec.nodes.items()}
            specs[cname] = dataclasses.replace(spec, nodes=nodes_z)
        net = Network(net.engines, specs, net.pools, net.pairs)
    net = net.scaled(draw(st.sampled_from((0.5, 0.9, 1.3))) * analyze(net).critical_scale)
    run = {"seed": draw(st.integers(0, 2**20)), "drain_s": draw(st.sampled_from((None, 0.0, 0.05)))}
    if draw(st.booleans()):
        run["max_requests"] = draw(st.sampled_from((300, 1, 60)))
    else:
        run["duration_s"] = draw(st.sampled_from((0.1, 0.5)))
    return net, run


def _run(net: Network, *, compiled_routing: bool, seed: int = 0, max_requests: int | None = None,
         duration_s: float | None = None, drain_s: float | None = None) -> dict:
    """``simulate_network(..., engine="compiled")``, with the routing compiled or in Python."""
    duration_ms = None if duration_s is None else duration_s * 1000.0
    run = _Run(net, analyze(net), seed, max_requests, duration_ms, drain_s, {}, "compiled",
               compiled_routing=compiled_routing)
    return run.result().to_dict()


@given(case=random_networks())
@settings(max_examples=examples(20))
def test_compiled_routing_is_the_python_routing_on_random_networks(case) -> None:
    """Routing in compiled code gives exactly (to the bit) the run of the Python routing over the
    same compiled engines, and the run of the Python engines (to float rounding)."""
    net, run = case
    compiled = _run(net, compiled_routing=True, **run)
    python = _run(net, compiled_routing=False, **run)
    assert json.dumps(compiled, sort_keys=True) == json.dumps(python, sort_keys=True)
    fast = simulate_network(net, engine="fast", **run).to_dict()
    _same(fast, compiled)


def test_every_resumable_step_of_the_compiled_routing(monkeypatch) -> None:
    """With the network loop's buffers and pools started at one entry, it returns to the driver
    for each kind of need (growth, refill, drain, horizon) again and again; the run stays exact."""
    from llmqueue.engines import compiled
    from llmqueue.engines import netkernel as kernel

    for name in ("START_TOKENS", "START_FRAMES", "START_PENDING", "LATENCY_ROOM", "DRAW_CHUNKS",
                 "START_TRANSFERS", "PAIR_LATENCY_ROOM"):
        monkeypatch.setattr(compiled.NetworkLoop, name, 1)
    monkeypatch.setattr(compiled._State, "MIN_ROOM", 0)  # engines' output room 4 b + 64
    seen = record_net_run_codes(monkeypatch)
    over = parse_network(fork_join(1.0, p_back=0.3))
    over = over.scaled(2.0 * analyze(over).critical_scale)  # the critic piles up > 1024 requests
    pooled = fork_join(4.0, p_back=0.3)  # the planner a pool: its router's stream refills too
    pooled["engines"]["planner"].update(replicas=3, router="vllm-dp")
    paired = fork_join(4.0, p_back=0.3)  # research on a pair: pools both sides, slow transfers overlap
    paired["engines"]["sub"].update(replicas=2, router="p2c")
    paired["engines"]["decoder"] = {"budget": 512, "batch_time": LINEAR, "replicas": 2, "router": "jsq"}
    paired["disaggregated"] = {"deep": {"prefill": "sub", "decode": "decoder",
                                        "transfer": "fixed_ms=300,per_token_ms=0.1"}}
    paired["classes"]["task"]["nodes"]["research"]["engine"] = "deep"
    for net, run in ((over, {"seed": 3, "max_requests": 5000, "drain_s": 1.0}),  # > 4096 arrivals
                     (parse_network(fork_join(4.0, p_back=0.5)), {"seed": 8, "duration_s": 2.0}),
                     (parse_network(pooled), {"seed": 2, "max_requests": 1500}),
                     (parse_network(paired), {"seed": 5, "max_requests": 800, "drain_s": 0.2})):
        assert json.dumps(_run(net, compiled_routing=True, **run), sort_keys=True) == \
            json.dumps(_run(net, compiled_routing=False, **run), sort_keys=True)
    expected = {kernel.NET_DONE, kernel.NET_ROOM, kernel.NET_SLOTS, kernel.NET_SIZES, kernel.NET_CHOICES,
                kernel.NET_TOKENS, kernel.NET_FRAMES, kernel.NET_PENDING, kernel.NET_LATENCY,
                kernel.NET_ARRIVALS, kernel.NET_HORIZON, kernel.NET_POOL_DRAWS, kernel.NET_TRANSFERS,
                kernel.NET_PAIR_LATENCY}
    assert seen == expected


def test_compiled_routing_is_deterministic_and_reports_bad_batch_times() -> None:
    """Same seed, same run through the compiled routing; a batch time that fails inside a network
    run is reported as in the Python engines."""
    net = parse_network(fork_join(3.0, p_back=0.3))
    one = _run(net, compiled_routing=True, seed=11, max_requests=800)
    two = _run(net, compiled_routing=True, seed=11, max_requests=800)
    assert one == two or json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)
    assert one["classes"]["task"]["completed"] == 800
    good = net.engines["tools"].batch_time

    def gap(n: int) -> float:  # no valid time for batches of 101..199 tokens
        return math.nan if 100 < n < 200 else good(n)

    broken = Network({**net.engines, "tools": dataclasses.replace(net.engines["tools"], batch_time=gap)},
                     net.classes)
    for engine in ("compiled", "fast"):
        with pytest.raises(ConfigError, match=r"^batch-time: t\(1\d\d\) must be a positive finite time"):
            simulate_network(broken, seed=1, max_requests=300, engine=engine)


# -- KV-cache memory (engines' ``memory``) --------------------------------------------------------------


def chat_loop(rate: float, memory: str | None = None) -> dict:
    """gen (optionally with a KV cache) -> judge -> back to gen with probability 0.2, or exit."""
    gen: dict = {"budget": 256, "batch_time": LINEAR}
    if memory is not None:
        gen["memory"] = memory
    return {
        "engines": {"gen": gen, "judge": {"budget": 256, "batch_time": LINEAR}},
        "classes": {"chat": {"rate": rate, "start": "answer", "nodes": {
            "answer": {"engine": "gen", "prefill": "uniform:50,300", "decode": "uniform:50,400",
                       "next": "check"},
            "check": {"engine": "judge", "prefill": "poisson:100", "decode": "poisson:5",
                      "next": {"answer": 0.2, "exit": 0.8}},
        }}},
    }


@pytest.mark.parametrize(
    ("memory", "field", "problem"),
    [
        ("tokens=5", "engines.tools.memory.tokens", "must be >= 16"),
        ("tokens=4096,watermark=1", "engines.tools.memory.watermark", "must be < 1"),
        ("colour=3", "engines.tools.memory", "unknown key 'colour'"),
        ("", "engines.tools.memory", "expected 'tokens=M"),
        (4096, "engines.tools.memory", "valid string"),
    ],
)
def test_bad_engine_memory_is_refused_naming_the_key(memory, field, problem) -> None:
    with pytest.raises(ConfigError) as err:
        parse_network(_broken(["engines", "tools", "memory"], memory))
    assert err.value.field == field
    assert problem in err.value.problem


def test_tight_memory_engine_completes_every_request_and_preempts() -> None:
    """A cache of 4096 tokens (every visit fits alone) at the gen engine: all requests complete
    after the drain, with preemptions there and none at the engine without a cache."""
    net = parse_network(chat_loop(20.0, "tokens=4096"))
    r = simulate_network(net, seed=3, max_requests=300)
    chat, gen, judge = r.classes["chat"], r.engines["gen"], r.engines["judge"]
    assert chat.completed == chat.arrivals == 300 and chat.rejected == 0 and chat.in_network == 0
    assert gen.metrics.completed == gen.metrics.arrivals and gen.metrics.rejected_requests == 0
    assert gen.metrics.preemptions > 0 and gen.metrics.recomputed_tokens > 0
    assert 0 < gen.metrics.mean_kv_usage <= gen.metrics.peak_kv_usage <= 1
    assert judge.metrics.preemptions == 0 and math.isnan(judge.metrics.peak_kv_usage)
    doc = r.to_dict()
    assert doc["engines"]["gen"]["memory"] == "tokens=4096,block=16,watermark=0.01"
    assert doc["engines"]["gen"]["preemptions"] == gen.metrics.preemptions
    assert doc["engines"]["judge"]["memory"] is None
    assert any("gen have a KV cache: they ran on the fast engine" in n for n in r.notes)
    ref = simulate_network(net, seed=3, max_requests=300, engine="reference").to_dict()["engines"]
    for name, figures in doc["engines"].items():  # the fast engine is exact with memory
        for key, value in figures.items():
            other = ref[name][key]
            if isinstance(value, float):
                assert other == pytest.approx(value, rel=1e-9, nan_ok=True), (name, key)
            else:
                assert other == value, (name, key)
    # the analysis counts the cache as a batch-size limit: a higher load than without it
    plain = analyze(parse_network(chat_loop(20.0)))
    assert r.analysis.engines["gen"].memory_batch_limit is not None
    assert r.analysis.engines["gen"].rho > plain.engines["gen"].rho
    assert any("engine gen: its KV cache (4096 tokens) binds" in w for w in r.analysis.warnings)
    assert r.predicted.verdict in ("no guarantee", "unstable")


def _records(net: Network, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict, dict]:
    """(to_dict, every engine's request records, every class's end-to-end latencies) of a run on the
    reference engines (seed 5, 200 requests), with the per-request records kept."""
    from llmqueue.engines.metrics import Recorder
    from llmqueue.sim import network as netsim

    monkeypatch.setattr(netsim, "Recorder", lambda keep_requests: Recorder(keep_requests=True))
    r = _Run(net, analyze(net), 5, 200, None, None, {}, "reference")
    doc = r.result().to_dict()
    records = {n: list(rec.completed_records()) for n, rec in r.recorders.items()}
    latency = {c: list(values) for c, values in r.class_latency.items()}
    return doc, records, latency


def test_a_huge_cache_without_watermark_gives_the_same_run_as_no_memory(monkeypatch) -> None:
    """A cache no run can fill (watermark 0) never refuses, preempts nor delays: every visit's
    record and every request's end-to-end latency are those of the run without memory. At this
    load (0.8 of the critical scale) a cache of 3000 tokens does change them."""
    rate = 0.8 * analyze(parse_network(fork_join(1.0, p_back=0.3))).critical_scale
    data = fork_join(rate, p_back=0.3)
    plain = parse_network(data)
    for engine in data["engines"].values():
        engine["memory"] = "tokens=10000000,watermark=0"
    huge = parse_network(data)
    doc_a, records_a, latency_a = _records(plain, monkeypatch)
    doc_b, records_b, latency_b = _records(huge, monkeypatch)
    assert records_a == records_b and latency_a == latency_b
    assert sum(len(v) for v in records_a.values()) > 800  # every visit of 200 tasks, loops included
    assert doc_a["classes"] == doc_b["classes"]
    memory_keys = {"memory", "peak_kv_usage", "mean_kv_usage"}
    for name, engine in doc_a["engines"].items():
        other = doc_b["engines"][name]
        assert {k: v for k, v in engine.items() if k not in memory_keys} == \
            {k: v for k, v in other.items() if k not in memory_keys}
        assert other["preemptions"] == other["rejected_requests"] == 0 and other["peak_kv_usage"] < 0.01
    for engine in data["engines"].values():
        engine["memory"] = "tokens=3000,watermark=0"
    doc_c, records_c, _ = _records(parse_network(data), monkeypatch)
    assert records_c != records_a and doc_c["engines"]["sub"]["preemptions"] > 0


def test_a_visit_the_cache_cannot_hold_loses_its_request() -> None:
    """Research visits of up to 600 + 60 tokens at an engine of 512: those are refused, so their
    task is lost (counted once, its tool branch still runs); everything else completes."""
    data = fork_join(2.0)
    data["engines"]["sub"]["memory"] = "tokens=512,watermark=0"
    data["classes"]["task"]["nodes"]["research"]["prefill"] = "uniform:100,600"
    net = parse_network(data)
    assert any("requests of task.research can need more KV cache" in w for w in analyze(net).warnings)
    r = simulate_network(net, seed=2, max_requests=400)
    task = r.classes["task"]
    planner, tools, sub = (r.engines[n].metrics for n in ("planner", "tools", "sub"))
    assert task.rejected == sub.rejected_requests > 0
    assert task.completed + task.rejected == task.arrivals == 400 and task.in_network == 0
    assert tools.arrivals == planner.completed == 400  # the refused tasks' tool branches still ran
    assert sub.arrivals + sub.rejected_requests == planner.completed
    assert r.engines["critic"].metrics.arrivals == task.completed
    assert r.visits == sum(r.engines[n].metrics.arrivals for n in r.engines)
    assert any(f"{task.rejected} request(s) refused" in n for n in r.notes)
    assert r.to_dict()["classes"]["task"]["rejected"] == task.rejected


def test_memory_engines_pick_their_engine_in_one_place() -> None:
    """``engine_kind`` runs a memory engine on the fast engine (the reference one when forced or
    when its policy needs it); a forced compiled run is refused in one line."""
    from llmqueue.policies.fcfs import make_policy
    from llmqueue.sim import network as netsim

    net = parse_network(chat_loop(5.0, "tokens=4096"))
    gen, judge = net.engines["gen"], net.engines["judge"]
    sarathi = make_policy("sarathi")
    assert netsim.engine_kind(sarathi, gen) == "fast"
    assert netsim.engine_kind(sarathi, gen, "fast") == "fast"
    assert netsim.engine_kind(sarathi, gen, "reference") == "reference"
    assert netsim.engine_kind(sarathi, judge, "fast") == "fast"
    assert netsim.engine_kind(netsim.network_policy(parse_network(_with_pressure()), "tools"),
                              parse_network(_with_pressure()).engines["tools"]) == "pressure"
    with pytest.raises(ConfigError, match=r"^engine: engine gen has a KV cache \(memory\)"):
        simulate_network(net, seed=1, max_requests=10, engine="compiled")


def _with_pressure() -> dict:
    data = fork_join(1.0)
    data["engines"]["tools"].update(policy="max-pressure", memory="tokens=2048")
    return data


def test_network_cli_with_memory_and_a_max_pressure_engine_with_a_cache(tmp_path, capsys) -> None:
    """The CLI shows the memory columns and names a bad spec's key (exit code 2); a max-pressure
    engine keeps its network view with a cache."""
    import yaml

    path = tmp_path / "net.yaml"
    path.write_text(yaml.safe_dump(chat_loop(20.0, "tokens=4096")), encoding="utf-8")
    code, out, _ = run_cli(capsys, "network", "simulate", str(path), "--requests", "200")
    assert code == 0 and "preemptions" in out and "KV tokens" in out and "4,096" in out
    code, out, _ = run_cli(capsys, "network", "analyze", str(path), "--json")
    doc = json.loads(out)
    assert doc["engines"]["gen"]["memory"] == "tokens=4096,block=16,watermark=0.01"
    assert doc["engines"]["gen"]["memory_batch_limit"] > 0 and doc["engines"]["judge"]["memory"] is None
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(chat_loop(20.0, "tokens=8")), encoding="utf-8")
    code, _, err = run_cli(capsys, "network", "simulate", str(bad), "--requests", "10")
    assert code == 2 and err.count("\n") == 1 and "engines.gen.memory.tokens: must be >= 16" in err
    r = simulate_network(parse_network(_with_pressure()), seed=1, max_requests=300)
    assert r.classes["task"].completed == 300
    assert r.engines["tools"].metrics.peak_kv_usage > 0
