"""Capacity under latency SLOs: the highest arrival rate that is stable AND meets latency targets.

The question: "what is the highest arrival rate at which policy P with budget b keeps up and meets
p99_ttft_ms <= X, p99_tpot_ms <= Y?". The answer is searched by bisection between 0 and the
analytic bound (the rate at which the load against ``max_n n / t(n)``, and with ``k_max`` against
the §4 region, is 1): no policy is stable above it, so no run is ever made there. At each rate the
setting is run with R replicated seeds (common random numbers across rates), and the rate
*passes* when

- no run is observed ``unstable``, the replicated drift test over the R runs
  (``stability.replicated_verdict``, level 0.05) does not find the backlog growing, and the
  theory does not predict ``unstable`` (the calibration in docs/stability.md: at 5,000 requests
  per run "any run observed unstable" raised 0.3 % false alarms on stable settings and caught
  every overload from 1.05 lambda* up, while the replicated test alone misses 10-25 % at 1.05;
  the union errs on the side of not overstating capacity), and
- for every SLO metric, the one-sided Student-t upper confidence bound (level ``confidence``,
  R - 1 degrees of freedom) of the across-seed mean of the per-run metric is <= its target.

Each run's metric is the run's own statistic (e.g. the p99 TTFT over all its requests); the seeds
make R independent copies of it, so the t bound is an honest bound on the mean of that statistic
for runs of that length. The claim is per metric and per rate (no multiplicity correction).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from llmqueue.engines.metrics import LATENCIES, PERCENTILES
from llmqueue.engines.reference import PolicyFn
from llmqueue.errors import ConfigError
from llmqueue.io.configfile import split_pair
from llmqueue.limits import MIN_TOLERANCE
from llmqueue.model.batchtime import BatchTime, ShapeTime, mix_batch_time, parse_batch_time
from llmqueue.model.specs import make_workload
from llmqueue.model.workload import Constant, DeterministicArrivals, TraceArrivals, Workload
from llmqueue.policies.fcfs import make_policy
from llmqueue.policies.view import policy_name
from llmqueue.sim.run import simulate
from llmqueue.theory import capacity as theory
from llmqueue.theory.stability import Observed, Predicted, replicated_verdict

__all__ = [
    "SLO_METRICS",
    "BudgetOutcome",
    "BudgetSearch",
    "SLOCapacity",
    "SLOPoint",
    "best_budget_for_slo",
    "bound_rate_per_s",
    "evaluate_rate",
    "max_rate_under_slo",
    "parse_slo",
]

SLO_METRICS: tuple[str, ...] = tuple(
    f"{label}_{name}_ms" for name in LATENCIES for label, _ in PERCENTILES
)
"""Metric names an SLO may bound: ``{mean,median,p90,p99}_{ttft,tpot,itl,e2el}_ms``."""

DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
DEFAULT_MAX_REQUESTS = 5000

WorkloadAt = Callable[[float], Workload]
"""Builds the workload at an arrival rate (requests/s); sizes must not depend on the rate."""

WorkloadSpec = WorkloadAt | tuple[str, str | None, str | None]
"""A ``rate -> Workload`` callable, or ``(arrival_spec, prefill_spec, decode_spec)`` strings."""


# ---------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class SLOPoint:
    """One evaluated rate: per-metric across-seed mean and upper confidence bound, verdicts, outcome.

    ``observed`` holds each seed's single-run verdict, ``replicated`` the replicated drift test's
    verdict over the seeds (what the pass rule uses), ``predicted`` the theory's verdict (the same
    for every seed). ``reasons`` says why the rate failed (empty when it passed).
    """

    rate_per_s: float
    load: float
    means: dict[str, float]
    upper_bounds: dict[str, float]
    observed: tuple[Observed, ...]
    replicated: Observed
    predicted: Predicted
    passed: bool
    reasons: tuple[str, ...]

    def worst_ratio(self, slo: Mapping[str, float]) -> float:
        """max over the SLO metrics of upper bound / target (<= 1 when every target is met)."""
        return max(self.upper_bounds[k] / v for k, v in slo.items())


@dataclass(frozen=True, slots=True)
class SLOCapacity:
    """The result of :func:`max_rate_under_slo`.

    ``max_rate_per_s`` is the highest rate found to pass, None when no evaluated rate passed (the
    search then went down to ``tolerance`` times the bound: even tiny rates fail).
    ``lowest_failing_rate_per_s`` is the lowest evaluated rate that failed, None when every
    evaluated rate passed (the upper end of the bracket is then the analytic bound itself).
    ``fraction_of_critical`` is ``max_rate_per_s / critical_rate_per_s`` (0.0 when none passed).
    ``points`` are the evaluated rates in evaluation order; ``runs`` counts simulations.
    """

    max_rate_per_s: float | None
    lowest_failing_rate_per_s: float | None
    bound_rate_per_s: float
    critical_rate_per_s: float
    fraction_of_critical: float
    slo: dict[str, float]
    seeds: tuple[int, ...]
    max_requests: int
    confidence: float
    tolerance: float
    runs: int
    points: tuple[SLOPoint, ...]
    statement: str


@dataclass(frozen=True, slots=True)
class BudgetOutcome:
    """One candidate budget at the fixed rate: its evaluated point (None when not run) and ratio.

    ``worst_ratio`` is max over metrics of upper bound / target (inf when not run or undefined);
    the slack is ``1 - worst_ratio``. ``bound_rate_per_s`` is the analytic bound for this budget:
    a candidate whose bound is at or below the rate is failed without running.
    """

    budget: int
    bound_rate_per_s: float
    point: SLOPoint | None
    passed: bool
    worst_ratio: float
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BudgetSearch:
    """The result of :func:`best_budget_for_slo`: every candidate, and the best passing one."""

    rate_per_s: float
    slo: dict[str, float]
    candidates: tuple[BudgetOutcome, ...]
    best: BudgetOutcome | None
    runs: int
    confidence: float
    statement: str


# ---------------------------------------------------------------- validation


def _check_target(piece: object, key: str, value: object) -> float:
    """``value`` as a positive finite float, else ConfigError naming the piece."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError("slo", piece, f"target of {key} must be a number") from None
    if not math.isfinite(x) or x <= 0:
        raise ConfigError("slo", piece, f"target of {key} must be a positive finite number of ms")
    return x


def _check_key(piece: object, key: str) -> str:
    """``key`` if it is a latency metric name, else ConfigError naming it."""
    if key not in SLO_METRICS:
        raise ConfigError(
            "slo", piece,
            f"unknown metric '{key}': expected {{mean,median,p90,p99}}_{{ttft,tpot,itl,e2el}}_ms",
        )
    return key


def parse_slo(text: str) -> dict[str, float]:
    """Parse ``"p99_ttft_ms=500,p99_tpot_ms=50"`` into ``{metric: target_ms}``.

    Keys must be latency metric names (:data:`SLO_METRICS`), each given once; targets positive
    finite numbers (ms). Any problem raises ``ConfigError("slo", <the bad piece>, <what>)``.
    """
    if not isinstance(text, str):
        raise ConfigError("slo", text, "must be a string like 'p99_ttft_ms=500,p99_tpot_ms=50'")
    if not text.strip():
        raise ConfigError("slo", text, "is empty: give metric=target pairs like p99_ttft_ms=500")
    out: dict[str, float] = {}
    for raw in text.split(","):
        piece = raw.strip()
        pair = split_pair(piece)
        if pair is None or not pair[1]:
            raise ConfigError("slo", piece, "expected metric=target (e.g. p99_ttft_ms=500)")
        key, value = pair
        _check_key(piece, key)
        if key in out:
            raise ConfigError("slo", piece, f"metric {key} is given twice")
        out[key] = _check_target(piece, key, value)
    return out


def _check_slo(slo: Mapping[str, float] | str) -> dict[str, float]:
    """An SLO mapping or text, validated (same rules as :func:`parse_slo`)."""
    if isinstance(slo, str):
        return parse_slo(slo)
    if not isinstance(slo, Mapping) or not slo:
        raise ConfigError("slo", slo, "must be a non-empty mapping of metric -> target ms")
    out: dict[str, float] = {}
    for key, value in slo.items():
        piece = f"{key}={value}"
        _check_key(piece, str(key))
        out[str(key)] = _check_target(piece, str(key), value)
    return out


def _check_seeds(seeds: Iterable[int]) -> tuple[int, ...]:
    """At least two distinct non-negative integer seeds (a t bound needs two replicates)."""
    try:
        out = tuple(seeds)
    except TypeError:
        raise ConfigError("seeds", seeds, "must be a sequence of integers") from None
    if not out:
        raise ConfigError("seeds", out, "is empty: give at least 2 seeds")
    for s in out:
        if isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0:
            raise ConfigError("seeds", s, "each seed must be a non-negative integer")
    if len(out) < 2:
        raise ConfigError("seeds", out, "need at least 2 seeds for a confidence bound")
    if len(set(out)) != len(out):
        raise ConfigError("seeds", out, "seeds must be distinct (replicates must be independent)")
    return tuple(int(s) for s in out)


def _check_fraction(value: object, field: str, low: float, high: float) -> float:
    """``value`` as a float strictly inside (low, high)."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(field, value, "must be a number") from None
    if not (low < x < high):
        raise ConfigError(field, value, f"must lie strictly between {low:g} and {high:g}")
    return x


def _check_budgets(budgets: object) -> list[int]:
    """A non-empty list of distinct integer budgets >= 1."""
    if isinstance(budgets, str | bytes) or not isinstance(budgets, Iterable):
        raise ConfigError("budgets", budgets, "must be a sequence of integers >= 1")
    out = list(budgets)
    if not out:
        raise ConfigError("budgets", out, "is empty: give at least one candidate budget")
    for b in out:
        if isinstance(b, bool) or not isinstance(b, int | np.integer) or b < 1:
            raise ConfigError("budgets", b, "each budget must be an integer >= 1")
    if len(set(out)) != len(out):
        raise ConfigError("budgets", out, "candidates must be distinct")
    return [int(b) for b in out]


def _check_rate(value: object) -> float:
    """A positive finite arrival rate (requests/s)."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError("rate_per_s", value, "must be a number") from None
    if not (math.isfinite(x) and x > 0):
        raise ConfigError("rate_per_s", value, "must be a positive finite rate (requests/s)")
    return x


def _check_requests(value: object) -> int:
    """An integer >= 2 (requests per run)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 2:
        raise ConfigError("max_requests", value, "must be an integer >= 2")
    return int(value)


def _workload_at(workload: WorkloadSpec) -> WorkloadAt:
    """The ``rate -> Workload`` builder for a callable or a tuple of three spec strings."""
    if callable(workload):
        return workload
    if isinstance(workload, tuple) and len(workload) == 3:
        arrival, prefill, decode = workload
        make_workload(arrival, prefill, decode, 1.0)  # fail early on a bad spec

        def build(rate_per_s: float) -> Workload:
            return make_workload(arrival, prefill, decode, rate_per_s)

        return build
    raise ConfigError(
        "workload", workload, "must be a callable rate -> Workload or (arrival, prefill, decode) specs"
    )


def _build(workload_at: WorkloadAt, rate_per_s: float) -> Workload:
    """The workload at ``rate_per_s``; ConfigError when the builder ignores the rate."""
    w = workload_at(rate_per_s)
    if not isinstance(w, Workload):
        raise ConfigError("workload", type(w).__name__, "the builder must return a Workload")
    if not math.isclose(w.rate_per_s, rate_per_s, rel_tol=1e-9):
        raise ConfigError(
            "workload", w.rate_per_s, f"the builder was asked for rate {rate_per_s:g} requests/s"
        )
    return w


def _resolve(policy: PolicyFn | str, batch_time: BatchTime | ShapeTime | str
             ) -> tuple[PolicyFn, BatchTime | ShapeTime]:
    """Policy and batch-time objects from objects or their names/specs."""
    pol = make_policy(policy) if isinstance(policy, str) else policy
    bt = parse_batch_time(batch_time) if isinstance(batch_time, str) else batch_time
    return pol, bt


def bound_rate_per_s(
    batch_time: BatchTime, budget: int, k_max: int | None, mean_prefill_tokens: float,
    mean_decode_tokens: float,
) -> float:
    """The analytic bound: the rate at which the load against ``max_n n/t(n)`` is 1.

    With ``k_max``, the smaller of that and the rate at which the arrival vector reaches the §4
    region's boundary (``kmax_load`` is 1). No policy is stable above it.
    """
    mean_tokens = mean_prefill_tokens + mean_decode_tokens
    _, best_per_ms = theory.max_throughput(batch_time, budget)
    bound = best_per_ms * 1000.0 / mean_tokens
    if k_max is not None:
        per_request = theory.kmax_load(
            mean_prefill_tokens / 1000.0, mean_decode_tokens / 1000.0, batch_time, budget, k_max
        )  # kmax_load at 1 request/s; it is linear in the rate
        bound = min(bound, 1.0 / per_request)
    return bound


# ---------------------------------------------------------------- one rate


def evaluate_rate(
    workload: WorkloadSpec,
    policy: PolicyFn | str,
    batch_time: BatchTime | ShapeTime | str,
    budget: int,
    rate_per_s: float,
    slo: Mapping[str, float] | str,
    *,
    k_max: int | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    confidence: float = 0.95,
) -> SLOPoint:
    """Run the setting at ``rate_per_s`` once per seed and apply the pass rule (module docstring).

    Public so that a user (or a test) can re-check a rate the search reported: same seeds and
    requests give the same runs, hence the same outcome.
    """
    targets, seed_list, n, level = _check_common(slo, seeds, max_requests, confidence)
    pol, bt = _resolve(policy, batch_time)
    rate = _check_rate(rate_per_s)
    return _evaluate(_workload_at(workload), pol, bt, budget, k_max, rate, targets, seed_list, n, level)


def _evaluate(
    workload_at: WorkloadAt,
    policy: PolicyFn,
    batch_time: BatchTime | ShapeTime,
    budget: int,
    k_max: int | None,
    rate_per_s: float,
    slo: dict[str, float],
    seeds: tuple[int, ...],
    max_requests: int,
    confidence: float,
) -> SLOPoint:
    """The unchecked core of :func:`evaluate_rate`."""
    from scipy import stats
    w = _build(workload_at, rate_per_s)
    if is_deterministic(w):
        seeds = seeds[:1]  # every seed gives this run: one run, no t bound (see claim)
    results = [
        simulate(w, policy, batch_time, budget, k_max=k_max, seed=s, max_requests=max_requests,
                 keep_requests=False)
        for s in seeds
    ]
    r = len(seeds)
    t_quantile = float(stats.t.ppf(confidence, r - 1)) if r > 1 else 0.0
    means: dict[str, float] = {}
    uppers: dict[str, float] = {}
    reasons: list[str] = []
    for key, target in slo.items():
        values = np.array([res.metrics.latency[key] for res in results], dtype=np.float64)
        if not np.isfinite(values).all():
            means[key] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
            uppers[key] = math.inf
            reasons.append(f"{key} undefined in some run (no request reached it)")
            continue
        mean = float(values.mean())
        upper = mean + (t_quantile * float(values.std(ddof=1)) / math.sqrt(r) if r > 1 else 0.0)
        means[key], uppers[key] = mean, upper
        if upper > target:
            reasons.append(f"{key} upper bound {upper:.4g} ms > target {target:g} ms")
    observed = tuple(res.observed.verdict for res in results)
    predicted = results[0].predicted.verdict
    drift = replicated_verdict(results) if r > 1 else None
    if "unstable" in observed:
        reasons.append(f"observed unstable in {observed.count('unstable')} of {r} runs")
    elif drift is not None and drift.verdict == "unstable":
        reasons.append(
            f"replicated drift test: backlog grows ({drift.mean_slope_tokens_per_s:,.1f} tokens/s "
            f"over {r} runs, p = {drift.p_value:.2g}; single runs: {', '.join(observed)})"
        )
    if predicted == "unstable":
        reasons.append(f"predicted unstable: {results[0].predicted.reason}")
    return SLOPoint(
        rate_per_s=rate_per_s,
        load=results[0].theory.load,
        means=means,
        upper_bounds=uppers,
        observed=observed,
        replicated=observed[0] if drift is None else drift.verdict,
        predicted=predicted,
        passed=not reasons,
        reasons=tuple(reasons),
    )


def max_steps(tolerance: float) -> int:
    """The most rates one bisection evaluates at ``tolerance``: each halves the bracket."""
    return math.ceil(math.log2(1.0 / tolerance)) + 2


def is_deterministic(workload: Workload) -> bool:
    """Whether every seed gives the same run: deterministic or replayed arrivals with constant or
    replayed sizes (the seed draws nothing). Replicating such a run replicates nothing."""
    return isinstance(workload.arrival, DeterministicArrivals | TraceArrivals) and all(
        d is None or isinstance(d, Constant) for d in (workload.prefill, workload.decode)
    )


def claim(slo: Mapping[str, float], seeds: tuple[int, ...], max_requests: int, confidence: float,
          deterministic: bool = False) -> str:
    """The confidence statement shared by both searches (``deterministic``: the workload draws
    nothing from the seed, so one run stands for all and no confidence bound is claimed)."""
    if deterministic:
        return (
            f"for each SLO metric ({', '.join(f'{k} <= {v:g}' for k, v in slo.items())}), the "
            f"statistic of ONE run of {max_requests} requests (over all its requests, warm-up "
            "included) is at or below the target, that run was not observed unstable, and the "
            "theory does not predict instability. The workload draws nothing from the seed "
            "(deterministic or replayed arrivals with constant or replayed sizes), so every seed "
            "gives this same run: no seeds are replicated and no confidence bound is claimed; "
            "resample sizes (e.g. --prefill trace:PATH --decode trace:PATH) or use random "
            "arrivals for replicated runs"
        )
    return (
        f"for each SLO metric separately ({', '.join(f'{k} <= {v:g}' for k, v in slo.items())}), "
        f"the one-sided {confidence:.0%} Student-t upper confidence bound ({len(seeds)} seeds, "
        f"{len(seeds) - 1} d.f.) of the mean over independent runs of {max_requests} requests of "
        "that run's statistic (over all its requests, warm-up included) is at or below the target, "
        "no run was observed unstable, the replicated drift test over the seeds (level 0.05) does "
        "not find the backlog growing, and the theory does not predict instability. Not claimed: "
        "joint coverage over metrics or rates (no multiplicity correction, and the search's choice "
        "of the rate is not accounted for), values for runs of other lengths (near load 1 latency "
        "percentiles grow with the run's length), or stability beyond what that drift test can "
        "see in runs of this length"
    )


def _check_common(slo: Mapping[str, float] | str, seeds: Sequence[int], max_requests: int,
                  confidence: float) -> tuple[dict[str, float], tuple[int, ...], int, float]:
    """The arguments every search shares, checked: targets, seeds, requests per run, level."""
    return (_check_slo(slo), _check_seeds(seeds), _check_requests(max_requests),
            _check_fraction(confidence, "confidence", 0.0, 1.0))


# ---------------------------------------------------------------- the searches


def max_rate_under_slo(
    workload: WorkloadSpec,
    policy: PolicyFn | str,
    batch_time: BatchTime | ShapeTime | str,
    budget: int,
    slo: Mapping[str, float] | str,
    *,
    k_max: int | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    tolerance: float = 0.01,
    confidence: float = 0.95,
    on_point: Callable[[SLOPoint], None] | None = None,
) -> SLOCapacity:
    """The highest arrival rate (requests/s) that passes: stable and within the SLO (module doc).

    Bisection on [0, bound], where bound is :func:`bound_rate_per_s` (never run: no policy is
    stable there or above). It stops when the bracket [passing, failing) is at most ``tolerance``
    times its upper end, or, when nothing passed yet, once the failing end is at most
    ``tolerance`` times the bound (then ``max_rate_per_s`` is None: even tiny rates fail). The
    search assumes passing is monotone in the rate; the same seeds at every rate (common random
    numbers) make the metrics nearly monotone, and a tighter SLO never yields a higher rate.
    ``on_point`` is called after each evaluated rate (progress); the search makes at most
    ``max_steps(tolerance)`` of them.
    """
    targets, seed_list, n, level = _check_common(slo, seeds, max_requests, confidence)
    tol = _check_fraction(tolerance, "tolerance", 0.0, 1.0)
    if tol < MIN_TOLERANCE:
        raise ConfigError("tolerance", tolerance, f"must be >= {MIN_TOLERANCE:g} (finer is below "
                          "simulation noise, and the bisection would outrun float spacing)")
    pol, bt = _resolve(policy, batch_time)
    workload_at = _workload_at(workload)
    probe = _build(workload_at, 1.0)
    m_p, m_d = probe.mean_prefill_tokens, probe.mean_decode_tokens
    token_time = mix_batch_time(bt, m_p, m_d)
    bound = bound_rate_per_s(token_time, budget, k_max, m_p, m_d)
    critical = theory.critical_rate_per_s(token_time, budget, m_p + m_d)
    if is_deterministic(probe):
        seed_list = seed_list[:1]

    lo, hi = 0.0, bound
    failing: float | None = None
    points: list[SLOPoint] = []
    # each step halves the bracket: about log2(1/tol) steps, bounded so that nothing loops forever
    steps = max_steps(tol)
    while not ((lo > 0 and hi - lo <= tol * hi) or (lo == 0 and hi <= tol * bound)):
        mid = 0.5 * (lo + hi)
        if len(points) >= steps or not lo < mid < hi:
            break
        point = _evaluate(workload_at, pol, bt, budget, k_max, mid, targets, seed_list, n, level)
        points.append(point)
        if on_point is not None:
            on_point(point)
        if point.passed:
            lo = mid
        else:
            hi = failing = mid

    best = lo if lo > 0 else None
    setting = f"{policy_name(pol)}, budget {budget}" + ("" if k_max is None else f", k_max {k_max}")
    if best is None:
        head = (
            f"No rate passes for {setting}: every evaluated rate failed, down to {hi:.4g} requests/s "
            f"({tol:g} x the bound {bound:.4g}). A passing rate would have met this: "
        )
    else:
        upper_end = "the analytic bound" if failing is None else "the lowest failing rate"
        head = (
            f"For {setting}: {best:.4g} requests/s ({best / critical:.3f} lambda*) passes and "
            f"{hi:.4g} ({upper_end}) does not; the bound {bound:.4g} requests/s is analytic (no "
            f"policy is stable above it; no run made there). At {best:.4g} requests/s: "
        )
    return SLOCapacity(
        max_rate_per_s=best,
        lowest_failing_rate_per_s=failing,
        bound_rate_per_s=bound,
        critical_rate_per_s=critical,
        fraction_of_critical=0.0 if best is None else best / critical,
        slo=targets,
        seeds=seed_list,
        max_requests=n,
        confidence=level,
        tolerance=tol,
        runs=len(points) * len(seed_list),
        points=tuple(points),
        statement=head + claim(targets, seed_list, n, level, is_deterministic(probe)) + ".",
    )


def best_budget_for_slo(
    workload: WorkloadSpec,
    policy: PolicyFn | str,
    batch_time: BatchTime | ShapeTime | str,
    budgets: Sequence[int],
    rate_per_s: float,
    slo: Mapping[str, float] | str,
    *,
    k_max: int | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    confidence: float = 0.95,
    on_point: Callable[[SLOPoint], None] | None = None,
) -> BudgetSearch:
    """Evaluate each candidate budget at ``rate_per_s`` (same pass rule) and pick the best.

    The best is the passing candidate with the largest slack, i.e. the smallest worst ratio
    max over metrics of upper bound / target (ties: the smaller budget, shorter iterations);
    None when no candidate passes. A candidate whose analytic bound is at or below the rate is
    failed without running (no policy is stable there).
    """
    targets, seed_list, n, level = _check_common(slo, seeds, max_requests, confidence)
    rate = _check_rate(rate_per_s)
    candidates = _check_budgets(budgets)
    pol, bt = _resolve(policy, batch_time)
    workload_at = _workload_at(workload)
    w = _build(workload_at, rate)
    token_time = mix_batch_time(bt, w.mean_prefill_tokens, w.mean_decode_tokens)
    deterministic = is_deterministic(w)
    if deterministic:
        seed_list = seed_list[:1]

    outcomes: list[BudgetOutcome] = []
    runs = 0
    for b in candidates:
        bound = bound_rate_per_s(token_time, b, k_max, w.mean_prefill_tokens, w.mean_decode_tokens)
        if rate >= bound:
            reason = f"rate {rate:g} >= analytic bound {bound:.4g} requests/s: no policy is stable"
            outcomes.append(BudgetOutcome(b, bound, None, False, math.inf, (reason,)))
            continue
        point = _evaluate(workload_at, pol, bt, b, k_max, rate, targets, seed_list, n, level)
        if on_point is not None:
            on_point(point)
        runs += len(seed_list)
        ratio = point.worst_ratio(targets)
        outcomes.append(BudgetOutcome(b, bound, point, point.passed, ratio, point.reasons))
    passing = [o for o in outcomes if o.passed]
    best = min(passing, key=lambda o: (o.worst_ratio, o.budget)) if passing else None
    if best is None:
        head = f"No candidate budget passes at {rate:.4g} requests/s. A passing budget would have met: "
    else:
        head = (
            f"Budget {best.budget} passes at {rate:.4g} requests/s with the largest slack "
            f"(worst upper bound / target {best.worst_ratio:.3f}). For it: "
        )
    return BudgetSearch(
        rate_per_s=rate,
        slo=targets,
        candidates=tuple(outcomes),
        best=best,
        runs=runs,
        confidence=level,
        statement=head + claim(targets, seed_list, n, level, deterministic) + ".",
    )
