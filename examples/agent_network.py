"""An AI agent as a network of LLM engines: analysis, simulation and the effect of the policy.

The agent (``examples/networks/agent.toml``): a planner (Llama-2-70B) forks each task to a
tool-calling model (Llama-3-8B) and a sub-agent (CodeLlama-34B); when both are done a critic
(Llama-2-70B) reviews the work and sends it back to the planner with probability 0.3.

The script prints the analysis (traffic equations, per-engine loads, bottleneck, critical scale =
capacity in tasks/s, warnings), simulates the file as given (0.80 of its critical scale) and prints
per-engine and per-task figures with the verdicts, then runs the same network with the planner and
the critic on vanilla vLLM, Sarathi and Orca (and the file's vllm-chunked) at loads 0.80 and 0.95
of the critical scale and prints a comparison table.

    .venv/bin/python examples/agent_network.py [--tasks 20000] [--compare-tasks 10000] [--seed 1]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

from llmqueue.model.network import Network, load_network
from llmqueue.policies.fcfs import make_policy
from llmqueue.sim.network import NetworkResult, simulate_network
from llmqueue.theory.network import Analysis, analyze

AGENT_FILE = Path(__file__).resolve().parent / "networks" / "agent.toml"
COMPARED_POLICIES = ("vllm-chunked", "vllm", "sarathi", "orca")
COMPARED_LOADS = (0.80, 0.95)
SWAPPED_ENGINES = ("planner", "critic")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table, columns right-aligned except the first."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def task_rate(net: Network) -> float:
    """External arrival rate of all classes together (tasks/s)."""
    return sum(c.rate_per_s for c in net.classes.values())


def print_analysis(net: Network, analysis: Analysis) -> None:
    """Traffic equations, per-engine loads, bottleneck, critical scale and warnings."""
    print("== analysis (traffic equations, no simulation)")
    for cname, visits in analysis.visits.items():
        c = net.classes[cname]
        parts = ", ".join(f"{nid} {v:.3f}" for nid, v in visits.items() if c.nodes[nid].kind == "visit")
        print(f"class {cname}: {c.rate_per_s:g} tasks/s; expected visits per task: {parts}")
    rows = []
    for name, load in analysis.engines.items():
        spec = net.engines[name]
        rows.append([name, spec.policy, str(spec.budget), str(spec.k_max), spec.batch_time.spec,
                     f"{load.prefill_tokens_per_s:,.0f}", f"{load.decode_tokens_per_s:,.0f}",
                     f"{load.capacity_tokens_per_s:,.0f}", f"{load.rho:.3f}"])
    print(_table(["engine", "policy", "budget", "k_max", "batch time (ms)", "prefill tok/s",
                  "decode tok/s", "capacity tok/s", "rho"], rows))
    scale = analysis.critical_scale
    print(f"bottleneck: {analysis.bottleneck} (rho {analysis.engines[analysis.bottleneck].rho:.3f})")
    print(f"critical scale: {scale:.4f} -> capacity {task_rate(net) * scale:.3f} tasks/s; "
          f"the file runs at {1 / scale:.3f} of it")
    for w in analysis.warnings:
        print(f"warning: {w}")


def print_result(result: NetworkResult, wall_s: float) -> None:
    """Per-engine and per-class metrics, verdicts and notes of one run."""
    print(f"simulated {result.duration_s:,.0f} s ({result.visits:,} engine visits) in {wall_s:.1f} s wall")
    rows = []
    for name, e in result.engines.items():
        m, lat = e.metrics, e.metrics.latency
        rows.append([name, e.policy, f"{e.rho:.3f}", f"{m.arrivals:,}", f"{m.completed:,}",
                     f"{m.request_throughput:.3f}", f"{lat['mean_ttft_ms'] / 1000:.2f}",
                     f"{lat['mean_tpot_ms']:.0f}", f"{lat['mean_e2el_ms'] / 1000:.1f}",
                     f"{lat['p99_e2el_ms'] / 1000:.1f}", f"{m.mean_batch_tokens:.0f}",
                     f"{m.busy_fraction:.2f}", e.observed.verdict])
    print(_table(["engine", "policy", "rho", "visits", "done", "visits/s", "TTFT s", "TPOT ms",
                  "E2E s", "p99 s", "batch tok", "busy", "observed"], rows))
    rows = []
    for name, c in result.classes.items():
        lat = c.latency
        rows.append([name, f"{c.arrivals:,}", f"{c.completed:,}", f"{c.request_throughput:.3f}",
                     f"{lat['mean_e2el_ms'] / 1000:.1f}", f"{lat['median_e2el_ms'] / 1000:.1f}",
                     f"{lat['p90_e2el_ms'] / 1000:.1f}", f"{lat['p99_e2el_ms'] / 1000:.1f}",
                     f"{c.mean_requests_in_network:.1f}"])
    print(_table(["class", "arrivals", "done", "tasks/s", "E2E mean s", "p50 s", "p90 s", "p99 s",
                  "in network"], rows))
    print(f"network verdict: predicted {result.predicted.verdict} ({result.predicted.reason}); "
          f"observed {result.observed.verdict} (backlog slope "
          f"{result.observed.slope_tokens_per_s:+.0f} tokens/s)")
    for note in result.notes:
        print(f"note: {note}")


def compare_policies(net: Network, analysis: Analysis, tasks: int, seed: int) -> list[list[str]]:
    """The same network with planner and critic on each compared policy, at each compared load."""
    rows = []
    for load in COMPARED_LOADS:
        # the file itself sits at 0.80: run it unchanged there (the main run's row), else rescale
        factor = load * analysis.critical_scale
        scaled = net if math.isclose(factor, 1.0, rel_tol=1e-3) else net.scaled(factor)
        for name in COMPARED_POLICIES:
            policy = make_policy(name)
            started = time.perf_counter()
            r = simulate_network(scaled, seed=seed, max_requests=tasks,
                                 policies=dict.fromkeys(SWAPPED_ENGINES, policy))
            wall = time.perf_counter() - started
            c = next(iter(r.classes.values()))
            lat = c.latency
            peak = max((n for _, n in c.series if not math.isnan(n)), default=math.nan)
            wasted = r.engines["subagent"].metrics.wc_wasted_fraction
            rows.append([f"{load:.2f}", name, f"{c.request_throughput:.3f}",
                         f"{lat['mean_e2el_ms'] / 1000:.1f}", f"{lat['median_e2el_ms'] / 1000:.1f}",
                         f"{lat['p90_e2el_ms'] / 1000:.1f}", f"{lat['p99_e2el_ms'] / 1000:.1f}",
                         f"{c.mean_requests_in_network:.0f}", f"{peak:.0f}", f"{wasted:.2f}",
                         r.observed.verdict, f"{wall:.1f}"])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=AGENT_FILE, help="network file (the agent)")
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks of the main run")
    parser.add_argument("--compare-tasks", type=int, default=10_000, help="tasks per comparison run")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    net = load_network(args.file)
    analysis = analyze(net)
    print_analysis(net, analysis)

    print(f"\n== simulation: {args.tasks:,} tasks, seed {args.seed}")
    started = time.perf_counter()
    result = simulate_network(net, seed=args.seed, max_requests=args.tasks)
    print_result(result, time.perf_counter() - started)

    print(f"\n== policy of planner and critic ({args.compare_tasks:,} tasks per run, seed {args.seed}; "
          "tools and subagent stay on vllm-chunked)")
    rows = compare_policies(net, analysis, args.compare_tasks, args.seed)
    print(_table(["load", "policy", "tasks/s", "E2E mean s", "p50 s", "p90 s", "p99 s", "in net",
                  "peak in net", "subagent wasted", "observed", "wall s"], rows))
    print("load: fraction of the critical scale; tasks/s: completed / simulated time (drain included); "
          "in net: time-mean tasks in the network (peak: of the 512-point series); subagent wasted: "
          "its budget share left unused while work waited (k_max binding).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
