"""``llmqueue simulate`` and ``llmqueue compare``: one engine under one policy, or several
policies on one workload; metrics, stability verdicts and a backlog plot."""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from llmqueue.cli.common import (
    _bar,
    _check_knobs,
    _check_out_path,
    _console,
    _dump,
    _fmt,
    _policy,
    _run_options,
    _shared_options,
    _workload,
)
from llmqueue.policies.fcfs import POLICY_NAMES

if TYPE_CHECKING:
    from llmqueue.model.workload import Workload
    from llmqueue.sim.run import RunResult

COMPARE_DEFAULT = "fastertransformer,vllm,orca,sarathi"


def _run(name: str, workload: Workload, opts: dict[str, Any], keep_requests: bool) -> RunResult:
    """One simulation with a progress bar on a terminal."""
    from llmqueue.sim.run import simulate
    from llmqueue.sim.settings import arrival_limit
    from llmqueue.sim.warmup import compiles_first

    limit = arrival_limit(opts["requests_"], opts["duration_s"], workload)
    show = opts["progress"] if opts["progress"] is not None else sys.stderr.isatty()
    kwargs: dict[str, Any] = dict(
        k_max=opts["k_max"],
        seed=opts["seed"],
        max_requests=limit,
        duration_s=opts["duration_s"],
        drain_s=opts["drain_s"],
        keep_requests=keep_requests,
        engine=opts["engine"],
        memory=opts["memory"],
        goodput=opts.get("goodput"),
        max_concurrency=opts.get("max_concurrency"),
    )
    policy = _policy(name, opts)
    if show and compiles_first(policy, opts["batch_time"], opts["budget"], opts["engine"],
                               opts.get("max_concurrency")):
        click.echo("llmqueue: compiling the event loop (once after an install or upgrade: a minute or "
                   "two; `llmqueue warmup` does it ahead)...", err=True)
    if not show:
        return simulate(workload, policy, opts["batch_time"], opts["budget"], **kwargs)
    with _bar(name, "arrivals", limit, show, cumulative=True) as done:
        return simulate(workload, policy, opts["batch_time"], opts["budget"], progress=done, **kwargs)


def _write_requests(path: str, result: RunResult) -> None:
    """One record per request: CSV or JSON lines by the file's extension (written atomically)."""
    from llmqueue.io.fileio import atomic_write
    from llmqueue.io.store import jsonable

    fields = ("id", "arrival_ms", "first_token_ms", "finish_ms", "prefill_tokens", "decode_tokens")
    rows = [
        {f: jsonable(getattr(r, f)) for f in fields} for r in (result.requests or ())
    ]
    with atomic_write(path, "w", newline="") as out:
        if path.endswith(".csv"):
            writer = csv.DictWriter(out, fieldnames=fields)
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
        else:
            out.writelines(json.dumps(row) + "\n" for row in rows)



@click.command("simulate")
@click.option(
    "--policy", default="sarathi", show_default=True,
    help=f"One of: {', '.join(POLICY_NAMES)} (vllm: vanilla vLLM as of 2023, the paper's, without "
    "chunked prefill; vllm-chunked: current vLLM).",
)
@_shared_options
@click.option(
    "--requests-out", "requests_out", default=None,
    help="Write one record per request to PATH (.csv or .jsonl).",
)
@_run_options
def simulate_cmd(policy: str, requests_out: str | None, **opts: Any) -> None:
    """Simulate one engine under one policy and report metrics and stability."""
    _check_out_path(requests_out, (".csv", ".jsonl"), "--requests-out")
    _check_knobs([policy])
    _policy(policy, opts)  # fail fast on a bad name before any work
    workload = _workload(opts)
    result = _run(policy, workload, opts, keep_requests=requests_out is not None)
    if requests_out is not None:
        _write_requests(requests_out, result)
    if opts["as_json"]:
        _dump(result.to_dict())
        return
    console = _console()
    _print_result(console, result)


def _print_result(console: Console, result: RunResult) -> None:
    """One run: setting, verdicts, latency table, throughput, batches, goodput, KV cache, notes."""
    th, m = result.theory, result.metrics
    console.print(
        f"[bold]{result.policy}[/]  b={result.budget}  k_max={result.k_max or '-'}  "
        f"t(n)={result.batch_time}  rate={result.rate:.4g} req/s  load={th.load:.3f}  "
        f"lambda*={th.critical_rate:.4g} req/s"
    )
    console.print(
        f"stability: predicted [bold]{result.predicted.verdict}[/] ({result.predicted.reason}); "
        f"observed [bold]{result.observed.verdict}[/] (backlog slope "
        f"{_fmt(result.observed.slope_tokens_per_s)} tokens/s, 95% CI "
        f"[{_fmt(result.observed.ci_low_tokens_per_s)}, "
        f"{_fmt(result.observed.ci_high_tokens_per_s)}]; fluid "
        f"{_fmt(th.fluid_slope_tokens_per_s)})"
    )
    table = Table(show_header=True, header_style="bold")
    table.add_column("metric")
    for label in ("mean", "median", "p90", "p99"):
        table.add_column(label, justify="right")
    for name in ("ttft", "tpot", "itl", "e2el"):
        table.add_row(
            f"{name}_ms",
            *(_fmt(m.latency[f"{label}_{name}_ms"]) for label in ("mean", "median", "p90", "p99")),
        )
    console.print(table)
    console.print(
        f"completed {m.completed}/{m.arrivals} in {m.duration_s:,.1f} s: "
        f"{m.request_throughput:.3f} req/s, {m.output_throughput:,.1f} output tokens/s, "
        f"{m.total_token_throughput:,.1f} tokens/s; mean backlog {m.mean_backlog_tokens:,.0f} "
        f"tokens, {m.mean_requests_in_system:,.1f} requests in system"
    )
    console.print(
        f"batches {m.num_batches}: mean {m.mean_batch_tokens:.1f} tokens "
        f"({m.mean_batch_prefill_tokens:.1f} prefill + {m.mean_batch_decode_tokens:.1f} decode), "
        f"{m.mean_batch_requests:.1f} requests; busy {m.busy_fraction:.1%}; "
        f"work-conservation violations {m.wc_violations} "
        f"({m.wc_wasted_fraction:.1%} of fillable tokens wasted)"
    )
    if m.good_requests is not None:
        console.print(
            f"request_goodput {m.request_goodput:.3f} req/s: {m.good_requests:,} of {m.completed:,} "
            "completed requests met every --goodput target"
        )
    if math.isfinite(m.peak_kv_usage):
        console.print(
            f"KV cache: peak {m.peak_kv_usage:.1%}, mean {m.mean_kv_usage:.1%} of blocks held at "
            f"batch starts; {m.preemptions} preemptions, {m.recomputed_tokens:,} tokens "
            f"recomputed, {m.rejected_requests} requests refused"
        )
    for note in result.notes:
        console.print(f"note: {note}", markup=False, highlight=False)



@click.command("compare")
@click.option(
    "--policies", default=COMPARE_DEFAULT, show_default=True,
    help=f"Comma-separated policy names: {', '.join(POLICY_NAMES)} (vllm is vanilla vLLM as of 2023; "
    "vllm-chunked is current vLLM).",
)
@_shared_options
@click.option(
    "--plot", "plot_path", default="compare.png", show_default=True,
    help="PNG of the backlog over time ('' for none).",
)
@_run_options
def compare_cmd(policies: str, plot_path: str, **opts: Any) -> None:
    """Several policies on one workload: a table, and a PNG of backlog over time."""
    names = [p.strip() for p in policies.split(",") if p.strip()]
    if not names:
        raise click.BadParameter("no policy named", param_hint="--policies")
    _check_knobs(names)
    for name in names:
        _policy(name, opts)
    if plot_path:
        _check_out_path(plot_path, (".png",), "--plot")
    workload = _workload(opts)
    results = [_run(name, workload, opts, keep_requests=False) for name in names]
    if plot_path:
        _plot(results, plot_path)
    if opts["as_json"]:
        _dump([r.to_dict() for r in results])
        return
    console = _console()
    first = results[0]
    console.print(
        f"b={first.budget}  k_max={first.k_max or '-'}  t(n)={first.batch_time}  "
        f"rate={first.rate:.4g} req/s  load={first.theory.load:.3f}  "
        f"lambda*={first.theory.critical_rate:.4g} req/s"
    )
    console.print(_compare_table(results))
    for line in _compare_notes(results):
        console.print(line, soft_wrap=True, markup=False, highlight=False)
    if plot_path:
        console.print(f"backlog plot: {plot_path}")


_POLICY_LABELS = {"vllm": "vllm (2023)", "vllm-chunked": "vllm-chunked"}


def _compare_table(results: Sequence[RunResult]) -> Table:
    """Metrics as rows, one column per policy: fits a normal terminal for up to about six policies."""
    table = Table(show_header=True, header_style="bold")
    table.add_column("metric")
    for r in results:
        table.add_column(_POLICY_LABELS.get(r.policy, r.policy), justify="right")

    def row(label: str, cells: Sequence[str]) -> None:
        table.add_row(label, *cells)

    ms = [r.metrics for r in results]
    row("completed", [f"{m.completed}/{m.arrivals}" for m in ms])
    row("request_throughput", [_fmt(m.request_throughput, 2) for m in ms])
    if any(m.good_requests is not None for m in ms):
        row("request_goodput", [_fmt(m.request_goodput, 2) for m in ms])
    for key in ("mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_e2el_ms", "p99_e2el_ms"):
        row(key, [_fmt(m.latency[key]) for m in ms])
    row("mean_backlog_tokens", [_fmt(m.mean_backlog_tokens, 0) for m in ms])
    row("backlog slope tok/s", [_fmt(r.observed.slope_tokens_per_s) for r in results])
    row("predicted", [r.predicted.verdict for r in results])
    row("observed", [r.observed.verdict for r in results])
    row("WC violations", [f"{m.wc_violations:,}" for m in ms])
    if any(math.isfinite(m.peak_kv_usage) for m in ms):
        row("preemptions", [f"{m.preemptions:,}" for m in ms])
    return table


def _same_run(a: RunResult, b: RunResult) -> bool:
    """Whether two policies produced the same run (metrics equal, NaN equal to NaN)."""
    da, db = a.metrics.as_dict(), b.metrics.as_dict()
    return da.keys() == db.keys() and all(
        x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
        for x, y in zip(da.values(), db.values(), strict=True)
    )


def _compare_notes(results: Sequence[RunResult]) -> list[str]:
    """Every run's notes (a note all runs share, once), identical schedules, and what 'vllm' is."""
    lines: list[str] = []
    shared = set.intersection(*(set(r.notes) for r in results)) if results else set()
    lines += [f"note: {n}" for n in results[0].notes if n in shared]
    for r in results:
        lines += [f"note [{r.policy}]: {n}" for n in r.notes if n not in shared]
    for i, a in enumerate(results):
        for b in results[i + 1:]:
            if a.policy != b.policy and _same_run(a, b):
                pair = {a.policy, b.policy}
                why = (": with one token budget and k_max, current vLLM's chunked prefill is "
                       "Sarathi-Serve's batching" if pair == {"sarathi", "vllm-chunked"} else "")
                lines.append(f"note: {a.policy} and {b.policy} ran the same schedule here "
                             f"(identical runs{why})")
    if any(r.policy == "vllm" for r in results):
        lines.append("note: vllm is vanilla vLLM as of 2023 (the paper's: prefill first, whole prompts, no "
                     "mixed batches); vllm-chunked is current vLLM with chunked prefill")
    return lines



def _plot(results: Sequence[RunResult], path: str) -> None:
    """The backlog of every run over time, one line per policy, saved as a PNG at ``path``."""
    from llmqueue.io.plotting import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        series = r.metrics.backlog_series
        ax.plot(
            [t for t, _ in series], [b for _, b in series],
            label=f"{r.policy} ({r.observed.verdict})",
        )
    first = results[0]
    ax.set_xlabel("time (s)")
    ax.set_ylabel("backlog (unprocessed tokens)")
    ax.set_title(
        f"b={first.budget}, load {first.theory.load:.2f} of lambda*={first.theory.critical_rate:.3g}"
        f" req/s, {first.batch_time}",
        fontsize=9,
    )
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, path)
