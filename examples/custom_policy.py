"""Writing your own scheduler: a pure function from the engine view to a batch plan.

Run: python examples/custom_policy.py

This policy serves decoders first (like Sarathi-Serve) but fills the rest of the budget with the
*shortest remaining prompts first* instead of the oldest. The engine checks every plan it returns
against the batch rules, so a mistake shows up as a ``PlanError`` naming the broken rule.
"""

from __future__ import annotations

from llmqueue import EngineView, Plan, make_workload, parse_batch_time
from llmqueue.sim.run import simulate


def shortest_prompt_first(view: EngineView) -> Plan:
    """Decode tokens FCFS, then prefill chunks from the shortest remaining prompts."""
    plan: Plan = {}
    tokens = view.budget
    slots = view.k_max if view.k_max is not None else len(view.decoding) + len(view.prefilling)
    for r in view.decoding[: min(tokens, slots)]:
        plan[r.id] = 1
    tokens -= len(plan)
    for r in sorted(view.prefilling, key=lambda r: (r.prefill_left, r.id)):
        if tokens == 0 or len(plan) >= slots:
            break
        take = min(r.prefill_left, tokens)
        plan[r.id] = take
        tokens -= take
    return plan


# Optional declarations: the stability verdict uses them. This policy fills every batch to
# min(b, demand) when there is no k_max, so it is work-conserving; it chunks prompts.
shortest_prompt_first.name = "shortest-prompt-first"  # type: ignore[attr-defined]
shortest_prompt_first.work_conserving = True  # type: ignore[attr-defined]
shortest_prompt_first.chunks_prefill = True  # type: ignore[attr-defined]


def main() -> None:
    """Compare the custom policy with Sarathi-Serve on a bursty workload."""
    from llmqueue import SARATHI

    workload = make_workload("gamma:cv=2", "lognormal:mean=400,sigma=1", "geometric:120", 5.0)
    batch_time = parse_batch_time("staircase:c=11.28,a=35.47,b0=128")
    for policy in (SARATHI, shortest_prompt_first):
        result = simulate(workload, policy, batch_time, 512, seed=1, max_requests=3000)
        m = result.metrics.latency
        print(
            f"{result.policy:>22}: mean TTFT {m['mean_ttft_ms']:8.1f} ms, "
            f"p99 TTFT {m['p99_ttft_ms']:8.1f} ms, observed {result.observed.verdict}"
        )


if __name__ == "__main__":
    main()
