"""Upper (and lower) bounds on every number a user can give, in one place.

Every bound is far beyond any real deployment and far inside what the engines represent exactly
(int64 token counts, float64 milliseconds), so a value outside is a typo or an attack, never a
setting: it is refused with one line naming the field, before any work starts. The CLI shows these
bounds in ``--help``; ``docs/limits.md`` lists them.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

from llmqueue.errors import ConfigError

MAX_TOKENS = 10**9
"""Largest token count or mean token count of one request (prompt or output)."""

MAX_BUDGET_TOKENS = 10**7
"""Largest token budget b per batch (and the largest batch a batch-time model is asked about)."""

MAX_BATCH_REQUESTS = 10**7
"""Largest k_max, K_p, K_d (requests per batch)."""

MAX_REQUESTS = 10**10
"""Largest number of arrivals in one run (about 14 hours of the compiled engine)."""

MAX_SEED = 2**63 - 1
"""Largest random seed."""

MAX_RATE_PER_S = 1e7
"""Largest arrival rate (requests/s)."""

MIN_RATE_PER_S = 1e-6
"""Smallest arrival rate (requests/s): one request in about 11.6 days."""

MAX_LOAD = 1e3
"""Largest --load (fraction of the critical rate)."""

MAX_DURATION_S = 1e9
"""Largest simulated duration or drain allowance (s), about 31 years."""

MAX_TIME_MS = 1e9
"""Largest time parameter of a batch-time model (ms per batch or per token)."""

MAX_KV_TOKENS = 10**12
"""Largest KV cache (tokens)."""

MAX_GPU_GIB = 1e6
"""Largest GPU memory (GiB) when the cache is sized from the GPU."""

MAX_SEEDS = 1000
"""Most replicated seeds per evaluated rate (capacity --slo)."""

MAX_WORKERS = 1024
"""Most local worker processes of a sweep."""

MAX_GRID_RUNS = 10**6
"""Most runs one sweep grid may expand to."""

MIN_TOLERANCE = 1e-6
"""Smallest relative width of the SLO rate search (finer is below simulation noise)."""

MAX_SCALE = 1e6
"""Largest multiplier of a network's arrival rates."""


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_int(field: str, value: object, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``; ConfigError naming ``field`` otherwise.

    An integral float (``5000.0``, as TOML writes ``5e3``) is accepted; ``1.5`` is not.
    """
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise ConfigError(field, value, "must be an integer")
    ivalue = int(value)  # type: ignore[call-overload]
    if not low <= ivalue <= high:
        raise ConfigError(field, value, f"must be between {low:,} and {high:,}")
    return ivalue


def check_real(field: str, value: object, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if not isinstance(value, Real) or isinstance(value, bool):
        raise ConfigError(field, value, "must be a number")
    fvalue = float(value)
    if not math.isfinite(fvalue):
        raise ConfigError(field, value, "must be finite")
    if fvalue < low or (low_open and fvalue == low):
        raise ConfigError(field, value, f"must be {'>' if low_open else '>='} {low:g}")
    if fvalue > high:
        raise ConfigError(field, value, f"must be <= {high:g}")
    return fvalue
