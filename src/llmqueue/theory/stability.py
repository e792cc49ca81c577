"""Stability verdicts: what the theorems predict for a setting, and what a run's backlog shows.

*Predicted* comes from the paper's results (§3, §4): the capacity bound holds for every policy;
throughput optimality holds for work-conserving (K_p, K_d)-FCFS policies without a batch-size
limit. *Observed* is a trend test on the time-averaged backlog over the run's arrival window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from llmqueue.engines.metrics import TimeBins
from llmqueue.errors import ConfigError

if TYPE_CHECKING:
    pass

Predicted = Literal["stable", "unstable", "no guarantee"]
Observed = Literal["stable", "unstable", "inconclusive"]

CRITICAL_TOLERANCE = 1e-9
"""Loads within this of 1 count as critical: no theorem decides them."""


@dataclass(frozen=True, slots=True)
class Prediction:
    """The theory's verdict for a setting and the reason, in one sentence."""

    verdict: Predicted
    reason: str


@dataclass(frozen=True, slots=True)
class Observation:
    """A run's backlog trend: slope with a confidence interval, and the verdict it supports."""

    verdict: Observed
    slope_tokens_per_s: float
    ci_low_tokens_per_s: float
    ci_high_tokens_per_s: float
    threshold_tokens_per_s: float
    window_start_s: float
    window_end_s: float
    blocks: int


def predict(
    *,
    work_conserving: bool | None,
    load_full_batches: float,
    load_best_batches: float,
    kmax_load: float | None = None,
    memory_load: float | None = None,
) -> Prediction:
    """Verdict of the theorems.

    ``load_full_batches`` is ``lambda (m_p + m_d) / (b / t(b))``; ``load_best_batches`` the same
    against ``max_n n / t(n)`` (the bound on any policy); ``kmax_load`` the load against the
    batch-size-limit region (None without ``k_max``); ``memory_load`` the load against that
    region with the KV cache's batch-size limit (None without a memory limit).
    """
    base = _predict(work_conserving, load_full_batches, load_best_batches, kmax_load)
    if memory_load is None or math.isnan(memory_load):
        return base
    if memory_load > 1 + CRITICAL_TOLERANCE:
        return Prediction(
            "unstable",
            f"the KV cache cannot hold enough decoding requests (memory load {memory_load:.3f} > 1)",
        )
    scalar = load_full_batches if kmax_load is None else kmax_load
    if base.verdict == "stable" and memory_load > scalar:
        return Prediction(
            "no guarantee",
            f"the KV cache binds (memory load {memory_load:.3f}); below its limit preemption "
            "can still cost capacity (docs/memory.md)",
        )
    return base


@dataclass(frozen=True, slots=True)
class MemoryPrediction:
    """What a KV cache does to a setting's verdict: :func:`predict`'s labels, the cause that
    decides them, which limit binds first, and a warning when memory, not the budget, decides."""

    verdict: Predicted
    cause: str | None
    """``token budget``, ``memory``, ``preemption thrash`` or ``memory binds; saturated run
    skipped``; None for ``stable``."""
    binding: Literal["memory", "token budget"]
    warning: str | None

    @property
    def label(self) -> str:
        """The verdict with its cause, e.g. ``unstable (memory)`` (``llmqueue capacity --memory``)."""
        return self.verdict if self.cause is None else f"{self.verdict} ({self.cause})"


def predict_memory(
    *,
    load_full_batches: float,
    memory_load: float,
    kmax_load: float | None = None,
    kv_tokens: int,
    kv_requests: int,
    rate_per_s: float = math.nan,
    saturated_rate_per_s: float | None = None,
    preemptions: int = 0,
    recomputed_tokens_per_request: float = 0.0,
) -> MemoryPrediction:
    """The verdict of a setting with a KV cache of ``kv_tokens`` tokens holding about
    ``kv_requests`` decoding requests.

    ``load_full_batches`` and ``kmax_load`` are the memory-free loads of :func:`predict` (the
    ``k_max`` region's decides when set), ``memory_load`` the §4 load with the cache's batch-size
    limit (a no-thrash upper bound). ``saturated_rate_per_s``: the rate the saturated engine
    completes (None: that run was skipped); arriving at ``rate_per_s`` at or above it with
    ``preemptions`` is preemption thrash (docs/memory.md)."""
    load = load_full_batches if kmax_load is None else kmax_load
    skipped = saturated_rate_per_s is None
    thrash = not skipped and preemptions > 0 and rate_per_s >= saturated_rate_per_s
    binding: Literal["memory", "token budget"] = "memory" if memory_load > load else "token budget"
    verdict: Predicted
    if load >= 1:
        verdict, cause = "unstable", "token budget"
    elif memory_load >= 1:
        verdict, cause = "unstable", "memory"
    elif thrash:
        verdict, cause = "unstable", "preemption thrash"
    elif skipped and memory_load > load:
        verdict, cause = "no guarantee", "memory binds; saturated run skipped"
    else:
        verdict, cause = "stable", None
    warning = None
    if load < 1 <= memory_load:
        warning = (
            f"memory binds: load {load:.3f} is stable for the token budget, but {kv_tokens} "
            f"KV tokens hold only about {kv_requests} decoding requests (load {memory_load:.3f} >= 1): "
            "unstable"
        )
    elif load < 1 and thrash:
        assert saturated_rate_per_s is not None
        warning = (
            f"preemption thrash: memory load {memory_load:.3f} < 1, but the saturated engine "
            f"completes only {saturated_rate_per_s:.4g} req/s "
            f"({recomputed_tokens_per_request:.0f} tokens recomputed per request; load "
            f"{rate_per_s / saturated_rate_per_s:.3f} >= 1): unstable (preemption thrash, docs/memory.md)"
        )
    elif memory_load > load:
        warning = (
            "memory binds before the token budget; its limit is an upper bound: preemption "
            "(recompute) costs capacity near it"
            + ("" if skipped else ", saturated_rate includes that cost")
            + " (docs/memory.md)"
        )
    return MemoryPrediction(verdict, cause, binding, warning)


def _predict(
    work_conserving: bool | None,
    load_full_batches: float,
    load_best_batches: float,
    kmax_load: float | None,
) -> Prediction:
    """The theorems' verdict without memory."""
    if math.isnan(load_full_batches) or (kmax_load is not None and math.isnan(kmax_load)):
        return Prediction("no guarantee", "no arrival rate known (all requests at one instant)")
    if kmax_load is not None:
        if kmax_load > 1 + CRITICAL_TOLERANCE:
            return Prediction(
                "unstable",
                f"token rates lie outside the k_max stability region (load {kmax_load:.3f}): "
                "no policy keeps up",
            )
        return Prediction(
            "no guarantee",
            f"inside the k_max region (load {kmax_load:.3f}), but with a batch-size limit "
            "work conservation alone does not guarantee stability (§4)",
        )
    if load_best_batches > 1 + CRITICAL_TOLERANCE:
        return Prediction(
            "unstable",
            f"load {load_best_batches:.3f} exceeds the capacity bound max n/t(n): "
            "no policy keeps up",
        )
    if abs(load_full_batches - 1) <= CRITICAL_TOLERANCE:
        return Prediction("no guarantee", "critical load 1: the theorems do not decide")
    if work_conserving:
        if load_full_batches < 1:
            return Prediction(
                "stable",
                f"work-conserving policy at load {load_full_batches:.3f} < 1 "
                "(throughput optimality, v3 Thm 2)",
            )
        return Prediction(
            "unstable",
            f"work-conserving policy fills batches to b, and load {load_full_batches:.3f} "
            "exceeds b/t(b)",
        )
    kind = "not work-conserving" if work_conserving is False else "of unknown work conservation"
    return Prediction(
        "no guarantee",
        f"load {load_full_batches:.3f} is below capacity, but the policy is {kind}: "
        "the theorem does not apply",
    )


def observe(
    bins: TimeBins,
    start_ms: float,
    end_ms: float,
    offered_tokens_per_s: float,
    *,
    blocks: int = 20,
    level: float = 0.95,
    material: float = 0.02,
) -> Observation:
    """Trend test of the backlog over [start_ms, end_ms).

    The window is cut into ``blocks`` equal blocks and the slope is the mean increment of the
    block means per unit time, i.e. (last block mean - first block mean) / their distance. Under
    overload the backlog is a random walk with drift, whose increments are nearly independent;
    the standard error comes from the increments' variance with a lag-1 (Newey-West) term,
    floored at the plain variance so that a stationary backlog (negatively correlated
    increments) gets a conservative, wide interval rather than a spuriously narrow one. A slope
    counts as material above ``material`` times the offered token rate. Verdict: ``unstable`` if
    the interval lies above 0 and the slope is material; ``stable`` if the interval reaches 0 or
    below and its top is below the material level; else ``inconclusive``.
    """
    from scipy import stats
    threshold = material * offered_tokens_per_s
    w = bins.width_ms
    i0 = math.ceil(start_ms / w)
    i1 = min(math.floor(end_ms / w), bins.max_bins)
    n_bins = i1 - i0
    k = min(blocks, n_bins // 2)
    nan = math.nan
    if k < 4:
        return Observation("inconclusive", nan, nan, nan, threshold, start_ms / 1e3, end_ms / 1e3, 0)
    per = n_bins // k
    i0 = i1 - per * k  # drop the remainder at the start (the warm-up side)
    sums = bins.sums[i0:i1].reshape(k, per).sum(axis=1)
    means = sums / (per * w)
    block_s = per * w / 1000.0
    increments = np.diff(means) / block_s
    slope = float(increments.mean())
    dev = increments - slope
    gamma0 = float(dev @ dev) / len(dev)
    gamma1 = float(dev[:-1] @ dev[1:]) / len(dev)
    se = math.sqrt(max(gamma0, gamma0 + 2.0 * gamma1) / len(dev))
    half = float(stats.t.ppf(0.5 + level / 2, k - 2)) * se
    lo, hi = slope - half, slope + half
    if lo > 0 and slope >= threshold:
        verdict: Observed = "unstable"
    elif hi < threshold and lo <= 0:
        verdict = "stable"
    else:
        verdict = "inconclusive"
    return Observation(verdict, slope, lo, hi, threshold, i0 * w / 1e3, i1 * w / 1e3, k)


# ---------------------------------------------------------------- replicated (calibrated) test

DEFAULT_REPLICATES = 5
DEFAULT_REPLICATE_REQUESTS = 5000
"""Requests per replicate run of :func:`check_instability` (the calibrated default, see docs)."""


@dataclass(frozen=True, slots=True)
class ReplicatedVerdict:
    """The backlog drift tested across R independent replicate runs of one configuration.

    ``mean_slope_tokens_per_s`` is the mean of the replicates' slopes; ``ci_low``/``ci_high`` are
    its one-sided (1 - alpha) Student-t bounds (together a two-sided 1 - 2 alpha interval);
    ``threshold_tokens_per_s`` the materiality level (mean of the replicates' thresholds);
    ``p_value`` that of the one-sided test of H0 "mean slope <= threshold". ``fluid_ratio`` is the
    mean slope over the theory's fluid slope when that is positive (a work-conserving policy
    above capacity), else None.
    """

    verdict: Observed
    mean_slope_tokens_per_s: float
    ci_low_tokens_per_s: float
    ci_high_tokens_per_s: float
    threshold_tokens_per_s: float
    p_value: float
    replicates: int
    alpha: float
    fluid_slope_tokens_per_s: float | None
    fluid_ratio: float | None
    slopes_tokens_per_s: tuple[float, ...]


def _check_alpha(alpha: object) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
        raise ConfigError("alpha", alpha, "must lie strictly between 0 and 1")


def replicated_verdict(
    replicates: Sequence[Observation | Any],
    *,
    alpha: float = 0.05,
    fluid_slope_tokens_per_s: float | None = None,
) -> ReplicatedVerdict:
    """One-sided t test of the backlog drift over R >= 2 independent replicates (different seeds).

    Each replicate contributes its single-run slope (:func:`observe`: mean increment of the block
    means over the same relative window). Replicates are independent, so the across-replicate mean
    has an honest Student-t interval with R - 1 degrees of freedom, whatever the correlation of
    the backlog inside a run. H0: mean slope <= threshold (the materiality level, 2 % of the
    offered token rate), H1: above it. Verdict ``unstable`` when H0 is rejected at ``alpha``;
    ``stable`` when the one-sided upper bound is below the threshold (a drift, if any, is
    immaterial at level alpha); ``inconclusive`` otherwise. Replicates that are exactly equal (a
    deterministic setting) give p = 0 or 1 by the sign of mean - threshold.

    ``replicates`` are :class:`Observation` or run results (anything with ``observed`` and
    ``theory``); the fluid slope comes from the runs' theory unless given.
    """
    from scipy import stats
    try:
        items = list(replicates)
    except TypeError:
        raise ConfigError("replicates", replicates, "must be a sequence of runs or observations") from None
    if len(items) < 2:
        raise ConfigError("replicates", len(items), "need at least 2 independent replicates")
    _check_alpha(alpha)
    observations: list[Observation] = []
    fluids: list[float] = []
    for i, item in enumerate(items):
        obs = item if isinstance(item, Observation) else getattr(item, "observed", None)
        if not isinstance(obs, Observation):
            raise ConfigError("replicates", type(item).__name__,
                              f"replicate {i} is neither a run result nor an observation")
        if not math.isfinite(obs.slope_tokens_per_s):
            raise ConfigError("replicates", obs.verdict,
                              f"replicate {i} has no backlog slope (run too short for the trend test)")
        observations.append(obs)
        th = getattr(item, "theory", None)
        if th is not None:
            fluids.append(float(th.fluid_slope_tokens_per_s))
    fluid = fluid_slope_tokens_per_s
    if fluid is None and fluids:
        fluid = float(np.mean(fluids))
    slopes = np.array([o.slope_tokens_per_s for o in observations], dtype=np.float64)
    threshold = float(np.mean([o.threshold_tokens_per_s for o in observations]))
    r = len(slopes)
    mean = float(slopes.mean())
    se = float(slopes.std(ddof=1)) / math.sqrt(r)
    quantile = float(stats.t.ppf(1 - alpha, r - 1))
    if se > 0:
        p_value = float(stats.t.sf((mean - threshold) / se, r - 1))
    else:
        p_value = 0.0 if mean > threshold else 1.0
    lo, hi = mean - quantile * se, mean + quantile * se
    if p_value < alpha:
        verdict: Observed = "unstable"
    elif hi < threshold:
        verdict = "stable"
    else:
        verdict = "inconclusive"
    ratio = mean / fluid if fluid is not None and math.isfinite(fluid) and fluid > 0 else None
    return ReplicatedVerdict(
        verdict=verdict,
        mean_slope_tokens_per_s=mean,
        ci_low_tokens_per_s=lo,
        ci_high_tokens_per_s=hi,
        threshold_tokens_per_s=threshold,
        p_value=p_value,
        replicates=r,
        alpha=float(alpha),
        fluid_slope_tokens_per_s=fluid,
        fluid_ratio=ratio,
        slopes_tokens_per_s=tuple(float(s) for s in slopes),
    )



# ---------------------------------------------------------------- networks of engines

PEAK_GROWTH = 4.0
"""A stable-looking network whose backlog peak in the second half of the test window is at least
this many times the first half's is called inconclusive (measured on stable examples: at most
2.4x)."""
MIN_COMPLETED = 0.99
"""A network that drained at least as long as its arrivals lasted and still holds more than 1 %
of its requests is not called stable (a stable network completes almost all of them)."""


@dataclass(frozen=True, slots=True)
class NetworkEvidence:
    """What a network run shows about its stability, and the verdict drawn from it.

    ``backlog``: the trend test of the network's summed token backlog; ``requests``: the same
    test on the number of requests in the network (every class, a fork counted once);
    ``engines_unstable``: engines whose own backlog test says unstable; ``first_peak_tokens`` /
    ``second_peak_tokens``: the highest backlog (time-bin mean) in the first / second half of
    the test window; ``completed_fraction``: completed over arrived requests (refused ones left
    out) at the end of the run; ``drain_s``: how long the run went on after its arrivals.
    ``requests`` is an :class:`Observation` whose ``*_tokens_per_s`` fields are requests per
    second (its threshold: 2 % of the external arrival rate).
    """

    verdict: Observed
    reason: str
    backlog: Observation
    requests: Observation
    engines_unstable: tuple[str, ...]
    first_peak_tokens: float
    second_peak_tokens: float
    completed_fraction: float
    drain_s: float

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready summary."""
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "backlog_verdict": self.backlog.verdict,
            "backlog_slope_tokens_per_s": self.backlog.slope_tokens_per_s,
            "backlog_ci_low_tokens_per_s": self.backlog.ci_low_tokens_per_s,
            "backlog_ci_high_tokens_per_s": self.backlog.ci_high_tokens_per_s,
            "requests_verdict": self.requests.verdict,
            "requests_slope_per_s": self.requests.slope_tokens_per_s,
            "requests_ci_low_per_s": self.requests.ci_low_tokens_per_s,
            "requests_ci_high_per_s": self.requests.ci_high_tokens_per_s,
            "engines_unstable": list(self.engines_unstable),
            "first_peak_tokens": self.first_peak_tokens,
            "second_peak_tokens": self.second_peak_tokens,
            "completed_fraction": self.completed_fraction,
            "drain_s": self.drain_s,
        }


def window_peaks(bins: TimeBins, start_ms: float, end_ms: float) -> tuple[float, float]:
    """The highest bin mean of ``bins`` in the first and in the second half of [start, end)
    (NaN for a half without a whole bin)."""
    w = bins.width_ms
    i0 = math.ceil(start_ms / w)
    i1 = min(math.floor(end_ms / w), bins.max_bins)
    mid = (i0 + i1) // 2
    means = bins.sums / w
    first = float(means[i0:mid].max()) if mid > i0 else math.nan
    second = float(means[mid:i1].max()) if i1 > mid else math.nan
    return first, second


def network_evidence(
    backlog_bins: TimeBins,
    requests_bins: TimeBins,
    start_ms: float,
    window_end_ms: float,
    end_ms: float,
    offered_tokens_per_s: float,
    arrival_rate_per_s: float,
    engines: Mapping[str, Observation],
    arrived: int,
    completed: int,
    backlog: Observation | None = None,
) -> NetworkEvidence:
    """Gather a network run's evidence (see :class:`NetworkEvidence`) and draw its verdict
    (:func:`network_verdict`). ``backlog``: the token-backlog test if already computed."""
    if backlog is None:
        backlog = observe(backlog_bins, start_ms, window_end_ms, offered_tokens_per_s)
    requests = observe(requests_bins, start_ms, window_end_ms, arrival_rate_per_s)
    first, second = window_peaks(backlog_bins, start_ms, window_end_ms)
    unstable = tuple(name for name, obs in engines.items() if obs.verdict == "unstable")
    done = completed / arrived if arrived > 0 else math.nan
    drain_s = max(0.0, end_ms - window_end_ms) / 1000.0
    verdict, reason = network_verdict(backlog, requests, unstable, first, second, done,
                                      drain_s, window_end_ms / 1000.0)
    return NetworkEvidence(verdict, reason, backlog, requests, unstable, first, second, done, drain_s)


def network_verdict(
    backlog: Observation,
    requests: Observation,
    engines_unstable: Sequence[str],
    first_peak_tokens: float,
    second_peak_tokens: float,
    completed_fraction: float,
    drain_s: float,
    arrival_window_s: float,
) -> tuple[Observed, str]:
    """The network's observed verdict from its evidence, and the reason (docs/stability.md,
    "Networks of engines").

    ``unstable`` when (1) the token backlog's trend test says so; or (2) the requests in the
    network grow (their trend test says unstable: interval above 0, slope at least 2 % of the
    external arrival rate) and the token backlog's slope is positive; or (3) an engine's own
    test says unstable and the network's backlog slope interval lies above 0. ``stable`` when
    the token backlog's test says stable and nothing contradicts it: the requests test is not
    unstable, no engine is unstable, the backlog's peak in the window's second half is less
    than ``PEAK_GROWTH`` times the first half's, and a run that drained at least as long as its
    arrival window completed at least ``MIN_COMPLETED`` of its requests. Else ``inconclusive``.
    """
    slope, lo, hi = backlog.slope_tokens_per_s, backlog.ci_low_tokens_per_s, backlog.ci_high_tokens_per_s
    trend = f"backlog slope {slope:+,.0f} tokens/s [{lo:+,.0f}, {hi:+,.0f}]"
    counted = (f"requests in network {requests.slope_tokens_per_s:+,.3g}/s "
               f"[{requests.ci_low_tokens_per_s:+,.3g}, {requests.ci_high_tokens_per_s:+,.3g}]")
    if backlog.verdict == "unstable":
        return "unstable", f"the backlog grows: {trend}"
    if requests.verdict == "unstable" and slope > 0:
        return "unstable", f"requests pile up: {counted}; {trend}"
    if engines_unstable and lo > 0:
        return "unstable", (f"engine(s) {', '.join(engines_unstable)} grow, and so does the network's "
                            f"backlog: {trend}")
    doubts = []
    if requests.verdict == "unstable":
        doubts.append(f"{counted} although the backlog does not grow")
    if engines_unstable:
        doubts.append(f"engine(s) {', '.join(engines_unstable)} grow")
    if second_peak_tokens >= PEAK_GROWTH * first_peak_tokens > 0:
        doubts.append(f"the backlog's peak grew {second_peak_tokens / first_peak_tokens:.1f}x over the "
                      "window")
    if drain_s >= arrival_window_s and completed_fraction < MIN_COMPLETED:
        doubts.append(f"only {completed_fraction:.1%} of the requests completed in a drain of "
                      f"{drain_s:,.0f} s")
    if backlog.verdict == "stable" and not doubts:
        return "stable", f"no growth: {trend}; {counted}"
    if backlog.verdict == "stable":
        return "inconclusive", f"{trend}, but " + "; ".join(doubts)
    if math.isnan(slope):
        return "inconclusive", "run too short for the trend tests"
    return "inconclusive", f"{trend} (run too short or too noisy); {counted}" + "".join(
        f"; {d}" for d in doubts)
