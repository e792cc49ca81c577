"""Calibrate the replicated instability test: false-alarm rate on stable settings, power on unstable.

    python bench/calibrate_stability.py            # 40 x R = 5 runs of 5000 requests (~2.5 min, 2 cores)
    python bench/calibrate_stability.py --quick    # 10 repetitions of 3000-request runs (~50 s)

Settings: CodeLlama-34B staircase (c = 11.28, a = 35.47, b0 = 128), budget 512, Poisson arrivals,
two size workloads: W1 constant 129 + 112 tokens, W2 poisson:129 + geometric:112 tokens.

- Known stable: the work-conserving policies Sarathi, Orca and current vLLM (``vllm-chunked``, no
  k_max) at 0.5, 0.7, 0.85, 0.95 lambda* (throughput optimality, v3 Thm 2).
- Known unstable: the same at 1.05, 1.1, 1.2, 1.5 lambda* (capacity bound), and FasterTransformer
  at 0.9 lambda* (the paper's Fig. 1; its capacity here is 0.04 lambda*).

Each setting is repeated with disjoint seed blocks (repetition j uses seeds 5j .. 5j + 4). For each
repetition the replicated test (``stability.replicated_verdict``) gives one verdict; the table
shows how often it says ``unstable`` (false-alarm rate on stable settings, power on unstable ones)
next to the single-run ``observe`` verdict: the fraction of single runs judged ``unstable``, and the
fraction of blocks where any of the 5 runs was (the rule of a replicated SLO search).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from scipy import stats

from llmqueue import ORCA, SARATHI, VLLM_CHUNKED, StaircaseTime, make_workload
from llmqueue.policies.fcfs import FASTERTRANSFORMER, make_policy
from llmqueue.sim.run import simulate
from llmqueue.theory import capacity as theory
from llmqueue.theory.stability import ReplicatedVerdict, replicated_verdict

CODELLAMA = StaircaseTime(11.28, 35.47, 128)
BUDGET = 512
WORKLOADS = {"W1": ("poisson", "129", "112"), "W2": ("poisson", "poisson:129", "geometric:112")}
STABLE_LOADS = (0.5, 0.7, 0.85, 0.95)
UNSTABLE_LOADS = (1.05, 1.1, 1.2, 1.5)
WORK_CONSERVING = (SARATHI.name, ORCA.name, VLLM_CHUNKED.name)


@dataclass(frozen=True, slots=True)
class Setting:
    """One configuration: workload key, policy name, load against lambda*, and the truth."""

    workload: str
    policy: str
    load: float
    unstable: bool

    @property
    def label(self) -> str:
        """Row label, e.g. ``W1 sarathi 0.95``."""
        return f"{self.workload} {self.policy} {self.load:g}"


@dataclass(frozen=True, slots=True)
class Block:
    """One repetition's outcome: the replicated verdict and the single runs' observe verdicts."""

    replicated: ReplicatedVerdict
    observed: tuple[str, ...]


def settings() -> list[Setting]:
    """The calibration grid: stable and unstable work-conserving settings, plus FT at 0.9."""
    out = [
        Setting(w, p, load, load > 1)
        for w in WORKLOADS
        for p in WORK_CONSERVING
        for load in STABLE_LOADS + UNSTABLE_LOADS
    ]
    out += [Setting(w, FASTERTRANSFORMER.name, 0.9, True) for w in WORKLOADS]
    return out


def run_block(setting: Setting, rep: int, replicates: int, requests: int, alpha: float) -> Block:
    """Run one seed block of ``replicates`` runs of a setting and test it."""
    arrival, prefill, decode = WORKLOADS[setting.workload]
    probe = make_workload(arrival, prefill, decode, 1.0)
    mean_tokens = probe.mean_prefill_tokens + probe.mean_decode_tokens
    rate = setting.load * theory.critical_rate_per_s(CODELLAMA, BUDGET, mean_tokens)
    workload = make_workload(arrival, prefill, decode, rate)
    policy = make_policy(setting.policy)
    runs = [
        simulate(workload, policy, CODELLAMA, BUDGET, seed=rep * replicates + i, max_requests=requests,
                 keep_requests=False)
        for i in range(replicates)
    ]
    return Block(replicated_verdict(runs, alpha=alpha), tuple(r.observed.verdict for r in runs))


def _task(args: tuple[Setting, int, int, int, float]) -> tuple[Setting, Block]:
    setting, rep, replicates, requests, alpha = args
    return setting, run_block(setting, rep, replicates, requests, alpha)


def _upper(k: int, n: int, level: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper confidence bound of a rate k / n."""
    return 1.0 if k >= n else float(stats.beta.ppf(level, k + 1, n - k))


def main(argv: Sequence[str] | None = None) -> None:
    """Run the grid and print the table (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 repetitions of 3000-request runs")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per setting (default 40)")
    parser.add_argument("--replicates", type=int, default=5, help="replicates per repetition (R)")
    parser.add_argument("--requests", type=int, default=None, help="requests per run (default 5000)")
    parser.add_argument("--alpha", type=float, default=0.05, help="level of the one-sided test")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes")
    args = parser.parse_args(argv)
    reps = args.reps if args.reps is not None else (10 if args.quick else 40)
    requests = args.requests if args.requests is not None else (3000 if args.quick else 5000)
    grid = settings()
    print(f"calibrate_stability: {len(grid)} settings x {reps} repetitions x R = {args.replicates} "
          f"replicates, {requests} requests per run, alpha = {args.alpha}, {args.workers} worker(s)")
    simulate(make_workload("poisson", "129", "112", 5.0), SARATHI, CODELLAMA, BUDGET, max_requests=50,
             keep_requests=False)  # compile (or load the numba cache) once before forking
    start = time.perf_counter()
    tasks = [(s, rep, args.replicates, requests, args.alpha) for s in grid for rep in range(reps)]
    blocks: dict[Setting, list[Block]] = {s: [] for s in grid}
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            for setting, block in pool.map(_task, tasks, chunksize=8):
                blocks[setting].append(block)
    else:
        for task in tasks:
            setting, block = _task(task)
            blocks[setting].append(block)
    wall_s = time.perf_counter() - start

    head = (f"{'setting':<28} {'truth':<8} {'reps':>4} {'repl unst':>9} {'repl stab':>9} "
            f"{'run unst':>8} {'any-of-R':>8} {'fluid ratio':>11}")
    print(head)
    print("-" * len(head))
    totals = {True: [0, 0, 0, 0, 0], False: [0, 0, 0, 0, 0]}  # rejections, reps, runs unst, runs, any
    for setting in grid:
        bs = blocks[setting]
        rejected = sum(b.replicated.verdict == "unstable" for b in bs)
        stable = sum(b.replicated.verdict == "stable" for b in bs)
        runs_unstable = sum(v == "unstable" for b in bs for v in b.observed)
        n_runs = sum(len(b.observed) for b in bs)
        any_unstable = sum("unstable" in b.observed for b in bs)
        ratios = [b.replicated.fluid_ratio for b in bs if b.replicated.fluid_ratio is not None]
        ratio = f"{sum(ratios) / len(ratios):11.3f}" if ratios else f"{'-':>11}"
        t = totals[setting.unstable]
        t[0] += rejected
        t[1] += len(bs)
        t[2] += runs_unstable
        t[3] += n_runs
        t[4] += any_unstable
        truth = "unstable" if setting.unstable else "stable"
        print(f"{setting.label:<28} {truth:<8} {len(bs):>4} {rejected / len(bs):9.3f} "
              f"{stable / len(bs):9.3f} {runs_unstable / n_runs:8.3f} {any_unstable / len(bs):8.3f} {ratio}")
    print("-" * len(head))
    names = {False: "false-alarm rate (stable settings)", True: "power (unstable settings)"}
    for unstable, name in names.items():
        rej, n, runs_unst, n_runs, any_unst = totals[unstable]
        print(f"{name}: replicated {rej}/{n} = {rej / n:.4f} (95% upper {_upper(rej, n):.4f}); "
              f"single-run observe {runs_unst}/{n_runs} = {runs_unst / n_runs:.4f}; "
              f"any of R observe {any_unst}/{n} = {any_unst / n:.4f}")
    print(f"wall time {wall_s:.1f} s")


if __name__ == "__main__":
    main()
