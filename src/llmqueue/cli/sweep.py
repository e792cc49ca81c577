"""``llmqueue sweep`` and ``llmqueue results``: grids of runs stored as they finish (resumable,
shared between sweeps on one file), and queries and exports of what is stored."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from llmqueue.cli.common import _console, _dump, _finite, _stderr
from llmqueue.io.store import LOCK_TIMEOUT_S
from llmqueue.limits import MAX_WORKERS

SWEEP_COLUMNS = (
    "policy", "budget", "k_max", "rate", "load", "seed", "completed", "request_throughput",
    "mean_ttft_ms", "p99_ttft_ms", "p99_tpot_ms", "mean_e2el_ms", "backlog_slope_tokens_per_s",
    "stable_predicted", "stable_observed",
)
# added to the default table (with "memory" after k_max) when some run has a KV cache
SWEEP_MEMORY_COLUMNS = ("preemptions", "rejected_requests", "peak_kv_usage")


def _sweep_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The default table's columns: the summary set, and memory's where some run had a KV cache."""
    if not any(row.get("memory") is not None for row in rows):
        return list(SWEEP_COLUMNS)
    at = SWEEP_COLUMNS.index("k_max") + 1
    return [*SWEEP_COLUMNS[:at], "memory", *SWEEP_COLUMNS[at:], *SWEEP_MEMORY_COLUMNS]


@click.command("sweep")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--db", "db_path", default=None,
              help="Results file (SQLite; default: CONFIG with the suffix .sqlite).")
@click.option("--workers", type=click.IntRange(min=1, max=MAX_WORKERS), default=None,
              help=f"Local worker processes, at most {MAX_WORKERS:,} (default: the number of CPUs).")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: run on a Ray cluster (pip install 'llmqueue[ray]').")
@click.option("--ray-address", "ray_address", default=None,
              help="Ray cluster address, with --backend ray (default: $RAY_ADDRESS, else a local Ray).")
@click.option("--lock-timeout", "lock_timeout_s", type=_finite(0, 1e6),
              default=LOCK_TIMEOUT_S, show_default=True,
              help="Seconds a write waits in all for another writer's lock; then the sweep stops and "
                   "saves its finished runs to a side file the next sweep imports (exit code 2).")
@click.option("--dry-run", "dry_run", is_flag=True,
              help="Validate and count the runs; run none (the results file is only read).")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON object.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar with ETA (default: on when stderr is a terminal).")
def sweep_cmd(config_path: str, db_path: str | None, workers: int | None, backend: str,
              ray_address: str | None, lock_timeout_s: float, dry_run: bool, as_json: bool,
              progress: bool | None) -> None:
    """Run a grid of simulations from a config file; every finished run is stored at once.

    Rerunning the same command resumes: runs already in the results file are skipped. Two sweeps
    on one file share the work (each run runs once). Ctrl-C exits with code 130, SIGTERM with 143;
    finished runs are stored either way.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from llmqueue.io.store import Store
    from llmqueue.studies.sweep import load_config as load_sweep
    from llmqueue.studies.sweep import plan_sweep, run_sweep

    if ray_address is not None and backend != "ray":
        raise click.UsageError("--ray-address needs --backend ray")
    config = load_sweep(config_path)
    path = Path(db_path) if db_path else Path(config_path).with_suffix(".sqlite")
    workers = workers or min(os.cpu_count() or 1, MAX_WORKERS)
    show = progress if progress is not None else sys.stderr.isatty()
    if dry_run:
        plan = plan_sweep(config, path)
        dropped = f" ({plan.duplicates} duplicates dropped)" if plan.duplicates else ""
        doc = {"runs": plan.total, "already_stored": plan.already_done, "to_run": plan.to_run,
               "duplicates_dropped": plan.duplicates, "db": str(path)}
        _dump(doc) if as_json else click.echo(
            f"{plan.total} runs{dropped}: {plan.already_done} already in {path}, {plan.to_run} to run"
        )
        return
    with Store(path, lock_timeout_s=lock_timeout_s) as store:
        bar = Progress(
            TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), console=_stderr(show),
            transient=True, disable=not show,
        )
        with bar:
            task = bar.add_task("sweep", total=None)

            def start(total: int, todo: int) -> None:
                bar.update(task, total=todo)

            outcome = run_sweep(
                config, store, workers=workers, backend=backend,  # type: ignore[arg-type]
                ray_address=ray_address, on_start=start,
                on_done=lambda run, result: bar.advance(task),
            )
    doc = {
        "runs": outcome.total, "already_stored": outcome.already_done, "ran": outcome.ran,
        "skipped": outcome.skipped, "duplicates_dropped": outcome.duplicates,
        "interrupted": outcome.interrupted, "wall_s": outcome.wall_s, "db": str(path),
    }
    if as_json:
        _dump(doc)
    else:
        dropped = f" ({outcome.duplicates} duplicates dropped)" if outcome.duplicates else ""
        skipped = f", {outcome.skipped} left to another sweep on this file" if outcome.skipped else ""
        click.echo(
            f"{outcome.total} runs{dropped}: {outcome.already_done} already stored, {outcome.ran} ran "
            f"in {outcome.wall_s:.1f} s{skipped}; results in {path} (llmqueue results {path})"
        )
    if outcome.interrupted:
        click.echo("llmqueue: interrupted: finished runs are stored; rerun to resume", err=True)
        raise click.exceptions.Exit(128 + (outcome.signal or 2))


@click.command("results")
@click.argument("db_path", metavar="DB", type=click.Path(dir_okay=False))
@click.option("--where", "where", multiple=True,
              help="Filter: field=value, field!=value, field<value, field>value (repeatable).")
@click.option("--columns", default=None,
              help="Comma-separated fields (default: a summary set for the table; every field but "
                   "series such as backlog_series for csv; every field for json).")
@click.option("--all-columns", "all_columns", is_flag=True,
              help="Every field, series included (csv), every column (table).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
@click.option("--out", "out_path", default=None,
              help="Write to this file (replaced whole, never left half-written) instead of stdout.")
def results_cmd(db_path: str, where: tuple[str, ...], columns: str | None, all_columns: bool, fmt: str,
                out_path: str | None) -> None:
    """Query and export the runs stored by `llmqueue sweep` (the file is only read)."""
    from llmqueue.io.fileio import atomic_write_text
    from llmqueue.io.store import (
        Store,
        constant_columns,
        parse_where,
        results_table,
        select,
        table_cell,
        to_csv,
        to_json,
        without_series,
    )

    if columns and all_columns:
        raise click.UsageError("give --columns or --all-columns, not both")
    clauses = parse_where(where)
    chosen = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    with Store(db_path, readonly=True) as store:
        rows = select(store.rows(), clauses, chosen)
    summary = chosen is None and not all_columns and fmt == "table"
    if summary:
        chosen = _sweep_columns(rows)
    elif chosen is None and fmt == "table":
        chosen = list(dict.fromkeys(name for row in rows for name in row))
    if fmt == "csv":
        text = to_csv(rows if chosen or all_columns else without_series(rows))
    elif fmt == "json":
        text = to_json(rows)
    elif not rows:
        text = f"no runs in {db_path}" + (" match --where" if clauses else "") + "\n"
    else:
        names = chosen or []
        hideable = [n for n in ("budget", "k_max", "memory", "seed") if n in names] if summary else []
        same = constant_columns(rows, hideable)  # shown once above the table
        console = _console() if out_path is None else Console(file=io.StringIO(), width=250)
        table, left_out = results_table(
            rows, [n for n in names if n not in same], console.width,
            droppable=("mean_ttft_ms", "completed", "rate", "mean_e2el_ms", "rejected_requests",
                       "peak_kv_usage", "p99_tpot_ms", "preemptions") if summary else (),
        )
        if same:
            console.print("in every run: " + ", ".join(
                f"{k}={'none' if v is None else table_cell(v)}" for k, v in same.items()), soft_wrap=True)
        console.print(table)
        note = f"; left out to fit {console.width} columns: {', '.join(left_out)}" if left_out else ""
        console.print(f"{len(rows)} run(s){note}", soft_wrap=True)
        if out_path is not None:
            atomic_write_text(out_path, console.file.getvalue())  # type: ignore[attr-defined]
        return
    if out_path is None:
        click.echo(text, nl=False)
    else:
        atomic_write_text(out_path, text)
