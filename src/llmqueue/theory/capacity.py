"""The paper's capacity theory for one engine (§3) and its batch-size-limit region (§4).

Pure functions of a batch-time model ``bt`` (t(n) in ms) and a token budget ``b``. Token rates are
in tokens per ms unless the name says ``_per_s``; request rates are in requests per second.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import BatchTime, mean_decode_context
from llmqueue.model.memory import KVCache

__all__ = [
    "BudgetChoice",
    "best_budget",
    "capacity_tokens_per_ms",
    "critical_rate_per_s",
    "effective_k_max",
    "fluid_slope_tokens_per_s",
    "kmax_load",
    "load",
    "max_throughput",
    "memory_batch_limit",
    "memory_load",
    "region_vertices",
]

# Relative slack when comparing floats (t(b) <= cap, near-ties of b/t(b), hull collinearity).
_REL_TOL = 1e-12
# Pareto fronts longer than this are pruned with qhull before the exact hull walk.
_QHULL_MIN_POINTS = 2000


@dataclass(frozen=True, slots=True)
class BudgetChoice:
    """A token budget with its iteration time and the throughput b/t(b) it reaches."""

    budget: int
    t_ms: float
    tokens_per_s: float


# ---------------------------------------------------------------- validation


def _budget(value: object, field: str = "budget") -> int:
    """``value`` as an int >= 1 (bools and fractional values rejected)."""
    if isinstance(value, bool):
        raise ConfigError(field, value, "must be an integer >= 1")
    try:
        b = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        if isinstance(value, float) and value.is_integer():
            b = int(value)
        else:
            raise ConfigError(field, value, "must be an integer >= 1") from None
    if b < 1:
        raise ConfigError(field, value, "must be an integer >= 1")
    return b


def _nonneg(value: object, field: str) -> float:
    """``value`` as a finite float >= 0."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(field, value, "must be a number") from None
    if not math.isfinite(x) or x < 0:
        raise ConfigError(field, value, "must be a finite number >= 0")
    return x


def _positive(value: object, field: str) -> float:
    """``value`` as a finite float > 0."""
    x = _nonneg(value, field)
    if x == 0:
        raise ConfigError(field, value, "must be > 0")
    return x


# ---------------------------------------------------------------- §3 capacity


def capacity_tokens_per_ms(bt: BatchTime, budget: int) -> float:
    """b / t(b): the token rate a work-conserving policy reaches when every batch is full."""
    b = _budget(budget)
    return b / bt(b)


def max_throughput(bt: BatchTime, budget: int) -> tuple[int, float]:
    """(n*, max over 1 <= n <= b of n / t(n)) in tokens/ms: the throughput bound on ANY policy.

    It equals b/t(b) (and n* = b) for linear t, and for the staircase and piecewise models of the
    paper when b is a multiple of b0 (staircase) or c >= a*b0 or b <= b0 (piecewise). It is larger
    for a staircase whose b0 does not divide b (the last, partly filled block costs a full step),
    for a piecewise model with c < a*b0 (n/t(n) falls after n = b0), and for measured tables.
    The value is the exact maximum; n* is the smallest n within a relative 1e-12 of it (so
    rounding does not pick between equal ratios). Vectorised: b up to 10^6 takes milliseconds.
    """
    b = _budget(budget)
    n = np.arange(1, b + 1, dtype=np.int64)
    times = np.asarray(bt.times_ms(n), dtype=np.float64)
    bad = ~((times > 0) & np.isfinite(times))
    if bad.any():
        first = int(np.argmax(bad))
        raise ConfigError("batch-time", float(times[first]),
                          f"t({first + 1}) must be a positive finite time")
    rate = n / times
    best = float(rate.max())
    i = int(np.argmax(rate >= best * (1.0 - _REL_TOL)))
    return int(n[i]), best


def critical_rate_per_s(bt: BatchTime, budget: int, mean_tokens: float) -> float:
    """lambda* = (b / t(b)) / (m_p + m_d) in requests/s; ``mean_tokens`` is m_p + m_d."""
    m = _positive(mean_tokens, "mean_tokens")
    return capacity_tokens_per_ms(bt, budget) / m * 1000.0


def load(rate_per_s: float, bt: BatchTime, budget: int, mean_tokens: float) -> float:
    """rho = lambda (m_p + m_d) / (b / t(b)): below 1 every work-conserving policy is stable."""
    lam = _nonneg(rate_per_s, "rate_per_s")
    m = _positive(mean_tokens, "mean_tokens")
    return lam * m / (capacity_tokens_per_ms(bt, budget) * 1000.0)


def fluid_slope_tokens_per_s(
    rate_per_s: float, bt: BatchTime, budget: int, mean_tokens: float
) -> float:
    """Fluid backlog growth max(0, lambda (m_p + m_d) - b/t(b)) in tokens/s (work-conserving)."""
    lam = _nonneg(rate_per_s, "rate_per_s")
    m = _positive(mean_tokens, "mean_tokens")
    return max(0.0, lam * m - capacity_tokens_per_ms(bt, budget) * 1000.0)


def best_budget(bt: BatchTime, max_iteration_ms: float, max_budget: int = 2**20) -> BudgetChoice:
    """The budget b <= max_budget with the largest b/t(b) among those with t(b) <= the cap.

    Ties (within a relative 1e-12) go to the smallest b; t(b) may exceed the cap by a relative
    1e-12 to absorb rounding. Raises ConfigError when no b fits, or when t(max_budget) is still
    within the cap (e.g. constant t): then the budget is unbounded under this model.
    """
    cap = _positive(max_iteration_ms, "max_iteration_ms")
    top = _budget(max_budget, "max_budget")
    n = np.arange(1, top + 1, dtype=np.int64)
    t = bt.times_ms(n)
    fits = t <= cap * (1.0 + _REL_TOL)
    if not fits.any():
        raise ConfigError("max_iteration_ms", cap, f"no budget fits: t(1) = {t[0]:g} ms")
    if fits[-1]:
        raise ConfigError(
            "max_iteration_ms",
            cap,
            f"budget unbounded under {bt.spec}: t({top}) = {t[-1]:g} ms is still within the cap",
        )
    rate = np.where(fits, n / t, -np.inf)
    best = float(rate.max())
    i = int(np.argmax(rate >= best * (1.0 - _REL_TOL)))
    return BudgetChoice(budget=int(n[i]), t_ms=float(t[i]), tokens_per_s=float(rate[i]) * 1000.0)


# ---------------------------------------------------------------- §4 batch-size limit


def _composition_rates(bt: BatchTime, budget: int, k_max: int | None) -> np.ndarray:
    """Rate vectors (x, y)/t(x+y) in tokens/ms of the extreme feasible compositions, shape (m, 2).

    For each n <= b: pure prefill (n, 0) and the most decode-heavy mix (n - ymax, ymax) with
    ymax = n if n <= k_max (pure decode) else k_max - 1 (one prefill request takes a slot).
    """
    b = _budget(budget)
    n = np.arange(1, b + 1, dtype=np.int64)
    t = bt.times_ms(n)
    if k_max is None:
        ymax = n
    else:
        k = _budget(k_max, "k_max")
        ymax = np.where(n <= k, n, k - 1)
    prefill = np.column_stack([n / t, np.zeros_like(t)])
    mixed = np.column_stack([(n - ymax) / t, ymax / t])
    return np.vstack([prefill, mixed])


def _pareto_front(points: np.ndarray) -> np.ndarray:
    """Non-dominated points, sorted by x ascending (y then strictly descending)."""
    order = np.lexsort((-points[:, 1], -points[:, 0]))
    p = points[order]
    prev_max = np.concatenate(([-np.inf], np.maximum.accumulate(p[:-1, 1])))
    return p[p[:, 1] > prev_max][::-1]


def _upper_hull(front: np.ndarray) -> np.ndarray:
    """Concave (upper-right) hull chain of a Pareto front sorted by x ascending."""
    from scipy.spatial import (
        ConvexHull,
        QhullError,
    )
    unit = front / float(front.max())  # turn tests on O(1) numbers, whatever the units
    candidates = np.arange(len(front))
    if len(front) > _QHULL_MIN_POINTS:  # prune with qhull (C) before the exact Python chain
        try:
            qhull = ConvexHull(np.vstack([np.zeros((1, 2)), unit]))
            candidates = np.sort(qhull.vertices[qhull.vertices > 0] - 1)
        except QhullError:
            pass
    hull: list[int] = []  # positions in candidates
    pts = unit[candidates].tolist()
    for i, (x, y) in enumerate(pts):
        while len(hull) >= 2:
            (ox, oy), (ax, ay) = pts[hull[-2]], pts[hull[-1]]
            cross = (ax - ox) * (y - oy) - (ay - oy) * (x - ox)
            if cross < -_REL_TOL:  # strict right turn: hull[-1] is a vertex
                break
            hull.pop()
        hull.append(i)
    return front[candidates[hull]]


def region_vertices(bt: BatchTime, budget: int, k_max: int | None) -> np.ndarray:
    """Upper-right vertices of the stability region, shape (m, 2), (prefill, decode) tokens/ms.

    **(reconstructed, §4)** The region is the downward-closed convex hull of the rate vectors
    (x, y)/t(x + y) of the compositions with x + y <= b and y + 1{x > 0} <= k_max. Returned are
    the vertices of its outer boundary, from the top (most decode) to the right (most prefill),
    sorted by increasing prefill rate; each is the rate vector of one composition.
    """
    return _upper_hull(_pareto_front(_composition_rates(bt, budget, k_max)))


def kmax_load(
    rate_prefill_tokens_per_ms: float,
    rate_decode_tokens_per_ms: float,
    bt: BatchTime,
    budget: int,
    k_max: int | None,
) -> float:
    """The smallest rho with (lambda_p, lambda_d)/rho in the §4 region: stable needs rho < 1.

    Solved as the linear program min sum(w) s.t. sum_i w_i v_i >= (lambda_p, lambda_d), w >= 0
    over the region's vertices v_i (scipy linprog, HiGHS); rho = 1/theta* for the largest
    scaling theta* of the arrival vector inside the region. With k_max=None this is
    (lambda_p + lambda_d) / max_n n/t(n), i.e. :func:`load` when b/t(b) is the maximum.
    """
    from scipy.optimize import linprog
    lam = np.array(
        [
            _nonneg(rate_prefill_tokens_per_ms, "rate_prefill_tokens_per_ms"),
            _nonneg(rate_decode_tokens_per_ms, "rate_decode_tokens_per_ms"),
        ]
    )
    vertices = region_vertices(bt, budget, k_max)
    if not lam.any():
        return 0.0
    # rho is homogeneous in lam and 1/v: solve on unit-scaled data so HiGHS sees O(1) numbers
    lam_scale, v_scale = float(lam.max()), float(vertices.max())
    res = linprog(
        c=np.ones(len(vertices)),
        A_ub=-(vertices / v_scale).T,
        b_ub=-(lam / lam_scale),
        bounds=(0, None),
        method="highs",
    )
    if res.status != 0:  # cannot happen: the vertices span both axes
        raise RuntimeError(f"kmax_load: linear program failed: {res.message}")
    return float(res.fun) * lam_scale / v_scale


# ---------------------------------------------------------------- KV-cache memory


def memory_batch_limit(
    memory: KVCache, mean_prefill_tokens: float, mean_decode_tokens: float,
    decode_context_tokens: float | None = None,
) -> int:
    """The most requests that can decode at once in ``memory``: the usable cache (all blocks but
    the watermark) over a decoding request's mean footprint.

    A request holds its context, prompt plus decoded tokens, rounded up to whole blocks. Over its
    decode steps the context averages ``decode_context_tokens`` (token-weighted; default
    ``p + (d + 1) / 2``), and rounding adds half a block less half a token on average. In a
    saturated engine every resident request decodes in every batch, so this bounds the requests
    per batch like the paper's ``k_max`` (§4): the effective limit is ``min(k_max, this)``.
    """
    p = _nonneg(mean_prefill_tokens, "mean_prefill_tokens")
    d = _nonneg(mean_decode_tokens, "mean_decode_tokens")
    context = mean_decode_context(p, d) if decode_context_tokens is None else _nonneg(
        decode_context_tokens, "decode_context_tokens")
    footprint = context + (memory.block_tokens - 1) / 2
    usable = (memory.total_blocks - memory.watermark_blocks) * memory.block_tokens
    return max(1, int(usable // footprint)) if footprint > 0 else memory.total_blocks


def effective_k_max(
    memory: KVCache, mean_prefill_tokens: float, mean_decode_tokens: float, k_max: int | None,
    decode_context_tokens: float | None = None,
) -> int:
    """The batch-size limit with the cache: ``min(k_max, memory_batch_limit(...))``."""
    k_mem = memory_batch_limit(memory, mean_prefill_tokens, mean_decode_tokens, decode_context_tokens)
    return k_mem if k_max is None else min(k_max, k_mem)


def memory_load(
    rate_per_s: float, mean_prefill_tokens: float, mean_decode_tokens: float, bt: BatchTime,
    budget: int, k_max: int | None, memory: KVCache, decode_context_tokens: float | None = None,
) -> tuple[float, int]:
    """(load, effective k) of the §4 region with the batch-size limit ``min(k_max, memory
    limit)``: stable needs load < 1. Compare with the memory-free load to see which binds."""
    lam = _nonneg(rate_per_s, "rate_per_s") / 1000.0
    k = effective_k_max(memory, mean_prefill_tokens, mean_decode_tokens, k_max, decode_context_tokens)
    rho = kmax_load(lam * mean_prefill_tokens, lam * mean_decode_tokens, bt, budget, k)
    return rho, k
