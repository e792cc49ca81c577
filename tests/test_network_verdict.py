"""Network outputs that do not mislead: composition batch times in networks (analysis through each
engine's mix, simulation timed from every batch's shape), the predicted verdict of an overloaded
virtual station (PAPER.md §5.4), the network's observed verdict from several kinds of evidence
(docs/stability.md, "Networks of engines"), and busy fractions within [0, 1]."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmqueue import make_workload
from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import CompositionTime, MixTime, parse_batch_time
from llmqueue.model.network import Network, load_network, parse_network
from llmqueue.paper.reproduce import BAD, GOOD, rs_network
from llmqueue.policies.fcfs import make_policy
from llmqueue.policies.network import ClassPriority
from llmqueue.sim.network import NetworkResult, engine_kind, network_policy, predict_network, simulate_network
from llmqueue.sim.run import simulate
from llmqueue.theory.network import analyze
from llmqueue.theory.stability import Observation, network_verdict

from .helpers import run_cli, run_json

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "networks"
PRESET = "preset:h200-llama3-8b"


def chat(batch_time: str = PRESET, *, k_max: int | None = 256, rate: float = 5.0,
         prefill: str = "1000", decode: str = "200") -> dict:
    """One engine, one class: a single engine written as a network."""
    engine: dict[str, object] = {"budget": 2048, "batch_time": batch_time, "policy": "vllm-chunked"}
    if k_max is not None:
        engine["k_max"] = k_max
    return {
        "engines": {"chat": engine},
        "classes": {"q": {"rate": rate, "start": "a", "nodes": {
            "a": {"engine": "chat", "prefill": prefill, "decode": decode, "next": "exit"}}}},
    }


def chat_and_judge() -> dict:
    """A composition-timed chat engine and a token-timed judge that sends one answer in five back."""
    return {
        "engines": {
            "chat": {"budget": 1024, "batch_time": "composition:c=2,prefill=0.02,decode=0.03,kv=0.0001,"
                     "chunk=0.3", "policy": "sarathi"},
            "judge": {"budget": 1024, "batch_time": "linear:c=3,a=0.02", "policy": "sarathi"},
        },
        "classes": {"q": {"rate": 6.0, "start": "answer", "nodes": {
            "answer": {"engine": "chat", "prefill": "poisson:400", "decode": "poisson:100",
                       "next": "check"},
            "check": {"engine": "judge", "prefill": "poisson:600", "decode": "poisson:8",
                      "next": {"answer": 0.2, "exit": 0.8}},
        }}},
    }


# -- 1. composition (shape) batch times in a network ---------------------------------------------


@pytest.mark.parametrize("k_max", [256, None])
def test_analysis_sees_a_preset_through_the_engines_mix_as_capacity_does(capsys, k_max) -> None:
    """The network's load of a single engine is what ``llmqueue capacity`` says for that engine
    and mix (the composition model's token view at 1000 + 200 tokens)."""
    a = analyze(parse_network(chat(k_max=k_max)))
    load = a.engines["chat"]
    assert isinstance(load.token_time, MixTime)
    assert load.mean_prefill_tokens == pytest.approx(1000) and load.mean_decode_tokens == pytest.approx(200)
    extra = ["--k-max", str(k_max)] if k_max else []
    cap = run_json(capsys, "capacity", "--budget", "2048", *extra, "--batch-time", PRESET,
                   "--prefill", "1000", "--decode", "200", "--rate", "5")
    assert load.capacity_tokens_per_s == pytest.approx(cap["capacity_tokens_per_s"], rel=1e-9)
    expected = cap["kmax_load"] if k_max else cap["load"]
    assert load.rho == pytest.approx(expected, rel=1e-9)
    assert a.critical_scale == pytest.approx(1 / expected, rel=1e-9)


def test_network_analyze_cli_takes_a_preset(tmp_path, capsys) -> None:
    path = tmp_path / "chat.json.yaml"
    path.write_text(json.dumps(chat()), encoding="utf-8")
    doc = run_json(capsys, "network", "analyze", str(path))
    assert doc["engines"]["chat"]["token_batch_time"].startswith("mix(composition:")
    assert doc["predicted"] == "no guarantee" and doc["predicted_reason"]
    code, out, err = run_cli(capsys, "network", "analyze", str(path))
    assert code == 0 and err == "" and "load (rho)" in out


def test_shape_models_run_on_the_python_engines_timed_by_shape() -> None:
    net = parse_network(chat_and_judge())
    spec = net.engines["chat"]
    policy = network_policy(net, "chat")
    assert engine_kind(policy, spec) == "fast"
    assert engine_kind(policy, spec, "reference") == "reference"
    with pytest.raises(ConfigError, match=r"^engine: engine chat has a composition-aware batch time"):
        engine_kind(policy, spec, "compiled")
    with pytest.raises(ConfigError) as err:
        simulate_network(net, seed=1, max_requests=10, engine="compiled")
    assert "\n" not in str(err.value)
    run = simulate_network(net, seed=1, max_requests=250)
    assert any("composition-aware batch time" in n for n in run.notes)
    assert run.classes["q"].completed == 250
    # the fast and the reference engine give the same run
    ref = simulate_network(net, seed=1, max_requests=250, engine="reference")
    assert ref.engines["chat"].metrics.busy_fraction == pytest.approx(
        run.engines["chat"].metrics.busy_fraction, rel=1e-9)
    assert ref.classes["q"].latency["mean_e2el_ms"] == pytest.approx(
        run.classes["q"].latency["mean_e2el_ms"], rel=1e-9)
    # every batch is timed from its shape, not from the mix's token view that the loads use
    mix = run.analysis.engines["chat"].token_time
    assert isinstance(mix, MixTime) and isinstance(spec.batch_time, CompositionTime)
    viewed = Network({**net.engines, "chat": dataclasses.replace(spec, batch_time=mix)}, net.classes)
    by_tokens = simulate_network(viewed, seed=1, max_requests=250, engine="fast")
    assert by_tokens.engines["chat"].metrics.busy_fraction != run.engines["chat"].metrics.busy_fraction


def test_network_simulate_cli_with_a_preset(tmp_path, capsys) -> None:
    path = tmp_path / "chat.json.yaml"
    path.write_text(json.dumps(chat(rate=20.0)), encoding="utf-8")
    doc = run_json(capsys, "network", "simulate", str(path), "--requests", "300")
    assert doc["classes"]["q"]["completed"] == 300
    assert doc["stable_observed_reason"] and doc["observed_evidence"]["verdict"] == doc["stable_observed"]
    assert 0 <= doc["engines"]["chat"]["busy_fraction"] <= 1


# -- 3. the predicted verdict of a virtual station ------------------------------------------------


def test_an_overloaded_virtual_station_is_predicted_unstable() -> None:
    net = load_network(EXAMPLES / "rs.toml")
    a = analyze(net)
    assert max(e.rho for e in a.engines.values()) == pytest.approx(0.9)
    p = predict_network(net, a)
    assert p.verdict == "unstable"
    assert "B.long" in p.reason and "A.long" in p.reason and "1.611" in p.reason
    assert "virtual station" in p.reason


@pytest.mark.parametrize("variant", ["good", "sarathi", "max-pressure", "bad at 0.5"])
def test_no_unstable_prediction_without_an_overloaded_virtual_station(variant: str) -> None:
    """Below nominal load, the reversed priorities, FCFS and max-pressure are never predicted
    unstable, nor is the bad priority whose virtual station is below 1 (0.895 at nominal 0.5);
    cyclic routing leaves them without a theorem ('no guarantee')."""
    net = {"good": rs_network(0.9, "priority", GOOD), "sarathi": rs_network(0.9, "sarathi"),
           "max-pressure": rs_network(0.9, "max-pressure"),
           "bad at 0.5": rs_network(0.5, "priority", BAD)}[variant]
    p = predict_network(net, analyze(net))
    assert p.verdict == "no guarantee"
    assert "cyclic" in p.reason


def test_the_prediction_follows_the_policies_that_ran() -> None:
    """A policy override removes (or creates) the virtual station the file's priorities make."""
    bad = rs_network(0.9, "priority", BAD)
    fcfs_policies = {n: make_policy("sarathi") for n in bad.engines}
    run = simulate_network(bad, seed=1, max_requests=50, policies=fcfs_policies)
    assert run.predicted.verdict == "no guarantee"
    good = {n: ClassPriority(order=GOOD[n]) for n in bad.engines}
    run = simulate_network(bad, seed=1, max_requests=50, policies=good)
    assert run.analysis.virtual_stations == () and run.predicted.verdict == "no guarantee"
    made_bad = {n: ClassPriority(order=BAD[n]) for n in bad.engines}
    fcfs = rs_network(0.9, "sarathi")
    assert simulate_network(fcfs, seed=1, max_requests=50, policies=made_bad).predicted.verdict == "unstable"


def test_example_networks_predictions() -> None:
    agent = load_network(EXAMPLES / "agent.toml")
    assert predict_network(agent, analyze(agent)).verdict == "no guarantee"  # cyclic, rho 0.8
    over = agent.scaled(3.5 / 2.545)  # 3.5 tasks/s: the critic at 1.1
    assert predict_network(over, analyze(over)).verdict == "unstable"
    memory = load_network(EXAMPLES / "memory.toml")
    assert predict_network(memory, analyze(memory)).verdict == "no guarantee"


# -- 2. the observed verdict of a network ------------------------------------------------------------


def _obs(verdict: str, slope: float, lo: float, hi: float, threshold: float = 10.0) -> Observation:
    return Observation(verdict, slope, lo, hi, threshold, 0.2, 1.0, 20)  # type: ignore[arg-type]


FLAT = _obs("stable", 1.0, -5.0, 6.0)
NOISY_UP = _obs("inconclusive", 300.0, -200.0, 800.0)
REQ_UP = _obs("unstable", 5.0, 3.0, 7.0, threshold=0.5)
REQ_FLAT = _obs("inconclusive", 0.1, -0.3, 0.5, threshold=0.1)


@pytest.mark.parametrize(("backlog", "requests", "engines", "peaks", "done", "drain", "expected"), [
    (_obs("unstable", 50.0, 30.0, 70.0), REQ_FLAT, (), (1.0, 1.0), 1.0, 0.0, "unstable"),  # 1
    (NOISY_UP, REQ_UP, (), (1.0, 1.0), 0.6, 0.0, "unstable"),  # 2: the RS network
    (_obs("inconclusive", -3.0, -9.0, 3.0), REQ_UP, (), (1.0, 1.0), 1.0, 0.0, "inconclusive"),
    (_obs("inconclusive", 8.0, 2.0, 14.0), REQ_FLAT, ("critic",), (1.0, 1.5), 1.0, 9.0, "unstable"),  # 3
    (NOISY_UP, REQ_FLAT, ("critic",), (1.0, 1.0), 1.0, 0.0, "inconclusive"),
    (FLAT, REQ_FLAT, (), (1.0, 1.2), 1.0, 9.0, "stable"),
    (FLAT, REQ_FLAT, ("critic",), (1.0, 1.0), 1.0, 9.0, "inconclusive"),
    (FLAT, REQ_FLAT, (), (1.0, 5.0), 1.0, 9.0, "inconclusive"),  # peak grew 5x
    (FLAT, REQ_FLAT, (), (1.0, 1.0), 0.9, 9.0, "inconclusive"),  # 10 % left after a full drain
    (FLAT, REQ_FLAT, (), (1.0, 1.0), 0.9, 0.0, "stable"),  # no drain: in flight at the end
])
def test_network_verdict_rule(backlog, requests, engines, peaks, done, drain, expected) -> None:
    verdict, reason = network_verdict(backlog, requests, engines, *peaks, done, drain, 5.0)
    assert verdict == expected
    assert reason


@pytest.fixture(scope="module")
def rs_bad() -> NetworkResult:
    """The RS network with the exit-first priorities at the settings of ``reproduce rs --quick``."""
    return simulate_network(rs_network(0.9, "priority", BAD), seed=1, duration_s=4.0, drain_s=0.0)


def test_rs_bad_priority_is_observed_unstable(rs_bad: NetworkResult) -> None:
    ev = rs_bad.evidence
    assert rs_bad.observed.verdict == ev.verdict == "unstable"
    assert rs_bad.predicted.verdict == "unstable"
    # the oscillating backlog defeats its own trend test; the requests in the network do not
    assert ev.backlog.verdict == "inconclusive" and ev.requests.verdict == "unstable"
    assert ev.completed_fraction < 0.75
    assert ev.requests.slope_tokens_per_s > 10 * ev.requests.threshold_tokens_per_s
    assert "requests pile up" in ev.reason
    doc = rs_bad.to_dict()
    assert doc["stable_observed"] == "unstable" and doc["observed_evidence"]["requests_verdict"] == "unstable"
    assert all(0 <= e.metrics.busy_fraction <= 1 for e in rs_bad.engines.values())


@pytest.mark.parametrize("policy", ["good", "max-pressure"])
def test_rs_good_priority_and_max_pressure_are_not_unstable(policy: str) -> None:
    net = rs_network(0.9, "priority", GOOD) if policy == "good" else rs_network(0.9, "max-pressure")
    run = simulate_network(net, seed=1, duration_s=4.0, drain_s=0.0)
    assert run.observed.verdict == "stable"
    assert run.evidence.requests.verdict != "unstable" and not run.evidence.engines_unstable


def test_agent_above_capacity_is_observed_unstable() -> None:
    """3.5 tasks/s puts the critic at load 1.1: the token backlog's test alone says inconclusive
    here (its materiality threshold is 2 % of all four engines' token rates), the tasks in the
    network grow at about 9 % of their arrival rate."""
    net = load_network(EXAMPLES / "agent.toml").scaled(3.5 / 2.545)
    run = simulate_network(net, seed=0, max_requests=5000)
    assert run.predicted.verdict == "unstable"
    assert run.observed.verdict == "unstable"
    assert run.evidence.backlog.verdict == "inconclusive"
    assert run.evidence.requests.verdict == "unstable"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agent_at_08_of_critical_is_never_unstable(seed: int) -> None:
    net = load_network(EXAMPLES / "agent.toml")
    assert 1 / analyze(net).critical_scale == pytest.approx(0.8, abs=0.005)
    run = simulate_network(net, seed=seed, max_requests=5000)
    assert run.observed.verdict in ("stable", "inconclusive")
    assert run.evidence.requests.verdict != "unstable"
    assert run.evidence.completed_fraction == 1.0


def test_same_seed_same_evidence() -> None:
    net = parse_network(chat_and_judge())
    one = simulate_network(net, seed=4, max_requests=300).to_dict()
    two = simulate_network(net, seed=4, max_requests=300).to_dict()
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)


# -- 4. busy fraction within [0, 1] ----------------------------------------------------------------


STAIRCASE = parse_batch_time("staircase:c=11.28,a=35.47,b0=128")


@settings(max_examples=30)
@given(
    policy=st.sampled_from(["sarathi", "orca", "vllm", "fastertransformer"]),
    engine=st.sampled_from(["compiled", "fast", "reference"]),
    rate=st.floats(5.0, 60.0),
    duration=st.floats(0.1, 1.5),
    seed=st.integers(0, 1000),
)
def test_busy_fraction_is_the_busy_time_within_the_run(policy, engine, rate, duration, seed) -> None:
    """A run cut at its horizon (drain 0) counts only the part of the last batch before the end:
    the busy fraction is the batches' overlap with [0, end] over end, always within [0, 1]."""
    workload = make_workload("poisson", "129", "112", rate_per_s=rate)
    run = simulate(workload, make_policy(policy), STAIRCASE, 512, seed=seed, duration_s=duration,
                   drain_s=0.0, engine=engine)
    busy = run.metrics.busy_fraction
    if run.metrics.duration_s == 0:  # no arrival at all
        assert math.isnan(busy)
        return
    assert 0.0 <= busy <= 1.0
    if engine == "reference":
        kept = simulate(workload, make_policy(policy), STAIRCASE, 512, seed=seed, duration_s=duration,
                        drain_s=0.0, engine="reference", keep_batches=True)
        end = kept.metrics.duration_s * 1000.0
        overlap = sum(max(0.0, min(b.end_ms, end) - b.start_ms) for b in kept.batches or ())
        assert busy == pytest.approx(overlap / end, rel=1e-9, abs=1e-12)
