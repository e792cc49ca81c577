"""Reading small CSV tables: one reader, one set of error messages.

Measurement tables (batch-time tables, kernel profiles, fit data, the engine_fig1 logs) are read
whole by :func:`read_csv_table`: a header row, then rows of cells, each row with the file line it
starts on. Every problem is one :class:`~llmqueue.errors.ConfigError` line on the caller's field
naming the file and, for a cell, its line and column, worded as the trace reader words them
(``data: line 4 column 'time_ms' is not a finite number: 'x' (got 'times.csv')``).

The streaming trace reader (:mod:`llmqueue.model.workload`, 10M-row files in bounded memory) has
its own block parser for speed, but shares the rules here: what a blank line is
(:func:`is_blank`), how a header row is read (:func:`header_names`) and how a file that is not
UTF-8 text is reported (:func:`not_utf8`) and how a bad cell is worded (:func:`cell_problem`).
"""

from __future__ import annotations

import codecs
import csv
import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from llmqueue.errors import ConfigError

__all__ = ["CsvTable", "cell_problem", "decode_error_line", "header_names", "is_blank", "not_utf8",
           "read_csv_table"]


def is_blank(fields: list[str]) -> bool:
    """Whether a row the csv module read is an empty or whitespace-only line (no row at all)."""
    return not fields or (len(fields) == 1 and not fields[0].strip())


def not_utf8(line: int, byte: int) -> str:
    """The problem text for a line that is not UTF-8: ``line 3 is not UTF-8 text (byte 0xe9)``."""
    return f"line {line} is not UTF-8 text (byte 0x{byte:02x})"


def decode_error_line(raw: bytes, err: UnicodeDecodeError, first_line: int = 1) -> str:
    """:func:`not_utf8` for ``raw`` (whole lines from file line ``first_line`` on) failing at ``err``."""
    return not_utf8(first_line + raw.count(b"\n", 0, err.start), raw[err.start])


def cell_problem(where: str, column: str, problem: str, text: str) -> str:
    """A bad cell in words: ``line 4 column 'time_ms' is not a finite number: 'x'`` (``where``
    names the row: ``line 4``, or ``trace row 3 (line 4)``)."""
    return f"{where} column '{column}' {problem}: {text.strip()!r}"


def header_names(text: str) -> list[str]:
    """The stripped column names of a header line (``csv.Error`` on a malformed one)."""
    return [name.strip() for name in next(csv.reader([text]), [])]


@dataclass(frozen=True, slots=True)
class CsvTable:
    """A CSV file read whole: stripped column names, rows of stripped cells by column, and the file
    line each row starts on (the header is line 1; blank lines are no rows).

    Its errors are ConfigErrors on ``field`` (the option that named the file) with ``value`` as
    the value shown (the path, or the spec that named it).
    """

    path: Path
    field: str
    value: str
    columns: tuple[str, ...]
    rows: tuple[dict[str, str], ...]
    lines: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.rows)

    def require(self, columns: Iterable[str]) -> None:
        """ConfigError naming the first of ``columns`` the header lacks."""
        for column in columns:
            if column not in self.columns:
                raise ConfigError(self.field, self.value, f"missing column '{column}' (columns: "
                                                              f"{','.join(self.columns)})")

    def where(self, filters: Mapping[str, str]) -> CsvTable:
        """The rows whose cell in each filter's column equals its value (unknown columns: no rows)."""
        kept = [i for i, row in enumerate(self.rows) if all(row.get(k) == v for k, v in filters.items())]
        return CsvTable(self.path, self.field, self.value, self.columns, tuple(self.rows[i] for i in kept),
                        tuple(self.lines[i] for i in kept))

    def cell_error(self, i: int, column: str, problem: str) -> ConfigError:
        """A ConfigError for row ``i``'s cell in ``column``: ``line 4 column 'n' {problem}: '1.5'``."""
        text = self.rows[i].get(column, "")
        where = f"line {self.lines[i]}"
        return ConfigError(self.field, self.value, cell_problem(where, column, problem, text))

    def number(self, i: int, column: str, *, blank: float | None = None) -> float:
        """Row ``i``'s cell in ``column`` as a finite float; an empty cell is ``blank`` where that is
        given (NaN marks a missing value), else an error like any other cell that is not a number."""
        text = self.rows[i].get(column, "")
        if not text and blank is not None:
            return blank
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise self.cell_error(i, column, "is not a finite number")
        return value

    def count(self, i: int, column: str, minimum: int = 0) -> int:
        """Row ``i``'s cell in ``column`` as an integer >= ``minimum``."""
        value = self.number(i, column)
        if not value.is_integer() or value < minimum:
            raise self.cell_error(i, column, f"must be an integer >= {minimum}")
        return int(value)


def read_csv_table(path: str | Path, field: str, what: str = "file", value: str | None = None) -> CsvTable:
    """The CSV file at ``path`` with a header row, read whole (for tables, not traces).

    Errors are one ConfigError on ``field`` with ``value`` (default: the path) as the value, the
    problem beginning with ``what`` (``table file not found``): a missing or unreadable file, one
    that is not UTF-8 text (the line is named; a UTF-8 byte-order mark is allowed), no header row,
    a malformed line, a row with another number of fields than the header.
    """
    path = Path(path)
    shown = str(path) if value is None else value
    if not path.is_file():
        raise ConfigError(field, shown, f"{what} not found")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(field, shown, f"{what} cannot be read: {err.strerror}") from None
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(field, shown, f"{what}: {decode_error_line(raw[start:], err)}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    columns: list[str] | None = None
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    try:
        while True:
            line = reader.line_num + 1
            fields = next(reader, None)
            if fields is None:
                break
            if is_blank(fields):
                continue
            cells = [cell.strip() for cell in fields]
            if columns is None:
                columns = cells
                continue
            if len(cells) != len(columns):
                raise ConfigError(field, shown, f"{what}: line {line} has {len(cells)} fields, the "
                                                    f"header has {len(columns)}")
            rows.append(dict(zip(columns, cells, strict=True)))
            lines.append(line)
    except csv.Error as err:
        raise ConfigError(field, shown, f"{what}: line {reader.line_num}: {err}") from None
    if columns is None:
        raise ConfigError(field, shown, f"{what} has no header row")
    return CsvTable(path, field, shown, tuple(columns), tuple(rows), tuple(lines))
