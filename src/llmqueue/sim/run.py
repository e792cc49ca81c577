"""One simulation run: a workload through one engine, with metrics, theory and stability verdicts.

The run hands every arrival to the engine in time order, steps the engine between arrivals, and
stops when everything that arrived is done or at the horizon: the end of the arrivals plus a drain
allowance (default: as long as the arrival window, at least 60 s). No batch starts at or after the
horizon, so an unstable run stops with bounded memory; requests still present are ``incomplete``.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice

import numpy as np

from llmqueue.engines import compiled
from llmqueue.engines.contract import EngineKind, RunKind, SteppedEngine, choose_engine
from llmqueue.engines.fast import FastEngine
from llmqueue.engines.metrics import Recorder, RequestRecord, RunMetrics
from llmqueue.engines.reference import Batch, Engine, PolicyFn
from llmqueue.errors import ConfigError
from llmqueue.limits import (
    MAX_BATCH_REQUESTS,
    MAX_BUDGET_TOKENS,
    MAX_DURATION_S,
    MAX_REQUESTS,
    check_int,
    check_real,
)
from llmqueue.model.batchtime import BatchTime, ShapeTime, as_batch_time, is_shape_model, mix_batch_time
from llmqueue.model.memory import KVCache, as_memory
from llmqueue.model.specs import is_trace_spec, make_workload
from llmqueue.model.workload import Request, TraceArrivals, Workload
from llmqueue.policies.fcfs import KFCFS, VLLMChunked, as_policy
from llmqueue.policies.view import chunks_prefill, is_work_conserving, policy_name
from llmqueue.theory import capacity as theory
from llmqueue.theory.stability import (
    DEFAULT_REPLICATE_REQUESTS,
    DEFAULT_REPLICATES,
    Observation,
    Prediction,
    ReplicatedVerdict,
    _check_alpha,
    observe,
    predict,
    replicated_verdict,
)

MIN_DRAIN_MS = 60_000.0
WARMUP_FRACTION = 0.2
"""The first 20 % of the arrival window is left out of the backlog trend test."""


def horizon_ms(duration_ms: float | None, last_arrival_ms: float, drain_s: float | None) -> float:
    """When a run stops: the end of the arrivals (the duration, else the last arrival) plus the
    drain allowance (``drain_s``, default as long as the arrival window, at least 60 s)."""
    end = duration_ms if duration_ms is not None else last_arrival_ms
    drain = max(end, MIN_DRAIN_MS) if drain_s is None else drain_s * 1000.0
    return end + drain


@dataclass(frozen=True, slots=True)
class TheorySummary:
    """The capacity theory of a setting (§3, §4); rates in requests/s, token rates per second."""

    t_budget_ms: float
    capacity_tokens_per_s: float
    max_capacity_tokens_per_s: float
    best_batch_tokens: int
    critical_rate: float
    load: float
    fluid_slope_tokens_per_s: float
    kmax_load: float | None

    @property
    def load_best_batches(self) -> float:
        """The load against ``max_n n / t(n)``, the bound on any policy."""
        return self.load * self.capacity_tokens_per_s / self.max_capacity_tokens_per_s


def summarize_theory(
    batch_time: BatchTime,
    budget: int,
    k_max: int | None,
    rate_per_s: float,
    mean_prefill_tokens: float,
    mean_decode_tokens: float,
) -> TheorySummary:
    """Capacity, critical rate, load and fluid slope for a setting."""
    mean_tokens = mean_prefill_tokens + mean_decode_tokens
    best_n, best_rate = theory.max_throughput(batch_time, budget)
    capacity = theory.capacity_tokens_per_ms(batch_time, budget) * 1000.0
    if not math.isfinite(rate_per_s):  # e.g. every request arrived at one instant
        return TheorySummary(
            batch_time(budget), capacity, best_rate * 1000.0, best_n,
            capacity / mean_tokens, math.nan, math.nan, None if k_max is None else math.nan,
        )
    kload = None
    if k_max is not None:
        kload = theory.kmax_load(
            rate_per_s * mean_prefill_tokens / 1000.0,
            rate_per_s * mean_decode_tokens / 1000.0,
            batch_time,
            budget,
            k_max,
        )
    return TheorySummary(
        t_budget_ms=batch_time(budget),
        capacity_tokens_per_s=capacity,
        max_capacity_tokens_per_s=best_rate * 1000.0,
        best_batch_tokens=best_n,
        critical_rate=theory.critical_rate_per_s(batch_time, budget, mean_tokens),
        load=theory.load(rate_per_s, batch_time, budget, mean_tokens),
        fluid_slope_tokens_per_s=theory.fluid_slope_tokens_per_s(
            rate_per_s, batch_time, budget, mean_tokens
        ),
        kmax_load=kload,
    )


@dataclass(frozen=True, slots=True)
class RunResult:
    """Everything one run produced: setting, metrics, theory, verdicts and notes."""

    policy: str
    budget: int
    k_max: int | None
    batch_time: str
    rate: float
    seed: int
    metrics: RunMetrics
    theory: TheorySummary
    predicted: Prediction
    observed: Observation
    notes: tuple[str, ...]
    requests: tuple[RequestRecord, ...] | None
    batches: tuple[Batch, ...] | None

    @property
    def steady_state(self) -> bool:
        """False when the run was judged unstable: its latency percentiles depend on its length."""
        return self.observed.verdict != "unstable"

    def to_dict(self) -> dict[str, object]:
        """One flat JSON-ready mapping (NaN stays NaN; the CLI writes it as null)."""
        th = self.theory
        out: dict[str, object] = {
            "policy": self.policy,
            "budget": self.budget,
            "k_max": self.k_max,
            "batch_time": self.batch_time,
            "rate": self.rate,
            "seed": self.seed,
            "load": th.load,
            "critical_rate": th.critical_rate,
            "capacity_tokens_per_s": th.capacity_tokens_per_s,
            "max_capacity_tokens_per_s": th.max_capacity_tokens_per_s,
            "t_budget_ms": th.t_budget_ms,
            "kmax_load": th.kmax_load,
            "fluid_slope_tokens_per_s": th.fluid_slope_tokens_per_s,
            "stable_predicted": self.predicted.verdict,
            "stable_predicted_reason": self.predicted.reason,
            "stable_observed": self.observed.verdict,
            "backlog_slope_tokens_per_s": self.observed.slope_tokens_per_s,
            "backlog_slope_ci_tokens_per_s": [
                self.observed.ci_low_tokens_per_s,
                self.observed.ci_high_tokens_per_s,
            ],
            "latency_steady_state": self.steady_state,
            "wc_violations": self.metrics.wc_violations,
        }
        out.update(self.metrics.as_dict())
        out["notes"] = list(self.notes)
        return out


def simulate(
    source: Workload | Iterable[Request] | str,
    policy: PolicyFn | str,
    batch_time: BatchTime | ShapeTime | str,
    budget: int,
    *,
    k_max: int | None = None,
    seed: int = 0,
    max_requests: int | None = None,
    duration_s: float | None = None,
    drain_s: float | None = None,
    keep_requests: bool = True,
    keep_batches: bool = False,
    progress: Callable[[int], None] | None = None,
    engine: EngineKind = "auto",
    memory: KVCache | str | None = None,
    goodput: Mapping[str, float] | None = None,
    max_concurrency: int | None = None,
) -> RunResult:
    """Run ``source`` (a workload, or requests in arrival order) through one engine.

    Arrivals stop after ``max_requests`` or at ``duration_s``; the run then drains for at most
    ``drain_s`` (default: the arrival window, at least 60 s). ``engine``: ``"fast"`` books runs
    of identical iterations at once (policies declaring ``repeats_plan``), ``"reference"`` steps
    every iteration, ``"auto"`` takes the fast engine whenever the policy allows it. Both give
    the same results. ``keep_requests``: return every request's record in ``RunResult.requests``
    (the metrics are computed either way). ``memory``: the engine's KV cache (admission and
    recompute preemption, see ``llmqueue.model.memory``); None means unlimited, as in the paper.
    A composition-aware ``batch_time`` (a shape model) times every batch from its shape.

    ``goodput``: targets ``{ttft|tpot|e2el: ms}``; ``metrics.request_goodput`` is then the rate of
    completed requests meeting all of them (``vllm bench serve --goodput``). ``max_concurrency``:
    at most this many requests in the engine; later arrivals wait at the client, in order, and
    are sent when one finishes (``vllm bench serve --max-concurrency``; latencies count from
    the send, as there). It runs on the Python engines.

    ``source`` may be a trace spec ``trace:PATH`` (replayed at its own rate), ``policy`` a shipped
    policy's name, ``batch_time`` and ``memory`` their spec text. Bad arguments raise ConfigError.
    """
    a = _checked(source, policy, batch_time, budget, k_max, max_requests, duration_s, drain_s, engine,
                 memory, keep_batches, max_concurrency)
    recorder = Recorder(keep_requests=keep_requests, goodput=goodput)
    tally = _Tally(a.budget, chunks_prefill(a.policy) is False)
    outcome, batches, gate = _drive(a, seed, recorder, tally, progress, keep_requests, keep_batches)
    end_ms = outcome.end_ms
    if outcome.blocked_since_ms is not None:
        recorder.stall(end_ms - outcome.blocked_since_ms)
    if tally.count_n == 0 and not isinstance(a.source, Workload):
        raise ConfigError("source", "no requests", "holds no request: give at least one Request")
    metrics = recorder.finish(end_ms)

    notes: list[str] = []
    rate, mean_p, mean_d = _offered(a.source, tally, notes)
    token_time = mix_batch_time(a.batch_time, mean_p, mean_d)
    # with max_concurrency no batch holds more requests than that: the §4 limit of the theory
    k_theory = a.k_max if a.max_concurrency is None else min(a.k_max or a.max_concurrency,
                                                               a.max_concurrency)
    summary = summarize_theory(token_time, a.budget, k_theory, rate, mean_p, mean_d)
    memory_load = None
    if a.memory is not None and math.isfinite(rate) and mean_p + mean_d > 0:
        memory_load, _ = theory.memory_load(rate, mean_p, mean_d, token_time, a.budget, k_theory, a.memory)
    declared = is_work_conserving(a.policy)
    prediction = predict(
        work_conserving=_audited(declared, a, metrics, notes),
        load_full_batches=summary.load,
        load_best_batches=summary.load_best_batches,
        kmax_load=summary.kmax_load,
        memory_load=memory_load,
    )
    arrival_end_ms = a.duration_ms if a.duration_ms is not None else recorder.totals.last_arrival_ms
    observation = observe_run(recorder, arrival_end_ms, end_ms)
    notes.extend(_run_notes(a, engine, declared, outcome, metrics, observation, tally, token_time, gate))

    records = None
    if keep_requests:
        done = list(recorder.completed_records())
        records = tuple(sorted(done + list(outcome.pending), key=lambda r: r.id))
    return RunResult(
        policy=policy_name(a.policy),
        budget=a.budget,
        k_max=a.k_max,
        batch_time=getattr(a.batch_time, "spec", repr(a.batch_time)),
        rate=rate,
        seed=seed,
        metrics=metrics,
        theory=summary,
        predicted=prediction,
        observed=observation,
        notes=tuple(notes),
        requests=records,
        batches=batches,
    )


@dataclass(frozen=True, slots=True)
class _Args:
    """:func:`simulate`'s arguments, checked and resolved (names and specs made objects), and the
    engine that runs them."""

    source: Workload | Iterable[Request]
    policy: PolicyFn
    batch_time: BatchTime | ShapeTime
    budget: int
    k_max: int | None
    max_requests: int | None
    duration_ms: float | None
    drain_s: float | None
    memory: KVCache | None
    max_concurrency: int | None
    kind: RunKind


def _checked(source: object, policy: object, batch_time: object, budget: object, k_max: object,
             max_requests: object, duration_s: object, drain_s: object, engine: str, memory: object,
             keep_batches: bool, max_concurrency: object) -> _Args:
    """Check every argument of :func:`simulate` (ConfigError naming the first bad one) and choose
    the engine, before anything runs."""
    source = _as_source(source)
    policy = as_policy(policy)
    batch_time = as_batch_time(batch_time)
    memory = as_memory(memory)
    budget = check_int("budget", budget, 1, MAX_BUDGET_TOKENS)
    if k_max is not None:
        k_max = check_int("k_max", k_max, 1, MAX_BATCH_REQUESTS)
    if max_concurrency is not None:
        max_concurrency = check_int("max_concurrency", max_concurrency, 1, MAX_BATCH_REQUESTS)
    if memory is not None and not isinstance(memory, KVCache):
        raise ConfigError("memory", memory, "must be a KVCache (see llmqueue.model.memory.parse_memory)")
    kind = choose_engine(engine, policy, batch_time, budget, memory=memory, keep_batches=keep_batches,
                         max_concurrency=max_concurrency)
    if max_requests is not None and (not isinstance(max_requests, int) or isinstance(max_requests, bool)
                                     or not 1 <= max_requests <= MAX_REQUESTS):
        raise ConfigError("requests", max_requests, f"must be an integer from 1 to {MAX_REQUESTS:,}")
    if duration_s is not None:
        duration_s = check_real("duration_s", duration_s, 0.0, MAX_DURATION_S, low_open=True)
    if drain_s is not None:
        drain_s = check_real("drain_s", drain_s, 0.0, MAX_DURATION_S)
    synthetic = isinstance(source, Workload) and not isinstance(source.arrival, TraceArrivals)
    if (synthetic and max_requests is None and duration_s is not None
            and source.rate_per_s * duration_s > MAX_REQUESTS):
        raise ConfigError("duration_s", duration_s, f"at {source.rate_per_s:g} requests/s it brings "
                          f"about {source.rate_per_s * duration_s:.3g} arrivals, more than {MAX_REQUESTS:,}")
    if synthetic and max_requests is None and duration_s is None:
        raise ConfigError("requests", None, "give a number of requests or a duration")
    duration_ms = None if duration_s is None else duration_s * 1000.0
    return _Args(source, policy, batch_time, budget, k_max, max_requests, duration_ms, drain_s, memory,
                 max_concurrency, kind)


def _drive(
    a: _Args, seed: int, recorder: Recorder, tally: _Tally, progress: Callable[[int], None] | None,
    keep_requests: bool, keep_batches: bool,
) -> tuple[compiled.Outcome, tuple[Batch, ...] | None, _Gate | None]:
    """Run the arrivals through the chosen engine: (its outcome, the batch log if kept, the client
    gate of a closed loop)."""
    source = a.source

    def horizon_for(last_arrival_ms: float) -> float:
        return horizon_ms(a.duration_ms, last_arrival_ms, a.drain_s)

    if a.kind == "compiled":
        if isinstance(source, Workload):
            chunks = source.chunks(seed, max_requests=a.max_requests, duration_ms=a.duration_ms)
        else:
            chunks = _chunked(_bounded(iter(source), a.max_requests, a.duration_ms), a.memory is not None)
        assert isinstance(a.policy, KFCFS | VLLMChunked)
        outcome = compiled.run(
            tally.count(chunks), a.policy, a.batch_time, a.budget, a.k_max, recorder, horizon_for,
            progress, keep_pending=keep_requests, memory=a.memory,
        )
        return outcome, None, None
    if isinstance(source, Workload):
        arrivals: Iterator[Request] = source.requests(
            seed, max_requests=a.max_requests, duration_ms=a.duration_ms
        )
    else:
        arrivals = _bounded(iter(source), a.max_requests, a.duration_ms)
    engine_class = FastEngine if a.kind == "fast" else Engine
    gate = None if a.max_concurrency is None else _Gate(a.max_concurrency, recorder, a.memory)
    eng = engine_class(
        a.policy, a.batch_time, a.budget, a.k_max, recorder=recorder if gate is None else _SentOnly(recorder),
        keep_batches=keep_batches, memory=a.memory,
    )
    outcome = _run_engine(eng, tally.each(arrivals), recorder, horizon_for, progress, keep_requests, gate)
    return outcome, None if eng.batches is None else tuple(eng.batches), gate


def _offered(source: Workload | Iterable[Request], tally: _Tally,
             notes: list[str]) -> tuple[float, float, float]:
    """(rate, mean prompt, mean output) of what was simulated: a synthetic workload's own, else a
    trace window's or a request list's as counted (with notes when a window is not representative)."""
    if isinstance(source, Workload) and not isinstance(source.arrival, TraceArrivals):
        return source.rate_per_s, source.mean_prefill_tokens, source.mean_decode_tokens
    arrivals_n = max(tally.count_n, 1)
    rate = tally.rate_per_s()
    mean_p, mean_d = tally.prefill_sum / arrivals_n, tally.decode_sum / arrivals_n
    if isinstance(source, Workload) and tally.count_n > 1:
        notes.extend(_window_notes(source, rate, mean_p, mean_d, tally.count_n))
    return rate, mean_p, mean_d


def _audited(declared: bool | None, a: _Args, metrics: RunMetrics, notes: list[str]) -> bool | None:
    """The policy's work-conservation claim after the audit: a work-conserving policy never leaves
    fillable tokens unfilled (without a cache, whose refusals the audit counts as unfilled too), so
    violations override a declaration, loudly."""
    if not (declared and a.memory is None and metrics.wc_violations > 0):
        return declared
    notes.append(
        f"WARNING: policy '{policy_name(a.policy)}' declares work_conserving, but "
        f"{metrics.wc_violations:,} of its batches left fillable tokens unfilled "
        f"({metrics.wc_wasted_fraction:.1%} of fillable tokens): the declaration is false, so "
        "no stability guarantee is claimed"
    )
    return False


def _run_notes(
    a: _Args, engine: str, declared: bool | None, outcome: compiled.Outcome, metrics: RunMetrics,
    observation: Observation, tally: _Tally, token_time: BatchTime, gate: _Gate | None,
) -> list[str]:
    """What a reader of the run's numbers must know: the client gate, requests that can never be
    served, stalls, model views, refusals, preemptions, the engine used, missing declarations,
    growth and unfinished requests."""
    notes: list[str] = []
    if gate is not None:
        notes.append(
            f"closed loop: at most {a.max_concurrency} request(s) in the engine, later arrivals wait "
            f"at the client (at most {gate.max_waiting} waited at once); latencies count from the "
            "send, as vllm bench serve measures them; the backlog includes the client's queue"
        )
    if tally.unservable:
        notes.append(
            f"{tally.unservable} request(s) have more prefill tokens than the budget {a.budget} and "
            f"policy '{policy_name(a.policy)}' never chunks prompts: they can never be served"
        )
    if outcome.blocked_since_ms is not None and outcome.in_system:
        notes.append(
            f"the engine stalled: {outcome.in_system} request(s) wait but the policy forms no batch"
        )
    if is_shape_model(a.batch_time):
        notes.append(
            "composition-aware batch time: the theory uses its token view for this workload's "
            f"mix ({token_time.spec})"
        )
    if a.memory is not None and metrics.rejected_requests:
        notes.append(
            f"{metrics.rejected_requests} request(s) refused at arrival: their KV cache can never "
            f"fit in {a.memory.capacity_tokens} tokens"
        )
    if metrics.preemptions:
        notes.append(
            f"memory preempted requests {metrics.preemptions} time(s), "
            f"{metrics.recomputed_tokens} tokens recomputed"
        )
    if engine == "auto" and a.kind == "reference":
        notes.append(
            "the policy does not declare repeats_plan: it ran on the reference per-iteration "
            "engine (exact, slower)"
        )
    if declared is None:
        notes.append("the policy does not declare work_conserving: no stability guarantee claimed")
    if observation.verdict == "unstable":
        notes.append("backlog grows: latency percentiles are not steady-state values")
    if outcome.cut and metrics.incomplete:
        notes.append(
            f"stopped at the horizon {outcome.end_ms / 1000:.1f} s with {metrics.incomplete} request(s) "
            "unfinished"
        )
    return notes


def _as_source(source: object) -> Workload | Iterable[Request]:
    """A workload, requests in arrival order, or a trace spec ``trace:PATH`` (replayed at its
    own rate); ConfigError for anything else."""
    if isinstance(source, Workload):
        return source
    if isinstance(source, str):
        if is_trace_spec(source):
            return make_workload(source, None, None, None)
        raise ConfigError("source", source, "a text source must be a trace spec 'trace:PATH'; build "
                          "other workloads with llmqueue.make_workload")
    if isinstance(source, bytes | dict) or not isinstance(source, Iterable):
        raise ConfigError("source", type(source).__name__, "must be a Workload, requests in arrival "
                          "order (llmqueue.fixed_requests), or a trace spec 'trace:PATH'")
    return source


def observe_run(recorder: Recorder, arrival_end_ms: float, end_ms: float) -> Observation:
    """The backlog trend test of a recorded run, over the arrival window (to ``arrival_end_ms``,
    at most ``end_ms``) less its first ``WARMUP_FRACTION``, against the offered token rate."""
    window_end = min(arrival_end_ms, end_ms)
    offered = recorder.totals.arrived_tokens / (window_end / 1000.0) if window_end > 0 else 0.0
    return observe(recorder.backlog_bins, WARMUP_FRACTION * window_end, window_end, offered)


class _Tally:
    """Counts what arrived: how many, when (first and last), token sums, and prompts that a
    never-chunking policy cannot serve."""

    def __init__(self, budget: int, never_chunks: bool) -> None:
        self.budget = budget
        self.never_chunks = never_chunks
        self.unservable = 0
        self.prefill_sum = 0
        self.decode_sum = 0
        self.count_n = 0
        self.first_ms = math.nan
        self.last_ms = math.nan

    def rate_per_s(self) -> float:
        """The arrivals' mean rate, (N - 1) / span as for a trace (NaN without a span)."""
        span_s = (self.last_ms - self.first_ms) / 1000.0
        return (self.count_n - 1) / span_s if self.count_n > 1 and span_s > 0 else math.nan

    def each(self, requests: Iterator[Request]) -> Iterator[Request]:
        for r in requests:
            if self.never_chunks and r.prefill_tokens > self.budget:
                self.unservable += 1
            self.prefill_sum += r.prefill_tokens
            self.decode_sum += r.decode_tokens
            if not self.count_n:
                self.first_ms = r.arrival_ms
            self.count_n += 1
            self.last_ms = r.arrival_ms
            yield r

    def count(self, chunks: Iterable[compiled.Chunk]) -> Iterator[compiled.Chunk]:
        for chunk in chunks:
            _, times, prefill, decode = chunk
            if self.never_chunks:
                self.unservable += int(np.count_nonzero(prefill > self.budget))
            self.prefill_sum += int(prefill.sum())
            self.decode_sum += int(decode.sum())
            if len(times):
                if not self.count_n:
                    self.first_ms = float(times[0])
                self.count_n += len(times)
                self.last_ms = float(times[-1])
            yield chunk


WINDOW_TOLERANCE = 0.05
"""A replayed window whose rate or mean sizes differ from the whole trace's by more than this
(relative) is flagged as not representative of the trace."""


WINDOW_COMPARE_BYTES = 64 << 20
"""A partial replay of a trace file up to this size is compared with the whole trace (one more
streaming pass, about a second); a longer one is not read past what the run used."""


def _cheap_to_read(path: str) -> bool:
    """Whether a trace file is small enough to read whole for a note."""
    try:
        return os.path.getsize(path) <= WINDOW_COMPARE_BYTES
    except OSError:
        return False


def _window_notes(workload: Workload, rate: float, mean_p: float, mean_d: float, n: int) -> list[str]:
    """Say what was simulated when a replay used part of a trace, and flag a window whose rate or
    sizes are not the trace's (the theory above is for what was simulated)."""
    arrival = workload.arrival
    assert isinstance(arrival, TraceArrivals)
    known = arrival.whole_if_known()
    if known is None and _cheap_to_read(arrival.path):
        try:  # one streaming pass over a trace of moderate size
            known = (len(arrival), arrival.offered())
        except ConfigError:  # a bad row past what the run read: the run itself is fine
            known = None
    if known is None:
        return [f"simulated the first {n:,} requests of a long trace at {rate:.4g} req/s, {mean_p:,.1f} "
                f"+ {mean_d:,.1f} tokens (rate, load and theory are for them); the rest was not read, "
                "so this window is not compared with the whole trace (llmqueue trace stats does)"]
    total, offered = known
    if n >= total:
        return []
    whole = (offered.rate_per_s, workload.mean_prefill_tokens if workload.prefill is not None
             else offered.mean_prefill_tokens,
             workload.mean_decode_tokens if workload.decode is not None else offered.mean_decode_tokens)
    part = (rate, mean_p, mean_d)
    scaled = arrival.scale_to_rate_per_s is not None  # the user set the rate: only sizes compare
    whole_rate = "its rate rescaled" if scaled else f"{whole[0]:.4g} req/s"
    note = (f"simulated the first {n:,} of the trace's {total:,} requests: {rate:.4g} req/s, "
            f"{mean_p:,.1f} + {mean_d:,.1f} tokens (the whole trace: {whole_rate}, "
            f"{whole[1]:,.1f} + {whole[2]:,.1f}); rate, load and theory are for what was simulated")
    names = ("rate", "prompt size", "output size")
    off = [name for name, a, b in zip(names, part, whole, strict=True)
           if not (scaled and name == "rate") and math.isfinite(a) and b > 0
           and abs(a - b) > WINDOW_TOLERANCE * b]
    if off:
        note += (f"; WARNING: this window is not representative of the trace ({', '.join(off)} "
                 f"{'differs' if len(off) == 1 else 'differ'} by more than {WINDOW_TOLERANCE:.0%}): "
                 "replay more of it or a window chosen with llmqueue trace stats --busiest")
    return [note]


def _run_engine(
    eng: SteppedEngine,
    arrivals: Iterator[Request],
    recorder: Recorder,
    horizon_for: Callable[[float], float],
    progress: Callable[[int], None] | None,
    keep_pending: bool,
    gate: _Gate | None = None,
) -> compiled.Outcome:
    """The event loop over a Python engine: submit arrivals in time order, step between them.

    With a ``gate`` (max_concurrency), an arrival waits at the client until the engine holds
    fewer than its limit, and is sent (submitted) then, at the engine's clock."""
    nxt = next(arrivals, None)
    horizon = math.inf
    steps = 0
    while True:
        t = eng.next_event_ms()
        if nxt is not None and nxt.arrival_ms <= t:
            if gate is None:
                eng.submit(nxt)
            else:
                gate.arrive(nxt)
                gate.send(eng, nxt.arrival_ms)
            nxt = next(arrivals, None)
            if nxt is None:  # arrivals are over: the drain allowance starts
                horizon = horizon_for(recorder.totals.last_arrival_ms)
            continue
        if t >= horizon or (nxt is None and math.isinf(t)):
            break
        eng.step()
        if gate is not None:
            gate.send(eng, eng.now_ms)
        steps += 1
        if progress is not None and steps % 4096 == 0:
            progress(recorder.totals.arrivals)
    if progress is not None:
        progress(recorder.totals.arrivals)
    cut = math.isfinite(eng.next_event_ms()) and eng.next_event_ms() >= horizon
    if cut:
        eng.stop(horizon)
        recorder.cut(horizon, eng.next_event_ms())  # the running batch's end: busy only to the horizon
    waiting = () if gate is None or not keep_pending else gate.pending()
    return compiled.Outcome(
        end_ms=horizon if cut else max(eng.now_ms, recorder.totals.last_arrival_ms),
        cut=cut,
        blocked_since_ms=eng.blocked_since_ms,
        in_system=eng.in_system + (0 if gate is None else len(gate.queue)),
        pending=(tuple(job.record() for job in eng.jobs()) + waiting) if keep_pending else (),
    )


class _SentOnly:
    """The recorder as a gated engine sees it: arrivals were recorded at the client already."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder

    def arrival(self, t_ms: float, tokens: int) -> None:
        """Recorded when the request reached the client (it waits there in the backlog)."""

    def __getattr__(self, name: str) -> object:
        return getattr(self._recorder, name)


class _Gate:
    """The client side of ``max_concurrency`` (``vllm bench serve --max-concurrency``): arrivals
    queue in order and are sent while the engine holds fewer than ``limit`` requests. The recorder
    counts a request (its backlog, its place in the system) from its arrival at the client; its
    latencies count from the send, as vLLM's client measures them."""

    def __init__(self, limit: int, recorder: Recorder, memory: KVCache | None) -> None:
        self.limit = limit
        self.recorder = recorder
        self.memory = memory
        self.queue: deque[Request] = deque()
        self.max_waiting = 0

    def arrive(self, request: Request) -> None:
        tokens = request.prefill_tokens + request.decode_tokens
        if self.memory is not None and not self.memory.fits_alone(tokens):
            self.recorder.rejected()  # refused on sending, as the engine refuses it
            return
        self.recorder.arrival(request.arrival_ms, tokens)
        self.queue.append(request)
        self.max_waiting = max(self.max_waiting, len(self.queue))

    def send(self, eng: SteppedEngine, t_ms: float) -> None:
        while self.queue and eng.in_system < self.limit:
            r = self.queue.popleft()
            eng.submit(Request(r.id, max(t_ms, r.arrival_ms, eng.now_ms), r.prefill_tokens, r.decode_tokens))

    def pending(self) -> tuple[RequestRecord, ...]:
        """Records of the requests still waiting at the client (never sent)."""
        return tuple(RequestRecord(r.id, r.arrival_ms, math.nan, math.nan, r.prefill_tokens,
                                   r.decode_tokens) for r in self.queue)


def _chunked(requests: Iterator[Request], cached: bool = False,
             size: int = 4096) -> Iterator[compiled.Chunk]:
    """Requests as numpy chunks (ids, arrival_ms, prefill, decode). ``cached``: the engine has a KV
    cache, where a request's ``context_tokens`` matter and the compiled loop does not model them
    (refused; without a cache they change nothing)."""
    while True:
        block = list(islice(requests, size))
        if not block:
            return
        if cached and any(r.context_tokens for r in block):
            first = next(r for r in block if r.context_tokens)
            raise ConfigError(f"request.{first.id}.context_tokens", first.context_tokens,
                              "the compiled loop does not model context KV with a cache: use engine 'fast'")
        yield (
            np.fromiter((r.id for r in block), np.int64, len(block)),
            np.fromiter((r.arrival_ms for r in block), np.float64, len(block)),
            np.fromiter((r.prefill_tokens for r in block), np.int64, len(block)),
            np.fromiter((r.decode_tokens for r in block), np.int64, len(block)),
        )


def _bounded(
    requests: Iterator[Request], max_requests: int | None, duration_ms: float | None
) -> Iterator[Request]:
    """Requests in arrival order, cut at ``max_requests`` or ``duration_ms``."""
    last = -math.inf
    for i, request in enumerate(requests):
        if not isinstance(request, Request):
            raise ConfigError("source", request, "must yield llmqueue.Request records in arrival order "
                              "(llmqueue.fixed_requests builds them from tuples)")
        if max_requests is not None and i >= max_requests:
            return
        if duration_ms is not None and request.arrival_ms >= duration_ms:
            return
        if request.arrival_ms < last:
            raise ConfigError("arrival_ms", request.arrival_ms, "requests must come in time order")
        last = request.arrival_ms
        yield request


def check_instability(
    workload: Workload,
    policy: PolicyFn,
    batch_time: BatchTime,
    budget: int,
    *,
    k_max: int | None = None,
    replicates: int = DEFAULT_REPLICATES,
    max_requests: int = DEFAULT_REPLICATE_REQUESTS,
    alpha: float = 0.05,
    first_seed: int = 0,
) -> ReplicatedVerdict:
    """Run ``replicates`` independent runs (seeds first_seed .. first_seed + R - 1) and test them.

    See :func:`llmqueue.theory.stability.replicated_verdict`. The default run length (5000
    requests) is the one calibrated in docs/stability.md ("Calibrated instability test"); shorter
    runs raise the false-alarm rate near load 1 (the warm-up's rise biases the slope upwards).
    """
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 2:
        raise ConfigError("replicates", replicates, "need an integer >= 2 independent replicates")
    _check_alpha(alpha)
    if isinstance(first_seed, bool) or not isinstance(first_seed, int) or first_seed < 0:
        raise ConfigError("first_seed", first_seed, "must be a non-negative integer")
    runs = [
        simulate(workload, policy, batch_time, budget, k_max=k_max, seed=first_seed + i,
                 max_requests=max_requests, keep_requests=False)
        for i in range(replicates)
    ]
    return replicated_verdict(runs, alpha=alpha)
