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
from typing import Literal

from llmqueue import theory
from llmqueue.batchtime import BatchTime
from llmqueue.engine import Batch, Engine, PolicyFn
from llmqueue.errors import ConfigError
from llmqueue.fastengine import FastEngine, needs_reference
from llmqueue.metrics import Recorder, RequestRecord, RunMetrics
from llmqueue.policies import chunks_prefill, is_work_conserving, policy_name
from llmqueue.stability import Observation, Prediction, observe, predict
from llmqueue.workload import Request, TraceArrivals, Workload

EngineKind = Literal["auto", "fast", "reference"]
MIN_DRAIN_MS = 60_000.0
WARMUP_FRACTION = 0.2
"""The first 20 % of the arrival window is left out of the backlog trend test."""


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
    batch_time: BatchTime,
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
) -> RunResult:
    """Run ``source`` (a workload, or requests in arrival order) through one engine.

    Arrivals stop after ``max_requests`` or at ``duration_s``; the run then drains for at most
    ``drain_s`` (default: the arrival window, at least 60 s). ``engine``: ``"fast"`` books runs
    of identical iterations at once (policies declaring ``repeats_plan``), ``"reference"`` steps
    every iteration, ``"auto"`` takes the fast engine whenever the policy allows it. Both give
    the same results. ``keep_requests``: return every request's record in ``RunResult.requests``
    (the metrics are computed either way).
    """
    if engine not in ("auto", "fast", "reference"):
        raise ConfigError("engine", engine, "must be 'auto', 'fast' or 'reference'")
    if engine == "fast" and needs_reference(policy):
        raise ConfigError(
            "engine", engine, f"policy '{policy_name(policy)}' does not declare repeats_plan"
        )
    use_fast = engine == "fast" or (engine == "auto" and not needs_reference(policy))
    if max_requests is not None and (not isinstance(max_requests, int) or max_requests < 1):
        raise ConfigError("requests", max_requests, "must be an integer >= 1")
    if duration_s is not None and not (duration_s > 0 and math.isfinite(duration_s)):
        raise ConfigError("duration_s", duration_s, "must be a positive number of seconds")
    if drain_s is not None and not (drain_s >= 0 and math.isfinite(drain_s)):
        raise ConfigError("drain_s", drain_s, "must be >= 0 seconds")
    duration_ms = None if duration_s is None else duration_s * 1000.0
    if isinstance(source, Workload):
        if max_requests is None and duration_ms is None and not isinstance(source.arrival, TraceArrivals):
            raise ConfigError("requests", None, "give a number of requests or a duration")
        arrivals: Iterator[Request] = source.requests(
            seed, max_requests=max_requests, duration_ms=duration_ms
        )
    else:
        arrivals = _bounded(iter(source), max_requests, duration_ms)

    recorder = Recorder()
    engine_class = FastEngine if use_fast else Engine
    eng = engine_class(policy, batch_time, budget, k_max, recorder=recorder, keep_batches=keep_batches)
    never_chunks = chunks_prefill(policy) is False
    unservable = 0
    prefill_sum = decode_sum = 0
    def arrival_end_ms() -> float:
        return duration_ms if duration_ms is not None else recorder.last_arrival_ms

    nxt = next(arrivals, None)
    horizon = math.inf
    steps = 0
    while True:
        t = eng.next_event_ms()
        if nxt is not None and nxt.arrival_ms <= t:
            if never_chunks and nxt.prefill_tokens > budget:
                unservable += 1
            prefill_sum += nxt.prefill_tokens
            decode_sum += nxt.decode_tokens
            eng.submit(nxt)
            nxt = next(arrivals, None)
            if nxt is None:  # arrivals are over: the drain allowance starts
                end = arrival_end_ms()
                drain = max(end, MIN_DRAIN_MS) if drain_s is None else drain_s * 1000.0
                horizon = end + drain
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
    end_ms = horizon if cut else max(eng.now_ms, recorder.last_arrival_ms)
    blocked_since = eng.blocked_since_ms
    if blocked_since is not None:
        recorder.stall(end_ms - blocked_since)
    metrics = recorder.finish(end_ms)

    arrivals_n = max(recorder.arrivals, 1)
    if isinstance(source, Workload):
        rate = source.rate_per_s
        mean_p, mean_d = source.mean_prefill_tokens, source.mean_decode_tokens
    else:
        last_s = recorder.last_arrival_ms / 1000.0
        rate = recorder.arrivals / last_s if last_s > 0 else math.nan
        mean_p, mean_d = prefill_sum / arrivals_n, decode_sum / arrivals_n
    summary = summarize_theory(batch_time, budget, k_max, rate, mean_p, mean_d)
    prediction = predict(
        work_conserving=is_work_conserving(policy),
        load_full_batches=summary.load,
        load_best_batches=summary.load_best_batches,
        kmax_load=summary.kmax_load,
    )
    window_end = min(arrival_end_ms(), end_ms)
    offered = recorder.arrived_tokens / (window_end / 1000.0) if window_end > 0 else 0.0
    observation = observe(
        recorder.backlog_bins, WARMUP_FRACTION * window_end, window_end, offered
    )

    notes: list[str] = []
    if unservable:
        notes.append(
            f"{unservable} request(s) have more prefill tokens than the budget {budget} and "
            f"policy '{policy_name(policy)}' never chunks prompts: they can never be served"
        )
    if blocked_since is not None and eng.in_system:
        notes.append(
            f"the engine stalled: {eng.in_system} request(s) wait but the policy forms no batch"
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
        pending = [job.record() for job in eng.jobs()]
        records = tuple(sorted(done + pending, key=lambda r: r.id))
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
        batches=None if eng.batches is None else tuple(eng.batches),
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
