"""Time and peak memory of a prefill/decode (P/D) disaggregated fleet in the compiled network loop.

The fleet of examples/networks/disagg.toml (Llama-2-70B on 4xH100 per replica: 4 prefill replicas
behind ``jsq-tokens``, 12 decode replicas behind ``jsq``, a shared KV link) without the decode
side's KV cache (an engine with a cache runs on the Python fast engine), its class's rate set to
``--load`` of the critical scale, 1,000,000 requests by default. Each case runs in its own child
process, after a 1,000-request warm-up in that process (it loads or compiles the numba loop, so
the timed run excludes compiling); the child prints its wall time, peak RSS (``ru_maxrss``), the
pair's figures and whether the routing ran compiled. ``--python`` also times the same run with the
routing in Python (over the same compiled engines), ``--file`` the example file itself (its KV
cache: fast engines, routing in Python).

    python bench/bench_disagg.py [--requests N] [--load 0.85] [--python] [--file]

Figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

CHILD = "--child"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "networks" / "disagg.toml"


def child(case: str, requests: int, load: float) -> None:
    """Warm up, then time one run; print one JSON line."""
    from bench_network import peak_rss_mib

    from llmqueue.model.network import load_network
    from llmqueue.sim.network import _Run, simulate_network
    from llmqueue.theory.network import analyze

    spec = tomllib.loads(EXAMPLE.read_text())
    if case != "file":
        del spec["engines"]["decode"]["memory"]
    net = load_network(spec)
    if case != "file":
        net = net.scaled(load * analyze(net).critical_scale)
    simulate_network(net, seed=1, max_requests=1000)
    start = time.perf_counter()
    if case == "python":  # the same engines, the routing in Python
        result = _Run(net, analyze(net), 1, requests, None, None, {}, compiled_routing=False).result()
    else:
        result = simulate_network(net, seed=1, max_requests=requests)
    wall_s = time.perf_counter() - start
    pair = result.pairs["llama"]
    print(json.dumps({
        "case": case, "requests": requests, "wall_s": wall_s,
        "peak_rss_mib": peak_rss_mib(),
        "rho": pair.rho, "observed": result.observed.verdict, "completed": pair.completed,
        "mean_ttft_ms": pair.latency["mean_ttft_ms"], "p99_tpot_ms": pair.latency["p99_tpot_ms"],
        "link_utilisation": pair.link_utilisation,
        "routing": "python" if case != "compiled" else "compiled",
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--load", type=float, default=0.85)
    parser.add_argument("--python", action="store_true", help="also time the routing in Python")
    parser.add_argument("--file", action="store_true", help="also time the example file (KV cache)")
    parser.add_argument(CHILD, default=None)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.requests, args.load)
        return
    cases = ["compiled", *(["python"] if args.python else []), *(["file"] if args.file else [])]
    print(f"{args.requests:,} requests, 4 prefill + 12 decode replicas, load {args.load} "
          "(file: the example's own rate and KV cache)")
    print(f"{'case':<10} {'routing':<9} {'wall s':>8} {'peak RSS MiB':>13} {'rho':>6} {'observed':>9} "
          f"{'mean TTFT ms':>13} {'p99 TPOT ms':>12} {'link util':>10}")
    for case in cases:
        out = subprocess.run([sys.executable, __file__, CHILD, case, "--requests", str(args.requests),
                              "--load", str(args.load)], check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"{row['case']:<10} {row['routing']:<9} {row['wall_s']:>8.2f} {row['peak_rss_mib']:>13.0f} "
              f"{row['rho']:>6.3f} {row['observed']:>9} {row['mean_ttft_ms']:>13.1f} "
              f"{row['p99_tpot_ms']:>12.2f} {row['link_utilisation']:>10.3f}")


if __name__ == "__main__":
    main()
