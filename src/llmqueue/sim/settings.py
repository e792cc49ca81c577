"""Setting resolution, one copy: arrival and size specs plus a rate or a load, with the engine's
batch time and budget, become a :class:`~llmqueue.model.workload.Workload` at a definite rate.

The CLI, sweeps and the SLO search all call :func:`resolve_workload`, so ``--load`` means the same
thing everywhere: a fraction of the critical rate ``lambda* = b / (t(b) (m_p + m_d))`` of the
batch time seen through the workload's mix (a composition model's token view, docs/memory.md).
"""

from __future__ import annotations

from llmqueue.errors import ConfigError
from llmqueue.limits import MAX_LOAD, MAX_RATE_PER_S, MIN_RATE_PER_S, check_real
from llmqueue.model.batchtime import DEFAULT_BATCH_TIME, BatchTime, ShapeTime, mix_batch_time
from llmqueue.model.specs import is_trace_spec, make_workload
from llmqueue.model.workload import TraceArrivals, Workload
from llmqueue.theory import capacity as theory

DEFAULT_PREFILL = "129"
DEFAULT_DECODE = "112"
DEFAULT_BUDGET = 512
DEFAULT_LOAD = 0.9
"""The load of a run that names neither a rate nor a load nor a trace."""
DEFAULT_REQUESTS = 5000
"""Arrivals of a run that names neither a number of requests, a duration nor a trace."""
SATURATION_REQUESTS = 4000
"""Requests in a saturated run (``capacity --saturation-requests``): a few seconds on the reference engine,
rate within ~2 %."""
SATURATION_MIN_REQUESTS = 100
"""Fewest requests of a saturated run that leave a measuring window worth the name."""
DEFAULT_NETWORK_REQUESTS = 20000
"""External arrivals (all classes) of a network run that names neither a number nor a duration."""

__all__ = [
    "DEFAULT_BATCH_TIME",
    "DEFAULT_BUDGET",
    "DEFAULT_DECODE",
    "DEFAULT_LOAD",
    "DEFAULT_NETWORK_REQUESTS",
    "DEFAULT_PREFILL",
    "DEFAULT_REQUESTS",
    "arrival_limit",
    "default_sizes",
    "is_trace_spec",
    "rate_for_load",
    "resolve_workload",
]


def default_sizes(arrival: str, prefill: str | None, decode: str | None) -> tuple[str | None, str | None]:
    """(prefill, decode) specs with the defaults: 129 + 112 tokens, or the trace's own sizes."""
    trace = is_trace_spec(arrival)
    return (
        prefill if prefill is not None else (None if trace else DEFAULT_PREFILL),
        decode if decode is not None else (None if trace else DEFAULT_DECODE),
    )


def arrival_limit(max_requests: int | None, duration_s: float | None, workload: Workload | None = None,
                  default: int = DEFAULT_REQUESTS) -> int | None:
    """The arrivals a run stops after: ``max_requests``, else ``default`` unless a duration or a
    trace replay (which ends by itself) bounds the run; None when they do."""
    if max_requests is not None or duration_s is not None:
        return max_requests
    if workload is not None and isinstance(workload.arrival, TraceArrivals):
        return None
    return default


def rate_for_load(load: float, batch_time: BatchTime | ShapeTime, budget: int,
                  mean_prefill_tokens: float, mean_decode_tokens: float) -> float:
    """The arrival rate (requests/s) at ``load`` times the critical rate of this setting."""
    load = check_real("load", load, 0.0, MAX_LOAD, low_open=True)
    token_time = mix_batch_time(batch_time, mean_prefill_tokens, mean_decode_tokens)
    lam = theory.critical_rate_per_s(token_time, budget, mean_prefill_tokens + mean_decode_tokens)
    rate = load * lam
    if not MIN_RATE_PER_S <= rate <= MAX_RATE_PER_S:
        raise ConfigError("load", load, f"gives {rate:.4g} requests/s, outside "
                          f"[{MIN_RATE_PER_S:g}, {MAX_RATE_PER_S:g}]")
    return rate


def resolve_workload(arrival: str, prefill: str | None, decode: str | None, *,
                     batch_time: BatchTime | ShapeTime, budget: int, rate: float | None = None,
                     load: float | None = None, default_load: float | None = DEFAULT_LOAD,
                     max_requests: int | None = None) -> Workload:
    """The workload of a setting. ``rate`` (requests/s) and ``load`` are exclusive; with neither,
    a trace keeps its own rate and anything else runs at ``default_load`` (None: an error).

    A trace replay at a ``load`` takes the mean sizes of the requests the run replays (its first
    ``max_requests``), so the simulated requests are at that load, not the whole file."""
    if rate is not None and load is not None:
        raise ConfigError("rate", rate, f"give a rate or a load, not both (load {load!r})")
    if rate is not None:
        rate = check_real("rate", rate, MIN_RATE_PER_S, MAX_RATE_PER_S)
    prefill, decode = default_sizes(arrival, prefill, decode)
    trace = is_trace_spec(arrival)
    if rate is None and load is None and not trace:
        if default_load is None:
            raise ConfigError("rate", None, "give a rate or a load")
        load = default_load
    if load is None:
        return make_workload(arrival, prefill, decode, rate)
    probe = make_workload(arrival, prefill, decode, None if trace else 1.0)
    _, mean_p, mean_d = probe.offered(max_requests)
    rate = rate_for_load(load, batch_time, budget, mean_p, mean_d)
    return make_workload(arrival, prefill, decode, rate)
