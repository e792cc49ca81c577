"""The spec grammar of workloads: size distributions (``poisson:129``), arrival processes
(``gamma:cv=2``, ``trace:PATH``) and ``make_workload``, which builds a workload from them.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmqueue.errors import ConfigError
from llmqueue.io.configfile import split_items
from llmqueue.model.traces import trace_arrivals, trace_sizes
from llmqueue.model.workload import (
    ArrivalProcess,
    Constant,
    DeterministicArrivals,
    Empirical,
    GammaArrivals,
    Geometric,
    LogNormal,
    Poisson,
    PoissonArrivals,
    SizeDist,
    Uniform,
    Workload,
    _check_rate,
    _num,
    _same_file,
)

# --------------------------------------------------------------------------------------------
# Spec parsing
# --------------------------------------------------------------------------------------------


def _split_args(body: str, field_name: str, spec: str,
                keys: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Split ``a,b,key=value`` into positional and keyword parts, rejecting unknown keys (the shared
    splitter, keys case-insensitive)."""
    return split_items(spec, body, field_name, keys=keys, positional=True, lower=True)


def _int(text: str, what: str, field_name: str, spec: str) -> int:
    value = _num(text, what, field_name, spec)
    if not value.is_integer():
        raise ConfigError(field_name, spec, f"{what} must be an integer, not {text!r}")
    return int(value)


def _params(body: str, names: Sequence[str], required: int, field_name: str,
            spec: str) -> dict[str, str]:
    """Map ``body`` onto parameter ``names`` (positionally or by key); first ``required`` needed."""
    positional, named = _split_args(body, field_name, spec, names)
    if len(positional) > len(names):
        raise ConfigError(field_name, spec,
                          f"too many parameters (expected at most {len(names)}: "
                          f"{', '.join(names)})")
    out = dict(zip(names, positional, strict=False))
    for key, value in named.items():
        if key in out:
            raise ConfigError(field_name, spec, f"parameter '{key}' given twice")
        out[key] = value
    missing = [name for name in names[:required] if name not in out]
    if missing:
        raise ConfigError(field_name, spec, f"missing parameter '{missing[0]}'")
    return out


def parse_size(spec: str, field_name: str) -> SizeDist:
    """Parse a token-count spec (``129``, ``poisson:129``, ``geometric:112``, ``uniform:10,200``,
    ``lognormal:mean=500,sigma=0.8[,min=16]``, ``trace:PATH[,key=value...][,column=NAME]``; trace
    specs and formats are in :mod:`llmqueue.model.traces`).

    ``field_name`` (e.g. ``--prefill``) names the option in errors and picks the default trace
    column (the trace's prompt column if it mentions prefill, its output column for decode).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(field_name, spec, "size spec must be a non-empty string")
    text = spec.strip()
    kind, sep, body = text.partition(":")
    kind = kind.strip().lower()
    if not sep:
        kind, body = "constant", text
    try:
        if kind == "constant":
            p = _params(body, ("value",), 1, field_name, spec)
            return Constant(_int(p["value"], "constant value", field_name, spec))
        if kind == "poisson":
            p = _params(body, ("mean", "min"), 1, field_name, spec)
            return Poisson(_num(p["mean"], "poisson mean", field_name, spec),
                           _int(p.get("min", "1"), "min", field_name, spec))
        if kind == "geometric":
            p = _params(body, ("mean", "min"), 1, field_name, spec)
            return Geometric(_num(p["mean"], "geometric mean", field_name, spec),
                             _int(p.get("min", "1"), "min", field_name, spec))
        if kind == "uniform":
            p = _params(body, ("low", "high"), 2, field_name, spec)
            return Uniform(_int(p["low"], "uniform low", field_name, spec),
                           _int(p["high"], "uniform high", field_name, spec))
        if kind == "lognormal":
            p = _params(body, ("mean", "sigma", "min"), 2, field_name, spec)
            return LogNormal(_num(p["mean"], "lognormal mean", field_name, spec),
                             _num(p["sigma"], "lognormal sigma", field_name, spec),
                             _int(p.get("min", "1"), "min", field_name, spec))
        if kind == "trace":
            return trace_sizes(text, field_name)
    except ConfigError as exc:
        if exc.field == field_name:
            raise
        raise ConfigError(field_name, spec, f"{exc.field} {exc.problem}") from None
    raise ConfigError(field_name, spec,
                      f"unknown size distribution '{kind}' (expected an integer, poisson, "
                      "geometric, uniform, lognormal or trace)")


def is_trace_spec(spec: object) -> bool:
    """Whether an arrival or size spec replays a trace (``trace:PATH``, any case, any spaces)."""
    return isinstance(spec, str) and spec.strip().partition(":")[0].strip().lower() == "trace" \
        and ":" in spec


def parse_arrival(spec: str, rate_per_s: float | None) -> ArrivalProcess:
    """Parse ``poisson``, ``deterministic``, ``gamma:cv=2`` or ``trace:PATH[,key=value...]`` (see
    :mod:`llmqueue.model.traces`) with a rate (per s).

    Non-trace kinds need ``rate_per_s > 0``; for a trace a given rate time-scales the replay.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("arrival", spec, "arrival spec must be a non-empty string")
    kind, _, body = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind == "trace":
        if not body.strip():
            raise ConfigError("arrival", spec, "missing trace path")
        return trace_arrivals(spec, rate_per_s)  # checks the rate before reading the file
    if kind not in ("poisson", "deterministic", "gamma"):
        raise ConfigError("arrival", spec,
                          f"unknown arrival process '{kind}' (expected poisson, deterministic, "
                          "gamma:cv=X or trace:PATH)")
    if kind == "gamma":
        p = _params(body, ("cv",), 1, "arrival", spec)
        cv = _num(p["cv"], "gamma cv", "arrival", spec)
        rate = _check_rate(rate_per_s)
        try:
            return GammaArrivals(rate, cv)
        except ConfigError as exc:
            raise ConfigError("arrival", spec, f"{exc.field} {exc.problem}") from None
    if body.strip():
        raise ConfigError("arrival", spec, f"'{kind}' takes no parameters")
    rate = _check_rate(rate_per_s)
    return PoissonArrivals(rate) if kind == "poisson" else DeterministicArrivals(rate)


def make_workload(arrival_spec: str, prefill_spec: str | None, decode_spec: str | None,
                  rate_per_s: float | None) -> Workload:
    """Build a Workload from spec strings (the CLI's --arrival/--prefill/--decode/--rate).

    Sizes omitted with trace arrivals come from the trace; ``trace:PATH`` for both sizes from the
    same file samples (prefill, decode) rows jointly.
    """
    arrival = parse_arrival(arrival_spec, rate_per_s)
    prefill = None if prefill_spec is None else parse_size(prefill_spec, "prefill")
    decode = None if decode_spec is None else parse_size(decode_spec, "decode")
    paired = (isinstance(prefill, Empirical) and isinstance(decode, Empirical)
              and _same_file(prefill.source, decode.source) and len(prefill) == len(decode))
    return Workload(arrival, prefill, decode, paired)
