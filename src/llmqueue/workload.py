"""Workloads: request arrivals and prefill/decode token counts (the paper's lambda, P_i, D_i).

Everything here is a plain frozen record. Randomness comes only from the seed handed to
:meth:`Workload.requests`, which draws in fixed-size chunks so that a run is reproducible and the
first ``k`` requests never depend on how many requests are asked for.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
from scipy import special, stats

from llmqueue.errors import ConfigError
from llmqueue.limits import MAX_TOKENS

__all__ = [
    "CHUNK_SIZE",
    "TRACE_ARRIVAL_COLUMN",
    "TRACE_DECODE_COLUMN",
    "TRACE_PREFILL_COLUMN",
    "ArrivalProcess",
    "Constant",
    "DeterministicArrivals",
    "Empirical",
    "GammaArrivals",
    "Geometric",
    "LogNormal",
    "Poisson",
    "PoissonArrivals",
    "Request",
    "SizeDist",
    "Trace",
    "TraceArrivals",
    "Uniform",
    "Workload",
    "fixed_requests",
    "is_trace_spec",
    "load_trace",
    "make_workload",
    "parse_arrival",
    "parse_size",
]

CHUNK_SIZE = 4096
"""Requests drawn per chunk; fixed so that streams are prefix-stable for a given seed."""

TRACE_ARRIVAL_COLUMN = "arrived_at"
TRACE_PREFILL_COLUMN = "num_prefill_tokens"
TRACE_DECODE_COLUMN = "num_decode_tokens"


_MAX_SIGMA = 5.0
_INT64_SAFE = float(2**62)


# --------------------------------------------------------------------------------------------
# Small validation helpers
# --------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_int(name: str, value: object, low: int, high: int = MAX_TOKENS) -> int:
    if not _is_int(value):
        raise ConfigError(name, value, "must be an integer")
    ivalue = int(value)  # type: ignore[call-overload]
    if not low <= ivalue <= high:
        raise ConfigError(name, value, f"must be between {low} and {high}")
    return ivalue


def _check_real(name: str, value: object, *, positive: bool = True, low: float = 0.0,
                high: float = float(MAX_TOKENS)) -> float:
    if not _is_real(value):
        raise ConfigError(name, value, "must be a number")
    fvalue = float(value)  # type: ignore[arg-type]
    if not math.isfinite(fvalue):
        raise ConfigError(name, value, "must be finite")
    if positive and fvalue <= low:
        raise ConfigError(name, value, f"must be > {_fmt(low)}")
    if not positive and fvalue < low:
        raise ConfigError(name, value, f"must be >= {_fmt(low)}")
    if fvalue > high:
        raise ConfigError(name, value, f"must be <= {_fmt(high)}")
    return fvalue


def _check_n(n: object) -> int:
    if not _is_int(n) or int(n) < 0:  # type: ignore[call-overload]
        raise ConfigError("n", n, "sample size must be a non-negative integer")
    return int(n)  # type: ignore[call-overload]


def _fmt(x: float) -> str:
    """Shortest text for a number that parses back to the same float (integers without '.0')."""
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One request: arrival time and token counts (the paper's P_i, D_i).

    ``cls`` labels the request's class (in a network: its buffer, ``class.node``); single-engine
    runs leave it empty. Class-aware policies (priority, max-pressure) read it.
    """

    id: int
    arrival_ms: float
    prefill_tokens: int
    decode_tokens: int
    cls: str = ""

    def __post_init__(self) -> None:
        if type(self.id) is int and type(self.arrival_ms) is float \
                and type(self.prefill_tokens) is int and type(self.decode_tokens) is int \
                and type(self.cls) is str \
                and self.id >= 0 and 0.0 <= self.arrival_ms < math.inf \
                and self.prefill_tokens >= 0 and self.decode_tokens >= 0 \
                and self.prefill_tokens + self.decode_tokens >= 1:
            return  # fast path for the common, valid case (millions of requests per run)
        if not _is_int(self.id) or self.id < 0:
            raise ConfigError("request.id", self.id, "must be a non-negative integer")
        if not _is_real(self.arrival_ms) or not math.isfinite(self.arrival_ms) \
                or self.arrival_ms < 0:
            raise ConfigError("request.arrival_ms", self.arrival_ms,
                              "must be a finite number >= 0")
        for name in ("prefill_tokens", "decode_tokens"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"request.{name}", value, "must be an integer >= 0")
        if self.prefill_tokens + self.decode_tokens < 1:
            raise ConfigError("request.tokens", (self.prefill_tokens, self.decode_tokens),
                              "a request needs at least one prefill or decode token")
        if not isinstance(self.cls, str):
            raise ConfigError("request.cls", self.cls, "must be a string")


def fixed_requests(items: Sequence[tuple[float, int, int]]) -> list[Request]:
    """Requests from ``(arrival_ms, prefill_tokens, decode_tokens)`` tuples, for tests and examples.

    Ids are 0, 1, 2, ... in the given order, which must be non-decreasing in arrival time.
    """
    out: list[Request] = []
    previous = -math.inf
    for i, item in enumerate(items):
        if not isinstance(item, tuple | list) or len(item) != 3:
            raise ConfigError(f"requests[{i}]", item,
                              "must be a tuple (arrival_ms, prefill_tokens, decode_tokens)")
        arrival_ms, prefill, decode = item
        request = Request(i, arrival_ms, prefill, decode)
        if request.arrival_ms < previous:
            raise ConfigError(f"requests[{i}].arrival_ms", arrival_ms,
                              f"arrival times must be non-decreasing (previous {previous})")
        previous = request.arrival_ms
        out.append(request)
    return out


# --------------------------------------------------------------------------------------------
# Trace files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Trace:
    """A request trace read from CSV: arrival times (s) and per-request token counts."""

    path: str
    arrived_s: np.ndarray
    prefill_tokens: np.ndarray
    decode_tokens: np.ndarray

    def __len__(self) -> int:
        return int(self.prefill_tokens.shape[0])


def _read_columns(path: str, columns: Sequence[str], field_name: str,
                  optional: Sequence[str] = ()) -> tuple[dict[str, np.ndarray], list[int]]:
    """Read named numeric columns of a CSV file with a header row, as float64 arrays, plus the
    file line number of each data row; ``optional`` columns the header lacks are left out.

    Errors (missing file, missing column, ragged or non-numeric row) name the file, row and column.
    """
    if not isinstance(path, str) or not path:
        raise ConfigError(field_name, path, "trace path must be a non-empty string")
    if not os.path.isfile(path):
        raise ConfigError(field_name, path, "trace file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise ConfigError(field_name, path, "trace file is empty (no header row)")
            names = [name.strip() for name in header]
            index: dict[str, int] = {}
            for column in columns:
                if column in names:
                    index[column] = names.index(column)
                elif column not in optional:
                    raise ConfigError(field_name, path,
                                      f"trace file has no column '{column}' "
                                      f"(columns: {','.join(names)})")
            rows: list[list[str]] = []
            lines: list[int] = []
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(names):
                    raise ConfigError(field_name, path,
                                      f"trace row {len(rows) + 1} (line {reader.line_num}) has "
                                      f"{len(row)} fields, header has {len(names)}")
                rows.append(row)
                lines.append(reader.line_num)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        problem = " ".join(str(exc).split())
        raise ConfigError(field_name, path, f"cannot read trace file: {problem}") from None
    out: dict[str, np.ndarray] = {}
    for column, j in index.items():
        texts = [row[j] for row in rows]
        try:
            values = np.array(texts, dtype=np.float64)
        except ValueError:
            values = np.array([_float_or_nan(text) for text in texts], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            r = int(bad[0])
            raise ConfigError(field_name, path,
                              f"trace row {r + 1} (line {lines[r]}) column '{column}' is not a "
                              f"finite number: {texts[r].strip()!r}")
        out[column] = values
    return out, lines


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _token_column(values: np.ndarray, column: str, path: str, field_name: str,
                  minimum: int, lines: list[int]) -> np.ndarray:
    """Check a float column holds integer token counts >= minimum; return it as int64."""
    bad = np.flatnonzero((values < minimum) | (values != np.floor(values)) | (values > MAX_TOKENS))
    if bad.size:
        r = int(bad[0])
        raise ConfigError(field_name, path,
                          f"trace row {r + 1} (line {lines[r]}) column '{column}' must be an "
                          "integer "
                          f"token count >= {minimum}, found {_fmt(float(values[r]))}")
    return values.astype(np.int64)


def _token_columns(data: dict[str, np.ndarray], prefill_column: str, decode_column: str, path: str,
                   field_name: str, lines: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A CSV trace's prompt and output token counts: integers >= 0, at least one token per row."""
    prefill, decode = (_token_column(data[column], column, path, field_name, 0, lines)
                       for column in (prefill_column, decode_column))
    empty = np.flatnonzero(prefill + decode < 1)
    if empty.size:
        r = int(empty[0])
        raise ConfigError(field_name, path,
                          f"trace row {r + 1} (line {lines[r]}) has no tokens "
                          f"({prefill_column} + {decode_column} must be >= 1)")
    return prefill, decode


def _check_arrival_order(times: np.ndarray, column: str, path: str, field_name: str,
                         lines: list[int]) -> None:
    """Reject a CSV trace whose arrival column goes back in time (naming the first such row)."""
    back = np.flatnonzero(np.diff(times) < 0)
    if back.size:
        r = int(back[0]) + 1
        raise ConfigError(field_name, path,
                          f"trace row {r + 1} (line {lines[r]}) column '{column}' goes back in time "
                          f"({_fmt(float(times[r]))} < {_fmt(float(times[r - 1]))}); arrivals must be "
                          "non-decreasing")


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def load_trace(path: str, field_name: str = "trace") -> Trace:
    """Read a CSV trace with header ``arrived_at,num_prefill_tokens,num_decode_tokens``.

    Validates columns, numbers, counts >= 0 with at least one token per row, non-decreasing
    arrival times and at least 2 rows; errors are ConfigError on ``field_name``.
    """
    cols = (TRACE_ARRIVAL_COLUMN, TRACE_PREFILL_COLUMN, TRACE_DECODE_COLUMN)
    data, lines = _read_columns(path, cols, field_name)
    arrived = data[TRACE_ARRIVAL_COLUMN]
    if arrived.shape[0] < 2:
        raise ConfigError(field_name, path,
                          f"trace needs at least 2 rows, found {arrived.shape[0]}")
    prefill, decode = _token_columns(data, TRACE_PREFILL_COLUMN, TRACE_DECODE_COLUMN, path, field_name,
                                     lines)
    _check_arrival_order(arrived, TRACE_ARRIVAL_COLUMN, path, field_name, lines)
    return Trace(path, _readonly(arrived), _readonly(prefill), _readonly(decode))


# --------------------------------------------------------------------------------------------
# Size distributions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Constant:
    """Every request has exactly ``value`` tokens (>= 1)."""

    value: int

    def __post_init__(self) -> None:
        _check_int("constant.value", self.value, 1)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` copies of the value (the generator is not used)."""
        return np.full(_check_n(n), self.value, dtype=np.int64)

    @property
    def mean(self) -> float:
        """Exact mean: the value."""
        return float(self.value)

    @property
    def spec(self) -> str:
        """Canonical spec text, e.g. ``129``."""
        return str(self.value)


@dataclass(frozen=True, slots=True)
class Poisson:
    """Poisson token counts clamped below: max(min_tokens, X), X ~ Poisson(mean_param).

    ``mean_param`` is the Poisson parameter; ``mean`` is the exact mean after clamping.
    """

    mean_param: float
    min_tokens: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean_param", _check_real("poisson.mean", self.mean_param))
        _check_int("poisson.min", self.min_tokens, 1)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` clamped Poisson counts."""
        x = rng.poisson(self.mean_param, _check_n(n)).astype(np.int64)
        return np.maximum(x, self.min_tokens)

    @property
    def mean(self) -> float:
        """Exact mean of max(m, X): lam * P(X >= m-1) + m * P(X <= m-1)."""
        lam, m = self.mean_param, self.min_tokens
        return float(lam * stats.poisson.sf(m - 2, lam) + m * stats.poisson.cdf(m - 1, lam))

    @property
    def spec(self) -> str:
        """Canonical spec text, e.g. ``poisson:129`` or ``poisson:129,min=4``."""
        extra = f",min={self.min_tokens}" if self.min_tokens != 1 else ""
        return f"poisson:{_fmt(self.mean_param)}{extra}"


@dataclass(frozen=True, slots=True)
class Geometric:
    """Geometric counts on {1, 2, ...} with mean ``mean_param`` (p = 1/mean_param), then clamped
    below at ``min_tokens``."""

    mean_param: float
    min_tokens: int = 1

    def __post_init__(self) -> None:
        mean = _check_real("geometric.mean", self.mean_param, positive=False, low=1.0)
        object.__setattr__(self, "mean_param", mean)
        _check_int("geometric.min", self.min_tokens, 1)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` clamped geometric counts."""
        x = rng.geometric(1.0 / self.mean_param, _check_n(n)).astype(np.int64)
        return np.maximum(x, self.min_tokens)

    @property
    def mean(self) -> float:
        """Exact mean of max(m, X): m + q^m * mean, with q = 1 - 1/mean."""
        q = 1.0 - 1.0 / self.mean_param
        m = self.min_tokens
        return float(m + q**m * self.mean_param)

    @property
    def spec(self) -> str:
        """Canonical spec text, e.g. ``geometric:112``."""
        extra = f",min={self.min_tokens}" if self.min_tokens != 1 else ""
        return f"geometric:{_fmt(self.mean_param)}{extra}"


@dataclass(frozen=True, slots=True)
class Uniform:
    """Integers uniform on ``low..high`` inclusive, 1 <= low <= high."""

    low: int
    high: int

    def __post_init__(self) -> None:
        _check_int("uniform.low", self.low, 1)
        _check_int("uniform.high", self.high, 1)
        if self.high < self.low:
            raise ConfigError("uniform.high", self.high,
                              f"must be >= low ({self.low})")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` uniform integers."""
        return rng.integers(self.low, self.high, _check_n(n), dtype=np.int64, endpoint=True)

    @property
    def mean(self) -> float:
        """Exact mean: (low + high) / 2."""
        return (self.low + self.high) / 2.0

    @property
    def spec(self) -> str:
        """Canonical spec text, e.g. ``uniform:10,200``."""
        return f"uniform:{self.low},{self.high}"


def _lognormal_rounded_mean(mean: float, sigma: float, min_tokens: int) -> float:
    """E[max(m, round(X))] for X lognormal with E[X] = mean, to about 1e-12 relative.

    Uses E[max(m, K)] = m + sum_{j >= m} P(K > j) = m + sum_{j >= m} P(X >= j + 1/2): summed
    term by term over the bulk, 1 below it, and by the exact integral E[(X - c)^+] above it.
    """
    mu = math.log(mean) - sigma * sigma / 2.0

    def sf(x: np.ndarray | float) -> np.ndarray:
        return special.ndtr((mu - np.log(x)) / sigma)

    m = min_tokens
    lo_q = math.exp(mu + sigma * float(special.ndtri(1e-17)))
    hi_q = math.exp(mu + sigma * float(-special.ndtri(1e-15)))
    lo = max(m, math.floor(lo_q) - 1)  # j < lo: j + 1/2 < lo_q, P(X >= j + 1/2) == 1 to 1e-17
    hi = max(lo, min(math.ceil(hi_q) + 1, lo + 200_000))
    j = np.arange(lo, hi + 1, dtype=np.float64)
    bulk = math.fsum(sf(j + 0.5).tolist())
    # Midpoint rule with its Euler-Maclaurin correction: sum_{j > hi} P(X >= j + 1/2)
    # = integral_{c}^inf P(X >= x) dx - f(c) / 24 + O(f''(c)), c = hi + 1, f the density.
    c = float(hi + 1)
    z = (math.log(c) - mu) / sigma
    density = math.exp(-0.5 * z * z) / (sigma * c * math.sqrt(2.0 * math.pi))
    tail = mean * float(special.ndtr((mu + sigma * sigma - math.log(c)) / sigma)) \
        - c * float(sf(c)) - density / 24.0
    return float(m + (lo - m) + bulk + max(tail, 0.0))


@dataclass(frozen=True, slots=True)
class LogNormal:
    """Lognormal sizes: X lognormal with E[X] = mean (mu = ln mean - sigma^2/2), values
    max(min_tokens, round(X))."""

    mean_param: float
    sigma: float
    min_tokens: int = 1
    _mean: float = field(init=False, repr=False, compare=False, default=0.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean_param", _check_real("lognormal.mean", self.mean_param))
        sigma = _check_real("lognormal.sigma", self.sigma, high=_MAX_SIGMA)
        object.__setattr__(self, "sigma", sigma)
        _check_int("lognormal.min", self.min_tokens, 1)
        object.__setattr__(self, "_mean",
                           _lognormal_rounded_mean(self.mean_param, sigma, self.min_tokens))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` rounded, clamped lognormal counts (rounding half up)."""
        mu = math.log(self.mean_param) - self.sigma * self.sigma / 2.0
        x = rng.lognormal(mu, self.sigma, _check_n(n))
        rounded = np.floor(np.minimum(x, _INT64_SAFE) + 0.5).astype(np.int64)
        return np.maximum(rounded, self.min_tokens)

    @property
    def mean(self) -> float:
        """Exact mean of the rounded, clamped values (computed numerically from the CDF)."""
        return self._mean

    @property
    def spec(self) -> str:
        """Canonical spec text, e.g. ``lognormal:mean=500,sigma=0.8,min=16``."""
        extra = f",min={self.min_tokens}" if self.min_tokens != 1 else ""
        return f"lognormal:mean={_fmt(self.mean_param)},sigma={_fmt(self.sigma)}{extra}"


@dataclass(frozen=True, slots=True)
class Empirical:
    """Resample observed token counts uniformly with replacement (e.g. one column of a trace).

    ``source`` is the file the values came from and ``column`` its column; spec ``trace:PATH,...``.
    """

    values: tuple[int, ...]
    source: str
    column: str | None = None
    _array: np.ndarray = field(init=False, repr=False, compare=False,
                               default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        if not isinstance(self.values, tuple) or not self.values:
            raise ConfigError("empirical.values", type(self.values).__name__,
                              "must be a non-empty tuple of token counts")
        if not all(_is_int(v) for v in self.values):
            raise ConfigError("empirical.values", self.source, "values must be integers")
        try:
            array = np.array([int(v) for v in self.values], dtype=np.int64)
        except OverflowError:
            raise ConfigError("empirical.values", self.source,
                              f"every value must be between 1 and {MAX_TOKENS}") from None
        bad = np.flatnonzero((array < 1) | (array > MAX_TOKENS))
        if bad.size:
            raise ConfigError("empirical.values", self.source,
                              f"value at index {int(bad[0])} is {int(array[bad[0]])}; "
                              f"every value must be between 1 and {MAX_TOKENS}")
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError("empirical.source", self.source, "must be a non-empty string")
        object.__setattr__(self, "_array", _readonly(array))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` values uniformly with replacement."""
        return self._array[self.sample_rows(rng, n)]

    def sample_rows(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` row indices uniformly with replacement (shared by joint pair sampling)."""
        return rng.integers(0, self._array.shape[0], _check_n(n), dtype=np.int64)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The values at the given row indices."""
        return self._array[rows]

    def __len__(self) -> int:
        return int(self._array.shape[0])

    @property
    def mean(self) -> float:
        """Exact mean: the mean of the values."""
        return float(math.fsum(self.values) / len(self.values))

    @property
    def spec(self) -> str:
        """Canonical spec text: ``trace:PATH,column=NAME`` (``trace:PATH`` without a column)."""
        extra = f",column={self.column}" if self.column is not None else ""
        return f"trace:{self.source}{extra}"


SizeDist = Constant | Poisson | Geometric | Uniform | LogNormal | Empirical
"""Any token-count distribution: ``sample(rng, n)``, exact ``mean`` and canonical ``spec``."""


# --------------------------------------------------------------------------------------------
# Spec parsing
# --------------------------------------------------------------------------------------------


def _split_args(body: str, field_name: str, spec: str,
                keys: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Split ``a,b,key=value`` into positional and keyword parts, rejecting unknown keys."""
    positional: list[str] = []
    named: dict[str, str] = {}
    if not body.strip():
        return positional, named
    for part in body.split(","):
        part = part.strip()
        if not part:
            raise ConfigError(field_name, spec, "empty parameter in spec")
        if "=" in part:
            key, _, value = part.partition("=")
            key = key.strip().lower()
            if key not in keys:
                raise ConfigError(field_name, spec,
                                  f"unknown parameter '{key}' (expected one of: "
                                  f"{', '.join(keys)})")
            if key in named:
                raise ConfigError(field_name, spec, f"parameter '{key}' given twice")
            named[key] = value.strip()
        else:
            if named:
                raise ConfigError(field_name, spec,
                                  "positional parameters must come before key=value ones")
            positional.append(part)
    return positional, named


def _num(text: str, what: str, field_name: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(field_name, spec, f"{what} must be a number, not {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(field_name, spec, f"{what} must be finite")
    return value


def _int(text: str, what: str, field_name: str, spec: str) -> int:
    value = _num(text, what, field_name, spec)
    if not value.is_integer():
        raise ConfigError(field_name, spec, f"{what} must be an integer, not {text!r}")
    return int(value)


def _params(body: str, names: Sequence[str], required: int, field_name: str,
            spec: str) -> dict[str, str]:
    """Map ``body`` onto parameter ``names`` (positionally or by key); first ``required`` needed."""
    positional, named = _split_args(body, field_name, spec, names)
    if len(positional) > len(names):
        raise ConfigError(field_name, spec,
                          f"too many parameters (expected at most {len(names)}: "
                          f"{', '.join(names)})")
    out = dict(zip(names, positional, strict=False))
    for key, value in named.items():
        if key in out:
            raise ConfigError(field_name, spec, f"parameter '{key}' given twice")
        out[key] = value
    missing = [name for name in names[:required] if name not in out]
    if missing:
        raise ConfigError(field_name, spec, f"missing parameter '{missing[0]}'")
    return out


def parse_size(spec: str, field_name: str) -> SizeDist:
    """Parse a token-count spec (``129``, ``poisson:129``, ``geometric:112``, ``uniform:10,200``,
    ``lognormal:mean=500,sigma=0.8[,min=16]``, ``trace:PATH[,key=value...][,column=NAME]``; trace
    specs and formats are in :mod:`llmqueue.traces`).

    ``field_name`` (e.g. ``--prefill``) names the option in errors and picks the default trace
    column (the trace's prompt column if it mentions prefill, its output column for decode).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(field_name, spec, "size spec must be a non-empty string")
    text = spec.strip()
    kind, sep, body = text.partition(":")
    kind = kind.strip().lower()
    if not sep:
        kind, body = "constant", text
    try:
        if kind == "constant":
            p = _params(body, ("value",), 1, field_name, spec)
            return Constant(_int(p["value"], "constant value", field_name, spec))
        if kind == "poisson":
            p = _params(body, ("mean", "min"), 1, field_name, spec)
            return Poisson(_num(p["mean"], "poisson mean", field_name, spec),
                           _int(p.get("min", "1"), "min", field_name, spec))
        if kind == "geometric":
            p = _params(body, ("mean", "min"), 1, field_name, spec)
            return Geometric(_num(p["mean"], "geometric mean", field_name, spec),
                             _int(p.get("min", "1"), "min", field_name, spec))
        if kind == "uniform":
            p = _params(body, ("low", "high"), 2, field_name, spec)
            return Uniform(_int(p["low"], "uniform low", field_name, spec),
                           _int(p["high"], "uniform high", field_name, spec))
        if kind == "lognormal":
            p = _params(body, ("mean", "sigma", "min"), 2, field_name, spec)
            return LogNormal(_num(p["mean"], "lognormal mean", field_name, spec),
                             _num(p["sigma"], "lognormal sigma", field_name, spec),
                             _int(p.get("min", "1"), "min", field_name, spec))
        if kind == "trace":
            from llmqueue.traces import trace_sizes  # traces builds on this module

            return trace_sizes(text, field_name)
    except ConfigError as exc:
        if exc.field == field_name:
            raise
        raise ConfigError(field_name, spec, f"{exc.field} {exc.problem}") from None
    raise ConfigError(field_name, spec,
                      f"unknown size distribution '{kind}' (expected an integer, poisson, "
                      "geometric, uniform, lognormal or trace)")


# --------------------------------------------------------------------------------------------
# Arrival processes
# --------------------------------------------------------------------------------------------


def _check_rate(rate_per_s: object, name: str = "rate") -> float:
    if not _is_real(rate_per_s) or not math.isfinite(float(rate_per_s)) \
            or float(rate_per_s) <= 0:  # type: ignore[arg-type]
        raise ConfigError(name, rate_per_s, "arrival rate must be a finite number > 0 (per s)")
    return float(rate_per_s)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class PoissonArrivals:
    """Poisson arrivals: iid exponential gaps with mean 1000 / rate ms."""

    rate_per_s: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate_per_s", _check_rate(self.rate_per_s))

    def chunks_ms(self, rng: np.random.Generator,
                  chunk_size: int = CHUNK_SIZE) -> Iterator[np.ndarray]:
        """Endless chunks of ``chunk_size`` arrival times (ms), first at the first gap."""
        scale_ms = 1000.0 / self.rate_per_s
        last = 0.0
        while True:
            times = last + np.cumsum(rng.exponential(scale_ms, chunk_size))
            last = float(times[-1])
            yield times

    @property
    def spec(self) -> str:
        """Canonical spec text: ``poisson`` (the rate is given separately)."""
        return "poisson"


@dataclass(frozen=True, slots=True)
class DeterministicArrivals:
    """Evenly spaced arrivals: at 0, then every 1000 / rate ms (the paper's §6 experiment)."""

    rate_per_s: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate_per_s", _check_rate(self.rate_per_s))

    def chunks_ms(self, rng: np.random.Generator,
                  chunk_size: int = CHUNK_SIZE) -> Iterator[np.ndarray]:
        """Endless chunks of arrival times k * (1000 / rate) ms, k = 0, 1, ... (no drift)."""
        period_ms = 1000.0 / self.rate_per_s
        start = 0
        while True:
            yield np.arange(start, start + chunk_size, dtype=np.float64) * period_ms
            start += chunk_size

    @property
    def spec(self) -> str:
        """Canonical spec text: ``deterministic``."""
        return "deterministic"


@dataclass(frozen=True, slots=True)
class GammaArrivals:
    """Renewal arrivals with iid gamma gaps: mean 1000 / rate ms, coefficient of variation ``cv``
    (shape 1 / cv^2; cv = 1 is Poisson, cv > 1 burstier)."""

    rate_per_s: float
    cv: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate_per_s", _check_rate(self.rate_per_s))
        object.__setattr__(self, "cv", _check_real("gamma.cv", self.cv, high=100.0))

    def chunks_ms(self, rng: np.random.Generator,
                  chunk_size: int = CHUNK_SIZE) -> Iterator[np.ndarray]:
        """Endless chunks of arrival times (ms), first at the first gap."""
        shape = 1.0 / (self.cv * self.cv)
        scale_ms = 1000.0 / self.rate_per_s / shape
        last = 0.0
        while True:
            times = last + np.cumsum(rng.gamma(shape, scale_ms, chunk_size))
            last = float(times[-1])
            yield times

    @property
    def spec(self) -> str:
        """Canonical spec text, e.g. ``gamma:cv=2``."""
        return f"gamma:cv={_fmt(self.cv)}"


@dataclass(frozen=True, slots=True)
class TraceArrivals:
    """Replay of a trace's arrival times (shifted to start at 0, optionally time-scaled so that the
    mean rate (N-1)/span equals ``scale_to_rate_per_s``), with the trace's own token counts.

    ``options`` is the ``,key=value`` part of the trace spec (format, columns, window; see
    :mod:`llmqueue.traces`), kept so that ``spec`` reads back the same replay."""

    path: str
    times_ms: np.ndarray = field(compare=False, repr=False)
    prefill: np.ndarray = field(compare=False, repr=False)
    decode: np.ndarray = field(compare=False, repr=False)
    scale_to_rate_per_s: float | None = None
    options: str = ""

    def __post_init__(self) -> None:
        times = np.array(self.times_ms, dtype=np.float64)
        prefill = np.array(self.prefill, dtype=np.int64)
        decode = np.array(self.decode, dtype=np.int64)
        n = times.shape[0]
        if times.ndim != 1 or n < 2 or prefill.shape != (n,) or decode.shape != (n,):
            raise ConfigError("arrival", self.path,
                              "trace arrivals need >= 2 times and equally long token arrays")
        if not np.all(np.isfinite(times)) or times[0] != 0.0 or np.any(np.diff(times) < 0):
            raise ConfigError("arrival", self.path,
                              "trace times must be finite, start at 0 and be non-decreasing")
        if times[-1] <= 0.0:
            raise ConfigError("arrival", self.path,
                              "all trace arrivals are at the same time; the rate is undefined")
        if np.any(prefill < 0) or np.any(decode < 0) or np.any(prefill + decode < 1):
            raise ConfigError("arrival", self.path,
                              "trace token counts must be >= 0 with at least one per request")
        if self.scale_to_rate_per_s is not None:
            object.__setattr__(self, "scale_to_rate_per_s", _check_rate(self.scale_to_rate_per_s))
        object.__setattr__(self, "times_ms", _readonly(times))
        object.__setattr__(self, "prefill", _readonly(prefill))
        object.__setattr__(self, "decode", _readonly(decode))

    @classmethod
    def load(cls, path: str, scale_to_rate_per_s: float | None = None,
             field_name: str = "arrival") -> TraceArrivals:
        """Read a trace (a path or trace spec ``PATH[,key=value...]`` in any format of
        :mod:`llmqueue.traces`), shift to start at 0 and (optionally) rescale."""
        from llmqueue.traces import trace_arrivals  # traces builds on this module

        return trace_arrivals(path, scale_to_rate_per_s, field_name)

    def __len__(self) -> int:
        return int(self.times_ms.shape[0])

    @property
    def rate_per_s(self) -> float:
        """Mean arrival rate of the replay: (N - 1) / span."""
        return (self.times_ms.shape[0] - 1) / (float(self.times_ms[-1]) / 1000.0)

    @property
    def mean_prefill_tokens(self) -> float:
        """Mean prefill tokens per request of the trace."""
        return float(np.mean(self.prefill))

    @property
    def mean_decode_tokens(self) -> float:
        """Mean decode tokens per request of the trace."""
        return float(np.mean(self.decode))

    def chunks_ms(self, rng: np.random.Generator,
                  chunk_size: int = CHUNK_SIZE) -> Iterator[np.ndarray]:
        """The trace's arrival times (ms) in chunks; finite; the generator is not used."""
        for start in range(0, self.times_ms.shape[0], chunk_size):
            yield self.times_ms[start:start + chunk_size]

    @property
    def spec(self) -> str:
        """Canonical spec text: ``trace:PATH[,key=value...]`` (any target rate is given separately)."""
        return f"trace:{self.path}{self.options}"


ArrivalProcess = PoissonArrivals | DeterministicArrivals | GammaArrivals | TraceArrivals
"""Any arrival process: ``chunks_ms(rng)``, ``rate_per_s`` and canonical ``spec``."""


def is_trace_spec(spec: object) -> bool:
    """Whether an arrival or size spec replays a trace (``trace:PATH``, any case, any spaces)."""
    return isinstance(spec, str) and spec.strip().partition(":")[0].strip().lower() == "trace" \
        and ":" in spec


def parse_arrival(spec: str, rate_per_s: float | None) -> ArrivalProcess:
    """Parse ``poisson``, ``deterministic``, ``gamma:cv=2`` or ``trace:PATH[,key=value...]`` (see
    :mod:`llmqueue.traces`) with a rate (per s).

    Non-trace kinds need ``rate_per_s > 0``; for a trace a given rate time-scales the replay.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("arrival", spec, "arrival spec must be a non-empty string")
    kind, _, body = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind == "trace":
        if not body.strip():
            raise ConfigError("arrival", spec, "missing trace path")
        return TraceArrivals.load(spec, rate_per_s)  # checks the rate before reading the file
    if kind not in ("poisson", "deterministic", "gamma"):
        raise ConfigError("arrival", spec,
                          f"unknown arrival process '{kind}' (expected poisson, deterministic, "
                          "gamma:cv=X or trace:PATH)")
    if kind == "gamma":
        p = _params(body, ("cv",), 1, "arrival", spec)
        cv = _num(p["cv"], "gamma cv", "arrival", spec)
        rate = _check_rate(rate_per_s)
        try:
            return GammaArrivals(rate, cv)
        except ConfigError as exc:
            raise ConfigError("arrival", spec, f"{exc.field} {exc.problem}") from None
    if body.strip():
        raise ConfigError("arrival", spec, f"'{kind}' takes no parameters")
    rate = _check_rate(rate_per_s)
    return PoissonArrivals(rate) if kind == "poisson" else DeterministicArrivals(rate)


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    """An arrival process plus prefill/decode size distributions: a reproducible request stream.

    ``prefill``/``decode`` None take the sizes from a :class:`TraceArrivals` trace. ``paired``
    resamples the rows of two :class:`Empirical` columns of one file jointly (keeps P_i, D_i pairs).
    """

    arrival: ArrivalProcess
    prefill: SizeDist | None = None
    decode: SizeDist | None = None
    paired: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.arrival, ArrivalProcess):
            raise ConfigError("arrival", type(self.arrival).__name__,
                              "must be an arrival process")
        for name in ("prefill", "decode"):
            dist = getattr(self, name)
            if dist is None and not isinstance(self.arrival, TraceArrivals):
                raise ConfigError(name, None,
                                  "a size distribution is required unless arrivals are a trace")
            if dist is not None and not isinstance(dist, SizeDist):
                raise ConfigError(name, type(dist).__name__, "must be a size distribution")
        if self.paired:
            p, d = self.prefill, self.decode
            if not (isinstance(p, Empirical) and isinstance(d, Empirical)):
                raise ConfigError("paired", True,
                                  "joint sampling needs Empirical prefill and decode")
            if len(p) != len(d) or not _same_file(p.source, d.source):
                raise ConfigError("paired", (p.source, d.source),
                                  "joint sampling needs two columns of the same trace file")

    @property
    def rate_per_s(self) -> float:
        """Mean arrival rate (requests per second)."""
        return self.arrival.rate_per_s

    @property
    def mean_prefill_tokens(self) -> float:
        """Mean prefill tokens per request (the paper's m_p)."""
        if self.prefill is None:
            assert isinstance(self.arrival, TraceArrivals)
            return self.arrival.mean_prefill_tokens
        return self.prefill.mean

    @property
    def mean_decode_tokens(self) -> float:
        """Mean decode tokens per request (the paper's m_d)."""
        if self.decode is None:
            assert isinstance(self.arrival, TraceArrivals)
            return self.arrival.mean_decode_tokens
        return self.decode.mean

    def requests(self, seed: int, max_requests: int | None = None,
                 duration_ms: float | None = None) -> Iterator[Request]:
        """Stream requests (ids 0, 1, ... in arrival order) until ``max_requests`` have come, the
        first arrival at or after ``duration_ms``, or the end of a trace.

        Same seed, same stream; the first k requests do not depend on the stopping rule.
        """
        return _as_requests(self.chunks(seed, max_requests, duration_ms))

    def chunks(self, seed: int, max_requests: int | None = None,
               duration_ms: float | None = None) -> Iterator[tuple[np.ndarray, np.ndarray,
                                                                    np.ndarray, np.ndarray]]:
        """The same stream as ``requests`` as numpy chunks (ids, arrival_ms, prefill, decode):
        no Python object per request (for the compiled engine)."""
        if not _is_int(seed) or int(seed) < 0:
            raise ConfigError("seed", seed, "must be a non-negative integer")
        if max_requests is not None and (not _is_int(max_requests) or max_requests < 0):
            raise ConfigError("max_requests", max_requests, "must be a non-negative integer")
        if duration_ms is not None and (not _is_real(duration_ms)
                                        or math.isnan(float(duration_ms))
                                        or float(duration_ms) < 0):
            raise ConfigError("duration_ms", duration_ms, "must be a number >= 0")
        if max_requests is None and (duration_ms is None or math.isinf(float(duration_ms))) \
                and not isinstance(self.arrival, TraceArrivals):
            raise ConfigError("max_requests", max_requests,
                              "give max_requests or a finite duration_ms: the arrivals never end")
        limit = math.inf if max_requests is None else int(max_requests)
        horizon_ms = math.inf if duration_ms is None else float(duration_ms)
        return self._stream(int(seed), limit, horizon_ms)

    def _stream(self, seed: int, limit: float, horizon_ms: float
                ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        seeds = np.random.SeedSequence(seed).spawn(3)
        rng_arrival, rng_prefill, rng_decode = (np.random.Generator(np.random.PCG64(s))
                                                for s in seeds)
        next_id = 0
        offset = 0
        for times in self.arrival.chunks_ms(rng_arrival, CHUNK_SIZE):
            prefill, decode = self._sizes(rng_prefill, rng_decode, offset, times.shape[0])
            offset += times.shape[0]
            n = times.shape[0]
            if limit - next_id < n:
                n = int(limit - next_id)
            if math.isfinite(horizon_ms):
                n = min(n, int(np.searchsorted(times[:n], horizon_ms, side="left")))
            if n > 0:
                ids = np.arange(next_id, next_id + n, dtype=np.int64)
                yield (ids, np.asarray(times[:n], dtype=np.float64),
                       np.asarray(prefill[:n], dtype=np.int64), np.asarray(decode[:n], dtype=np.int64))
                next_id += n
            if n < times.shape[0]:
                return

    def _sizes(self, rng_prefill: np.random.Generator, rng_decode: np.random.Generator,
               offset: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Sizes for the next chunk: always CHUNK_SIZE draws per generator (prefix stability)."""
        if self.paired:
            assert isinstance(self.prefill, Empirical) and isinstance(self.decode, Empirical)
            rows = self.prefill.sample_rows(rng_prefill, CHUNK_SIZE)[:n]
            return self.prefill.take(rows), self.decode.take(rows)
        return (self._one(self.prefill, rng_prefill, offset, n, "prefill"),
                self._one(self.decode, rng_decode, offset, n, "decode"))

    def _one(self, dist: SizeDist | None, rng: np.random.Generator, offset: int, n: int,
             which: str) -> np.ndarray:
        if dist is not None:
            return dist.sample(rng, CHUNK_SIZE)[:n]
        assert isinstance(self.arrival, TraceArrivals)
        column = self.arrival.prefill if which == "prefill" else self.arrival.decode
        return column[offset:offset + n]


def _as_requests(chunks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
                 ) -> Iterator[Request]:
    for ids, times, prefill, decode in chunks:
        for i, t, p, d in zip(ids.tolist(), times.tolist(), prefill.tolist(), decode.tolist(),
                              strict=True):
            yield Request(i, t, p, d)


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def make_workload(arrival_spec: str, prefill_spec: str | None, decode_spec: str | None,
                  rate_per_s: float | None) -> Workload:
    """Build a Workload from spec strings (the CLI's --arrival/--prefill/--decode/--rate).

    Sizes omitted with trace arrivals come from the trace; ``trace:PATH`` for both sizes from the
    same file samples (prefill, decode) rows jointly.
    """
    arrival = parse_arrival(arrival_spec, rate_per_s)
    prefill = None if prefill_spec is None else parse_size(prefill_spec, "prefill")
    decode = None if decode_spec is None else parse_size(decode_spec, "decode")
    paired = (isinstance(prefill, Empirical) and isinstance(decode, Empirical)
              and _same_file(prefill.source, decode.source) and len(prefill) == len(decode))
    return Workload(arrival, prefill, decode, paired)
