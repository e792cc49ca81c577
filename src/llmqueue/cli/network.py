"""``llmqueue network analyze|simulate``: networks of engines (AI agents), from the traffic
equations and by simulation on one clock."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from llmqueue.cli.common import _check_out_path, _console, _dump, _finite, _fmt
from llmqueue.limits import MAX_DURATION_S, MAX_REQUESTS, MAX_SCALE, MAX_SEED
from llmqueue.sim.settings import DEFAULT_NETWORK_REQUESTS

if TYPE_CHECKING:
    from llmqueue.model.network import Network
    from llmqueue.sim.network import NetworkResult
    from llmqueue.theory.network import Analysis


@click.group("network")
def network_group() -> None:
    """Networks of engines (AI agents): analysis from the traffic equations, and simulation."""


def _rows(net: Network, members: bool) -> list[tuple[str, str | None]]:
    """The table rows in order: (engine, None) for a plain engine, (pool, pool) for a pool's row,
    followed by (member, pool) rows when ``members``."""
    rows: list[tuple[str, str | None]] = []
    for name in net.engines:
        pool = net.pool_of(name)
        if pool is None:
            rows.append((name, None))
        elif name == net.pools[pool].members[0]:
            rows.append((pool, pool))
            if members:
                rows.extend((m, pool) for m in net.pools[pool].members)
    return rows


def _joined(values: list[str]) -> str:
    """Distinct values in order, joined (a pool's members' settings)."""
    return "/".join(dict.fromkeys(values))


def _print_analysis(console: Console, analysis: Analysis, net: Network, members: bool = False) -> None:
    """Per-engine loads (bottleneck marked), one row per pool (its members with ``members``), the
    critical scale, visits and warnings."""
    table = Table(show_header=True, header_style="bold")
    cached = any(e.memory is not None for e in net.engines.values())
    memory_cols = ("KV tokens", "k_mem") if cached else ()
    for col in ("engine", "policy", "b", "k_max", *memory_cols, "prefill tok/s", "decode tok/s",
                "capacity tok/s", "load (rho)"):
        table.add_column(col, justify="left" if col in ("engine", "policy") else "right")
    for name, pool in _rows(net, members):
        if pool is not None and name == pool:  # the pool's own row: its members summed
            p = analysis.pools[pool]
            specs = [net.engines[m] for m in p.members]
            mark = " <- bottleneck" if analysis.bottleneck in p.members else ""
            memory = (_joined([f"{e.memory.capacity_tokens:,}" if e.memory else "-" for e in specs]),
                      "-") if cached else ()
            table.add_row(f"{pool} ({len(p.members)} x, {p.router})", _joined([e.policy for e in specs]),
                          _joined([str(e.budget) for e in specs]),
                          _joined([str(e.k_max or "-") for e in specs]), *memory,
                          _fmt(sum(analysis.engines[m].prefill_tokens_per_s for m in p.members)),
                          _fmt(sum(analysis.engines[m].decode_tokens_per_s for m in p.members)),
                          _fmt(p.capacity_tokens_per_s), f"{p.rho:.3f}{mark}")
            continue
        load = analysis.engines[name]
        spec = net.engines[name]
        mark = " <- bottleneck" if name == analysis.bottleneck else ""
        memory = (f"{spec.memory.capacity_tokens:,}" if spec.memory else "-",
                  str(load.memory_batch_limit or "-")) if cached else ()
        table.add_row(name if pool is None else f"  {name}", spec.policy, str(spec.budget),
                      str(spec.k_max or "-"), *memory,
                      _fmt(load.prefill_tokens_per_s), _fmt(load.decode_tokens_per_s),
                      _fmt(load.capacity_tokens_per_s), f"{load.rho:.3f}{mark}")
    console.print(table)
    for p in analysis.pools.values():
        rhos = [analysis.engines[m].rho for m in p.members]
        console.print(f"pool {p.pool}: {len(p.members)} members, router {p.router}, load "
                      f"{p.rho:.3f} of the summed capacity; member loads {min(rhos):.3f}-{max(rhos):.3f} "
                      f"({'1/N of the visits each' if p.split == 'even' else 'split by capacity'})")
    for q in analysis.pairs.values():
        pair = net.pairs[q.pair]
        console.print(f"pair {q.pair}: prefill {pair.prefill} load {q.prefill_rho:.3f}, decode {pair.decode} "
                      f"load {q.decode_rho:.3f}, link load {q.link_rho:.3f}"
                      f"{'' if pair.shared_link else ' (pure delay)'}; critical scale {q.critical_scale:.4g}")
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
@click.option("--members", is_flag=True, help="Also print a row per pool member.")
def network_analyze_cmd(path: str, scale: float, as_json: bool, members: bool) -> None:
    """Per-engine loads, the bottleneck and the critical scaling of the arrival rates (no simulation)."""
    from llmqueue.model.network import load_network
    from llmqueue.sim.network import predict_network, predict_pool
    from llmqueue.theory.network import analyze as analyze_network

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
            **({"pools": {n: {"router": p.router, "members": list(p.members), "rho": p.rho,
                              "capacity_tokens_per_s": p.capacity_tokens_per_s, "split": p.split,
                              "overloaded_members": list(analysis.overloaded_members(n)),
                              "predicted": predict_pool(net, analysis, n).verdict,
                              "predicted_reason": predict_pool(net, analysis, n).reason}
                          for n, p in analysis.pools.items()}} if analysis.pools else {}),
            **({"pairs": {n: {"prefill": net.pairs[n].prefill, "decode": net.pairs[n].decode,
                              "prefill_rho": q.prefill_rho, "decode_rho": q.decode_rho,
                              "link_rho": q.link_rho, "rho": q.rho, "critical_scale": q.critical_scale}
                          for n, q in analysis.pairs.items()}} if analysis.pairs else {}),
        })
        return
    console = _console()
    _print_analysis(console, analysis, net, members)
    for pool in analysis.pools:
        verdict = predict_pool(net, analysis, pool)
        console.print(f"pool {pool} predicted: [bold]{verdict.verdict}[/] ({verdict.reason})")
    prediction = predict_network(net, analysis)
    console.print(f"predicted: [bold]{prediction.verdict}[/] ({prediction.reason})")


@network_group.command("simulate")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("--scale", type=_finite(0, MAX_SCALE, min_open=True), default=1.0, show_default=True,
              help="Multiply every class's arrival rate by this.")
@click.option("--requests", "requests_", type=click.IntRange(1, MAX_REQUESTS), default=None,
              help=f"External arrivals over all classes (default {DEFAULT_NETWORK_REQUESTS} unless "
              "--duration-s).")
@click.option("--duration-s", "duration_s", type=_finite(0, MAX_DURATION_S, min_open=True), default=None,
              help="Arrivals stop at this simulated time (s).")
@click.option("--drain-s", "drain_s", type=_finite(0, MAX_DURATION_S), default=None,
              help="After the last arrival, run at most this long (default: the arrival window, "
              "at least 60 s).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--plot", "plot_path", default=None, help="PNG of the backlog per engine over time.")
@click.option("--members", is_flag=True, help="Also print a row per pool member.")
def network_simulate_cmd(path: str, scale: float, requests_: int | None, duration_s: float | None,
                         drain_s: float | None, seed: int, as_json: bool, plot_path: str | None,
                         members: bool) -> None:
    """Simulate the network: per-engine metrics, per-class end-to-end latency, verdicts."""
    from llmqueue.model.network import load_network
    from llmqueue.sim.network import simulate_network
    from llmqueue.sim.settings import arrival_limit

    if plot_path:
        _check_out_path(plot_path, (".png",), "--plot")
    net = load_network(path).scaled(scale)
    result = simulate_network(net, seed=seed, duration_s=duration_s, drain_s=drain_s,
                              max_requests=arrival_limit(requests_, duration_s,
                                                         default=DEFAULT_NETWORK_REQUESTS))
    if plot_path:
        _plot_network(result, plot_path)
    if as_json:
        _dump(result.to_dict())
        return
    console = _console()
    _print_analysis(console, result.analysis, net, members)
    table = Table(show_header=True, header_style="bold")
    cached = any(e.memory is not None for e in result.engines.values())
    memory_cols = ("preemptions", "refused", "peak KV") if cached else ()
    for col in ("engine", "policy", "visits done", "tok/s", "mean TTFT ms", "p99 TTFT ms",
                "mean TPOT ms", "mean backlog", "slope tok/s", *memory_cols, "observed"):
        table.add_column(col, justify="left" if col in ("engine", "policy") else "right")
    for name, pool in _rows(net, members):
        if pool is not None and name == pool:
            table.add_row(*_pool_row(result, pool, cached))
            continue
        e = result.engines[name]
        m = e.metrics
        memory = (str(m.preemptions), str(m.rejected_requests),
                  "-" if e.memory is None else f"{m.peak_kv_usage:.2f}") if cached else ()
        table.add_row(name if pool is None else f"  {name}", e.policy, f"{m.completed}/{m.arrivals}",
                      _fmt(m.total_token_throughput),
                      _fmt(m.latency["mean_ttft_ms"]), _fmt(m.latency["p99_ttft_ms"]),
                      _fmt(m.latency["mean_tpot_ms"]), _fmt(m.mean_backlog_tokens, 0),
                      _fmt(e.observed.slope_tokens_per_s), *memory, e.observed.verdict)
    console.print(table)
    for p in result.pools.values():
        verdicts = [result.engines[m].observed.verdict for m in p.members]
        counts = ", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts))
        console.print(f"pool {p.name}: router {p.router}, member visits {min(p.visits):,}-{max(p.visits):,}; "
                      f"members observed: {counts}; predicted [bold]{p.predicted.verdict}[/] "
                      f"({p.predicted.reason}); observed [bold]{p.observed.verdict}[/]")
    if result.pairs:
        table = Table(show_header=True, header_style="bold")
        for col in ("pair", "completed", "in P/xfer/D", "refused", "mean TTFT ms", "p99 TTFT",
                    "mean TPOT ms", "p99 TPOT", "p99 E2EL", "xfer wait ms", "link busy", "rho"):
            table.add_column(col, justify="left" if col == "pair" else "right")
        for q in result.pairs.values():
            lat = q.latency
            where = f"{q.in_prefill}/{q.in_transfer}/{q.in_decode}"
            table.add_row(q.name, f"{q.completed}/{q.arrivals}", where, str(q.rejected),
                          _fmt(lat["mean_ttft_ms"]), _fmt(lat["p99_ttft_ms"]),
                          _fmt(lat["mean_tpot_ms"]), _fmt(lat["p99_tpot_ms"]), _fmt(lat["p99_e2el_ms"]),
                          _fmt(q.mean_transfer_wait_ms, 3),
                          f"{q.link_utilisation:.3f}" if q.shared_link else "-", f"{q.rho:.3f}")
        console.print(table)
    table = Table(show_header=True, header_style="bold")
    per_request = any(c.request_latency for c in result.classes.values())  # single-visit classes
    for col in ("class", "completed", "req/s", "mean E2EL ms", "p50", "p90", "p99", "in network",
                *(("refused",) if cached else ()), *(("p99 TTFT", "p99 TPOT") if per_request else ())):
        table.add_column(col, justify="left" if col == "class" else "right")
    for c in result.classes.values():
        lat = c.request_latency
        table.add_row(c.name, f"{c.completed}/{c.arrivals}", _fmt(c.request_throughput, 3),
                      _fmt(c.latency["mean_e2el_ms"]), _fmt(c.latency["median_e2el_ms"]),
                      _fmt(c.latency["p90_e2el_ms"]), _fmt(c.latency["p99_e2el_ms"]),
                      _fmt(c.mean_requests_in_network), *((str(c.rejected),) if cached else ()),
                      *((_fmt(lat.get("p99_ttft_ms")), _fmt(lat.get("p99_tpot_ms"))) if per_request else ()))
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


def _pool_row(result: NetworkResult, pool: str, cached: bool) -> tuple[str, ...]:
    """A pool's row of the simulate table: members summed (means weighted by completed visits;
    percentiles are per member only)."""
    p = result.pools[pool]
    ms = [result.engines[m].metrics for m in p.members]
    done = sum(m.completed for m in ms)

    def mean(key: str) -> str:
        return _fmt(sum(m.latency[key] * m.completed for m in ms) / done) if done else "-"

    memory = (str(sum(m.preemptions for m in ms)), str(sum(m.rejected_requests for m in ms)), "-") \
        if cached else ()
    return (f"{pool} ({len(p.members)} x)", _joined([result.engines[m].policy for m in p.members]),
            f"{done}/{sum(m.arrivals for m in ms)}", _fmt(p.token_throughput), mean("mean_ttft_ms"), "-",
            mean("mean_tpot_ms"), _fmt(sum(m.mean_backlog_tokens for m in ms), 0),
            _fmt(p.observed.slope_tokens_per_s), *memory, p.observed.verdict)


def _plot_network(result: NetworkResult, path: str) -> None:
    """Backlog per engine (tokens) and requests in the network per class, over time."""
    from llmqueue.io.plotting import pyplot, save

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
