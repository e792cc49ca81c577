"""Workloads: request arrivals and prefill/decode token counts (the paper's lambda, P_i, D_i).

Everything here is a plain frozen record. Randomness comes only from the seed handed to
:meth:`Workload.requests`, which draws in fixed-size chunks so that a run is reproducible and the
first ``k`` requests never depend on how many requests are asked for.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import os
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from numbers import Integral, Real
from typing import Any, BinaryIO, NamedTuple, Protocol

import numpy as np

from llmqueue.errors import ConfigError
from llmqueue.io.tables import cell_problem, header_names, is_blank, not_utf8
from llmqueue.io.text import format_number
from llmqueue.limits import MAX_RATE_PER_S, MAX_TOKENS, MIN_RATE_PER_S

__all__ = [
    "CHUNK_SIZE",
    "TRACE_ARRIVAL_COLUMN",
    "TRACE_DECODE_COLUMN",
    "TRACE_PREFILL_COLUMN",
    "ArrayRows",
    "ArrivalProcess",
    "Constant",
    "DeterministicArrivals",
    "Empirical",
    "GammaArrivals",
    "Geometric",
    "LogNormal",
    "OfferedLoad",
    "Poisson",
    "PoissonArrivals",
    "Request",
    "SizeDist",
    "TokenCounts",
    "Trace",
    "TraceArrivals",
    "TraceRows",
    "Uniform",
    "Workload",
    "fixed_requests",
    "load_trace",
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
        raise ConfigError(name, value, f"must be > {format_number(low)}")
    if not positive and fvalue < low:
        raise ConfigError(name, value, f"must be >= {format_number(low)}")
    if fvalue > high:
        raise ConfigError(name, value, f"must be <= {format_number(high)}")
    return fvalue


def _check_n(n: object) -> int:
    if not _is_int(n) or int(n) < 0:  # type: ignore[call-overload]
        raise ConfigError("n", n, "sample size must be a non-negative integer")
    return int(n)  # type: ignore[call-overload]


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One request: arrival time and token counts (the paper's P_i, D_i).

    ``cls`` labels the request's class (in a network: its buffer, ``class.node``); single-engine
    runs leave it empty. Class-aware policies (priority, max-pressure) read it.
    ``context_tokens`` is KV the request brings (computed elsewhere: a decode-only request of a
    prefill/decode pair holds its prompt's KV); engines count it as cached tokens (KV blocks,
    admission, a composition-aware batch time's KV reads) and recompute it on preemption.
    """

    id: int
    arrival_ms: float
    prefill_tokens: int
    decode_tokens: int
    cls: str = ""
    context_tokens: int = 0

    def __post_init__(self) -> None:
        if type(self.id) is int and type(self.arrival_ms) is float \
                and type(self.prefill_tokens) is int and type(self.decode_tokens) is int \
                and type(self.cls) is str and type(self.context_tokens) is int \
                and self.context_tokens >= 0 and self.id >= 0 and 0.0 <= self.arrival_ms < math.inf \
                and self.prefill_tokens >= 0 and self.decode_tokens >= 0 \
                and self.prefill_tokens + self.decode_tokens >= 1:
            return  # fast path for the common, valid case (millions of requests per run)
        if not _is_int(self.id) or self.id < 0:
            raise ConfigError("request.id", self.id, "must be a non-negative integer")
        if not _is_real(self.arrival_ms) or not math.isfinite(self.arrival_ms) \
                or self.arrival_ms < 0:
            raise ConfigError("request.arrival_ms", self.arrival_ms,
                              "must be a finite number >= 0")
        for name in ("prefill_tokens", "decode_tokens", "context_tokens"):
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
#
# A CSV trace is read lazily, in blocks of whole lines (64 KiB first, doubling to 2 MiB): numpy
# parses a block at once, with no Python object per row, and the csv module takes over for a block
# numpy cannot parse (a bad cell, a blank-looking line) so that errors name the row and line as
# before. From a block with a quote character on, the csv module reads the rest of the file (quoted
# fields may hold line breaks). Checks are lazy too: a bad row ends the stream after the rows before
# it, and a reader that stops before it (a run that needs fewer requests) never meets it.
#
# This reader stays apart from the shared table reader (llmqueue.io.tables.read_csv_table), which
# holds a whole file as Python strings: for a 10M-row trace that would cost minutes and gigabytes
# where these blocks cost one block. It shares that module's rules instead: the header row
# (header_names), blank lines (is_blank), the wording of a line that is not UTF-8 (not_utf8) and of
# a bad cell (cell_problem).

_FIRST_BLOCK_BYTES = 1 << 16
_MAX_BLOCK_BYTES = 1 << 21
_CSV_MODULE_ROWS = 4096
"""Rows per block once the csv module reads the rest of a file (quoted fields)."""

_NO_LINES = np.zeros(0, dtype=np.int64)
_WHITESPACE_STARTS = (b"\n", b"\r", b" ", b"\t", b"\x0b", b"\x0c")


@dataclass(frozen=True, slots=True, eq=False)
class Trace:
    """A request trace read from CSV: arrival times (s) and per-request token counts."""

    path: str
    arrived_s: np.ndarray
    prefill_tokens: np.ndarray
    decode_tokens: np.ndarray

    def __len__(self) -> int:
        return int(self.prefill_tokens.shape[0])


@dataclass(frozen=True, slots=True, eq=False)
class _CsvBlock:
    """Consecutive data rows of a CSV file: the named columns (float64), the file line of every row
    and the number (1-based; blank lines are no rows) of the first. ``error`` is the error of the
    first bad row, which ends the file's stream; that row and those after it are not in the block.
    A block passed over unparsed (``skip`` of :func:`_csv_blocks`) holds no rows and
    ``skipped_last``, its last row's value in the skip column."""

    columns: dict[str, np.ndarray]
    lines: np.ndarray
    first_row: int
    error: ConfigError | None = None
    skipped_last: float | None = None

    def __len__(self) -> int:
        return int(self.lines.shape[0])


def _read_problem(path: str, field_name: str, exc: Exception) -> ConfigError:
    problem = " ".join(str(exc).split())
    return ConfigError(field_name, path, f"cannot read trace file: {problem}")


def _not_text(path: str, field_name: str, line: int, byte: int) -> ConfigError:
    return ConfigError(field_name, path, f"cannot read trace file: {not_utf8(line, byte)}; a trace is a CSV "
                                         "or JSON lines file")


def _decode(raw: bytes, path: str, field_name: str, first_line: int) -> str:
    """``raw`` (whole lines from ``first_line`` on) as text; a binary or non-UTF-8 file is one
    ConfigError naming the line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_text(path, field_name, first_line + raw.count(b"\n", 0, exc.start),
                        raw[exc.start]) from None


def _skim(block: bytes) -> tuple[int, int] | None:
    """Lines and data rows (lines that are not blank) of a block of whole lines passed over, or
    None where the csv module might count lines otherwise (a carriage return without a line feed)."""
    buf = np.frombuffer(block, dtype=np.uint8)
    returns = np.flatnonzero(buf == 13)
    if returns.size and (returns[-1] + 1 >= buf.size or np.any(buf[returns + 1] != 10)):
        return None
    breaks = np.flatnonzero(buf == 10)
    lines = breaks.size + (0 if block.endswith(b"\n") else 1)
    starts = np.concatenate(([0], breaks + 1))[:lines]
    candidates = np.flatnonzero(np.isin(buf[starts], np.frombuffer(b"".join(_WHITESPACE_STARTS), np.uint8)))
    ends = np.append(breaks, buf.size)
    blank = sum(1 for i in candidates.tolist() if not block[starts[i]:ends[i]].strip())
    return lines, lines - blank


class _CsvParser:
    """Turns blocks of lines of one CSV file into :class:`_CsvBlock` s (the named columns only)."""

    def __init__(self, path: str, field_name: str, names: list[str], index: dict[str, int]) -> None:
        self.path = path
        self.field_name = field_name
        self.fields = len(names)
        self.index = index
        self.usecols = tuple(index.values())

    def parse(self, block: bytes, line: int, row: int) -> tuple[_CsvBlock, int]:
        """The rows of ``block`` (whole lines, the first being file line ``line`` and the first data
        row number ``row``) and how many lines it held."""
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError as exc:  # the lines before the bad one first, then the error
            cut = block.rfind(b"\n", 0, exc.start) + 1
            error = _not_text(self.path, self.field_name, line + block.count(b"\n", 0, cut), block[exc.start])
            if not cut:
                return _CsvBlock({name: np.zeros(0) for name in self.index}, _NO_LINES, row, error), 0
            good, lines = self.parse(block[:cut], line, row)
            return (good if good.error is not None else replace(good, error=error)), lines
        fast = self._numpy(block, line, row)
        if fast is not None:
            return fast
        reader = csv.reader(io.StringIO(text, newline=""))
        parsed = self.rows(reader, line, row)
        return parsed, reader.line_num

    def _numpy(self, block: bytes, line: int, row: int) -> tuple[_CsvBlock, int] | None:
        """numpy's parse of a block without quotes, or None where the csv module must read it:
        every line that is not empty must have the header's field count and finite numbers in the
        named columns (anything else, the csv module finds and names)."""
        buf = np.frombuffer(block, dtype=np.uint8)
        ends = np.flatnonzero(buf == 10)
        if ends.size == 0 or ends[-1] != buf.size - 1:
            ends = np.append(ends, buf.size)  # the file's last line has no line break
        starts = np.concatenate(([0], ends[:-1] + 1))
        length = ends - starts
        first_byte = buf[np.minimum(starts, buf.size - 1)]
        kept = ~((length == 0) | ((length == 1) & (first_byte == 13)))  # empty lines are no rows
        commas = np.searchsorted(np.flatnonzero(buf == 44), ends)
        if np.any(np.diff(commas, prepend=0)[kept] != self.fields - 1):
            return None
        rows = int(np.count_nonzero(kept))
        if rows == 0:
            data = np.zeros((0, len(self.usecols)))
        else:
            try:
                data = np.loadtxt(io.BytesIO(block), delimiter=",", usecols=self.usecols, dtype=np.float64,
                                  ndmin=2, comments=None, encoding="utf-8")
            except ValueError:
                return None
            if data.shape[0] != rows or not np.all(np.isfinite(data)):
                return None
        columns = {name: np.ascontiguousarray(data[:, k]) for k, name in enumerate(self.index)}
        return _CsvBlock(columns, line + np.flatnonzero(kept), row), int(ends.size)

    def rows(self, reader: Any, line: int, row: int, limit: int | None = None) -> _CsvBlock:
        """Up to ``limit`` rows from a csv reader whose line 1 is file line ``line``, the first being
        data row ``row``; stops at the first bad row (the old eager reader's messages)."""
        texts: dict[str, list[str]] = {name: [] for name in self.index}
        lines: list[int] = []
        error: ConfigError | None = None
        try:
            for fields in reader:
                if is_blank(fields):
                    continue
                if len(fields) != self.fields:
                    error = ConfigError(self.field_name, self.path,
                                        f"trace row {row + len(lines)} (line {line + reader.line_num - 1}) "
                                        f"has {len(fields)} fields, header has {self.fields}")
                    break
                for name, j in self.index.items():
                    texts[name].append(fields[j])
                lines.append(line + reader.line_num - 1)
                if limit is not None and len(lines) >= limit:
                    break
        except csv.Error as exc:
            error = _read_problem(self.path, self.field_name, exc)
        except UnicodeDecodeError as exc:
            error = _not_text(self.path, self.field_name, line + reader.line_num, exc.object[exc.start])
        columns: dict[str, np.ndarray] = {}
        stop = len(lines)
        for name, column_texts in texts.items():
            try:
                values = np.array(column_texts, dtype=np.float64)
            except ValueError:
                values = np.array([_float_or_nan(text) for text in column_texts], dtype=np.float64)
            bad = np.flatnonzero(~np.isfinite(values[:stop]))
            if bad.size:
                stop = int(bad[0])
                error = ConfigError(self.field_name, self.path,
                                    cell_problem(f"trace row {row + stop} (line {lines[stop]})", name,
                                                 "is not a finite number", column_texts[stop]))
            columns[name] = values
        columns = {name: values[:stop] for name, values in columns.items()}
        return _CsvBlock(columns, np.array(lines[:stop], dtype=np.int64), row, error)

    def last_value(self, block: bytes, column: str) -> float | None:
        """The value in ``column`` of the block's last line, or None where that line is not a plain
        row with a finite number there (the block is then parsed, not skipped)."""
        end = len(block) - 1 if block.endswith(b"\n") else len(block)
        last = block[block.rfind(b"\n", 0, end) + 1:end]
        try:
            fields = next(csv.reader([last.decode("utf-8")]), [])
        except (UnicodeDecodeError, csv.Error):
            return None
        if len(fields) != self.fields:
            return None
        value = _float_or_nan(fields[self.index[column]])
        return value if math.isfinite(value) else None


def _csv_header(handle: BinaryIO, path: str, field_name: str) -> list[str]:
    """The stripped column names of the header row (a UTF-8 byte-order mark is dropped)."""
    raw = handle.readline()
    if not raw:
        raise ConfigError(field_name, path, "trace file is empty (no header row)")
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    text = _decode(raw, path, field_name, 1)
    try:
        return header_names(text)
    except csv.Error as exc:
        raise _read_problem(path, field_name, exc) from None


def _csv_blocks(path: str, columns: Sequence[str], field_name: str, optional: Sequence[str] = (),
                skip: tuple[str, Callable[[float], bool]] | None = None) -> Iterator[_CsvBlock]:
    """The named numeric columns of a CSV file with a header row, lazily, in blocks of rows.

    Columns in ``optional`` that the header lacks are left out; a missing other column, an empty
    file or a missing file is an error at the first step. A bad row (ragged, or a cell that is not
    a finite number) ends the stream in its block's ``error``. ``skip`` = (column, test): a block
    after the first whose last row's value in that column passes the test is passed over unparsed
    (a window's start in a sorted trace): its rows are counted, not read or checked.
    """
    if not isinstance(path, str) or not path:
        raise ConfigError(field_name, path, "trace path must be a non-empty string")
    if not os.path.isfile(path):
        raise ConfigError(field_name, path, "trace file not found")
    try:
        with open(path, "rb") as handle:
            yield from _blocks_of(handle, path, columns, field_name, optional, skip)
    except OSError as exc:
        raise _read_problem(path, field_name, exc) from None


def _blocks_of(handle: BinaryIO, path: str, columns: Sequence[str], field_name: str,
               optional: Sequence[str], skip: tuple[str, Callable[[float], bool]] | None
               ) -> Iterator[_CsvBlock]:
    """:func:`_csv_blocks` on an open file."""
    names = _csv_header(handle, path, field_name)
    index: dict[str, int] = {}
    for column in columns:
        if column in names:
            index[column] = names.index(column)
        elif column not in optional:
            raise ConfigError(field_name, path, f"trace file has no column '{column}' "
                                                f"(columns: {','.join(names)})")
    parser = _CsvParser(path, field_name, names, index)
    line, row, offset = 2, 1, handle.tell()
    size, carry, first = _FIRST_BLOCK_BYTES, b"", True
    while True:
        chunk = handle.read(size)
        data = carry + chunk if carry else chunk
        if chunk:
            cut = data.rfind(b"\n") + 1
            size = min(2 * size, _MAX_BLOCK_BYTES) if cut else 2 * size  # (a longer line: read on)
            if not cut:
                carry = data
                continue
            block, carry = data[:cut], data[cut:]
        elif data:
            block, carry = data, b""
        else:
            return
        if b'"' in block:  # quoted fields may hold line breaks: the csv module reads on from here
            handle.seek(offset)
            reader = csv.reader(io.TextIOWrapper(handle, encoding="utf-8", newline=""))
            while True:
                parsed = parser.rows(reader, line, row, _CSV_MODULE_ROWS)
                if len(parsed) or parsed.error is not None:
                    yield parsed
                if parsed.error is not None or len(parsed) < _CSV_MODULE_ROWS:
                    return
                row += len(parsed)
        last = counted = None
        if skip is not None and not first and skip[0] in index:
            last = parser.last_value(block, skip[0])
            if last is not None and skip[1](last):
                counted = _skim(block)
        if counted is not None:
            lines, rows = counted
            yield _CsvBlock({name: np.zeros(0) for name in index}, _NO_LINES, row, skipped_last=last)
        else:
            parsed, lines = parser.parse(block, line, row)
            yield parsed
            if parsed.error is not None:
                return
            rows = len(parsed)
        line, row, offset, first = line + lines, row + rows, offset + len(block), False


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _first_bad_count(values: np.ndarray, minimum: int) -> int | None:
    """Index of the first value that is not an integer token count >= ``minimum`` (None if all are)."""
    bad = np.flatnonzero((values < minimum) | (values != np.floor(values)) | (values > MAX_TOKENS))
    return int(bad[0]) if bad.size else None


def _bad_count(block: _CsvBlock, r: int, column: str, value: float, minimum: int, path: str,
               field_name: str) -> ConfigError:
    return ConfigError(field_name, path,
                       f"trace row {block.first_row + r} (line {int(block.lines[r])}) column '{column}' must "
                       f"be an integer token count >= {minimum}, found {format_number(float(value))}")


@dataclass(frozen=True, slots=True, eq=False)
class _TraceBlock:
    """Checked consecutive requests of a CSV trace: raw arrival values (the file's unit; None for a
    lengths-only file) and int64 token counts. A block passed over unread has no requests and
    ``skipped_last``, its last raw arrival."""

    arrival: np.ndarray | None
    prefill: np.ndarray
    decode: np.ndarray
    skipped_last: float | None = None


def _csv_trace_rows(path: str, arrival_column: str, prefill_column: str, decode_column: str,
                    field_name: str, *, arrival_optional: bool = False,
                    skip: Callable[[float], bool] | None = None) -> Iterator[_TraceBlock]:
    """The requests of a CSV trace in file order, lazily, in checked blocks: token counts are
    integers >= 0 with at least one per row, arrivals do not go back in time. A bad row ends the
    stream: the requests before it come first, then its ConfigError (naming row, line and column)
    when a reader asks for more. ``skip`` passes over blocks by their last raw arrival (see
    :func:`_csv_blocks`); rows passed over are not checked, nor is the order across them.
    """
    optional = (arrival_column,) if arrival_optional else ()
    previous: float | None = None
    for block in _csv_blocks(path, (arrival_column, prefill_column, decode_column), field_name, optional,
                             None if skip is None else (arrival_column, skip)):
        if block.skipped_last is not None:
            previous = None
            empty = np.zeros(0, dtype=np.int64)
            yield _TraceBlock(np.zeros(0), empty, empty, block.skipped_last)
            continue
        raw = block.columns.get(arrival_column)
        prefill, decode = block.columns[prefill_column], block.columns[decode_column]
        problems: list[tuple[int, ConfigError]] = []
        for column, values in ((prefill_column, prefill), (decode_column, decode)):
            r = _first_bad_count(values, 0)
            if r is not None:
                problems.append((r, _bad_count(block, r, column, values[r], 0, path, field_name)))
        empty_rows = np.flatnonzero(prefill + decode < 1)
        if empty_rows.size:
            r = int(empty_rows[0])
            problems.append((r, ConfigError(field_name, path,
                                            f"trace row {block.first_row + r} (line {int(block.lines[r])}) "
                                            f"has no tokens ({prefill_column} + {decode_column} must be "
                                            ">= 1)")))
        if raw is not None and raw.size:
            joined = raw if previous is None else np.concatenate(([previous], raw))
            back = np.flatnonzero(np.diff(joined) < 0)
            if back.size:
                r = int(back[0]) + (1 if previous is None else 0)
                before = float(joined[back[0]])
                problems.append((r, ConfigError(
                    field_name, path,
                    f"trace row {block.first_row + r} (line {int(block.lines[r])}) column '{arrival_column}' "
                    f"goes back in time ({format_number(float(raw[r]))} < {format_number(before)}); arrivals "
                    "must be non-decreasing")))
        stop, error = min(problems, key=lambda problem: problem[0]) if problems else (len(block), block.error)
        if stop:
            yield _TraceBlock(None if raw is None else raw[:stop], prefill[:stop].astype(np.int64),
                              decode[:stop].astype(np.int64))
            if raw is not None:
                previous = float(raw[stop - 1])
        if error is not None:
            raise error


def _csv_token_column(path: str, column: str, field_name: str, minimum: int = 1) -> np.ndarray:
    """One column of token counts (integers >= ``minimum``) of a CSV trace, whole, as read-only
    int32: blocks are checked and packed as they are read, so the overhead is one block."""
    parts: list[np.ndarray] = []
    for block in _csv_blocks(path, (column,), field_name):
        values = block.columns[column]
        r = _first_bad_count(values, minimum)
        if r is not None:
            raise _bad_count(block, r, column, values[r], minimum, path, field_name)
        parts.append(values.astype(np.int32))
        if block.error is not None:
            raise block.error
    return _readonly(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32))


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def load_trace(path: str, field_name: str = "trace") -> Trace:
    """Read a CSV trace with header ``arrived_at,num_prefill_tokens,num_decode_tokens``, whole.

    Validates columns, numbers, counts >= 0 with at least one token per row, non-decreasing
    arrival times and at least 2 rows; errors are ConfigError on ``field_name``.
    """
    blocks = list(_csv_trace_rows(path, TRACE_ARRIVAL_COLUMN, TRACE_PREFILL_COLUMN, TRACE_DECODE_COLUMN,
                                  field_name))
    arrived = np.concatenate([b.arrival for b in blocks if b.arrival is not None] or [np.zeros(0)])
    if arrived.shape[0] < 2:
        raise ConfigError(field_name, path,
                          f"trace needs at least 2 rows, found {arrived.shape[0]}")
    prefill = np.concatenate([b.prefill for b in blocks])
    decode = np.concatenate([b.decode for b in blocks])
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
        from scipy import stats
        lam, m = self.mean_param, self.min_tokens
        return float(lam * stats.poisson.sf(m - 2, lam) + m * stats.poisson.cdf(m - 1, lam))

    @property
    def spec(self) -> str:
        """Canonical spec text, e.g. ``poisson:129`` or ``poisson:129,min=4``."""
        extra = f",min={self.min_tokens}" if self.min_tokens != 1 else ""
        return f"poisson:{format_number(self.mean_param)}{extra}"


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
        return f"geometric:{format_number(self.mean_param)}{extra}"


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
    from scipy import special
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
        return f"lognormal:mean={format_number(self.mean_param)},sigma={format_number(self.sigma)}{extra}"


class TokenCounts(Sequence[int]):
    """Read-only token counts held in one numpy array (no Python object per count: a trace column
    of 10 million counts takes 40 MB). It equals any sequence of the same integers, so
    ``Empirical.values == (10, 20, 30)`` reads as for a tuple; ``array`` is the data itself."""

    __slots__ = ("_array",)

    def __init__(self, array: np.ndarray) -> None:
        values = np.asarray(array)
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise ConfigError("empirical.values", f"{values.dtype} array of shape {values.shape}",
                              "token counts must be a 1-d integer array")
        self._array = values if not values.flags.writeable else _readonly(values.copy())

    @property
    def array(self) -> np.ndarray:
        """The counts (read-only)."""
        return self._array

    def __len__(self) -> int:
        return int(self._array.shape[0])

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return TokenCounts(self._array[index])
        return int(self._array[index])

    def __iter__(self) -> Iterator[int]:
        for start in range(0, len(self), 1 << 16):
            yield from self._array[start:start + (1 << 16)].tolist()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TokenCounts):
            return bool(np.array_equal(self._array, other._array))
        if isinstance(other, tuple | list):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))  # equal to the tuple of the same counts, so hashed alike

    def __repr__(self) -> str:
        return f"TokenCounts(<{len(self)} counts>)"

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return self._array if dtype is None else self._array.astype(dtype)


@dataclass(frozen=True, slots=True)
class Empirical:
    """Resample observed token counts uniformly with replacement (e.g. one column of a trace).

    ``values`` is a tuple of counts or, for a trace column, :class:`TokenCounts` (one int32 array).
    ``source`` is the file the values came from and ``column`` its column; spec ``trace:PATH,...``.
    """

    values: tuple[int, ...] | TokenCounts
    source: str
    column: str | None = None
    _array: np.ndarray = field(init=False, repr=False, compare=False,
                               default_factory=lambda: np.zeros(0, dtype=np.int32))
    _mean: float = field(init=False, repr=False, compare=False, default=0.0)

    def __post_init__(self) -> None:
        if isinstance(self.values, np.ndarray):
            object.__setattr__(self, "values", TokenCounts(self.values))
        if isinstance(self.values, TokenCounts) and len(self.values):
            array = self.values.array
        else:
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
        # the sum as an exact integer, rounded once: the same float as math.fsum of the values
        object.__setattr__(self, "_mean", float(int(array.sum(dtype=np.int64))) / array.shape[0])
        if array.dtype != np.int32 or array.flags.writeable:  # (a trace column is kept as it is)
            array = _readonly(array.astype(np.int32))
        object.__setattr__(self, "_array", array)

    @property
    def array(self) -> np.ndarray:
        """The counts as one read-only int32 array."""
        return self._array

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` values uniformly with replacement."""
        return self._array[self.sample_rows(rng, n)].astype(np.int64)

    def sample_rows(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` row indices uniformly with replacement (shared by joint pair sampling)."""
        return rng.integers(0, self._array.shape[0], _check_n(n), dtype=np.int64)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The values at the given row indices."""
        return self._array[rows].astype(np.int64)

    def __len__(self) -> int:
        return int(self._array.shape[0])

    @property
    def mean(self) -> float:
        """Exact mean: the mean of the values."""
        return self._mean

    @property
    def spec(self) -> str:
        """Canonical spec text: ``trace:PATH,column=NAME`` (``trace:PATH`` without a column)."""
        extra = f",column={self.column}" if self.column is not None else ""
        return f"trace:{self.source}{extra}"


SizeDist = Constant | Poisson | Geometric | Uniform | LogNormal | Empirical
"""Any token-count distribution: ``sample(rng, n)``, exact ``mean`` and canonical ``spec``."""


# --------------------------------------------------------------------------------------------
# Arrival processes
# --------------------------------------------------------------------------------------------


def _check_rate(rate_per_s: object, name: str = "rate") -> float:
    if not _is_real(rate_per_s) or not math.isfinite(float(rate_per_s)) \
            or float(rate_per_s) <= 0:  # type: ignore[arg-type]
        raise ConfigError(name, rate_per_s, "arrival rate must be a finite number > 0 (per s)")
    if not MIN_RATE_PER_S <= float(rate_per_s) <= MAX_RATE_PER_S:  # type: ignore[arg-type]
        raise ConfigError(name, rate_per_s, f"arrival rate must be between {MIN_RATE_PER_S:g} and "
                          f"{MAX_RATE_PER_S:g} requests/s")
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
        return f"gamma:cv={format_number(self.cv)}"


class TraceRows(Protocol):
    """Where a replay's requests come from. ``rows()`` yields blocks (arrival s, prefill tokens,
    decode tokens) in arrival order, times in the trace's own seconds (any origin), checked; a bad
    row raises when the requests after it are asked for. ``field_name`` names the option in errors."""

    field_name: str

    def rows(self) -> Generator[tuple[np.ndarray, np.ndarray, np.ndarray], None, None]:
        """The blocks of requests, read afresh on every call."""
        ...


@dataclass(frozen=True, slots=True, eq=False)
class ArrayRows:
    """A replay's requests held in memory (a short trace, a vLLM log, a window of a loaded trace)."""

    arrival_s: np.ndarray
    prefill: np.ndarray
    decode: np.ndarray
    field_name: str = "arrival"

    def __post_init__(self) -> None:
        times = np.array(self.arrival_s, dtype=np.float64)
        prefill = np.array(self.prefill, dtype=np.int64)
        decode = np.array(self.decode, dtype=np.int64)
        n = times.shape[0] if times.ndim == 1 else -1
        if n < 0 or prefill.shape != (n,) or decode.shape != (n,):
            raise ConfigError(self.field_name, f"{times.shape} times",
                              "trace arrivals need equally long 1-d arrays of times and token counts")
        if not np.all(np.isfinite(times)) or np.any(np.diff(times) < 0):
            raise ConfigError(self.field_name, f"{n} times", "trace times must be finite and non-decreasing")
        if np.any(prefill < 0) or np.any(decode < 0) or np.any(prefill + decode < 1):
            raise ConfigError(self.field_name, f"{n} requests",
                              "trace token counts must be >= 0 with at least one per request")
        for name, array in (("arrival_s", times), ("prefill", prefill), ("decode", decode)):
            object.__setattr__(self, name, _readonly(array))

    def rows(self) -> Generator[tuple[np.ndarray, np.ndarray, np.ndarray], None, None]:
        """All the requests as one block."""
        if self.arrival_s.shape[0]:
            yield self.arrival_s, self.prefill, self.decode


class OfferedLoad(NamedTuple):
    """What a run offers the engine, for the theory: arrival rate (per s) and mean sizes."""

    rate_per_s: float
    mean_prefill_tokens: float
    mean_decode_tokens: float


@dataclass(frozen=True, slots=True)
class _Extent:
    """One pass over (part of) a replay: requests, first and last arrival (trace s), token sums."""

    requests: int
    first_s: float
    last_s: float
    prefill_tokens: int
    decode_tokens: int

    @property
    def span_ms(self) -> float:
        """Last minus first arrival in ms, as the replay computes its times."""
        return (self.last_s - self.first_s) * 1000.0


def _rechunk(blocks: Generator[tuple[np.ndarray, np.ndarray, np.ndarray], None, None], size: int
             ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Blocks of any length as chunks of exactly ``size`` rows (the last may be shorter). A bad row
    in the source: the rows before it come out first, its error on the next request."""
    held: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    count = 0

    def joined() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(held) == 1:
            return held[0]
        t, p, d = (np.concatenate(parts) for parts in zip(*held, strict=True))
        return t, p, d

    try:
        try:
            for block in blocks:
                held.append(block)
                count += block[0].shape[0]
                while count >= size:
                    t, p, d = joined()
                    yield t[:size], p[:size], d[:size]
                    held = [(t[size:], p[size:], d[size:])] if count > size else []
                    count -= size
        except ConfigError:
            if count:
                yield joined()
            raise
        if count:
            yield joined()
    finally:
        blocks.close()


@dataclass(frozen=True, slots=True)
class TraceArrivals:
    """Replay of a trace's arrival times (shifted to start at 0, optionally time-scaled so that the
    mean rate (N-1)/span of the replayed requests equals ``scale_to_rate_per_s``), with the trace's
    own token counts.

    The requests come from ``source`` lazily: a trace file is read while a run goes, as far as the
    run goes, never whole in memory (see :mod:`llmqueue.model.traces`). Making the replay reads its first
    ``CHUNK_SIZE + 1`` requests: a trace that short is kept in memory and checked whole (>= 2
    requests, not all at one instant); a longer one is read afresh by every pass. A run over the
    first N requests replays, scales and reports (:meth:`offered`) those N; ``rate_per_s``,
    ``mean_*_tokens`` and ``len`` describe the whole replay (one streaming pass, remembered).

    ``options`` is the ``,key=value`` part of the trace spec (format, columns, window; see
    :mod:`llmqueue.model.traces`), kept so that ``spec`` reads back the same replay."""

    path: str
    source: TraceRows = field(compare=False, repr=False)
    scale_to_rate_per_s: float | None = None
    options: str = ""
    _memo: dict[tuple[object, ...], Any] = field(default_factory=dict, init=False, repr=False,
                                                 compare=False)

    def __post_init__(self) -> None:
        if not hasattr(self.source, "rows") or not hasattr(self.source, "field_name"):
            raise ConfigError("arrival", type(self.source).__name__,
                              "a trace replay's source must give rows() and field_name")
        if self.scale_to_rate_per_s is not None:
            object.__setattr__(self, "scale_to_rate_per_s", _check_rate(self.scale_to_rate_per_s))
        head: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        n = 0
        rows = self.source.rows()
        try:
            for block in rows:
                head.append(block)
                n += block[0].shape[0]
                if n > CHUNK_SIZE:
                    return  # a long trace: read again, lazily, by every pass
        finally:
            rows.close()
        field_name = self.source.field_name
        if n < 2:
            raise ConfigError(field_name, self.path,
                              f"trace needs at least 2 rows with arrival times, found {n}")
        t, p, d = (np.concatenate(parts) for parts in zip(*head, strict=True))
        if (t[-1] - t[0]) * 1000.0 <= 0.0:
            raise ConfigError(field_name, self.path,
                              "all trace arrivals are at the same time; the rate is undefined")
        object.__setattr__(self, "source", ArrayRows(t, p, d, field_name))

    def _rows(self, max_rows: int | None) -> Generator[tuple[np.ndarray, np.ndarray, np.ndarray], None, None]:
        """The source's blocks cut after ``max_rows`` requests (None: all); reads no further."""
        rows = self.source.rows()
        left = max_rows
        try:
            while left is None or left > 0:
                block = next(rows, None)
                if block is None:
                    return
                t, p, d = block
                if left is not None:
                    if t.shape[0] > left:
                        t, p, d = t[:left], p[:left], d[:left]
                    left -= t.shape[0]
                if t.shape[0]:
                    yield t, p, d
        finally:
            rows.close()

    def _extent(self, max_rows: int | None) -> _Extent:
        """Requests, first/last arrival and token sums of the first ``max_rows`` requests (one
        streaming pass in O(1) memory, remembered)."""
        key = ("extent", max_rows)
        if key not in self._memo:
            n = sum_p = sum_d = 0
            first = last = math.nan
            for t, p, d in self._rows(max_rows):
                if n == 0:
                    first = float(t[0])
                last = float(t[-1])
                n += t.shape[0]
                sum_p += int(p.sum())
                sum_d += int(d.sum())
            self._memo[key] = _Extent(n, first, last, sum_p, sum_d)
        return self._memo[key]

    def _factor(self, max_rows: int | None) -> float | None:
        """The time scale that gives the first ``max_rows`` requests the target rate (None: none)."""
        if self.scale_to_rate_per_s is None:
            return None
        extent = self._extent(max_rows)
        span_ms = extent.span_ms
        target = f"time-scaling to {format_number(self.scale_to_rate_per_s)} requests/s"
        if extent.requests < 2:
            raise ConfigError(self.source.field_name, self.path,
                              f"{target} needs at least 2 replayed requests, found {extent.requests}")
        if not span_ms > 0.0:
            raise ConfigError(self.source.field_name, self.path,
                              f"{target} needs replayed requests at different times; the "
                              f"{extent.requests} replayed all arrive at one instant")
        trace_rate_per_s = (extent.requests - 1) / (span_ms / 1000.0)
        return trace_rate_per_s / self.scale_to_rate_per_s

    def chunks(self, chunk_size: int = CHUNK_SIZE, max_rows: int | None = None
               ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The replay as (arrival ms, prefill tokens, decode tokens) chunks of exactly
        ``chunk_size`` requests (the last may be shorter), the first ``max_rows`` requests only (None:
        all), time-scaled over those. The file is read as the chunks are taken, and no further."""
        if max_rows is not None and max_rows <= 0:
            return
        factor = self._factor(max_rows)
        first: np.floating | None = None
        for t, p, d in _rechunk(self._rows(max_rows), chunk_size):
            if first is None:
                first = t[0]
            times_ms = (t - first) * 1000.0
            if factor is not None:
                times_ms = times_ms * factor
            yield times_ms, p, d

    def chunks_ms(self, rng: np.random.Generator,
                  chunk_size: int = CHUNK_SIZE) -> Iterator[np.ndarray]:
        """The whole replay's arrival times (ms) in chunks; finite; the generator is not used."""
        for times_ms, _, _ in self.chunks(chunk_size):
            yield times_ms

    def offered(self, max_rows: int | None = None, duration_ms: float | None = None) -> OfferedLoad:
        """Rate (N - 1) / span and mean sizes of the requests a run replays: the first ``max_rows``
        (None: all) that arrive before ``duration_ms`` (None: no limit). One streaming pass over
        those requests, remembered; the rate is NaN with fewer than 2 or all at one instant."""
        horizon = math.inf if duration_ms is None else float(duration_ms)
        key = ("offered", max_rows, horizon)
        if key in self._memo:
            return self._memo[key]
        if math.isinf(horizon):
            extent = self._extent(max_rows)
            n, span_ms = extent.requests, extent.span_ms
            factor = self._factor(max_rows)
            if factor is not None:
                span_ms = span_ms * factor
            sum_p, sum_d = extent.prefill_tokens, extent.decode_tokens
        else:
            n = sum_p = sum_d = 0
            span_ms = 0.0
            for times_ms, p, d in self.chunks(CHUNK_SIZE, max_rows):
                k = int(np.searchsorted(times_ms, horizon, side="left"))
                if k:
                    n += k
                    span_ms = float(times_ms[k - 1])
                    sum_p += int(p[:k].sum())
                    sum_d += int(d[:k].sum())
                if k < times_ms.shape[0]:
                    break
        rate = (n - 1) / (span_ms / 1000.0) if n >= 2 and span_ms > 0.0 else math.nan
        out = OfferedLoad(rate, sum_p / n if n else math.nan, sum_d / n if n else math.nan)
        self._memo[key] = out
        return out

    def whole_if_known(self) -> tuple[int, OfferedLoad] | None:
        """The whole replay's request count and offered load when known without reading the trace
        again (a short trace, held in memory, or one that a pass has read whole), else None: for a
        caller that only compares (a note on a partial replay) and need not read a long trace past
        what its run used."""
        if not isinstance(self.source, ArrayRows) and ("extent", None) not in self._memo:
            return None
        return len(self), self.offered()

    def __len__(self) -> int:
        return self._extent(None).requests

    @property
    def rate_per_s(self) -> float:
        """Mean arrival rate of the whole replay: (N - 1) / span."""
        return self.offered().rate_per_s

    @property
    def mean_prefill_tokens(self) -> float:
        """Mean prefill tokens per request of the whole replay."""
        return self.offered().mean_prefill_tokens

    @property
    def mean_decode_tokens(self) -> float:
        """Mean decode tokens per request of the whole replay."""
        return self.offered().mean_decode_tokens

    def _whole(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        chunks = list(self.chunks(1 << 20))
        t, p, d = (_readonly(np.concatenate(parts)) for parts in zip(*chunks, strict=True))
        return t, p, d

    @property
    def times_ms(self) -> np.ndarray:
        """The whole replay's arrival times (ms) in memory (read-only; for analysis, not runs)."""
        return self._whole()[0]

    @property
    def prefill(self) -> np.ndarray:
        """The whole replay's prefill tokens in memory (read-only)."""
        return self._whole()[1]

    @property
    def decode(self) -> np.ndarray:
        """The whole replay's decode tokens in memory (read-only)."""
        return self._whole()[2]

    @property
    def spec(self) -> str:
        """Canonical spec text: ``trace:PATH[,key=value...]`` (any target rate is given separately)."""
        return f"trace:{self.path}{self.options}"


ArrivalProcess = PoissonArrivals | DeterministicArrivals | GammaArrivals | TraceArrivals
"""Any arrival process: ``chunks_ms(rng)``, ``rate_per_s`` and canonical ``spec``."""


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

    def offered(self, max_requests: int | None = None, duration_ms: float | None = None) -> OfferedLoad:
        """Rate and mean sizes of what a run with these bounds offers, for its theory.

        The arrival process's rate and the size distributions' means; for a trace replay, those of
        the requests the run replays (the first ``max_requests`` arriving before ``duration_ms``):
        a run over part of a trace gets the theory of that part, and the whole trace is not read.
        """
        if not isinstance(self.arrival, TraceArrivals):
            return OfferedLoad(self.arrival.rate_per_s, self.mean_prefill_tokens, self.mean_decode_tokens)
        rate, mean_p, mean_d = self.arrival.offered(max_requests, duration_ms)
        return OfferedLoad(rate, mean_p if self.prefill is None else self.prefill.mean,
                           mean_d if self.decode is None else self.decode.mean)

    def requests(self, seed: int, max_requests: int | None = None,
                 duration_ms: float | None = None) -> Iterator[Request]:
        """Stream requests (ids 0, 1, ... in arrival order) until ``max_requests`` have come, the
        first arrival at or after ``duration_ms``, or the end of a trace.

        Same seed, same stream; the first k requests do not depend on the stopping rule, except
        that a time-scaled trace replay scales the ``max_requests`` it replays to its rate.
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
        source: Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]
        if isinstance(self.arrival, TraceArrivals):  # the trace is read as far as the run goes
            source = self.arrival.chunks(CHUNK_SIZE, None if math.isinf(limit) else int(limit))
        else:
            source = ((times, None, None) for times in self.arrival.chunks_ms(rng_arrival, CHUNK_SIZE))
        for times, trace_prefill, trace_decode in source:
            prefill, decode = self._sizes(rng_prefill, rng_decode, trace_prefill, trace_decode,
                                          times.shape[0])
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
               trace_prefill: np.ndarray | None, trace_decode: np.ndarray | None,
               n: int) -> tuple[np.ndarray, np.ndarray]:
        """Sizes for the next chunk: always CHUNK_SIZE draws per generator (prefix stability); a
        size the workload does not draw is the trace's (its chunk's column)."""
        if self.paired:
            assert isinstance(self.prefill, Empirical) and isinstance(self.decode, Empirical)
            rows = self.prefill.sample_rows(rng_prefill, CHUNK_SIZE)[:n]
            return self.prefill.take(rows), self.decode.take(rows)
        return (self._one(self.prefill, rng_prefill, trace_prefill, n),
                self._one(self.decode, rng_decode, trace_decode, n))

    @staticmethod
    def _one(dist: SizeDist | None, rng: np.random.Generator, column: np.ndarray | None,
             n: int) -> np.ndarray:
        if dist is not None:
            return dist.sample(rng, CHUNK_SIZE)[:n]
        assert column is not None
        return column[:n]


def _as_requests(chunks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
                 ) -> Iterator[Request]:
    for ids, times, prefill, decode in chunks:
        for i, t, p, d in zip(ids.tolist(), times.tolist(), prefill.tolist(), decode.tolist(),
                              strict=True):
            yield Request(i, t, p, d)


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _num(text: str, what: str, field_name: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(field_name, spec, f"{what} must be a number, not {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(field_name, spec, f"{what} must be finite")
    return value

