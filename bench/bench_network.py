"""Time a network run of the agent example: end-to-end tasks and engine visits per wall second.

Runs ``simulate_network`` on ``examples/networks/agent.toml`` (or ``--file``) for ``--requests``
end-to-end requests (default 100,000), or for ``--duration-s`` simulated seconds of arrivals, in
this process, then prints the wall time, end-to-end requests per wall second, engine visits per
wall second, the peak resident set size (``resource.getrusage``, the whole process: interpreter,
numpy and the run) and the network verdict.

    .venv/bin/python bench/bench_network.py [--file F] [--requests 100000 | --duration-s S]
        [--seed 0] [--drain-s S] [--policy NAME] [--json]
        [--engine auto|compiled|fast|reference] [--routing compiled|python]

``--routing python`` keeps the routing between compiled engines in the Python loop (the path
before the routing was compiled; the same run), for comparison. ``--policy`` runs every engine
with that policy (``max-pressure``, ``sarathi``, ...) instead of the file's. The network policies
on the Rybko-Stolyar network (the compiled network loop runs class priority and max-pressure):

    .venv/bin/python bench/bench_network.py --file examples/networks/rs.toml --duration-s 60 --drain-s 0
    .venv/bin/python bench/bench_network.py --file examples/networks/rs.toml --duration-s 60 --drain-s 0 \
        --policy max-pressure   (and --policy sarathi, the FCFS baseline at the same load)

Run it in its own process (as above): the peak RSS is the process's high-water mark.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from llmqueue.model.network import Network, load_network
from llmqueue.sim.network import NetworkResult, _Run, simulate_network
from llmqueue.theory.network import analyze

AGENT_FILE = Path(__file__).resolve().parent.parent / "examples" / "networks" / "agent.toml"


def peak_rss_mib() -> float:
    """The process's peak resident set size in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def with_policy(net: Network, policy: str | None) -> Network:
    """``net`` with every engine running ``policy`` (None: the file's policies)."""
    if policy is None:
        return net
    engines = {name: dataclasses.replace(spec, policy=policy) for name, spec in net.engines.items()}
    return Network(engines, net.classes)


def run(path: Path, requests: int | None, seed: int, drain_s: float | None,
        engine: str = "auto", routing: str = "compiled", duration_s: float | None = None,
        policy: str | None = None) -> dict[str, object]:
    """Simulate ``requests`` end-to-end requests (or ``duration_s`` seconds of arrivals) of the
    network at ``path``; return the figures. ``routing="python"``: the routing between compiled
    engines stays in the Python loop. ``policy``: every engine's policy (None: the file's)."""
    net = with_policy(load_network(path), policy)

    def simulate(n: int | None, seconds: float | None) -> NetworkResult:
        if routing == "python":
            return _Run(net, analyze(net), seed, n, None if seconds is None else seconds * 1000.0,
                        drain_s, {}, engine, compiled_routing=False).result()  # type: ignore[arg-type]
        return simulate_network(net, seed=seed, max_requests=n, duration_s=seconds, drain_s=drain_s,
                                engine=engine)  # type: ignore[arg-type]

    if engine in ("auto", "compiled"):  # load the compiled code from its cache first, untimed
        simulate(10, None)
    started = time.perf_counter()
    result = simulate(requests, duration_s)
    wall = time.perf_counter() - started
    arrivals = sum(c.arrivals for c in result.classes.values())
    completed = sum(c.completed for c in result.classes.values())
    return {
        "file": os.path.relpath(path),
        "requests": requests,
        "duration_s": duration_s,
        "policy": policy,
        "seed": seed,
        "engine": engine,
        "routing": routing,
        "arrivals": arrivals,
        "completed": completed,
        "visits": result.visits,
        "simulated_s": result.duration_s,
        "wall_s": wall,
        "requests_per_wall_s": completed / wall,
        "visits_per_wall_s": result.visits / wall,
        "peak_rss_mib": peak_rss_mib(),
        "stable_predicted": result.predicted.verdict,
        "stable_observed": result.observed.verdict,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, run once, print the figures; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=AGENT_FILE, help="network file")
    parser.add_argument("--requests", type=int, default=None,
                        help="end-to-end requests (default 100,000 unless --duration-s)")
    parser.add_argument("--duration-s", type=float, default=None,
                        help="simulated seconds of arrivals instead of a number of requests")
    parser.add_argument("--policy", default=None,
                        help="every engine's policy (default: the file's), e.g. max-pressure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drain-s", type=float, default=None,
                        help="drain after the last arrival (default: the simulator's)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--engine", choices=("auto", "compiled", "fast", "reference"), default="auto",
                        help="engines: compiled where the policy allows (auto), or all in Python")
    parser.add_argument("--routing", choices=("compiled", "python"), default="compiled",
                        help="with every engine compiled, route in compiled code too (default) or "
                             "in the Python loop (the earlier path, for comparison)")
    args = parser.parse_args(argv)
    if args.requests is not None and args.duration_s is not None:
        parser.error("give --requests or --duration-s, not both")
    if args.requests is None and args.duration_s is None:
        args.requests = 100_000
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be >= 1")
    if args.duration_s is not None and not args.duration_s > 0:
        parser.error("--duration-s must be > 0")
    figures = run(args.file, args.requests, args.seed, args.drain_s, args.engine, args.routing,
                  args.duration_s, args.policy)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    size = (f"{figures['requests']:,} end-to-end requests" if figures["requests"] is not None
            else f"{figures['duration_s']:g} s of arrivals")
    policy = "" if figures["policy"] is None else f", every engine {figures['policy']}"
    print(f"network {figures['file']}: {size}, seed {figures['seed']}, "
          f"engine {figures['engine']}, routing {figures['routing']}{policy}")
    print(f"  completed            {figures['completed']:,} of {figures['arrivals']:,}")
    print(f"  engine visits        {figures['visits']:,}")
    print(f"  simulated time       {figures['simulated_s']:,.0f} s")
    print(f"  wall                 {figures['wall_s']:.1f} s")
    print(f"  requests / wall s    {figures['requests_per_wall_s']:,.0f}")
    print(f"  visits / wall s      {figures['visits_per_wall_s']:,.0f}")
    print(f"  peak RSS             {figures['peak_rss_mib']:.0f} MiB")
    print(f"  verdict              predicted {figures['stable_predicted']}, "
          f"observed {figures['stable_observed']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
