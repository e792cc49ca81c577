"""Networks of engines (AI agents, PAPER.md §5): their description and validation (the analysis
is ``llmqueue.theory.network``).

A network has **engines** (budget, k_max, batch-time model, policy, optional class priority,
optional KV-cache ``memory``) and request **classes**. An engine table with ``replicas`` (or
``groups`` of replicas, each overriding engine keys) is a **pool**: its members are engines named
``pool/0``, ``pool/1``, ... (``Network.engines``; ``Network.pools`` holds each ``PoolSpec``), and a
visit naming the pool goes to the member its ``router`` picks (``llmqueue.policies.routers``). Each
class has an arrival process and a route: a graph of nodes starting at ``start``. A ``visit`` node
names an engine and that visit's prefill/decode size distributions. A ``fork`` node sends one
sub-request down each of its branches; they meet again at the ``join`` node that names the fork, and
the request goes on from there once every branch is done. ``next`` is a node id, ``"exit"``, or a
mapping of them to probabilities (a critic that sends work back with probability p). Cycles are
allowed as long as the route ends with probability 1.

The buffer of a visit is ``class.node``: requests of that class waiting at or served by that
visit. The analysis solves the traffic equations (expected visits per request of each node)
to get every engine's token load, its load against capacity (with the batch-size limit its KV
cache sets, docs/memory.md; a composition-aware batch time seen through the engine's offered mix,
as ``llmqueue capacity`` sees it for one engine), the bottleneck and the critical scaling of all
arrival rates. It
also warns when the routing between engines is cyclic, where the throughput-optimality theorem
does not apply, and flags the virtual stations of two-engine priority networks such as the
Rybko–Stolyar network of §5.4.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmqueue.errors import ConfigError
from llmqueue.io.configfile import first_error, read_table, split_items
from llmqueue.model.batchtime import (
    DEFAULT_BATCH_TIME,
    BatchTime,
    ShapeTime,
    parse_batch_time,
)
from llmqueue.model.memory import KVCache, parse_memory
from llmqueue.model.specs import parse_arrival, parse_size
from llmqueue.model.workload import ArrivalProcess, SizeDist

EXIT = "exit"
ABSORB_TOLERANCE = 1e-9

# -- the file format (validated by pydantic; errors name the key) ----------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GroupModel(_Model):
    """One group of identical replicas of a heterogeneous pool: its count and the engine keys it
    overrides."""

    replicas: Annotated[int, Field(strict=True, ge=1)]
    budget: Annotated[int, Field(strict=True, ge=1)] | None = None
    k_max: Annotated[int, Field(strict=True, ge=1)] | None = None
    batch_time: str | None = None
    policy: str | None = None
    priority: list[str] | None = None
    memory: str | None = None


class EngineModel(_Model):
    """One engine in a network file, or a pool of ``replicas`` engines (or of ``groups``) behind a
    ``router``."""

    budget: Annotated[int, Field(strict=True, ge=1)] | None = None
    k_max: Annotated[int, Field(strict=True, ge=1)] | None = None
    batch_time: str = DEFAULT_BATCH_TIME
    policy: str = "sarathi"
    priority: list[str] | None = None
    memory: str | None = None
    replicas: Annotated[int, Field(strict=True, ge=1)] | None = None
    router: str = "jsq"
    groups: Annotated[list[GroupModel], Field(min_length=1)] | None = None


class NodeModel(_Model):
    """One route node: a visit (``engine``), a fork (``fork``) or a join (``join``)."""

    engine: str | None = None
    prefill: str | None = None
    decode: str | None = None
    fork: list[str] | None = None
    join: str | None = None
    next: str | dict[str, Annotated[float, Field(ge=0, le=1)]] | None = None


class ClassModel(_Model):
    """One request class: arrivals and route."""

    arrival: str = "poisson"
    rate: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    start: str
    nodes: dict[str, NodeModel]


class PairModel(_Model):
    """A prefill/decode pair: a visit naming it prefills on ``prefill`` and decodes on ``decode``
    (engines or pools), with a KV ``transfer`` between them."""

    prefill: str
    decode: str
    transfer: str = "fixed_ms=0,per_token_ms=0"


class NetworkModel(_Model):
    """A whole network file."""

    engines: Annotated[dict[str, EngineModel], Field(min_length=1)]
    classes: Annotated[dict[str, ClassModel], Field(min_length=1)]
    disaggregated: dict[str, PairModel] = Field(default_factory=dict)


# -- the validated network ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """An engine of the network."""

    name: str
    budget: int
    k_max: int | None
    batch_time: BatchTime | ShapeTime  # a shape model times each batch from its composition
    policy: str
    priority: tuple[str, ...]
    memory: KVCache | None = None  # the engine's KV cache (None: unlimited, as in the paper)


POOL_SEPARATOR = "/"
"""A pool's members are engines named ``pool/0``, ``pool/1``, ...: engine names may not contain it."""
ROUTER_NAMES = ("jsq", "jsq-tokens", "p2c", "least-kv", "vllm-dp", "round-robin", "random")
"""The built-in routers (``llmqueue.policies.routers``; listed here, below that layer, to validate
files)."""


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """A pool: engines (``members``, names ``pool/i`` of ``Network.engines``) behind a router.

    ``router`` is a built-in router's name; a visit naming the pool is sent to the member the
    router picks when the request arrives there."""

    name: str
    router: str
    members: tuple[str, ...]


TRANSFER_KEYS = ("fixed_ms", "per_token_ms", "link")
LINK_KINDS = ("shared",)


@dataclass(frozen=True, slots=True)
class PairSpec:
    """A prefill/decode (P/D) pair: a visit naming it runs its prompt on ``prefill`` (an engine or a
    pool), then moves the prompt's KV to ``decode`` (an engine or a pool) in ``fixed_ms +
    per_token_ms * prompt tokens``, where it decodes holding that KV. ``shared_link``: one FIFO link
    carries all the pair's transfers (they queue); else each is a pure delay."""

    name: str
    prefill: str
    decode: str
    fixed_ms: float
    per_token_ms: float
    shared_link: bool
    transfer: str  # the spec as given

    def transfer_ms(self, prompt_tokens: int | float) -> float:
        """The time one transfer of ``prompt_tokens`` tokens of KV takes on the link (ms)."""
        return self.fixed_ms + self.per_token_ms * prompt_tokens


@dataclass(frozen=True, slots=True)
class Node:
    """A route node. ``next`` holds (target, probability) pairs (targets are node ids or exit)."""

    id: str
    kind: Literal["visit", "fork", "join"]
    engine: str | None
    prefill: SizeDist | None
    decode: SizeDist | None
    next: tuple[tuple[str, float], ...]
    branches: tuple[str, ...]
    fork: str | None  # for a join: the fork it closes

    @property
    def mean_tokens(self) -> float:
        """Mean prefill + decode tokens of a visit (0 for forks and joins)."""
        if self.prefill is None or self.decode is None:
            return 0.0
        return self.prefill.mean + self.decode.mean


@dataclass(frozen=True, slots=True)
class ClassSpec:
    """A request class: arrival process (rate in requests/s), start node, nodes by id."""

    name: str
    arrival: ArrivalProcess
    rate_per_s: float
    start: str
    nodes: Mapping[str, Node]

    def join_of(self, fork_id: str) -> str:
        """The join node that closes ``fork_id``."""
        return next(n.id for n in self.nodes.values() if n.kind == "join" and n.fork == fork_id)


@dataclass(frozen=True, slots=True)
class Network:
    """A validated network: engines and classes by name."""

    engines: Mapping[str, EngineSpec]
    classes: Mapping[str, ClassSpec]
    pools: Mapping[str, PoolSpec] = field(default_factory=dict)  # by name; members in ``engines``
    pairs: Mapping[str, PairSpec] = field(default_factory=dict)  # prefill/decode pairs by name

    def members_of(self, target: str) -> tuple[str, ...]:
        """The engines a visit naming ``target`` (an engine, a pool or a pair: both sides) can be
        sent to."""
        pair = self.pairs.get(target)
        if pair is not None:
            return (*self.members_of(pair.prefill), *self.members_of(pair.decode))
        pool = self.pools.get(target)
        return pool.members if pool is not None else (target,)

    def parts_of(self, target: str) -> tuple[tuple[str, str], ...]:
        """Where a visit naming ``target`` runs: (engine or pool, part) pairs, part ``whole`` for a
        plain visit, ``prefill`` (prompt only) and ``decode`` (output only, holding the prompt's
        KV as context) for a pair."""
        pair = self.pairs.get(target)
        if pair is None:
            return ((target, "whole"),)
        return ((pair.prefill, "prefill"), (pair.decode, "decode"))

    def pool_of(self, engine: str) -> str | None:
        """The pool ``engine`` belongs to (None: a plain engine)."""
        for pool in self.pools.values():
            if engine in pool.members:
                return pool.name
        return None

    def buffers(self) -> list[str]:
        """Every visit buffer ``class.node``."""
        return [f"{c.name}.{n.id}" for c in self.classes.values() for n in c.nodes.values()
                if n.kind == "visit"]

    def scaled(self, factor: float) -> Network:
        """The same network with every class's arrival rate multiplied by ``factor``."""
        if not (factor > 0 and math.isfinite(factor)):
            raise ConfigError("scale", factor, "must be a positive number")
        classes = {
            name: ClassSpec(c.name, _arrival(c.arrival.spec, c.rate_per_s * factor, name),
                            c.rate_per_s * factor, c.start, c.nodes)
            for name, c in self.classes.items()
        }
        return Network(self.engines, classes, self.pools, self.pairs)


def single_visit(c: ClassSpec) -> tuple[str, str] | None:
    """(node id, target) when the route of ``c`` is one visit then exit (else None): such a class's
    requests get per-request latencies (TTFT, TPOT) of their own."""
    node = c.nodes[c.start]
    if node.kind == "visit" and node.next == ((EXIT, 1.0),):
        return node.id, node.engine or ""
    return None


def _arrival(spec: str, rate: float, cls: str) -> ArrivalProcess:
    try:
        return parse_arrival(spec, rate)
    except ConfigError as err:
        raise ConfigError(f"classes.{cls}.arrival", err.value, err.problem) from None


# -- reading -------------------------------------------------------------------------------------------


def load_network(path: str | Path | Mapping[str, Any]) -> Network:
    """Read and validate a network file (TOML or YAML), or a mapping with its content."""
    if isinstance(path, Mapping):
        return parse_network(dict(path))
    if not isinstance(path, str | Path):
        raise ConfigError("network", type(path).__name__, "must be a network file's path or a mapping")
    return parse_network(read_table(path, "network"))


def as_network(net: object) -> Network:
    """A Network from a Network, a network file's path or a mapping with its content."""
    if isinstance(net, Network):
        return net
    if isinstance(net, str | Path | Mapping):
        return load_network(net)  # type: ignore[arg-type]
    raise ConfigError("network", type(net).__name__, "must be a Network (llmqueue.load_network), a "
                      "network file's path or a mapping")


def parse_network(data: Any) -> Network:
    """Validate a network given as a mapping (the file's content) and build it."""
    if not isinstance(data, dict):
        raise ConfigError("network", type(data).__name__, "must be a table with engines and classes")
    try:
        model = NetworkModel.model_validate(data)
    except ValidationError as err:
        raise first_error(err) from None
    engines: dict[str, EngineSpec] = {}
    pools: dict[str, PoolSpec] = {}
    for name, e in model.engines.items():
        if POOL_SEPARATOR in name:
            raise ConfigError(f"engines.{name}", name, f"engine names must not contain "
                              f"'{POOL_SEPARATOR}' (a pool's members are named pool{POOL_SEPARATOR}0, ...)")
        pool = _pool(name, e)
        if pool is None:
            engines[name] = _engine(name, e)
        else:
            pools[name] = pool[0]
            engines.update(pool[1])
    targets = {*(n for n in engines if POOL_SEPARATOR not in n), *pools}  # what a visit may name
    pairs = {name: _pair(name, p, targets) for name, p in model.disaggregated.items()}
    classes = {name: _class(name, c, targets | set(pairs)) for name, c in model.classes.items()}
    net = Network(engines, classes, pools, pairs)
    for e in engines.values():  # priority entries must name buffers or classes of the network
        known = set(net.buffers()) | set(classes)
        for entry in e.priority:
            if entry not in known:
                raise ConfigError(f"engines.{e.name}.priority", entry,
                                  f"names no class or buffer (class.node); known: {sorted(known)}")
    return net


def _pool(name: str, e: EngineModel) -> tuple[PoolSpec, dict[str, EngineSpec]] | None:
    """A pool and its member engines (None: a plain engine, ``replicas`` 1 without groups)."""
    where = f"engines.{name}"
    router = e.router.strip().lower()
    if router not in ROUTER_NAMES:
        raise ConfigError(f"{where}.router", e.router,
                          f"unknown router; choose from {', '.join(ROUTER_NAMES)}")
    if e.groups is not None and e.replicas is not None:
        raise ConfigError(f"{where}.replicas", e.replicas, "give replicas or groups (each with its "
                          "replicas), not both")
    if e.groups is None and (e.replicas or 1) == 1:
        return None
    groups = e.groups or [GroupModel(replicas=e.replicas or 1)]
    members: dict[str, EngineSpec] = {}
    for g, group in enumerate(groups):
        overrides = {k: v for k, v in group.model_dump(exclude={"replicas"}).items() if v is not None}
        merged = e.model_copy(update=overrides)
        at = f"{where}.groups.{g}" if e.groups is not None else where
        spec = _engine(f"{name}{POOL_SEPARATOR}{len(members)}", merged, at)
        for _ in range(group.replicas):
            member = f"{name}{POOL_SEPARATOR}{len(members)}"
            members[member] = EngineSpec(member, spec.budget, spec.k_max, spec.batch_time, spec.policy,
                                         spec.priority, spec.memory)
    return PoolSpec(name, router, tuple(members)), members


def _pair(name: str, p: PairModel, targets: set[str]) -> PairSpec:
    """A validated prefill/decode pair (its sides name engines or pools, different ones)."""
    where = f"disaggregated.{name}"
    if name in targets:
        raise ConfigError(where, name, "a pair's name must differ from every engine's and pool's")
    if POOL_SEPARATOR in name or "." in name:
        raise ConfigError(where, name, f"pair names must not contain '{POOL_SEPARATOR}' nor '.'")
    for side in ("prefill", "decode"):
        value = getattr(p, side)
        if value == name:
            raise ConfigError(f"{where}.{side}", value, "a pair cannot name itself")
        if value not in targets:
            raise ConfigError(f"{where}.{side}", value, f"unknown engine or pool; known: {sorted(targets)}")
    if p.prefill == p.decode:
        raise ConfigError(f"{where}.decode", p.decode,
                          "prefill and decode must be different engines or pools")
    _, items = split_items(p.transfer, p.transfer, f"{where}.transfer", keys=TRANSFER_KEYS, lower=True)
    times = {}
    for key in ("fixed_ms", "per_token_ms"):
        text = items.get(key, "0")
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{where}.transfer.{key}", text, "must be a number of ms") from None
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{where}.transfer.{key}", text, "must be a finite number >= 0")
        times[key] = value
    link = items.get("link")
    if link is not None and link.strip().lower() not in LINK_KINDS:
        raise ConfigError(f"{where}.transfer.link", link, f"choose from {', '.join(LINK_KINDS)} (or leave "
                          "it out: each transfer is a pure delay)")
    return PairSpec(name, p.prefill, p.decode, times["fixed_ms"], times["per_token_ms"], link is not None,
                    p.transfer)


def _engine(name: str, e: EngineModel, where: str | None = None) -> EngineSpec:
    where = where or f"engines.{name}"
    if e.budget is None:
        raise ConfigError(f"{where}.budget", None, "an engine needs a budget (tokens per batch)")
    try:
        bt = parse_batch_time(e.batch_time)
    except ConfigError as err:
        raise ConfigError(f"{where}.batch_time", e.batch_time, err.problem) from None
    policy = e.policy.strip().lower()
    if policy not in NETWORK_POLICIES:
        raise ConfigError(f"{where}.policy", e.policy, f"choose from {', '.join(NETWORK_POLICIES)}")
    if policy == "priority" and not e.priority:
        raise ConfigError(f"{where}.priority", e.priority, "policy 'priority' needs a priority list")
    if e.priority and policy != "priority":
        raise ConfigError(f"{where}.priority", e.priority, "only policy 'priority' takes a priority")
    memory = None
    if e.memory is not None:
        try:
            memory = parse_memory(e.memory)
        except ConfigError as err:  # memory.tokens -> engines.<name>.memory.tokens
            raise ConfigError(f"{where}.{err.field}", e.memory, err.problem) from None
    return EngineSpec(name, e.budget, e.k_max, bt, policy, tuple(e.priority or ()), memory)


NETWORK_POLICIES = (
    "sarathi", "orca", "vllm", "fastertransformer", "vllm-chunked", "priority", "max-pressure"
)


def _targets(where: str, value: str | dict[str, float] | None) -> tuple[tuple[str, float], ...]:
    if value is None:
        raise ConfigError(f"{where}.next", None, "a visit or join needs next (a node id or exit)")
    if isinstance(value, str):
        return ((value, 1.0),)
    if not value:
        raise ConfigError(f"{where}.next", value, "needs at least one target")
    total = sum(value.values())
    if abs(total - 1.0) > 1e-9:
        raise ConfigError(f"{where}.next", value, f"probabilities must sum to 1 (they sum to {total:g})")
    return tuple((k, float(p)) for k, p in value.items() if p > 0)


def _class(name: str, c: ClassModel, engines: set[str]) -> ClassSpec:
    where = f"classes.{name}"
    if not c.nodes:
        raise ConfigError(f"{where}.nodes", c.nodes, "a class needs at least one node")
    if EXIT in c.nodes or "." in name or any("." in n for n in c.nodes):
        raise ConfigError(where, name, "class and node names must not contain '.' nor be 'exit'")
    nodes: dict[str, Node] = {}
    for nid, n in c.nodes.items():
        at = f"{where}.nodes.{nid}"
        kinds = [k for k, v in (("visit", n.engine), ("fork", n.fork), ("join", n.join)) if v is not None]
        if len(kinds) != 1:
            raise ConfigError(at, nid, "a node has exactly one of engine (visit), fork or join")
        kind = kinds[0]
        if kind == "visit":
            if n.engine not in engines:
                raise ConfigError(f"{at}.engine", n.engine,
                                  f"unknown engine, pool or pair; known: {sorted(engines)}")
            sizes = []
            for field in ("prefill", "decode"):
                spec = getattr(n, field)
                if spec is None:
                    raise ConfigError(f"{at}.{field}", None, "a visit needs prefill and decode sizes")
                try:
                    sizes.append(parse_size(spec, field))
                except ConfigError as err:
                    raise ConfigError(f"{at}.{field}", spec, err.problem) from None
            nodes[nid] = Node(nid, "visit", n.engine, sizes[0], sizes[1], _targets(at, n.next), (), None)
        elif kind == "fork":
            if n.next is not None or n.prefill or n.decode:
                raise ConfigError(at, nid, "a fork takes only its branches (its join says what follows)")
            if len(n.fork or []) < 2:
                raise ConfigError(f"{at}.fork", n.fork, "a fork needs at least 2 branches")
            nodes[nid] = Node(nid, "fork", None, None, None, (), tuple(n.fork or ()), None)
        else:
            if n.prefill or n.decode:
                raise ConfigError(at, nid, "a join has no sizes")
            nodes[nid] = Node(nid, "join", None, None, None, _targets(at, n.next), (), n.join)
    for node in nodes.values():
        for target, _ in node.next:
            if target != EXIT and target not in nodes:
                raise ConfigError(f"{where}.nodes.{node.id}.next", target, "unknown node")
        for branch in node.branches:
            if branch not in nodes:
                raise ConfigError(f"{where}.nodes.{node.id}.fork", branch, "unknown node")
    if c.start not in nodes:
        raise ConfigError(f"{where}.start", c.start, "unknown node")
    spec = ClassSpec(name, _arrival(c.arrival, c.rate, name), c.rate, c.start, nodes)
    _check_forks(spec)
    _check_reachable(spec)
    _check_ends(spec)
    return spec


def _check_forks(c: ClassSpec) -> None:
    """Every join names a fork; every fork has exactly one join; branches reach only their join."""
    where = f"classes.{c.name}.nodes"
    joins: dict[str, list[str]] = {}
    for n in c.nodes.values():
        if n.kind == "join":
            if n.fork not in c.nodes or c.nodes[n.fork].kind != "fork":
                raise ConfigError(f"{where}.{n.id}.join", n.fork, "a join must name its fork node")
            joins.setdefault(n.fork, []).append(n.id)
    for n in c.nodes.values():
        if n.kind != "fork":
            continue
        found = joins.get(n.id, [])
        if len(found) != 1:
            raise ConfigError(f"{where}.{n.id}", n.id, f"a fork needs exactly one join naming it "
                              f"(found {len(found)})")
        join = found[0]
        for branch in n.branches:  # the branch's nodes, up to the join
            reached = list(_reach(c, [branch], stop=join, branches=False))
            if n.id in reached:
                raise ConfigError(f"{where}.{n.id}.fork", branch, "branch leads back to its fork")
            if any(EXIT in _successors(c, node) for node in reached):
                raise ConfigError(f"{where}.{n.id}.fork", branch,
                                  f"branch can leave the network before its join '{join}'")


def _successors(c: ClassSpec, node_id: str) -> list[str]:
    """Where a request goes after ``node_id`` (a fork continues at its join, not its branches)."""
    node = c.nodes[node_id]
    if node.kind == "fork":
        return [c.join_of(node.id)]
    return [t for t, _ in node.next]


def _reach(c: ClassSpec, starts: list[str], *, stop: str | None = None,
           branches: bool = True) -> Iterator[str]:
    """The nodes reachable from ``starts`` (each once, depth first), not going past exit nor
    ``stop``; ``branches``: also into forks' branches (else a fork leads to its join only)."""
    seen: set[str] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node in (EXIT, stop) or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(_successors(c, node))
        if branches:
            stack.extend(c.nodes[node].branches)


def _check_reachable(c: ClassSpec) -> None:
    unreachable = sorted(set(c.nodes) - set(_reach(c, [c.start])))
    if unreachable:
        raise ConfigError(f"classes.{c.name}.nodes", unreachable[0], "unreachable from start")


def _transition(c: ClassSpec) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Node ids, the sub-stochastic matrix between them (a fork moves to its join), exit column."""
    ids = list(c.nodes)
    index = {nid: i for i, nid in enumerate(ids)}
    p = np.zeros((len(ids), len(ids)))
    out = np.zeros(len(ids))
    for nid in ids:
        node = c.nodes[nid]
        if node.kind == "fork":
            p[index[nid], index[c.join_of(nid)]] = 1.0
            continue
        for target, prob in node.next:
            if target == EXIT:
                out[index[nid]] += prob
            else:
                p[index[nid], index[target]] += prob
    return ids, p, out


def _check_ends(c: ClassSpec) -> None:
    """The route ends (reaches exit, and every branch its join) with probability 1."""
    ids, p, out = _transition(c)
    n = len(ids)
    # probability of ever exiting from each node: (I - P) x = out (least squares: I - P is
    # singular when a cycle has no way out, which _closed_loop names)
    absorb = np.linalg.lstsq(np.eye(n) - p, out, rcond=None)[0]
    reach = absorb[ids.index(c.start)]
    closed = _closed_loop(c)
    if closed is not None or not reach > 1 - ABSORB_TOLERANCE:
        node = closed or c.start
        raise ConfigError(f"classes.{c.name}", node,
                          "route can loop forever with probability 1 (a cycle with no way out)")


def _closed_loop(c: ClassSpec) -> str | None:
    """A reachable node from which exit cannot be reached at all (None if there is none)."""
    can_exit: set[str] = set()
    changed = True
    while changed:
        changed = False
        for nid in c.nodes:
            if nid in can_exit:
                continue
            if any(t == EXIT or t in can_exit for t in _successors(c, nid)):
                can_exit.add(nid)
                changed = True
    for nid in c.nodes:
        if nid not in can_exit:
            return nid
    return None


# -- analysis without simulation -----------------------------------------------------------------------


def visit_counts(c: ClassSpec) -> dict[str, float]:
    """Expected visits of each node per request of class ``c`` (the traffic equations).

    ``v = e_start + v P``, where P follows ``next`` probabilities, a fork sends a copy to each
    branch head and continues at its join once (the branch tails' edges into the join carry no
    extra visit).
    """
    ids = list(c.nodes)
    index = {nid: i for i, nid in enumerate(ids)}
    n = len(ids)
    a = np.zeros((n, n))  # a[i, j]: visits of j caused by one visit of i
    closing = {node.fork: node.id for node in c.nodes.values() if node.kind == "join"}
    for nid in ids:
        node = c.nodes[nid]
        if node.kind == "fork":
            for branch in node.branches:
                a[index[nid], index[branch]] += 1.0
            a[index[nid], index[closing[nid]]] += 1.0
            continue
        for target, prob in node.next:
            if target == EXIT:
                continue
            if c.nodes[target].kind == "join" and _inside_fork(c, nid, c.nodes[target].fork):
                continue  # a branch tail reaching its join: the fork already counted the join
            a[index[nid], index[target]] += prob
    e = np.zeros(n)
    e[index[c.start]] = 1.0
    v = np.linalg.solve(np.eye(n) - a.T, e)
    return {nid: float(v[index[nid]]) for nid in ids}


def _inside_fork(c: ClassSpec, node_id: str, fork_id: str | None) -> bool:
    """Whether ``node_id`` lies on a branch of ``fork_id`` (reachable from a branch head)."""
    if fork_id is None:
        return False
    return node_id in _reach(c, list(c.nodes[fork_id].branches), stop=c.join_of(fork_id))
