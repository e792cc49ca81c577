"""The worked example of PAPER.md §2 (v2 Fig. 5 / v3 Fig. 8), batch by batch, for all four systems."""

from __future__ import annotations

import pytest

from llmqueue.model.batchtime import ConstantTime
from llmqueue.model.workload import Request
from llmqueue.policies.fcfs import FASTERTRANSFORMER, ORCA, SARATHI, VLLM
from llmqueue.sim.run import simulate

NAMES = "ABCDE"


def example_requests() -> list[Request]:
    """A, B, C decode with 2, 4, 3 tokens left; D and E (1 prefill + 1 decode) arrive mid-batch."""
    return [
        Request(0, 0.0, 0, 2),
        Request(1, 0.0, 0, 4),
        Request(2, 0.0, 0, 3),
        Request(3, 0.5, 1, 1),
        Request(4, 0.5, 1, 1),
    ]


def batches_as_text(policy, budget: int) -> tuple[list[str], list[int]]:
    """Run the example; return each batch as sorted 'Xd'/'Xp' tokens and the non-WC batch indexes."""
    result = simulate(example_requests(), policy, ConstantTime(1.0), budget, keep_batches=True)
    assert result.batches is not None
    text = []
    prefill_left = {r.id: r.prefill_tokens for r in example_requests()}
    for batch in result.batches:
        tokens = []
        for rid, n in batch.plan:
            kind = "p" if prefill_left[rid] else "d"
            if kind == "p":
                prefill_left[rid] -= n
            tokens.append(f"{NAMES[rid]}{kind}")
        text.append(" ".join(sorted(tokens)))
    violations = [b.index for b in result.batches if b.tokens < b.fill_target_tokens]
    assert result.metrics.wc_violations == len(violations)
    assert result.metrics.completed == 5
    return text, violations


@pytest.mark.parametrize(
    ("policy", "budget", "expected", "non_wc"),
    [
        (
            VLLM,
            4,
            ["Ad Bd Cd", "Dp Ep", "Ad Bd Cd Dd", "Bd Cd Ed", "Bd"],
            [1],
        ),
        (
            ORCA,
            5,
            ["Ad Bd Cd", "Ad Bd Cd Dp Ep", "Bd Cd Dd Ed", "Bd"],
            [],
        ),
        (
            FASTERTRANSFORMER,
            4,
            ["Ad Bd Cd", "Ad Bd Cd", "Bd Cd", "Bd", "Dp Ep", "Dd Ed"],
            [1, 2, 3],
        ),
        (
            SARATHI,
            4,
            ["Ad Bd Cd", "Ad Bd Cd Dp", "Bd Cd Dd Ep", "Bd Ed"],
            [],
        ),
    ],
    ids=["vllm", "orca", "fastertransformer", "sarathi"],
)
def test_worked_example(policy, budget: int, expected: list[str], non_wc: list[int]) -> None:
    text, violations = batches_as_text(policy, budget)
    assert text == expected
    assert violations == non_wc


def test_worked_example_timing() -> None:
    """With t(n) = 1 ms, Sarathi's four batches end at 1, 2, 3, 4 ms; D's first token at 2 ms."""
    result = simulate(example_requests(), SARATHI, ConstantTime(1.0), 4, keep_batches=True)
    assert result.requests is not None
    by_id = {r.id: r for r in result.requests}
    assert [b.end_ms for b in result.batches or ()] == [1.0, 2.0, 3.0, 4.0]
    assert by_id[3].first_token_ms == 2.0 and by_id[3].finish_ms == 3.0
    assert by_id[4].first_token_ms == 3.0 and by_id[4].finish_ms == 4.0
    assert by_id[1].finish_ms == 4.0
    # D and E arrived at 0.5 ms, during the first batch, and waited for its end: TTFT 1.5, 2.5 ms;
    # A, B and C had no prompt left (first token at arrival).
    assert result.metrics.latency["mean_ttft_ms"] == pytest.approx((1.5 + 2.5) / 5)
    assert result.metrics.latency["p99_e2el_ms"] == pytest.approx(4.0 - 0.04 * 0.5)
