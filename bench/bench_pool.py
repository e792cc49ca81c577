"""Time and peak memory of a pool of replicas behind a router, in the compiled network loop.

One class of requests through one pool of 16 identical replicas (Sarathi-Serve, budget 2,048,
Llama-2-70B on 4xH100 preset) with router ``jsq`` at 0.9 of the pool's summed capacity,
1,000,000 requests by default. Each router (``--routers``) runs in its own child process, after
a 1,000-request warm-up in that process (it loads or compiles the numba loop, so the timed run
excludes compiling); the child prints its wall time, peak RSS (``ru_maxrss``) and the verdicts.

    python bench/bench_pool.py [--requests N] [--routers jsq,vllm-dp,...] [--replicas 16]

Figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = "--child"


def network(replicas: int, router: str) -> dict:
    """The pool's network file as a mapping (rate set afterwards from the analysis)."""
    return {
        "engines": {"chat": {"budget": 2048, "policy": "sarathi", "replicas": replicas, "router": router,
                             "batch_time": "preset:h100-llama2-70b-tp4-tokens"}},
        "classes": {"chat": {"rate": 1.0, "start": "answer", "nodes": {"answer": {
            "engine": "chat", "prefill": "poisson:1155", "decode": "poisson:211", "next": "exit"}}}},
    }


def child(requests: int, replicas: int, router: str, load: float) -> None:
    """Warm up, then time one run; print one JSON line."""
    from bench_network import peak_rss_mib

    from llmqueue.model.network import load_network
    from llmqueue.sim.network import simulate_network
    from llmqueue.theory.network import analyze

    net = load_network(network(replicas, router))
    net = net.scaled(load * analyze(net).critical_scale)
    simulate_network(net, seed=1, max_requests=1000)
    start = time.perf_counter()
    result = simulate_network(net, seed=1, max_requests=requests)
    wall_s = time.perf_counter() - start
    pool = result.pools["chat"]
    print(json.dumps({
        "router": router, "requests": requests, "wall_s": wall_s,
        "peak_rss_mib": peak_rss_mib(),
        "pool_rho": pool.rho, "predicted": pool.predicted.verdict, "observed": pool.observed.verdict,
        "visits_min": min(pool.visits), "visits_max": max(pool.visits),
        "mean_e2el_ms": result.classes["chat"].latency["mean_e2el_ms"],
        "compiled": not any("Python" in n for n in result.notes),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--load", type=float, default=0.9)
    parser.add_argument("--routers", default="jsq")
    parser.add_argument(CHILD, default=None)
    args = parser.parse_args()
    if args.child:
        child(args.requests, args.replicas, args.child, args.load)
        return
    print(f"{args.requests:,} requests, one pool of {args.replicas} identical replicas, load {args.load}")
    print(f"{'router':<12} {'wall s':>8} {'peak RSS MiB':>13} {'predicted':>10} {'observed':>10} "
          f"{'member visits':>17} {'mean E2EL ms':>13}")
    for router in args.routers.split(","):
        out = subprocess.run([sys.executable, __file__, CHILD, router, "--requests", str(args.requests),
                              "--replicas", str(args.replicas), "--load", str(args.load)],
                             check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"{row['router']:<12} {row['wall_s']:>8.2f} {row['peak_rss_mib']:>13.0f} "
              f"{row['predicted']:>10} {row['observed']:>10} "
              f"{row['visits_min']:>8,}-{row['visits_max']:<8,} {row['mean_e2el_ms']:>13.1f}")


if __name__ == "__main__":
    main()
