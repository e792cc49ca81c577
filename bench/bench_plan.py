"""Wall time of ``llmqueue plan`` from an empty results store: candidates, pruned, simulated.

Runs the plan of a config file (default ``examples/plan.toml``: the Azure conversation trace at 40
requests/s, H100 and A100 replicas, co-located pools with three budgets and disaggregated pairs in
four ratios) with a fresh store in a temporary folder, then once more on the same store (the rerun
simulates nothing). ``--tpot-ms`` overrides the TPOT target, to make the search simulate more.
The numba event loops should be compiled first (``llmqueue warmup``): a cold compile is not timed
here but costs about a minute.

    python bench/bench_plan.py [--config examples/plan.toml] [--workers 2] [--tpot-ms 60]

Figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from llmqueue.io.configfile import read_table
from llmqueue.io.store import Store
from llmqueue.studies.plan import candidates_of, parse_plan, run_plan


def main() -> None:
    """Time one plan from an empty store and its rerun; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/plan.toml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tpot-ms", type=float, default=None)
    args = parser.parse_args()
    data = read_table(args.config, "config")
    if args.tpot_ms is not None:
        data.setdefault("slo", {})["tpot_ms"] = args.tpot_ms
    plan = parse_plan(data, source=Path(args.config).name)
    space = len(candidates_of(plan))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "plan.sqlite"
        start = time.perf_counter()
        with Store(path) as store:
            result = run_plan(plan, store, workers=args.workers)
        wall = time.perf_counter() - start
        start = time.perf_counter()
        with Store(path) as store:
            again = run_plan(plan, store, workers=args.workers)
        rerun = time.perf_counter() - start
    skipped = sum(1 for t in result.tried if t.status == "skipped")
    never = space - result.pruned - result.simulated - skipped
    print(f"plan {args.config}: {len(plan.shapes)} shapes, {space} candidate fleets, "
          f"{args.workers} workers, slo {dict(result.slo)}")
    print(f"  pruned by theory     {result.pruned}")
    print(f"  simulated            {result.simulated}")
    print(f"  skipped (next, dearer than the runner-up) {skipped}; never reached {never}")
    print(f"  wall                 {wall:.1f} s")
    print(f"  rerun (same store)   {rerun:.1f} s, {again.ran} simulated")
    if result.best is not None:
        runner = result.runner_up.candidate.fleet if result.runner_up else "none"
        print(f"  answer               {result.best.candidate.fleet} ({result.best.candidate.shape.label}), "
              f"${result.best.candidate.cost_per_hour:,.2f}/h; runner-up {runner}")


if __name__ == "__main__":
    main()
