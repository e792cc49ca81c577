"""Speed of the reference engine: simulated requests per wall second on the issue's workload.

Workload W1: Poisson arrivals at 1.5 requests/s, every request 290 prefill + 990 decode tokens,
staircase t(n) = 11.28 + 35.47 * ceil(n / 128) ms, Sarathi-Serve with b = 128, 20,000 requests.

    python bench/bench_engine.py [--requests N] [--repeat R]

Prints one row per repetition and the median. Timings are wall-clock on this machine; quote the
median and compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

from llmqueue import SARATHI, StaircaseTime, make_workload
from llmqueue.sim.run import simulate


def main() -> None:
    """Run W1 a few times and print requests/s and iterations/s."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    workload = make_workload("poisson", "290", "990", 1.5)
    batch_time = StaircaseTime(11.28, 35.47, 128)
    rates = []
    print(f"{'run':>4} {'requests':>9} {'wall s':>8} {'requests/s':>11} {'iterations/s':>13} "
          f"{'mean e2el s':>12} {'observed':>9}")
    for i in range(args.repeat):
        start = time.perf_counter()
        result = simulate(workload, SARATHI, batch_time, 128, seed=0, max_requests=args.requests)
        wall = time.perf_counter() - start
        m = result.metrics
        rates.append(m.arrivals / wall)
        print(f"{i:>4} {m.arrivals:>9} {wall:>8.2f} {m.arrivals / wall:>11,.0f} "
              f"{m.num_batches / wall:>13,.0f} {m.latency['mean_e2el_ms'] / 1000:>12.2f} "
              f"{result.observed.verdict:>9}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"median: {statistics.median(rates):,.0f} simulated requests per wall second "
          f"(reference engine, one core); peak RSS {peak_mib:,.0f} MiB")


if __name__ == "__main__":
    main()
