"""One simulation run: a workload through one engine, with metrics, theory and stability verdicts.

The run hands every arrival to the engine in time order, steps the engine between arrivals, and
stops when everything that arrived is done or at the horizon: the end of the arrivals plus a drain
allowance (default: as long as the arrival window, at least 60 s). No batch starts at or after the
horizon, so an unstable run stops with bounded memory; requests still present are ``incomplete``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Literal

import numpy as np

from llmqueue import compiled, theory
from llmqueue.batchtime import BatchTime, ShapeTime, is_shape_model, mix_batch_time
from llmqueue.engine import Batch, Engine, PolicyFn
from llmqueue.errors import ConfigError
from llmqueue.fastengine import FastEngine, needs_reference
from llmqueue.memory import KVCache
from llmqueue.metrics import Recorder, RequestRecord, RunMetrics
from llmqueue.policies import KFCFS, VLLMChunked, chunks_prefill, is_work_conserving, policy_name
from llmqueue.stability import Observation, Prediction, observe, predict
from llmqueue.workload import Request, TraceArrivals, Workload

EngineKind = Literal["auto", "compiled", "fast", "reference"]
ENGINES = ("auto", "compiled", "fast", "reference")
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
    source: Workload | Iterable[Request],
    policy: PolicyFn,
    batch_time: BatchTime | ShapeTime,
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
    memory: KVCache | None = None,
) -> RunResult:
    """Run ``source`` (a workload, or requests in arrival order) through one engine.

    Arrivals stop after ``max_requests`` or at ``duration_s``; the run then drains for at most
    ``drain_s`` (default: the arrival window, at least 60 s). ``engine``: ``"fast"`` books runs
    of identical iterations at once (policies declaring ``repeats_plan``), ``"reference"`` steps
    every iteration, ``"auto"`` takes the fast engine whenever the policy allows it. Both give
    the same results. ``keep_requests``: return every request's record in ``RunResult.requests``
    (the metrics are computed either way). ``memory``: the engine's KV cache (admission and
    recompute preemption, see ``llmqueue.memory``); None means unlimited, as in the paper.
    A composition-aware ``batch_time`` (a shape model) times every batch from its shape.
    """
    if engine not in ENGINES:
        raise ConfigError("engine", engine, f"must be one of {', '.join(ENGINES)}")
    if engine in ("fast", "compiled") and needs_reference(policy):
        raise ConfigError(
            "engine", engine, f"policy '{policy_name(policy)}' does not declare repeats_plan"
        )
    if memory is not None and not isinstance(memory, KVCache):
        raise ConfigError("memory", memory, "must be a KVCache (see llmqueue.memory.parse_memory)")
    shaped = is_shape_model(batch_time)
    if engine == "compiled" and shaped:
        raise ConfigError(
            "engine", engine, "a composition-aware batch time runs on the fast and reference engines only"
        )
    can_compile = not shaped and compiled.supports(policy, budget, keep_batches)
    if engine == "compiled" and not can_compile:
        raise ConfigError(
            "engine", engine,
            "needs numba (pip install 'llmqueue[fast]'), a shipped policy, a budget <= "
            f"{compiled.MAX_BUDGET} and keep_batches off",
        )
    use_compiled = can_compile and engine in ("auto", "compiled")
    use_fast = engine == "fast" or (
        engine == "auto" and not needs_reference(policy)
    )
    if max_requests is not None and (not isinstance(max_requests, int) or max_requests < 1):
        raise ConfigError("requests", max_requests, "must be an integer >= 1")
    if duration_s is not None and not (duration_s > 0 and math.isfinite(duration_s)):
        raise ConfigError("duration_s", duration_s, "must be a positive number of seconds")
    if drain_s is not None and not (drain_s >= 0 and math.isfinite(drain_s)):
        raise ConfigError("drain_s", drain_s, "must be >= 0 seconds")
    duration_ms = None if duration_s is None else duration_s * 1000.0
    unbounded = max_requests is None and duration_ms is None
    if isinstance(source, Workload) and unbounded and not isinstance(source.arrival, TraceArrivals):
        raise ConfigError("requests", None, "give a number of requests or a duration")

    def horizon_for(last_arrival_ms: float) -> float:
        return horizon_ms(duration_ms, last_arrival_ms, drain_s)

    recorder = Recorder(keep_requests=keep_requests)
    tally = _Tally(budget, chunks_prefill(policy) is False)
    if use_compiled:
        if isinstance(source, Workload):
            chunks = source.chunks(seed, max_requests=max_requests, duration_ms=duration_ms)
        else:
            chunks = _chunked(_bounded(iter(source), max_requests, duration_ms))
        assert isinstance(policy, KFCFS | VLLMChunked)
        outcome = compiled.run(
            tally.count(chunks), policy, batch_time, budget, k_max, recorder, horizon_for,
            progress, keep_pending=keep_requests, memory=memory,
        )
        batches = None
    else:
        if isinstance(source, Workload):
            arrivals: Iterator[Request] = source.requests(
                seed, max_requests=max_requests, duration_ms=duration_ms
            )
        else:
            arrivals = _bounded(iter(source), max_requests, duration_ms)
        engine_class = FastEngine if use_fast else Engine
        eng = engine_class(
            policy, batch_time, budget, k_max, recorder=recorder, keep_batches=keep_batches,
            memory=memory,
        )
        outcome = _run_engine(eng, tally.each(arrivals), recorder, horizon_for, progress, keep_requests)
        batches = None if eng.batches is None else tuple(eng.batches)
    end_ms = outcome.end_ms
    cut = outcome.cut
    if outcome.blocked_since_ms is not None:
        recorder.stall(end_ms - outcome.blocked_since_ms)
    metrics = recorder.finish(end_ms)
    unservable, prefill_sum, decode_sum = tally.unservable, tally.prefill_sum, tally.decode_sum

    def arrival_end_ms() -> float:
        return duration_ms if duration_ms is not None else recorder.last_arrival_ms

    arrivals_n = max(recorder.arrivals, 1)
    if isinstance(source, Workload):
        rate = source.rate_per_s
        mean_p, mean_d = source.mean_prefill_tokens, source.mean_decode_tokens
    else:
        last_s = recorder.last_arrival_ms / 1000.0
        rate = recorder.arrivals / last_s if last_s > 0 else math.nan
        mean_p, mean_d = prefill_sum / arrivals_n, decode_sum / arrivals_n
    token_time = mix_batch_time(batch_time, mean_p, mean_d)
    summary = summarize_theory(token_time, budget, k_max, rate, mean_p, mean_d)
    memory_load = None
    if memory is not None and math.isfinite(rate) and mean_p + mean_d > 0:
        memory_load, _ = theory.memory_load(rate, mean_p, mean_d, token_time, budget, k_max, memory)
    prediction = predict(
        work_conserving=is_work_conserving(policy),
        load_full_batches=summary.load,
        load_best_batches=summary.load_best_batches,
        kmax_load=summary.kmax_load,
        memory_load=memory_load,
    )
    observation = observe_run(recorder, arrival_end_ms(), end_ms)

    notes: list[str] = []
    if unservable:
        notes.append(
            f"{unservable} request(s) have more prefill tokens than the budget {budget} and "
            f"policy '{policy_name(policy)}' never chunks prompts: they can never be served"
        )
    if outcome.blocked_since_ms is not None and outcome.in_system:
        notes.append(
            f"the engine stalled: {outcome.in_system} request(s) wait but the policy forms no batch"
        )
    if shaped:
        notes.append(
            "composition-aware batch time: the theory uses its token view for this workload's "
            f"mix ({token_time.spec})"
        )
    if memory is not None and metrics.rejected_requests:
        notes.append(
            f"{metrics.rejected_requests} request(s) refused at arrival: their KV cache can never "
            f"fit in {memory.capacity_tokens} tokens"
        )
    if metrics.preemptions:
        notes.append(
            f"memory preempted requests {metrics.preemptions} time(s), "
            f"{metrics.recomputed_tokens} tokens recomputed"
        )
    if engine == "auto" and not use_fast:
        notes.append(
            "the policy does not declare repeats_plan: it ran on the reference per-iteration "
            "engine (exact, slower)"
        )
    if is_work_conserving(policy) is None:
        notes.append("the policy does not declare work_conserving: no stability guarantee claimed")
    if observation.verdict == "unstable":
        notes.append("backlog grows: latency percentiles are not steady-state values")
    if cut and metrics.incomplete:
        notes.append(
            f"stopped at the horizon {end_ms / 1000:.1f} s with {metrics.incomplete} request(s) "
            "unfinished"
        )

    records = None
    if keep_requests:
        done = list(recorder.completed_records())
        records = tuple(sorted(done + list(outcome.pending), key=lambda r: r.id))
    return RunResult(
        policy=policy_name(policy),
        budget=budget,
        k_max=k_max,
        batch_time=getattr(batch_time, "spec", repr(batch_time)),
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


def observe_run(recorder: Recorder, arrival_end_ms: float, end_ms: float) -> Observation:
    """The backlog trend test of a recorded run, over the arrival window (to ``arrival_end_ms``,
    at most ``end_ms``) less its first ``WARMUP_FRACTION``, against the offered token rate."""
    window_end = min(arrival_end_ms, end_ms)
    offered = recorder.arrived_tokens / (window_end / 1000.0) if window_end > 0 else 0.0
    return observe(recorder.backlog_bins, WARMUP_FRACTION * window_end, window_end, offered)


class _Tally:
    """Counts what arrived: token sums and prompts that a never-chunking policy cannot serve."""

    def __init__(self, budget: int, never_chunks: bool) -> None:
        self.budget = budget
        self.never_chunks = never_chunks
        self.unservable = 0
        self.prefill_sum = 0
        self.decode_sum = 0

    def each(self, requests: Iterator[Request]) -> Iterator[Request]:
        for r in requests:
            if self.never_chunks and r.prefill_tokens > self.budget:
                self.unservable += 1
            self.prefill_sum += r.prefill_tokens
            self.decode_sum += r.decode_tokens
            yield r

    def count(self, chunks: Iterable[compiled.Chunk]) -> Iterator[compiled.Chunk]:
        for chunk in chunks:
            _, _, prefill, decode = chunk
            if self.never_chunks:
                self.unservable += int(np.count_nonzero(prefill > self.budget))
            self.prefill_sum += int(prefill.sum())
            self.decode_sum += int(decode.sum())
            yield chunk


def _run_engine(
    eng: Engine,
    arrivals: Iterator[Request],
    recorder: Recorder,
    horizon_for: Callable[[float], float],
    progress: Callable[[int], None] | None,
    keep_pending: bool,
) -> compiled.Outcome:
    """The event loop over a Python engine: submit arrivals in time order, step between them."""
    nxt = next(arrivals, None)
    horizon = math.inf
    steps = 0
    while True:
        t = eng.next_event_ms()
        if nxt is not None and nxt.arrival_ms <= t:
            eng.submit(nxt)
            nxt = next(arrivals, None)
            if nxt is None:  # arrivals are over: the drain allowance starts
                horizon = horizon_for(recorder.last_arrival_ms)
            continue
        if t >= horizon or (nxt is None and math.isinf(t)):
            break
        eng.step()
        steps += 1
        if progress is not None and steps % 4096 == 0:
            progress(recorder.arrivals)
    if progress is not None:
        progress(recorder.arrivals)
    cut = math.isfinite(eng.next_event_ms()) and eng.next_event_ms() >= horizon
    if cut:
        eng.stop(horizon)
    return compiled.Outcome(
        end_ms=horizon if cut else max(eng.now_ms, recorder.last_arrival_ms),
        cut=cut,
        blocked_since_ms=eng.blocked_since_ms,
        in_system=eng.in_system,
        pending=tuple(job.record() for job in eng.jobs()) if keep_pending else (),
    )


def _chunked(requests: Iterator[Request], size: int = 4096) -> Iterator[compiled.Chunk]:
    """Requests as numpy chunks (ids, arrival_ms, prefill, decode)."""
    while True:
        block = list(islice(requests, size))
        if not block:
            return
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
        if max_requests is not None and i >= max_requests:
            return
        if duration_ms is not None and request.arrival_ms >= duration_ms:
            return
        if request.arrival_ms < last:
            raise ConfigError("arrival_ms", request.arrival_ms, "requests must come in time order")
        last = request.arrival_ms
        yield request
