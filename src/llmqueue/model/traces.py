"""Request traces from files: real arrivals and token counts as workloads, time windows, rate
scaling, and fitted distributions for synthetic runs with the same statistics.

Two readers fill one in-memory :class:`RequestTrace` (arrival times in s from the trace's time 0,
prompt and output tokens per request):

- ``csv``: a CSV file with a header row. The columns default to the Azure/Vidur names
  (``arrived_at``, ``num_prefill_tokens``, ``num_decode_tokens``, times in s); ``arrival=``,
  ``prefill=``, ``decode=`` and ``unit=`` name others. A CSV without the (default) arrival column
  holds lengths only.
- ``vllm``: the JSONL log of vLLM's benchmark tooling (:func:`read_vllm_log`).

A trace spec is ``PATH[,key=value...]`` (see :func:`parse_trace_spec`); ``--arrival trace:SPEC``
replays it and ``--prefill/--decode trace:SPEC`` resample its lengths.

The JSONL log of vLLM's benchmark tooling has one object per request with ``input_toks``,
``output_toks``, ``arrival_time`` (client wall clock, s) and the engine's monotonic timestamps
``queued_ts``, ``scheduled_ts``, ``first_token_ts``, ``last_token_ts`` (s). The two clocks differ
by an unknown offset; we put arrivals on the engine clock with the smallest observed
``queued_ts - arrival_time`` (the fastest hand-over counts as instantaneous), so arrival gaps
stay exactly as the client sent them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from llmqueue.errors import ConfigError
from llmqueue.io.text import format_number
from llmqueue.model.workload import (
    TRACE_ARRIVAL_COLUMN,
    TRACE_DECODE_COLUMN,
    TRACE_PREFILL_COLUMN,
    ArrayRows,
    Constant,
    DeterministicArrivals,
    Empirical,
    GammaArrivals,
    Geometric,
    LogNormal,
    Poisson,
    PoissonArrivals,
    SizeDist,
    TokenCounts,
    TraceArrivals,
    Uniform,
    _check_rate,
    _csv_token_column,
    _csv_trace_rows,
    _num,
    _readonly,
)

__all__ = [
    "PEAK_WINDOW_S",
    "TIME_UNITS_S",
    "TRACE_FORMATS",
    "Candidate",
    "DistFit",
    "RequestTrace",
    "RunLog",
    "Summary",
    "TraceFit",
    "TraceSpec",
    "TraceStats",
    "TraceWindow",
    "fit_arrivals",
    "fit_lengths",
    "fit_trace",
    "ks_distance",
    "load_request_trace",
    "parse_trace_spec",
    "parse_window",
    "read_vllm_log",
    "size_cdf",
    "size_quantile",
    "trace_arrivals",
    "trace_sizes",
    "trace_stats",
]

_VLLM_KEYS = ("input_toks", "output_toks", "arrival_time", "queued_ts", "first_token_ts",
              "last_token_ts")


@dataclass(frozen=True, slots=True, eq=False)
class RunLog:
    """One real run, per request (arrays in arrival order, times in ms from the first arrival).

    ``first_token_ms`` / ``finish_ms`` are NaN for requests that never got there.
    """

    path: str
    request_ids: tuple[str, ...]
    arrival_ms: np.ndarray
    prefill_tokens: np.ndarray
    decode_tokens: np.ndarray
    first_token_ms: np.ndarray
    finish_ms: np.ndarray

    def __len__(self) -> int:
        return int(self.arrival_ms.shape[0])

    @property
    def ttft_ms(self) -> np.ndarray:
        """Time to first token per request."""
        return self.first_token_ms - self.arrival_ms

    @property
    def e2el_ms(self) -> np.ndarray:
        """End-to-end latency per request."""
        return self.finish_ms - self.arrival_ms

    @property
    def tpot_ms(self) -> np.ndarray:
        """Time per output token after the first (vLLM's definition); NaN for one-token outputs."""
        gaps = (self.decode_tokens - 1).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(gaps > 0, (self.finish_ms - self.first_token_ms) / gaps, np.nan)


def _value(obj: dict, key: str, line: int, path: str, field: str) -> float:
    if key not in obj:
        raise ConfigError(field, path, f"line {line}: missing key '{key}'")
    value = obj[key]
    if value is None and key in ("first_token_ts", "last_token_ts"):
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(field, path, f"line {line}: '{key}' must be a finite number, found {value!r}")
    return float(value)


def read_vllm_log(path: str, field: str = "run-log") -> RunLog:
    """Read a vLLM benchmark JSONL request log (see the module docstring); requests are sorted by
    arrival. Errors name the file, the line and the key."""
    if not isinstance(path, str) or not os.path.isfile(path):
        raise ConfigError(field, path, "run log file not found")
    ids: list[str] = []
    rows: list[list[float]] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ConfigError(field, path, f"line {number}: not JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise ConfigError(field, path, f"line {number}: expected a JSON object")
                row = [_value(obj, key, number, path, field) for key in _VLLM_KEYS]
                for key, value in zip(_VLLM_KEYS[:2], row[:2], strict=True):
                    if value < 0 or not value.is_integer():
                        raise ConfigError(field, path, f"line {number}: '{key}' must be a "
                                                       f"token count >= 0, found {value:g}")
                if row[0] + row[1] < 1:
                    raise ConfigError(field, path, f"line {number}: request has no tokens")
                ids.append(str(obj.get("request_id", f"line-{number}")))
                rows.append(row)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(field, path, f"cannot read run log: {exc}") from None
    if not rows:
        raise ConfigError(field, path, "run log holds no requests")
    data = np.array(rows, dtype=float)
    order = np.argsort(data[:, 2], kind="stable")
    data = data[order]
    offset_s = float(np.min(data[:, 3] - data[:, 2]))
    arrival_engine_s = data[:, 2] + offset_s
    origin_s = float(arrival_engine_s[0])

    def ms(column: np.ndarray) -> np.ndarray:
        return (column - origin_s) * 1000.0

    return RunLog(
        path=path,
        request_ids=tuple(ids[i] for i in order),
        arrival_ms=ms(arrival_engine_s),
        prefill_tokens=data[:, 0].astype(np.int64),
        decode_tokens=data[:, 1].astype(np.int64),
        first_token_ms=ms(data[:, 4]),
        finish_ms=ms(data[:, 5]),
    )


# --------------------------------------------------------------------------------------------
# Trace specs
# --------------------------------------------------------------------------------------------

TRACE_FORMATS = ("csv", "vllm")
"""Trace file formats: any CSV with a header (Azure/Vidur column names by default), vLLM JSONL."""

TIME_UNITS_S: dict[str, float] = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
"""Seconds per unit of a CSV arrival column (``unit=``)."""

_EXTENSION_FORMATS = {".csv": "csv", ".jsonl": "vllm", ".json": "vllm"}
_KEYS = ("format", "arrival", "prefill", "decode", "unit", "start", "end", "column")
_CSV_KEYS = ("arrival", "prefill", "decode", "unit")
_VLLM_COLUMNS = {"input_toks": "prefill", "output_toks": "decode"}
_KEY_VALUE = re.compile(r"^\s*([A-Za-z_]+)\s*=(.*)$")


def _default_format(path: str) -> str:
    """The format a file name implies: vllm for .jsonl/.json, csv otherwise (as before formats)."""
    return _EXTENSION_FORMATS.get(os.path.splitext(path)[1].lower(), "csv")


@dataclass(frozen=True, slots=True)
class TraceSpec:
    """Where and how to read a trace: file, format, CSV column names and time unit, an optional
    window ``[start_s, end_s)`` of trace time and, for size specs, one column to take.

    ``arrival_column`` None reads ``arrived_at`` when the file has it (else lengths only);
    a named arrival column must exist.
    """

    path: str
    format: str
    arrival_column: str | None = None
    prefill_column: str = TRACE_PREFILL_COLUMN
    decode_column: str = TRACE_DECODE_COLUMN
    unit: str = "s"
    start_s: float | None = None
    end_s: float | None = None
    column: str | None = None

    @property
    def options(self) -> str:
        """The ``,key=value`` part of the canonical spec (only keys that differ from defaults)."""
        parts: list[str] = []
        if _default_format(self.path) != self.format:
            parts.append(f"format={self.format}")
        if self.arrival_column is not None:
            parts.append(f"arrival={self.arrival_column}")
        if self.prefill_column != TRACE_PREFILL_COLUMN:
            parts.append(f"prefill={self.prefill_column}")
        if self.decode_column != TRACE_DECODE_COLUMN:
            parts.append(f"decode={self.decode_column}")
        if self.unit != "s":
            parts.append(f"unit={self.unit}")
        if self.start_s is not None:
            parts.append(f"start={format_number(self.start_s)}")
        if self.end_s is not None:
            parts.append(f"end={format_number(self.end_s)}")
        if self.column is not None:
            parts.append(f"column={self.column}")
        return "".join("," + part for part in parts)

    @property
    def text(self) -> str:
        """Canonical spec text (without ``trace:``); :func:`parse_trace_spec` reads it back."""
        return self.path + self.options

    @property
    def source(self) -> str:
        """The file plus the ``format=`` key where its name does not give the format."""
        if _default_format(self.path) != self.format:
            return f"{self.path},format={self.format}"
        return self.path


def _split_spec(text: str, field_name: str) -> tuple[str, dict[str, str]]:
    """Split ``PATH,key=value,...`` from the right (paths may hold commas); reject unknown keys."""
    body = text.strip()
    if body[:6].lower() == "trace:":
        body = body[6:]
    parts = body.split(",")
    named: dict[str, str] = {}
    while len(parts) > 1:
        match = _KEY_VALUE.match(parts[-1])
        if match is None:
            break
        key, value = match.group(1).lower(), match.group(2).strip()
        if key not in _KEYS:
            raise ConfigError(field_name, text, f"unknown trace parameter '{key}' (expected one of: "
                                                f"{', '.join(_KEYS)})")
        if key in named:
            raise ConfigError(field_name, text, f"trace parameter '{key}' given twice")
        if not value:
            raise ConfigError(field_name, text, f"trace parameter '{key}' is empty")
        named[key] = value
        parts.pop()
    path = ",".join(parts).strip()
    if not path:
        raise ConfigError(field_name, text, "missing trace path")
    return path, named


def _seconds(text: str, key: str, field_name: str, spec: str) -> float:
    """A time in seconds >= 0 from a spec's ``key`` (workload's number check, then the sign)."""
    value = _num(text, f"{key} (seconds)", field_name, spec)
    if value < 0:
        raise ConfigError(field_name, spec, f"{key} must be a finite number of seconds >= 0")
    return value


def parse_trace_spec(text: str, field_name: str = "trace") -> TraceSpec:
    """Parse ``[trace:]PATH[,format=csv|vllm][,arrival=COL][,prefill=COL][,decode=COL]
    [,unit=s|ms|us|ns][,start=S][,end=S][,column=COL]``.

    The format comes from ``format=`` or the extension (``.jsonl``/``.json``: vllm, else csv).
    Column names and ``unit`` apply to CSV files; ``start``/``end`` keep arrivals in that window.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(field_name, text, "trace spec must be a non-empty string")
    path, named = _split_spec(text, field_name)
    fmt = named.get("format", "").lower() or _default_format(path)
    if fmt not in TRACE_FORMATS:
        raise ConfigError(field_name, text, f"unknown trace format '{fmt}' (expected one of: "
                                            f"{', '.join(TRACE_FORMATS)})")
    if fmt == "vllm":
        given = [key for key in _CSV_KEYS if key in named]
        if given:
            raise ConfigError(field_name, text, f"'{given[0]}' applies to CSV traces only (the vLLM "
                                                "log's keys and units are fixed)")
        if named.get("column", "input_toks") not in _VLLM_COLUMNS:
            raise ConfigError(field_name, text, "column of a vLLM log must be input_toks or "
                                                f"output_toks, not {named['column']!r}")
    unit = named.get("unit", "s").lower()
    if unit not in TIME_UNITS_S:
        raise ConfigError(field_name, text, f"unknown time unit '{unit}' (expected one of: "
                                            f"{', '.join(TIME_UNITS_S)})")
    start = _seconds(named["start"], "start", field_name, text) if "start" in named else None
    end = _seconds(named["end"], "end", field_name, text) if "end" in named else None
    if end is not None and end <= (start or 0.0):
        raise ConfigError(field_name, text, f"end ({format_number(end)} s) must be after start "
                                            f"({format_number(start or 0.0)} s)")
    return TraceSpec(path, fmt, named.get("arrival"),
                     named.get("prefill", TRACE_PREFILL_COLUMN), named.get("decode", TRACE_DECODE_COLUMN),
                     unit, start, end, named.get("column"))


def parse_window(text: str, field_name: str = "--window") -> tuple[float, float]:
    """Parse ``START:END`` in seconds of trace time (either side may be empty: 0, the end)."""
    if not isinstance(text, str) or text.count(":") != 1:
        raise ConfigError(field_name, text, "window must be START:END in seconds, e.g. 600:1200")
    start_text, end_text = (part.strip() for part in text.split(":"))
    start = _seconds(start_text, "window start", field_name, text) if start_text else 0.0
    end = _seconds(end_text, "window end", field_name, text) if end_text else math.inf
    if end <= start:
        raise ConfigError(field_name, text, "window end must be after its start")
    return start, end


# --------------------------------------------------------------------------------------------
# Traces in memory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceWindow:
    """A time window ``[start_s, end_s)`` of a trace and how many requests arrive in it."""

    start_s: float
    end_s: float
    requests: int

    @property
    def rate_per_s(self) -> float:
        """Requests per second over the window's length."""
        return self.requests / (self.end_s - self.start_s)


@dataclass(frozen=True, slots=True, eq=False)
class RequestTrace:
    """Requests of a trace in arrival order: arrival times (s from the trace's time 0; None for a
    lengths-only trace) and prompt/output token counts. ``spec`` reloads exactly this trace."""

    spec: TraceSpec
    arrival_s: np.ndarray | None
    prefill_tokens: np.ndarray
    decode_tokens: np.ndarray

    def __post_init__(self) -> None:
        n = np.shape(self.prefill_tokens)[0] if np.ndim(self.prefill_tokens) == 1 else -1
        if n < 1 or np.shape(self.decode_tokens) != (n,) or \
                (self.arrival_s is not None and np.shape(self.arrival_s) != (n,)):
            raise ConfigError("trace", self.spec.path, "a trace needs >= 1 request and equally long "
                                                       "1-d arrays of arrivals and token counts")
        times = self.arrival_s
        if times is not None and not (np.all(np.isfinite(times)) and np.all(np.diff(times) >= 0)):
            raise ConfigError("trace", self.spec.path, "arrival times must be finite and non-decreasing")

    def __len__(self) -> int:
        return int(self.prefill_tokens.shape[0])

    def _arrivals(self, field_name: str) -> np.ndarray:
        if self.arrival_s is None:
            raise ConfigError(field_name, self.spec.path,
                              f"trace has no arrival times (no column '{TRACE_ARRIVAL_COLUMN}'; name "
                              "one with arrival=COLUMN)")
        return self.arrival_s

    @property
    def span_s(self) -> float:
        """Time from the first to the last arrival."""
        times = self._arrivals("trace")
        return float(times[-1] - times[0])

    @property
    def rate_per_s(self) -> float:
        """Mean arrival rate (N - 1) / span, the same rule as :class:`TraceArrivals`."""
        span = self.span_s
        if len(self) < 2 or span <= 0.0:
            raise ConfigError("trace", self.spec.path, "the rate needs 2 arrivals at different times")
        return (len(self) - 1) / span

    def window(self, start_s: float, end_s: float = math.inf, field_name: str = "window") -> RequestTrace:
        """The requests arriving in ``[start_s, end_s)`` of this trace's time, re-based so that
        ``start_s`` becomes 0 (the new spec says the window in the file's time)."""
        times = self._arrivals(field_name)
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in (start_s, end_s)):
            raise ConfigError(field_name, (start_s, end_s), "window bounds must be numbers of seconds")
        label = f"{format_number(start_s)}:{format_number(end_s)}"
        if not (math.isfinite(start_s) and start_s >= 0 and end_s > start_s):
            raise ConfigError(field_name, label, "window needs 0 <= start < end (finite start)")
        keep = (times >= start_s) & (times < end_s)
        if not np.any(keep):
            raise ConfigError(field_name, label,
                              f"no request arrives in [{format_number(start_s)}, {format_number(end_s)}) s "
                              f"(the trace's arrivals run from {format_number(float(times[0]))} to "
                              f"{format_number(float(times[-1]))} s)")
        base = self.spec.start_s or 0.0
        end = None if math.isinf(end_s) else base + end_s
        if self.spec.end_s is not None:
            end = self.spec.end_s if end is None else min(end, self.spec.end_s)
        spec = replace(self.spec, start_s=base + start_s if base + start_s > 0 else None, end_s=end)
        return RequestTrace(spec, _readonly(times[keep] - start_s),
                            _readonly(self.prefill_tokens[keep]), _readonly(self.decode_tokens[keep]))

    def busiest_window(self, length_s: float) -> TraceWindow:
        """The window of ``length_s`` seconds holding the most arrivals (the earliest such one).

        Some busiest window starts at an arrival, so only those starts are checked.
        """
        times = self._arrivals("busiest")
        if not (isinstance(length_s, int | float) and math.isfinite(length_s) and length_s > 0):
            raise ConfigError("busiest", length_s, "window length must be a finite number of seconds > 0")
        counts = np.searchsorted(times, times + length_s, side="left") - np.arange(times.shape[0])
        i = int(np.argmax(counts))
        return TraceWindow(float(times[i]), float(times[i]) + float(length_s), int(counts[i]))

    def to_arrivals(self, scale_to_rate_per_s: float | None = None,
                    field_name: str = "arrival") -> TraceArrivals:
        """Replay as an arrival process: shifted to start at 0 and, with a rate, time-scaled so that
        (N - 1) / span of the replayed requests equals it (the trace's own sizes ride along)."""
        if scale_to_rate_per_s is not None:
            scale_to_rate_per_s = _check_rate(scale_to_rate_per_s)
        times = self._arrivals(field_name)
        rows = ArrayRows(times, self.prefill_tokens, self.decode_tokens, field_name)
        return TraceArrivals(self.spec.path, rows, scale_to_rate_per_s, self.spec.options)


def _window_label(spec: TraceSpec) -> str:
    end = math.inf if spec.end_s is None else spec.end_s
    return f"{format_number(spec.start_s or 0.0)}:{format_number(end)}"


def _csv_rows(spec: TraceSpec, field_name: str, need_arrivals: bool
              ) -> Iterator[tuple[np.ndarray | None, np.ndarray, np.ndarray]]:
    """The requests of a CSV trace, lazily, in blocks: (arrival s from the trace's first arrival, or
    None for a lengths-only file; prompt and output tokens), the spec's window applied and re-based
    to its start.

    The file is read only as far as the blocks are taken. A window's start is found by passing over
    blocks of lines whose last arrival is before it (their rows are not checked: the trace must be
    sorted), and reading stops at the first arrival at or after its end. A bad row in what is read
    raises (with its row and line) when the requests after it are asked for.
    """
    arrival = spec.arrival_column or TRACE_ARRIVAL_COLUMN
    optional = not need_arrivals and spec.arrival_column is None
    unit = TIME_UNITS_S[spec.unit]
    windowed = spec.start_s is not None or spec.end_s is not None
    start = spec.start_s or 0.0
    end = math.inf if spec.end_s is None else spec.end_s
    origin: float | None = None
    last: float | None = None
    seen = kept = 0
    past_end = False  # the window is empty: read on (passing over blocks) for the last arrival

    def before_window(last_raw: float) -> bool:
        return past_end or (origin is not None and (last_raw - origin) * unit < start)

    blocks = _csv_trace_rows(spec.path, arrival, spec.prefill_column, spec.decode_column, field_name,
                             arrival_optional=optional, skip=before_window if windowed else None)
    for block in blocks:
        if block.skipped_last is not None:
            last, seen = block.skipped_last, seen + 1
            continue
        raw = block.arrival
        seen += block.prefill.shape[0]
        if raw is None:
            if windowed:
                raise ConfigError(field_name, spec.text, "start=/end= need arrival times; the trace has none")
            yield None, block.prefill, block.decode
            continue
        if origin is None:
            origin = float(raw[0])
        last = float(raw[-1])
        if past_end:
            continue
        times = (raw - origin) * unit
        if not windowed:
            yield times, block.prefill, block.decode
            continue
        keep = (times >= start) & (times < end)
        if np.any(keep):
            kept += int(np.count_nonzero(keep))
            yield times[keep] - start, block.prefill[keep], block.decode[keep]
        if times[-1] >= end:
            if kept:
                blocks.close()
                return
            past_end = True
    if not seen:
        raise ConfigError(field_name, spec.path, "trace file has no data rows")
    if windowed and not kept:
        assert origin is not None and last is not None
        raise ConfigError(field_name, _window_label(spec),
                          f"no request arrives in [{format_number(start)}, {format_number(end)}) s (the "
                          f"trace's arrivals run from 0 to {format_number((last - origin) * unit)} s)")


def _read_vllm(spec: TraceSpec, field_name: str) -> RequestTrace:
    """The whole vLLM log of ``spec``."""
    log = read_vllm_log(spec.path, field_name)
    return RequestTrace(spec, _readonly(log.arrival_ms / 1000.0), _readonly(log.prefill_tokens),
                        _readonly(log.decode_tokens))


def load_request_trace(spec: str | TraceSpec, field_name: str = "trace", *,
                       need_arrivals: bool = False) -> RequestTrace:
    """Read a trace from a spec (text or :class:`TraceSpec`) into memory, window applied.

    With ``need_arrivals`` a CSV must have its arrival column; otherwise a CSV without the default
    ``arrived_at`` column loads as lengths only. A CSV is read in blocks (no Python object per row)
    and, with a window, only up to the window's end. Errors are ConfigError on ``field_name``.
    """
    parsed = spec if isinstance(spec, TraceSpec) else parse_trace_spec(spec, field_name)
    if parsed.column is not None:
        raise ConfigError(field_name, parsed.text, "column= picks the sizes of --prefill/--decode "
                                                   "trace specs; a whole trace takes no column")
    if parsed.format == "vllm":
        trace = _read_vllm(replace(parsed, start_s=None, end_s=None), field_name)
        if parsed.start_s is None and parsed.end_s is None:
            return trace
        return trace.window(parsed.start_s or 0.0, math.inf if parsed.end_s is None else parsed.end_s,
                            field_name)
    blocks = list(_csv_rows(parsed, field_name, need_arrivals))
    times = None if blocks[0][0] is None else _readonly(np.concatenate([b[0] for b in blocks]))
    prefill, decode = (_readonly(np.concatenate([b[k] for b in blocks])) for k in (1, 2))
    if parsed.start_s is not None and parsed.start_s <= 0:  # as RequestTrace.window writes it
        parsed = replace(parsed, start_s=None)
    return RequestTrace(parsed, times, prefill, decode)


@dataclass(frozen=True, slots=True, eq=False)
class _FileRows:
    """The requests of a trace file for a replay (:class:`TraceRows`), read afresh by every pass: a
    CSV lazily in blocks, as far as the pass goes; a vLLM log whole (it is sorted in memory)."""

    spec: TraceSpec
    field_name: str

    def rows(self) -> Generator[tuple[np.ndarray, np.ndarray, np.ndarray], None, None]:
        """Blocks of (arrival s, prefill tokens, decode tokens), the spec's window applied."""
        if self.spec.format == "vllm":
            trace = load_request_trace(self.spec, self.field_name, need_arrivals=True)
            assert trace.arrival_s is not None
            yield trace.arrival_s, trace.prefill_tokens, trace.decode_tokens
            return
        blocks = _csv_rows(self.spec, self.field_name, need_arrivals=True)
        try:
            for times, prefill, decode in blocks:
                assert times is not None
                yield times, prefill, decode
        finally:
            blocks.close()


def trace_arrivals(text: str, scale_to_rate_per_s: float | None = None,
                   field_name: str = "arrival") -> TraceArrivals:
    """The arrival process of ``--arrival trace:SPEC``: replay, optionally time-scaled to a rate.

    The trace is read lazily (see :class:`TraceArrivals`): here its first ``CHUNK_SIZE + 1``
    requests, then as far as each run goes.
    """
    if scale_to_rate_per_s is not None:
        scale_to_rate_per_s = _check_rate(scale_to_rate_per_s)
    spec = parse_trace_spec(text, field_name)
    if spec.column is not None:
        raise ConfigError(field_name, spec.text, "column= picks the sizes of --prefill/--decode "
                                                 "trace specs; a whole trace takes no column")
    return TraceArrivals(spec.path, _FileRows(spec, field_name), scale_to_rate_per_s, spec.options)


def _role(field_name: str, text: str) -> str:
    lowered = field_name.lower()
    for role in ("prefill", "decode"):
        if role in lowered:
            return role
    raise ConfigError(field_name, text,
                      "cannot tell which trace column to use; write trace:PATH,column=NAME")


def trace_sizes(text: str, field_name: str) -> Empirical:
    """The size distribution of ``--prefill/--decode trace:SPEC[,column=NAME]``: resample the
    column (by default the prompt column for a prefill field, the output column for decode).

    The whole column is read (resampling needs it), in blocks into one int32 array: 4 bytes a
    request, no Python object per row."""
    spec = parse_trace_spec(text, field_name)
    if spec.start_s is not None or spec.end_s is not None:
        raise ConfigError(field_name, text, "start=/end= select arrivals; give them in --arrival "
                                            "trace:... (sizes then come from that window)")
    if spec.format == "vllm":
        key = spec.column or ("input_toks" if _role(field_name, text) == "prefill" else "output_toks")
        log = read_vllm_log(spec.path, field_name)
        values = log.prefill_tokens if _VLLM_COLUMNS[key] == "prefill" else log.decode_tokens
        zero = np.flatnonzero(values < 1)
        if zero.size:
            raise ConfigError(field_name, spec.path, f"request {log.request_ids[int(zero[0])]} has "
                                                     f"{key} = 0; sizes must be >= 1")
        return Empirical(TokenCounts(_readonly(values.astype(np.int32))), spec.source, key)
    column = spec.column
    if column is None:
        column = spec.prefill_column if _role(field_name, text) == "prefill" else spec.decode_column
    counts = _csv_token_column(spec.path, column, field_name, 1)
    if not counts.shape[0]:
        raise ConfigError(field_name, text, "trace file has no data rows")
    return Empirical(TokenCounts(counts), spec.source, column)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------

_QUANTILES = (0.5, 0.9, 0.99)

PEAK_WINDOW_S = 60.0
"""Window length for a trace's peak rate (reported when the trace spans >= 10 such windows)."""


@dataclass(frozen=True, slots=True)
class Summary:
    """Mean and p50/p90/p99 of a distribution (trace or fit); std/min/max for traces only."""

    mean: float
    p50: float
    p90: float
    p99: float
    std: float | None = None
    min: float | None = None
    max: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        """Plain mapping for JSON."""
        return asdict(self)


def _summary(values: np.ndarray) -> Summary:
    """Summary of observed values; percentiles are observed values (inverted CDF)."""
    data = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = (float(x) for x in np.quantile(data, _QUANTILES, method="inverted_cdf"))
    return Summary(float(np.mean(data)), p50, p90, p99, float(np.std(data)), float(np.min(data)),
                   float(np.max(data)))


@dataclass(frozen=True, slots=True)
class TraceStats:
    """What a trace holds: request count, arrival rate, burstiness (cv of the gaps) and the rate of
    its busiest ``PEAK_WINDOW_S`` window, length summaries and the prompt/output rank correlation
    (None where undefined)."""

    spec: str
    format: str
    requests: int
    span_s: float | None
    rate_per_s: float | None
    interarrival_cv: float | None
    gap_ms: Summary | None
    prefill: Summary
    decode: Summary
    spearman_rho: float | None
    peak_rate_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping for JSON."""
        return {
            "spec": self.spec, "format": self.format, "requests": self.requests,
            "span_s": self.span_s, "rate_per_s": self.rate_per_s,
            "interarrival_cv": self.interarrival_cv, "peak_rate_per_s": self.peak_rate_per_s,
            "gap_ms": None if self.gap_ms is None else self.gap_ms.to_dict(),
            "prefill_tokens": self.prefill.to_dict(), "decode_tokens": self.decode.to_dict(),
            "spearman_rho": self.spearman_rho,
        }


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    from scipy import stats
    if a.shape[0] < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return None
    return float(stats.spearmanr(a, b).statistic)


def trace_stats(trace: RequestTrace) -> TraceStats:
    """Statistics of a trace: rate (N - 1) / span, the coefficient of variation of inter-arrival
    gaps, the busiest ``PEAK_WINDOW_S`` window's rate, length summaries and Spearman's rho between
    prompt and output lengths."""
    span = rate = cv = peak = None
    gap_ms = None
    times = trace.arrival_s
    if times is not None and len(trace) >= 2:
        span = float(times[-1] - times[0])
        gaps = np.diff(times) * 1000.0
        gap_ms = _summary(gaps)
        if span > 0:
            rate = (len(trace) - 1) / span
            cv = float(np.std(gaps) / np.mean(gaps))
        if span >= 10 * PEAK_WINDOW_S:
            peak = trace.busiest_window(PEAK_WINDOW_S).rate_per_s
    return TraceStats(trace.spec.text, trace.spec.format, len(trace), span, rate, cv, gap_ms,
                      _summary(trace.prefill_tokens), _summary(trace.decode_tokens),
                      _spearman(trace.prefill_tokens, trace.decode_tokens), peak)


# --------------------------------------------------------------------------------------------
# Fitted distributions
# --------------------------------------------------------------------------------------------

_SIG_DIGITS = 6


def _round(x: float, digits: int = _SIG_DIGITS) -> float:
    """``x`` to ``digits`` significant digits, so that printed specs stay short and exact."""
    return float(f"{x:.{digits}g}")


def _lognormal_cdf(k: np.ndarray, mean: float, sigma: float, min_tokens: int) -> np.ndarray:
    """P(max(min, round(X)) <= k), X lognormal with E[X] = mean: P(X < k + 1/2) from min on."""
    from scipy import stats
    mu = math.log(mean) - sigma * sigma / 2.0
    return np.where(k >= min_tokens, stats.lognorm.cdf(k + 0.5, sigma, scale=math.exp(mu)), 0.0)


def size_cdf(dist: SizeDist, k: np.ndarray) -> np.ndarray:
    """P(size <= k) at integer points ``k`` for every size distribution (rounding and clamping as
    the distribution samples)."""
    from scipy import stats
    k = np.asarray(k, dtype=np.float64)
    if isinstance(dist, Constant):
        return (k >= dist.value).astype(np.float64)
    if isinstance(dist, Empirical):
        values = np.sort(dist.array.astype(np.float64))
        return np.searchsorted(values, k, side="right") / values.shape[0]
    if isinstance(dist, Uniform):
        return np.clip((np.floor(k) - dist.low + 1) / (dist.high - dist.low + 1), 0.0, 1.0)
    if isinstance(dist, LogNormal):
        return _lognormal_cdf(k, dist.mean_param, dist.sigma, dist.min_tokens)
    if isinstance(dist, Geometric):
        raw = stats.geom.cdf(k, 1.0 / dist.mean_param)
    else:
        raw = stats.poisson.cdf(k, dist.mean_param)
    return np.where(k >= dist.min_tokens, raw, 0.0)


def size_quantile(dist: SizeDist, q: float) -> float:
    """The smallest k with P(size <= k) >= q (0 < q < 1): an attainable size."""
    from scipy import stats
    if isinstance(dist, Constant):
        return float(dist.value)
    if isinstance(dist, Empirical):
        return float(np.quantile(dist.array, q, method="inverted_cdf"))
    if isinstance(dist, Uniform):
        return float(dist.low + math.ceil(q * (dist.high - dist.low + 1)) - 1)
    if isinstance(dist, LogNormal):
        mu = math.log(dist.mean_param) - dist.sigma ** 2 / 2.0
        raw = math.ceil(float(stats.lognorm.ppf(q, dist.sigma, scale=math.exp(mu))) - 0.5)
    elif isinstance(dist, Geometric):
        raw = float(stats.geom.ppf(q, 1.0 / dist.mean_param))
    else:
        raw = float(stats.poisson.ppf(q, dist.mean_param))
    return float(max(dist.min_tokens, raw))


def _ecdf_points(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points where the KS sup of integer data can sit (each observed value and the integer below
    it) and the data's CDF there: both CDFs are step functions jumping at integers."""
    data = np.sort(np.asarray(values, dtype=np.float64))
    observed = np.unique(data)
    points = np.concatenate([observed, observed - 1.0])
    return points, np.searchsorted(data, points, side="right") / data.shape[0]


def ks_distance(values: np.ndarray, dist: SizeDist) -> float:
    """Kolmogorov-Smirnov distance sup_k |F_trace(k) - F_dist(k)| for integer data, exact."""
    points, empirical = _ecdf_points(values)
    return float(np.max(np.abs(empirical - size_cdf(dist, points))))


@dataclass(frozen=True, slots=True)
class Candidate:
    """One fitted model: how it was fitted, its spec (as ``simulate`` takes it), its KS distance to
    the trace and its summary. ``model`` is the size distribution or arrival process itself."""

    method: str
    spec: str
    ks: float
    summary: Summary
    model: Any

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping for JSON."""
        return {"method": self.method, "spec": self.spec, "ks": self.ks, **self.summary.to_dict()}


@dataclass(frozen=True, slots=True)
class DistFit:
    """Candidates for one quantity (prompt tokens, output tokens or inter-arrival gap in ms),
    best (smallest KS distance) first, with the trace's own summary."""

    name: str
    trace: Summary
    candidates: tuple[Candidate, ...]

    @property
    def best(self) -> Candidate:
        """The candidate with the smallest KS distance."""
        return self.candidates[0]

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping for JSON."""
        return {"trace": self.trace.to_dict(), "best": self.best.spec,
                "candidates": [c.to_dict() for c in self.candidates]}


def _match_mean(make: Any, target: float, lo: float, hi: float) -> float:
    """The parameter in [lo, hi] at which ``make(x).mean`` equals ``target`` (mean increasing)."""
    from scipy import optimize
    def gap(x: float) -> float:
        return make(x).mean - target
    if gap(lo) >= 0:
        return lo
    return float(optimize.brentq(gap, lo, hi, xtol=1e-9 * target, rtol=1e-12))


def _lognormal_keeping_mean(target: float, sigma: float, low: int) -> LogNormal:
    """Lognormal with the given sigma whose rounded, clamped mean equals ``target``.

    Rounding moves the mean by at most 1/2 and clamping at ``low`` raises it by at most ``low``,
    so the mean parameter lies in [target - low - 1/2, target + 1/2].
    """
    mean_param = _match_mean(lambda m: LogNormal(m, sigma, low), target,
                             max(target - low - 1.0, 1e-6), target + 1.0)
    return LogNormal(_round(mean_param), sigma, low)


def _min_ks_sigma(values: np.ndarray, target: float, low: int) -> float:
    """The lognormal sigma (mean held at ``target``) with the smallest KS distance: a grid, then
    scipy's bounded search around the best grid point."""
    from scipy import optimize
    points, empirical = _ecdf_points(values)

    def ks(sigma: float) -> float:
        return float(np.max(np.abs(empirical - _lognormal_cdf(points, target, sigma, low))))

    grid = np.geomspace(0.01, 5.0, 60)
    i = int(np.argmin([ks(float(s)) for s in grid]))
    lo, hi = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, grid.shape[0] - 1)])
    found = optimize.minimize_scalar(ks, bounds=(lo, hi), method="bounded", options={"xatol": 1e-5})
    return float(found.x) if ks(float(found.x)) <= ks(float(grid[i])) else float(grid[i])


def _size_candidate(method: str, values: np.ndarray, dist: SizeDist) -> Candidate:
    summary = Summary(dist.mean, *(size_quantile(dist, q) for q in _QUANTILES))
    return Candidate(method, dist.spec, ks_distance(values, dist), summary, dist)


def fit_lengths(values: np.ndarray, name: str = "tokens") -> DistFit:
    """Fit token counts (integers >= 1) with distributions ``simulate`` can sample, best (smallest
    KS distance) first.

    Every candidate keeps the trace's mean (to 6 significant digits), so a synthetic run offers the
    same token load (the paper's theorems depend on the means only): lognormal clamped at the
    trace's minimum with sigma by scipy's maximum likelihood, lognormal with the sigma of smallest
    KS distance, geometric and Poisson. Identical values give a constant.
    """
    from scipy import stats
    data = np.asarray(values)
    if data.ndim != 1 or data.shape[0] == 0 or not np.issubdtype(data.dtype, np.integer) \
            or int(data.min()) < 1:
        raise ConfigError(name, f"{data.shape[0] if data.ndim == 1 else data.shape} values",
                          "fitting needs a non-empty 1-d array of integer token counts >= 1")
    data = data.astype(np.int64)
    trace = _summary(data)
    low = int(data.min())
    if int(data.max()) == low:
        return DistFit(name, trace, (_size_candidate("constant", data, Constant(low)),))
    target = float(np.mean(data))
    shape, _, _ = stats.lognorm.fit(data.astype(np.float64), floc=0.0)
    sigma_mle = _round(min(max(float(shape), 1e-3), 5.0), 4)
    sigma_ks = _round(_min_ks_sigma(data, target, low), 4)
    lam = _match_mean(lambda m: Poisson(m), target, max(target - 1.0, 1e-6), target)
    found = [
        ("lognormal, MLE sigma", _lognormal_keeping_mean(target, sigma_mle, low)),
        ("lognormal, min-KS sigma", _lognormal_keeping_mean(target, sigma_ks, low)),
        ("geometric", Geometric(_round(target))),
        ("poisson", Poisson(_round(lam))),
    ]
    candidates = sorted((_size_candidate(method, data, dist) for method, dist in found),
                        key=lambda c: c.ks)
    return DistFit(name, trace, tuple(candidates))


def _gap_candidate(method: str, process: Any, gaps_ms: np.ndarray, law: Any) -> Candidate:
    from scipy import stats
    summary = Summary(float(law.mean()), *(float(law.ppf(q)) for q in _QUANTILES), std=float(law.std()))
    return Candidate(method, process.spec, float(stats.kstest(gaps_ms, law.cdf).statistic), summary,
                     process)


def fit_arrivals(arrival_s: np.ndarray) -> tuple[float, DistFit]:
    """Fit renewal arrival processes to a trace's gaps, all at the trace's rate (N - 1) / span:
    Poisson, gamma with the gaps' coefficient of variation (cv), gamma with scipy's maximum
    likelihood shape (on the positive gaps) and deterministic, best (KS) first.

    Renewal processes keep the rate and a burstiness but not slow changes of the rate over time.
    """
    from scipy import stats
    times = np.asarray(arrival_s, dtype=np.float64)
    if times.ndim != 1 or times.shape[0] < 3 or not times[-1] > times[0]:
        raise ConfigError("arrival", f"{times.shape[0]} arrivals",
                          "fitting arrivals needs >= 3 arrivals over a positive time span")
    rate = _round((times.shape[0] - 1) / float(times[-1] - times[0]))
    gaps_ms = np.diff(times) * 1000.0
    mean_ms = 1000.0 / rate
    candidates = [_gap_candidate("poisson", PoissonArrivals(rate), gaps_ms, stats.expon(scale=mean_ms))]
    cvs = [("gamma, moment cv", float(np.std(gaps_ms) / np.mean(gaps_ms)))]
    positive = gaps_ms[gaps_ms > 0]
    if positive.shape[0] >= 2 and np.ptp(positive) > 0:
        shape, _, _ = stats.gamma.fit(positive, floc=0.0)
        cvs.append(("gamma, MLE shape", 1.0 / math.sqrt(float(shape))))
    for method, raw_cv in cvs:
        cv = _round(raw_cv, 4)
        if 0 < cv <= 100.0:
            shape = 1.0 / (cv * cv)
            candidates.append(_gap_candidate(method, GammaArrivals(rate, cv), gaps_ms,
                                             stats.gamma(shape, scale=mean_ms / shape)))
    ordered = np.sort(gaps_ms)
    below = np.searchsorted(ordered, mean_ms, side="left") / ordered.shape[0]
    at_most = np.searchsorted(ordered, mean_ms, side="right") / ordered.shape[0]
    candidates.append(Candidate("deterministic", "deterministic", float(max(below, 1.0 - at_most)),
                                Summary(mean_ms, mean_ms, mean_ms, mean_ms, std=0.0),
                                DeterministicArrivals(rate)))
    candidates.sort(key=lambda c: c.ks)
    return rate, DistFit("gap_ms", _summary(gaps_ms), tuple(candidates))


@dataclass(frozen=True, slots=True)
class TraceFit:
    """Fitted synthetic workload of a trace: arrivals (rate and process; None for a lengths-only
    trace), prompt and output lengths, and the trace's statistics."""

    stats: TraceStats
    rate_per_s: float | None
    arrival: DistFit | None
    prefill: DistFit
    decode: DistFit

    def simulate_args(self) -> list[str]:
        """Options for ``llmqueue simulate`` that draw a workload with the fitted statistics."""
        args: list[str] = []
        if self.arrival is not None and self.rate_per_s is not None:
            args += ["--arrival", self.arrival.best.spec, "--rate", format_number(self.rate_per_s)]
        return [*args, "--prefill", self.prefill.best.spec, "--decode", self.decode.best.spec]

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping for JSON."""
        return {
            "stats": self.stats.to_dict(),
            "rate_per_s": self.rate_per_s,
            "arrival": None if self.arrival is None else self.arrival.to_dict(),
            "prefill_tokens": self.prefill.to_dict(),
            "decode_tokens": self.decode.to_dict(),
            "simulate_args": self.simulate_args(),
        }


def fit_trace(trace: RequestTrace) -> TraceFit:
    """Fit a trace's arrivals (when it has them, >= 3) and prompt/output lengths."""
    rate = arrival = None
    if trace.arrival_s is not None and len(trace) >= 3 and trace.span_s > 0:
        rate, arrival = fit_arrivals(trace.arrival_s)
    for name, values in (("prefill_tokens", trace.prefill_tokens), ("decode_tokens", trace.decode_tokens)):
        if int(np.min(values)) < 1:
            raise ConfigError(name, trace.spec.text, "fitting needs every request to have >= 1 "
                                                     f"{name.split('_')[0]} token")
    return TraceFit(trace_stats(trace), rate, arrival, fit_lengths(trace.prefill_tokens, "prefill_tokens"),
                    fit_lengths(trace.decode_tokens, "decode_tokens"))
