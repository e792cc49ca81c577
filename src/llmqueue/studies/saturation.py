"""Capacity by the saturation rule: the throughput of the engine with an infinite backlog.

For monotone-separable systems the stability region is ``lambda`` below the throughput of the
saturated system (Baccelli & Foss 1995). With a KV cache the closed-form limit
(:func:`llmqueue.theory.capacity.memory_load`) misses what greedy admission and recompute preemption cost;
the saturated run includes it. Our engine with preemption is not proven monotone-separable: the
rule is checked by simulation (``tests/test_saturation.py``, docs/memory.md).

The saturated system is approximated by ``requests`` requests all present at time 0, with sizes
drawn from the workload's length distributions; the completion rate is measured over a middle
window that leaves out the start transient and the final drain.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

from llmqueue.engines.reference import PolicyFn
from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import BatchTime, ShapeTime, mix_batch_time
from llmqueue.model.memory import KVCache
from llmqueue.model.specs import parse_size
from llmqueue.model.workload import DeterministicArrivals, Request, SizeDist, Workload
from llmqueue.sim.run import EngineKind, simulate
from llmqueue.sim.settings import SATURATION_MIN_REQUESTS, SATURATION_REQUESTS

__all__ = [
    "DEFAULT_REQUESTS",
    "MIN_REQUESTS",
    "SaturationResult",
    "saturated_throughput",
    "saturated_throughput_for",
]

DEFAULT_REQUESTS = SATURATION_REQUESTS
"""Requests in the saturated run (``llmqueue.sim.settings.SATURATION_REQUESTS``)."""

MIN_REQUESTS = SATURATION_MIN_REQUESTS
"""Fewest requests that leave a measuring window worth the name."""

# Safety net on the run's length: this many times the time of serving every token in its own
# full-time batch (a policy that never finishes cannot run for ever).
_HORIZON_FACTOR = 4.0


@dataclass(frozen=True, slots=True)
class SaturationResult:
    """Throughput of the saturated engine over the measuring window, and what thrash cost.

    ``token_rate_per_s`` is the rate of useful tokens (prompt and output, recomputed ones
    excluded) produced in the window; ``request_rate_per_s`` is that over the workload's mean
    request size m_p + m_d, the rate to compare with an arrival rate. ``ci_low_per_s`` and
    ``ci_high_per_s`` bound it at ``level`` from ``batches`` equal-time batch means (Student t,
    batches taken as independent). ``completion_rate_per_s`` counts completions in the window
    (``window_requests``) instead: the same in the long run, lumpier when requests finish in
    cohorts. ``preemptions`` and ``recomputed_tokens_per_request`` (per completed request) are over
    the whole run.
    """

    request_rate_per_s: float
    token_rate_per_s: float
    completion_rate_per_s: float
    ci_low_per_s: float
    ci_high_per_s: float
    level: float
    batches: int
    recomputed_tokens_per_request: float
    preemptions: int
    window_start_s: float
    window_end_s: float
    window_requests: int
    requests: int
    completed: int
    seed: int

    def as_dict(self) -> dict[str, float | int]:
        """Flat mapping of the fields."""
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


# ---------------------------------------------------------------- validation


def _int_at_least(value: object, field: str, low: int) -> int:
    """``value`` as an int >= ``low`` (bools and fractions rejected)."""
    if isinstance(value, bool):
        raise ConfigError(field, value, f"must be an integer >= {low}")
    try:
        x = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(field, value, f"must be an integer >= {low}") from None
    if x < low:
        raise ConfigError(field, value, f"must be an integer >= {low}")
    return x


def _fraction(value: object, field: str, high: float) -> float:
    """``value`` as a float in [0, high)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < high:
        raise ConfigError(field, value, f"must be a number in [0, {high:g})")
    return float(value)


def _size(dist: SizeDist | str, field: str) -> SizeDist:
    """A size distribution, parsed from its spec when given as text."""
    if isinstance(dist, str):
        return parse_size(dist, field)
    return dist  # Workload validates the type


# ---------------------------------------------------------------- the measurement


def saturated_throughput(
    policy: PolicyFn,
    batch_time: BatchTime | ShapeTime,
    budget: int,
    k_max: int | None,
    memory: KVCache | None,
    prefill: SizeDist | str,
    decode: SizeDist | str,
    *,
    seed: int = 0,
    requests: int = DEFAULT_REQUESTS,
    warmup: float = 0.1,
    cooldown: float = 0.1,
    batches: int = 10,
    level: float = 0.95,
    engine: EngineKind = "auto",
) -> SaturationResult:
    """Throughput of ``policy`` with every request present from the start (the saturation rule).

    ``prefill``/``decode`` are size distributions (or their specs, e.g. ``lognormal:mean=300,
    sigma=0.6``); with ``seed`` the sizes are those of a workload's stream with that seed. The
    rate is the useful token rate over the mean request size, measured from the completion of the
    ``warmup`` fraction of the requests to that of all but the ``cooldown`` fraction (no start
    transient, no final drain). ``memory`` None means an unlimited cache.
    """
    sizes = Workload(DeterministicArrivals(1.0), _size(prefill, "prefill"), _size(decode, "decode"))
    return saturated_throughput_for(
        sizes, policy, batch_time, budget, k_max, memory, seed=seed, requests=requests,
        warmup=warmup, cooldown=cooldown, batches=batches, level=level, engine=engine,
    )


def saturated_throughput_for(
    workload: Workload,
    policy: PolicyFn,
    batch_time: BatchTime | ShapeTime,
    budget: int,
    k_max: int | None,
    memory: KVCache | None,
    *,
    seed: int = 0,
    requests: int = DEFAULT_REQUESTS,
    warmup: float = 0.1,
    cooldown: float = 0.1,
    batches: int = 10,
    level: float = 0.95,
    engine: EngineKind = "auto",
) -> SaturationResult:
    """:func:`saturated_throughput` with the sizes of ``workload``'s first ``requests`` requests
    (seed ``seed``; a trace gives its own, jointly sampled sizes); its arrival times are ignored."""
    from scipy import stats
    if not isinstance(workload, Workload):
        raise ConfigError("workload", type(workload).__name__, "must be a Workload")
    n = _int_at_least(requests, "requests", MIN_REQUESTS)
    seed = _int_at_least(seed, "seed", 0)
    budget = _int_at_least(budget, "budget", 1)
    if k_max is not None:
        _int_at_least(k_max, "k_max", 1)
    if memory is not None and not isinstance(memory, KVCache):
        raise ConfigError("memory", memory, "must be a KVCache or None (unlimited)")
    lo_frac = _fraction(warmup, "warmup", 0.5)
    hi_frac = _fraction(cooldown, "cooldown", 0.5)
    if lo_frac + hi_frac > 0.9:
        raise ConfigError("cooldown", cooldown, f"warmup + cooldown must be <= 0.9 (warmup {warmup:g})")
    k = _int_at_least(batches, "batches", 2)
    if isinstance(level, bool) or not isinstance(level, int | float) or not 0 < level < 1:
        raise ConfigError("level", level, "must lie strictly between 0 and 1")

    drawn = [Request(r.id, 0.0, r.prefill_tokens, r.decode_tokens)
             for r in workload.requests(seed, max_requests=n)]
    if len(drawn) < MIN_REQUESTS:
        raise ConfigError("requests", len(drawn), f"the workload gives fewer than {MIN_REQUESTS} requests")
    result = simulate(drawn, policy, batch_time, budget, k_max=k_max, seed=seed, memory=memory,
                      engine=engine, drain_s=_horizon_s(drawn, batch_time, budget))

    mean_tokens = workload.mean_prefill_tokens + workload.mean_decode_tokens
    records = [r for r in (result.requests or ()) if math.isfinite(r.finish_ms)]
    completed = len(records)
    first = np.fromiter((r.first_token_ms for r in records), np.float64, completed)
    finish = np.fromiter((r.finish_ms for r in records), np.float64, completed)
    prefill = np.fromiter((r.prefill_tokens for r in records), np.float64, completed)
    decode = np.fromiter((r.decode_tokens for r in records), np.float64, completed)
    ends = np.sort(finish)
    i = math.floor(lo_frac * completed)
    j = math.ceil((1.0 - hi_frac) * completed) - 1
    if j - i < k or not ends[j] > ends[i]:
        raise ConfigError("requests", n, f"only {completed} request(s) completed: too few to measure a rate")
    t0, t1 = float(ends[i]), float(ends[j])
    edges = np.linspace(t0, t1, k + 1)
    width_s = (t1 - t0) / 1000.0 / k
    produced = _tokens_between(edges, first, finish, prefill, decode)
    rates = produced / width_s / mean_tokens  # requests/s per batch of the window
    rate = float(rates.mean())
    half = float(stats.t.ppf(0.5 + level / 2, k - 1)) * float(rates.std(ddof=1)) / math.sqrt(k)
    metrics = result.metrics
    return SaturationResult(
        request_rate_per_s=rate,
        token_rate_per_s=rate * mean_tokens,
        completion_rate_per_s=(j - i) / (k * width_s),
        ci_low_per_s=rate - half,
        ci_high_per_s=rate + half,
        level=float(level),
        batches=k,
        recomputed_tokens_per_request=metrics.recomputed_tokens / max(metrics.completed, 1),
        preemptions=metrics.preemptions,
        window_start_s=t0 / 1000.0,
        window_end_s=t1 / 1000.0,
        window_requests=j - i,
        requests=len(drawn),
        completed=completed,
        seed=seed,
    )


def _tokens_between(edges: np.ndarray, first: np.ndarray, finish: np.ndarray, prefill: np.ndarray,
                    decode: np.ndarray) -> np.ndarray:
    """Useful tokens produced between consecutive ``edges`` (ms) by completed requests: a prompt
    at its first token, the output spread evenly from the first token to the finish.

    Counting tokens, not completions, keeps the estimate smooth when requests finish in cohorts
    (equal sizes).
    """
    lo, hi = edges[:-1], edges[1:]
    out = np.histogram(first, bins=edges, weights=prefill)[0].astype(np.float64)
    span = finish - first
    spread = span > 0
    a, b = first[spread, None], finish[spread, None]
    overlap = np.clip(np.minimum(b, hi) - np.maximum(a, lo), 0.0, None) / (b - a)
    out += decode[spread] @ overlap
    out += np.histogram(finish[~spread], bins=edges, weights=decode[~spread])[0]
    return out


def _horizon_s(drawn: list[Request], batch_time: BatchTime | ShapeTime, budget: int) -> float:
    """A generous bound on the run's length (s): every token in its own batch of the longest
    time a batch of at most ``budget`` tokens takes, times a safety factor."""
    prefill = np.fromiter((r.prefill_tokens for r in drawn), np.float64, len(drawn))
    decode = np.fromiter((r.decode_tokens for r in drawn), np.float64, len(drawn))
    token_time = mix_batch_time(batch_time, float(prefill.mean()), float(decode.mean()))
    t_max = float(np.max(token_time.times_ms(np.arange(1, budget + 1, dtype=np.int64))))
    return _HORIZON_FACTOR * float((prefill + decode + 1).sum()) * t_max / 1000.0 + 60.0
