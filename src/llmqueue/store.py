"""The results store: one SQLite row per finished run, keyed by the run's full configuration.

A sweep writes each run the moment it finishes (one transaction each), so an interrupted sweep
loses at most the runs in flight; rerunning it skips every key already stored. SQLite comes with
Python, the file is portable, and concurrent readers (``llmqueue results`` during a sweep) are fine.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from llmqueue.errors import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    result TEXT NOT NULL,
    wall_s REAL NOT NULL,
    finished_at REAL NOT NULL,
    version TEXT NOT NULL
)
"""


def run_key(config: Mapping[str, Any]) -> str:
    """Stable key of a run configuration: SHA-256 of its canonical JSON (sorted keys)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def jsonable(value: Any) -> Any:
    """NaN and inf become None (JSON null), in nested dicts and lists: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


class Store:
    """A results file. Use as a context manager or call ``close``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(SCHEMA)
            self._db.commit()
        except sqlite3.DatabaseError as err:
            raise ConfigError("db", str(path), f"not a usable results file: {err}") from None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        self._db.close()

    def keys(self) -> set[str]:
        """Keys of every stored run."""
        return {row[0] for row in self._db.execute("SELECT key FROM runs")}

    def put(self, config: Mapping[str, Any], result: Mapping[str, Any], wall_s: float,
            version: str) -> None:
        """Store one finished run (committed at once; a key already present is kept)."""
        self._db.execute(
            "INSERT OR IGNORE INTO runs (key, config, result, wall_s, finished_at, version) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (run_key(config), json.dumps(jsonable(dict(config)), sort_keys=True),
             json.dumps(jsonable(dict(result))), wall_s, time.time(), version),
        )
        self._db.commit()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every run as one flat mapping: its configuration, then its result (in finish order)."""
        cursor = self._db.execute(
            "SELECT key, config, result, wall_s FROM runs ORDER BY finished_at, key"
        )
        for key, config, result, wall_s in cursor:
            row: dict[str, Any] = {"key": key}
            row.update(json.loads(config))
            outcome = json.loads(result)
            if isinstance(row.get("policy"), dict):  # the spec stays; its display name comes first
                row["policy_spec"] = row["policy"]
                row["policy"] = outcome.get("policy", row["policy_spec"].get("name"))
            for name, value in outcome.items():
                if name == "duration_s":  # the run's length, not the config's arrival window
                    row["run_duration_s"] = value
                elif row.get(name) is None:  # e.g. the rate a load turned into
                    row[name] = value
            row["wall_s"] = wall_s
            yield row


_WHERE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(!=|<=|>=|=|<|>)\s*(.*?)\s*$")


def parse_where(clauses: Sequence[str]) -> list[tuple[str, str, str]]:
    """``field=value``, ``field!=value``, ``field<value``, ``field>value`` (also <=, >=)."""
    parsed = []
    for clause in clauses:
        match = _WHERE.match(clause)
        if match is None:
            raise ConfigError("where", clause, "must look like field=value (or != < > <= >=)")
        parsed.append((match.group(1), match.group(2), match.group(3)))
    return parsed


def _matches(row: Mapping[str, Any], field: str, op: str, text: str) -> bool:
    value = row.get(field)
    if op in ("=", "!="):
        equal = str(value) == text or (value is None and text in ("", "none", "null"))
        if not equal and isinstance(value, int | float) and not isinstance(value, bool):
            try:
                equal = float(value) == float(text)
            except ValueError:
                equal = False
        return equal if op == "=" else not equal
    try:
        number = float(text)
    except ValueError:
        raise ConfigError("where", f"{field}{op}{text}", "needs a number to compare") from None
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    return {"<": value < number, ">": value > number, "<=": value <= number,
            ">=": value >= number}[op]


def select(rows: Iterable[Mapping[str, Any]], where: Sequence[tuple[str, str, str]],
           columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows passing every clause, cut to ``columns`` (all when None); unknown columns are errors."""
    out = []
    for row in rows:
        if all(_matches(row, field, op, text) for field, op, text in where):
            out.append(dict(row))
    if columns:
        known = set().union(*(row.keys() for row in out)) if out else set()
        for column in columns:
            if out and column not in known:
                raise ConfigError("columns", column, f"unknown column; known: {', '.join(sorted(known))}")
        out = [{c: row.get(c) for c in columns} for row in out]
    return out


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV text: one column per field seen (lists as JSON), in first-seen order."""
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({
            k: json.dumps(v) if isinstance(v, list | dict) else ("" if v is None else v)
            for k, v in row.items()
        })
    return buffer.getvalue()


def to_json(rows: Sequence[Mapping[str, Any]]) -> str:
    """A JSON array of the rows."""
    return json.dumps([jsonable(dict(r)) for r in rows], indent=1)
