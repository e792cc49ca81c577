"""Split vs co-located (``llmqueue.studies.disagg``, ``llmqueue network split``): the candidates'
networks, the theory's bound (never simulated), the bisection's boundary, determinism, the
qualitative shape on a small synthetic case, and bad input."""

from __future__ import annotations

import dataclasses

import pytest

from llmqueue.cli import split as cli_split
from llmqueue.errors import ConfigError
from llmqueue.model.network import load_network
from llmqueue.studies import disagg
from llmqueue.studies.disagg import (
    SplitComparison,
    SplitSetup,
    SplitSLO,
    candidates,
    compare_split,
    goodput,
    network_mapping,
    run_at,
    split_table,
)

from .helpers import run_cli, strict_json

# t(n) = 10 ms up to 32 tokens, then 0.1 ms per token more; constant sizes, Poisson arrivals
SETUP = SplitSetup(gpus=3, batch_time="piecewise:c=10,a=0.1,b0=32", prefill="200", decode="20",
                   colocated_budgets=(64, 256), prefill_budget=256, decode_budget=64, decode_k_max=32,
                   transfer="fixed_ms=1,per_token_ms=0", requests=300, step=0.1)
TIGHT = SplitSLO(ttft_ms=200.0, tpot_ms=11.0)
LOOSE = SplitSLO(ttft_ms=200.0, tpot_ms=40.0)


@pytest.fixture(scope="module")
def table() -> list[SplitComparison]:
    """The small case under a tight and a loose TPOT target (runs shared between them)."""
    return split_table(SETUP, [TIGHT, LOOSE])


def t_ms(n: int) -> float:
    """SETUP's batch time."""
    return 10.0 + 0.1 * max(0, n - 32)


def test_candidates_and_their_networks() -> None:
    names = [c.name for c in candidates(SETUP)]
    assert names == ["co-located b=64", "co-located b=256", "split 1:2", "split 2:1"]
    co = load_network(network_mapping(candidates(SETUP)[0], SETUP, 5.0))
    assert co.pools["gpu"].router == "jsq" and len(co.pools["gpu"].members) == 3
    assert {e.budget for e in co.engines.values()} == {64} and not co.pairs
    split = load_network(network_mapping(candidates(SETUP)[3], SETUP, 5.0))
    pair = split.pairs["pd"]
    assert (split.members_of("prefill"), split.members_of("decode")) == (("prefill/0", "prefill/1"),
                                                                         ("decode",))
    assert (pair.fixed_ms, pair.per_token_ms, pair.shared_link) == (1.0, 0.0, False)
    assert split.engines["decode"].k_max == 32 and split.engines["prefill/0"].budget == 256
    assert split.classes["chat"].rate_per_s == 5.0


def test_bound_is_the_theory_capacity_and_never_simulated(table: list[SplitComparison]) -> None:
    for comp in table:
        by_name = {r.candidate.name: r for r in comp.results}
        # co-located: 3 engines of b / t(b) tokens/ms each, 220 tokens a request
        for b in (64, 256):
            assert by_name[f"co-located b={b}"].bound_rate_per_s == pytest.approx(
                3 * b / t_ms(b) * 1000 / 220, rel=1e-9)
        # split 2:1: the prefill side binds (2 engines at b=256, 200 prompt tokens a request)
        assert by_name["split 2:1"].bound_rate_per_s == pytest.approx(
            2 * 256 / t_ms(256) * 1000 / 200, rel=1e-9)
        for r in comp.results:
            assert r.points
            for p in r.points:
                assert 0 < p.rate_per_s < r.bound_rate_per_s and p.load < 1
    with pytest.raises(ConfigError, match="rate_per_s"):
        run_at(candidates(SETUP)[0], SETUP, 70.0, 66.0)


def test_bisection_finds_the_boundary(table: list[SplitComparison]) -> None:
    for comp in table:
        for r in comp.results:
            assert r.rate_met_per_s > 0 and r.at_rate is not None
            assert r.at_rate.verdict(comp.slo) == (True, "")
            assert r.rate_failed_per_s == pytest.approx(r.rate_met_per_s * (1 + SETUP.step), rel=1e-12)
            failed = [p for p in r.points if p.rate_per_s == r.rate_failed_per_s]
            if failed:  # it was run and failed
                assert not failed[0].verdict(comp.slo)[0]
                assert r.reason == failed[0].verdict(comp.slo)[1]
            else:  # the next rate up is the bound itself
                assert r.rate_failed_per_s == pytest.approx(r.bound_rate_per_s, rel=1e-12)
    # re-running the boundary of one candidate from nothing gives the same two verdicts
    r = table[0].results[3]
    assert run_at(r.candidate, SETUP, r.rate_met_per_s, r.bound_rate_per_s) == r.at_rate
    assert not run_at(r.candidate, SETUP, r.rate_failed_per_s, r.bound_rate_per_s).verdict(TIGHT)[0]


def test_deterministic_and_independent_of_the_shared_runs(table: list[SplitComparison]) -> None:
    cand = candidates(SETUP)[0]
    fresh = goodput(cand, SETUP, LOOSE)
    assert fresh == table[1].results[0]
    other = goodput(cand, dataclasses.replace(SETUP, seed=1), LOOSE)
    assert other.points[0].latency != fresh.points[0].latency  # the seed matters


def test_shape_tight_tpot_split_wins_loose_colocated_wins(table: list[SplitComparison]) -> None:
    tight, loose = table
    assert tight.winner is not None and tight.winner.startswith("split")
    assert loose.winner is not None and loose.winner.startswith("co-located")
    rate = {r.candidate.name: r.rate_met_per_s for r in tight.results}
    assert rate[tight.winner] > 2 * rate[tight.best_colocated or ""]
    # the split's decode engines run decode-only batches of at most 32 requests: t = 10 ms + the 1 ms
    # transfer spread over 20 tokens, so its TPOT does not depend on the target
    for comp in table:
        best_split = next(r for r in comp.results if r.candidate.name == comp.best_split)
        assert best_split.at_rate is not None and best_split.at_rate.latency["p99_tpot_ms"] <= 11.0
    assert loose.to_dict()["winner"] == loose.winner


@pytest.mark.parametrize(("change", "field"), [
    ({"gpus": 1}, "gpus"),
    ({"policy": "vllm"}, "policy"),
    ({"transfer": "fixed_ms=-2"}, "transfer.fixed_ms"),
    ({"transfer": "speed=3"}, "transfer"),
    ({"colocated_budgets": ()}, "colocated_budgets"),
    ({"colocated_budgets": (64, 64)}, "colocated_budgets"),
    ({"decode_k_max": 0}, "decode_k_max"),
    ({"batch_time": "preset:nope"}, "batch_time"),
    ({"prefill": "poisson:-3"}, "prefill"),
    ({"memory": "tokens=10"}, "memory"),
    ({"step": 1.5}, "step"),
    ({"requests": 0}, "requests"),
])
def test_bad_setup_names_the_field(change: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        compare_split(dataclasses.replace(SETUP, **change), TIGHT)
    assert err.value.field == field and "\n" not in str(err.value)


@pytest.mark.parametrize(("slo", "field"), [
    (SplitSLO(0.0, 10.0), "ttft_ms"), (SplitSLO(100.0, float("nan")), "tpot_ms"),
    (SplitSLO(100.0, 10.0, "p95"), "percentile"),
])
def test_bad_targets_name_the_field(slo: SplitSLO, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        compare_split(SETUP, slo)
    assert err.value.field == field


def test_cli_defaults_are_the_study_defaults() -> None:
    for name in ("DEFAULT_BATCH_TIME", "DEFAULT_PREFILL", "DEFAULT_DECODE", "DEFAULT_TRANSFER"):
        assert getattr(cli_split, name) == getattr(disagg, name)
    given = {p.name: p.default for p in cli_split.split_cmd.params}
    study = SplitSetup(gpus=given["gpus"])
    assert (given["batch_time"], given["prefill"], given["decode"], given["policy"], given["transfer"],
            given["prefill_budget"], given["decode_budget"], given["k_max"], given["memory"],
            given["requests"], given["seed"], given["step"]) == (
        study.batch_time, study.prefill, study.decode, study.policy, study.transfer, study.prefill_budget,
        study.decode_budget, study.decode_k_max, study.memory, study.requests, study.seed, study.step)
    assert tuple(int(b) for b in given["budget"].split(",")) == study.colocated_budgets


def test_cli_json_matches_the_api(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["network", "split", "--gpus", "2", "--batch-time", SETUP.batch_time, "--prefill", "200",
            "--decode", "20", "--budget", "256", "--prefill-budget", "256", "--decode-budget", "64",
            "--k-max", "32", "--transfer", SETUP.transfer, "--requests", "100", "--step", "0.2",
            "--ttft-ms", "200", "--tpot-ms", "11", "--tpot-ms", "40", "--json"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    doc = strict_json(out)
    setup = dataclasses.replace(SETUP, gpus=2, colocated_budgets=(256,), requests=100, step=0.2)
    assert [c for c in doc["table"]] == [comp.to_dict() for comp in split_table(setup, [TIGHT, LOOSE])]
    code, out, err = run_cli(capsys, *args[:-1])
    assert code == 0 and "summary" in out and "winner" in out


@pytest.mark.parametrize(("args", "word"), [
    (["--gpus", "1"], "--gpus"),
    (["--tpot-ms", "abc"], "--tpot-ms"),
    (["--tpot-ms", "10,-1"], "--tpot-ms"),
    (["--budget", "0"], "--budget"),
    (["--transfer", "fixed_ms=-2"], "transfer"),
    (["--policy", "vllm"], "--policy"),
])
def test_cli_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], args: list[str], word: str) -> None:
    code, out, err = run_cli(capsys, "network", "split", *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and word in err
