"""Stability verdicts: what the theorems predict for a setting, and what a run's backlog shows.

*Predicted* comes from the paper's results (§3, §4): the capacity bound holds for every policy;
throughput optimality holds for work-conserving (K_p, K_d)-FCFS policies without a batch-size
limit. *Observed* is a trend test on the time-averaged backlog over the run's arrival window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

from llmqueue.metrics import TimeBins

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
) -> Prediction:
    """Verdict of the theorems.

    ``load_full_batches`` is ``lambda (m_p + m_d) / (b / t(b))``; ``load_best_batches`` the same
    against ``max_n n / t(n)`` (the bound on any policy); ``kmax_load`` the load against the
    batch-size-limit region (None without ``k_max``).
    """
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
