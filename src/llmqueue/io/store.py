"""The results store: one SQLite row per finished run, keyed by the run's full configuration.

A sweep writes each run the moment it finishes (one transaction each), so an interrupted sweep
loses at most the runs in flight; rerunning it skips every key already stored. SQLite comes with
Python, the file is portable, and concurrent readers (``llmqueue results`` during a sweep) are fine.

Robustness, each for a reason:

- Readers (``llmqueue results``, ``sweep --dry-run``) open the file read-only and create nothing
  next to it: a writer leaves the file in rollback-journal mode when it closes (WAL only while it
  writes), and a WAL file with no ``-wal`` beside it (an older llmqueue's) is read as immutable.
- A write waits for another writer's lock for ``lock_timeout_s`` in all (retried with backoff),
  then raises :class:`StoreLockedError`; the sweep saves the finished runs it could not store to a
  side file (``DB.pending-ID.jsonl``) that the next sweep imports (:meth:`Store.import_pending`).
- Two sweeps on one file run every run once: a sweep claims a run (``claims`` table) before it
  starts it; a claim of a process that is gone (same host) or not refreshed for ``STALE_CLAIM_S``
  is taken over.
- A file that is not a results store, or a row that does not decode, is refused with one line
  naming the file (and the row).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import math
import os
import re
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from llmqueue.errors import ConfigError, LLMQueueError
from llmqueue.io.fileio import atomic_write_text

T = TypeVar("T")

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    result TEXT NOT NULL,
    wall_s REAL NOT NULL,
    finished_at REAL NOT NULL,
    version TEXT NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    claimed_at REAL NOT NULL
)""",
)
RUN_COLUMNS = ("key", "config", "result", "wall_s", "finished_at", "version")

LOCK_TIMEOUT_S = 60.0
"""How long one write waits in all for another writer's lock (retried with backoff) before
:class:`StoreLockedError`."""
STALE_CLAIM_S = 3600.0
"""A claim its sweep has not refreshed (it refreshes its claims whenever it stores a run) for this
long may be taken over: its owner is gone or hung. A claim of a dead process on the same host is
taken over at once."""
_ATTEMPT_S = 1.0  # SQLite's own busy wait per attempt; the retry loop adds backoff up to the total
_SQLITE_MAGIC = b"SQLite format 3\x00"



def package_version() -> str:
    """llmqueue's installed version (pyproject.toml's, stored with each run; ``llmqueue.__version__``)."""
    try:
        return metadata.version("llmqueue")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"

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


class StoreWriteError(LLMQueueError):
    """The results file cannot take a write now (a full disk, a read-only file, a lock)."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        super().__init__(f"{path}: {problem}")


class StoreLockedError(StoreWriteError):
    """Another writer held the results file's lock for longer than the store's lock timeout."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(path, f"locked by another writer for more than {timeout_s:g} s")


@dataclass(frozen=True, slots=True)
class Owner:
    """Who claims runs: one sweep (a fresh id) in one process on one host."""

    id: str
    host: str
    pid: int

    @classmethod
    def new(cls) -> Owner:
        """A new owner for a sweep in this process."""
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid())


def _pid_alive(pid: object) -> bool:
    """Whether a process with this id exists on this host (a reused id looks alive)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but belongs to someone else
        return True
    return True


def _busy(err: sqlite3.Error) -> bool:
    """Whether an SQLite error means another connection holds a lock (BUSY or LOCKED)."""
    code = getattr(err, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(err) or "busy" in str(err)


def _json_object(text: object) -> tuple[dict[str, Any] | None, str]:
    """(the JSON object in ``text``, '') or (None, what is wrong with it)."""
    if not isinstance(text, str):
        return None, f"is {type(text).__name__}, not JSON text"
    try:
        value = json.loads(text)
    except ValueError as err:
        return None, f"is not valid JSON ({err})"
    except RecursionError:
        return None, "is not valid JSON (nested too deeply)"
    if not isinstance(value, dict):
        return None, f"is a JSON {type(value).__name__}, not an object"
    return value, ""


class Store:
    """A results file. Use as a context manager or call ``close``.

    ``readonly`` opens an existing file for queries only: nothing is created or changed, and a
    missing file is an error. ``lock_timeout_s`` bounds how long a write waits for another writer.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False,
                 lock_timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if not (isinstance(lock_timeout_s, int | float) and 0 <= lock_timeout_s <= 1e6):
            raise ConfigError("lock_timeout_s", lock_timeout_s, "must be a number of seconds in [0, 1e6]")
        self.lock_timeout_s = float(lock_timeout_s)
        self._db: sqlite3.Connection | None = None
        try:
            self._db = self._open_readonly() if readonly else self._open_writer()
        except sqlite3.DatabaseError as err:
            self.close()
            raise self._unusable(err) from None
        except BaseException:
            self.close()
            raise

    def _unusable(self, err: sqlite3.Error) -> ConfigError:
        return ConfigError("db", str(self.path), f"not a usable results file: {err}")

    def _open_readonly(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise ConfigError("db", str(self.path), "does not exist")
        if not self.path.is_file():
            raise ConfigError("db", str(self.path), "is not a file")
        try:
            with open(self.path, "rb") as file:
                header = file.read(100)
        except OSError as err:
            raise ConfigError("db", str(self.path), f"cannot be read: {err.strerror}") from None
        if header and not header.startswith(_SQLITE_MAGIC):
            raise ConfigError("db", str(self.path), "is not an SQLite results file")
        query = "mode=ro"
        wal = len(header) > 19 and header[18] == 2  # the file format's WAL flag
        if wal and not Path(f"{self.path}-wal").exists():
            # WAL mode but no -wal beside it: every change is in the file itself (an older
            # llmqueue left it so). A plain read-only open would create -wal and -shm here.
            query = "mode=ro&immutable=1"
        uri = f"{self.path.resolve().as_uri()}?{query}"
        db = sqlite3.connect(uri, uri=True, timeout=self.lock_timeout_s, isolation_level=None)
        self._db = db
        self._check_schema(create=False)
        return db

    def _open_writer(self) -> sqlite3.Connection:
        if self.path.exists() and not self.path.is_file():
            raise ConfigError("db", str(self.path), "is not a file")
        db = sqlite3.connect(self.path, timeout=min(self.lock_timeout_s, _ATTEMPT_S), isolation_level=None)
        self._db = db
        complete = self._check_schema(create=True)
        self._retry(lambda: db.execute("PRAGMA journal_mode=WAL").fetchone())  # only while writing
        if not complete:
            self._write(lambda con: [con.execute(statement) for statement in SCHEMA])
        return db

    def _check_schema(self, *, create: bool) -> bool:
        """Whether the file has the runs and claims tables; a file with other tables and no
        ``runs`` (another program's database) or a ``runs`` table of another shape is refused."""
        assert self._db is not None
        tables = {name for (name,) in self._retry(lambda: self._db.execute(  # type: ignore[union-attr]
            "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall())}
        if "runs" not in tables:
            if not create or tables - {"claims"}:
                found = ", ".join(sorted(tables)) or "no tables"
                raise ConfigError("db", str(self.path),
                                  f"is not a results store (no runs table; has {found})")
            return False
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
        missing = [c for c in RUN_COLUMNS if c not in columns]
        if missing:
            raise ConfigError("db", str(self.path),
                              f"is not a results store (its runs table lacks {', '.join(missing)})")
        return "claims" in tables or not create

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file. A writer that is the last connection leaves it in rollback-journal mode
        (no ``-wal``/``-shm`` files), so read-only opens need no files beside it."""
        db, self._db = self._db, None
        if db is None:
            return
        if not self.readonly:
            try:
                db.execute("PRAGMA busy_timeout = 0")
                db.execute("PRAGMA journal_mode=DELETE").fetchone()  # fails while others are connected
            except sqlite3.Error:
                pass
        db.close()

    @property
    def db(self) -> sqlite3.Connection:
        """The open connection."""
        if self._db is None:
            raise LLMQueueError(f"{self.path}: the results file is closed")
        return self._db

    # -- writing with bounded waits ---------------------------------------------------------

    def _retry(self, action: Callable[[], T], timeout_s: float | None = None) -> T:
        """``action()``, retried with backoff while another connection holds a lock, for
        ``timeout_s`` (default: the store's lock timeout) in all; then StoreLockedError."""
        timeout_s = self.lock_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        delay = 0.01
        while True:
            try:
                return action()
            except sqlite3.OperationalError as err:
                if not _busy(err):
                    raise
                if time.monotonic() + delay > deadline:
                    raise StoreLockedError(self.path, timeout_s) from None
                time.sleep(delay)
                delay = min(2 * delay, 1.0)

    def _write(self, work: Callable[[sqlite3.Connection], T], timeout_s: float | None = None) -> T:
        """``work(connection)`` in one write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back
        on any exception, retried while the file is locked (see :meth:`_retry`); StoreWriteError
        when it cannot be written (locked too long, a full disk, a read-only file)."""
        db = self.db

        def attempt() -> T:
            db.execute("BEGIN IMMEDIATE")
            try:
                out = work(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return out

        try:
            return self._retry(attempt, timeout_s)
        except sqlite3.Error as err:
            raise StoreWriteError(self.path, f"cannot be written: {err}") from None

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """All rows of a query; a broken file is a ConfigError naming it."""
        try:
            return self._retry(lambda: self.db.execute(sql, params).fetchall())
        except sqlite3.DatabaseError as err:
            raise self._unusable(err) from None

    # -- runs ---------------------------------------------------------------------------------

    def keys(self) -> set[str]:
        """Keys of every stored run."""
        return {row[0] for row in self._read("SELECT key FROM runs")}

    def __len__(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM runs")[0][0])

    def put(self, config: Mapping[str, Any], result: Mapping[str, Any], wall_s: float,
            version: str, owner: Owner | None = None) -> None:
        """Store one finished run (committed at once; a key already present is kept).

        Any claim on the run is dropped, and ``owner``'s other claims are refreshed (still running).
        """
        key = run_key(config)
        row = (key, json.dumps(jsonable(dict(config)), sort_keys=True),
               json.dumps(jsonable(dict(result))), float(wall_s), time.time(), version)

        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR IGNORE INTO runs (key, config, result, wall_s, finished_at, version) "
                       "VALUES (?, ?, ?, ?, ?, ?)", row)
            db.execute("DELETE FROM claims WHERE key = ?", (key,))
            if owner is not None:
                db.execute("UPDATE claims SET claimed_at = ? WHERE owner = ?", (row[4], owner.id))

        self._write(work)

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every run as one flat mapping: its configuration, then its result (in finish order).

        A row that does not decode (invalid JSON, a value of the wrong type) is a ConfigError naming
        the file, the row and its key: the store is refused, not silently shortened.
        """
        try:
            cursor = self.db.execute(
                "SELECT rowid, key, config, result, wall_s FROM runs ORDER BY finished_at, key"
            )
            while True:
                batch = cursor.fetchmany(256)
                if not batch:
                    return
                for rowid, key, config, result, wall_s in batch:
                    yield self._decode(rowid, key, config, result, wall_s)
        except sqlite3.DatabaseError as err:
            raise self._unusable(err) from None

    def _decode(self, rowid: int, key: object, config_text: object, result_text: object,
                wall_s: object) -> dict[str, Any]:
        """One stored row as a flat mapping; ConfigError naming the row when it does not decode."""

        def corrupt(problem: str) -> ConfigError:
            return ConfigError("db", str(self.path),
                               f"row {rowid} (key {key!r}): {problem}; delete it (DELETE FROM runs WHERE "
                               f"rowid = {rowid}) and rerun the sweep to recompute it")

        if not isinstance(key, str):
            raise corrupt(f"key is {type(key).__name__}, not text")
        config, problem = _json_object(config_text)
        if config is None:
            raise corrupt(f"config {problem}")
        outcome, problem = _json_object(result_text)
        if outcome is None:
            raise corrupt(f"result {problem}")
        if not isinstance(wall_s, int | float) or isinstance(wall_s, bool):
            raise corrupt(f"wall_s is {type(wall_s).__name__}, not a number")
        row: dict[str, Any] = {"key": key}
        row.update(config)
        if isinstance(row.get("policy"), dict):  # the spec stays; its display name comes first
            row["policy_spec"] = row["policy"]
            row["policy"] = outcome.get("policy", row["policy_spec"].get("name"))
        for name, value in outcome.items():
            if name == "duration_s":  # the run's length, not the config's arrival window
                row["run_duration_s"] = value
            elif row.get(name) is None:  # e.g. the rate a load turned into
                row[name] = value
        row["wall_s"] = wall_s
        return row

    # -- claims -------------------------------------------------------------------------------

    def claim(self, key: str, owner: Owner, stale_s: float = STALE_CLAIM_S) -> bool:
        """Claim the run ``key`` for ``owner`` before starting it: False when it is stored already
        or another sweep holds a live claim (a process on this host that still exists, or a
        claim refreshed less than ``stale_s`` ago)."""

        def work(db: sqlite3.Connection) -> bool:
            if db.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone() is not None:
                return False
            held = db.execute("SELECT owner, host, pid, claimed_at FROM claims WHERE key = ?",
                              (key,)).fetchone()
            now = time.time()
            if held is not None and held[0] != owner.id:
                _, host, pid, claimed_at = held
                gone = host == owner.host and not _pid_alive(pid)
                stale = not isinstance(claimed_at, int | float) or now - claimed_at > stale_s
                if not (gone or stale):
                    return False
            db.execute("INSERT OR REPLACE INTO claims (key, owner, host, pid, claimed_at) "
                       "VALUES (?, ?, ?, ?, ?)", (key, owner.id, owner.host, owner.pid, now))
            return True

        return self._write(work)

    def release(self, owner: Owner, timeout_s: float = _ATTEMPT_S) -> bool:
        """Drop ``owner``'s claims (runs it will not finish); one short try: False when locked."""
        try:
            self._write(lambda db: db.execute("DELETE FROM claims WHERE owner = ?", (owner.id,)),
                        min(timeout_s, self.lock_timeout_s))
        except StoreWriteError:
            return False
        return True

    # -- finished runs the store could not take -----------------------------------------------

    def pending_files(self) -> list[Path]:
        """Side files of finished runs a sweep could not store (the file was locked)."""
        pattern = glob.escape(self.path.name) + ".pending-*.jsonl"
        return sorted(self.path.parent.glob(pattern))

    def save_pending(self, entries: Sequence[Mapping[str, Any]]) -> Path:
        """Write finished runs (``config``, ``result``, ``wall_s``, ``version``, ``finished_at``)
        to a new side file next to the store, atomically; the next sweep imports it."""
        path = self.path.with_name(f"{self.path.name}.pending-{uuid.uuid4().hex[:12]}.jsonl")
        atomic_write_text(path, "".join(json.dumps(jsonable(dict(e)), sort_keys=True) + "\n"
                                        for e in entries))
        return path

    def read_pending(self, path: Path) -> list[dict[str, Any]]:
        """The entries of one side file; ConfigError naming the file and line when one is bad."""
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError("pending runs", str(path), f"cannot be read: {err}") from None
        entries = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            entry, problem = _json_object(line)
            if entry is None or not isinstance(entry.get("config"), dict) \
                    or not isinstance(entry.get("result"), dict) \
                    or not isinstance(entry.get("wall_s"), int | float) \
                    or not isinstance(entry.get("version"), str):
                problem = problem or "needs config, result (objects), wall_s and version"
                raise ConfigError("pending runs", f"{path}:{number}",
                                  f"line {number} {problem}; fix or delete the file")
            entries.append(entry)
        return entries

    def pending_keys(self) -> set[str]:
        """Keys of the runs in side files (stored by the next sweep); read-only."""
        return {run_key(e["config"]) for path in self.pending_files() for e in self.read_pending(path)}

    def import_pending(self) -> int:
        """Store the runs of every side file, delete the files, and drop the claims of stored runs.
        Returns how many runs were new."""
        added = 0
        for path in self.pending_files():
            entries = self.read_pending(path)

            def work(db: sqlite3.Connection, entries: list[dict[str, Any]] = entries) -> int:
                new = 0
                for e in entries:
                    new += db.execute(
                        "INSERT OR IGNORE INTO runs (key, config, result, wall_s, finished_at, version) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (run_key(e["config"]), json.dumps(e["config"], sort_keys=True),
                         json.dumps(e["result"]), float(e["wall_s"]),
                         float(e.get("finished_at") or time.time()), e["version"]),
                    ).rowcount
                return new

            added += self._write(work)
            path.unlink(missing_ok=True)
        self._write(lambda db: db.execute("DELETE FROM claims WHERE key IN (SELECT key FROM runs)"))
        return added


# -- queries ----------------------------------------------------------------------------------

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


def _is_series(value: Any) -> bool:
    """A list of lists (a time series such as ``backlog_series``)."""
    return isinstance(value, list) and any(isinstance(v, list | tuple) for v in value)


def without_series(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows without their series fields (``backlog_series``: thousands of numbers per run), as CSV
    has them by default; ``--columns`` or ``--all-columns`` keep them."""
    series = {k for row in rows for k, v in row.items() if _is_series(v)}
    return [{k: v for k, v in row.items() if k not in series} for row in rows]


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


# -- the results table --------------------------------------------------------------------------


def table_cell(value: Any) -> str:
    """A value as the results table shows it: '-' for none, a float with 3 decimals below 1,000
    and as a whole number with thousands separators from 1,000 up (shorter, never cut)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3f}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _header(name: str, width: int) -> str:
    """``name`` broken after underscores into lines of at most ``width`` (or its longest part)."""
    parts = [p + "_" for p in name.split("_")]
    parts[-1] = parts[-1][:-1]
    width = max(width, *(len(p) for p in parts))
    lines = [""]
    for part in parts:
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def constant_columns(rows: Sequence[Mapping[str, Any]], candidates: Sequence[str]) -> dict[str, Any]:
    """The ``candidates`` with one value in every row (and more than one row): name -> value."""
    out: dict[str, Any] = {}
    if len(rows) < 2:
        return out
    for name in candidates:
        values = {json.dumps(row.get(name), sort_keys=True, default=str) for row in rows}
        if len(values) == 1:
            out[name] = rows[0].get(name)
    return out


def results_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], width: int,
                  droppable: Sequence[str] = ()) -> tuple[Table, list[str]]:
    """The results table of ``rows`` for a terminal ``width`` columns wide, and the columns left out.

    While the table is wider than ``width``, the ``droppable`` columns are left out, first first.
    Headers break after underscores; no cell is ever cut ('…'): a table still too wide folds.
    """
    cells = [[table_cell(row.get(name)) for name in columns] for row in rows]
    data_width = [max((len(r[i]) for r in cells), default=1) for i in range(len(columns))]
    shown = list(range(len(columns)))
    dropped: list[str] = []
    probe = Console(width=10**6, file=io.StringIO())

    def build(indices: list[int]) -> Table:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                      header_style="bold")
        for i in indices:
            name = columns[i]
            numeric = any(isinstance(row.get(name), int | float) and not isinstance(row.get(name), bool)
                          for row in rows)
            table.add_column(_header(name, data_width[i]), justify="right" if numeric else "left",
                             overflow="fold")
        for row_cells in cells:
            table.add_row(*(row_cells[i] for i in indices))
        return table

    table = build(shown)
    for name in droppable:
        if Measurement.get(probe, probe.options, table).maximum <= width:
            break
        if name in columns and columns.index(name) in shown:
            shown.remove(columns.index(name))
            dropped.append(name)
            table = build(shown)
    return table, dropped
