"""``llmqueue plan``: the cheapest fleet (GPU type, deployment, replicas) for a workload that theory
predicts stable and that meets latency SLOs in simulation, searched in cost order and stored."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from llmqueue.cli.common import _console, _dump, _stderr
from llmqueue.io.store import LOCK_TIMEOUT_S
from llmqueue.limits import MAX_WORKERS

if TYPE_CHECKING:
    from llmqueue.studies.plan import PlanResult, Tried

_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "e2el": "E2EL"}


def _metric(key: str) -> str:
    """``p99_ttft_ms`` -> ``p99 TTFT``."""
    prefix, metric, _ = key.split("_")
    return f"{prefix} {_NAMES.get(metric, metric)}"


def _fleet(t: Tried) -> str:
    c = t.candidate
    return f"{c.fleet} ({c.shape.label.split(' ', 1)[1]}): {c.gpus} GPUs, ${c.cost_per_hour:,.2f}/h"


def _margin(t: Tried, result: PlanResult) -> str:
    from llmqueue.studies.plan import margin

    parts = [f"{_metric(k)} {v:,.0f} ms of {target:,.0f} ({v / target:.0%})"
             for k, v, target in margin(t, result.slo)]
    m = t.metrics
    parts.append(f"load {t.load:.3f} (predicted {m.get('stable_predicted')}, observed "
                 f"{m.get('stable_observed')})")
    return ", ".join(parts)


def _print(result: PlanResult, store_path: Path) -> None:
    console = _console()
    slo = ", ".join(f"{_metric(k)} <= {v:,.0f} ms" for k, v in result.slo.items())
    console.print(f"SLO: {slo}; theory: load < {1 - result.headroom:g} (headroom {result.headroom:g})",
                  soft_wrap=True)
    table = Table(box=None, header_style="bold")
    for name, justify in (("shape", "left"), ("replicas", "right"), ("GPUs", "right"),
                          ("$/h", "right"), ("load", "right"), ("result", "left"), ("why", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for t in result.tried:
        c = t.candidate
        scale = (f"{t.scale_low}-{c.scale}" if t.scale_low is not None and t.scale_low < c.scale
                 else str(c.scale))
        replicas = (scale if c.shape.ratio is None
                    else f"k={scale}: {c.prefill_replicas}P+{c.decode_replicas}D")
        status = t.status + (" (stored)" if t.stored else "")
        table.add_row(c.shape.label, replicas, f"{c.gpus:,}", f"{c.cost_per_hour:,.2f}", f"{t.load:.3f}",
                      status, t.reason)
    console.print(table)
    here = result.simulated - sum(1 for t in result.tried if t.status != "pruned" and t.stored)
    console.print(f"{result.pruned} candidate(s) pruned by theory, {result.simulated} simulated "
                  f"({here} here, {result.simulated - here} read from {store_path}) in "
                  f"{result.wall_s:.1f} s", soft_wrap=True)
    if result.capped:
        console.print("search stopped at search.max_simulations: the answer is the cheapest among the "
                      "candidates simulated, a cheaper one may be left", soft_wrap=True)
    if result.best is None:
        console.print("no fleet in the ranges given meets the SLOs", soft_wrap=True)
        return
    console.print(f"cheapest: {_fleet(result.best)}", soft_wrap=True)
    console.print(f"  margin: {_margin(result.best, result)}", soft_wrap=True)
    if result.runner_up is None:
        console.print("runner-up: none (no other shape passes within its range)", soft_wrap=True)
        return
    extra = result.runner_up.candidate.cost_per_hour / result.best.candidate.cost_per_hour - 1
    console.print(f"runner-up: {_fleet(result.runner_up)} (+{extra:.0%})", soft_wrap=True)
    console.print(f"  margin: {_margin(result.runner_up, result)}", soft_wrap=True)


@click.command("plan")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--store", "store_path", default=None,
              help="Results file (SQLite; default: CONFIG with the suffix .sqlite). A rerun reads "
                   "every simulation stored there instead of running it.")
@click.option("--workers", type=click.IntRange(min=1, max=MAX_WORKERS), default=None,
              help=f"Local worker processes, at most {MAX_WORKERS:,} (default: the number of CPUs).")
@click.option("--ray", "use_ray", is_flag=True, help="Run the simulations on a Ray cluster "
              "(pip install 'llmqueue[ray]').")
@click.option("--ray-address", "ray_address", default=None,
              help="Ray cluster address, with --ray (default: $RAY_ADDRESS, else a local Ray).")
@click.option("--lock-timeout", "lock_timeout_s", type=click.FloatRange(0, 1e6), default=LOCK_TIMEOUT_S,
              show_default=True, help="Seconds a write waits in all for another writer's lock.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
@click.option("--progress/--no-progress", default=None,
              help="Progress on stderr (default: on when stderr is a terminal).")
def plan_cmd(config_path: str, store_path: str | None, workers: int | None, use_ray: bool,
             ray_address: str | None, lock_timeout_s: float, as_json: bool, progress: bool | None) -> None:
    """Find the cheapest fleet for a workload: predicted stable by theory, meeting the SLOs in simulation.

    Candidates are GPU types x deployments (co-located pools, disaggregated P:D pairs) x replica
    counts; theory prunes the unstable ones, the rest are simulated in cost order until the
    cheapest passing fleet and the runner-up are known. Every simulation is stored: a rerun, or
    one with other SLOs, reads them back. Ctrl-C exits with code 130 (finished simulations are
    kept). Exit code 1 when no fleet in the ranges meets the SLOs.
    """
    from llmqueue.io.store import Store
    from llmqueue.studies.plan import load_plan, run_plan

    if ray_address is not None and not use_ray:
        raise click.UsageError("--ray-address needs --ray")
    plan = load_plan(config_path)
    path = Path(store_path) if store_path else Path(config_path).with_suffix(".sqlite")
    workers = workers or min(os.cpu_count() or 1, MAX_WORKERS)
    show = progress if progress is not None else sys.stderr.isatty()
    err = _stderr(show)

    def note(t: Any) -> None:
        err.print(f"plan: {t.candidate.fleet} ({t.candidate.shape.label}): {t.status}", soft_wrap=True)

    with Store(path, lock_timeout_s=lock_timeout_s) as store:
        result = run_plan(plan, store, workers=workers, backend="ray" if use_ray else "local",
                          ray_address=ray_address, on_simulated=note)
    if as_json:
        _dump({**result.to_dict(), "store": str(path)})
    else:
        _print(result, path)
    if result.interrupted is not None:
        click.echo("llmqueue: interrupted: finished simulations are stored; rerun to resume", err=True)
        raise click.exceptions.Exit(128 + result.interrupted)
    if result.best is None:
        raise click.exceptions.Exit(1)
