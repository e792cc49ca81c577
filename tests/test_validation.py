"""The simulator against a real engine: the Fig. 1 run on one H200 (shared/data/gpu/engine_fig1).

t(n) is that engine's own calibration; arrivals are a fresh Poisson stream at the same rate (not
the real run's arrival times), so only rates and verdicts are compared, with the simulated 95 %
interval or a stated tolerance.
"""

from __future__ import annotations

import importlib.util

import pytest

from .conftest import ROOT

_spec = importlib.util.spec_from_file_location("real_engine_fig1", ROOT / "examples" / "real_engine_fig1.py")
assert _spec is not None and _spec.loader is not None
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple]:
    return {result.policy: (result, real) for result, real in example.simulate_real_setting()}


def test_work_conserving_schedulers_keep_up_as_on_the_gpu(runs) -> None:
    for name in ("sarathi", "orca"):
        result, real = runs[name]
        assert int(real["completed"]) == int(real["arrivals"])
        assert result.metrics.completed == result.metrics.arrivals
        assert result.observed.verdict != "unstable"


def test_vanilla_vllm_backlog_slope_lies_in_the_simulated_spread() -> None:
    """Vanilla vLLM at this load is near its knee, so one arrival stream's slope is noisy: over 9
    streams the simulated slope is 428-1,182 tokens/s (median 840), unstable in 7 and
    inconclusive in 2. The measured 1,087 lies inside that spread, not on any one stream's value."""
    from llmqueue.policies.fcfs import VLLM

    measured = None
    slopes, verdicts = [], []
    for seed in (2504, 1, 2, 3, 4, 5, 6, 7, 8):
        ((result, real),) = example.simulate_real_setting(seed, (VLLM,))
        measured = float(real["backlog_slope_tok_s"])
        slopes.append(result.observed.slope_tokens_per_s)
        verdicts.append(result.observed.verdict)
    assert measured is not None and min(slopes) <= measured <= max(slopes)
    assert all(slope > 0 for slope in slopes)
    assert verdicts.count("unstable") >= 6 and "stable" not in verdicts


def test_fastertransformer_starvation_matches_the_gpu(runs) -> None:
    result, real = runs["fastertransformer"]
    assert result.observed.verdict == "unstable"
    assert result.observed.slope_tokens_per_s == pytest.approx(float(real["backlog_slope_tok_s"]), rel=0.1)
    assert result.metrics.completed == pytest.approx(int(real["completed"]), rel=0.25)
