"""Batch-time models t(n): the time in ms of one engine iteration that processes n >= 1 tokens.

Every model is a frozen dataclass with a fast scalar ``__call__`` (simulator hot path), a
vectorised ``times_ms`` and a canonical ``spec`` string that :func:`parse_batch_time` reads back.

Composition-aware models (:class:`ShapeTime`, e.g. :class:`CompositionTime`) time a whole
:class:`BatchShape` instead: prefill and decode tokens, prefill chunks, KV tokens read and logit
rows. The engine builds the shape of every batch for them; the theory uses
:func:`mix_batch_time`, their token-count view for a given workload mix.
"""

from __future__ import annotations

import math
import statistics
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Protocol, runtime_checkable

import numpy as np

from llmqueue.errors import ConfigError
from llmqueue.io.configfile import split_items
from llmqueue.io.tables import read_csv_table
from llmqueue.io.text import format_number
from llmqueue.limits import MAX_BUDGET_TOKENS, MAX_TIME_MS
from llmqueue.model.presets import get_preset

__all__ = [
    "BatchShape",
    "BatchTime",
    "CompositionTime",
    "ConstantTime",
    "LinearTime",
    "MixTime",
    "PiecewiseTime",
    "ShapeTime",
    "StaircaseTime",
    "TableTime",
    "decode_context_tokens",
    "fit_piecewise",
    "fit_staircase",
    "is_shape_model",
    "mean_decode_context",
    "mix_batch_time",
    "parse_batch_time",
]

_FIELD = "batch-time"
DEFAULT_BATCH_TIME = "staircase:c=11.28,a=35.47,b0=128"
"""The paper's Fig. 1 model: CodeLlama-34B on one A100 (t(n) in ms)."""
MIN_BATCH_MS = 1e-9
"""Shortest batch time accepted (1 fs): smaller ones are typos and would overflow n / t(n)."""
# Table times are clamped below at this fraction of the smallest measured time (extrapolation).
_TABLE_FLOOR_FRACTION = 1e-3


@runtime_checkable
class BatchTime(Protocol):
    """What every batch-time model offers: t(n) in ms, vectorised t, and a parseable spec."""

    @property
    def spec(self) -> str:
        """Canonical text that :func:`parse_batch_time` turns back into an equal model."""
        ...

    def __call__(self, n: int) -> float:
        """Time in ms of a batch of ``n`` >= 1 tokens."""
        ...

    def times_ms(self, n: np.ndarray) -> np.ndarray:
        """Vectorised t(n) in ms for an integer array of token counts."""
        ...


@dataclass(frozen=True, slots=True)
class BatchShape:
    """What a composition-aware model sees of one batch (built by the engine).

    ``chunk_tokens[i]`` prompt tokens of chunk ``i`` attend to ``chunk_prefix_tokens[i]`` KV
    entries computed before it (0 for a prompt's first chunk). Each decoder reads its whole
    context, its own new token included: ``decode_kv_tokens`` is the sum over decoders.
    ``logit_rows`` counts the rows through the LM head: decoders plus chunks ending a prompt.
    """

    prefill_tokens: int
    decode_tokens: int
    chunk_tokens: tuple[int, ...] = ()
    chunk_prefix_tokens: tuple[int, ...] = ()
    decode_kv_tokens: int = 0
    logit_rows: int = 0

    @property
    def tokens(self) -> int:
        """Tokens in the batch."""
        return self.prefill_tokens + self.decode_tokens

    @property
    def prefill_chunks(self) -> int:
        """Requests with prompt tokens in the batch."""
        return len(self.chunk_tokens)


@runtime_checkable
class ShapeTime(Protocol):
    """A composition-aware model: the time in ms of a batch of a given :class:`BatchShape`."""

    @property
    def spec(self) -> str:
        """Canonical text that :func:`parse_batch_time` turns back into an equal model."""
        ...

    def shape_time_ms(self, shape: BatchShape) -> float:
        """Time in ms of one batch of this shape."""
        ...


def is_shape_model(model: object) -> bool:
    """Whether ``model`` times batch shapes (the engine must build a :class:`BatchShape`)."""
    return callable(getattr(model, "shape_time_ms", None))


def as_batch_time(model: object, field: str = "batch_time") -> BatchTime | ShapeTime:
    """A batch-time model from a model object or its spec text (``staircase:c=..``,
    ``preset:NAME``, ``table:PATH``); ConfigError naming ``field`` for anything else."""
    if isinstance(model, str):
        return parse_batch_time(model)
    if is_shape_model(model) or (callable(model) and isinstance(getattr(model, "spec", None), str)):
        return model  # type: ignore[return-value]
    raise ConfigError(field, model, "must be a batch-time model (t(n) in ms with a spec) or its spec "
                      "text, e.g. 'staircase:c=11.28,a=35.47,b0=128'")


# ---------------------------------------------------------------- helpers


def _real(name: str, value: object) -> float:
    """``value`` as a finite float, else ConfigError naming the parameter ``name``."""
    if isinstance(value, bool):
        raise ConfigError(_FIELD, value, f"{name} must be a number")
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(_FIELD, value, f"{name} must be a number") from None
    if not math.isfinite(x):
        raise ConfigError(_FIELD, value, f"{name} must be finite")
    if abs(x) > MAX_TIME_MS:
        raise ConfigError(_FIELD, value, f"{name} must be at most {MAX_TIME_MS:g} in magnitude")
    return x


def _positive_int(name: str, value: object) -> int:
    """``value`` as an int in [1, MAX_BUDGET_TOKENS] (integral floats accepted), else ConfigError."""
    if isinstance(value, bool):
        raise ConfigError(_FIELD, value, f"{name} must be an integer >= 1")
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(_FIELD, value, f"{name} must be an integer >= 1") from None
    if not math.isfinite(x) or not x.is_integer() or x < 1:
        raise ConfigError(_FIELD, value, f"{name} must be an integer >= 1")
    if x > MAX_BUDGET_TOKENS:
        raise ConfigError(_FIELD, value, f"{name} must be at most {MAX_BUDGET_TOKENS:,} tokens")
    return int(x)


def _check_first_batch(kind: str, c: float, a: float, t1_ms: float) -> None:
    """Shared range checks: c >= 0, a >= 0 and t(1) > 0."""
    if c < 0:
        raise ConfigError(_FIELD, c, f"{kind} c must be >= 0")
    if a < 0:
        raise ConfigError(_FIELD, a, f"{kind} a must be >= 0")
    if not t1_ms >= MIN_BATCH_MS:
        raise ConfigError(_FIELD, t1_ms, f"{kind} t(1) must be at least {MIN_BATCH_MS} ms")


# ---------------------------------------------------------------- models


@dataclass(frozen=True, slots=True)
class ConstantTime:
    """t(n) = c ms: every batch takes the same time (the RS-network experiment's model)."""

    c: float

    def __post_init__(self) -> None:
        c = _real("c", self.c)
        if not c >= MIN_BATCH_MS:
            raise ConfigError(_FIELD, c, f"constant c must be at least {MIN_BATCH_MS} ms")
        object.__setattr__(self, "c", c)

    def __call__(self, n: int) -> float:
        return self.c

    def times_ms(self, n: np.ndarray) -> np.ndarray:
        return np.full(np.shape(n), self.c, dtype=float)

    @property
    def spec(self) -> str:
        return f"constant:c={format_number(self.c)}"


@dataclass(frozen=True, slots=True)
class LinearTime:
    """t(n) = c + a*n ms: a fixed overhead plus a per-token cost."""

    c: float
    a: float

    def __post_init__(self) -> None:
        c, a = _real("c", self.c), _real("a", self.a)
        _check_first_batch("linear", c, a, c + a)
        object.__setattr__(self, "c", c)
        object.__setattr__(self, "a", a)

    def __call__(self, n: int) -> float:
        return self.c + self.a * n

    def times_ms(self, n: np.ndarray) -> np.ndarray:
        return self.c + self.a * np.asarray(n)

    @property
    def spec(self) -> str:
        return f"linear:c={format_number(self.c)},a={format_number(self.a)}"


@dataclass(frozen=True, slots=True)
class PiecewiseTime:
    """t(n) = c + a*max(0, n - b0) ms: flat up to b0 tokens, then linear (paper v1/v2)."""

    c: float
    a: float
    b0: int

    def __post_init__(self) -> None:
        c, a, b0 = _real("c", self.c), _real("a", self.a), _positive_int("b0", self.b0)
        _check_first_batch("piecewise", c, a, c)
        object.__setattr__(self, "c", c)
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b0", b0)

    def __call__(self, n: int) -> float:
        extra = n - self.b0
        return self.c + self.a * extra if extra > 0 else self.c

    def times_ms(self, n: np.ndarray) -> np.ndarray:
        return self.c + self.a * np.maximum(0, np.asarray(n) - self.b0)

    @property
    def spec(self) -> str:
        return f"piecewise:c={format_number(self.c)},a={format_number(self.a)},b0={self.b0}"


@dataclass(frozen=True, slots=True)
class StaircaseTime:
    """t(n) = c + a*ceil(n/b0) ms: one step per started block of b0 tokens (paper v3)."""

    c: float
    a: float
    b0: int

    def __post_init__(self) -> None:
        c, a, b0 = _real("c", self.c), _real("a", self.a), _positive_int("b0", self.b0)
        _check_first_batch("staircase", c, a, c + a)
        object.__setattr__(self, "c", c)
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b0", b0)

    def __call__(self, n: int) -> float:
        return self.c + self.a * -(-n // self.b0)

    def times_ms(self, n: np.ndarray) -> np.ndarray:
        return self.c + self.a * -(-np.asarray(n) // self.b0)

    @property
    def spec(self) -> str:
        return f"staircase:c={format_number(self.c)},a={format_number(self.a)},b0={self.b0}"


@dataclass(frozen=True, slots=True)
class TableTime:
    """Measured t(n): piecewise-linear through the points, linear beyond both ends.

    Values are clamped below at 1e-3 of the smallest measured time, so a steep first segment
    extrapolated to n=1 can give an unrealistically fast batch: measure down to small n.
    ``source`` is the spec text after ``table:`` (path and row filters); ``spec`` round-trips
    through :func:`parse_batch_time` only when it names the CSV the points came from.
    """

    n_tokens: tuple[int, ...]
    time_ms: tuple[float, ...]
    source: str = ""
    _slopes: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _floor_ms: float = field(init=False, repr=False, compare=False)
    _n_arr: np.ndarray = field(init=False, repr=False, compare=False)
    _t_arr: np.ndarray = field(init=False, repr=False, compare=False)
    _s_arr: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ns = tuple(_positive_int("n_tokens", v) for v in self.n_tokens)
        ts = tuple(_real("time_ms", v) for v in self.time_ms)
        if len(ns) != len(ts):
            raise ConfigError(_FIELD, (len(ns), len(ts)), "table needs as many times as n")
        if len(ns) < 2:
            raise ConfigError(_FIELD, ns, "table needs at least 2 points")
        if any(b <= a for a, b in pairwise(ns)):
            raise ConfigError(_FIELD, ns, "table n_tokens must be strictly increasing")
        if min(ts) <= 0:
            raise ConfigError(_FIELD, min(ts), "table times must be > 0")
        # slope used when anchored at point j: segment j..j+1, the last point reuses the last one
        seg = [(ts[j + 1] - ts[j]) / (ns[j + 1] - ns[j]) for j in range(len(ns) - 1)]
        slopes = (*seg, seg[-1])
        object.__setattr__(self, "n_tokens", ns)
        object.__setattr__(self, "time_ms", ts)
        object.__setattr__(self, "source", str(self.source))
        object.__setattr__(self, "_slopes", slopes)
        object.__setattr__(self, "_floor_ms", _TABLE_FLOOR_FRACTION * min(ts))
        object.__setattr__(self, "_n_arr", np.asarray(ns, dtype=np.int64))
        object.__setattr__(self, "_t_arr", np.asarray(ts, dtype=float))
        object.__setattr__(self, "_s_arr", np.asarray(slopes, dtype=float))

    def __call__(self, n: int) -> float:
        j = bisect_right(self.n_tokens, n) - 1
        if j < 0:
            j = 0
        t = self.time_ms[j] + self._slopes[j] * (n - self.n_tokens[j])
        return t if t > self._floor_ms else self._floor_ms

    def times_ms(self, n: np.ndarray) -> np.ndarray:
        n = np.asarray(n)
        j = np.maximum(np.searchsorted(self._n_arr, n, side="right") - 1, 0)
        t = self._t_arr[j] + self._s_arr[j] * (n - self._n_arr[j])
        return np.maximum(t, self._floor_ms)

    @property
    def spec(self) -> str:
        return f"table:{self.source}"


_COMPOSITION_KEYS = ("c", "prefill", "decode", "kv", "chunk", "logit", "floor")


@dataclass(frozen=True, slots=True)
class CompositionTime:
    """t = max(floor, c + prefill*P + decode*D + kv*KV + chunk*C + logit*L) ms for a batch of
    P prompt tokens in C chunks, D decode tokens reading KV cached tokens, and L logit rows.

    Mid-size models need more than the token count: at a fixed count, the decoders' KV reads
    and the per-chunk cost change the time (data/gpu: up to 2x for an 8B model near 256 tokens).
    All coefficients are >= 0 (ms per unit); ``floor`` is the host-side minimum of a batch.
    """

    c: float
    prefill: float
    decode: float
    kv: float = 0.0
    chunk: float = 0.0
    logit: float = 0.0
    floor: float = 0.0

    def __post_init__(self) -> None:
        for key in _COMPOSITION_KEYS:
            value = _real(key, getattr(self, key))
            if value < 0:
                raise ConfigError(_FIELD, value, f"composition {key} must be >= 0")
            object.__setattr__(self, key, value)
        if not max(self.c, self.floor) >= MIN_BATCH_MS:
            raise ConfigError(
                _FIELD, self.c, f"composition needs c or floor of at least {MIN_BATCH_MS} ms"
            )

    def shape_time_ms(self, shape: BatchShape) -> float:
        t = (
            self.c
            + self.prefill * shape.prefill_tokens
            + self.decode * shape.decode_tokens
            + self.kv * shape.decode_kv_tokens
            + self.chunk * len(shape.chunk_tokens)
            + self.logit * shape.logit_rows
        )
        return t if t > self.floor else self.floor

    @property
    def spec(self) -> str:
        body = ",".join(f"{k}={format_number(getattr(self, k))}" for k in _COMPOSITION_KEYS)
        return f"composition:{body}"


@dataclass(frozen=True, slots=True)
class MixTime:
    """A shape model seen as t(n) for one workload mix: the time of an ``n``-token batch whose
    tokens split between prompts and decoders as the workload's work does.

    Of ``n`` tokens, ``n * d / (p + d)`` are decode tokens (mean prompt ``p``, mean output ``d``
    tokens); each decoder reads ``decode_context`` cached tokens on average (token-weighted); the
    prompt tokens come in ``ceil(P / p)`` chunks starting fresh, each ending its prompt. This is
    the steady mix of a saturated work-conserving engine; the simulator times each real batch.
    """

    model: ShapeTime
    mean_prefill_tokens: float
    mean_decode_tokens: float
    decode_context_tokens: float

    def __call__(self, n: int) -> float:
        return self.model.shape_time_ms(self.shape(n))

    def shape(self, n: int) -> BatchShape:
        """The mix's batch of ``n`` tokens."""
        p, d = self.mean_prefill_tokens, self.mean_decode_tokens
        dec = round(n * d / (p + d)) if p + d > 0 else 0
        pre = n - dec
        chunks = math.ceil(pre / p) if pre > 0 and p > 0 else 0
        sizes = tuple([pre // chunks + (1 if i < pre % chunks else 0) for i in range(chunks)])
        return BatchShape(
            prefill_tokens=pre,
            decode_tokens=dec,
            chunk_tokens=sizes,
            chunk_prefix_tokens=(0,) * chunks,
            decode_kv_tokens=round(dec * self.decode_context_tokens),
            logit_rows=dec + chunks,
        )

    def times_ms(self, n: np.ndarray) -> np.ndarray:
        return np.array([self(int(k)) for k in np.asarray(n).ravel()], dtype=float).reshape(
            np.shape(n)
        )

    @property
    def spec(self) -> str:
        return (
            f"mix({self.model.spec};p={format_number(float(self.mean_prefill_tokens))},"
            f"d={format_number(float(self.mean_decode_tokens))},kv={format_number(float(self.decode_context_tokens))})"
        )


def mix_batch_time(
    model: BatchTime | ShapeTime, mean_prefill_tokens: float, mean_decode_tokens: float,
    decode_context_tokens: float | None = None,
) -> BatchTime:
    """The token-count model the theory uses: ``model`` itself, or a shape model's :class:`MixTime`.

    ``decode_context_tokens`` defaults to ``p + (d + 1) / 2`` (a decoder halfway through a mean
    request); :func:`decode_context_tokens` gives the exact token-weighted mean for a workload.
    """
    if not is_shape_model(model):
        return model  # type: ignore[return-value]
    if decode_context_tokens is None:
        decode_context_tokens = mean_decode_context(mean_prefill_tokens, mean_decode_tokens)
    return MixTime(model, float(mean_prefill_tokens), float(mean_decode_tokens),  # type: ignore[arg-type]
                   float(decode_context_tokens))


def mean_decode_context(mean_prefill_tokens: float, mean_decode_tokens: float) -> float:
    """KV entries a decoder reads halfway through a mean request: ``p + (d + 1) / 2``."""
    return mean_prefill_tokens + (mean_decode_tokens + 1) / 2


def decode_context_tokens(prefill_tokens: np.ndarray, decode_tokens: np.ndarray) -> float:
    """Mean KV context read per decode token over a sample of requests (token-weighted).

    The ``k``-th decode token (k = 1..d) of a request with ``p`` prompt tokens reads
    ``p + k`` entries, its own included; the mean over all decode tokens is
    ``sum(d * p + d * (d + 1) / 2) / sum(d)``.
    """
    p = np.asarray(prefill_tokens, dtype=float)
    d = np.asarray(decode_tokens, dtype=float)
    total = float(d.sum())
    if total == 0:
        return 0.0
    return float((d * p + d * (d + 1) / 2).sum() / total)


# ---------------------------------------------------------------- parsing

# kind -> (model class, required keys, optional keys); the keys are the class's field names
_KINDS: dict[str, tuple[type, tuple[str, ...], tuple[str, ...]]] = {
    "constant": (ConstantTime, ("c",), ()),
    "linear": (LinearTime, ("c", "a"), ()),
    "piecewise": (PiecewiseTime, ("c", "a", "b0"), ()),
    "staircase": (StaircaseTime, ("c", "a", "b0"), ()),
    "composition": (CompositionTime, _COMPOSITION_KEYS[:3], _COMPOSITION_KEYS[3:]),
}


def parse_batch_time(spec: str) -> BatchTime:
    """Build a model from ``kind:key=value,...`` (as each class's ``spec``) or ``table:PATH,...``.

    Kinds: constant (c), linear (c, a), piecewise (c, a, b0), staircase (c, a, b0), table,
    composition, and ``preset:NAME`` (a fitted model of :mod:`llmqueue.model.presets`).
    """
    if not isinstance(spec, str):
        raise ConfigError(
            _FIELD, spec, "spec must be a string like 'staircase:c=11.28,a=35.47,b0=128'"
        )
    kind, colon, body = spec.partition(":")
    kind = kind.strip().lower()
    if not colon:
        raise ConfigError(_FIELD, spec, "expected KIND:key=value,... (e.g. 'constant:c=1')")
    if kind == "table":
        return _parse_table(spec, body)
    if kind == "preset":
        return preset_model(body)  # type: ignore[return-value]
    if kind not in _KINDS:
        known = ", ".join([*_KINDS, "preset", "table"])
        raise ConfigError(_FIELD, spec, f"unknown kind {kind!r} (known: {known})")
    model, required, optional = _KINDS[kind]
    wanted = required + optional
    given = split_items(spec, body, _FIELD)[1]
    extra = [k for k in given if k not in wanted]
    if extra:
        raise ConfigError(
            _FIELD, spec, f"unknown key {extra[0]!r} for {kind} (keys: {', '.join(wanted)})"
        )
    missing = [k for k in required if k not in given]
    if missing:
        raise ConfigError(_FIELD, spec, f"missing key {missing[0]!r} for {kind}")
    values: dict[str, float] = {}
    for key in wanted:
        if key not in given:
            continue
        try:
            values[key] = float(given[key])
        except ValueError:
            raise ConfigError(_FIELD, spec, f"{key} must be a number, not {given[key]!r}") from None
    try:
        return model(**values)  # type: ignore[no-any-return]
    except ConfigError as err:
        raise ConfigError(_FIELD, spec, err.problem) from None


def _parse_table(spec: str, body: str) -> TableTime:
    """``table:PATH[,col=value...]``: read the CSV, filter rows, median per n."""
    path_text, _, rest = body.partition(",")
    path_text = path_text.strip()
    if not path_text:
        raise ConfigError(_FIELD, spec, "table spec needs a CSV path: table:PATH[,column=value...]")
    filters = sorted(split_items(spec, rest, _FIELD)[1].items())
    table = read_csv_table(path_text, _FIELD, "table file", spec)
    n_col = next((c for c in ("n_tokens", "n") if c in table.columns), None)
    t_col = next((c for c in ("time_ms", "median_ms") if c in table.columns), None)
    if n_col is None:
        raise ConfigError(_FIELD, spec, "table CSV needs a column 'n_tokens' or 'n'")
    if t_col is None:
        raise ConfigError(_FIELD, spec, "table CSV needs a column 'time_ms' or 'median_ms'")
    for key, _ in filters:
        if key not in table.columns:
            raise ConfigError(_FIELD, spec, f"table filter names unknown column {key!r}")
    table = table.where(dict(filters))
    if not len(table):
        raise ConfigError(_FIELD, spec, "no table rows match the filters")
    by_n: dict[int, list[float]] = {}
    for i in range(len(table)):
        by_n.setdefault(table.count(i, n_col, 1), []).append(table.number(i, t_col))
    ns = tuple(sorted(by_n))
    ts = tuple(float(statistics.median(by_n[n])) for n in ns)
    source = ",".join([path_text, *(f"{k}={v}" for k, v in filters)])
    try:
        return TableTime(ns, ts, source)
    except ConfigError as err:
        raise ConfigError(_FIELD, spec, err.problem) from None


# ---------------------------------------------------------------- fitting


def _fit_inputs(
    n: Sequence[float] | np.ndarray, t: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Validated float arrays of token counts (>= 1) and times (> 0) of equal length >= 2."""
    n_arr, t_arr = np.asarray(n, dtype=float).ravel(), np.asarray(t, dtype=float).ravel()
    if n_arr.size != t_arr.size or n_arr.size < 2:
        raise ConfigError(
            _FIELD, (n_arr.size, t_arr.size), "fit needs >= 2 (n, t) pairs of equal length"
        )
    if not (np.all(np.isfinite(n_arr)) and np.all(np.isfinite(t_arr))):
        raise ConfigError(_FIELD, "non-finite", "fit data must be finite")
    if n_arr.min() < 1 or t_arr.min() <= 0:
        raise ConfigError(_FIELD, (n_arr.min(), t_arr.min()), "fit needs n >= 1 and t > 0")
    return n_arr, t_arr


def _r_squared(t: np.ndarray, fitted: np.ndarray) -> float:
    """Coefficient of determination; 1.0 for a perfect fit of constant data."""
    ss_res = float(np.sum((t - fitted) ** 2))
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def _nnls_line(x: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """Least squares t ~ c + a*x with c, a >= 0."""
    from scipy.optimize import nnls
    coef, _ = nnls(np.column_stack([np.ones_like(x), x]), t)
    return float(coef[0]), float(coef[1])


def fit_staircase(
    n: Sequence[float] | np.ndarray, t: Sequence[float] | np.ndarray, b0: int
) -> tuple[StaircaseTime, float]:
    """Least-squares c, a >= 0 of t = c + a*ceil(n/b0) for a given block ``b0``.

    Returns (model, R^2).
    """
    n_arr, t_arr = _fit_inputs(n, t)
    b0 = _positive_int("b0", b0)
    x = np.ceil(n_arr / b0)
    c, a = _nnls_line(x, t_arr)
    model = StaircaseTime(c, a, b0)
    return model, _r_squared(t_arr, model.times_ms(n_arr))


def fit_piecewise(
    n: Sequence[float] | np.ndarray, t: Sequence[float] | np.ndarray, b0: int | None = None
) -> tuple[PiecewiseTime, float]:
    """Least-squares t = c + a*max(0, n - b0), c, a >= 0; with b0=None scan integer b0 for the best.

    The scan tries every integer b0 below max(n) (a grid of about 4096 values plus a local
    refinement when max(n) is larger); returns (model, R^2).
    """
    n_arr, t_arr = _fit_inputs(n, t)
    if b0 is not None:
        b0 = _positive_int("b0", b0)
        c, a = _nnls_line(np.maximum(0.0, n_arr - b0), t_arr)
        model = PiecewiseTime(c, a, b0)
        return model, _r_squared(t_arr, model.times_ms(n_arr))

    top = max(int(n_arr.max()) - 1, 1)

    def sse(cands: np.ndarray) -> np.ndarray:
        return np.array([_sse_for(int(b), n_arr, t_arr) for b in cands])

    if top <= 4096:
        cands = np.arange(1, top + 1)
    else:
        grid = np.unique(np.linspace(1, top, 4096).round().astype(np.int64))
        best = int(grid[int(np.argmin(sse(grid)))])
        step = int(np.ceil(top / 4095))
        cands = np.arange(max(1, best - step), min(top, best + step) + 1)
    best_b0 = int(cands[int(np.argmin(sse(cands)))])
    return fit_piecewise(n_arr, t_arr, best_b0)


def _sse_for(b0: int, n: np.ndarray, t: np.ndarray) -> float:
    """Residual sum of squares of the nonnegative piecewise fit at a fixed b0."""
    x = np.maximum(0.0, n - b0)
    c, a = _nnls_line(x, t)
    return float(np.sum((t - c - a * x) ** 2))


def preset_model(name: str) -> BatchTime | CompositionTime:
    """The batch-time model of the preset called ``name``."""
    return parse_batch_time(get_preset(name).spec)  # type: ignore[return-value]

