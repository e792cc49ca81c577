"""The replicated instability test: its arithmetic, its verdicts on known settings, its false alarms.

Settings: CodeLlama-34B staircase, budget 512, Poisson arrivals; W1 = 129 + 112 tokens (lambda* =
13.87 requests/s), W2 = poisson:129 + geometric:112. Fixed seeds: every assertion is deterministic.
The calibration itself (many seed blocks) is bench/calibrate_stability.py; see docs/stability.md.
"""

from __future__ import annotations

import math

import pytest
from scipy import stats

from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import StaircaseTime
from llmqueue.model.specs import make_workload
from llmqueue.model.workload import Workload
from llmqueue.policies.fcfs import FASTERTRANSFORMER, ORCA, SARATHI, VLLM_CHUNKED
from llmqueue.sim.run import check_instability
from llmqueue.theory import capacity as theory
from llmqueue.theory.stability import Observation, ReplicatedVerdict, replicated_verdict

CODELLAMA = StaircaseTime(11.28, 35.47, 128)
BUDGET = 512
W1 = ("poisson", "129", "112")
W2 = ("poisson", "poisson:129", "geometric:112")


def _at(load: float, sizes: tuple[str, str, str] = W1) -> Workload:
    probe = make_workload(*sizes, 1.0)
    mean_tokens = probe.mean_prefill_tokens + probe.mean_decode_tokens
    return make_workload(*sizes, load * theory.critical_rate_per_s(CODELLAMA, BUDGET, mean_tokens))


def _obs(slope: float, threshold: float = 10.0) -> Observation:
    return Observation("inconclusive", slope, slope - 1, slope + 1, threshold, 0.0, 1.0, 20)


def _test(workload: Workload, policy: object, **kw: object) -> ReplicatedVerdict:
    return check_instability(workload, policy, CODELLAMA, BUDGET, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- arithmetic and inputs


def test_verdict_is_the_one_sided_t_test_of_the_mean_slope() -> None:
    """p-value and bounds match scipy's one-sample t test against the materiality threshold."""
    slopes = [30.0, 12.0, 25.0, 41.0, 19.0]
    v = replicated_verdict([_obs(s) for s in slopes], alpha=0.05)
    ref = stats.ttest_1samp(slopes, 10.0, alternative="greater")
    assert v.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    assert v.mean_slope_tokens_per_s == pytest.approx(25.4)
    half = stats.t.ppf(0.95, 4) * stats.tstd(slopes) / math.sqrt(5)
    assert v.ci_low_tokens_per_s == pytest.approx(25.4 - half)
    assert v.ci_high_tokens_per_s == pytest.approx(25.4 + half)
    assert v.verdict == "unstable" and v.replicates == 5 and v.threshold_tokens_per_s == 10.0
    assert v.fluid_ratio is None  # observations carry no theory
    assert replicated_verdict([_obs(s) for s in slopes], fluid_slope_tokens_per_s=25.4).fluid_ratio == 1.0


def test_three_verdicts() -> None:
    """Rejected: unstable; upper bound under the threshold: stable; in between: inconclusive."""
    assert replicated_verdict([_obs(s) for s in (-3.0, 2.0, 1.0, -1.0)]).verdict == "stable"
    assert replicated_verdict([_obs(s) for s in (-20.0, 30.0, 5.0, 14.0)]).verdict == "inconclusive"
    assert replicated_verdict([_obs(s) for s in (50.0, 60.0, 55.0, 58.0)]).verdict == "unstable"
    same = replicated_verdict([_obs(20.0)] * 3)  # identical replicates: a deterministic setting
    assert (same.verdict, same.p_value) == ("unstable", 0.0)
    assert replicated_verdict([_obs(5.0)] * 3).verdict == "stable"


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_alpha_outside_the_unit_interval_is_rejected(alpha: float) -> None:
    """alpha must lie in (0, 1): ConfigError naming 'alpha' (before any run)."""
    with pytest.raises(ConfigError) as info:
        replicated_verdict([_obs(1.0), _obs(2.0)], alpha=alpha)
    assert info.value.field == "alpha"
    with pytest.raises(ConfigError) as info:
        _test(_at(0.7), SARATHI, alpha=alpha)
    assert info.value.field == "alpha"


@pytest.mark.parametrize("replicates", [0, 1, -2])
def test_fewer_than_two_replicates_are_rejected(replicates: int) -> None:
    """A t interval needs two replicates: ConfigError naming 'replicates'."""
    with pytest.raises(ConfigError) as info:
        _test(_at(0.7), SARATHI, replicates=replicates)
    assert info.value.field == "replicates"
    with pytest.raises(ConfigError) as info:
        replicated_verdict([_obs(1.0)] * max(replicates, 0))
    assert info.value.field == "replicates"


def test_a_replicate_without_a_slope_is_rejected() -> None:
    """A run too short for the trend test (NaN slope) cannot enter the mean."""
    with pytest.raises(ConfigError) as info:
        replicated_verdict([_obs(1.0), _obs(math.nan)])
    assert info.value.field == "replicates"


# ---------------------------------------------------------------- verdicts on known settings


def test_sarathi_above_capacity_is_unstable_at_the_fluid_slope() -> None:
    """1.2 lambda*: rejected, and the mean slope is within 15 % of lambda m - b/t(b)."""
    v = _test(_at(1.2), SARATHI)
    assert v.verdict == "unstable" and v.p_value < 1e-4
    assert v.fluid_slope_tokens_per_s == pytest.approx(0.2 * 512 / CODELLAMA(512) * 1000, rel=1e-9)
    assert v.fluid_ratio is not None and abs(v.fluid_ratio - 1) <= 0.15


def test_orca_above_capacity_grows_at_the_fluid_slope_too() -> None:
    """Any work-conserving policy's backlog grows at the same fluid slope (W2, 1.2 lambda*)."""
    v = _test(_at(1.2, W2), ORCA)
    assert v.verdict == "unstable"
    assert v.fluid_ratio is not None and abs(v.fluid_ratio - 1) <= 0.15


def test_fastertransformer_below_capacity_is_unstable() -> None:
    """Fig. 1: FT at 0.9 lambda* is unstable although the load is below 1 (no fluid slope)."""
    v = _test(_at(0.9), FASTERTRANSFORMER)
    assert v.verdict == "unstable"
    assert v.fluid_slope_tokens_per_s == 0.0 and v.fluid_ratio is None


def test_sarathi_well_below_capacity_is_stable() -> None:
    """0.7 lambda*: not rejected; the drift is even confidently immaterial."""
    v = _test(_at(0.7), SARATHI)
    assert v.verdict == "stable"
    assert v.p_value > 0.5
    assert v.ci_high_tokens_per_s < v.threshold_tokens_per_s


def test_false_alarms_on_stable_settings_stay_within_the_calibrated_level() -> None:
    """Near capacity (0.95 lambda*), where warm-up bias is largest: 20 seed blocks, at most 1 alarm.

    The calibration measured a false-alarm rate <= 5 % (docs/stability.md); 1 of 20 is that level.
    """
    verdicts: list[ReplicatedVerdict] = []
    for sizes, policy in [(W2, ORCA), (W2, SARATHI), (W1, ORCA), (W2, VLLM_CHUNKED)]:
        workload = _at(0.95, sizes)
        for block in range(5):
            v = _test(workload, policy, first_seed=100 + 5 * block)
            verdicts.append(v)
    alarms = sum(v.verdict == "unstable" for v in verdicts)
    assert len(verdicts) == 20
    assert alarms <= 1
    assert all(v.fluid_ratio is None for v in verdicts)
