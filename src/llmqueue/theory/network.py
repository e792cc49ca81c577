"""Network analysis without simulation: traffic equations, per-engine loads, virtual stations and the
network's predicted verdict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import (
    BatchTime,
    mean_decode_context,
    mix_batch_time,
)
from llmqueue.model.network import (
    EXIT,
    ClassSpec,
    EngineSpec,
    Network,
    Node,
    PairSpec,
    _successors,
    as_network,
    visit_counts,
)
from llmqueue.theory import capacity as theory


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One engine's offered load from the traffic equations (token rates per second)."""

    engine: str
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    capacity_tokens_per_s: float
    rho: float
    buffers: tuple[str, ...]
    memory_batch_limit: int | None = None  # the requests the KV cache lets decode at once
    token_time: BatchTime | None = None  # the t(n) the loads use (a shape model: its view of the mix)
    visits_per_s: float = 0.0  # visits per second (the traffic equations)

    @property
    def tokens_per_s(self) -> float:
        return self.prefill_tokens_per_s + self.decode_tokens_per_s

    @property
    def mean_prefill_tokens(self) -> float:
        """Mean prompt tokens per visit of this engine (0 when nothing visits it)."""
        visits = self.visits_per_s
        return self.prefill_tokens_per_s / visits if visits > 0 else 0.0

    @property
    def mean_decode_tokens(self) -> float:
        """Mean output tokens per visit of this engine (0 when nothing visits it)."""
        visits = self.visits_per_s
        return self.decode_tokens_per_s / visits if visits > 0 else 0.0


@dataclass(frozen=True, slots=True)
class VirtualStation:
    """Two top-priority buffers on two engines that feed each other's low-priority work (§5.4)."""

    buffers: tuple[str, str]
    engines: tuple[str, str]
    load: float


@dataclass(frozen=True, slots=True)
class PoolLoad:
    """A pool's load: offered tokens over its members' summed capacity, and how the analysis split
    it among the members (``even``: the router sends each 1/N of the visits, round-robin and
    random; ``capacity``: in proportion to capacity, what a load-balancing router aims at)."""

    pool: str
    router: str
    members: tuple[str, ...]
    tokens_per_s: float
    capacity_tokens_per_s: float
    rho: float
    split: str
    identical: bool  # the members share budget, k_max, batch time, policy and KV cache


@dataclass(frozen=True, slots=True)
class PairLoad:
    """A prefill/decode pair's loads: its prefill side (prompt tokens, visits (p, 0)), its decode
    side (output tokens, visits (0, d) holding context p, with the batch-size and KV-cache limits)
    and its shared link (arrival rate times mean transfer time; 0 for pure delays). A side that is
    a pool gives its most loaded member's. The pair's critical scale is 1 / the largest."""

    pair: str
    prefill_rho: float
    decode_rho: float
    link_rho: float
    visits_per_s: float

    @property
    def rho(self) -> float:
        """The pair's load: the largest of its three."""
        return max(self.prefill_rho, self.decode_rho, self.link_rho)

    @property
    def critical_scale(self) -> float:
        """The factor on every arrival rate that puts the pair at load 1."""
        return 1.0 / self.rho if self.rho > 0 else math.inf


@dataclass(frozen=True, slots=True)
class Analysis:
    """What the traffic equations say about a network."""

    visits: Mapping[str, Mapping[str, float]]
    engines: Mapping[str, EngineLoad]
    bottleneck: str
    critical_scale: float
    cyclic: bool
    cycle: tuple[str, ...]
    virtual_stations: tuple[VirtualStation, ...]
    warnings: tuple[str, ...]
    buffer_tokens_per_s: Mapping[str, float]
    pools: Mapping[str, PoolLoad] = field(default_factory=dict)
    pairs: Mapping[str, PairLoad] = field(default_factory=dict)

    def overloaded_members(self, pool: str) -> tuple[str, ...]:
        """The members of ``pool`` whose load under the analysis's split exceeds 1."""
        return tuple(m for m in self.pools[pool].members if self.engines[m].rho > 1)


EVEN_SPLIT_ROUTERS = ("round-robin", "random")
"""Routers that send each member of a pool 1/N of its visits whatever the members' state."""


def _split(net: Network, routers: Mapping[str, str],
           visits: Mapping[str, Mapping[str, float]]) -> dict[str, tuple[tuple[str, float], ...]]:
    """For each visit target (an engine or a pool): the engines its visits go to, with the share of
    them each gets (even for round-robin and random, else in proportion to nominal capacity, a
    composition-aware batch time seen through the pool's offered mix)."""
    out: dict[str, tuple[tuple[str, float], ...]] = {name: ((name, 1.0),) for name in net.engines}
    for pool in net.pools.values():
        n = len(pool.members)
        if routers.get(pool.name, pool.router) in EVEN_SPLIT_ROUTERS:
            out[pool.name] = tuple((m, 1.0 / n) for m in pool.members)
            continue
        rate = pre = dec = 0.0
        for cname, c in net.classes.items():
            for nid, node in c.nodes.items():
                if node.kind != "visit":
                    continue
                for target, mean_p, mean_d, _ in visit_parts(net, node):
                    if target == pool.name:
                        r = c.rate_per_s * visits[cname][nid]
                        rate, pre, dec = rate + r, pre + r * mean_p, dec + r * mean_d
        mean_p, mean_d = (pre / rate, dec / rate) if rate > 0 else (0.0, 0.0)
        caps = [theory.capacity_tokens_per_ms(mix_batch_time(net.engines[m].batch_time, mean_p, mean_d),
                                              net.engines[m].budget) for m in pool.members]
        total = sum(caps)
        out[pool.name] = tuple((m, c / total) for m, c in zip(pool.members, caps, strict=True))
    return out


def visit_parts(net: Network, node: Node) -> list[tuple[str, float, float, float]]:
    """Where a visit's tokens go: (engine or pool, mean prompt tokens, mean output tokens, the
    decoders' mean KV context). A plain visit is one part (context ``p + (d + 1) / 2``); a visit to
    a prefill/decode pair is its prompt at the prefill side, visits (p, 0), and its output at the
    decode side, visits (0, d) that hold the prompt's KV: the same context."""
    assert node.prefill is not None and node.decode is not None
    p, d = node.prefill.mean, node.decode.mean
    context = mean_decode_context(p, d)
    out = []
    for target, part in net.parts_of(node.engine or ""):
        if part == "prefill":
            out.append((target, p, 0.0, 0.0))
        elif part == "decode":
            out.append((target, 0.0, d, context))
        else:
            out.append((target, p, d, context))
    return out


def analyze(net: Network, policy_names: Mapping[str, str] | None = None,
            priorities: Mapping[str, Sequence[str]] | None = None,
            routers: Mapping[str, str] | None = None) -> Analysis:
    """Traffic equations, loads, bottleneck, critical scaling and warnings (no simulation).

    ``policy_names`` overrides engines' policy names (a simulation with other policies);
    ``priorities`` the priority order of engines put on ``priority`` that way (else the file's);
    ``routers`` pools' router names (a simulation with other routers). A pool's visits are split
    among its members (``_split``); its own load is in ``pools``.
    """
    net = as_network(net)
    policy_of = {name: (policy_names or {}).get(name, e.policy) for name, e in net.engines.items()}
    order_of = {name: tuple((priorities or {}).get(name, e.priority)) if policy_of[name] == "priority"
                else () for name, e in net.engines.items()}
    visits = {name: visit_counts(c) for name, c in net.classes.items()}
    shares = _split(net, routers or {}, visits)
    prefill = dict.fromkeys(net.engines, 0.0)
    decode = dict.fromkeys(net.engines, 0.0)
    buffers: dict[str, list[str]] = {e: [] for e in net.engines}
    buffer_rate: dict[str, float] = {}
    visit_rate = dict.fromkeys(net.engines, 0.0)
    context = dict.fromkeys(net.engines, 0.0)  # decode-token-weighted KV context (for memory)
    for name, c in net.classes.items():
        for nid, node in c.nodes.items():
            if node.kind != "visit" or node.engine is None:
                continue
            assert node.prefill is not None and node.decode is not None
            total_rate = c.rate_per_s * visits[name][nid]
            for target, mean_p, mean_d, ctx in visit_parts(net, node):
                for member, share in shares[target]:
                    rate = total_rate * share
                    prefill[member] += rate * mean_p
                    decode[member] += rate * mean_d
                    visit_rate[member] += rate
                    context[member] += rate * mean_d * ctx
                    buffers[member].append(f"{name}.{nid}")
            buffer_rate[f"{name}.{nid}"] = total_rate * node.mean_tokens
    loads = {}
    memory_warnings: list[str] = []
    for e in net.engines.values():
        visits_e = visit_rate[e.name]
        mean_p = prefill[e.name] / visits_e if visits_e > 0 else 0.0
        mean_d = decode[e.name] / visits_e if visits_e > 0 else 0.0
        ctx = context[e.name] / decode[e.name] if decode[e.name] > 0 else None
        # a composition-aware model is seen through this engine's offered mix (as `capacity` does
        # for one engine); the decoders' KV context is the decode-token-weighted mean of its visits
        token_time = mix_batch_time(e.batch_time, mean_p, mean_d, ctx)
        capacity = theory.capacity_tokens_per_ms(token_time, e.budget) * 1000.0
        rho = _engine_rho(token_time, e.budget, prefill[e.name], decode[e.name], capacity, e.k_max)
        k_mem = None
        if e.memory is not None and visits_e > 0:  # the cache bounds the batch too (§4)
            k_mem = theory.memory_batch_limit(e.memory, mean_p, mean_d, ctx)
            k_limit = k_mem if e.k_max is None else min(e.k_max, k_mem)
            rho_mem = _engine_rho(token_time, e.budget, prefill[e.name], decode[e.name], capacity,
                                  k_limit)
            if rho_mem > rho + 1e-9:
                memory_warnings.append(
                    f"engine {e.name}: its KV cache ({e.memory.capacity_tokens} tokens) binds: it "
                    f"holds about {k_mem} decoding requests, load {rho_mem:.3f} (without it "
                    f"{rho:.3f}); an upper bound: preemption costs capacity near it (docs/memory.md)"
                )
            rho = max(rho, rho_mem)
        loads[e.name] = EngineLoad(e.name, prefill[e.name], decode[e.name], capacity, rho,
                                   tuple(buffers[e.name]), k_mem, token_time, visits_e)
    bottleneck = max(loads, key=lambda k: loads[k].rho)
    top = loads[bottleneck].rho
    pairs = _pair_loads(net, visits, loads)
    links = [p.link_rho for p in pairs.values()]
    cycle = _engine_cycle(net)
    warnings: list[str] = []
    if cycle:
        warnings.append(
            "routing between engines is cyclic (" + " -> ".join(cycle) + "): the throughput-"
            "optimality theorem (DAG and fork-join networks) does not apply; a network below its "
            "nominal load is not guaranteed stable (with class priorities it can diverge: §5.4)"
        )
    warnings.extend(memory_warnings)
    stations = _virtual_stations(net, loads, buffer_rate, order_of)
    for vs in stations:
        if vs.load > 1:
            warnings.append(
                f"the priorities make {vs.buffers[0]} and {vs.buffers[1]} a virtual station "
                f"(Rybko-Stolyar) with load {vs.load:.3f} > 1: expect instability although every "
                "engine is below capacity; reverse the priorities or use max-pressure"
            )
    for e in net.engines.values():
        for buffer in _unfitting(net, e):
            tokens = e.memory.capacity_tokens if e.memory is not None else 0
            warnings.append(
                f"engine {e.name}: requests of {buffer} can need more KV cache than its {tokens} "
                "tokens hold: they are refused (rejected_requests) and leave the network unfinished"
            )
        policy = policy_of[e.name]
        if policy in ("vllm", "fastertransformer"):
            warnings.append(f"engine {e.name}: policy '{policy}' is not work-conserving: no "
                            "stability guarantee below nominal load (Fig. 1)")
            for buffer in _oversized(net, e):
                warnings.append(
                    f"engine {e.name}: prompts of {buffer} can exceed the budget {e.budget} and "
                    f"policy '{policy}' never chunks them: such a prompt blocks the engine for good"
                )
    pools = {}
    for pool in net.pools.values():
        tokens = sum(loads[m].tokens_per_s for m in pool.members)
        cap = sum(loads[m].capacity_tokens_per_s for m in pool.members)
        router = (routers or {}).get(pool.name, pool.router)
        first = net.engines[pool.members[0]]
        identical = all(_same_engine(first, net.engines[m]) for m in pool.members)
        pools[pool.name] = PoolLoad(pool.name, router, pool.members, tokens, cap, tokens / cap,
                                    "even" if router in EVEN_SPLIT_ROUTERS else "capacity", identical)
        over = [m for m in pool.members if loads[m].rho > 1]
        if router in EVEN_SPLIT_ROUTERS and over and tokens / cap <= 1:
            warnings.append(f"pool {pool.name}: router '{router}' sends each member 1/"
                            f"{len(pool.members)} of its visits: member(s) {', '.join(over)} overload "
                            f"although the pool is loaded at {tokens / cap:.3f} of its capacity")
    for pair in pairs.values():
        if pair.link_rho > 1:
            warnings.append(f"pair {pair.pair}: its shared KV link is loaded at {pair.link_rho:.3f} > 1: "
                            "transfers queue without bound")
    worst = max([top, *links])
    return Analysis(visits, loads, bottleneck, 1.0 / worst if worst > 0 else math.inf, bool(cycle),
                    cycle, stations, tuple(warnings), buffer_rate, pools, pairs)


def _check_decode_cache(net: Network, pair: PairSpec, visit: str, node: Node) -> None:
    """ConfigError when a decode member's KV cache cannot hold one mean request of the pair's
    ``visit`` (its prompt's KV plus its output): that pair could never decode."""
    assert node.prefill is not None and node.decode is not None
    need = math.ceil(node.prefill.mean + node.decode.mean)
    for m in net.members_of(pair.decode):
        memory = net.engines[m].memory
        if memory is not None and not memory.fits_alone(need):
            raise ConfigError(f"disaggregated.{pair.name}.decode", pair.decode,
                              f"engine {m}'s KV cache ({memory.capacity_tokens} tokens) cannot hold "
                              f"one request of {visit} (context + output, {need} tokens on average)")


def _pair_loads(net: Network, visits: Mapping[str, Mapping[str, float]],
                loads: Mapping[str, EngineLoad]) -> dict[str, PairLoad]:
    """Every pair's prefill-side, decode-side and link loads (``PairLoad``); ConfigError when a
    decode member cannot hold one of its visits (``_check_decode_cache``)."""
    out = {}
    for pair in net.pairs.values():
        rate = transfer_ms = 0.0  # visits/s, and their summed mean transfer time (ms)
        for cname, c in net.classes.items():
            for nid, node in c.nodes.items():
                if node.kind == "visit" and node.engine == pair.name:
                    _check_decode_cache(net, pair, f"{cname}.{nid}", node)
                    assert node.prefill is not None
                    r = c.rate_per_s * visits[cname][nid]
                    rate += r
                    transfer_ms += r * pair.transfer_ms(node.prefill.mean)
        link = transfer_ms / 1000.0 if pair.shared_link else 0.0
        out[pair.name] = PairLoad(
            pair.name, max(loads[m].rho for m in net.members_of(pair.prefill)),
            max(loads[m].rho for m in net.members_of(pair.decode)), link, rate)
    return out


def _same_engine(a: EngineSpec, b: EngineSpec) -> bool:
    """Whether two engines are identical but for their names."""
    return (a.budget, a.k_max, a.batch_time, a.policy, a.priority, a.memory) == (
        b.budget, b.k_max, b.batch_time, b.policy, b.priority, b.memory)


def _engine_rho(token_time: BatchTime, budget: int, prefill_per_s: float, decode_per_s: float,
                capacity_per_s: float, k_limit: int | None) -> float:
    """An engine's load: token rate over capacity, or against the §4 region of ``k_limit``
    (``token_time``: the engine's t(n), a shape model's view of its mix)."""
    if k_limit is None:
        return (prefill_per_s + decode_per_s) / capacity_per_s
    return theory.kmax_load(prefill_per_s / 1000.0, decode_per_s / 1000.0, token_time, budget,
                            k_limit)


def _oversized(net: Network, engine: EngineSpec) -> list[str]:
    """Buffers at ``engine`` whose prompts can exceed its budget (checked on 20,000 draws, fixed
    seed: a heavy tail that this misses is rare enough not to matter for a run of that size)."""
    out = []
    rng = np.random.default_rng(0)
    for c in net.classes.values():
        for nid, node in c.nodes.items():
            at_engine = (node.kind == "visit" and node.prefill is not None and any(
                part != "decode" and engine.name in net.members_of(target)
                for target, part in net.parts_of(node.engine or "")))
            if at_engine and int(node.prefill.sample(rng, 20_000).max()) > engine.budget:  # type: ignore[union-attr]
                out.append(f"{c.name}.{nid}")
    return out


def _unfitting(net: Network, engine: EngineSpec) -> list[str]:
    """Buffers at ``engine`` whose prompt plus output can exceed what its KV cache can ever hold
    (checked as ``_oversized`` is, on 20,000 draws with a fixed seed)."""
    if engine.memory is None:
        return []
    out = []
    rng = np.random.default_rng(0)
    for c in net.classes.values():
        for nid, node in c.nodes.items():
            if node.kind != "visit" or engine.name not in net.members_of(node.engine or ""):
                continue
            assert node.prefill is not None and node.decode is not None
            prompt_only = any(part == "prefill" and engine.name in net.members_of(target)
                              for target, part in net.parts_of(node.engine or ""))
            prompts = node.prefill.sample(rng, 20_000)
            outputs = node.decode.sample(rng, 20_000) * (0 if prompt_only else 1)
            largest = int((prompts + outputs).max())
            if not engine.memory.fits_alone(largest):
                out.append(f"{c.name}.{nid}")
    return out


def _engine_edges(net: Network) -> set[tuple[str, str]]:
    """Engine-to-engine moves of requests (through forks and joins); a revisit is a self-loop."""
    edges: set[tuple[str, str]] = set()
    for c in net.classes.values():
        for nid, node in c.nodes.items():
            if node.kind != "visit":
                continue
            for nxt in _next_visits(c, nid):
                edges.add((node.engine or "", c.nodes[nxt].engine or ""))
    return edges


def _next_visits(c: ClassSpec, node_id: str) -> set[str]:
    """The visit nodes a request can reach next from ``node_id`` (through forks and joins)."""
    out: set[str] = set()
    seen: set[str] = set()
    stack = list(_successors(c, node_id))
    while stack:
        nid = stack.pop()
        if nid == EXIT or nid in seen:
            continue
        seen.add(nid)
        node = c.nodes[nid]
        if node.kind == "visit":
            out.add(nid)
        elif node.kind == "fork":
            stack.extend(node.branches)
        else:
            stack.extend(_successors(c, nid))
    return out


def _engine_cycle(net: Network) -> tuple[str, ...]:
    """A cycle of engines in the routing graph, as engine names (empty if acyclic)."""
    edges = _engine_edges(net)
    graph: dict[str, list[str]] = {e: [] for e in (*net.engines, *net.pools, *net.pairs)}
    for a, b in sorted(edges):
        graph[a].append(b)
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(u: str) -> tuple[str, ...]:
        state[u] = 1
        path.append(u)
        for v in graph[u]:
            if state.get(v) == 1:
                return (*path[path.index(v):], v)
            if v not in state:
                found = visit(v)
                if found:
                    return found
        path.pop()
        state[u] = 2
        return ()

    for u in graph:
        if u not in state:
            found = visit(u)
            if found:
                return found
    return ()


def _virtual_stations(net: Network, loads: Mapping[str, EngineLoad], buffer_rate: Mapping[str, float],
                      order_of: Mapping[str, tuple[str, ...]]) -> tuple[VirtualStation, ...]:
    """Pairs of top-priority buffers x (engine j) and y (engine k) such that x is fed by a
    lower-priority buffer at k and y by a lower-priority buffer at j (the RS pattern).
    ``order_of``: each engine's class priority as run (empty: not on a priority policy)."""
    tops: dict[str, set[str]] = {}
    for e in net.engines.values():
        order = order_of.get(e.name, ())
        if not order:
            continue
        first = order[0]
        tops[e.name] = {b for b in loads[e.name].buffers if b == first or b.startswith(first + ".")}
    feeders: dict[str, set[str]] = {}  # buffer -> buffers that feed it
    for c in net.classes.values():
        for nid, node in c.nodes.items():
            if node.kind == "visit":
                for nxt in _next_visits(c, nid):
                    feeders.setdefault(f"{c.name}.{nxt}", set()).add(f"{c.name}.{nid}")
    engine_of = {b: e for e, load in loads.items() for b in load.buffers}
    out = []
    names = sorted(tops)
    for i, j in enumerate(names):
        for k in names[i + 1:]:
            for x in sorted(tops[j]):
                for y in sorted(tops[k]):
                    x_fed = any(engine_of.get(f) == k and f not in tops[k] for f in feeders.get(x, ()))
                    y_fed = any(engine_of.get(f) == j and f not in tops[j] for f in feeders.get(y, ()))
                    if x_fed and y_fed:
                        load = (buffer_rate[x] / loads[j].capacity_tokens_per_s
                                + buffer_rate[y] / loads[k].capacity_tokens_per_s)
                        out.append(VirtualStation((x, y), (j, k), load))
    return tuple(out)
