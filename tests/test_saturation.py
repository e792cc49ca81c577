"""Capacity by the saturation rule (``llmqueue.studies.saturation``).

The saturated engine's rate is where stability ends on the two memory-bound workloads of
docs/memory.md: Poisson arrivals at 0.95 of it are stable, at 1.05 unstable, although both lie
below the closed-form memory limit (which preemption thrash makes optimistic). Also: the rate
never beats the closed-form limit, it equals the token-budget capacity with an unlimited cache,
bad input names its field, and ``llmqueue capacity --memory`` reports and uses it.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from llmqueue.cli.app import cli
from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import BatchTime, LinearTime, PiecewiseTime
from llmqueue.model.memory import KVCache
from llmqueue.model.specs import make_workload, parse_size
from llmqueue.policies.fcfs import SARATHI
from llmqueue.sim.run import simulate
from llmqueue.studies.saturation import SaturationResult, saturated_throughput
from llmqueue.theory import capacity as theory

LOGNORMAL = "lognormal:mean=300,sigma=0.6"

# name: (prefill, decode, batch time, cache, Poisson requests per verdict run)
WORKLOADS: dict[str, tuple[str, str, BatchTime, KVCache, int]] = {
    "64+512 linear": ("64", "512", LinearTime(10.0, 0.05),
                      KVCache(32000, block_tokens=16, watermark=0.01), 10_000),
    "lognormal piecewise": (LOGNORMAL, LOGNORMAL, PiecewiseTime(12.0, 0.04, 128),
                            KVCache(40000, block_tokens=16, watermark=0.01), 20_000),
}


@cache
def _saturated(name: str) -> SaturationResult:
    """The saturated rate of a workload (default run size, seed 1), computed once per session."""
    prefill, decode, bt, memory, _ = WORKLOADS[name]
    return saturated_throughput(SARATHI, bt, 512, None, memory, prefill, decode, seed=1)


def _closed_form_limit(prefill: Any, decode: Any, bt: BatchTime, budget: int,
                       memory: KVCache | None) -> float:
    """The closed-form (no-thrash) critical rate: §4 with the cache's batch-size limit."""
    p, d = parse_size(str(prefill), "prefill").mean, parse_size(str(decode), "decode").mean
    if memory is None:
        return theory.critical_rate_per_s(bt, budget, p + d)
    rho, _ = theory.memory_load(1.0, p, d, bt, budget, None, memory)
    return 1.0 / rho


# ---------------------------------------------------------------- the target (issue 6)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_saturated_rate_separates_stable_from_unstable(name: str) -> None:
    """Poisson arrivals at 0.95 of the saturated rate are stable, at 1.05 unstable (seed 1).

    Saturated rates (seed 1, 4,000 requests): 10.57 req/s (0.87 of the closed-form 12.17) and
    16.24 (0.78 of 20.71); 30,000-request runs give 10.64 and 16.01-16.17. Margins, checked by
    hand over seeds 1-10 (10/10 verdicts right at each fraction): at 0.95 the slopes' 95 %
    intervals reach at most 85 (first workload) and 115 tokens/s (second), against materiality
    thresholds of 114-117 and 183-187; at 1.05 their lower ends are at least 32 and 138 tokens/s
    (> 0), the slopes 158-392 and 366-600 against thresholds of 126-130 and 202-206. The mean
    slope at 1.05 (283 and 474) is close to the fluid (lambda - saturated rate)(m_p + m_d): 305
    and 487 tokens/s.
    With 2,500-5,000 requests the single-run verdicts are often inconclusive, hence the lengths.
    """
    prefill, decode, bt, memory, requests = WORKLOADS[name]
    saturated = _saturated(name)
    limit = _closed_form_limit(prefill, decode, bt, 512, memory)
    assert saturated.request_rate_per_s < 0.9 * limit  # thrash costs more than 10 % here
    assert saturated.preemptions > 0 and saturated.recomputed_tokens_per_request > 50
    for fraction, verdict in ((0.95, "stable"), (1.05, "unstable")):
        workload = make_workload("poisson", prefill, decode,
                                 rate_per_s=fraction * saturated.request_rate_per_s)
        run = simulate(workload, SARATHI, bt, 512, seed=1, max_requests=requests, memory=memory,
                       keep_requests=False, drain_s=0.0)  # the verdict reads the arrival window only
        assert run.observed.verdict == verdict, (fraction, run.observed)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_result_is_consistent(name: str) -> None:
    """The interval brackets the rate, the window lies inside the run, the token rate is the
    request rate times the mean size, and completions agree with the token-based rate."""
    prefill, decode, *_ = WORKLOADS[name]
    r = _saturated(name)
    mean = parse_size(prefill, "prefill").mean + parse_size(decode, "decode").mean
    assert r.ci_low_per_s < r.request_rate_per_s < r.ci_high_per_s
    assert r.ci_high_per_s - r.ci_low_per_s < 0.15 * r.request_rate_per_s
    assert 0 < r.window_start_s < r.window_end_s
    assert r.requests == r.completed == 4000 and r.window_requests == 3199
    assert r.token_rate_per_s == pytest.approx(r.request_rate_per_s * mean, rel=1e-12)
    assert r.completion_rate_per_s == pytest.approx(r.request_rate_per_s, rel=0.03)
    assert r.as_dict()["preemptions"] == r.preemptions


@settings(max_examples=12, derandomize=True)  # a bound up to an estimate's noise: fixed examples
@given(
    sizes=st.sampled_from([("64", "512"), ("uniform:1,200", "uniform:1,300"),
                           ("lognormal:mean=100,sigma=0.6", "lognormal:mean=150,sigma=0.6")]),
    requests_held=st.integers(4, 200),
    budget=st.sampled_from([64, 128, 256, 512]),
    c=st.floats(1.0, 20.0),
    a=st.floats(0.01, 0.1),
)
def test_saturated_rate_never_beats_the_closed_form_limit(
    sizes: tuple[str, str], requests_held: int, budget: int, c: float, a: float
) -> None:
    """The closed form assumes no thrash, so it bounds the saturated rate up to the estimate's
    noise (5 %). These examples give ratios 0.77-0.94 where the cache thrashes and 1.001-1.004
    where it does not (the token budget binds); the largest seen over 25 other random settings
    of 400 requests was 1.033."""
    prefill, decode = sizes
    p, d = parse_size(prefill, "prefill").mean, parse_size(decode, "decode").mean
    tokens = max(2048, int(requests_held * (p + (d + 1) / 2 + 8)) // 16 * 16)
    memory = KVCache(tokens, block_tokens=16, watermark=0.01)
    bt = LinearTime(c, a)
    r = saturated_throughput(SARATHI, bt, budget, None, memory, prefill, decode, seed=3, requests=500)
    assert r.request_rate_per_s <= 1.05 * _closed_form_limit(prefill, decode, bt, budget, memory)


@pytest.mark.parametrize("name", list(WORKLOADS))
@pytest.mark.parametrize("memory", [None, KVCache(10**8)])
def test_unlimited_cache_gives_the_token_budget_capacity(name: str, memory: KVCache | None) -> None:
    """Without a binding cache the saturated engine fills every batch: lambda* within 3 %."""
    prefill, decode, bt, _, _ = WORKLOADS[name]
    requests = 4000 if memory is None else 2000  # a huge cache holds every request at once
    r = saturated_throughput(SARATHI, bt, 512, None, memory, prefill, decode, seed=1,
                             requests=requests, engine="fast")  # exact, and no numba compile here
    assert r.preemptions == 0
    assert r.request_rate_per_s == pytest.approx(_closed_form_limit(prefill, decode, bt, 512, None),
                                                 rel=0.03)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"requests": 10}, "requests"),
        ({"requests": 1000.5}, "requests"),
        ({"seed": -1}, "seed"),
        ({"budget": 0}, "budget"),
        ({"k_max": 0}, "k_max"),
        ({"memory": "tokens=32000"}, "memory"),
        ({"prefill": "bogus:1"}, "prefill"),
        ({"decode": -3}, "decode"),
        ({"warmup": 0.5}, "warmup"),
        ({"cooldown": -0.1}, "cooldown"),
        ({"warmup": 0.45, "cooldown": 0.46}, "cooldown"),
        ({"batches": 1}, "batches"),
        ({"level": 1.0}, "level"),
        ({"engine": "warp"}, "engine"),
    ],
)
def test_bad_input_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {"policy": SARATHI, "batch_time": LinearTime(10.0, 0.05), "budget": 512,
                            "k_max": None, "memory": KVCache(32000), "prefill": "64", "decode": "512",
                            "requests": 200}
    args.update(kwargs)
    with pytest.raises(ConfigError) as err:
        saturated_throughput(**args)
    assert err.value.field == field
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- the capacity command


def _capacity(*extra: str) -> Any:
    args = ["capacity", "--prefill", "64", "--decode", "512", "--batch-time", "linear:c=10,a=0.05",
            "--memory", "tokens=32000", "--seed", "1", "--json", *extra]
    return CliRunner().invoke(cli, args)


def test_capacity_reports_the_saturated_rate_and_its_verdict() -> None:
    """11.5 req/s is below the closed-form limit (12.17) but above the saturated rate (10.57):
    unstable by thrash; 9.5 req/s is below both: stable. The closed-form numbers stay."""
    out = _capacity("--rate", "11.5")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["memory_critical_rate"] == pytest.approx(12.173, abs=1e-3) and doc["memory_load"] < 1
    assert doc["saturated_rate"] == pytest.approx(_saturated("64+512 linear").request_rate_per_s,
                                                  rel=1e-12)
    assert doc["saturated_load"] == pytest.approx(11.5 / doc["saturated_rate"], rel=1e-12)
    assert doc["saturated_rate_ci_low"] < doc["saturated_rate"] < doc["saturated_rate_ci_high"]
    assert doc["thrash_recomputed_tokens_per_request"] > 100
    assert doc["saturation_requests"] == 4000
    assert doc["verdict"] == "unstable (preemption thrash)"
    assert "preemption thrash" in doc["warning"]
    doc = json.loads(_capacity("--rate", "9.5", "--saturation-requests", "1000").output)
    assert doc["verdict"] == "stable" and doc["saturated_load"] < 1
    assert doc["saturation_requests"] == 1000


def test_capacity_saturation_can_be_skipped_and_checks_its_size() -> None:
    doc = json.loads(_capacity("--rate", "11.5", "--saturation-requests", "0").output)
    assert "saturated_rate" not in doc
    assert doc["verdict"].startswith("no guarantee")
    doc = json.loads(_capacity("--rate", "12.8", "--saturation-requests", "0").output)
    assert doc["verdict"] == "unstable (memory)" and "memory binds" in doc["warning"]
    for bad in ("5", "-1", "many"):
        out = _capacity("--saturation-requests", bad)
        assert out.exit_code == 2
        assert "--saturation-requests" in out.output and "Traceback" not in out.output


def test_capacity_saturation_policy_and_a_trace_too_short_for_it(tmp_path, capsys) -> None:
    """The saturated run takes the named policy (Orca thrashes more than Sarathi here); a trace
    with fewer requests than the run needs is a one-line error naming the option."""
    from .helpers import run_cli

    sarathi = json.loads(_capacity("--rate", "9.5", "--saturation-requests", "1000").output)
    orca = json.loads(_capacity("--rate", "9.5", "--saturation-requests", "1000",
                                "--saturation-policy", "orca").output)
    assert sarathi["saturation_policy"] == "sarathi" and orca["saturation_policy"] == "orca"
    assert orca["saturated_rate"] < sarathi["saturated_rate"]
    trace = tmp_path / "tiny.csv"
    trace.write_text("arrival_ms,prefill,decode\n" + "".join(f"{100 * i},50,40\n" for i in range(1, 31)))
    spec = f"trace:{trace},arrival=arrival_ms,prefill=prefill,decode=decode,unit=ms"
    args = ["capacity", "--arrival", spec, "--memory", "tokens=4000"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "Traceback" not in err
    assert "saturation-requests: the workload gives fewer than 100 requests; 0 skips" in err
    code, _, err = run_cli(capsys, *args, "--saturation-requests", "0")
    assert code == 0, err
