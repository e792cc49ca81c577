"""``llmqueue capacity`` and ``llmqueue region``: what a setting can carry (theory), with a KV
cache (a saturated run measures preemption thrash), under latency SLOs (a replicated search), and
the batch-size-limit stability region (§4)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from llmqueue.cli.common import (
    _bar,
    _check_knobs,
    _check_out_path,
    _console,
    _dump,
    _finite,
    _fmt,
    _given,
    _int_list,
    _policy,
    _print_doc,
    _shared_options,
    _sizes,
    _token_time,
    _workload,
)
from llmqueue.errors import ConfigError
from llmqueue.limits import MAX_LOAD, MAX_REQUESTS, MAX_SEEDS, MAX_TIME_MS, MIN_TOLERANCE
from llmqueue.policies.fcfs import POLICY_NAMES
from llmqueue.sim.settings import SATURATION_MIN_REQUESTS, SATURATION_REQUESTS

if TYPE_CHECKING:
    from llmqueue.model.batchtime import BatchTime
    from llmqueue.model.memory import KVCache
    from llmqueue.model.workload import Workload
    from llmqueue.sim.run import TheorySummary
    from llmqueue.studies.saturation import SaturationResult
    from llmqueue.theory.region import Exit, OperatingPoint, Region


def _saturation_requests(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """--saturation-requests: 0 skips the saturated run, else at least the saturation rule's minimum."""
    if 0 < value < SATURATION_MIN_REQUESTS:
        raise click.BadParameter(f"must be 0 (skip) or >= {SATURATION_MIN_REQUESTS} (got {value})",
                                 ctx=ctx, param=param)
    return value


_SLO_OPTIONS = ("slo_seeds", "slo_requests", "confidence", "tolerance", "policies", "budgets", "best_budget")
_SATURATION_OPTIONS = ("saturation_requests", "saturation_policy")


@click.command("capacity")
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
    from llmqueue.sim.run import summarize_theory
    from llmqueue.theory import capacity as theory

    _check_capacity_options(slo, policies, saturation_policy, opts)
    workload = _workload(opts)
    budget, k_max = opts["budget"], opts["k_max"]
    bt = _token_time(opts, workload.mean_prefill_tokens, workload.mean_decode_tokens)
    summary = summarize_theory(
        bt, budget, k_max, workload.rate_per_s,
        workload.mean_prefill_tokens, workload.mean_decode_tokens,
    )
    doc = _theory_doc(workload, bt, budget, k_max, summary)
    memory = opts["memory"]
    if memory is not None:
        saturation = None
        if saturation_requests:
            saturation = _saturated_run(workload, saturation_policy, saturation_requests, opts)
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
    _slo_capacity(doc, workload, slo, policies, budgets, best_budget, slo_seeds, slo_requests, confidence,
                  tolerance, opts)


def _check_capacity_options(slo: str | None, policies: str, saturation_policy: str,
                            opts: dict[str, Any]) -> None:
    """Refuse the SLO options without --slo, the saturated run's without --memory, and kfcfs
    knobs that no simulated policy reads."""
    for name in _SLO_OPTIONS:
        if slo is None and _given(name):
            raise click.UsageError(f"--{name.replace('_', '-')} given without --slo: the SLO "
                                   "search options need --slo")
    for name in _SATURATION_OPTIONS:
        if opts["memory"] is None and _given(name):
            raise click.UsageError(f"--{name.replace('_', '-')} given without --memory: the "
                                   "saturated run options need --memory")
    simulated = ([p.strip() for p in policies.split(",") if p.strip()] if slo is not None else [])
    simulated += [saturation_policy] if opts["memory"] is not None else []
    _check_knobs(simulated or ["(theory only)"])


def _theory_doc(workload: Workload, bt: BatchTime, budget: int, k_max: int | None,
                summary: TheorySummary) -> dict[str, Any]:
    """The setting and its theory, in the order ``llmqueue capacity`` prints them."""
    return {
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


def _saturated_run(workload: Workload, policy: str, requests: int, opts: dict[str, Any]) -> SaturationResult:
    """The saturated engine's rate with the KV cache (the saturation rule, preemption included)."""
    from llmqueue.studies.saturation import saturated_throughput_for

    try:
        return saturated_throughput_for(
            workload, _policy(policy, opts), opts["batch_time"], opts["budget"], opts["k_max"],
            opts["memory"], seed=opts["seed"], requests=requests, engine=opts["engine"],
        )
    except ConfigError as err:
        if err.field != "requests":
            raise
        raise ConfigError("saturation-requests", requests,
                          f"{err.problem}; 0 skips the saturated run") from None


def _memory_doc(memory: KVCache, workload: Workload, bt: BatchTime, budget: int, k_max: int | None,
                summary: TheorySummary, saturation: SaturationResult | None = None) -> dict[str, Any]:
    """What the KV cache does to the capacity: its batch-size limit, the §4 load with it (the
    no-thrash upper bound), the saturated engine's rate (the saturation rule, with preemption
    thrash), and the library's verdict and warning (``theory.stability.predict_memory``)."""
    from llmqueue.theory import capacity as theory
    from llmqueue.theory.stability import predict_memory

    p, d = workload.mean_prefill_tokens, workload.mean_decode_tokens
    rate = workload.rate_per_s
    rho, k_eff = theory.memory_load(rate, p, d, bt, budget, k_max, memory)
    prediction = predict_memory(
        load_full_batches=summary.load, kmax_load=summary.kmax_load, memory_load=rho,
        kv_tokens=memory.capacity_tokens, kv_requests=k_eff, rate_per_s=rate,
        saturated_rate_per_s=None if saturation is None else saturation.request_rate_per_s,
        preemptions=0 if saturation is None else saturation.preemptions,
        recomputed_tokens_per_request=0.0 if saturation is None else saturation.recomputed_tokens_per_request,
    )
    out: dict[str, Any] = {
        "memory": memory.spec,
        "memory_batch_limit": theory.memory_batch_limit(memory, p, d),
        "effective_k_max": k_eff,
        "memory_load": rho,
        "memory_critical_rate": rate / rho if rho > 0 else math.inf,
        "binding": prediction.binding,
    }
    if saturation is not None:
        sat = saturation.request_rate_per_s
        out.update(
            saturated_rate=sat,
            saturated_rate_ci_low=saturation.ci_low_per_s,
            saturated_rate_ci_high=saturation.ci_high_per_s,
            saturated_load=rate / sat,
            thrash_recomputed_tokens_per_request=saturation.recomputed_tokens_per_request,
            saturation_requests=saturation.requests,
        )
    out["verdict"] = prediction.label
    if prediction.warning is not None:
        out["warning"] = prediction.warning
    return out


def _slo_capacity(doc: dict[str, Any], workload: Workload, slo: str, policies: str, budgets: str | None,
                  best_budget: bool, slo_seeds: int, slo_requests: int, confidence: float,
                  tolerance: float, opts: dict[str, Any]) -> None:
    """``capacity --slo``: search, then print ``doc`` with the results (JSON) or a table."""
    from llmqueue.studies.slo import parse_slo

    targets = parse_slo(slo)
    names = [p.strip() for p in policies.split(",") if p.strip()]
    if not names:
        raise click.BadParameter("no policy named", param_hint="--policies")
    for name in names:
        _policy(name, opts)
    budget_list = [opts["budget"]] if budgets is None else _int_list(budgets, "--budgets")
    seeds = tuple(range(slo_seeds))
    rows, statement = _slo_search(workload, names, targets, budget_list, best_budget, seeds, slo_requests,
                                  confidence, tolerance, opts)
    doc["slo"] = targets
    doc["slo_results"] = rows
    doc["slo_statement"] = statement
    if opts["as_json"]:
        _dump(doc)
        return
    _print_slo(workload, rows, targets, best_budget, seeds, slo_requests, confidence)


def _slo_search(workload: Workload, names: list[str], targets: dict[str, float], budget_list: list[int],
                best_budget: bool, seeds: tuple[int, ...], slo_requests: int, confidence: float,
                tolerance: float, opts: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """One row per policy and budget (or per candidate budget with --best-budget), and the claim's
    statement; a progress bar counts the evaluated rates."""
    from llmqueue.studies.slo import best_budget_for_slo, max_rate_under_slo, max_steps

    sizes = _sizes(opts)
    k_max = opts["k_max"]
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
    return rows, statement


def _print_slo(workload: Workload, rows: list[dict[str, Any]], targets: dict[str, float], best_budget: bool,
               seeds: tuple[int, ...], slo_requests: int, confidence: float) -> None:
    """The SLO search's table, with the targets above it and the claim below."""
    from llmqueue.studies.slo import claim as slo_claim
    from llmqueue.studies.slo import is_deterministic

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


@click.command("region")
@_shared_options
@click.option("--region-load", "region_load", type=_finite(0, MAX_LOAD, min_open=True), default=None,
              help="Move the operating point along its ray to this load against the region.")
@click.option("--margin", type=_finite(0, 1, max_open=True), default=0.0,
              show_default=True, help="Inside means region load <= 1 - margin.")
@click.option("--plot", "plot_path", default=None, help="Write a PNG of the region here.")
def region_cmd(region_load: float | None, margin: float, plot_path: str | None, **opts: Any) -> None:
    """The batch-size-limit stability region (§4): vertices, vertex C, the operating point's load."""
    from llmqueue.theory import capacity as theory
    from llmqueue.theory.region import OperatingPoint, plot_region, region

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
    doc = _region_doc(reg, point, exit_, margin, opts["batch_time"].spec)
    if plot_path:
        plot_region(reg, plot_path, {f"{point.rate_per_s:.4g} req/s": point})
        doc["plot"] = plot_path
    if opts["as_json"]:
        _dump(doc)
        return
    _print_region(reg, point, exit_, doc, margin, plot_path)


def _region_doc(reg: Region, point: OperatingPoint, exit_: Exit, margin: float,
                batch_time: str) -> dict[str, Any]:
    """The region, the operating point and where its ray leaves the region, as one document."""
    rates = point.token_rates_per_s
    return {
        "budget": reg.budget,
        "k_max": reg.k_max,
        "batch_time": batch_time,
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


def _print_region(reg: Region, point: OperatingPoint, exit_: Exit, doc: dict[str, Any], margin: float,
                  plot_path: str | None) -> None:
    """The region's vertices as a table, then the operating point and where its ray leaves."""
    rates = point.token_rates_per_s
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


