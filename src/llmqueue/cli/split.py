"""``llmqueue network split``: at the same number of GPUs, co-located chunked prefill against every
prefill:decode split, by the largest rate each serves within TTFT/TPOT targets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from llmqueue.cli.common import _console, _dump, _finite, _fmt, _int_list
from llmqueue.limits import MAX_BUDGET_TOKENS, MAX_REQUESTS, MAX_SEED

if TYPE_CHECKING:
    from llmqueue.studies.disagg import SplitComparison

# the study's defaults, repeated here so that ``--help`` loads no simulator (tests/test_split.py
# checks that they agree)
DEFAULT_BATCH_TIME = "preset:h100-llama2-70b-tp4-tokens"
DEFAULT_PREFILL = "lognormal:mean=1155,sigma=0.9,min=16"
DEFAULT_DECODE = "lognormal:mean=211,sigma=0.9,min=4"
DEFAULT_TRANSFER = "fixed_ms=2,per_token_ms=0.0004,link=shared"


def _float_list(values: tuple[str, ...], option: str) -> list[float]:
    """Positive numbers from repeated and comma-separated ``option`` values."""
    out: list[float] = []
    for text in values:
        for piece in text.split(","):
            try:
                x = float(piece)
            except ValueError:
                raise click.BadParameter(f"{piece!r} is not a number", param_hint=option) from None
            if not 0 < x < float("inf"):
                raise click.BadParameter(f"{piece!r} must be a finite number > 0", param_hint=option)
            out.append(x)
    return out


@click.command("split")
@click.option("--batch-time", default=DEFAULT_BATCH_TIME, show_default=True,
              help="One engine's batch-time model t(n) (a spec or preset:NAME).")
@click.option("--gpus", type=click.IntRange(2, 1024), default=4, show_default=True,
              help="Engines (replicas) every deployment uses; a split uses P + D = GPUS.")
@click.option("--prefill", default=DEFAULT_PREFILL, show_default=True, help="Prompt tokens (size spec).")
@click.option("--decode", default=DEFAULT_DECODE, show_default=True, help="Output tokens (size spec).")
@click.option("--ttft-ms", type=_finite(0, 1e9, min_open=True), default=3000.0, show_default=True,
              help="TTFT target (ms) at --percentile.")
@click.option("--tpot-ms", multiple=True, default=("50",), show_default=True,
              help="TPOT target(s) (ms): repeat or give a comma list for a table over targets.")
@click.option("--percentile", type=click.Choice(["p50", "p90", "p99"]), default="p99", show_default=True)
@click.option("--policy", type=click.Choice(["sarathi", "vllm-chunked"]), default="sarathi",
              show_default=True, help="Chunked-prefill policy of every engine.")
@click.option("--budget", default="512,2048", show_default=True,
              help="Co-located budget(s), comma list: each is a candidate.")
@click.option("--prefill-budget", type=click.IntRange(1, MAX_BUDGET_TOKENS), default=2048, show_default=True,
              help="Budget of a split's prefill engines.")
@click.option("--decode-budget", type=click.IntRange(1, MAX_BUDGET_TOKENS), default=512, show_default=True,
              help="Budget of a split's decode engines.")
@click.option("--k-max", type=click.IntRange(1, MAX_BUDGET_TOKENS), default=256, show_default=True,
              help="k_max of a split's decode engines.")
@click.option("--transfer", default=DEFAULT_TRANSFER, show_default=True,
              help="KV transfer of a split: fixed_ms=F,per_token_ms=T[,link=shared].")
@click.option("--memory", default=None,
              help="Every engine's KV cache (tokens=M or gpu_gib=..; default none).")
@click.option("--requests", type=click.IntRange(1, MAX_REQUESTS), default=2000, show_default=True,
              help="Requests per simulated run.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True)
@click.option("--step", type=_finite(0, 1, min_open=True), default=0.05, show_default=True,
              help="Relative gap between two rates tried: the answer is within this of the boundary.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def split_cmd(batch_time: str, gpus: int, prefill: str, decode: str, ttft_ms: float,
              tpot_ms: tuple[str, ...], percentile: str, policy: str, budget: str, prefill_budget: int,
              decode_budget: int, k_max: int, transfer: str, memory: str | None, requests: int, seed: int,
              step: float, as_json: bool) -> None:
    """Split prefill/decode vs co-located at the same GPUs: each deployment's goodput (largest
    Poisson rate meeting the TTFT/TPOT targets, by simulation below the theory's capacity)."""
    from llmqueue.studies.disagg import SplitSetup, SplitSLO, split_table

    setup = SplitSetup(gpus=gpus, batch_time=batch_time, prefill=prefill, decode=decode, policy=policy,
                       colocated_budgets=tuple(_int_list(budget, "--budget")), prefill_budget=prefill_budget,
                       decode_budget=decode_budget, decode_k_max=k_max, transfer=transfer, memory=memory,
                       requests=requests, seed=seed, step=step)
    slos = [SplitSLO(ttft_ms, t, percentile) for t in _float_list(tpot_ms, "--tpot-ms")]
    table = split_table(setup, slos)
    if as_json:
        _dump({"gpus": gpus, "batch_time": batch_time, "prefill": prefill, "decode": decode,
               "requests": requests, "seed": seed, "step": step, "table": [c.to_dict() for c in table]})
        return
    _print(table)


def _print(table: list[SplitComparison]) -> None:
    """One table per target, then the summary over targets."""
    console = _console()
    for comp in table:
        pct = comp.slo.percentile
        t = Table(show_header=True, header_style="bold", title=comp.slo.label())
        for col in ("deployment", "bound req/s", "met req/s", "per GPU", "load", f"{pct} TTFT ms",
                    f"{pct} TPOT ms", "next rate up failed on"):
            t.add_column(col, justify="left" if col in ("deployment", "next rate up failed on") else "right")
        for r in comp.results:
            d: dict[str, Any] = r.to_dict(comp.slo)
            mark = " *" if r.candidate.name == comp.winner else ""
            t.add_row(r.candidate.name + mark, _fmt(r.bound_rate_per_s, 2), _fmt(r.rate_met_per_s, 2),
                      _fmt(r.per_gpu, 2), _fmt(d["load"], 3), _fmt(d[f"{pct}_ttft_ms"]),
                      _fmt(d[f"{pct}_tpot_ms"]), r.reason)
        console.print(t)
    summary = Table(show_header=True, header_style="bold", title="summary")
    for col in ("TPOT target ms", "best co-located", "req/s", "best split", "req/s ", "winner"):
        summary.add_column(col, justify="right" if "req/s" in col or "target" in col else "left")
    for comp in table:
        rate = {r.candidate.name: r.rate_met_per_s for r in comp.results}
        summary.add_row(f"{comp.slo.tpot_ms:g}", comp.best_colocated or "none",
                        _fmt(rate.get(comp.best_colocated or "", 0.0), 2), comp.best_split or "none",
                        _fmt(rate.get(comp.best_split or "", 0.0), 2), comp.winner or "none")
    console.print(summary)
