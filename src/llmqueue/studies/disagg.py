"""Split vs co-located: at the same number of GPUs, which deployment serves the most requests per
second within TTFT/TPOT targets (docs/guide/split.md).

The candidates for N engines ("GPUs"; one engine is whatever the batch-time model times, e.g. a
TP-4 group for a TP-4 preset): **co-located**, one pool of N replicas behind a ``jsq`` router, each
running a chunked-prefill policy (``sarathi`` or ``vllm-chunked``) at each given budget; and every
**split** P:D with P + D = N, a prefill/decode pair (``[disaggregated]``) whose prefill pool runs
the same chunked policy at a prefill budget and whose decode pool runs it at a decode budget and
``k_max``, with a KV transfer between them. Each candidate is a network mapping with one class and
one visit, run by ``simulate_network`` (no simulator code here).

Goodput of a candidate: the largest arrival rate (Poisson) at which one run of ``requests``
requests (seed ``seed``, drained for up to ``drain_s``) has every request finished and the
``percentile`` TTFT and TPOT of the class at or below the targets. The rates tried lie on the grid
``bound / (1 + step)^k``, k >= 1, where ``bound`` is the theory's capacity of the candidate
(``analyze``: the rate at which its most loaded engine or link reaches load 1); no rate at or
above it is simulated. The search bisects the grid index assuming that passing is monotone in the
rate, so the rate it reports passed and the next grid rate up (``rate * (1 + step)``) failed, or
is the bound. Runs depend only on the candidate and the grid index, so a table over several
targets reuses them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from llmqueue.errors import ConfigError
from llmqueue.limits import MAX_BUDGET_TOKENS, MAX_REQUESTS, MAX_SEED
from llmqueue.model.batchtime import parse_batch_time
from llmqueue.model.memory import parse_memory
from llmqueue.model.network import load_network
from llmqueue.model.specs import parse_size
from llmqueue.sim.network import simulate_network
from llmqueue.theory.network import analyze

__all__ = [
    "DEFAULT_BATCH_TIME",
    "DEFAULT_DECODE",
    "DEFAULT_PREFILL",
    "DEFAULT_TRANSFER",
    "Candidate",
    "CandidateResult",
    "RunFigures",
    "SplitComparison",
    "SplitSLO",
    "SplitSetup",
    "bound_rate_per_s",
    "candidates",
    "check_setup",
    "check_slo",
    "compare_split",
    "goodput",
    "network_mapping",
    "run_at",
    "split_table",
]

DEFAULT_BATCH_TIME = "preset:h100-llama2-70b-tp4-tokens"
DEFAULT_PREFILL = "lognormal:mean=1155,sigma=0.9,min=16"
"""Azure LLM inference conversation trace 2023: mean prompt 1,155 tokens (lognormal shape assumed)."""
DEFAULT_DECODE = "lognormal:mean=211,sigma=0.9,min=4"
"""The same trace: mean output 211 tokens."""
DEFAULT_TRANSFER = "fixed_ms=2,per_token_ms=0.0004,link=shared"
"""About 2.5 GB/s of KV at 320 KiB/token (Llama-2-70B with GQA) over one shared link: an assumption."""
PERCENTILE_LABELS = {"p50": "median", "median": "median", "p90": "p90", "p99": "p99"}
MAX_GPUS = 1024
MIN_FRACTION = 0.02
"""The search goes no lower than this fraction of a candidate's bound: below it, nothing passes."""
CLASS = "chat"


@dataclass(frozen=True, slots=True)
class SplitSLO:
    """Latency targets: the ``percentile`` (p50, p90 or p99) of TTFT and of TPOT, in ms."""

    ttft_ms: float
    tpot_ms: float
    percentile: str = "p99"

    def label(self) -> str:
        """The targets as text."""
        return f"{self.percentile} TTFT <= {self.ttft_ms:g} ms, {self.percentile} TPOT <= {self.tpot_ms:g} ms"


@dataclass(frozen=True, slots=True)
class SplitSetup:
    """What every candidate shares: engines, workload sizes, run length and search step."""

    gpus: int
    batch_time: str = DEFAULT_BATCH_TIME
    prefill: str = DEFAULT_PREFILL
    decode: str = DEFAULT_DECODE
    policy: str = "sarathi"
    colocated_budgets: tuple[int, ...] = (512, 2048)
    prefill_budget: int = 2048
    decode_budget: int = 512
    decode_k_max: int | None = 256
    transfer: str = DEFAULT_TRANSFER
    memory: str | None = None  # every engine's KV cache spec (None: unlimited)
    requests: int = 2000
    seed: int = 0
    step: float = 0.05
    drain_s: float = 3600.0  # after the last arrival: long outputs at a slow TPOT take minutes


@dataclass(frozen=True, slots=True)
class Candidate:
    """One deployment of ``gpus`` engines: co-located at ``budget``, or split ``prefill_gpus``:
    ``decode_gpus`` (prefill side at ``budget``)."""

    name: str
    kind: Literal["co-located", "split"]
    prefill_gpus: int  # co-located: every engine
    decode_gpus: int  # co-located: 0
    budget: int


@dataclass(frozen=True, slots=True)
class RunFigures:
    """One simulated rate of one candidate: the class's latency percentiles and what finished."""

    rate_per_s: float
    load: float  # rate / the candidate's bound: its most loaded engine's or link's load
    latency: Mapping[str, float]  # {mean,median,p90,p99}_{ttft,tpot}_ms
    arrivals: int
    completed: int
    rejected: int

    def verdict(self, slo: SplitSLO) -> tuple[bool, str]:
        """Whether this run meets ``slo`` (every request finished, both percentiles at or below
        their targets), and why not."""
        label = PERCENTILE_LABELS[slo.percentile]
        ttft, tpot = self.latency[f"{label}_ttft_ms"], self.latency[f"{label}_tpot_ms"]
        if self.completed < self.arrivals:
            return False, (f"{self.arrivals - self.completed} of {self.arrivals} requests unfinished"
                           f" ({self.rejected} refused by a KV cache)")
        if not ttft <= slo.ttft_ms:
            return False, f"{slo.percentile} TTFT {ttft:.1f} ms > {slo.ttft_ms:g} ms"
        if not tpot <= slo.tpot_ms:
            return False, f"{slo.percentile} TPOT {tpot:.1f} ms > {slo.tpot_ms:g} ms"
        return True, ""


@dataclass(frozen=True, slots=True)
class CandidateResult:
    """A candidate's goodput under one SLO: the rate met (0 when none), the next grid rate up
    (failed, or the bound), and the figures at the rate met."""

    candidate: Candidate
    bound_rate_per_s: float
    rate_met_per_s: float
    rate_failed_per_s: float
    at_rate: RunFigures | None
    points: tuple[RunFigures, ...]  # the rates this search looked at, in order
    reason: str  # why the next rate up failed

    @property
    def per_gpu(self) -> float:
        """Requests per second per engine at the rate met."""
        return self.rate_met_per_s / (self.candidate.prefill_gpus + self.candidate.decode_gpus)

    def to_dict(self, slo: SplitSLO) -> dict[str, Any]:
        """A JSON-ready summary."""
        label = PERCENTILE_LABELS[slo.percentile]
        at = self.at_rate
        return {"name": self.candidate.name, "kind": self.candidate.kind,
                "prefill_gpus": self.candidate.prefill_gpus, "decode_gpus": self.candidate.decode_gpus,
                "budget": self.candidate.budget, "bound_rate_per_s": self.bound_rate_per_s,
                "rate_met_per_s": self.rate_met_per_s, "rate_failed_per_s": self.rate_failed_per_s,
                "rate_met_per_gpu": self.per_gpu, "load": None if at is None else at.load,
                f"{slo.percentile}_ttft_ms": None if at is None else at.latency[f"{label}_ttft_ms"],
                f"{slo.percentile}_tpot_ms": None if at is None else at.latency[f"{label}_tpot_ms"],
                "runs": len(self.points), "failed_because": self.reason}


@dataclass(frozen=True, slots=True)
class SplitComparison:
    """Every candidate's goodput under one SLO, and the winner (None when nothing passes)."""

    slo: SplitSLO
    setup: SplitSetup
    results: tuple[CandidateResult, ...]
    winner: str | None
    best_colocated: str | None
    best_split: str | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {"ttft_ms": self.slo.ttft_ms, "tpot_ms": self.slo.tpot_ms,
                "percentile": self.slo.percentile, "winner": self.winner,
                "best_colocated": self.best_colocated, "best_split": self.best_split,
                "candidates": [r.to_dict(self.slo) for r in self.results]}


RunCache = dict[tuple[str, int], RunFigures]
"""Runs by (candidate name, grid index): the same run whatever the targets."""


# ---------------------------------------------------------------- checks


def _int(value: object, name: str, low: int, high: int) -> int:
    """``value`` if it is an integer in [low, high], else a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(name, value, f"must be an integer in [{low}, {high}]")
    return value


def _positive(value: object, name: str) -> float:
    """``value`` as a float if it is a finite number > 0, else a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0):
        raise ConfigError(name, value, "must be a finite number > 0")
    return float(value)


def _as_field(name: str, parse: Callable[[str], object], spec: str) -> None:
    """``parse(spec)``; its error renamed to the setup's field ``name``."""
    try:
        parse(spec)
    except ConfigError as err:
        raise ConfigError(name, err.value, err.problem) from None


def check_slo(slo: SplitSLO) -> SplitSLO:
    """``slo`` checked: positive finite targets, a known percentile."""
    if not isinstance(slo, SplitSLO):
        raise ConfigError("slo", type(slo).__name__, "must be a SplitSLO")
    _positive(slo.ttft_ms, "ttft_ms")
    _positive(slo.tpot_ms, "tpot_ms")
    if slo.percentile not in PERCENTILE_LABELS:
        raise ConfigError("percentile", slo.percentile, f"choose from {', '.join(PERCENTILE_LABELS)}")
    return slo


def check_setup(setup: SplitSetup) -> SplitSetup:
    """``setup`` checked field by field (one ConfigError naming the first bad field), then a
    co-located and a split network built once so that file-level errors name the setup's field."""
    if not isinstance(setup, SplitSetup):
        raise ConfigError("setup", type(setup).__name__, "must be a SplitSetup")
    _int(setup.gpus, "gpus", 2, MAX_GPUS)
    if not isinstance(setup.batch_time, str):
        raise ConfigError("batch_time", setup.batch_time, "must be a batch-time spec string")
    _as_field("batch_time", parse_batch_time, setup.batch_time)
    parse_size(setup.prefill, "prefill")
    parse_size(setup.decode, "decode")
    if setup.policy not in ("sarathi", "vllm-chunked"):
        raise ConfigError("policy", setup.policy, "choose from sarathi, vllm-chunked (chunked prefill)")
    if not isinstance(setup.colocated_budgets, tuple | list) or not setup.colocated_budgets:
        raise ConfigError("colocated_budgets", setup.colocated_budgets, "must be a non-empty list of budgets")
    for b in setup.colocated_budgets:
        _int(b, "colocated_budgets", 1, MAX_BUDGET_TOKENS)
    if len(set(setup.colocated_budgets)) != len(setup.colocated_budgets):
        raise ConfigError("colocated_budgets", setup.colocated_budgets, "budgets must be distinct")
    _int(setup.prefill_budget, "prefill_budget", 1, MAX_BUDGET_TOKENS)
    _int(setup.decode_budget, "decode_budget", 1, MAX_BUDGET_TOKENS)
    if setup.decode_k_max is not None:
        _int(setup.decode_k_max, "decode_k_max", 1, MAX_BUDGET_TOKENS)
    if not isinstance(setup.transfer, str):
        raise ConfigError("transfer", setup.transfer, "must be a transfer spec string")
    if setup.memory is not None:
        _as_field("memory", parse_memory, setup.memory)
    _int(setup.requests, "requests", 1, MAX_REQUESTS)
    _int(setup.seed, "seed", 0, MAX_SEED)
    _positive(setup.drain_s, "drain_s")
    step = _positive(setup.step, "step")
    if step > 1:
        raise ConfigError("step", setup.step, "must be in (0, 1]: the relative gap between two rates tried")
    for cand in (candidates(setup)[0], candidates(setup)[-1]):
        bound_rate_per_s(cand, setup)  # builds and analyses the network: its errors come now
    return setup


# ---------------------------------------------------------------- candidates and networks


def candidates(setup: SplitSetup) -> list[Candidate]:
    """Co-located at each budget, then every split P:D with P + D = gpus (P = 1 .. gpus - 1)."""
    n = setup.gpus
    out = [Candidate(f"co-located b={b}", "co-located", n, 0, b) for b in setup.colocated_budgets]
    out += [Candidate(f"split {p}:{n - p}", "split", p, n - p, setup.prefill_budget) for p in range(1, n)]
    return out


def network_mapping(cand: Candidate, setup: SplitSetup, rate_per_s: float) -> dict[str, Any]:
    """The network file's content for ``cand`` at ``rate_per_s``: one class, one visit."""
    engine: dict[str, Any] = {"batch_time": setup.batch_time, "policy": setup.policy, "router": "jsq"}
    if setup.memory is not None:
        engine["memory"] = setup.memory
    visit = {"prefill": setup.prefill, "decode": setup.decode, "next": "exit"}
    if cand.kind == "co-located":
        engines = {"gpu": {**engine, "replicas": cand.prefill_gpus, "budget": cand.budget}}
        target: dict[str, Any] = {}
        visit["engine"] = "gpu"
    else:
        decode = {**engine, "replicas": cand.decode_gpus, "budget": setup.decode_budget}
        if setup.decode_k_max is not None:
            decode["k_max"] = setup.decode_k_max
        engines = {"prefill": {**engine, "replicas": cand.prefill_gpus, "budget": cand.budget},
                   "decode": decode}
        target = {"disaggregated": {"pd": {"prefill": "prefill", "decode": "decode",
                                           "transfer": setup.transfer}}}
        visit["engine"] = "pd"
    return {"engines": engines, **target,
            "classes": {CLASS: {"rate": rate_per_s, "start": "ask", "nodes": {"ask": visit}}}}


_FIELDS = {"disaggregated.pd.transfer": "transfer", "engines.gpu.budget": "colocated_budgets",
           "engines.prefill.budget": "prefill_budget", "engines.decode.budget": "decode_budget",
           "engines.decode.k_max": "decode_k_max", "disaggregated.pd.decode": "memory"}


def _network(cand: Candidate, setup: SplitSetup, rate_per_s: float) -> Any:
    """``load_network`` of the candidate's mapping; an error names the setup's field, not the
    file key the mapping happens to use."""
    try:
        return load_network(network_mapping(cand, setup, rate_per_s))
    except ConfigError as err:
        for key, name in _FIELDS.items():
            if err.field.startswith(key):  # e.g. disaggregated.pd.transfer.fixed_ms -> transfer.fixed_ms
                raise ConfigError(name + err.field[len(key):], err.value, err.problem) from None
        for part in ("batch_time", "memory", "prefill", "decode"):
            if err.field.endswith(f".{part}"):
                raise ConfigError(part, err.value, err.problem) from None
        raise


def bound_rate_per_s(cand: Candidate, setup: SplitSetup) -> float:
    """The theory's capacity of ``cand`` (requests/s): the rate at which its most loaded engine or
    link reaches load 1 (``analyze``'s critical scale at 1 request/s)."""
    try:
        return analyze(_network(cand, setup, 1.0)).critical_scale
    except ConfigError as err:
        if err.field.startswith("disaggregated.pd.decode"):
            raise ConfigError("memory", setup.memory, err.problem) from None
        raise


# ---------------------------------------------------------------- runs and the search


def run_at(cand: Candidate, setup: SplitSetup, rate_per_s: float, bound: float) -> RunFigures:
    """One run of ``cand`` at ``rate_per_s`` (seed and requests of ``setup``)."""
    if not 0 < rate_per_s < bound:
        raise ConfigError("rate_per_s", rate_per_s, f"must be in (0, {bound:.6g}): the theory's capacity")
    result = simulate_network(_network(cand, setup, rate_per_s), seed=setup.seed,
                              max_requests=setup.requests, drain_s=setup.drain_s)
    c = result.classes[CLASS]
    latency = {k: v for k, v in c.request_latency.items() if "_e2el_" not in k}
    return RunFigures(rate_per_s, rate_per_s / bound, latency, c.arrivals, c.completed, c.rejected)


def grid_size(step: float) -> int:
    """The grid's last index: ``(1 + step)^-K <= MIN_FRACTION``."""
    return math.ceil(math.log(1.0 / MIN_FRACTION) / math.log1p(step))


def goodput(cand: Candidate, setup: SplitSetup, slo: SplitSLO, cache: RunCache | None = None,
            on_run: Callable[[Candidate, RunFigures], None] | None = None) -> CandidateResult:
    """The largest grid rate at which ``cand`` meets ``slo`` (module docstring): bisection on the
    grid index between the bound (index 0, never run) and ``MIN_FRACTION`` of it."""
    cache = {} if cache is None else cache
    bound = bound_rate_per_s(cand, setup)
    top = grid_size(setup.step)
    points: list[RunFigures] = []
    verdicts: dict[int, tuple[bool, str]] = {}

    def rate(k: int) -> float:
        """The grid's rate at index ``k``."""
        return bound / (1.0 + setup.step) ** k

    def passes(k: int) -> bool:
        key = (cand.name, k)
        if key not in cache:
            cache[key] = run_at(cand, setup, rate(k), bound)
            if on_run is not None:
                on_run(cand, cache[key])
        points.append(cache[key])
        verdicts[k] = cache[key].verdict(slo)
        return verdicts[k][0]

    failing, passing = 0, top + 1  # index 0 fails (the bound); top + 1 stands for "nothing lower"
    while passing - failing > 1:
        mid = (failing + passing) // 2
        if passes(mid):
            passing = mid
        else:
            failing = mid
    reason = verdicts[failing][1] if failing in verdicts else "the next rate up is the theory's capacity"
    if passing > top:
        return CandidateResult(cand, bound, 0.0, rate(top), None, tuple(points), reason)
    met = cache[(cand.name, passing)]
    return CandidateResult(cand, bound, met.rate_per_s, rate(failing), met, tuple(points), reason)


def _best(results: Sequence[CandidateResult]) -> str | None:
    """The candidate with the highest rate met (first listed on ties), None when none passes."""
    best = max(results, key=lambda r: r.rate_met_per_s, default=None)
    return None if best is None or best.rate_met_per_s <= 0 else best.candidate.name


def compare_split(setup: SplitSetup, slo: SplitSLO, *, cache: RunCache | None = None,
                  on_run: Callable[[Candidate, RunFigures], None] | None = None) -> SplitComparison:
    """Every candidate's goodput under ``slo`` and the winner (ties go to the first listed:
    co-located before split)."""
    check_setup(setup)
    check_slo(slo)
    return _compare(setup, slo, {} if cache is None else cache, on_run)


def _compare(setup: SplitSetup, slo: SplitSLO, cache: RunCache,
             on_run: Callable[[Candidate, RunFigures], None] | None) -> SplitComparison:
    """The unchecked core of :func:`compare_split`."""
    results = tuple(goodput(c, setup, slo, cache, on_run) for c in candidates(setup))
    return SplitComparison(
        slo, setup, results, _best(results),
        _best([r for r in results if r.candidate.kind == "co-located"]),
        _best([r for r in results if r.candidate.kind == "split"]))


def split_table(setup: SplitSetup, slos: Sequence[SplitSLO], *,
                on_run: Callable[[Candidate, RunFigures], None] | None = None) -> list[SplitComparison]:
    """:func:`compare_split` for each SLO in turn, sharing the runs (a table over TPOT targets)."""
    check_setup(setup)
    if not isinstance(slos, Sequence) or not slos:
        raise ConfigError("slos", slos, "must be a non-empty list of SplitSLO")
    for slo in slos:
        check_slo(slo)
    cache: RunCache = {}
    return [_compare(setup, slo, cache, on_run) for slo in slos]

