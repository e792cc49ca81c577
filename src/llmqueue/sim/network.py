"""Simulation of a network of engines on one clock: routing, fork-join, per-engine and per-class
metrics, stability verdicts per engine and for the network.

The loop takes the earliest event: an external arrival (a new request of some class enters at
its start node) or a batch end at one or more engines. At a batch end, it first ends the batch of
every engine due at that instant and routes their finished requests (to their next node, a fork's
branches, a join, or out of the network). Only then does it start those engines' next batches.
So, as for a single engine, a request that reaches an engine exactly at a batch boundary joins
the batch that starts there. Every engine keeps its own ``Recorder``, hence the single-engine
metric set per engine.

When every engine runs in the compiled loop (the shipped K-FCFS, current-vLLM, class-priority and
max-pressure policies, numba installed), the whole loop, routing included, runs compiled
(``compiled.NetworkLoop``): the same steps, draws and float operations in the same order, so the
same run (docs/networks.md, Speed).
An engine with a KV cache (``memory``) or a composition-aware batch time (each batch timed from its
shape) runs on the fast or reference engine (``engine_kind`` decides every engine's kind); a request
its cache can never hold is refused and leaves the network unfinished. The network's observed verdict
weighs several kinds of evidence (``stability.network_evidence``; docs/stability.md).
"""

from __future__ import annotations

import dataclasses
import math
from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from heapq import heappop, heappush
from typing import Literal

import numpy as np

from llmqueue.engines.compiled import DRAW_CHUNK, KernelEngine, NetworkLoop, PolicyEngine, route_tables
from llmqueue.engines.contract import EngineContract, EngineKind, choose_engine
from llmqueue.engines.fast import FastEngine
from llmqueue.engines.metrics import Recorder, RunMetrics, TimeBins, downsample, summary
from llmqueue.engines.reference import Engine, PolicyFn
from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import is_shape_model
from llmqueue.model.network import EXIT, ClassSpec, EngineSpec, Network, Node, as_network
from llmqueue.model.workload import CHUNK_SIZE, Request
from llmqueue.policies.fcfs import KFCFS, VLLMChunked, make_policy
from llmqueue.policies.network import ClassPriority, MaxPressure
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
                       "mean_requests_in_network": c.mean_requests_in_network, **c.latency}
                for name, c in self.classes.items()
            },
            "notes": list(self.notes),
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
) -> NetworkResult:
    """Run the network: external arrivals of every class in time order until ``max_requests``
    (over all classes) or ``duration_s``; then drain for at most ``drain_s`` (default: as long as
    the arrival window, at least 60 s). ``policies`` overrides engines' policies by name.
    ``engine``: ``auto`` runs each engine in the compiled loop when its policy allows it (numba
    installed), else in the Python fast engine, else in the reference engine; ``fast`` and
    ``reference`` force those. All give the same results. An engine with a KV cache runs on
    the fast engine under ``auto`` (``engine_kind``; ``compiled`` is refused for it)."""
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
        if name not in net.engines:
            raise ConfigError("policies", name, f"unknown engine; known: {sorted(net.engines)}")
    overrides = policies or {}
    analysis = analyze(net, {name: policy_name(p) for name, p in overrides.items()},
                       {name: p.order for name, p in overrides.items() if isinstance(p, ClassPriority)})
    duration_ms = None if duration_s is None else duration_s * 1000.0
    return _Run(net, analysis, seed, max_requests, duration_ms, drain_s, policies or {},
                engine).result()


class _Run:
    """The state of one network run (not reused)."""

    def __init__(self, net: Network, analysis: Analysis, seed: int, max_requests: int | None,
                 duration_ms: float | None, drain_s: float | None,
                 policies: Mapping[str, PolicyFn], engine: EngineKind = "auto",
                 compiled_routing: bool = True) -> None:
        """``compiled_routing``: when every engine is compiled, run the routing compiled too
        (``compiled.NetworkLoop``); False keeps it in Python (the same run; for tests)."""
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
            len(net.classes) + 3 * sum(len(c.nodes) for c in net.classes.values())
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
        self.visits: dict[int, tuple[_Token, str, str]] = {}
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
                vid = self.next_visit
                self.next_visit += 1
                self.visit_total += 1
                self.visits[vid] = (token, node_id, buffer)
                self.counts[buffer] += 1
                recorder = self.recorders[node.engine or ""]
                refused = recorder.totals.rejected_requests
                self.engines[node.engine or ""].submit(Request(vid, t_ms, prefill, decode, buffer))
                if recorder.totals.rejected_requests > refused:  # its KV cache can never hold this visit
                    del self.visits[vid]
                    self.counts[buffer] -= 1
                    self.visit_total -= 1
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
        if self.compiled_routing and self.kernels and len(self.kernels) == len(self.engine_list):
            horizon = self._loop_compiled()
        else:
            horizon = self._loop()
        return self._close(horizon)

    def _loop_compiled(self) -> float:
        """``_loop``, routing included, in compiled code (every engine is compiled): the same run,
        with this object's per-class counters filled as ``_loop`` fills them. Returns the
        horizon."""
        tables = route_tables(self.net, self.engine_names)
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
        self.visit_total = self.next_visit = loop.visits
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
        while True:
            times = [e.next_event_ms() for e in engines]
            t_engine = min(times)
            if nxt is not None and nxt[0] <= t_engine:
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
                    until = min(alone, horizon, math.inf if nxt is None else nxt[0])
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
        cut = any(math.isfinite(e.next_event_ms()) and e.next_event_ms() >= horizon for e in engines)
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
        for vid in finished:
            token, node_id, buffer = self.visits.pop(vid)
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
        total = TimeBins()
        offered_total = 0.0
        for name in self.engine_names:
            eng, rec = self.engines[name], self.recorders[name]
            if eng.blocked_since_ms is not None:
                rec.stall(end_ms - eng.blocked_since_ms)
            metrics = rec.finish(end_ms)
            offered = rec.totals.arrived_tokens / (window_end / 1000.0) if window_end > 0 else 0.0
            offered_total += offered
            memory = self.net.engines[name].memory
            engine_results[name] = EngineResult(
                name, self.policy_names[name], metrics,
                observe(rec.backlog_bins, start, window_end, offered),
                self.analysis.engines[name].rho, None if memory is None else memory.spec,
            )
            total.width_ms = rec.backlog_bins.width_ms
            total.sums = total.sums + rec.backlog_bins.sums
        total._fit(end_ms)
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
                self.class_rejected[cname],
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
        )


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
    if top > 1 + CRITICAL_TOLERANCE:
        return Prediction("unstable", f"engine {analysis.bottleneck} is loaded at {top:.3f} > 1: "
                          "no policy keeps up")
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
    if kfcfs:
        return Prediction("stable", f"work-conserving K-FCFS engines on a feed-forward network, "
                          f"bottleneck {analysis.bottleneck} at load {top:.3f} < 1 (v3, §5)")
    return Prediction("no guarantee", "below nominal capacity, but not every engine runs a "
                      "work-conserving K-FCFS policy without k_max: the theorem does not apply")
