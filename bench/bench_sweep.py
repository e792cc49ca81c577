"""Sweep throughput: 4 policies x 20 loads x 3 seeds x 100,000 requests on a local process pool.

    python bench/bench_sweep.py               # the full target grid (240 runs)
    python bench/bench_sweep.py --requests 10000 --workers 1

Prints the wall time of `llmqueue sweep` (a fresh results file, so every run is made), the runs
and simulated requests per wall second, and the observed verdicts per policy. The loads span
0.5 to 1.45 of lambda* (CodeLlama-34B staircase, b = 512, 129 + 112 tokens, Poisson arrivals).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

CONFIG = """
[grid]
policies = ["fastertransformer", "vllm", "orca", "sarathi"]
loads = {{start = 0.5, stop = 1.45, num = 20}}
seeds = [0, 1, 2]
budgets = [512]

[run]
requests = {requests}
"""


def main() -> None:
    """Run the sweep once in a child process and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    llmqueue = Path(sys.executable).with_name("llmqueue")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "sweep.toml"
        config.write_text(CONFIG.format(requests=args.requests), encoding="utf-8")
        db = Path(tmp) / "sweep.sqlite"
        start = time.perf_counter()
        subprocess.run([str(llmqueue), "sweep", str(config), "--db", str(db), "--workers",
                        str(args.workers), "--no-progress"], check=True)
        wall = time.perf_counter() - start
        rows = json.loads(subprocess.run(
            [str(llmqueue), "results", str(db), "--format", "json", "--columns",
             "policy,load,stable_observed,arrivals"], check=True, capture_output=True, text=True,
        ).stdout)
    requests = sum(r["arrivals"] for r in rows)
    print(f"runs {len(rows)}, workers {args.workers}, requests per run {args.requests:,}")
    print(f"wall {wall:.1f} s (whole command, process start included); {len(rows) / wall:.2f} runs/s; "
          f"{requests / wall:,.0f} simulated requests/s")
    for policy in ("fastertransformer", "vllm", "orca", "sarathi"):
        verdicts = Counter(r["stable_observed"] for r in rows if r["policy"] == policy)
        first_unstable = min((r["load"] for r in rows if r["policy"] == policy
                              and r["stable_observed"] == "unstable"), default=None)
        print(f"  {policy:<18} {dict(verdicts)}  lowest load observed unstable: {first_unstable}")


if __name__ == "__main__":
    main()
