"""Compiled and Python fast engines against the reference engine: one table of simulated
requests per wall second.

    python bench/bench_fast.py            # every workload (minutes)
    python bench/bench_fast.py --quick    # 1/10 of the requests

The compiled engine (numba) is compiled once in a warm-up process first, and that time is
printed separately: the table's runs use the on-disk cache, as every run after the first does.
Loading that cache costs each new process a fixed time, shown as "load s" and not in "wall s".

Workloads (each case runs in its own process, so peak RSS is per case):
- W1: Poisson 1.5 requests/s, 290 + 990 tokens, staircase c=11.28, a=35.47, b0=128 (CodeLlama-34B
  on one A100), Sarathi-Serve b=128.
- W1x10: W1 with 10x the tokens and 1/10 the rate (same load): length independence.
- W2: the Azure conversation trace (one hour, 19,366 requests) with a staircase fitted to
  Llama-2-70B on 4 H100s (shared/data/profiles/splitwise_perf_model.csv, prefill and decode points,
  b0 = 128: c = 12.82 ms, a = 13.70 ms, R^2 0.999), Sarathi b=2048 and current vLLM with chunked
  prefill (max_num_batched_tokens 2048, max_num_seqs 256).
- W3: vanilla vLLM at 1.2x capacity (129 + 112 tokens, b = 512, CodeLlama staircase).
- W4-memory: Sarathi b=512, Poisson 11 requests/s of 64 + 512 tokens, linear c=10, a=0.05, a KV
  cache of 32,000 tokens: 0.9 of the closed-form memory limit but above the saturated rate
  (10.57 requests/s, docs/memory.md), so it thrashes (tens of thousands of preemptions) and is
  unstable; the "load" column is the token budget's, which ignores the cache.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from llmqueue import SARATHI, VLLM, VLLM_CHUNKED, LinearTime, StaircaseTime, make_workload
from llmqueue.model.memory import KVCache
from llmqueue.sim.run import simulate
from llmqueue.theory import capacity as theory

ROOT = Path(__file__).resolve().parents[1]
AZURE = ROOT.parent / "shared" / "data" / "traces" / "azure_conv_2023.csv"
CODELLAMA = StaircaseTime(11.28, 35.47, 128)
LLAMA70B_H100_TP4 = StaircaseTime(12.82, 13.70, 128)

ENGINES = ("compiled", "fast", "reference")
# name: (workload args, policy, batch time, budget, k_max, requests by engine[, memory]);
# an engine missing from "requests by engine" is not run for that case
CASES = {
    "W1": (("poisson", "290", "990", 1.5), SARATHI, CODELLAMA, 128, None,
           {"compiled": 200_000, "fast": 50_000, "reference": 20_000}),
    "W1x10": (("poisson", "2900", "9900", 0.15), SARATHI, CODELLAMA, 128, None,
              {"compiled": 200_000, "fast": 20_000, "reference": 2_000}),
    "W2-sarathi": ((f"trace:{AZURE}", None, None, None), SARATHI, LLAMA70B_H100_TP4, 2048, None,
                   {"compiled": None, "fast": None, "reference": None}),
    "W2-vllm-chunked": ((f"trace:{AZURE}", None, None, None), VLLM_CHUNKED, LLAMA70B_H100_TP4,
                        2048, 256, {"compiled": None, "fast": None, "reference": None}),
    "W3": (("poisson", "129", "112", None), VLLM, CODELLAMA, 512, None,
           {"compiled": 1_000_000, "fast": 200_000, "reference": 20_000}),
    "W4-memory": (("poisson", "64", "512", 11.0), SARATHI, LinearTime(10.0, 0.05), 512, None,
                  {"compiled": 200_000, "fast": 50_000, "reference": 10_000},
                  KVCache(32000, block_tokens=16, watermark=0.01)),
}


def run_case(name: str, engine: str, scale: float) -> dict[str, object]:
    """Run one case in this process and return its figures."""
    args, policy, batch_time, budget, k_max, sizes, *rest = CASES[name]
    memory = rest[0] if rest else None
    arrival, prefill, decode, rate = args
    if name == "W3":
        rate = 1.2 * theory.critical_rate_per_s(batch_time, budget, 241)
    workload = make_workload(arrival, prefill, decode, rate)
    requests = sizes[engine]
    if requests is not None:
        requests = max(1, int(requests * scale))
    start = time.perf_counter()
    if engine == "compiled":  # load the compiled code from the cache (once per process)
        simulate(make_workload("poisson", "9", "9", 1.0), policy, batch_time, budget, k_max=k_max,
                 max_requests=5, engine=engine)
    load = time.perf_counter() - start
    start = time.perf_counter()
    result = simulate(workload, policy, batch_time, budget, k_max=k_max, seed=0,
                      max_requests=requests, engine=engine, keep_requests=False, memory=memory)
    wall = time.perf_counter() - start
    m = result.metrics
    return {
        "workload": name, "engine": engine, "requests": m.arrivals, "wall_s": wall,
        "requests_per_s": m.arrivals / wall, "iterations_per_s": m.num_batches / wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "observed": result.observed.verdict, "mean_e2el_s": m.latency["mean_e2el_ms"] / 1000,
        "load": result.theory.load, "latency_exact": m.latency_exact, "load_s": load,
    }


def main() -> None:
    """Run every case in a child process and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1/10 of the requests")
    parser.add_argument("--only", default=None, help="comma-separated workload names")
    parser.add_argument("--case", nargs=2, metavar=("WORKLOAD", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    if args.case:
        print(json.dumps(run_case(args.case[0], args.case[1], scale)))
        return
    names = args.only.split(",") if args.only else list(CASES)
    start = time.perf_counter()
    warm = "from llmqueue import *; simulate(make_workload('poisson','9','9',1.0), SARATHI, " \
        "ConstantTime(1.0), 8, max_requests=5, engine='compiled')"
    subprocess.run([sys.executable, "-c", warm], check=True)
    print(f"compiled engine: first call (compile or load the cache) "
          f"{time.perf_counter() - start:.1f} s, not counted below")
    print(f"{'workload':<16} {'engine':<10} {'requests':>9} {'wall s':>8} {'requests/s':>11} "
          f"{'iterations/s':>13} {'peak RSS MiB':>13} {'load':>6} {'observed':>9} {'E2EL s':>9} "
          f"{'pctl':>6} {'load s':>7}")
    for name in names:
        for engine in ENGINES:
            if engine not in CASES[name][5]:
                continue
            cmd = [sys.executable, __file__, "--case", name, engine] + (["--quick"] if args.quick else [])
            out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            print(f"{name:<16} {engine:<10} {out['requests']:>9} {out['wall_s']:>8.2f} "
                  f"{out['requests_per_s']:>11,.0f} {out['iterations_per_s']:>13,.0f} "
                  f"{out['peak_rss_mib']:>13,.0f} {out['load']:>6.2f} {out['observed']:>9} "
                  f"{out['mean_e2el_s']:>9.2f} {'exact' if out['latency_exact'] else 'hist':>6} "
                  f"{out['load_s']:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
