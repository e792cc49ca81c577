"""The ``llmqueue`` command line: ``simulate``, ``capacity``, ``compare``, ``sweep``, ``results``,
``region``, ``reproduce``, ``network analyze|simulate``, ``fit``, ``trace stats|fit`` and ``validate``.

Every option can also come from a TOML or YAML file given with ``--config`` (keys are the option
names; flags on the command line win). Bad input exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from llmqueue.engines import compiled
from llmqueue.engines.metrics import parse_goodput
from llmqueue.errors import ConfigError, LLMQueueError
from llmqueue.io.configfile import read_table
from llmqueue.io.fileio import atomic_write, atomic_write_text
from llmqueue.io.plotting import pyplot, save
from llmqueue.io.store import (
    LOCK_TIMEOUT_S,
    Store,
    constant_columns,
    jsonable,
    parse_where,
    results_table,
    select,
    table_cell,
    to_csv,
    to_json,
    without_series,
)
from llmqueue.limits import (
    MAX_BATCH_REQUESTS,
    MAX_BUDGET_TOKENS,
    MAX_DURATION_S,
    MAX_LOAD,
    MAX_RATE_PER_S,
    MAX_REQUESTS,
    MAX_SCALE,
    MAX_SEED,
    MAX_SEEDS,
    MAX_TIME_MS,
    MAX_WORKERS,
    MIN_RATE_PER_S,
    MIN_TOLERANCE,
)
from llmqueue.model.batchtime import BatchTime, is_shape_model, mix_batch_time, parse_batch_time
from llmqueue.model.memory import KVCache, parse_memory
from llmqueue.model.network import Network, load_network
from llmqueue.model.presets import PRESETS
from llmqueue.model.traces import (
    PEAK_WINDOW_S,
    DistFit,
    RequestTrace,
    TraceStats,
    fit_trace,
    load_request_trace,
    parse_window,
    trace_stats,
)
from llmqueue.model.traces import Summary as TraceSummary
from llmqueue.model.workload import TraceArrivals, Workload
from llmqueue.paper.realfig1 import reproduce_real
from llmqueue.paper.reproduce import TARGETS, reproduce
from llmqueue.policies.fcfs import KFCFS, POLICY_NAMES, VLLMChunked, make_policy
from llmqueue.sim.network import NetworkResult, predict_network, simulate_network
from llmqueue.sim.run import RunResult, simulate, summarize_theory
from llmqueue.sim.settings import (
    DEFAULT_BATCH_TIME,
    DEFAULT_BUDGET,
    DEFAULT_DECODE,
    DEFAULT_LOAD,
    DEFAULT_PREFILL,
    DEFAULT_REQUESTS,
    default_sizes,
    resolve_workload,
)
from llmqueue.studies.fit import (
    DATA_SETS,
    FIT_DATE,
    fit_data,
    load_data,
    parse_columns,
    parse_filters,
    plot_fit,
)
from llmqueue.studies.saturation import DEFAULT_REQUESTS as SATURATION_REQUESTS
from llmqueue.studies.saturation import MIN_REQUESTS as SATURATION_MIN_REQUESTS
from llmqueue.studies.saturation import SaturationResult, saturated_throughput_for
from llmqueue.studies.slo import (
    best_budget_for_slo,
    is_deterministic,
    max_rate_under_slo,
    max_steps,
    parse_slo,
)
from llmqueue.studies.slo import claim as slo_claim
from llmqueue.studies.sweep import load_config as load_sweep
from llmqueue.studies.sweep import plan_sweep, run_sweep
from llmqueue.studies.validate import format_rows, prepare
from llmqueue.studies.validate import validate as validate_run
from llmqueue.theory import capacity as theory
from llmqueue.theory.network import Analysis
from llmqueue.theory.network import analyze as analyze_network
from llmqueue.theory.region import OperatingPoint, plot_region, region

COMPARE_DEFAULT = "fastertransformer,vllm,orca,sarathi"


# -- option parsing helpers ------------------------------------------------------------------


class _FiniteRange(click.FloatRange):
    """A float range that also refuses nan and inf (click's FloatRange lets nan through)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


def _finite(low: float, high: float, *, min_open: bool = False, max_open: bool = False) -> _FiniteRange:
    """A finite float in [low, high] (open ends as asked): every float option's bounds."""
    return _FiniteRange(low, high, min_open=min_open, max_open=max_open)


def _batch_time(ctx: click.Context, param: click.Parameter, value: str) -> BatchTime:
    try:
        return parse_batch_time(value)
    except LLMQueueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None


def _memory(ctx: click.Context, param: click.Parameter, value: str | None) -> KVCache | None:
    if value is None:
        return None
    try:
        return parse_memory(value)
    except LLMQueueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None


def _saturation_requests(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if 0 < value < SATURATION_MIN_REQUESTS:
        raise click.BadParameter(f"must be 0 (skip) or >= {SATURATION_MIN_REQUESTS} (got {value})",
                                 ctx=ctx, param=param)
    return value


def _token_time(opts: dict[str, Any], mean_prefill: float, mean_decode: float) -> BatchTime:
    """The token-count model the theory uses (a composition model's view of this mix)."""
    return mix_batch_time(opts["batch_time"], mean_prefill, mean_decode)


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Read a TOML/YAML file into the command's defaults (eager: before the other options)."""
    if value is None:
        return
    try:
        data = read_table(value, "config")
    except ConfigError as err:
        raise click.BadParameter(f"{value!r} {err.problem}", ctx, param) from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value!r} must hold a table of option = value", ctx, param)
    # keys are the long option names (``load``, ``json``, ``requests``), not the Python names
    names = {
        opt[2:].replace("-", "_"): p.name
        for p in ctx.command.params
        if isinstance(p, click.Option) and p.name and p.name != "config"
        for opt in p.opts
        if opt.startswith("--")
    }
    params = {p.name: p for p in ctx.command.params if isinstance(p, click.Option)}
    defaults: dict[str, Any] = {}
    for key, item in data.items():
        name = names.get(str(key).replace("-", "_"))
        if name is None:
            raise click.BadParameter(f"unknown key {key!r} in {value!r}", ctx, param)
        defaults[name] = _config_value(params[name], key, item, value, ctx, param)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def _config_value(option: click.Option, key: object, item: Any, path: str, ctx: click.Context,
                  param: click.Parameter) -> Any:
    """A config file's value for ``option``, checked against the option's kind: an integer key
    refuses 1.5 (no silent truncation), a flag wants true/false, a number wants a number; lists
    become comma-separated text. The option's own range checks run afterwards, as for a flag."""
    def bad(problem: str) -> click.BadParameter:
        return click.BadParameter(f"key {key!r} in {path!r} {problem} (got {item!r})", ctx, param)

    if option.is_flag:
        if not isinstance(item, bool):
            raise bad("must be true or false")
        return item
    if isinstance(item, bool):
        raise bad("must not be true/false")
    if isinstance(option.type, click.types.IntParamType):
        if isinstance(item, float) and math.isfinite(item) and item.is_integer():
            item = int(item)
        if isinstance(item, str):
            try:
                item = int(item.strip())
            except ValueError:
                raise bad("must be an integer") from None
        if not isinstance(item, int):
            raise bad("must be an integer")
        return item
    if isinstance(option.type, click.types.FloatParamType):
        if isinstance(item, str):
            try:
                item = float(item.strip())
            except ValueError:
                raise bad("must be a number") from None
        if not isinstance(item, int | float) or not math.isfinite(item):
            raise bad("must be a finite number")
        return item
    if isinstance(item, list):
        if not all(isinstance(x, str | int | float) and not isinstance(x, bool) for x in item):
            raise bad("must be a list of numbers or names")
        return ",".join(str(x) for x in item)
    if isinstance(item, dict | list) or item is None:
        raise bad("must be a single value")
    return str(item) if not isinstance(item, str) else item


def _shared_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options every command takes: the engine and the workload."""
    options = [
        click.option(
            "--config",
            type=click.Path(dir_okay=False),
            callback=_load_config,
            is_eager=True,
            expose_value=False,
            help="TOML or YAML file of option values (flags override it).",
        ),
        click.option(
            "--budget", "--max-num-batched-tokens", "budget", type=click.IntRange(1, MAX_BUDGET_TOKENS),
            default=DEFAULT_BUDGET, show_default=True,
            help="Token budget b per batch (vllm-chunked: max_num_batched_tokens).",
        ),
        click.option(
            "--k-max", "--max-num-seqs", "k_max", type=click.IntRange(1, MAX_BATCH_REQUESTS), default=None,
            help="At most this many requests per batch (vllm-chunked: max_num_seqs).",
        ),
        click.option(
            "--batch-time", "batch_time", default=DEFAULT_BATCH_TIME, show_default=True,
            callback=_batch_time,
            help="t(n) in ms: constant:c=..  linear:c=..,a=..  piecewise:c=..,a=..,b0=..  "
            "staircase:c=..,a=..,b0=..  table:PATH[,column=value...]  preset:NAME (llmqueue fit "
            "--list-presets)",
        ),
        click.option(
            "--memory", default=None, callback=_memory,
            help="KV cache: tokens=M[,block=16,watermark=0.01] or gpu_gib=..,params_b=..,layers=..,"
            "kv_heads=..,head_dim=..[,dtype_bytes=2,tp=1,util=0.9] (default: unlimited).",
        ),
        click.option(
            "--rate", "--request-rate", "rate", type=_finite(MIN_RATE_PER_S, MAX_RATE_PER_S), default=None,
            help="Arrival rate, requests/s (a trace is time-scaled to it).",
        ),
        click.option(
            "--load", "load_", type=_finite(0, MAX_LOAD, min_open=True), default=None,
            help=f"Arrival rate as a fraction of the critical rate lambda* "
            f"(default {DEFAULT_LOAD} when neither --rate nor a trace sets the rate).",
        ),
        click.option(
            "--arrival", default="poisson", show_default=True,
            help="poisson | deterministic | gamma:cv=2 | trace:PATH[,key=value...] (docs/guide/traces.md)",
        ),
        click.option(
            "--prefill", default=None,
            help=f"Prompt tokens: N | poisson:M | geometric:M | uniform:LO,HI | "
            f"lognormal:mean=..,sigma=.. | trace:PATH (default {DEFAULT_PREFILL}, "
            "or the trace's own with trace arrivals).",
        ),
        click.option(
            "--decode", default=None,
            help=f"Output tokens, same forms as --prefill (default {DEFAULT_DECODE}).",
        ),
        click.option(
            "--requests", "--num-prompts", "requests_", type=click.IntRange(1, MAX_REQUESTS), default=None,
            help=f"Number of arrivals (default {DEFAULT_REQUESTS} unless --duration-s or a trace "
            "bounds them).",
        ),
        click.option(
            "--duration-s", "duration_s", type=_finite(0, MAX_DURATION_S, min_open=True),
            default=None, help="Arrivals stop at this simulated time (s).",
        ),
        click.option(
            "--drain-s", "drain_s", type=_finite(0, MAX_DURATION_S), default=None,
            help="After the last arrival, run at most this long (default: as long as the "
            "arrival window, at least 60 s).",
        ),
        click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
                     help="Random seed."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document."),
        click.option(
            "--priority", type=click.Choice(["prefill", "decode"]), default="decode",
            show_default=True, help="kfcfs: which phase goes first.",
        ),
        click.option("--mixed/--no-mixed", default=True, help="kfcfs: mixed batches."),
        click.option("--chunked/--no-chunked", default=True, help="kfcfs: chunked prefill."),
        click.option("--k-p", "k_p", type=click.IntRange(1, MAX_BATCH_REQUESTS), default=None,
                     help="kfcfs: at most K_p prompts per batch."),
        click.option("--k-d", "k_d", type=click.IntRange(1, MAX_BATCH_REQUESTS), default=None,
                     help="kfcfs: at most K_d decoders per batch."),
        click.option("--progress/--no-progress", default=None,
                     help="Progress bar (default: on when stderr is a terminal)."),
        click.option(
            "--engine", type=click.Choice(["auto", "compiled", "fast", "reference"]), default="auto",
            show_default=True,
            help="compiled: the numba event loop (shipped policies, the 'fast' extra); fast: the "
            "same in Python; reference: every iteration (all give the same results); auto: the "
            "fastest the policy allows.",
        ),
    ]
    return _decorated(func, options)


def _decorated(func: Callable[..., Any], options: list[Callable[..., Any]]) -> Callable[..., Any]:
    """``func`` with these click options, listed in ``--help`` in this order."""
    for option in reversed(options):
        func = option(func)
    return func


def _goodput(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, float] | None:
    if value is None:
        return None
    try:
        return parse_goodput(value)
    except LLMQueueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None


def _run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options of the commands that simulate a workload as a benchmark client would send it."""
    options = [
        click.option(
            "--goodput", default=None, callback=_goodput,
            help="Latency targets in ms, e.g. ttft:500,tpot:50 (keys ttft, tpot, e2el): also report "
            "request_goodput, the completed requests per second meeting all of them "
            "(vllm bench serve --goodput).",
        ),
        click.option(
            "--max-concurrency", "max_concurrency", type=click.IntRange(1, MAX_BATCH_REQUESTS),
            default=None,
            help="At most this many requests in the engine; later arrivals wait at the client and "
            "are sent as requests finish (vllm bench serve --max-concurrency; latencies count "
            "from the send). Runs on the Python engines.",
        ),
    ]
    return _decorated(func, options)


def _workload(opts: dict[str, Any]) -> Workload:
    """Build the workload; ``--load`` is turned into a rate against lambda* of the setting."""
    rate, load = opts["rate"], opts["load_"]
    ctx = click.get_current_context(silent=True)
    if rate is not None and load is not None and ctx is not None:
        # a flag on the command line wins over the other one coming from --config
        from_config = {
            name: ctx.get_parameter_source(name) is click.core.ParameterSource.DEFAULT_MAP
            for name in ("rate", "load_")
        }
        if from_config["rate"] and not from_config["load_"]:
            rate = None
        elif from_config["load_"] and not from_config["rate"]:
            load = None
    if rate is not None and load is not None:
        raise click.UsageError(
            f"give --rate or --load, not both (got --rate {rate:g} --load {load:g})"
        )
    return resolve_workload(opts["arrival"], opts["prefill"], opts["decode"], rate=rate, load=load,
                            batch_time=opts["batch_time"], budget=opts["budget"],
                            max_requests=opts["requests_"])


_KFCFS_KNOBS = ("priority", "mixed", "chunked", "k_p", "k_d")


def _given(name: str) -> bool:
    """Whether the option ``name`` was set by the user (command line, config file or environment)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return False
    return ctx.get_parameter_source(name) in (
        click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT,
        click.core.ParameterSource.DEFAULT_MAP,  # a --config file
    )


def _check_knobs(names: Sequence[str]) -> None:
    """Refuse kfcfs knobs when no named policy is kfcfs: they would be silently ignored."""
    if any(n.strip().lower().replace("_", "-") in ("kfcfs", "k-fcfs") for n in names):
        return
    for knob in _KFCFS_KNOBS:
        if _given(knob):
            flag = "--" + knob.replace("_", "-")
            raise click.UsageError(
                f"{flag} is a kfcfs knob; policy {', '.join(names)} ignores it (use --policy kfcfs)"
            )


def _policy(name: str, opts: dict[str, Any]) -> KFCFS | VLLMChunked:
    return make_policy(
        name,
        priority=opts["priority"],
        mixed=opts["mixed"],
        chunked=opts["chunked"],
        k_p=opts["k_p"],
        k_d=opts["k_d"],
    )


def _run(name: str, workload: Workload, opts: dict[str, Any], keep_requests: bool) -> RunResult:
    """One simulation with a progress bar on a terminal."""
    limit = opts["requests_"]
    if limit is None and opts["duration_s"] is None and not isinstance(
        workload.arrival, TraceArrivals
    ):
        limit = DEFAULT_REQUESTS
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
    compiles = (opts["engine"] in ("auto", "compiled") and opts.get("max_concurrency") is None
                and not is_shape_model(opts["batch_time"])
                and compiled.supports(policy, opts["budget"], keep_batches=False))
    if show and compiles and compiled.needs_compiling():
        click.echo("llmqueue: compiling the event loop (once after an install or upgrade: a minute or "
                   "two; `llmqueue warmup` does it ahead)...", err=True)
    if not show:
        return simulate(workload, policy, opts["batch_time"], opts["budget"], **kwargs)
    with Progress(
        TextColumn(f"{name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("arrivals"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(name, total=limit)
        return simulate(
            workload,
            policy,
            opts["batch_time"],
            opts["budget"],
            progress=lambda n: bar.update(task, completed=n),
            **kwargs,
        )


def _stderr(show: bool) -> Console:
    """The progress bars' console: quiet when the bar is off (rich 13.0, our lower bound, still
    ends a disabled bar with an empty line)."""
    return Console(stderr=True, quiet=not show)


@contextlib.contextmanager
def _bar(label: str, unit: str, total: int | None, show: bool | None) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr (default: when stderr is a terminal); yields ``advance(n)``."""
    show = show if show is not None else sys.stderr.isatty()
    progress = Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(),
        console=_stderr(show), transient=True, disable=not show,
    )
    with progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


def _dump(document: Any) -> None:
    click.echo(json.dumps(jsonable(document), allow_nan=False))


def _console() -> Console:
    """stdout console; when piped, wide enough that tables are not cut to 80 columns (200, or
    $COLUMNS when set)."""
    console = Console()
    if console.is_terminal:
        return console
    columns = os.environ.get("COLUMNS", "")
    return Console(width=int(columns) if columns.isdigit() and int(columns) >= 40 else 200)


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def _write_requests(path: str, result: RunResult) -> None:
    """One record per request: CSV or JSON lines by the file's extension (written atomically)."""
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


def _check_out_path(value: str | None, suffixes: Sequence[str], option: str) -> None:
    """Check an output file before any work: its suffix, and that it can be written there."""
    if value is None:
        return
    if not value.endswith(tuple(suffixes)):
        raise click.BadParameter(
            f"{value!r} must end in {' or '.join(suffixes)}", param_hint=option
        )
    _check_writable(value, option)


def _check_writable(value: str, option: str, folder: bool = False) -> None:
    """Refuse an output path that cannot be written (before a long run, not after it)."""
    path = Path(value)
    if folder:
        if path.exists() and not path.is_dir():
            raise click.BadParameter(f"{value!r} exists and is not a folder", param_hint=option)
        parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    else:
        if path.is_dir():
            raise click.BadParameter(f"{value!r} is a folder, not a file", param_hint=option)
        parent = path.parent
        if not parent.is_dir():
            raise click.BadParameter(f"folder {str(parent)!r} does not exist", param_hint=option)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise click.BadParameter(f"cannot write in {str(parent)!r}", param_hint=option)


# -- commands --------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="llmqueue")
def cli() -> None:
    """Queueing theory of LLM serving: capacity, stability and latency of batch schedulers."""


@cli.command("simulate")
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


@cli.command("capacity")
@_shared_options
@click.option(
    "--max-iteration-ms", "max_iteration_ms", type=_finite(0, MAX_TIME_MS, min_open=True),
    default=None, help="Also find the budget with the best b/t(b) under this iteration-time cap.",
)
@click.option("--slo", default=None,
              help="Latency targets in ms, e.g. p99_ttft_ms=500,p99_tpot_ms=50: find the highest "
              "rate that is stable and meets them (simulation, replicated seeds).")
@click.option("--policies", default="sarathi", show_default=True,
              help="With --slo: comma-separated policies to search.")
@click.option("--budgets", default=None,
              help="With --slo: comma-separated budgets to search (default: --budget).")
@click.option("--best-budget", "best_budget", is_flag=True,
              help="With --slo: at the given --rate/--load, pick the best of --budgets instead.")
@click.option("--slo-seeds", "slo_seeds", type=click.IntRange(2, MAX_SEEDS), default=3, show_default=True,
              help="Replicated seeds per evaluated rate.")
@click.option("--slo-requests", "slo_requests", type=click.IntRange(1, MAX_REQUESTS), default=5000,
              show_default=True, help="Requests per replicated run.")
@click.option("--confidence", type=_finite(0, 1, min_open=True, max_open=True),
              default=0.95, show_default=True, help="Level of the one-sided upper bounds.")
@click.option("--tolerance", type=_finite(MIN_TOLERANCE, 1, max_open=True),
              default=0.01, show_default=True, help="Relative width at which the search stops.")
@click.option("--saturation-requests", "saturation_requests", type=click.IntRange(0, MAX_REQUESTS),
              default=SATURATION_REQUESTS, show_default=True, callback=_saturation_requests,
              help="With --memory: requests in the saturated run that measures preemption "
              f"thrash (0 skips it, else >= {SATURATION_MIN_REQUESTS}).")
@click.option("--saturation-policy", "saturation_policy", type=click.Choice(POLICY_NAMES),
              default="sarathi", show_default=True,
              help="With --memory: the policy of the saturated run (preemption thrash depends on it).")
def capacity_cmd(max_iteration_ms: float | None, slo: str | None, policies: str,
                 budgets: str | None, best_budget: bool, slo_seeds: int, slo_requests: int,
                 confidence: float, tolerance: float, saturation_requests: int, saturation_policy: str,
                 **opts: Any) -> None:
    """Capacity, critical rate, load and fluid slope of a setting (theory); with --memory, also
    the saturated engine's rate (simulation); with --slo, the highest rate that is stable and
    meets latency targets (simulation)."""
    for name in ("slo_seeds", "slo_requests", "confidence", "tolerance", "policies", "budgets",
                 "best_budget"):
        if slo is None and _given(name):
            raise click.UsageError(f"--{name.replace('_', '-')} given without --slo: the SLO "
                                   "search options need --slo")
    for name in ("saturation_requests", "saturation_policy"):
        if opts["memory"] is None and _given(name):
            raise click.UsageError(f"--{name.replace('_', '-')} given without --memory: the "
                                   "saturated run options need --memory")
    simulated = ([p.strip() for p in policies.split(",") if p.strip()] if slo is not None else [])
    simulated += [saturation_policy] if opts["memory"] is not None else []
    _check_knobs(simulated or ["(theory only)"])
    workload = _workload(opts)
    budget, k_max = opts["budget"], opts["k_max"]
    bt = _token_time(opts, workload.mean_prefill_tokens, workload.mean_decode_tokens)
    summary = summarize_theory(
        bt, budget, k_max, workload.rate_per_s,
        workload.mean_prefill_tokens, workload.mean_decode_tokens,
    )
    doc: dict[str, Any] = {
        "budget": budget,
        "k_max": k_max,
        "batch_time": bt.spec,
        "rate": workload.rate_per_s,
        "mean_prefill_tokens": workload.mean_prefill_tokens,
        "mean_decode_tokens": workload.mean_decode_tokens,
        "t_budget_ms": summary.t_budget_ms,
        "capacity_tokens_per_s": summary.capacity_tokens_per_s,
        "max_capacity_tokens_per_s": summary.max_capacity_tokens_per_s,
        "best_batch_tokens": summary.best_batch_tokens,
        "critical_rate": summary.critical_rate,
        "load": summary.load,
        "fluid_slope_tokens_per_s": summary.fluid_slope_tokens_per_s,
        "kmax_load": summary.kmax_load,
    }
    memory = opts["memory"]
    if memory is not None:
        saturation = None
        if saturation_requests:
            try:
                saturation = saturated_throughput_for(
                    workload, _policy(saturation_policy, opts), opts["batch_time"], budget, k_max,
                    memory, seed=opts["seed"], requests=saturation_requests, engine=opts["engine"],
                )
            except ConfigError as err:
                if err.field != "requests":
                    raise
                raise ConfigError("saturation-requests", saturation_requests,
                                  f"{err.problem}; 0 skips the saturated run") from None
            doc["saturation_policy"] = saturation_policy
        doc.update(_memory_doc(memory, workload, bt, budget, k_max, summary, saturation))
    if max_iteration_ms is not None:
        choice = theory.best_budget(bt, max_iteration_ms)
        doc.update(
            best_budget=choice.budget,
            best_budget_t_ms=choice.t_ms,
            best_budget_tokens_per_s=choice.tokens_per_s,
        )
    if slo is None:
        _print_doc(doc, opts["as_json"])
        return
    targets = parse_slo(slo)
    names = [p.strip() for p in policies.split(",") if p.strip()]
    if not names:
        raise click.BadParameter("no policy named", param_hint="--policies")
    for name in names:
        _policy(name, opts)
    sizes = _sizes(opts)
    budget_list = [budget] if budgets is None else _int_list(budgets, "--budgets")
    seeds = tuple(range(slo_seeds))
    rows: list[dict[str, Any]] = []
    statement = ""
    steps = len(budget_list) if best_budget else max_steps(tolerance) * len(budget_list)
    with _bar("SLO search", "rates", len(names) * steps, opts["progress"]) as advance:
        for name in names:
            policy = _policy(name, opts)
            if best_budget:
                search = best_budget_for_slo(
                    sizes, policy, opts["batch_time"], budget_list, workload.rate_per_s, targets,
                    k_max=k_max, seeds=seeds, max_requests=slo_requests, confidence=confidence,
                    on_point=lambda point: advance(1),
                )
                statement = search.statement
                for c in search.candidates:
                    rows.append({
                        "policy": name, "budget": c.budget, "rate": search.rate_per_s,
                        "passed": c.passed, "worst_ratio": c.worst_ratio,
                        "best": search.best is not None and c.budget == search.best.budget,
                        "bound_rate": c.bound_rate_per_s,
                        **({} if c.point is None
                           else {f"{k}_upper": v for k, v in c.point.upper_bounds.items()}),
                        "reasons": list(c.reasons),
                    })
                continue
            for b in budget_list:
                cap = max_rate_under_slo(
                    sizes, policy, opts["batch_time"], b, targets, k_max=k_max, seeds=seeds,
                    max_requests=slo_requests, tolerance=tolerance, confidence=confidence,
                    on_point=lambda point: advance(1),
                )
                statement = cap.statement
                rows.append({
                    "policy": name, "budget": b, "slo_rate": cap.max_rate_per_s,
                    "fraction_of_critical": cap.fraction_of_critical,
                    "critical_rate": cap.critical_rate_per_s, "bound_rate": cap.bound_rate_per_s,
                    "lowest_failing_rate": cap.lowest_failing_rate_per_s, "runs": cap.runs,
                })
    doc["slo"] = targets
    doc["slo_results"] = rows
    doc["slo_statement"] = statement
    if opts["as_json"]:
        _dump(doc)
        return
    console = _console()
    table = Table(show_header=True, header_style="bold")
    columns = (["policy", "budget", "passed", "worst ratio", "best", "reasons"] if best_budget else
               ["policy", "budget", "SLO rate req/s", "of lambda*", "lambda* req/s",
                "lowest failing", "runs"])
    for col in columns:
        table.add_column(col, justify="left" if col in ("policy", "reasons") else "right")
    for r in rows:
        if best_budget:
            table.add_row(r["policy"], str(r["budget"]), "yes" if r["passed"] else "no",
                          _fmt(r["worst_ratio"], 3), "<-" if r["best"] else "",
                          "; ".join(r["reasons"]))
        else:
            table.add_row(r["policy"], str(r["budget"]),
                          "none" if r["slo_rate"] is None else _fmt(r["slo_rate"], 3),
                          _fmt(r["fraction_of_critical"], 3), _fmt(r["critical_rate"], 3),
                          _fmt(r["lowest_failing_rate"], 3), str(r["runs"]))
    targets_text = ", ".join(f"{k} <= {v:g}" for k, v in targets.items())
    where = f" at {workload.rate_per_s:.4g} req/s" if best_budget else ""
    runs = ("1 run (the workload draws nothing from the seed)" if is_deterministic(workload)
            else f"{len(seeds)} seeds x {slo_requests} requests")
    console.print(f"SLO {targets_text}{where}; {runs} per rate")
    console.print(table)
    console.print(
        "claim, for each passing row at its rate: "
        f"{slo_claim(targets, seeds, slo_requests, confidence, is_deterministic(workload))}"
    )


def _memory_doc(memory: KVCache, workload: Workload, bt: BatchTime, budget: int, k_max: int | None,
                summary: Any, saturation: SaturationResult | None = None) -> dict[str, Any]:
    """What the KV cache does to the capacity: its batch-size limit, the §4 load with it (the
    no-thrash upper bound), the saturated engine's rate (the saturation rule, with preemption
    thrash), a verdict and a warning when memory, not the token budget, binds."""
    p, d = workload.mean_prefill_tokens, workload.mean_decode_tokens
    rate = workload.rate_per_s
    rho, k_eff = theory.memory_load(rate, p, d, bt, budget, k_max, memory)
    scalar = summary.load if summary.kmax_load is None else summary.kmax_load
    out: dict[str, Any] = {
        "memory": memory.spec,
        "memory_batch_limit": theory.memory_batch_limit(memory, p, d),
        "effective_k_max": k_eff,
        "memory_load": rho,
        "memory_critical_rate": rate / rho if rho > 0 else math.inf,
        "binding": "memory" if rho > scalar else "token budget",
    }
    thrash = False
    if saturation is not None:
        sat = saturation.request_rate_per_s
        thrash = saturation.preemptions > 0 and rate >= sat
        out.update(
            saturated_rate=sat,
            saturated_rate_ci_low=saturation.ci_low_per_s,
            saturated_rate_ci_high=saturation.ci_high_per_s,
            saturated_load=rate / sat,
            thrash_recomputed_tokens_per_request=saturation.recomputed_tokens_per_request,
            saturation_requests=saturation.requests,
        )
    if scalar >= 1:
        out["verdict"] = "unstable (token budget)"
    elif rho >= 1:
        out["verdict"] = "unstable (memory)"
    elif thrash:
        out["verdict"] = "unstable (preemption thrash)"
    elif saturation is None and rho > scalar:
        out["verdict"] = "no guarantee (memory binds; saturated run skipped)"
    else:
        out["verdict"] = "stable"
    if scalar < 1 <= rho:
        out["warning"] = (
            f"memory binds: load {scalar:.3f} is stable for the token budget, but {memory.capacity_tokens} "
            f"KV tokens hold only about {k_eff} decoding requests (load {rho:.3f} >= 1): unstable"
        )
    elif scalar < 1 and thrash:
        out["warning"] = (
            f"preemption thrash: memory load {rho:.3f} < 1, but the saturated engine "
            f"completes only {out['saturated_rate']:.4g} req/s "
            f"({out['thrash_recomputed_tokens_per_request']:.0f} tokens recomputed per request; load "
            f"{out['saturated_load']:.3f} >= 1): unstable (preemption thrash, docs/memory.md)"
        )
    elif rho > scalar:
        out["warning"] = (
            "memory binds before the token budget; its limit is an upper bound: preemption "
            "(recompute) costs capacity near it"
            + ("" if saturation is None else ", saturated_rate includes that cost")
            + " (docs/memory.md)"
        )
    return out


def _print_doc(doc: dict[str, Any], as_json: bool) -> None:
    """A flat document as JSON or as aligned key/value lines."""
    if as_json:
        _dump(doc)
        return
    width = max(len(k) for k in doc)
    for key, value in doc.items():
        click.echo(f"{key:<{width}}  {_fmt(value, 4)}")


def _sizes(opts: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(arrival, prefill, decode) specs with the command's defaults."""
    return (opts["arrival"], *default_sizes(opts["arrival"], opts["prefill"], opts["decode"]))


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} must be comma-separated integers", param_hint=option) from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r} must name integers >= 1", param_hint=option)
    return values


@cli.command("compare")
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


@cli.command("region")
@_shared_options
@click.option("--region-load", "region_load", type=_finite(0, MAX_LOAD, min_open=True), default=None,
              help="Move the operating point along its ray to this load against the region.")
@click.option("--margin", type=_finite(0, 1, max_open=True), default=0.0,
              show_default=True, help="Inside means region load <= 1 - margin.")
@click.option("--plot", "plot_path", default=None, help="Write a PNG of the region here.")
def region_cmd(region_load: float | None, margin: float, plot_path: str | None, **opts: Any) -> None:
    """The batch-size-limit stability region (§4): vertices, vertex C, the operating point's load."""
    if plot_path:
        _check_out_path(plot_path, (".png",), "--plot")
    workload = _workload(opts)
    # a composition model is seen through the workload's mix (docs/memory.md)
    token_time = _token_time(opts, workload.mean_prefill_tokens, workload.mean_decode_tokens)
    k_max = opts["k_max"]
    if opts["memory"] is not None:  # the cache bounds the requests per batch too (docs/memory.md)
        k_max = theory.effective_k_max(
            opts["memory"], workload.mean_prefill_tokens, workload.mean_decode_tokens, k_max
        )
    reg = region(token_time, opts["budget"], k_max)
    point = OperatingPoint(
        workload.rate_per_s, workload.mean_prefill_tokens, workload.mean_decode_tokens
    )
    if region_load is not None:
        point = OperatingPoint(
            reg.rate_at_load(point, region_load), point.mean_prefill_tokens, point.mean_decode_tokens
        )
    exit_ = reg.exit(point)
    rates = point.token_rates_per_s
    doc: dict[str, Any] = {
        "budget": reg.budget,
        "k_max": reg.k_max,
        "batch_time": opts["batch_time"].spec,
        "capacity_tokens_per_s": reg.capacity_tokens_per_s,
        "max_capacity_tokens_per_s": reg.max_capacity_tokens_per_s,
        "vertices": [
            {"prefill_tokens_per_s": v[0], "decode_tokens_per_s": v[1],
             "batch_prefill_tokens": b[0], "batch_decode_tokens": b[1]}
            for v, b in zip(reg.vertices_tokens_per_s, reg.vertex_batches, strict=True)
        ],
        "vertex_c": None if reg.vertex_c is None else {
            "prefill_tokens_per_s": reg.vertex_c[0], "decode_tokens_per_s": reg.vertex_c[1],
            "batch": list(reg.vertex_c_batch or ()),
        },
        "rate": point.rate_per_s,
        "mean_prefill_tokens": point.mean_prefill_tokens,
        "mean_decode_tokens": point.mean_decode_tokens,
        "prefill_tokens_per_s": rates[0],
        "decode_tokens_per_s": rates[1],
        "region_load": exit_.load,
        "margin": margin,
        "inside": reg.contains(point, margin),
        "exit_batch": list(exit_.batch),
        "exit_at_vertex": exit_.at_vertex,
    }
    if plot_path:
        plot_region(reg, plot_path, {f"{point.rate_per_s:.4g} req/s": point})
        doc["plot"] = plot_path
    if opts["as_json"]:
        _dump(doc)
        return
    console = _console()
    console.print(
        f"region: b={reg.budget}  k_max={reg.k_max or '-'}  t(n)={doc['batch_time']}  "
        f"b/t(b)={reg.capacity_tokens_per_s:,.1f} tokens/s  max n/t(n)="
        f"{reg.max_capacity_tokens_per_s:,.1f} tokens/s"
    )
    table = Table(show_header=True, header_style="bold")
    for col in ("vertex", "prefill tokens/s", "decode tokens/s", "batch (prefill + decode)"):
        table.add_column(col, justify="right")
    for i, (v, b) in enumerate(zip(reg.vertices_tokens_per_s, reg.vertex_batches, strict=True)):
        name = f"{i}" + (" (C)" if i == reg.vertex_c_index else "")
        table.add_row(name, _fmt(v[0], 1), _fmt(v[1], 1), f"{b[0]} + {b[1]}")
    console.print(table)
    where = "inside" if doc["inside"] else "outside"
    if abs(exit_.load - 1.0) <= 1e-9:
        where = "on the boundary"
    console.print(
        f"operating point: {point.rate_per_s:.6g} req/s x ({point.mean_prefill_tokens:g} + "
        f"{point.mean_decode_tokens:g}) tokens = ({rates[0]:,.1f}, {rates[1]:,.1f}) tokens/s; "
        f"region load {exit_.load:.9f}: {where}"
        + (f" (margin {margin:g})" if margin else "")
    )
    console.print(
        f"its ray leaves the region {'through vertex' if exit_.at_vertex else 'near vertex'} "
        f"{exit_.vertex}: batches of {exit_.batch[0]} prefill + {exit_.batch[1]} decode tokens "
        "carry the load there"
    )
    if plot_path:
        console.print(f"region plot: {plot_path}")


@cli.command("reproduce")
@click.argument("name", type=click.Choice([*TARGETS, "all"]))
@click.option("--out", "out_dir", default="reproduce", show_default=True,
              help="Folder for the PNG figures and the markdown report.")
@click.option("--quick", is_flag=True, help="Fewer requests per run (a quick look, not the report).")
@click.option("--real", is_flag=True,
              help="fig1 only: set llmqueue's prediction against the real-engine runs on one H200 "
              "(DATA_DIR/gpu/engine_fig1); exits 0 whenever the comparison ran.")
@click.option("--data-dir", "data_dir", default="../shared/data", show_default=True,
              help="With --real: the project's shared data.")
@click.option("--progress/--no-progress", default=None,
              help="Say which target runs, on stderr (default: when stderr is a terminal).")
def reproduce_cmd(name: str, out_dir: str, quick: bool, real: bool, data_dir: str,
                  progress: bool | None) -> None:
    """Reproduce the paper: fig1 | example | theorem | vertex-c | all (figures + a markdown report).

    Exits with code 1 if a claim of the paper does not hold in the measurement (not with --real,
    which compares with a real engine and reports each agreement).
    """
    if real and name != "fig1":
        raise ConfigError("real", name, "--real is for fig1 only")
    _check_writable(out_dir, "--out", folder=True)
    started = time.perf_counter()

    def say(target: str, i: int, n: int) -> None:
        if not (progress if progress is not None else sys.stderr.isatty()):
            return
        click.echo(f"llmqueue: reproducing {target} ({i + 1} of {n}; {time.perf_counter() - started:.0f} s "
                   "so far)...", err=True)

    if real:
        say("fig1 against the real engine", 0, 1)
        report = reproduce_real(out_dir, data_dir, quick=quick)
    else:
        report = reproduce(name, out_dir, quick=quick, on_target=say)
    console = _console()
    table = Table(show_header=True, header_style="bold")
    table.add_column("claim")
    table.add_column("agrees" if real else "holds", justify="center")
    for claim, holds in report.claims:
        table.add_row(claim, "yes" if holds else "[bold red]NO[/]")
    console.print(table)
    for path in report.files:
        console.print(f"wrote {path}")
    if not real and not report.all_hold:
        raise click.exceptions.Exit(1)


@cli.command("validate")
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


@cli.group("network")
def network_group() -> None:
    """Networks of engines (AI agents): analysis from the traffic equations, and simulation."""


def _print_analysis(console: Console, analysis: Analysis, net: Network) -> None:
    table = Table(show_header=True, header_style="bold")
    cached = any(e.memory is not None for e in net.engines.values())
    memory_cols = ("KV tokens", "k_mem") if cached else ()
    for col in ("engine", "policy", "b", "k_max", *memory_cols, "prefill tok/s", "decode tok/s",
                "capacity tok/s", "load (rho)"):
        table.add_column(col, justify="left" if col in ("engine", "policy") else "right")
    for name, load in analysis.engines.items():
        spec = net.engines[name]
        mark = " <- bottleneck" if name == analysis.bottleneck else ""
        memory = (f"{spec.memory.capacity_tokens:,}" if spec.memory else "-",
                  str(load.memory_batch_limit or "-")) if cached else ()
        table.add_row(name, spec.policy, str(spec.budget), str(spec.k_max or "-"), *memory,
                      _fmt(load.prefill_tokens_per_s), _fmt(load.decode_tokens_per_s),
                      _fmt(load.capacity_tokens_per_s), f"{load.rho:.3f}{mark}")
    console.print(table)
    rates = ", ".join(f"{c.name} {c.rate_per_s:g}/s" for c in net.classes.values())
    console.print(
        f"arrivals: {rates}; critical scale {analysis.critical_scale:.4g} (every rate x it puts "
        f"{analysis.bottleneck} at load 1)"
    )
    for name, visits in analysis.visits.items():
        shown = ", ".join(f"{k} {v:.3g}" for k, v in visits.items())
        console.print(f"visits per {name} request: {shown}")
    for warning in analysis.warnings:
        console.print(f"warning: {warning}")


@network_group.command("analyze")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("--scale", type=_finite(0, MAX_SCALE, min_open=True), default=1.0, show_default=True,
              help="Multiply every class's arrival rate by this.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def network_analyze_cmd(path: str, scale: float, as_json: bool) -> None:
    """Per-engine loads, the bottleneck and the critical scaling of the arrival rates (no simulation)."""
    net = load_network(path).scaled(scale)
    analysis = analyze_network(net)
    if as_json:
        _dump({
            "engines": {n: {"rho": e.rho, "prefill_tokens_per_s": e.prefill_tokens_per_s,
                            "decode_tokens_per_s": e.decode_tokens_per_s,
                            "capacity_tokens_per_s": e.capacity_tokens_per_s, "buffers": list(e.buffers),
                            "memory": None if net.engines[n].memory is None else net.engines[n].memory.spec,
                            "memory_batch_limit": e.memory_batch_limit,
                            "token_batch_time": None if e.token_time is None else e.token_time.spec}
                        for n, e in analysis.engines.items()},
            "bottleneck": analysis.bottleneck,
            "critical_scale": analysis.critical_scale,
            "cyclic": analysis.cyclic,
            "cycle": list(analysis.cycle),
            "visits": analysis.visits,
            "virtual_stations": [{"buffers": list(v.buffers), "engines": list(v.engines), "load": v.load}
                                 for v in analysis.virtual_stations],
            "warnings": list(analysis.warnings),
            "predicted": predict_network(net, analysis).verdict,
            "predicted_reason": predict_network(net, analysis).reason,
        })
        return
    console = _console()
    _print_analysis(console, analysis, net)
    prediction = predict_network(net, analysis)
    console.print(f"predicted: [bold]{prediction.verdict}[/] ({prediction.reason})")


@network_group.command("simulate")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("--scale", type=_finite(0, MAX_SCALE, min_open=True), default=1.0, show_default=True,
              help="Multiply every class's arrival rate by this.")
@click.option("--requests", "requests_", type=click.IntRange(1, MAX_REQUESTS), default=None,
              help="External arrivals over all classes (default 20000 unless --duration-s).")
@click.option("--duration-s", "duration_s", type=_finite(0, MAX_DURATION_S, min_open=True), default=None,
              help="Arrivals stop at this simulated time (s).")
@click.option("--drain-s", "drain_s", type=_finite(0, MAX_DURATION_S), default=None,
              help="After the last arrival, run at most this long (default: the arrival window, "
              "at least 60 s).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--plot", "plot_path", default=None, help="PNG of the backlog per engine over time.")
def network_simulate_cmd(path: str, scale: float, requests_: int | None, duration_s: float | None,
                         drain_s: float | None, seed: int, as_json: bool, plot_path: str | None) -> None:
    """Simulate the network: per-engine metrics, per-class end-to-end latency, verdicts."""
    if plot_path:
        _check_out_path(plot_path, (".png",), "--plot")
    net = load_network(path).scaled(scale)
    if requests_ is None and duration_s is None:
        requests_ = 20000
    result = simulate_network(net, seed=seed, max_requests=requests_, duration_s=duration_s,
                              drain_s=drain_s)
    if plot_path:
        _plot_network(result, plot_path)
    if as_json:
        _dump(result.to_dict())
        return
    console = _console()
    _print_analysis(console, result.analysis, net)
    table = Table(show_header=True, header_style="bold")
    cached = any(e.memory is not None for e in result.engines.values())
    memory_cols = ("preemptions", "refused", "peak KV") if cached else ()
    for col in ("engine", "policy", "visits done", "tok/s", "mean TTFT ms", "p99 TTFT ms",
                "mean TPOT ms", "mean backlog", "slope tok/s", *memory_cols, "observed"):
        table.add_column(col, justify="left" if col in ("engine", "policy") else "right")
    for e in result.engines.values():
        m = e.metrics
        memory = (str(m.preemptions), str(m.rejected_requests),
                  "-" if e.memory is None else f"{m.peak_kv_usage:.2f}") if cached else ()
        table.add_row(e.name, e.policy, f"{m.completed}/{m.arrivals}", _fmt(m.total_token_throughput),
                      _fmt(m.latency["mean_ttft_ms"]), _fmt(m.latency["p99_ttft_ms"]),
                      _fmt(m.latency["mean_tpot_ms"]), _fmt(m.mean_backlog_tokens, 0),
                      _fmt(e.observed.slope_tokens_per_s), *memory, e.observed.verdict)
    console.print(table)
    table = Table(show_header=True, header_style="bold")
    for col in ("class", "completed", "req/s", "mean E2EL ms", "p50", "p90", "p99", "in network",
                *(("refused",) if cached else ())):
        table.add_column(col, justify="left" if col == "class" else "right")
    for c in result.classes.values():
        table.add_row(c.name, f"{c.completed}/{c.arrivals}", _fmt(c.request_throughput, 3),
                      _fmt(c.latency["mean_e2el_ms"]), _fmt(c.latency["median_e2el_ms"]),
                      _fmt(c.latency["p90_e2el_ms"]), _fmt(c.latency["p99_e2el_ms"]),
                      _fmt(c.mean_requests_in_network), *((str(c.rejected),) if cached else ()))
    console.print(table)
    console.print(
        f"network: predicted [bold]{result.predicted.verdict}[/] ({result.predicted.reason}); "
        f"observed [bold]{result.observed.verdict}[/] ({result.evidence.reason}); {result.visits} "
        f"engine visits in {result.duration_s:,.1f} s"
    )
    for note in result.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    if plot_path:
        console.print(f"backlog plot: {plot_path}")


def _plot_network(result: NetworkResult, path: str) -> None:
    """Backlog per engine (tokens) and requests in the network per class, over time."""
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for e in result.engines.values():
        series = e.metrics.backlog_series
        top.plot([t for t, _ in series], [b for _, b in series], label=f"{e.name} ({e.observed.verdict})")
    top.set_ylabel("backlog (tokens)")
    top.legend(fontsize=8)
    for c in result.classes.values():
        bottom.plot([t for t, _ in c.series], [n for _, n in c.series], label=c.name)
    bottom.set_ylabel("requests in network")
    bottom.set_xlabel("time (s)")
    bottom.legend(fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.suptitle(f"network: {result.observed.verdict} (predicted {result.predicted.verdict})", fontsize=9)
    save(fig, path)


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


@cli.group("trace")
def trace_group() -> None:
    """Request traces (Azure/Vidur CSV, vLLM JSONL log, any CSV): statistics, windows and fitted
    synthetic workloads. SPEC is PATH[,key=value...] as in --arrival trace:SPEC."""


def _load_trace_window(spec: str, window: str | None) -> RequestTrace:
    """The trace of SPEC, cut to --window START:END (seconds of trace time) if given."""
    trace = load_request_trace(spec, "SPEC")
    if window is None:
        return trace
    start_s, end_s = parse_window(window, "--window")
    return trace.window(start_s, end_s, "--window")


def _summary_row(name: str, s: TraceSummary, digits: int = 1) -> list[str]:
    return [name, _fmt(s.mean, digits), _fmt(s.std, digits), _fmt(s.min, digits), _fmt(s.p50, digits),
            _fmt(s.p90, digits), _fmt(s.p99, digits), _fmt(s.max, digits)]


def _trace_heading(stats: TraceStats) -> str:
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


@cli.command("sweep")
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


@cli.command("results")
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


def _plot(results: Sequence[RunResult], path: str) -> None:
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


@cli.command("fit")
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


@cli.command("warmup")
def warmup_cmd() -> None:
    """Compile the numba event loops now (they compile on first use after an install or upgrade,
    a minute or two on a slow machine), so later runs start at once."""
    if not compiled.available():
        click.echo("numba is not installed: runs use the Python engines, nothing to compile "
                   "(pip install 'llmqueue[fast]' for the compiled one)")
        return
    click.echo("compiling the event loops (cached on disk afterwards)...", err=True)
    from llmqueue.sim.warmup import warm_up  # imports numba and the network simulator

    click.echo(f"compiled event loops ready in {warm_up():.1f} s")


_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())
"""Raised for a bare group since click 8.2 (before, the group prints its help and exits 0 itself)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the CLI; bad input gives one line on stderr and exit code 2."""
    try:
        code = cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
        if isinstance(code, int):  # click returns the code of an Exit in this mode
            return code
    except _NO_ARGS_IS_HELP as err:
        click.echo(err.ctx.get_help() if err.ctx else str(err))
        return 0
    except click.UsageError as err:
        click.echo(f"llmqueue: error: {err.format_message()}", err=True)
        return 2
    except LLMQueueError as err:
        click.echo(f"llmqueue: error: {err}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("llmqueue: aborted", err=True)
        return 1
    except click.ClickException as err:
        click.echo(f"llmqueue: error: {err.format_message()}", err=True)
        return err.exit_code
    except OSError as err:
        click.echo(f"llmqueue: error: {err.filename or ''}: {err.strerror}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
