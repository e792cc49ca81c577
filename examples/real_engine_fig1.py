"""Cross-check against a real engine: the Fig. 1 run on one H200 (shared/data/gpu/engine_fig1).

Run from the repository root: python examples/real_engine_fig1.py

The real engine ran the four schedulers at 73.55 requests/s (0.85 of its measured capacity), 129 +
112 tokens, b = 512, arrivals for 45 s, stop at 50 s. Here t(n) is the engine's own calibration
(decode-only batches of 1..512 tokens, median ms) as a table, and the same schedule is simulated.
Printed side by side: completions, mean TTFT and latency, and the backlog slope.
"""

from __future__ import annotations

import csv
from pathlib import Path

from llmqueue import FASTERTRANSFORMER, ORCA, SARATHI, VLLM, RunResult, TableTime, make_workload
from llmqueue.sim.run import simulate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpu" / "engine_fig1"


def simulate_real_setting(seed: int = 2504, policies: tuple = (SARATHI, ORCA, VLLM, FASTERTRANSFORMER)
                          ) -> list[tuple[RunResult, dict[str, str]]]:
    """Each policy's simulated run (one Poisson arrival stream per ``seed``) with the real run's
    summary row."""
    with open(DATA / "calibration.csv", encoding="utf-8") as f:
        points = sorted(
            (int(r["n_tokens"]), float(r["median_ms"]))
            for r in csv.DictReader(f)
            if r["composition"].startswith("decode_only")
        )
    batch_time = TableTime(tuple(n for n, _ in points), tuple(t for _, t in points), "calibration")
    with open(DATA / "summary.csv", encoding="utf-8") as f:
        real = {r["policy"]: r for r in csv.DictReader(f)}
    workload = make_workload("poisson", "129", "112", 73.55)
    return [
        (simulate(workload, p, batch_time, 512, seed=seed, duration_s=45.0, drain_s=5.0), real[p.name])
        for p in policies
    ]


def main() -> None:
    """Simulate the real run's setting and print simulated vs measured figures."""
    print(f"{'policy':>18} {'completed':>17} {'mean TTFT ms':>19} {'mean latency s':>17} "
          f"{'backlog slope tokens/s':>32}")
    print(f"{'':>18} {'sim':>8} {'real':>8} {'sim':>9} {'real':>9} {'sim':>8} {'real':>8} "
          f"{'sim [95% CI]':>22} {'real':>9}")
    for result, r in simulate_real_setting():
        m, o = result.metrics, result.observed
        ci = f"{o.slope_tokens_per_s:,.0f} [{o.ci_low_tokens_per_s:,.0f}, {o.ci_high_tokens_per_s:,.0f}]"
        print(f"{result.policy:>18} {m.completed:>8} {int(r['completed']):>8} "
              f"{m.latency['mean_ttft_ms']:>9,.1f} {float(r['ttft_mean_ms']):>9,.1f} "
              f"{m.latency['mean_e2el_ms'] / 1000:>8.2f} {float(r['latency_mean_ms']) / 1000:>8.2f} "
              f"{ci:>22} {float(r['backlog_slope_tok_s']):>9,.0f}   ({o.verdict})")


if __name__ == "__main__":
    main()
