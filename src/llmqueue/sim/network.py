"""Simulation of a network of engines on one clock: routing, fork-join, per-engine and per-class
metrics, stability verdicts per engine and for the network.

The loop takes the earliest event: an external arrival (a new request of some class enters at
its start node) or a batch end at one or more engines. At a batch end, it first ends the batch of
every engine due at that instant and routes their finished requests (to their next node, a fork's
branches, a join, or out of the network). Only then does it start those engines' next batches.
So, as for a single engine, a request that reaches an engine exactly at a batch boundary joins
the batch that starts there. Every engine keeps its own ``Recorder``, hence the single-engine
metric set per engine. A visit to a pool goes to the member its router picks from a ``PoolView``
(what a load balancer observes: visits routed and finished per member), with two draws of the
pool's own random stream; results add one ``PoolResult`` per pool.

When every engine runs in the compiled loop (the shipped K-FCFS, current-vLLM, class-priority and
max-pressure policies, numba installed), the whole loop, routing and the KV transfers of
prefill/decode pairs included, runs compiled (``compiled.NetworkLoop``): the same steps, draws and
float operations in the same order, so the same run (docs/networks.md, Speed); the pairs' counters,
latencies and transfers in flight are handed back here (``_loop_compiled``).
An engine with a KV cache (``memory``) or a composition-aware batch time (each batch timed from its
shape) runs on the fast or reference engine (``engine_kind`` decides every engine's kind); a request
its cache can never hold is refused and leaves the network unfinished. The network's observed verdict
weighs several kinds of evidence (``stability.network_evidence``; docs/stability.md).
"""

from __future__ import annotations

import dataclasses
import math
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from heapq import heappop, heappush
from typing import Literal

import numpy as np

from llmqueue.engines.compiled import DRAW_CHUNK, KernelEngine, NetworkLoop, PolicyEngine, route_tables
from llmqueue.engines.contract import EngineContract, EngineKind, choose_engine
from llmqueue.engines.fast import FastEngine
from llmqueue.engines.metrics import (
    Recorder,
    RequestRecord,
    RunMetrics,
    TimeBins,
    downsample,
    merged_latency,
    summary,
)
from llmqueue.engines.reference import Engine, PolicyFn
from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import is_shape_model
from llmqueue.model.network import (
    EXIT,
    ClassSpec,
    EngineSpec,
    Network,
    Node,
    PairSpec,
    PoolSpec,
    as_network,
    single_visit,
)
from llmqueue.model.workload import CHUNK_SIZE, Request
from llmqueue.policies.fcfs import KFCFS, VLLMChunked, make_policy
from llmqueue.policies.network import ClassPriority, MaxPressure
from llmqueue.policies.routers import ROUTERS, MemberView, PoolView, Router, make_router, router_name
from llmqueue.policies.view import EngineView, policy_name
from llmqueue.sim.run import WARMUP_FRACTION, horizon_ms
from llmqueue.theory.network import Analysis, analyze
from llmqueue.theory.stability import (
    CRITICAL_TOLERANCE,
    NetworkEvidence,
    Observation,
    Prediction,
    network_evidence,
    observe,
)

NodeKind = Literal["compiled", "fast", "reference", "pressure"]
"""The engine that runs one engine of a network (``pressure``: a max-pressure reference engine)."""
K_FCFS_WORK_CONSERVING = ("sarathi", "orca", "vllm-chunked")


class _BufferedEngine(Engine):
    """A reference engine whose policy view carries the network's buffer counts (max-pressure)."""

    def __init__(self, *args: object, buffers: Mapping[str, int], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.buffers = buffers

    def view(self) -> EngineView:
        base = super().view()
        return EngineView(base.now_ms, base.budget, base.k_max, base.prefilling, base.decoding,
                          self.buffers)


class _Draws:
    """Values of a sampler drawn in chunks (one RNG stream per node: reproducible per seed)."""

    __slots__ = ("_i", "_rng", "_sample", "_values")

    def __init__(self, sample: object, rng: np.random.Generator) -> None:
        self._sample = sample
        self._rng = rng
        self._values: list[float] = []
        self._i = 0

    def chunk(self) -> np.ndarray:
        """The stream's next ``DRAW_CHUNK`` values (``next`` hands them out one by one; the
        compiled routing takes whole chunks)."""
        return self._sample(self._rng, DRAW_CHUNK)  # type: ignore[operator]

    def next(self) -> float:
        if self._i == len(self._values):
            self._values = self.chunk().tolist()
            self._i = 0
        value = self._values[self._i]
        self._i += 1
        return value


class _Frame:
    """A fork in progress: the request that forked, how many branches are still running, and
    whether a branch was refused (then the request is lost and its branches end at the join)."""

    __slots__ = ("failed", "join", "parent", "remaining")

    def __init__(self, parent: _Token, remaining: int, join: str) -> None:
        self.parent = parent
        self.remaining = remaining
        self.join = join
        self.failed = False


class _Pool:
    """A pool during a run: its router, random stream, routing count and members' static figures
    (name, nominal capacity tokens/s, budget, KV cache tokens)."""

    __slots__ = ("draws", "routed", "router", "spec", "static")

    def __init__(self, spec: PoolSpec, router: Router, draws: _Draws,
                 static: tuple[tuple[str, float, int, int | None], ...]) -> None:
        self.spec = spec
        self.router = router
        self.draws = draws
        self.routed = 0
        self.static = static


class _PairRun:
    """A prefill/decode pair during a run: its counts, its link and its requests' latencies."""

    __slots__ = ("arrivals", "busy_ms", "completed", "in_decode", "in_prefill", "in_transfer",
                 "link_free_ms", "recorder", "rejected", "spec", "transfers_finished",
                 "transfers_started", "wait_ms")

    def __init__(self, spec: PairSpec) -> None:
        self.spec = spec
        self.recorder = Recorder(keep_requests=False)  # the pair's TTFT, TPOT, E2EL (bounded memory)
        self.arrivals = self.completed = self.rejected = 0
        self.in_prefill = self.in_transfer = self.in_decode = 0
        self.transfers_started = self.transfers_finished = 0
        self.link_free_ms = 0.0  # the shared link is busy until then
        self.wait_ms = 0.0  # transfers' summed wait for the shared link
        self.busy_ms = 0.0  # transfers' summed time on the link


class _PairVisit:
    """A visit to a pair in progress: its request, sizes, arrival, first token and phase."""

    __slots__ = ("arrival_ms", "buffer", "decode", "first_ms", "node_id", "pair", "phase", "prefill",
                 "token")

    def __init__(self, token: _Token, node_id: str, buffer: str, pair: _PairRun, arrival_ms: float,
                 prefill: int, decode: int) -> None:
        self.token = token
        self.node_id = node_id
        self.buffer = buffer
        self.pair = pair
        self.arrival_ms = arrival_ms
        self.prefill = prefill
        self.decode = decode
        self.first_ms = math.nan
        self.phase = "prefill"


class _Token:
    """A request (or a fork's sub-request) travelling through the network."""

    __slots__ = ("arrival_ms", "cls", "frame")

    def __init__(self, cls: str, arrival_ms: float, frame: _Frame | None) -> None:
        self.cls = cls
        self.arrival_ms = arrival_ms
        self.frame = frame


@dataclass(frozen=True, slots=True)
class EngineResult:
    """One engine's metrics (the single-engine set) and stability verdict."""

    name: str
    policy: str
    metrics: RunMetrics
    observed: Observation
    rho: float
    memory: str | None = None  # the KV cache's canonical spec (None: unlimited)


@dataclass(frozen=True, slots=True)
class PoolResult:
    """One pool's figures: its members' visits and throughput summed, its load, and its verdicts
    (observed on the members' summed backlog)."""

    name: str
    router: str
    members: tuple[str, ...]
    visits: tuple[int, ...]  # visits routed to each member
    completed: int
    token_throughput: float  # tokens/s served by all members
    rho: float  # offered tokens over the members' summed capacity
    predicted: Prediction
    observed: Observation

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready summary."""
        return {"router": self.router, "members": list(self.members), "visits": list(self.visits),
                "completed": self.completed, "total_token_throughput": self.token_throughput,
                "rho": self.rho, "stable_predicted": self.predicted.verdict,
                "stable_predicted_reason": self.predicted.reason,
                "stable_observed": self.observed.verdict,
                "backlog_slope_tokens_per_s": self.observed.slope_tokens_per_s}


@dataclass(frozen=True, slots=True)
class PairResult:
    """One prefill/decode pair's figures: where its requests are, its KV transfers and link, and
    the requests' TTFT (first token - arrival at the pair), TPOT ((decode finish - first token) / d,
    transfer included, as vLLM's bench measures it) and E2EL under vLLM names."""

    name: str
    prefill: str
    decode: str
    arrivals: int
    completed: int
    in_prefill: int
    in_transfer: int
    in_decode: int
    rejected: int
    transfers_started: int
    transfers_finished: int
    shared_link: bool
    mean_transfer_wait_ms: float  # on the shared link (0 for pure delays)
    link_utilisation: float  # the shared link's busy fraction (NaN for pure delays)
    latency: dict[str, float]
    rho: float  # the pair's load: the largest of its prefill side, decode side and link

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready summary."""
        return {"prefill": self.prefill, "decode": self.decode, "arrivals": self.arrivals,
                "completed": self.completed, "in_prefill": self.in_prefill,
                "in_transfer": self.in_transfer, "in_decode": self.in_decode, "rejected": self.rejected,
                "transfers_started": self.transfers_started,
                "transfers_finished": self.transfers_finished, "shared_link": self.shared_link,
                "mean_transfer_wait_ms": self.mean_transfer_wait_ms,
                "link_utilisation": self.link_utilisation, "rho": self.rho, **self.latency}


@dataclass(frozen=True, slots=True)
class ClassResult:
    """One class's end-to-end figures: arrivals, completions, latency and requests in network."""

    name: str
    arrivals: int
    completed: int
    request_throughput: float
    latency: dict[str, float]
    mean_requests_in_network: float
    series: tuple[tuple[float, float], ...]
    rejected: int = 0  # requests lost because a visit needed more KV cache than its engine holds
    request_latency: dict[str, float] = dataclasses.field(default_factory=dict)
    """TTFT, TPOT, E2EL (vLLM names) of a class whose route is a single visit to a pair, or to an
    engine or pool that serves this class alone; empty otherwise."""

    @property
    def in_network(self) -> int:
        """Requests of this class still in the network at the end of the run."""
        return self.arrivals - self.completed - self.rejected


@dataclass(frozen=True, slots=True)
class NetworkResult:
    """A network run: analysis, per-engine and per-class results, network verdicts, notes."""

    analysis: Analysis
    engines: Mapping[str, EngineResult]
    classes: Mapping[str, ClassResult]
    duration_s: float
    predicted: Prediction
    observed: Observation  # the network's verdict (``evidence``), with the token backlog's trend
    evidence: NetworkEvidence
    backlog_series: tuple[tuple[float, float], ...]
    visits: int
    notes: tuple[str, ...]
    pools: Mapping[str, PoolResult] = dataclasses.field(default_factory=dict)
    pairs: Mapping[str, PairResult] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready summary (per-engine metrics under vLLM names)."""
        return {
            "duration_s": self.duration_s,
            "visits": self.visits,
            "stable_predicted": self.predicted.verdict,
            "stable_predicted_reason": self.predicted.reason,
            "stable_observed": self.observed.verdict,
            "stable_observed_reason": self.evidence.reason,
            "backlog_slope_tokens_per_s": self.observed.slope_tokens_per_s,
            "observed_evidence": self.evidence.to_dict(),
            "bottleneck": self.analysis.bottleneck,
            "critical_scale": self.analysis.critical_scale,
            "cyclic": self.analysis.cyclic,
            "warnings": list(self.analysis.warnings),
            "engines": {
                name: {"policy": e.policy, "rho": e.rho, "stable_observed": e.observed.verdict,
                       "memory": e.memory,
                       "backlog_slope_tokens_per_s": e.observed.slope_tokens_per_s,
                       **{k: v for k, v in e.metrics.as_dict().items() if k != "backlog_series"}}
                for name, e in self.engines.items()
            },
            "classes": {
                name: {"arrivals": c.arrivals, "completed": c.completed, "in_network": c.in_network,
                       "rejected": c.rejected,
                       "request_throughput": c.request_throughput,
                       "mean_requests_in_network": c.mean_requests_in_network, **c.latency,
                       **{k: v for k, v in c.request_latency.items() if "_e2el_" not in k}}
                for name, c in self.classes.items()
            },
            "notes": list(self.notes),
            **({"pools": {name: p.to_dict() for name, p in self.pools.items()}} if self.pools else {}),
            **({"pairs": {name: p.to_dict() for name, p in self.pairs.items()}} if self.pairs else {}),
        }


def network_policy(net: Network, engine: str) -> PolicyFn:
    """The policy object of one engine of ``net`` (priority and max-pressure need the network)."""
    spec = net.engines[engine]
    if spec.policy == "priority":
        return ClassPriority(order=spec.priority)
    if spec.policy == "max-pressure":
        routes, sizes = pressure_routes(net)
        return MaxPressure(routes=routes, sizes=sizes)
    return make_policy(spec.policy)


def engine_kind(policy: PolicyFn, spec: EngineSpec, engine: EngineKind = "auto") -> NodeKind:
    """Which engine runs one engine of a network, for the caller's ``engine`` choice
    (``llmqueue.engines.contract.choose_engine`` decides; ConfigError when the choice cannot run
    it). An engine with a KV cache or a composition-aware (shape) batch time runs on a Python
    engine: the compiled network loop models neither (it times batches by token count). Class
    priority and max-pressure run compiled too (``compiled.PolicyEngine``); off the compiled loop,
    a max-pressure engine is a reference engine whose view carries the network's buffers."""
    kind = choose_engine(engine, policy, spec.batch_time, spec.budget, memory=spec.memory,
                         network_engine=spec.name)
    return "pressure" if isinstance(policy, MaxPressure) and kind != "compiled" else kind


def pressure_routes(net: Network) -> tuple[dict[str, tuple[tuple[str, float], ...]], dict[str, float]]:
    """For max-pressure: where each buffer's requests go next (expected requests entering each
    next buffer per request leaving; a fork's branches each get a copy) and tokens per request."""
    routes: dict[str, tuple[tuple[str, float], ...]] = {}
    sizes: dict[str, float] = {}
    for c in net.classes.values():
        for nid, node in c.nodes.items():
            if node.kind != "visit":
                continue
            sizes[f"{c.name}.{nid}"] = max(node.mean_tokens, 1e-9)
            flows: dict[str, float] = {}
            for target, prob in node.next:
                _flow(c, target, prob, flows, set())
            routes[f"{c.name}.{nid}"] = tuple(sorted(flows.items()))
    return routes, sizes


def _flow(c: ClassSpec, node_id: str, weight: float, flows: dict[str, float], seen: set[str]) -> None:
    if node_id == EXIT or weight == 0 or node_id in seen:
        return
    node = c.nodes[node_id]
    if node.kind == "visit":
        key = f"{c.name}.{node_id}"
        flows[key] = flows.get(key, 0.0) + weight
        return
    seen = seen | {node_id}
    if node.kind == "fork":
        for branch in node.branches:
            _flow(c, branch, weight, flows, seen)
        return
    for target, prob in node.next:  # a join: the request continues
        _flow(c, target, weight * prob, flows, seen)


def simulate_network(
    net: Network,
    *,
    seed: int = 0,
    max_requests: int | None = None,
    duration_s: float | None = None,
    drain_s: float | None = None,
    policies: Mapping[str, PolicyFn] | None = None,
    engine: EngineKind = "auto",
    routers: Mapping[str, Router | str] | None = None,
) -> NetworkResult:
    """Run the network: external arrivals of every class in time order until ``max_requests``
    (over all classes) or ``duration_s``; then drain for at most ``drain_s`` (default: as long as
    the arrival window, at least 60 s). ``policies`` overrides engines' policies by name.
    ``engine``: ``auto`` runs each engine in the compiled loop when its policy allows it (numba
    installed), else in the Python fast engine, else in the reference engine; ``fast`` and
    ``reference`` force those. All give the same results. An engine with a KV cache runs on
    the fast engine under ``auto`` (``engine_kind``; ``compiled`` is refused for it).
    ``policies`` may name a pool (every member takes the policy). ``routers`` overrides pools'
    routers by pool name: a built-in router's name, or any callable of a ``PoolView`` returning a
    member index (a user router runs the routing in Python)."""
    net = as_network(net)
    if engine not in ("auto", "compiled", "fast", "reference"):
        raise ConfigError("engine", engine, "must be 'auto', 'compiled', 'fast' or 'reference'")
    if max_requests is not None and (not isinstance(max_requests, int) or max_requests < 1):
        raise ConfigError("requests", max_requests, "must be an integer >= 1")
    if duration_s is not None and not (duration_s > 0 and math.isfinite(duration_s)):
        raise ConfigError("duration_s", duration_s, "must be a positive number of seconds")
    if max_requests is None and duration_s is None:
        raise ConfigError("requests", None, "give a number of requests or a duration")
    if drain_s is not None and not (drain_s >= 0 and math.isfinite(drain_s)):
        raise ConfigError("drain_s", drain_s, "must be >= 0 seconds")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError("seed", seed, "must be a non-negative integer")
    for name in policies or {}:
        if name not in net.engines and name not in net.pools:
            raise ConfigError("policies", name,
                              f"unknown engine or pool; known: {sorted({*net.engines, *net.pools})}")
    overrides = {m: p for name, p in (policies or {}).items() for m in net.members_of(name)}
    chosen = _routers(net, routers or {})
    analysis = analyze(net, {name: policy_name(p) for name, p in overrides.items()},
                       {name: p.order for name, p in overrides.items() if isinstance(p, ClassPriority)},
                       {name: router_name(r) for name, r in chosen.items()})
    duration_ms = None if duration_s is None else duration_s * 1000.0
    return _Run(net, analysis, seed, max_requests, duration_ms, drain_s, overrides,
                engine, routers=chosen).result()


def _routers(net: Network, routers: Mapping[str, Router | str]) -> dict[str, Router]:
    """Every pool's router: the file's, or the caller's (a name or a callable) by pool name."""
    for name, router in routers.items():
        if name not in net.pools:
            raise ConfigError("routers", name, f"unknown pool; known: {sorted(net.pools)}")
        if not isinstance(router, str) and not callable(router):
            raise ConfigError(f"routers.{name}", type(router).__name__,
                              "must be a router's name or a callable of a PoolView")
    out = {}
    for name, pool in net.pools.items():
        given = routers.get(name, pool.router)
        out[name] = make_router(given, f"routers.{name}") if isinstance(given, str) else given
    return out


class _Run:
    """The state of one network run (not reused)."""

    def __init__(self, net: Network, analysis: Analysis, seed: int, max_requests: int | None,
                 duration_ms: float | None, drain_s: float | None,
                 policies: Mapping[str, PolicyFn], engine: EngineKind = "auto",
                 compiled_routing: bool = True, routers: Mapping[str, Router] | None = None) -> None:
        """``compiled_routing``: when every engine is compiled, run the routing compiled too
        (``compiled.NetworkLoop``); False keeps it in Python (the same run; for tests).
        ``routers``: each pool's router (default: the file's)."""
        self.net = net
        self.compiled_routing = compiled_routing
        self.analysis = analysis
        self.max_requests = max_requests
        self.duration_ms = duration_ms
        self.drain_s = drain_s
        self.counts: dict[str, int] = dict.fromkeys(net.buffers(), 0)
        names = sorted(net.engines)
        self.engine_names = names
        self.recorders = {n: Recorder(keep_requests=False) for n in names}
        self.engines: dict[str, EngineContract] = {}
        self.policy_names: dict[str, str] = {}
        self.notes: list[str] = []
        for n in names:
            spec = net.engines[n]
            policy = policies.get(n) or network_policy(net, n)
            self.policy_names[n] = policy_name(policy)
            args = (policy, spec.batch_time, spec.budget, spec.k_max)
            kind = engine_kind(policy, spec, engine)
            if kind == "compiled" and isinstance(policy, ClassPriority | MaxPressure):
                self.engines[n] = PolicyEngine(policy, spec.batch_time, spec.budget, spec.k_max,
                                               self.recorders[n], net, self.counts)
                continue
            if kind == "compiled":
                assert isinstance(policy, KFCFS | VLLMChunked)
                self.engines[n] = KernelEngine(policy, spec.batch_time, spec.budget, spec.k_max,
                                               self.recorders[n])
                continue
            engine_class = {"pressure": _BufferedEngine, "reference": Engine, "fast": FastEngine}[kind]
            extra = {"buffers": self.counts} if kind == "pressure" else {}
            self.engines[n] = engine_class(*args, recorder=self.recorders[n], memory=spec.memory,
                                           **extra)  # type: ignore[arg-type]
        cached = [n for n in names if net.engines[n].memory is not None]
        if cached and engine == "auto":
            self.notes.append(f"engine(s) {', '.join(cached)} have a KV cache: they ran on the "
                              "fast engine, and the routing in Python (the compiled loop does not "
                              "model memory)")
        shaped = [n for n in names if is_shape_model(net.engines[n].batch_time)]
        if shaped:
            self.notes.append(
                f"engine(s) {', '.join(shaped)} have a composition-aware batch time: every batch is "
                "timed from its shape (Python engines, routing in Python); the loads see it through "
                "each engine's offered mix (mean prompt and output tokens per visit)")
        self.class_rejected = dict.fromkeys(net.classes, 0)
        self.engine_list: list[EngineContract] = [self.engines[n] for n in names]
        self.pressure_engines = [e for e in self.engine_list if isinstance(e, _BufferedEngine)
                                 or (isinstance(e, PolicyEngine) and e.pressure)]
        self.kernels = [e for e in self.engine_list if isinstance(e, KernelEngine)]
        # one RNG stream per purpose, in a fixed order (same seed, same run)
        streams = iter(np.random.SeedSequence(seed).spawn(
            len(net.classes) + 3 * sum(len(c.nodes) for c in net.classes.values()) + len(net.pools)
        ))
        self.arrival_streams: dict[str, Iterator[np.ndarray]] = {}
        self.sizes: dict[tuple[str, str], tuple[_Draws, _Draws]] = {}
        self.choices: dict[tuple[str, str], _Draws] = {}
        for cname in sorted(net.classes):
            c = net.classes[cname]
            rng = np.random.Generator(np.random.PCG64(next(streams)))
            self.arrival_streams[cname] = c.arrival.chunks_ms(rng, CHUNK_SIZE)
            for nid in sorted(c.nodes):
                node = c.nodes[nid]
                gens = [np.random.Generator(np.random.PCG64(next(streams))) for _ in range(3)]
                if node.kind == "visit":
                    assert node.prefill is not None and node.decode is not None
                    self.sizes[(cname, nid)] = (_Draws(node.prefill.sample, gens[0]),
                                                _Draws(node.decode.sample, gens[1]))
                self.choices[(cname, nid)] = _Draws(lambda r, n: r.random(n), gens[2])
        # pools: one stream each, after the others (a network without pools draws as before)
        routers = routers or {}
        self.pools: dict[str, _Pool] = {}
        for pname in sorted(net.pools):
            rng = np.random.Generator(np.random.PCG64(next(streams)))
            router = routers.get(pname) or make_router(net.pools[pname].router)
            static = tuple(
                (m, analysis.engines[m].capacity_tokens_per_s, net.engines[m].budget,
                 None if net.engines[m].memory is None else net.engines[m].memory.capacity_tokens)
                for m in net.pools[pname].members
            )
            self.pools[pname] = _Pool(net.pools[pname], router, _Draws(lambda r, n: r.random(n), rng),
                                      static)
        self.builtin_routers = all(p.router in ROUTERS.values() for p in self.pools.values())
        # prefill/decode pairs: visits in progress by the engine visit id of their phase, and the
        # KV transfers in flight, (end ms, sequence, decode visit id, start ms), earliest first
        self.pairs = {name: _PairRun(net.pairs[name]) for name in sorted(net.pairs)}
        self.pair_visits: dict[int, _PairVisit] = {}
        self.transfers: list[tuple[float, int, int, float]] = []
        self.transfer_seq = 0
        self.in_transfer: dict[int, tuple[_PairVisit, str]] = {}  # decode visit id -> (visit, engine)
        self.class_recorders = {cname: Recorder(keep_requests=False) for cname, c in net.classes.items()
                                if (single_visit(c) or ("", ""))[1] in net.pairs}
        self.transfer_pairs: dict[int, _PairRun] = {}  # decode visit id -> pair (from the compiled loop)
        # what a load balancer observes of every engine (the pools' routers read their members')
        self.in_system = dict.fromkeys(names, 0)
        self.waiting = dict.fromkeys(names, 0)
        self.outstanding = dict.fromkeys(names, 0)
        self.visits: dict[int, tuple[_Token, str, str, str, int]] = {}  # token, node, buffer, engine, tokens
        self.next_visit = 0
        self.visit_total = 0
        self.class_arrivals = dict.fromkeys(net.classes, 0)
        self.class_done = dict.fromkeys(net.classes, 0)
        self.class_latency = {c: array("d") for c in net.classes}
        self.class_present = dict.fromkeys(net.classes, 0)
        self.class_bins = {c: TimeBins() for c in net.classes}
        self.class_area = dict.fromkeys(net.classes, 0.0)
        self.class_last = dict.fromkeys(net.classes, 0.0)
        self.last_arrival_ms = 0.0

    # -- routing ----------------------------------------------------------------------------
    def _present(self, cname: str, t_ms: float, delta: int) -> None:
        """Requests of a class in the network (time-integrated for the per-class series)."""
        last = self.class_last[cname]
        if t_ms > last:
            n = self.class_present[cname]
            self.class_area[cname] += n * (t_ms - last)
            self.class_bins[cname].add(last, t_ms, float(n))
            self.class_last[cname] = t_ms
        self.class_present[cname] += delta

    def _choose(self, cname: str, node: Node) -> str:
        if len(node.next) == 1:
            return node.next[0][0]
        u = self.choices[(cname, node.id)].next()
        acc = 0.0
        for target, prob in node.next:
            acc += prob
            if u < acc:
                return target
        return node.next[-1][0]

    def _advance(self, token: _Token, node_id: str, t_ms: float) -> None:
        """Move ``token`` to ``node_id`` at ``t_ms`` and on, until it waits at an engine or a join."""
        c = self.net.classes[token.cls]
        while True:
            if node_id == EXIT:
                if token.frame is not None:  # validated impossible: a branch always meets its join
                    raise AssertionError("a branch left the network before its join")
                self.class_done[token.cls] += 1
                self.class_latency[token.cls].append(t_ms - token.arrival_ms)
                self._present(token.cls, t_ms, -1)
                return
            node = c.nodes[node_id]
            if node.kind == "visit":
                prefill_draw, decode_draw = self.sizes[(token.cls, node_id)]
                prefill, decode = int(prefill_draw.next()), int(decode_draw.next())
                if prefill + decode == 0:  # nothing to do at this visit
                    node_id = self._choose(token.cls, node)
                    continue
                buffer = f"{token.cls}.{node_id}"
                target = node.engine or ""
                pair = self.pairs.get(target)
                if pair is not None:
                    self._enter_pair(_PairVisit(token, node_id, buffer, pair, t_ms, prefill, decode), t_ms)
                    return
                engine = self._target(target, t_ms, prefill, decode)
                self.counts[buffer] += 1
                vid = self.next_visit
                self.next_visit += 1
                if not self._submit(vid, token, node_id, buffer, engine, prefill, decode, 0, t_ms):
                    self.counts[buffer] -= 1
                    self._refuse(token, t_ms)
                return
            if node.kind == "fork":
                frame = _Frame(token, len(node.branches), c.join_of(node_id))
                for branch in node.branches:
                    self._advance(_Token(token.cls, token.arrival_ms, frame), branch, t_ms)
                return
            # a join: a branch arrives; the last one lets the forking request go on
            frame = token.frame
            assert frame is not None and frame.join == node_id
            frame.remaining -= 1
            if frame.remaining or frame.failed:  # a refused branch lost the forking request
                return
            token = frame.parent
            node_id = self._choose(token.cls, node)

    def _target(self, target: str, t_ms: float, prefill: int, decode: int) -> str:
        """The engine a visit to ``target`` (an engine or a pool) goes to."""
        pool = self.pools.get(target)
        return target if pool is None else self._pick(pool, t_ms, prefill, decode)

    def _submit(self, vid: int, token: _Token, node_id: str, buffer: str, engine: str, prefill: int,
                decode: int, context: int, t_ms: float, *, routed: bool = False) -> bool:
        """Hand visit ``vid`` to ``engine``, counting it in the routers' view (``routed``: already
        counted, a transfer to it in flight); False, undone, when the engine's KV cache can never
        hold it."""
        self.visit_total += 1
        self.visits[vid] = (token, node_id, buffer, engine, prefill + decode)
        if not routed:
            self._seen(engine, prefill + decode, +1)
        recorder = self.recorders[engine]
        refused = recorder.totals.rejected_requests
        self.engines[engine].submit(Request(vid, t_ms, prefill, decode, buffer, context))
        if recorder.totals.rejected_requests > refused:  # its KV cache can never hold this visit
            del self.visits[vid]
            self.visit_total -= 1
            self._seen(engine, prefill + decode, -1)
            return False
        return True

    def _seen(self, engine: str, tokens: int, sign: int) -> None:
        """Count a visit of ``tokens`` tokens routed to ``engine`` (``sign`` -1: take it back) in what
        the routers see."""
        self.in_system[engine] += sign
        self.waiting[engine] += sign
        self.outstanding[engine] += sign * tokens

    # -- prefill/decode pairs ---------------------------------------------------------------------
    def _enter_pair(self, pv: _PairVisit, t_ms: float) -> None:
        """A request reaches a pair: its prompt goes to the prefill side (a prompt of 0 tokens has
        nothing to prefill nor move: it decodes at once, its first token now)."""
        pair = pv.pair
        pair.arrivals += 1
        self.counts[pv.buffer] += 1
        if pv.prefill == 0:
            pv.first_ms = t_ms
            engine = self._target(pair.spec.decode, t_ms, 0, pv.decode)
            self._start_decode(pv, engine, t_ms, routed=False)
            return
        engine = self._target(pair.spec.prefill, t_ms, pv.prefill, 0)
        vid = self.next_visit
        self.next_visit += 1
        if not self._submit(vid, pv.token, pv.node_id, pv.buffer, engine, pv.prefill, 0, 0, t_ms):
            self._pair_refused(pv, t_ms)
            return
        pair.in_prefill += 1
        self.pair_visits[vid] = pv

    def _pair_step(self, pv: _PairVisit, t_ms: float) -> None:
        """A pair visit's phase finished at ``t_ms``: after the prompt (its first token), the KV
        transfer starts (or, without output tokens, the visit ends); after the output, it ends."""
        pair = pv.pair
        if pv.phase == "decode":
            pair.in_decode -= 1
            self._pair_done(pv, t_ms)
            return
        pair.in_prefill -= 1
        pv.first_ms = t_ms
        if pv.decode == 0:
            self._pair_done(pv, t_ms)
            return
        # the decode engine is picked when the transfer starts (as P/D proxies pick the decode
        # worker before sending the KV); the routers see the transfer as that member's visit
        engine = self._target(pair.spec.decode, t_ms, 0, pv.decode)
        self._seen(engine, pv.decode, +1)
        duration = pair.spec.transfer_ms(pv.prefill)
        start = max(t_ms, pair.link_free_ms) if pair.spec.shared_link else t_ms
        end = start + duration
        if pair.spec.shared_link:
            pair.link_free_ms = end
            pair.wait_ms += start - t_ms
        pair.busy_ms += duration
        pair.transfers_started += 1
        pair.in_transfer += 1
        pv.phase = "transfer"
        vid = self.next_visit
        self.next_visit += 1
        self.in_transfer[vid] = (pv, engine)
        heappush(self.transfers, (end, self.transfer_seq, vid, start))
        self.transfer_seq += 1

    def _transfers_end(self, t_ms: float) -> None:
        """Every transfer ending at ``t_ms`` (in the order they started) hands its request to its
        decode engine."""
        while self.transfers and self.transfers[0][0] == t_ms:
            _, _, vid, _ = heappop(self.transfers)
            pv, engine = self.in_transfer.pop(vid)
            pv.pair.in_transfer -= 1
            pv.pair.transfers_finished += 1
            self._start_decode(pv, engine, t_ms, routed=True, vid=vid)

    def _start_decode(self, pv: _PairVisit, engine: str, t_ms: float, *, routed: bool,
                      vid: int | None = None) -> None:
        """The decode side serves (prefill 0, decode d), holding the prompt's KV as context."""
        if vid is None:
            vid = self.next_visit
            self.next_visit += 1
        if not self._submit(vid, pv.token, pv.node_id, pv.buffer, engine, 0, pv.decode, pv.prefill, t_ms,
                            routed=routed):
            self._pair_refused(pv, t_ms)
            return
        pv.phase = "decode"
        pv.pair.in_decode += 1
        self.pair_visits[vid] = pv

    def _pair_refused(self, pv: _PairVisit, t_ms: float) -> None:
        pv.pair.rejected += 1
        self.counts[pv.buffer] -= 1
        self._refuse(pv.token, t_ms)

    def _pair_done(self, pv: _PairVisit, t_ms: float) -> None:
        """A pair visit ends: its latencies are recorded and the request goes on."""
        pair = pv.pair
        pair.completed += 1
        record = RequestRecord(0, pv.arrival_ms, pv.first_ms, t_ms, pv.prefill, pv.decode)
        pair.recorder.request_done(record)
        recorder = self.class_recorders.get(pv.token.cls)
        if recorder is not None:
            recorder.request_done(record)
        self.counts[pv.buffer] -= 1
        node = self.net.classes[pv.token.cls].nodes[pv.node_id]
        self._advance(pv.token, self._choose(pv.token.cls, node), t_ms)

    def _pick(self, pool: _Pool, t_ms: float, prefill: int, decode: int) -> str:
        """The member of ``pool`` its router sends a visit to (two draws of the pool's stream,
        taken whether the router uses them or not)."""
        draws = (pool.draws.next(), pool.draws.next())
        members = tuple(
            MemberView(i, m, self.in_system[m], self.waiting[m], self.outstanding[m], cap, budget, kv)
            for i, (m, cap, budget, kv) in enumerate(pool.static)
        )
        choice = pool.router(PoolView(pool.spec.name, t_ms, prefill, decode, members, pool.routed, draws))
        n = len(members)
        if isinstance(choice, bool) or not isinstance(choice, int | np.integer) or not 0 <= choice < n:
            raise ConfigError(f"routers.{pool.spec.name}", choice,
                              f"a router must return a member index 0..{n - 1}")
        pool.routed += 1
        return pool.static[int(choice)][0]

    def _refuse(self, token: _Token, t_ms: float) -> None:
        """An engine refused a visit of ``token``: the request it belongs to is lost (counted once;
        its other branches still run and end at their join)."""
        while token.frame is not None:
            if token.frame.failed:
                return
            token.frame.failed = True
            token = token.frame.parent
        self.class_rejected[token.cls] += 1
        self._present(token.cls, t_ms, -1)

    # -- the loop ---------------------------------------------------------------------------
    def _external(self) -> Iterator[tuple[float, str]]:
        """External arrivals of all classes merged in time order (ties: class name order)."""
        heap: list[tuple[float, str, int]] = []
        buffers: dict[str, list[float]] = {}
        for cname in sorted(self.net.classes):
            buffers[cname] = next(self.arrival_streams[cname], np.zeros(0)).tolist()
            if buffers[cname]:
                heappush(heap, (buffers[cname][0], cname, 0))
        while heap:
            t, cname, i = heappop(heap)
            yield t, cname
            i += 1
            if i == len(buffers[cname]):
                buffers[cname] = next(self.arrival_streams[cname], np.zeros(0)).tolist()
                i = 0
            if buffers[cname]:
                heappush(heap, (buffers[cname][i], cname, i))

    def result(self) -> NetworkResult:
        """Run the network and collect the results."""
        if (self.compiled_routing and self.builtin_routers and self.kernels
                and len(self.kernels) == len(self.engine_list)):
            horizon = self._loop_compiled()
        else:
            horizon = self._loop()
        return self._close(horizon)

    def _loop_compiled(self) -> float:
        """``_loop``, routing included, in compiled code (every engine is compiled): the same run,
        with this object's per-class counters filled as ``_loop`` fills them. Returns the
        horizon."""
        tables = route_tables(self.net, self.engine_names,
                              {name: router_name(p.router) for name, p in self.pools.items()})
        sizes: list[Callable[[], np.ndarray] | None] = []
        choices: list[Callable[[], np.ndarray] | None] = []
        for key in tables.keys:
            pair = self.sizes.get(key)
            sizes.extend((None, None) if pair is None else (pair[0].chunk, pair[1].chunk))
            choices.append(self.choices[key].chunk)
        loop = NetworkLoop(
            tables, self.kernels, [self.arrival_streams[c] for c in tables.classes], sizes, choices,
            [self.class_latency[c] for c in tables.classes], self.max_requests,
            math.inf if self.duration_ms is None else self.duration_ms,
            lambda last_ms: horizon_ms(self.duration_ms, last_ms, self.drain_s),
            [self.pools[name].draws.chunk for name in tables.pools],
            [self.pairs[name].recorder for name in tables.pairs],
            [self.class_recorders.get(c) for c in tables.classes],
        )
        horizon = loop.run()
        for i, cname in enumerate(tables.classes):
            totals = loop.class_totals(i)
            self.class_arrivals[cname] = totals.arrivals
            self.class_done[cname] = totals.done
            self.class_present[cname] = totals.present
            self.class_area[cname] = totals.area
            self.class_last[cname] = totals.last_ms
            self.class_bins[cname].sums[:] = totals.bins
            self.class_bins[cname].width_ms = totals.bin_width_ms
        for q, name in enumerate(tables.pairs):  # the pairs' counters, and the transfers in flight
            totals, pair = loop.pair_totals(q), self.pairs[name]
            pair.arrivals, pair.completed = totals.arrivals, totals.completed
            pair.in_prefill, pair.in_transfer, pair.in_decode = (
                totals.in_prefill, totals.in_transfer, totals.in_decode)
            pair.transfers_started, pair.transfers_finished = (
                totals.transfers_started, totals.transfers_finished)
            pair.link_free_ms, pair.wait_ms = totals.link_free_ms, totals.wait_ms
            pair.busy_ms = totals.busy_ms
        in_flight = loop.transfers()
        self.transfers = [(end, seq, vid, start) for end, seq, vid, start, _ in in_flight]
        self.transfer_pairs = {vid: self.pairs[tables.pairs[q]] for _, _, vid, _, q in in_flight}
        self.next_visit = loop.visits
        self.visit_total = loop.visits - len(in_flight)  # a transfer's id is its decode visit's
        self.last_arrival_ms = loop.last_arrival_ms
        return horizon

    def _loop(self) -> float:
        """The event loop with the routing in Python (any engines); returns the horizon."""
        external = self._external()
        limit = math.inf if self.max_requests is None else self.max_requests
        stop_ms = math.inf if self.duration_ms is None else self.duration_ms
        nxt = next(external, None)
        arrived = 0
        if nxt is not None and nxt[0] >= stop_ms:
            nxt = None
        horizon = math.inf if nxt is not None else self._horizon()
        engines = self.engine_list
        transfers = self.transfers
        while True:
            times = [e.next_event_ms() for e in engines]
            t_engine = min(times)
            t_transfer = transfers[0][0] if transfers else math.inf
            if nxt is not None and nxt[0] <= t_engine and nxt[0] <= t_transfer:
                t, cname = nxt
                self.class_arrivals[cname] += 1
                self._present(cname, t, +1)
                self.last_arrival_ms = t
                c = self.net.classes[cname]
                self._advance(_Token(cname, t, None), c.start, t)
                arrived += 1
                nxt = next(external, None) if arrived < limit else None
                if nxt is not None and nxt[0] >= stop_ms:
                    nxt = None
                if nxt is None:
                    horizon = self._horizon()
                continue
            if t_transfer <= t_engine and t_transfer < horizon:  # KV arrives: joins the batch starting now
                self._transfers_end(t_transfer)
                continue
            if t_engine >= horizon or math.isinf(t_engine):
                break
            first = engines[times.index(t_engine)]
            if isinstance(first, KernelEngine):
                # a compiled engine runs alone until another engine could finish a request (only
                # that can send it work), the next external arrival or the horizon; it stops
                # after a batch that finished requests, so they are routed first
                alone = min((e.completion_bound_ms() for e in engines if e is not first),
                            default=math.inf)
                if alone > t_engine:
                    until = min(alone, horizon, math.inf if nxt is None else nxt[0], t_transfer)
                    ids, at = first.advance(until)
                    self._route(ids, at)
                    continue
            # a shared instant: every due engine ends its batch, the finished are routed, then
            # they all start (a request routed now joins the batch that starts now)
            due = [e for e, t in zip(engines, times, strict=True) if t == t_engine]
            finished: list[int] = []
            for e in due:
                if e.ends_at(t_engine):
                    finished.extend(r if isinstance(r, int) else r.id for r in e.end_batch())
            self._route(finished, t_engine)
            for e in due:
                e.start_at(t_engine)
        return horizon

    def _close(self, horizon: float) -> NetworkResult:
        """End the engines at the horizon (if a batch runs past it) and collect the results."""
        engines = self.engine_list
        cut = any(math.isfinite(e.next_event_ms()) and e.next_event_ms() >= horizon for e in engines) or (
            bool(self.transfers) and math.isfinite(horizon))
        end_ms = horizon if cut else max([self.last_arrival_ms, *(e.now_ms for e in engines)])
        for name, e in zip(self.engine_names, engines, strict=True):
            if math.isfinite(e.next_event_ms()) and e.next_event_ms() >= horizon:
                e.stop(horizon)
                self.recorders[name].cut(horizon, e.next_event_ms())  # busy only up to the horizon
        for k in self.kernels:
            k.finish()
        return self._collect(end_ms)

    def _route(self, finished: list[int], t_ms: float) -> None:
        """Send finished visits on, then let idle max-pressure engines look again."""
        for vid in finished:  # what the routers see: every completion of the instant at once
            _, _, _, engine, tokens = self.visits[vid]
            self.in_system[engine] -= 1
            self.waiting[engine] = 0
            self.outstanding[engine] -= tokens
        for vid in finished:
            token, node_id, buffer, _, _ = self.visits.pop(vid)
            pv = self.pair_visits.pop(vid, None)
            if pv is not None:
                self._pair_step(pv, t_ms)
                continue
            self.counts[buffer] -= 1
            node = self.net.classes[token.cls].nodes[node_id]
            self._advance(token, self._choose(token.cls, node), t_ms)
        if finished:
            for e in self.pressure_engines:  # downstream counts changed: idle engines look again
                e.wake(t_ms)

    def _horizon(self) -> float:
        return horizon_ms(self.duration_ms, self.last_arrival_ms, self.drain_s)

    # -- results ----------------------------------------------------------------------------
    def _collect(self, end_ms: float) -> NetworkResult:
        window_end = min(self.duration_ms if self.duration_ms is not None else self.last_arrival_ms,
                         end_ms)
        start = WARMUP_FRACTION * window_end
        engine_results: dict[str, EngineResult] = {}
        offered_of: dict[str, float] = {}
        offered_total = 0.0
        for name in self.engine_names:
            eng, rec = self.engines[name], self.recorders[name]
            if eng.blocked_since_ms is not None:
                rec.stall(end_ms - eng.blocked_since_ms)
            metrics = rec.finish(end_ms)
            offered = rec.totals.arrived_tokens / (window_end / 1000.0) if window_end > 0 else 0.0
            offered_total += offered
            offered_of[name] = offered
            memory = self.net.engines[name].memory
            engine_results[name] = EngineResult(
                name, self.policy_names[name], metrics,
                observe(rec.backlog_bins, start, window_end, offered),
                self.analysis.engines[name].rho, None if memory is None else memory.spec,
            )
        total = self._summed_backlog(self.engine_names, end_ms)
        pools = {}
        for pname, pool in self.pools.items():
            backlog = self._summed_backlog(pool.spec.members, end_ms)
            load = self.analysis.pools[pname]
            pools[pname] = PoolResult(
                pname, router_name(pool.router), pool.spec.members,
                tuple(engine_results[m].metrics.arrivals for m in pool.spec.members),
                sum(engine_results[m].metrics.completed for m in pool.spec.members),
                sum(engine_results[m].metrics.total_token_throughput for m in pool.spec.members),
                load.rho, predict_pool(self.net, self.analysis, pname, self.policy_names),
                observe(backlog, start, window_end, sum(offered_of[m] for m in pool.spec.members)),
            )
        pairs = {name: self._pair_result(pair, end_ms) for name, pair in self.pairs.items()}
        observed = observe(total, start, window_end, offered_total)
        classes = {}
        duration_s = end_ms / 1000.0
        for cname in sorted(self.net.classes):
            self._present(cname, end_ms, 0)
            latency = summary("e2el", np.frombuffer(self.class_latency[cname], dtype=float))
            starts, means = self.class_bins[cname].series(end_ms)
            series = downsample(starts / 1000.0, means, 512)
            classes[cname] = ClassResult(
                cname, self.class_arrivals[cname], self.class_done[cname],
                self.class_done[cname] / duration_s if duration_s > 0 else math.nan,
                latency, self.class_area[cname] / end_ms if end_ms > 0 else math.nan, series,
                self.class_rejected[cname], self._request_latency(cname, end_ms),
            )
        starts, means = total.series(end_ms)
        backlog = downsample(starts / 1000.0, means, 512)
        present = TimeBins()  # requests of every class in the network (the classes' bins, summed)
        for cname in self.net.classes:
            self.class_bins[cname]._fit(end_ms)  # (done by ``series`` above: the same bin widths)
            present.width_ms = self.class_bins[cname].width_ms
            present.sums = present.sums + self.class_bins[cname].sums
        arrivals = sum(self.class_arrivals.values())
        rejected = sum(self.class_rejected.values())
        evidence = network_evidence(
            total, present, start, window_end, end_ms, offered_total,
            arrivals / (window_end / 1000.0) if window_end > 0 else 0.0,
            {n: e.observed for n, e in engine_results.items()},
            arrivals - rejected, sum(self.class_done.values()), observed,
        )
        observed = dataclasses.replace(observed, verdict=evidence.verdict)
        notes = list(self.notes)
        blocked = [n for n in self.engine_names
                   if self.engines[n].blocked_since_ms is not None and self.engines[n].in_system]
        if blocked:
            notes.append(f"engine(s) {', '.join(blocked)} stalled: requests wait but the policy forms "
                         "no batch (a prompt larger than the budget under a non-chunking policy?)")
        if observed.verdict == "unstable":
            notes.append("the network does not keep up: latency percentiles are not steady-state values")
        if rejected:
            notes.append(f"{rejected} request(s) refused: a visit needed more KV cache than its engine "
                         "can ever hold (rejected_requests per engine)")
        unfinished = sum(self.class_arrivals.values()) - sum(self.class_done.values()) - rejected
        if unfinished:
            notes.append(f"{unfinished} request(s) still in the network at the end ({duration_s:.1f} s)")
        return NetworkResult(
            analysis=self.analysis,
            engines=engine_results,
            classes=classes,
            duration_s=duration_s,
            predicted=predict_network(self.net, self.analysis, self.policy_names),
            observed=observed,
            evidence=evidence,
            backlog_series=backlog,
            visits=self.visit_total,
            notes=tuple(notes),
            pools=pools,
            pairs=pairs,
        )

    def _summed_backlog(self, engines: Sequence[str], end_ms: float) -> TimeBins:
        """The backlog bins of ``engines`` summed (their recorders finished), fitted to ``end_ms``."""
        total = TimeBins()
        for name in engines:
            bins = self.recorders[name].backlog_bins
            total.width_ms = bins.width_ms
            total.sums = total.sums + bins.sums
        total._fit(end_ms)
        return total

    def _pair_result(self, pair: _PairRun, end_ms: float) -> PairResult:
        """One pair's figures at ``end_ms`` (transfers in flight count on the link up to it)."""
        owner = self.transfer_pairs or {vid: pv.pair for vid, (pv, _) in self.in_transfer.items()}
        busy = pair.busy_ms - sum(end - max(start, end_ms) for end, _, vid, start in self.transfers
                                  if end > end_ms and owner[vid] is pair)
        pair.recorder.finish(end_ms)
        spec = pair.spec
        return PairResult(
            spec.name, spec.prefill, spec.decode, pair.arrivals, pair.completed, pair.in_prefill,
            pair.in_transfer, pair.in_decode, pair.rejected, pair.transfers_started,
            pair.transfers_finished, spec.shared_link,
            pair.wait_ms / pair.transfers_started if pair.transfers_started else 0.0,
            (busy / end_ms if end_ms > 0 else math.nan) if spec.shared_link else math.nan,
            merged_latency([pair.recorder]), self.analysis.pairs[spec.name].rho,
        )

    def _request_latency(self, cname: str, end_ms: float) -> dict[str, float]:
        """TTFT/TPOT/E2EL of a single-visit class: its pair's requests, or its engine's or pool's
        when they serve this class alone (else empty)."""
        recorder = self.class_recorders.get(cname)
        if recorder is not None:
            recorder.finish(end_ms)
            return merged_latency([recorder])
        visit = single_visit(self.net.classes[cname])
        if visit is None:
            return {}
        members = self.net.members_of(visit[1])
        buffer = f"{cname}.{visit[0]}"
        if any(self.analysis.engines[m].buffers != (buffer,) for m in members):
            return {}
        return merged_latency([self.recorders[m] for m in members])


def predict_pool(net: Network, analysis: Analysis, pool: str,
                 policy_names: Mapping[str, str] | None = None) -> Prediction:
    """The theory's verdict for one pool (docs/networks.md, Pools).

    ``unstable`` when the offered load exceeds the members' summed capacity, or when a round-robin
    or random router (each member gets 1/N of the visits) overloads a member. Below that,
    ``stable`` for work-conserving K-FCFS members (no ``k_max``, no KV cache) when the router is
    throughput-optimal for the pool: jsq, jsq-tokens, least-kv and vllm-dp always (a member keeps
    receiving work only while its count is the smallest, so a growing member means every member
    is backlogged and serving at full capacity); p2c for identical members or two members (it
    then compares both); round-robin and random whenever no member is overloaded. Otherwise
    ``no guarantee``: p2c over 3+ unequal members (a member gets at most 2/N of the visits), a
    user router, or members the single-engine theorem does not cover.
    """
    load = analysis.pools[pool]
    members = load.members
    names = {m: (policy_names or {}).get(m, net.engines[m].policy) for m in members}
    if load.rho > 1 + CRITICAL_TOLERANCE:
        return Prediction("unstable", f"pool {pool} is loaded at {load.rho:.3f} of its members' summed "
                          "capacity: no router keeps up")
    over = analysis.overloaded_members(pool)
    if load.split == "even" and over:
        worst = max(over, key=lambda m: analysis.engines[m].rho)
        return Prediction("unstable", f"router '{load.router}' sends each of the {len(members)} members "
                          f"1/{len(members)} of the visits: {worst} is loaded at "
                          f"{analysis.engines[worst].rho:.3f} > 1 although the pool is at {load.rho:.3f}")
    if abs(load.rho - 1) <= CRITICAL_TOLERANCE:
        return Prediction("no guarantee", f"pool {pool} is at load 1: the theorems do not decide")
    optimal = load.router in ("jsq", "jsq-tokens", "least-kv", "vllm-dp", "round-robin", "random") or (
        load.router == "p2c" and (load.identical or len(members) <= 2))
    if not optimal:
        reason = ("a user router: nothing is promised" if load.router not in
                  ("p2c",) else f"p2c over {len(members)} unequal members: a member receives at most "
                  f"2/{len(members)} of the visits, so a fast member can starve while slow ones overload")
        return Prediction("no guarantee", reason)
    kfcfs = all(names[m] in K_FCFS_WORK_CONSERVING and net.engines[m].k_max is None
                and net.engines[m].memory is None for m in members)
    if not kfcfs:
        return Prediction("no guarantee", f"pool {pool} below its capacity ({load.rho:.3f}), but not every "
                          "member runs a work-conserving K-FCFS policy without k_max nor a KV cache")
    return Prediction("stable", f"router '{load.router}' with work-conserving K-FCFS members, pool "
                      f"loaded at {load.rho:.3f} < 1, largest member load "
                      f"{max(analysis.engines[m].rho for m in members):.3f}")


def predict_network(net: Network, analysis: Analysis,
                    policy_names: Mapping[str, str] | None = None) -> Prediction:
    """The theory's verdict for the network.

    ``unstable`` when an engine's load exceeds 1 (no policy keeps up), or when the class
    priorities make a virtual station whose load exceeds 1 (the Rybko–Stolyar instability of
    §5.4: the network diverges although every engine is below nominal load). ``stable`` for
    work-conserving K-FCFS engines without ``k_max`` or a KV cache on a DAG or fork-join network
    below nominal load (v3, §5). Otherwise ``no guarantee``, with the reason: nothing is promised
    for cyclic routing (not even for max-pressure or for priorities without an overloaded virtual
    station, which the simulations find stable but no theorem here covers). ``policy_names`` gives
    the policies actually run, when they differ from the file's (``analysis`` must have been made
    with them too, so that its virtual stations are those of the priorities that ran).
    """
    top = analysis.engines[analysis.bottleneck].rho
    pool = net.pool_of(analysis.bottleneck)
    if top > 1 + CRITICAL_TOLERANCE and pool is not None:  # the pool or its router's split overloads
        verdict = predict_pool(net, analysis, pool, policy_names)
        if verdict.verdict == "unstable":
            return Prediction("unstable", f"pool {pool}: {verdict.reason}")
    if top > 1 + CRITICAL_TOLERANCE:
        return Prediction("unstable", f"engine {analysis.bottleneck} is loaded at {top:.3f} > 1: "
                          "no policy keeps up")
    links = sorted(analysis.pairs.values(), key=lambda p: -p.link_rho)
    if links and links[0].link_rho > 1 + CRITICAL_TOLERANCE:
        return Prediction("unstable", f"pair {links[0].pair}: its shared KV link is loaded at "
                          f"{links[0].link_rho:.3f} > 1: transfers queue without bound")
    stations = sorted(analysis.virtual_stations, key=lambda v: -v.load)
    if stations and stations[0].load > 1 + CRITICAL_TOLERANCE:
        vs = stations[0]
        return Prediction(
            "unstable",
            f"the class priorities make {vs.buffers[0]} (engine {vs.engines[0]}) and {vs.buffers[1]} "
            f"(engine {vs.engines[1]}) a virtual station (Rybko-Stolyar, §5.4) with load "
            f"{vs.load:.3f} > 1: they are never served together, so the backlog swings between the "
            f"engines with growing peaks although every engine is below nominal load (largest "
            f"{top:.3f}); reverse the priorities or use max-pressure",
        )
    if abs(top - 1) <= CRITICAL_TOLERANCE:
        return Prediction("no guarantee", "the bottleneck is at load 1: the theorems do not decide")
    if stations and abs(stations[0].load - 1) <= CRITICAL_TOLERANCE:
        return Prediction("no guarantee", f"the virtual station {stations[0].buffers[0]} + "
                          f"{stations[0].buffers[1]} is at load 1: the theorems do not decide")
    names = {name: (policy_names or {}).get(name, e.policy) for name, e in net.engines.items()}
    if analysis.cyclic:
        reason = ("cyclic routing: the throughput-optimality theorem (DAG and fork-join networks) "
                  "does not apply")
        if any(p == "priority" for p in names.values()):
            reason += (f"; no virtual station of the class priorities is overloaded (largest load "
                       f"{stations[0].load:.3f})" if stations else
                       "; the class priorities form no virtual station (§5.4)")
        if any(p == "max-pressure" for p in names.values()):
            reason += ("; max-pressure's throughput optimality (Dai & Lin 2005) is proved for "
                       "unbatched processing networks, not for token batches")
        return Prediction("no guarantee", reason)
    kfcfs = all(names[e.name] in K_FCFS_WORK_CONSERVING and e.k_max is None
                for e in net.engines.values())
    cached = [e.name for e in net.engines.values() if e.memory is not None]
    if kfcfs and cached:
        return Prediction("no guarantee", f"below the memory-aware loads, but engine(s) "
                          f"{', '.join(cached)} have a KV cache: the theorem does not cover "
                          "preemption (docs/memory.md)")
    for pool in net.pools:
        verdict = predict_pool(net, analysis, pool, policy_names)
        if verdict.verdict != "stable":
            return Prediction(verdict.verdict, f"pool {pool}: {verdict.reason}")
    if kfcfs:
        return Prediction("stable", f"work-conserving K-FCFS engines on a feed-forward network, "
                          f"bottleneck {analysis.bottleneck} at load {top:.3f} < 1 (v3, §5)")
    return Prediction("no guarantee", "below nominal capacity, but not every engine runs a "
                      "work-conserving K-FCFS policy without k_max: the theorem does not apply")
