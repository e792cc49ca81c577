"""Fleet planning: the cheapest fleet, predicted stable by theory, that meets latency SLOs in simulation.

A plan file gives a workload (Poisson or another arrival process with size specs, or a trace
rescaled to a rate), SLOs (TTFT, TPOT, E2EL at one percentile), GPU types (a batch-time model, GPUs
per replica, a price per GPU-hour, an optional KV cache) and deployment options: co-located (N
replicas in one pool behind a router) and disaggregated (prefill and decode pools in P:D ratios with
a KV transfer). Each (GPU type, deployment shape, budget) is a **shape**; its candidates are its
replica counts, each costing replicas x GPUs per replica x price per GPU-hour.

Search, per shape: the theory (``theory.network.analyze`` of the candidate's network) gives the
smallest replica count whose load is below ``1 - headroom`` (by bisection: the load falls as the
count grows); smaller counts are pruned without simulation. Then candidates are simulated in order of
cost over all shapes (a shape's next count only when its current one failed), so the cheapest
passing candidate is found without simulating what it dominates; the search goes on until the
runner-up (the next cheapest passing shape) is known too. This assumes that within a shape more
replicas never worsen the SLO metrics (one seed, common random numbers across candidates).

Every simulation is a network run (``simulate_network`` of a one-class network visiting one pool or
one disaggregated pair) executed by the sweep machinery (``studies.sweep.run_stored``: a process
pool or Ray), stored in the results store under its configuration's hash: an interrupted plan
resumes, a rerun simulates nothing, and changing only the SLOs reuses every run. The SLOs are
checked on the stored metrics, in the calling process.
"""

from __future__ import annotations

import heapq
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmqueue.errors import ConfigError
from llmqueue.io.configfile import first_error, read_table
from llmqueue.io.store import Store, run_key
from llmqueue.limits import MAX_DURATION_S, MAX_RATE_PER_S, MAX_REQUESTS, MAX_SEED, MIN_RATE_PER_S
from llmqueue.model.batchtime import parse_batch_time
from llmqueue.model.memory import parse_memory
from llmqueue.model.network import ROUTER_NAMES, NetworkModel, load_network
from llmqueue.model.specs import parse_arrival, parse_size

PLAN_POLICIES = ("sarathi", "orca", "vllm", "fastertransformer", "vllm-chunked")
"""The single-class policies a fleet's engines may run."""
PERCENTILES = {50: "median", 90: "p90", 99: "p99"}
"""The percentiles an SLO may name, and the metric prefix of each (vLLM's names)."""
METRICS = ("ttft", "tpot", "e2el")
MAX_REPLICAS = 10_000
"""The largest replica count a plan may consider (a typo guard)."""
WAIT_FOR_OTHER_S = 0.5
"""How long the search waits before looking again for a simulation another plan on the same results
file is running (its claim is taken over once that plan is gone, as in a sweep)."""
POOL = "fleet"
CLASS = "req"
NODE = "serve"

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(strict=True, ge=1)]
Budget = Annotated[int, Field(strict=True, ge=1)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkloadModel(_Model):
    """The offered traffic: a trace (rescaled to ``rate`` if given) or an arrival process, sizes."""

    trace: str | None = None
    arrival: str = "poisson"
    rate: Annotated[float, Field(ge=MIN_RATE_PER_S, le=MAX_RATE_PER_S, allow_inf_nan=False)] | None = None
    prefill: str | None = None
    decode: str | None = None
    requests: Annotated[int, Field(strict=True, ge=1, le=MAX_REQUESTS)] | None = 20_000
    duration_s: Annotated[float, Field(gt=0, le=MAX_DURATION_S, allow_inf_nan=False)] | None = None
    drain_s: Annotated[float, Field(ge=0, le=MAX_DURATION_S, allow_inf_nan=False)] | None = None


class SLOModel(_Model):
    """Latency targets in ms at one percentile (at least one target)."""

    ttft_ms: PositiveFloat | None = 2000.0
    tpot_ms: PositiveFloat | None = 100.0
    e2el_ms: PositiveFloat | None = None
    percentile: Literal[50, 90, 99] = 99


class GPUModel(_Model):
    """One GPU type (a model served on it): batch time, GPUs per replica, price, KV cache."""

    batch_time: str
    gpus_per_replica: PositiveInt = 1
    price_per_gpu_hour: PositiveFloat
    memory: str | None = None
    k_max: PositiveInt | None = None


class _DeployModel(_Model):
    policy: str = "vllm-chunked"
    budget: Annotated[list[Budget], Field(min_length=1)] = [2048]
    router: str = "jsq"

    @field_validator("budget", mode="before")
    @classmethod
    def _one_budget(cls, value: Any) -> Any:
        """A single budget is a one-value list."""
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value


class ColocatedModel(_DeployModel):
    """N identical replicas in one pool, N from ``replicas`` (``"1..32"``, a list, or one count)."""

    replicas: str | PositiveInt | Annotated[list[PositiveInt], Field(min_length=1)] = "1..32"


class DisaggregatedModel(_DeployModel):
    """Prefill and decode pools in ``ratios`` (``"P:D"``), scaled k = 1, 2, ... while the replicas
    k(P + D) stay at most ``max_replicas``."""

    ratios: Annotated[list[str], Field(min_length=1)]
    transfer: str | None = None
    prefill_budget: Budget | None = None  # the prefill pool's budget (default: ``budget``)
    max_replicas: Annotated[int, Field(strict=True, ge=2, le=MAX_REPLICAS)] = 32


class DeployModel(_Model):
    """The deployment options (at least one)."""

    colocated: ColocatedModel | None = None
    disaggregated: DisaggregatedModel | None = None


class SearchModel(_Model):
    """How the search runs."""

    headroom: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.0
    seed: Annotated[int, Field(strict=True, ge=0, le=MAX_SEED)] = 0
    max_simulations: Annotated[int, Field(strict=True, ge=1, le=100_000)] = 200
    engine: Literal["auto", "compiled", "fast", "reference"] = "auto"


class PlanModel(_Model):
    """A whole plan file."""

    workload: WorkloadModel
    slo: SLOModel = SLOModel()
    gpus: Annotated[dict[str, GPUModel], Field(min_length=1)]
    deploy: DeployModel
    search: SearchModel = SearchModel()


@dataclass(frozen=True, slots=True)
class Shape:
    """One family of candidates: a GPU type, a deployment kind (with its P:D ratio), a budget."""

    gpu: str
    kind: Literal["colocated", "disaggregated"]
    budget: int
    ratio: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        """``a100 colocated b=2048`` or ``a100 disagg 1:2 b=2048``."""
        if self.ratio is None:
            return f"{self.gpu} colocated b={self.budget}"
        return f"{self.gpu} disagg {self.ratio[0]}:{self.ratio[1]} b={self.budget}"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One fleet: a shape at a scale (N replicas co-located; k x (P, D) disaggregated)."""

    shape: Shape
    scale: int
    prefill_replicas: int  # co-located: every replica
    decode_replicas: int  # co-located: 0
    gpus: int
    cost_per_hour: float

    @property
    def replicas(self) -> int:
        return self.prefill_replicas + self.decode_replicas

    @property
    def fleet(self) -> str:
        """``8 x a100`` or ``2P + 4D x a100``."""
        if self.shape.ratio is None:
            return f"{self.prefill_replicas} x {self.shape.gpu}"
        return f"{self.prefill_replicas}P + {self.decode_replicas}D x {self.shape.gpu}"


@dataclass(frozen=True, slots=True)
class Theory:
    """What the analysis says about a candidate: the largest engine load and the verdict."""

    load: float
    verdict: str
    reason: str


@dataclass(frozen=True, slots=True)
class Tried:
    """One row of the plan's table: a candidate simulated (pass, fail), a range of candidates pruned
    by theory (``scale_low``..its scale), or a shape's next candidate left unsimulated because the
    answer and the runner-up cost no more (skipped)."""

    candidate: Candidate
    status: Literal["pruned", "pass", "fail", "skipped"]
    reason: str
    load: float
    metrics: Mapping[str, Any] = field(default_factory=dict)
    scale_low: int | None = None  # pruned rows: the smallest pruned scale (the row is the largest)
    stored: bool = False  # simulated by an earlier plan (read from the store)


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated plan: the model, the shapes and their scale ranges, the workload's specs."""

    model: PlanModel
    shapes: tuple[Shape, ...]
    scales: Mapping[Shape, tuple[int, int]]  # (lowest, highest) scale of each shape
    arrival: str
    rate: float | None
    prefill: str
    decode: str
    source: str


@dataclass(frozen=True, slots=True)
class PlanResult:
    """What a plan found: the cheapest passing fleet and the runner-up (None: none passed), the
    table of candidates tried, counts, and whether the simulation cap stopped the search."""

    best: Tried | None
    runner_up: Tried | None
    tried: tuple[Tried, ...]
    pruned: int
    simulated: int
    ran: int  # simulated in this call (the rest came from the store)
    capped: bool
    wall_s: float
    slo: Mapping[str, float]
    percentile: int
    headroom: float
    interrupted: int | None = None  # the signal that stopped the plan, if any

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "best": None if self.best is None else _tried_dict(self.best),
            "runner_up": None if self.runner_up is None else _tried_dict(self.runner_up),
            "tried": [_tried_dict(t) for t in self.tried],
            "pruned": self.pruned, "simulated": self.simulated, "ran": self.ran,
            "capped": self.capped, "wall_s": self.wall_s, "slo": dict(self.slo),
            "percentile": self.percentile, "headroom": self.headroom,
            "interrupted": self.interrupted is not None,
        }


def _tried_dict(t: Tried) -> dict[str, Any]:
    c = t.candidate
    return {"shape": c.shape.label, "gpu": c.shape.gpu, "kind": c.shape.kind, "budget": c.shape.budget,
            "ratio": None if c.shape.ratio is None else f"{c.shape.ratio[0]}:{c.shape.ratio[1]}",
            "fleet": c.fleet, "prefill_replicas": c.prefill_replicas,
            "decode_replicas": c.decode_replicas, "gpus": c.gpus, "cost_per_hour": c.cost_per_hour,
            "status": t.status, "reason": t.reason, "load": t.load, "scale": c.scale,
            "scale_low": t.scale_low, "from_store": t.stored, "metrics": dict(t.metrics)}


# -- reading and validation ------------------------------------------------------------------------


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file (TOML or YAML); a trace path is relative to the working
    directory, as in every spec string."""
    path = Path(path)
    return parse_plan(read_table(path, "config"), source=path.name)


def disaggregation_supported() -> bool:
    """Whether this build's network model has disaggregated prefill/decode pairs."""
    return "disaggregated" in NetworkModel.model_fields


def parse_plan(data: Any, source: str = "config") -> Plan:
    """Validate a plan given as a mapping; every shape's network is built once, so no candidate can
    fail to build later. Errors are one line naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(source, type(data).__name__, "must be a table with [workload], [gpus.NAME] "
                                                        "and [deploy.*]")
    try:
        model = PlanModel.model_validate(data)
    except ValidationError as err:
        raise first_error(err, source) from None
    w, slo, deploy = model.workload, model.slo, model.deploy
    if slo.ttft_ms is None and slo.tpot_ms is None and slo.e2el_ms is None:
        raise ConfigError(f"{source}: slo", None, "give at least one of ttft_ms, tpot_ms, e2el_ms")
    if deploy.colocated is None and deploy.disaggregated is None:
        raise ConfigError(f"{source}: deploy", None, "give [deploy.colocated] or [deploy.disaggregated]")
    if w.requests is None and w.duration_s is None:
        raise ConfigError(f"{source}: workload.requests", None, "give requests or duration_s")
    arrival, prefill, decode = _workload_specs(w, source)
    for name, g in model.gpus.items():
        where = f"{source}: gpus.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ConfigError(where, name, "GPU type names use letters, digits, '_' and '-'")
        try:
            parse_batch_time(g.batch_time)
        except ConfigError as err:
            raise ConfigError(f"{where}.batch_time", g.batch_time, err.problem) from None
        if g.memory is not None:
            try:
                cache = parse_memory(g.memory)
            except ConfigError as err:
                raise ConfigError(f"{where}.memory", g.memory, err.problem) from None
            one = _one_request_tokens(prefill, decode)
            if cache.capacity_tokens < one:
                raise ConfigError(f"{where}.memory", g.memory,
                                  f"holds {cache.capacity_tokens:,} tokens, less than one mean request "
                                  f"({one:,.0f} prompt + output tokens)")
    shapes: list[Shape] = []
    scales: dict[Shape, tuple[int, int]] = {}
    for kind, d in (("colocated", deploy.colocated), ("disaggregated", deploy.disaggregated)):
        if d is None:
            continue
        where = f"{source}: deploy.{kind}"
        policy = d.policy.strip().lower()
        if policy not in PLAN_POLICIES:
            raise ConfigError(f"{where}.policy", d.policy,
                              f"unknown policy; choose from {', '.join(PLAN_POLICIES)}")
        if d.router.strip().lower() not in ROUTER_NAMES:
            raise ConfigError(f"{where}.router", d.router,
                              f"unknown router; choose from {', '.join(ROUTER_NAMES)}")
        if isinstance(d, ColocatedModel):
            low, high = _replica_range(d.replicas, f"{where}.replicas")
            for gpu in model.gpus:
                for b in dict.fromkeys(d.budget):
                    shape = Shape(gpu, "colocated", b)
                    shapes.append(shape)
                    scales[shape] = (low, high)
        else:
            assert isinstance(d, DisaggregatedModel)
            ratios = [_ratio(text, f"{where}.ratios", d.max_replicas) for text in dict.fromkeys(d.ratios)]
            if not disaggregation_supported():
                raise ConfigError(f"{where}", "disaggregated",
                                  "this build's network model has no disaggregated pairs (branch "
                                  "'disagg'); plan co-located fleets only")
            for p, q in dict.fromkeys(ratios):
                for gpu in model.gpus:
                    for b in dict.fromkeys(d.budget):
                        shape = Shape(gpu, "disaggregated", b, (p, q))
                        shapes.append(shape)
                        scales[shape] = (1, d.max_replicas // (p + q))
    plan = Plan(model, tuple(shapes), scales, arrival, w.rate, prefill, decode, source)
    for shape in shapes:  # every candidate of a shape differs only in replica counts
        try:
            load_network(candidate_network(plan, _candidate(plan, shape, scales[shape][0])))
        except ConfigError as err:
            raise ConfigError(f"{source}: {shape.label}: {err.field}", err.value, err.problem) from None
    return plan


def _workload_specs(w: WorkloadModel, source: str) -> tuple[str, str, str]:
    """(arrival, prefill, decode) specs of the workload, checked; a trace path made absolute (the
    stored runs' keys then do not depend on the working directory)."""
    where = f"{source}: workload"
    if w.trace is not None:
        if w.arrival != "poisson" and w.arrival.strip():
            raise ConfigError(f"{where}.arrival", w.arrival, "give trace or arrival, not both")
        trace = Path(w.trace)
        trace_spec = f"trace:{trace.resolve()}"
        if not trace.is_file():
            raise ConfigError(f"{where}.trace", w.trace, "no such file")
        arrival = trace_spec
        prefill = w.prefill or trace_spec
        decode = w.decode or trace_spec
    else:
        if w.rate is None:
            raise ConfigError(f"{where}.rate", None, "give the arrival rate (requests/s) or a trace")
        if w.prefill is None or w.decode is None:
            key = "prefill" if w.prefill is None else "decode"
            raise ConfigError(f"{where}.{key}", None, "give prefill and decode size specs (or a trace)")
        arrival, prefill, decode = w.arrival.strip(), w.prefill, w.decode
    try:
        parse_arrival(arrival, w.rate if w.rate is not None else None)
    except ConfigError as err:
        raise ConfigError(f"{where}.{'trace' if w.trace else 'arrival'}", err.value, err.problem) from None
    for key, spec in (("prefill", prefill), ("decode", decode)):
        try:
            parse_size(spec, f"--{key}")
        except ConfigError as err:
            raise ConfigError(f"{where}.{key}", spec, err.problem) from None
    return arrival, prefill, decode


def _one_request_tokens(prefill: str, decode: str) -> float:
    """Mean prompt + output tokens of one request."""
    return parse_size(prefill, "--prefill").mean + parse_size(decode, "--decode").mean


def _replica_range(value: str | int | list[int], where: str) -> tuple[int, int]:
    """(low, high) of ``"1..32"``, ``8`` or a list (its min and max: every count between is tried)."""
    if isinstance(value, int):
        low = high = value
    elif isinstance(value, list):
        low, high = min(value), max(value)
    else:
        m = re.fullmatch(r"\s*(\d+)\s*\.\.\s*(\d+)\s*", value)
        if m is None:
            raise ConfigError(where, value, "expected LOW..HIGH (e.g. '1..32'), a count or a list")
        low, high = int(m[1]), int(m[2])
        if low < 1 or high < low:
            raise ConfigError(where, value, "needs 1 <= LOW <= HIGH")
    if high > MAX_REPLICAS:
        raise ConfigError(where, value, f"at most {MAX_REPLICAS:,} replicas")
    return low, high


def _ratio(text: str, where: str, max_replicas: int) -> tuple[int, int]:
    """``"P:D"`` as (P, D), both >= 1 and P + D within the replica cap."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text) if isinstance(text, str) else None
    if m is None:
        raise ConfigError(where, text, "a ratio is 'P:D' with whole numbers (e.g. '1:2')")
    p, d = int(m[1]), int(m[2])
    if p < 1 or d < 1:
        raise ConfigError(where, text, "both pools need at least one replica (P, D >= 1)")
    if p + d > max_replicas:
        raise ConfigError(where, text, f"needs {p + d} replicas, more than max_replicas = {max_replicas}")
    return p, d


# -- candidates and their networks -----------------------------------------------------------------


def _candidate(plan: Plan, shape: Shape, scale: int) -> Candidate:
    """The fleet of ``shape`` at ``scale`` and its cost per hour."""
    g = plan.model.gpus[shape.gpu]
    if shape.ratio is None:
        prefill, decode = scale, 0
    else:
        prefill, decode = scale * shape.ratio[0], scale * shape.ratio[1]
    gpus = (prefill + decode) * g.gpus_per_replica
    return Candidate(shape, scale, prefill, decode, gpus, gpus * g.price_per_gpu_hour)


def _deploy(plan: Plan, shape: Shape) -> ColocatedModel | DisaggregatedModel:
    d = plan.model.deploy.colocated if shape.ratio is None else plan.model.deploy.disaggregated
    assert d is not None
    return d


def candidate_network(plan: Plan, c: Candidate) -> dict[str, Any]:
    """The network mapping (``load_network``'s format) of one candidate: one class, the workload,
    one visit to the pool ``fleet`` or to the disaggregated pair ``fleet``."""
    shape = c.shape
    g = plan.model.gpus[shape.gpu]
    d = _deploy(plan, shape)

    def engine(replicas: int, budget: int = shape.budget) -> dict[str, Any]:
        e: dict[str, Any] = {"budget": budget, "batch_time": g.batch_time,
                             "policy": d.policy.strip().lower(), "replicas": replicas,
                             "router": d.router.strip().lower()}
        if g.k_max is not None:
            e["k_max"] = g.k_max
        if g.memory is not None:
            e["memory"] = g.memory
        return e

    cls: dict[str, Any] = {"arrival": plan.arrival, "start": NODE,
                           "nodes": {NODE: {"engine": POOL, "prefill": plan.prefill,
                                            "decode": plan.decode, "next": "exit"}}}
    if plan.rate is not None:
        cls["rate"] = plan.rate
    else:  # a trace at its own mean rate
        cls["rate"] = parse_arrival(plan.arrival, None).rate_per_s
    if shape.ratio is None:
        return {"engines": {POOL: engine(c.prefill_replicas)}, "classes": {CLASS: cls}}
    assert isinstance(d, DisaggregatedModel)
    pair: dict[str, Any] = {"prefill": "prefill", "decode": "decode"}
    if d.transfer is not None:
        pair["transfer"] = d.transfer
    prefill = engine(c.prefill_replicas, d.prefill_budget or shape.budget)
    return {"engines": {"prefill": prefill, "decode": engine(c.decode_replicas)},
            "disaggregated": {POOL: pair}, "classes": {CLASS: cls}}


def theory_of(network: Mapping[str, Any]) -> Theory:
    """The analysis of a candidate's network: its largest engine load (pool members included, with
    ``k_max`` and KV cache) and the predicted verdict."""
    from llmqueue.sim.network import predict_network
    from llmqueue.theory.network import analyze

    net = load_network(network)
    analysis = analyze(net)
    load = max(e.rho for e in analysis.engines.values())
    p = predict_network(net, analysis)
    return Theory(load, p.verdict, p.reason)


def _admissible(t: Theory, max_load: float) -> bool:
    return t.load < max_load and t.verdict != "unstable"


def smallest_stable(
    plan: Plan, shape: Shape, max_load: float,
    theory: Callable[[Mapping[str, Any]], Theory] = theory_of,
) -> tuple[int | None, Theory | None]:
    """The smallest scale of ``shape`` whose load is below ``max_load`` (None if none in range),
    with the theory of the scale just below it (the largest pruned; None when nothing is pruned).
    Bisection: the load falls as the replicas grow."""
    low, high = plan.scales[shape]
    if high < low:
        return None, None
    at_high = theory(candidate_network(plan, _candidate(plan, shape, high)))
    if not _admissible(at_high, max_load):
        return None, at_high
    at_low = theory(candidate_network(plan, _candidate(plan, shape, low)))
    if _admissible(at_low, max_load):
        return low, None
    bad, good, bad_theory = low, high, at_low  # invariant: bad fails, good passes
    while good - bad > 1:
        mid = (bad + good) // 2
        t = theory(candidate_network(plan, _candidate(plan, shape, mid)))
        if _admissible(t, max_load):
            good = mid
        else:
            bad, bad_theory = mid, t
    return good, bad_theory


# -- one simulation (in a worker) ------------------------------------------------------------------


def execute_plan_run(run: Mapping[str, Any], engine: str = "auto") -> tuple[dict[str, Any], float]:
    """One candidate's simulation (in a worker): the flat metrics the SLO check reads, and the wall
    time (s). Per-class TTFT/TPOT come from the class when the network result has them, else from
    the pool's members: the largest member value, an upper bound of the pool's (a percentile or a
    mean of a union of samples is at most the largest of the parts')."""
    from llmqueue.sim.network import simulate_network

    start = time.perf_counter()
    net = load_network(run["network"])
    r = simulate_network(net, seed=run["seed"], max_requests=run["requests"],
                         duration_s=run["duration_s"], drain_s=run["drain_s"], engine=engine)  # type: ignore[arg-type]
    doc = r.to_dict()
    cls = doc["classes"][CLASS]  # type: ignore[index]
    engines = doc["engines"]
    out: dict[str, Any] = {
        "arrivals": cls["arrivals"], "completed": cls["completed"], "in_network": cls["in_network"],
        "rejected": cls["rejected"], "load": max(e.rho for e in r.analysis.engines.values()),
        "stable_predicted": r.predicted.verdict, "stable_observed": r.observed.verdict,
        "stable_observed_reason": r.evidence.reason, "run_duration_s": r.duration_s,
    }
    from_members = False
    for prefix in ("mean", *PERCENTILES.values()):
        for metric in METRICS:
            key = f"{prefix}_{metric}_ms"
            if key in cls:
                out[key] = cls[key]
            elif metric != "e2el" and engines:
                values = [e.get(key) for e in engines.values()]  # type: ignore[union-attr]
                values = [v for v in values if v is not None and not math.isnan(v)]
                out[key] = max(values) if values else None
                from_members = True
            else:
                out[key] = None
    out["latency_source"] = "members (max)" if from_members else "class"
    return out, time.perf_counter() - start


def run_config(plan: Plan, c: Candidate) -> dict[str, Any]:
    """The stored configuration of a candidate's simulation (its hash keys the store)."""
    w = plan.model.workload
    return {"study": "plan", "network": candidate_network(plan, c), "seed": plan.model.search.seed,
            "requests": w.requests, "duration_s": w.duration_s, "drain_s": w.drain_s,
            "engine": plan.model.search.engine}


def slo_targets(model: PlanModel) -> dict[str, float]:
    """The SLO targets by metric name (``p99_ttft_ms``: 2000.0, ...)."""
    prefix = PERCENTILES[model.slo.percentile]
    targets = {"ttft": model.slo.ttft_ms, "tpot": model.slo.tpot_ms, "e2el": model.slo.e2el_ms}
    return {f"{prefix}_{m}_ms": v for m, v in targets.items() if v is not None}


def judge(metrics: Mapping[str, Any], targets: Mapping[str, float]) -> tuple[bool, str]:
    """Pass or fail of a simulated candidate, and why: every request completes and every SLO metric
    is at most its target. The observed verdict is reported, not judged: on short runs its trend
    tests raise false alarms (docs/stability.md), and the theory already requires load < 1."""
    incomplete = int(metrics["arrivals"]) - int(metrics["completed"])
    if incomplete > 0:
        return False, f"{incomplete:,} request(s) unfinished at the horizon"
    over = []
    for key, target in targets.items():
        value = metrics.get(key)
        if value is None or value > target:
            over.append(f"{key} {_ms(value, target)} > {target:,.0f}")
    if over:
        return False, "; ".join(over)
    return True, ", ".join(f"{k} {_ms(metrics[k], v)} / {v:,.0f}" for k, v in targets.items())


def _ms(value: float | None, target: float) -> str:
    """A latency for a reason: whole ms, or one decimal where whole ms would read as the target."""
    if value is None:
        return "none"
    text = f"{value:,.0f}"
    return f"{value:,.1f}" if text == f"{target:,.0f}" and value != target else text


# -- the search ------------------------------------------------------------------------------------


def run_plan(
    plan: Plan,
    store: Store,
    *,
    workers: int = 1,
    backend: Literal["local", "ray"] = "local",
    ray_address: str | None = None,
    on_simulated: Callable[[Tried], None] | None = None,
) -> PlanResult:
    """Search the cheapest fleet of ``plan`` that theory predicts stable (load below ``1 -
    headroom``) and that meets the SLOs in simulation, and the runner-up (module docstring).
    Simulations already in ``store`` are read, not rerun; up to ``workers`` run at once."""
    from llmqueue.studies.sweep import worker_pool

    pool = worker_pool(workers) if backend == "local" and workers > 1 else None
    try:
        return _search(plan, store, workers, backend, ray_address, on_simulated, pool)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _search(plan: Plan, store: Store, workers: int, backend: Literal["local", "ray"],
            ray_address: str | None, on_simulated: Callable[[Tried], None] | None,
            pool: Any) -> PlanResult:
    """The search of :func:`run_plan`, with the caller's worker pool (None: none, or Ray)."""
    from llmqueue.studies.sweep import run_stored

    start = time.perf_counter()
    search = plan.model.search
    max_load = 1.0 - search.headroom
    targets = slo_targets(plan.model)
    tried: list[Tried] = []
    order = {shape: i for i, shape in enumerate(plan.shapes)}
    frontier: list[tuple[float, int, int, Shape]] = []  # (cost, shape order, scale, shape)
    for shape in plan.shapes:
        first, below = smallest_stable(plan, shape, max_load)
        low, high = plan.scales[shape]
        if below is not None:
            top = (first - 1) if first is not None else high
            why = ("theory: unstable" if below.verdict == "unstable"
                   else f"load >= 1 - headroom = {max_load:g}")
            tried.append(Tried(_candidate(plan, shape, top), "pruned",
                               f"{why} (load {below.load:.3f} at scale {top}, more at fewer replicas)",
                               below.load, scale_low=low))
        if first is not None:
            c = _candidate(plan, shape, first)
            heapq.heappush(frontier, (c.cost_per_hour, order[shape], first, shape))
    store.import_pending()
    known = {row["key"]: row for row in store.rows() if row.get("study") == "plan"}
    passing: list[tuple[tuple[float, int, int], Tried]] = []
    simulated = ran = 0
    capped = False
    signum: int | None = None

    def settled() -> bool:
        """Whether the best and the runner-up are known: two passing, and nothing cheaper left."""
        if len(passing) < 2 or not frontier:
            return not frontier
        second = sorted(k for k, _ in passing)[1]
        return (frontier[0][0], frontier[0][1], frontier[0][2]) > second

    while frontier and not settled():
        if simulated >= search.max_simulations:
            capped = True
            break
        room = search.max_simulations - simulated
        batch = [heapq.heappop(frontier) for _ in range(min(max(workers, 1), len(frontier), room))]
        cands = [_candidate(plan, shape, scale) for _, _, scale, shape in batch]
        runs = [run_config(plan, c) for c in cands]
        fresh: dict[str, dict[str, Any]] = {}
        n_ran, _, signum = run_stored(runs, store, execute_fn=execute_plan_run, engine=search.engine,
                                      workers=workers, backend=backend, ray_address=ray_address,
                                      on_done=_collector(fresh), pool=pool)
        ran += n_ran
        if signum is None and any(run_key(r) not in fresh and run_key(r) not in known for r in runs):
            # another plan on the same file ran them (stored since this one started) or holds them
            known.update({row["key"]: row for row in store.rows() if row.get("study") == "plan"})
            if any(run_key(r) not in known for r in runs):
                time.sleep(WAIT_FOR_OTHER_S)
        for c, run, (_, rank, scale, shape) in zip(cands, runs, batch, strict=True):
            key = run_key(run)
            metrics = fresh.get(key) or known.get(key)
            if metrics is None:  # interrupted, or still running in another plan on the same file
                heapq.heappush(frontier, (c.cost_per_hour, rank, scale, shape))
                continue
            simulated += 1
            ok, why = judge(metrics, targets)
            t = Tried(c, "pass" if ok else "fail", why, float(metrics["load"]),
                      {k: metrics.get(k) for k in (*targets, "arrivals", "completed", "stable_observed",
                                                   "stable_predicted", "latency_source")},
                      stored=key not in fresh)
            tried.append(t)
            if on_simulated is not None:
                on_simulated(t)
            if ok:
                passing.append(((c.cost_per_hour, rank, scale), t))
            elif scale < plan.scales[shape][1]:
                nxt = _candidate(plan, shape, scale + 1)
                heapq.heappush(frontier, (nxt.cost_per_hour, rank, scale + 1, shape))
        if signum is not None:
            break
    if not capped and signum is None:
        for cost, _, scale, shape in sorted(frontier):  # left: none can beat the runner-up
            c = _candidate(plan, shape, scale)
            tried.append(Tried(c, "skipped", f"not simulated: ${cost:,.2f}/h, no cheaper than the "
                               "runner-up", theory_of(candidate_network(plan, c)).load))
    passing.sort(key=lambda kt: kt[0])
    best = passing[0][1] if passing else None
    runner = passing[1][1] if len(passing) > 1 else None
    tried.sort(key=lambda t: (order[t.candidate.shape], t.candidate.scale))
    return PlanResult(best, runner, tuple(tried), sum(1 for _ in _pruned_count(tried, plan)),
                      simulated, ran, capped, time.perf_counter() - start, targets,
                      plan.model.slo.percentile, search.headroom, signum)


def _collector(into: dict[str, dict[str, Any]]) -> Callable[[Mapping[str, Any], Mapping[str, Any]], None]:
    """An ``on_done`` that keeps each finished run's result by its key."""

    def done(run: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        into[run_key(run)] = dict(result)

    return done


def _pruned_count(tried: Iterable[Tried], plan: Plan) -> Iterable[int]:
    """One item per pruned candidate (a pruned row stands for its range of scales)."""
    for t in tried:
        if t.status == "pruned":
            yield from range(t.scale_low or t.candidate.scale, t.candidate.scale + 1)


def pruned_candidates(plan: Plan, result: PlanResult) -> list[Candidate]:
    """Every candidate the plan pruned by theory (each pruned row expanded to its scales)."""
    out = []
    for t in result.tried:
        if t.status == "pruned":
            for scale in range(t.scale_low or t.candidate.scale, t.candidate.scale + 1):
                out.append(_candidate(plan, t.candidate.shape, scale))
    return out


def margin(t: Tried, targets: Mapping[str, float]) -> list[tuple[str, float, float]]:
    """(metric, achieved, target) of a simulated candidate, for the SLO metrics."""
    return [(k, float(t.metrics[k]), v) for k, v in targets.items() if t.metrics.get(k) is not None]


def candidates_of(plan: Plan) -> Sequence[Candidate]:
    """Every candidate of the plan (all shapes, all scales in range), in cost order."""
    order = {shape: i for i, shape in enumerate(plan.shapes)}
    out = [_candidate(plan, s, k) for s in plan.shapes
           for k in range(plan.scales[s][0], plan.scales[s][1] + 1)]
    return sorted(out, key=lambda c: (c.cost_per_hour, order[c.shape], c.scale))
