"""``llmqueue plan``: config errors, sound theory pruning, the cheapest passing fleet (checked by
brute force on a small case), resume from the store, determinism, and the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from llmqueue.errors import ConfigError
from llmqueue.io.store import Store
from llmqueue.studies.plan import (
    PlanResult,
    candidate_network,
    candidates_of,
    execute_plan_run,
    judge,
    parse_plan,
    pruned_candidates,
    run_config,
    run_plan,
    slo_targets,
    smallest_stable,
    theory_of,
)

from .helpers import run_cli

# Two GPU types on a small Poisson workload: the fast one costs 3/h, the slow one 1/h. At 80
# requests/s one fast replica is at load 1.265 and one slow at 2.85: both need pruning.
SMALL: dict[str, Any] = {
    "workload": {"rate": 80.0, "prefill": "poisson:300", "decode": "poisson:100", "requests": 500},
    "slo": {"ttft_ms": 200, "tpot_ms": 60},
    "gpus": {"fast": {"batch_time": "linear:c=10,a=0.02", "price_per_gpu_hour": 3.0},
             "slow": {"batch_time": "linear:c=20,a=0.05", "price_per_gpu_hour": 1.0}},
    "deploy": {"colocated": {"policy": "sarathi", "budget": [512], "replicas": "1..5"}},
}


def _with(path: str, value: Any) -> dict[str, Any]:
    """SMALL with one key (dotted path) set; a value of ``...`` deletes the key."""
    data = copy.deepcopy(SMALL)
    *head, last = path.split(".")
    node = data
    for key in head:
        node = node.setdefault(key, {})
    if value is ...:
        node.pop(last, None)
    else:
        node[last] = value
    return data


def _plan(tmp_path: Path, data: dict[str, Any] | None = None, **kw: Any) -> tuple[Any, PlanResult]:
    plan = parse_plan(data or SMALL)
    with Store(tmp_path / "plan.sqlite") as store:
        return plan, run_plan(plan, store, **kw)


@pytest.mark.parametrize(("path", "value", "field", "problem"), [
    ("gpus", {}, "gpus", "at least 1 item"),
    ("gpus.fast.price_per_gpu_hour", -1.0, "gpus.fast.price_per_gpu_hour", "greater than 0"),
    ("gpus.fast.batch_time", "linear:c=-1", "gpus.fast.batch_time", ""),
    ("gpus.fast.memory", "tokens=256", "gpus.fast.memory", "less than one mean request"),
    ("deploy.colocated.router", "fastest", "deploy.colocated.router", "unknown router"),
    ("deploy.colocated.policy", "magic", "deploy.colocated.policy", "unknown policy"),
    ("deploy.colocated.replicas", "4..2", "deploy.colocated.replicas", "LOW <= HIGH"),
    ("deploy.colocated.replicas", "a..b", "deploy.colocated.replicas", "LOW..HIGH"),
    ("deploy.colocated", ..., "deploy", "give [deploy.colocated]"),
    ("deploy.disaggregated", {"ratios": ["0:3"]}, "deploy.disaggregated.ratios", "at least one replica"),
    ("deploy.disaggregated", {"ratios": ["a:b"]}, "deploy.disaggregated.ratios", "'P:D'"),
    ("deploy.disaggregated", {"ratios": ["20:20"], "max_replicas": 32}, "deploy.disaggregated.ratios",
     "more than max_replicas"),
    ("slo.ttft_ms", 0, "slo.ttft_ms", "greater than 0"),
    ("slo.tpot_ms", -5, "slo.tpot_ms", "greater than 0"),
    ("slo.percentile", 95, "slo.percentile", ""),
    ("slo", {"ttft_ms": None, "tpot_ms": None}, "slo", "at least one"),
    ("workload.rate", ..., "workload.rate", "arrival rate"),
    ("workload.prefill", "gauss:3", "workload.prefill", ""),
    ("workload.trace", "no/such/trace.csv", "workload.trace", "no such file"),
    ("search.headroom", 1.0, "search.headroom", "less than 1"),
    ("search.speed", 3, "search.speed", "unknown key"),
])
def test_config_errors_name_the_key(path: str, value: Any, field: str, problem: str) -> None:
    data = _with(path, value)
    if path == "slo":
        data["slo"] = value
    with pytest.raises(ConfigError) as err:
        parse_plan(data, source="plan.toml")
    assert err.value.field == f"plan.toml: {field}"
    assert problem in err.value.problem
    assert "\n" not in str(err.value)


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "plan.toml"
    config.write_text("[workload]\nrate = 10\nprefill = '100'\ndecode = '10'\n[gpus.h100]\n"
                      "batch_time = 'linear:c=10,a=0.02'\nprice_per_gpu_hour = -2\n"
                      "[deploy.colocated]\nreplicas = '1..4'\n")
    code, out, err = run_cli(capsys, "plan", str(config), "--store", str(tmp_path / "s.sqlite"))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert "gpus.h100.price_per_gpu_hour" in err and "-2" in err


DISAGG = _with("deploy.disaggregated", {"ratios": ["1:1", "1:2"], "policy": "sarathi", "budget": 512,
                                        "transfer": "fixed_ms=1,per_token_ms=0.0001", "max_replicas": 6})


@pytest.mark.parametrize("data", ["colocated", "with-disaggregated"])
def test_theory_pruning_is_sound(tmp_path: Path, data: str) -> None:
    """Every pruned candidate is unstable by theory (headroom 0), the first simulated one of each
    shape is not, and with headroom every pruned one is above 1 - headroom."""
    plan, result = _plan(tmp_path, SMALL if data == "colocated" else DISAGG)
    pruned = pruned_candidates(plan, result)
    assert result.pruned == len(pruned) > 0
    for c in pruned:
        t = theory_of(candidate_network(plan, c))
        assert t.load >= 1 and t.verdict == "unstable"
    simulated = [t for t in result.tried if t.status != "pruned"]
    for shape in {t.candidate.shape for t in simulated}:
        first = min(t.candidate.scale for t in simulated if t.candidate.shape == shape)
        assert theory_of(candidate_network(plan, _cand(plan, shape, first))).load < 1
    with_headroom = parse_plan(_with("search.headroom", 0.4))
    for shape in with_headroom.shapes:
        first, below = smallest_stable(with_headroom, shape, 0.6)
        assert first is not None and below is not None
        for scale in range(1, first):
            assert theory_of(candidate_network(with_headroom, _cand(with_headroom, shape, scale))).load >= 0.6
        assert theory_of(candidate_network(with_headroom, _cand(with_headroom, shape, first))).load < 0.6


def _cand(plan: Any, shape: Any, scale: int) -> Any:
    return next(c for c in candidates_of(plan) if c.shape == shape and c.scale == scale)


@pytest.mark.parametrize("data", [SMALL, DISAGG], ids=["colocated", "with-disaggregated"])
def test_cheapest_passing_fleet_matches_brute_force(tmp_path: Path, data: dict[str, Any]) -> None:
    """Simulate every candidate theory admits: the plan's answer is the cheapest that passes, and
    its runner-up the cheapest passing one of another shape; the plan simulated fewer."""
    plan, result = _plan(tmp_path, data)
    targets = slo_targets(plan.model)
    passing = []
    admitted = 0
    for c in candidates_of(plan):
        if theory_of(candidate_network(plan, c)).load >= 1:
            continue
        admitted += 1
        metrics, _ = execute_plan_run(run_config(plan, c))
        if judge(metrics, targets)[0]:
            passing.append(c)
    assert passing, "the small case must have a passing fleet"
    assert result.best is not None and result.best.candidate == passing[0]
    other = [c for c in passing if c.shape != passing[0].shape]
    assert result.runner_up is not None and result.runner_up.candidate == other[0]
    assert result.simulated < admitted
    assert result.best.candidate.cost_per_hour <= result.runner_up.candidate.cost_per_hour
    # the fixed-seed answer of this case
    assert (result.best.candidate.fleet, result.runner_up.candidate.fleet) == ("4 x slow", "2 x fast")
    assert all(v <= targets[k] for k, v in ((k, result.best.metrics[k]) for k in targets))
    assert {t.metrics["latency_source"] for t in result.tried if t.status in ("pass", "fail")} == {"class"}
    for t in result.tried:  # what was left unsimulated costs no less than the runner-up
        if t.status == "skipped":
            assert t.candidate.cost_per_hour >= result.runner_up.candidate.cost_per_hour


def test_resume_reads_the_store_and_gives_the_same_answer(tmp_path: Path) -> None:
    plan, first = _plan(tmp_path)
    assert first.ran == first.simulated > 0
    with Store(tmp_path / "plan.sqlite") as store:
        again = run_plan(plan, store, workers=2)
        assert again.ran == 0 and again.simulated == first.simulated
        # other SLOs reuse every stored simulation too
        stricter = parse_plan(_with("slo.ttft_ms", 150))
        other = run_plan(stricter, store)
    assert _answer(again) == _answer(first)
    assert all(t.stored for t in again.tried if t.status != "pruned")
    assert other.ran <= 2 and other.simulated >= first.simulated


def test_same_seed_same_plan(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, one = _plan(tmp_path / "a")
    _, two = _plan(tmp_path / "b", workers=2)
    assert _answer(one) == _answer(two)
    assert [_row(t) for t in one.tried] == [_row(t) for t in two.tried]


def _answer(r: PlanResult) -> tuple[Any, ...]:
    assert r.best is not None and r.runner_up is not None
    return (r.best.candidate, dict(r.best.metrics), r.runner_up.candidate, dict(r.runner_up.metrics))


def _row(t: Any) -> tuple[Any, ...]:
    return (t.candidate, t.status, t.reason, t.load, dict(t.metrics))


def test_cli_prints_the_answer_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "plan.yaml"
    config.write_text(json.dumps(SMALL))
    store = tmp_path / "s.sqlite"
    code, out, _ = run_cli(capsys, "plan", str(config), "--store", str(store), "--workers", "1")
    assert code == 0
    assert "cheapest: 4 x slow" in out and "runner-up: 2 x fast" in out
    assert "pruned by theory" in out
    code, out, _ = run_cli(capsys, "plan", str(config), "--store", str(store), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ran"] == 0
    assert doc["best"]["fleet"] == "4 x slow" and doc["best"]["cost_per_hour"] == 4.0
    strict = tmp_path / "strict.yaml"
    strict.write_text(json.dumps(_with("slo.ttft_ms", 1.0)))
    code, out, _ = run_cli(capsys, "plan", str(strict), "--store", str(store))
    assert code == 1 and "no fleet" in out
