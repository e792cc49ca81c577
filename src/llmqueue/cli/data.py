"""The commands about measured data: ``llmqueue fit`` (batch-time models from iteration times,
the shipped presets), ``llmqueue trace stats|fit`` (request traces), ``llmqueue validate`` (a real
engine's run replayed) and ``llmqueue warmup`` (compile the event loops ahead)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from llmqueue.cli.common import _console, _dump, _finite, _fmt
from llmqueue.errors import ConfigError
from llmqueue.limits import MAX_BATCH_REQUESTS, MAX_BUDGET_TOKENS, MAX_DURATION_S

if TYPE_CHECKING:
    from llmqueue.model.traces import DistFit, RequestTrace, TraceStats
    from llmqueue.model.traces import Summary as TraceSummary


@click.command("fit")
@click.option("--data", "data", default="all", show_default=True,
              help="splitwise | h200 | all (both) | PATH of your own CSV.")
@click.option("--data-dir", "data_dir", default="../shared/data", show_default=True,
              help="Where the named data sets live (the project's shared data).")
@click.option("--columns", default=None,
              help="Your CSV's column names: time_ms=COL,n_tokens=COL,prefill_tokens=COL,...")
@click.option("--where", "where", multiple=True, help="Your CSV: keep rows with COLUMN=VALUE (repeatable).")
@click.option("--plot", "plot_dir", default=None,
              help="Write fit_NAME.png (predicted vs measured, residuals) per data set into this folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--list-presets", "list_presets", is_flag=True,
              help="List the shipped presets (preset:NAME) with their provenance; fit nothing.")
def fit_cmd(data: str, data_dir: str, columns: str | None, where: tuple[str, ...], plot_dir: str | None,
            as_json: bool, list_presets: bool) -> None:
    """Fit batch-time models to measured iteration times and say which fits better."""
    from llmqueue.studies.fit import (
        DATA_SETS,
        FIT_DATE,
        fit_data,
        load_data,
        parse_columns,
        parse_filters,
        plot_fit,
    )

    if list_presets:
        _print_presets(as_json)
        return
    if (columns or where) and data.strip().lower() in (*DATA_SETS, "all"):
        raise ConfigError("columns", columns or list(where), "--columns and --where are for a CSV PATH")
    sets = load_data(data, data_dir, parse_columns(columns), parse_filters(where))
    results = [fit_data(d) for d in sets]
    plots: list[str] = []
    if plot_dir is not None:
        Path(plot_dir).mkdir(parents=True, exist_ok=True)
        plots = [str(plot_fit(r, Path(plot_dir) / f"fit_{r.data.name}.png")) for r in results]
    if as_json:
        _dump({"fitted": FIT_DATE if data.strip().lower() in (*DATA_SETS, "all") else None,
               "data_sets": [r.to_dict() for r in results], "plots": plots})
        return
    console = _console()
    table = Table(show_header=True, header_style="bold")
    for col in ("data set", "samples", "piecewise R^2", "staircase R^2", "linear R^2", "composition R^2",
                "RMSE ms tok/comp", "max rel err tok/comp", "better (adj. R^2)"):
        table.add_column(col, justify="left" if col == "data set" else "right")
    for r in results:
        r2 = {f.kind: f"{f.r_squared:.4f}" for f in r.fits}
        tok, comp = r.best_tokens, r.composition
        table.add_row(r.data.name, str(len(r.data.time_ms)), r2["piecewise"], r2["staircase"], r2["linear"],
                      r2.get("composition", "-"),
                      _pair(tok.rmse_ms, comp.rmse_ms if comp else None, 2),
                      _pair(tok.max_rel_error, comp.max_rel_error if comp else None, 3), r.better.kind)
    console.print(f"least-squares fits of iteration time (ms) to {len(results)} data set(s); "
                  "tok = best token-only fit")
    console.print(table)
    for r in results:
        console.print(f"{r.data.name}: {r.data.source} ({r.data.rows})", soft_wrap=True)
        for f in (r.best_tokens, r.composition):
            if f is not None:
                console.print(f"  {f.kind}: {f.model.spec}", soft_wrap=True)
    for path in plots:
        console.print(f"plot: {path}")


def _pair(tokens: float, composition: float | None, digits: int) -> str:
    """``tokens / composition`` with ``digits`` decimals (just the first without a composition fit)."""
    return f"{tokens:.{digits}f}" + ("" if composition is None else f" / {composition:.{digits}f}")


def _print_presets(as_json: bool) -> None:
    """The shipped presets, with provenance."""
    from llmqueue.model.presets import PRESETS
    from llmqueue.studies.fit import FIT_DATE

    if as_json:
        _dump([p.to_dict() for p in PRESETS.values()])
        return
    console = _console()
    table = Table(show_header=True, header_style="bold")
    for col in ("preset", "kind", "samples", "R^2", "RMSE ms", "max rel err", "better", "data"):
        table.add_column(col, justify="left" if col in ("preset", "kind", "data") else "right")
    sources: dict[str, list[str]] = {}
    for p in PRESETS.values():
        sources.setdefault(f"{p.data}: {p.rows}", []).append(p.name)
        table.add_row(p.name, p.kind, str(p.samples), f"{p.r_squared:.4f}", f"{p.rmse_ms:.2f}",
                      f"{p.max_rel_error:.3f}", "yes" if p.better else "", p.data)
    console.print(f"{len(PRESETS)} presets, fitted {FIT_DATE} by `llmqueue fit` (data under ../shared); "
                  "use as --batch-time preset:NAME; --json adds spec and method")
    console.print(table)
    console.print("rows fitted:")
    for source, names in sources.items():
        console.print(f"  {', '.join(names)}: {source}", soft_wrap=True)


@click.command("warmup")
def warmup_cmd() -> None:
    """Compile the numba event loops now (they compile on first use after an install or upgrade,
    a minute or two on a slow machine), so later runs start at once."""
    from llmqueue.engines import compiled

    if not compiled.available():
        click.echo("numba is not installed: runs use the Python engines, nothing to compile "
                   "(pip install 'llmqueue[fast]' for the compiled one)")
        return
    click.echo("compiling the event loops (cached on disk afterwards)...", err=True)
    from llmqueue.sim.warmup import warm_up  # imports numba and the network simulator

    click.echo(f"compiled event loops ready in {warm_up():.1f} s")



@click.group("trace")
def trace_group() -> None:
    """Request traces (Azure/Vidur CSV, vLLM JSONL log, any CSV): statistics, windows and fitted
    synthetic workloads. SPEC is PATH[,key=value...] as in --arrival trace:SPEC."""


def _load_trace_window(spec: str, window: str | None) -> RequestTrace:
    """The trace of SPEC, cut to --window START:END (seconds of trace time) if given."""
    from llmqueue.model.traces import load_request_trace, parse_window

    trace = load_request_trace(spec, "SPEC")
    if window is None:
        return trace
    start_s, end_s = parse_window(window, "--window")
    return trace.window(start_s, end_s, "--window")


def _summary_row(name: str, s: TraceSummary, digits: int = 1) -> list[str]:
    """One table row of a trace quantity's summary: mean, std, min, p50, p90, p99, max."""
    return [name, _fmt(s.mean, digits), _fmt(s.std, digits), _fmt(s.min, digits), _fmt(s.p50, digits),
            _fmt(s.p90, digits), _fmt(s.p99, digits), _fmt(s.max, digits)]


def _trace_heading(stats: TraceStats) -> str:
    """The trace's one-line description: size, span, rate, burstiness and busiest spell."""
    from llmqueue.model.traces import PEAK_WINDOW_S

    text = f"trace {stats.spec} ({stats.format}): {stats.requests:,} requests"
    if stats.rate_per_s is not None and stats.span_s is not None:
        text += f" over {_fmt(stats.span_s)} s, {stats.rate_per_s:.4g} req/s"
    if stats.interarrival_cv is not None:
        text += f", inter-arrival cv {stats.interarrival_cv:.4g}"
    if stats.peak_rate_per_s is not None and stats.rate_per_s:
        text += (f", busiest {PEAK_WINDOW_S:g} s at {stats.peak_rate_per_s:.4g} req/s "
                 f"({stats.peak_rate_per_s / stats.rate_per_s:.2f}x)")
    return text if stats.rate_per_s is not None else text + " (lengths only)"


@trace_group.command("stats")
@click.argument("spec", metavar="SPEC")
@click.option("--window", default=None, help="Keep arrivals in START:END s of the trace (re-based to 0).")
@click.option("--busiest", "busiest_s", type=_finite(0, MAX_DURATION_S, min_open=True), default=None,
              help="Also find the busiest window of this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def trace_stats_cmd(spec: str, window: str | None, busiest_s: float | None, as_json: bool) -> None:
    """Requests, rate, burstiness, prompt/output length percentiles and their correlation."""
    from llmqueue.model.traces import trace_stats

    trace = _load_trace_window(spec, window)
    stats = trace_stats(trace)
    busiest = None if busiest_s is None else trace.busiest_window(busiest_s)
    if as_json:
        _dump({**stats.to_dict(), "busiest": None if busiest is None else {
            "start_s": busiest.start_s, "end_s": busiest.end_s, "requests": busiest.requests,
            "rate_per_s": busiest.rate_per_s}})
        return
    console = _console()
    console.print(_trace_heading(stats))
    table = Table(show_header=True, header_style="bold")
    for col in ("", "mean", "std", "min", "p50", "p90", "p99", "max"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row(*_summary_row("prompt tokens", stats.prefill))
    table.add_row(*_summary_row("output tokens", stats.decode))
    if stats.gap_ms is not None:
        table.add_row(*_summary_row("inter-arrival ms", stats.gap_ms, 2))
    console.print(table)
    if stats.spearman_rho is not None:
        console.print(f"prompt/output Spearman rho {stats.spearman_rho:.3f}")
    if busiest is not None:
        ratio = f", {busiest.rate_per_s / stats.rate_per_s:.2f}x the mean rate" if stats.rate_per_s else ""
        console.print(f"busiest {busiest_s:g} s: [{_fmt(busiest.start_s, 3)}, {_fmt(busiest.end_s, 3)}) s "
                      f"with {busiest.requests:,} requests ({busiest.rate_per_s:.4g} req/s{ratio}); "
                      f"--window {busiest.start_s!r}:{busiest.end_s!r} keeps it")


def _fit_rows(table: Table, label: str, fit: DistFit, digits: int) -> None:
    """The trace's summary row, then one row per fitted candidate (best first, marked *)."""
    rows = [("trace", "", "", fit.trace)] + [
        (("* " if i == 0 else "  ") + c.method, c.spec, f"{c.ks:.4f}", c.summary)
        for i, c in enumerate(fit.candidates)
    ]
    for i, (method, spec, ks, s) in enumerate(rows):
        table.add_row(label if i == 0 else "", method, spec, ks, _fmt(s.mean, digits), _fmt(s.p50, digits),
                      _fmt(s.p90, digits), _fmt(s.p99, digits))


@trace_group.command("fit")
@click.argument("spec", metavar="SPEC")
@click.option("--window", default=None, help="Keep arrivals in START:END s of the trace (re-based to 0).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def trace_fit_cmd(spec: str, window: str | None, as_json: bool) -> None:
    """Fit arrivals and prompt/output lengths; print the simulate options for a synthetic workload
    with the same statistics (each fit keeps the trace's mean; best KS distance first)."""
    from llmqueue.model.traces import PEAK_WINDOW_S, fit_trace

    fit = fit_trace(_load_trace_window(spec, window))
    if as_json:
        _dump(fit.to_dict())
        return
    console = _console()
    console.print(_trace_heading(fit.stats))
    table = Table(show_header=True, header_style="bold")
    for col in ("quantity", "fit", "spec", "KS", "mean", "p50", "p90", "p99"):
        table.add_column(col, justify="left" if col in ("quantity", "fit", "spec") else "right")
    _fit_rows(table, "prompt tokens", fit.prefill, 1)
    _fit_rows(table, "output tokens", fit.decode, 1)
    if fit.arrival is not None:
        _fit_rows(table, "inter-arrival ms", fit.arrival, 2)
    console.print(table)
    console.print("synthetic workload with these statistics (* = best fit, smallest KS distance):")
    console.print(f"  llmqueue simulate {' '.join(fit.simulate_args())}", soft_wrap=True)
    if fit.arrival is None:
        console.print("  (the trace has no arrival times: give --rate or --load)")
    else:
        best, trace_cv = fit.arrival.best.summary, fit.stats.interarrival_cv
        best_cv = None if best.std is None else best.std / best.mean
        if trace_cv is not None and best_cv is not None and abs(best_cv - trace_cv) > 0.25 * trace_cv:
            console.print(f"note: the best renewal fit has cv {best_cv:.3g}, the trace's gaps {trace_cv:.3g} "
                          "(long idle gaps or a changing rate); replay the trace to keep them")
        peak, rate = fit.stats.peak_rate_per_s, fit.stats.rate_per_s
        if peak is not None and rate:
            console.print(f"note: the busiest {PEAK_WINDOW_S:g} s run at {peak / rate:.2f}x the mean rate; a "
                          "renewal fit has no busy spells: replay the trace or a window of it "
                          "(--arrival trace:SPEC,start=S,end=S) to keep them")
    rho = fit.stats.spearman_rho
    if rho is not None and abs(rho) >= 0.1:
        console.print(f"note: prompt/output Spearman rho {rho:.3f}; independent sampling drops it, "
                      "--prefill trace:SPEC --decode trace:SPEC resample the pairs jointly")
    elif rho is not None:
        console.print(f"prompt/output Spearman rho {rho:.3f}: weak, independent sampling loses little")




@click.command("validate")
@click.argument("run")
@click.option("--profile", "profile_dir", default=None,
              help="Kernel-profile folder (dense/attention/per_sequence CSVs); default: the "
              "profile_tp<N> folder beside the run.")
@click.option("--batch-time", "batch_time", default=None,
              help="Any batch-time spec instead of a profile, e.g. a fitted composition:... model.")
@click.option("--budget", type=click.IntRange(1, MAX_BUDGET_TOKENS), default=None,
              help="max_num_batched_tokens (default: the run's meta.json).")
@click.option("--max-seqs", "max_seqs", type=click.IntRange(1, MAX_BATCH_REQUESTS), default=None,
              help="max_num_seqs (default: the run's meta.json).")
@click.option("--memory", default=None,
              help="KV cache: tokens=M | gpu_gib=..,params_b=..,... | none (default: from the run's "
              "GPU memory and model).")
@click.option("--plot", "plot_dir", default=None, help="Write the three CDF plots (PNG) to this folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def validate_cmd(run: str, profile_dir: str | None, batch_time: str | None, budget: int | None,
                 max_seqs: int | None, memory: str | None, plot_dir: str | None, as_json: bool) -> None:
    """Replay a real vLLM run (folder with requests.jsonl and meta.json, or the JSONL) through the
    simulator and report the error on TTFT, TPOT and E2EL. Exits 0 whatever the errors are."""
    from llmqueue.studies.validate import format_rows, prepare
    from llmqueue.studies.validate import validate as validate_run

    setup = prepare(run, profile=profile_dir, batch_time=batch_time, budget=budget,
                    max_seqs=max_seqs, memory=memory)
    report = validate_run(setup.run_log, setup.batch_time, setup.budget, setup.k_max, setup.memory,
                          notes=setup.notes)
    plots = [str(p) for p in report.plot_cdfs(plot_dir)] if plot_dir is not None else []
    if as_json:
        _dump({**report.to_dict(), "plots": plots})
        return
    console = _console()
    s = report.setting
    console.print(
        f"[bold]{s['policy']}[/]  b={s['budget']}  k_max={s['k_max'] or '-'}  "
        f"memory={s['memory'] or 'unlimited'}  t={s['batch_time']}"
    )
    console.print(f"{s['requests']} requests from {s['run']}: measured over "
                  f"{s['measured_duration_s']:.1f} s, simulated {_fmt(s['simulated_duration_s'])} s")
    table = Table(show_header=True, header_style="bold")
    for name in ("metric", "measured", "simulated", "error"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    for cells in format_rows(report.rows):
        table.add_row(*cells)
    console.print(table)
    m = report.result.metrics
    console.print(f"simulated {m.num_batches} batches of {m.mean_batch_tokens:.1f} tokens on average; "
                  f"KV cache peak {_fmt(100 * m.peak_kv_usage)}%, {m.preemptions} preemption(s)")
    for note in report.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    for path in plots:
        console.print(f"wrote {path}")
