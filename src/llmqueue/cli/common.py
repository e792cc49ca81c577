"""What every ``llmqueue`` command shares: option types and callbacks, the engine and workload
options (``--config`` included), the workload and policy they describe, consoles, progress bars,
number formatting and output-path checks. The command modules parse, call the library, render.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from llmqueue.errors import ConfigError, LLMQueueError
from llmqueue.io.configfile import read_table
from llmqueue.io.store import jsonable
from llmqueue.limits import (
    MAX_BATCH_REQUESTS,
    MAX_BUDGET_TOKENS,
    MAX_DURATION_S,
    MAX_LOAD,
    MAX_RATE_PER_S,
    MAX_REQUESTS,
    MAX_SEED,
    MIN_RATE_PER_S,
)
from llmqueue.model.batchtime import BatchTime, mix_batch_time, parse_batch_time
from llmqueue.model.memory import KVCache, parse_memory
from llmqueue.policies.fcfs import KFCFS, VLLMChunked, make_policy
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

if TYPE_CHECKING:
    from llmqueue.model.workload import Workload

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
    """--batch-time: the spec parsed into a batch-time model (a bad spec is a usage error)."""
    try:
        return parse_batch_time(value)
    except LLMQueueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None


def _memory(ctx: click.Context, param: click.Parameter, value: str | None) -> KVCache | None:
    """--memory: the KV cache spec parsed (None: unlimited, as in the paper)."""
    if value is None:
        return None
    try:
        return parse_memory(value)
    except LLMQueueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None



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
    """--goodput: the latency targets parsed (None: no goodput reported)."""
    from llmqueue.engines.metrics import parse_goodput

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
    """The named policy with the command's kfcfs knobs (a bad name raises ConfigError)."""
    return make_policy(
        name,
        priority=opts["priority"],
        mixed=opts["mixed"],
        chunked=opts["chunked"],
        k_p=opts["k_p"],
        k_d=opts["k_d"],
    )


def _stderr(show: bool) -> Console:
    """The progress bars' console: quiet when the bar is off (rich 13.0, our lower bound, still
    ends a disabled bar with an empty line)."""
    return Console(stderr=True, quiet=not show)


@contextlib.contextmanager
def _bar(label: str, unit: str, total: int | None, show: bool | None,
         cumulative: bool = False) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr (default: when stderr is a terminal); yields ``advance(n)``, or with
    ``cumulative`` a function taking the count done so far."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    show = show if show is not None else sys.stderr.isatty()
    progress = Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(),
        console=_stderr(show), transient=True, disable=not show,
    )
    with progress:
        task = progress.add_task(label, total=total)
        if cumulative:
            yield lambda n: progress.update(task, completed=n)
        else:
            yield lambda n: progress.advance(task, n)


def _dump(document: Any) -> None:
    """Print one JSON document (NaN and infinity as null: strict JSON)."""
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
    """A number for a table or a key/value line: ``digits`` decimals, '-' for none or non-finite."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


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
    """Comma-separated integers >= 1 from ``option`` (a usage error otherwise)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} must be comma-separated integers", param_hint=option) from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r} must name integers >= 1", param_hint=option)
    return values
