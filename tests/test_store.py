"""The results store under bad files, locks, concurrent sweeps and readers; atomic output files.

Every bad input ends in one line on stderr naming the file and exit code 2; readers never create
or change a file; a finished run is never lost to a locked store; outputs are replaced whole.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import llmqueue.studies.sweep as sweep_module
from llmqueue.errors import ConfigError, LLMQueueError
from llmqueue.io.configfile import read_table
from llmqueue.io.fileio import atomic_write, atomic_write_text
from llmqueue.io.store import Owner, Store, StoreWriteError, results_table, run_key
from llmqueue.studies.sweep import expand, parse_config, run_sweep

from .helpers import run_cli

TWO = {"grid": {"policies": ["sarathi", "orca"], "rates": [5.0]}, "run": {"requests": 200}}


def one_line_error(code: int, err: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("llmqueue: error: "), err
    assert "Traceback" not in err


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    """A results file of two stored runs, closed (as a finished sweep leaves it)."""
    path = tmp_path / "r.sqlite"
    with Store(path) as store:
        run_sweep(parse_config(TWO), store, workers=1)
    return path


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file of ``folder``: its mtime (ns) and the SHA-256 of its bytes."""
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir())}


# -- files that are not results stores, corrupt rows -----------------------------------------


def _sqlite_with_other_table(path: Path) -> None:
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE accounts (id INTEGER, name TEXT)")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(bytes(range(256)) * 20), "is not an SQLite results file"),
        (lambda p: p.write_text("policy,load\nsarathi,0.9\n"), "is not an SQLite results file"),
        (lambda p: p.write_bytes(b""), r"is not a results store \(no runs table; has no tables\)"),
        (_sqlite_with_other_table, r"is not a results store \(no runs table; has accounts\)"),
        (lambda p: None, "does not exist"),
    ],
    ids=["binary", "csv", "empty", "other-sqlite", "missing"],
)
def test_results_refuses_a_file_that_is_not_a_results_store(tmp_path, capsys, make, message) -> None:
    import re

    path = tmp_path / "x.sqlite"
    make(path)
    before = snapshot(tmp_path)
    for fmt in ("table", "csv", "json"):
        code, out, err = run_cli(capsys, "results", str(path), "--format", fmt)
        one_line_error(code, err)
        assert re.search(message, err) and str(path) in err and out == ""
    assert snapshot(tmp_path) == before  # nothing created, nothing changed


def test_sweep_refuses_another_programs_database(tmp_path, capsys) -> None:
    path = tmp_path / "app.db"
    _sqlite_with_other_table(path)
    before = snapshot(tmp_path)
    config = tmp_path / "s.toml"
    config.write_text("[grid]\npolicies = ['sarathi']\nrates = [5.0]\n[run]\nrequests = 100\n")
    code, _, err = run_cli(capsys, "sweep", str(config), "--db", str(path), "--workers", "1")
    one_line_error(code, err)
    assert "is not a results store" in err and "accounts" in err
    assert snapshot(tmp_path) == before | {"s.toml": snapshot(tmp_path)["s.toml"]}


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("result", "{not json", "result is not valid JSON"),
        ("result", "[1, 2]", "result is a JSON list, not an object"),
        ("config", b"\xff\x00", "config is bytes, not JSON text"),
        ("wall_s", "fast", "wall_s is str, not a number"),
        ("key", b"\x01\x02", "key is bytes, not text"),
    ],
)
def test_a_corrupt_row_is_refused_naming_the_file_and_the_row(db, capsys, column, value, problem) -> None:
    with sqlite3.connect(db) as con:
        rowid, key = con.execute("SELECT rowid, key FROM runs ORDER BY rowid DESC LIMIT 1").fetchone()
        con.execute(f"UPDATE runs SET {column} = ? WHERE rowid = ?", (value, rowid))
    for fmt in ("table", "csv", "json"):
        code, out, err = run_cli(capsys, "results", str(db), "--format", fmt)
        one_line_error(code, err)
        assert problem in err and f"row {rowid}" in err and str(db) in err and out == ""
        if column != "key":
            assert key in err
    with Store(db) as store:  # a sweep only needs the keys: it still resumes
        assert len(store.keys()) == 2


# -- readers never create or change a file ------------------------------------------------------


def test_readers_create_and_change_nothing(db, tmp_path, capsys) -> None:
    """results (every format) and sweep --dry-run on a closed store, a store an older llmqueue
    left in WAL mode (no -wal beside it), and a store a live writer holds open."""
    config = tmp_path / "s.toml"
    config.write_text("[grid]\npolicies = ['sarathi', 'orca', 'vllm']\nrates = [5.0]\n"
                      "[run]\nrequests = 200\n")

    def read_all() -> None:
        for args in (["results", str(db)], ["results", str(db), "--format", "csv"],
                     ["results", str(db), "--format", "json"],
                     ["sweep", str(config), "--db", str(db), "--dry-run"]):
            code, out, err = run_cli(capsys, *args)
            assert code == 0 and out, err

    before = snapshot(tmp_path)
    assert sorted(before) == ["r.sqlite", "s.toml"]  # a closed store has no -wal or -shm
    read_all()
    assert snapshot(tmp_path) == before

    with sqlite3.connect(db) as con:  # as an older llmqueue left it: WAL mode, no -wal file
        assert con.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    con.close()
    before = snapshot(tmp_path)
    assert sorted(before) == ["r.sqlite", "s.toml"]
    read_all()
    assert snapshot(tmp_path) == before

    with Store(db):  # a sweep writing: -wal and -shm exist; readers add nothing, change no data
        names = sorted(p.name for p in tmp_path.iterdir())
        main = (db.stat().st_mtime_ns, db.read_bytes())
        read_all()
        assert sorted(p.name for p in tmp_path.iterdir()) == names
        assert (db.stat().st_mtime_ns, db.read_bytes()) == main


def test_dry_run_on_a_missing_file_creates_nothing(tmp_path, capsys) -> None:
    config = tmp_path / "s.toml"
    config.write_text("[grid]\npolicies = ['sarathi']\nrates = [5.0, 6.0]\n")
    code, out, _ = run_cli(capsys, "sweep", str(config), "--db", str(tmp_path / "new.sqlite"), "--dry-run")
    assert code == 0 and out.startswith("2 runs: 0 already in")
    code, out, _ = run_cli(capsys, "sweep", str(config), "--dry-run", "--json")
    assert code == 0 and json.loads(out)["to_run"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]


# -- a locked store -----------------------------------------------------------------------------


def _lock_after_first_run(monkeypatch: pytest.MonkeyPatch, db: Path) -> sqlite3.Connection:
    """Once the first run has finished (before it is stored), another connection takes the
    write lock (BEGIN IMMEDIATE) and holds it; returns that connection."""
    holder = sqlite3.connect(db, isolation_level=None)
    real = sweep_module.execute

    def run_then_lock(run: Any, engine: str = "auto") -> Any:
        out = real(run, engine)
        if not holder.in_transaction:
            holder.execute("BEGIN IMMEDIATE")
        return out

    monkeypatch.setattr(sweep_module, "execute", run_then_lock)
    return holder


def test_a_locked_store_keeps_the_finished_run_for_the_next_sweep(tmp_path, monkeypatch) -> None:
    config = parse_config(TWO)
    path = tmp_path / "lock.sqlite"
    with Store(path, lock_timeout_s=0.3) as store:
        holder = _lock_after_first_run(monkeypatch, path)
        with pytest.raises(LLMQueueError) as info:
            run_sweep(config, store, workers=1)
        holder.execute("ROLLBACK")
        holder.close()
    message = str(info.value)
    assert "locked by another writer for more than 0.3 s" in message
    assert "0 run(s) stored, 1 finished run(s) saved to" in message and "rerun to resume" in message
    (side,) = tmp_path.glob("lock.sqlite.pending-*.jsonl")
    assert str(side) in message
    saved = json.loads(side.read_text())
    assert run_key(saved["config"]) in {run_key(r) for r in expand(config)}
    monkeypatch.undo()
    with Store(path) as store:
        outcome = run_sweep(config, store, workers=1)
        assert outcome.already_done == 1 and outcome.ran == 1  # imported, not run again
        assert store.keys() == {run_key(r) for r in expand(config)}
        assert store.db.execute("SELECT COUNT(*) FROM claims").fetchone() == (0,)
    assert not side.exists()


def test_a_locked_store_ends_the_cli_with_one_line(tmp_path, capsys, monkeypatch) -> None:
    config = tmp_path / "s.toml"
    config.write_text("[grid]\npolicies = ['sarathi', 'orca']\nrates = [5.0]\n[run]\nrequests = 200\n")
    path = tmp_path / "s.sqlite"
    with Store(path):
        pass
    holder = _lock_after_first_run(monkeypatch, path)
    code, _, err = run_cli(capsys, "sweep", str(config), "--workers", "1", "--lock-timeout", "0.2")
    holder.execute("ROLLBACK")
    holder.close()
    one_line_error(code, err)
    (side,) = tmp_path.glob("s.sqlite.pending-*.jsonl")
    assert f"{path}: locked by another writer" in err and str(side) in err
    code, out, _ = run_cli(capsys, "sweep", str(config), "--dry-run")  # the side file counts as stored
    assert code == 0 and out.startswith("2 runs: 1 already in")


def test_a_full_disk_keeps_the_finished_run_too(tmp_path, monkeypatch) -> None:
    config = parse_config(TWO)
    path = tmp_path / "full.sqlite"

    def full(self: Store, *args: Any, **kwargs: Any) -> None:
        raise StoreWriteError(self.path, "cannot be written: database or disk is full")

    with Store(path) as store:
        monkeypatch.setattr(Store, "put", full)
        with pytest.raises(LLMQueueError, match=r"full\.sqlite: cannot be written: database or disk is "
                           r"full; 0 run\(s\) stored, 1 finished run\(s\) saved to .*pending-"):
            run_sweep(config, store, workers=1)
    monkeypatch.undo()
    with Store(path) as store:
        assert run_sweep(config, store, workers=1).already_done == 1


def test_a_bad_side_file_is_named(tmp_path) -> None:
    path = tmp_path / "s.sqlite"
    (tmp_path / "s.sqlite.pending-x.jsonl").write_text('{"config": {}, "result": {}, "wall_s": 1, '
                                                       '"version": "1"}\n{oops\n')
    with Store(path) as store, pytest.raises(ConfigError, match=r"line 2 is not valid JSON.*x\.jsonl:2"):
        store.import_pending()


# -- claims: two sweeps on one store ------------------------------------------------------------


def test_claims_keep_a_run_to_one_live_sweep(tmp_path) -> None:
    first, second = Owner.new(), Owner.new()
    with Store(tmp_path / "c.sqlite") as store:
        assert store.claim("k1", first) and store.claim("k1", first)  # a claim is idempotent
        assert not store.claim("k1", second)  # held by a live process on this host
        assert store.claim("k1", second, stale_s=-1.0)  # not refreshed: taken over
        store.put({"run": 1}, {"x": 1}, 0.1, "v", owner=second)
        assert not store.claim(run_key({"run": 1}), first)  # stored: nothing to claim
        assert store.claim("k2", first)
        assert store.release(first)
        assert store.claim("k2", second)
        store.release(second)
        assert store.db.execute("SELECT COUNT(*) FROM claims").fetchone() == (0,)


def test_a_claim_of_a_dead_process_is_taken_over(tmp_path) -> None:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    gone = Owner("gone", Owner.new().host, int(ended.stdout))
    elsewhere = Owner("elsewhere", "another-host", int(ended.stdout))
    with Store(tmp_path / "c.sqlite") as store:
        assert store.claim("k1", gone) and store.claim("k2", elsewhere)
        assert store.claim("k1", Owner.new())  # same host, process gone
        assert not store.claim("k2", Owner.new())  # another host: only after STALE_CLAIM_S


# -- atomic output files ------------------------------------------------------------------------


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path) -> None:
    path = tmp_path / "out.csv"
    atomic_write_text(path, "old\n")
    os.chmod(path, 0o640)
    with pytest.raises(RuntimeError), atomic_write(path) as out:
        out.write("half of the new")
        raise RuntimeError("killed midway")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and (path.stat().st_mode & 0o777) == 0o640
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "no" / "such" / "dir.csv", "x")
    assert info.value.filename == str(tmp_path / "no" / "such" / "dir.csv")


def test_a_full_disk_keeps_the_old_file_and_names_the_new_one(tmp_path, monkeypatch, capsys, db) -> None:
    out = tmp_path / "all.csv"
    out.write_text("the previous export\n")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = run_cli(capsys, "results", str(db), "--format", "csv", "--out", str(out))
    one_line_error(code, err)
    assert f"{out}: No space left on device" in err
    assert out.read_text() == "the previous export\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_results_out_to_an_unwritable_place_is_one_line(db, tmp_path, capsys) -> None:
    target = tmp_path / "missing" / "t.txt"
    for fmt in ("table", "csv", "json"):
        code, _, err = run_cli(capsys, "results", str(db), "--format", fmt, "--out", str(target))
        one_line_error(code, err)
        assert str(target) in err
    code, _, _ = run_cli(capsys, "results", str(db), "--out", str(tmp_path / "t.txt"))
    assert code == 0 and "2 run(s)" in (tmp_path / "t.txt").read_text()


# -- config files that are not text -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("bin.toml", bytes(range(128, 256)), r"is not UTF-8 text \(byte 0x80 at offset 0\)"),
        ("latin1.yaml", "policies: [caf\xe9]\n".encode("latin-1"), r"is not UTF-8 text \(byte 0xe9"),
        ("nul.toml", b"[grid]\x00\n", "is not valid"),
        ("deep.toml", b"a = " + b"[" * 50_000, "is not valid: nested too deeply"),
    ],
)
def test_config_files_that_are_not_utf8_text_are_one_line(tmp_path, capsys, name, data, message) -> None:
    import re

    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=message):
        read_table(path, "config")
    code, _, err = run_cli(capsys, "sweep", str(path), "--dry-run")
    one_line_error(code, err)
    assert re.search(message, err) and str(path) in err


# -- export defaults ------------------------------------------------------------------------------


def test_csv_leaves_out_series_unless_asked(db, capsys) -> None:
    code, out, _ = run_cli(capsys, "results", str(db), "--format", "csv")
    header = out.splitlines()[0].split(",")
    assert code == 0 and "backlog_series" not in header and "p99_ttft_ms" in header
    assert len(out) < 6000  # two rows of scalars, not thousands of backlog samples
    for extra in (["--all-columns"], ["--columns", "policy,backlog_series"]):
        code, out, _ = run_cli(capsys, "results", str(db), "--format", "csv", *extra)
        assert code == 0 and "backlog_series" in out.splitlines()[0]
    code, out, _ = run_cli(capsys, "results", str(db), "--format", "json")
    assert code == 0 and all("backlog_series" in row for row in json.loads(out))
    code, _, err = run_cli(capsys, "results", str(db), "--all-columns", "--columns", "policy")
    one_line_error(code, err)


def _wide_store(path: Path, memory: bool) -> None:
    """Runs of the paper's systems with the widest numbers a sweep gives (unstable runs: latencies
    of 10^8 ms), over policies x loads x seeds, with and without a KV cache."""
    with Store(path) as store:
        for i, (policy, load, seed) in enumerate(
            (p, x, s) for p in ("fastertransformer", "sarathi") for x in (0.9, 1.1) for s in (0, 1)
        ):
            config = {"policy": {"name": policy}, "budget": 512, "k_max": None, "load": load,
                      "rate": None, "seed": seed, "memory": "tokens=32000" if memory else None}
            result = {
                "policy": policy, "rate": 13.870993260647886 * load, "completed": 20000 - i,
                "request_throughput": 0.5551 + i, "mean_ttft_ms": 1254616.2 * (i + 1),
                "p99_ttft_ms": 140876820.123 + i, "p99_tpot_ms": 12345.678, "mean_e2el_ms": 1519700.151,
                "backlog_slope_tokens_per_s": 378183.5, "stable_predicted": "no guarantee",
                "stable_observed": "inconclusive", "preemptions": 123456 if memory else 0,
                "rejected_requests": 0, "peak_kv_usage": 1.0 if memory else None,
                "backlog_series": [[0.0, 0.0], [1.0, 2.0]],
            }
            store.put(config, result, 1.0, "test")


@pytest.mark.parametrize("memory", [False, True])
def test_the_default_table_fits_120_columns_without_cutting_numbers(tmp_path, capsys, monkeypatch,
                                                                    memory) -> None:
    path = tmp_path / "wide.sqlite"
    _wide_store(path, memory)
    monkeypatch.setattr("llmqueue.cli.sweep._console", lambda: Console(width=120))
    code, out, _ = run_cli(capsys, "results", str(path))
    assert code == 0
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 120
    assert all(f"140,876,82{i}" in out for i in range(8))  # every number whole, no fold, no '…'
    assert "in every run: budget=512, k_max=none" in out  # constant columns, said once
    assert "8 run(s); left out to fit 120 columns: mean_ttft_ms" in out
    assert all(f"{name}" in out for name in ("fastertransformer", "stable_", "observed", "0.900", "1.100"))


def test_a_table_too_wide_even_without_optional_columns_folds_instead_of_cutting() -> None:
    row = {f"metric_number_{i}": 123456789.0 + i for i in range(12)}
    table, left_out = results_table([row], list(row), 80)
    console = Console(width=80, file=io.StringIO())
    console.print(table)
    assert "…" not in console.file.getvalue() and left_out == []


def test_results_on_an_empty_store_say_so(tmp_path, capsys) -> None:
    path = tmp_path / "empty.sqlite"
    with Store(path):
        pass
    code, out, err = run_cli(capsys, "results", str(path))
    assert (code, out, err) == (0, f"no runs in {path}\n", "")
    code, out, _ = run_cli(capsys, "results", str(path), "--where", "rate>1")
    assert code == 0 and out == f"no runs in {path} match --where\n"
