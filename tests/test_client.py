"""The benchmark client's knobs (vLLM ``bench serve`` conventions): goodput, max concurrency and the
option aliases.

- ``goodput`` counts completed requests meeting every target, by vLLM's rule (TPOT 0 without decode
  tokens), equally from exact columns and from folded histograms.
- ``max_concurrency`` keeps at most N requests in the engine (checked on every request's times),
  serves one at a time in order when N = 1 (a closed form), and gives the same runs on the fast
  and the reference engine.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmqueue.cli.app import main
from llmqueue.engines.metrics import Recorder, parse_goodput
from llmqueue.model.batchtime import ConstantTime, LinearTime, StaircaseTime
from llmqueue.model.specs import make_workload
from llmqueue.model.workload import fixed_requests
from llmqueue.policies.fcfs import SARATHI
from llmqueue.sim.run import simulate

from .strategies import SHIPPED, workloads

T = StaircaseTime(c=11.28, a=35.47, b0=128)


# -- goodput ---------------------------------------------------------------------------------------


def _good_by_hand(records, targets: dict[str, float]) -> int:
    good = 0
    for r in records:
        if not np.isfinite(r.finish_ms):
            continue
        ttft = r.first_token_ms - r.arrival_ms
        tpot = (r.finish_ms - r.first_token_ms) / r.decode_tokens if r.decode_tokens else 0.0
        e2el = r.finish_ms - r.arrival_ms
        values = {"ttft": ttft, "tpot": tpot, "e2el": e2el}
        good += all(values[k] <= v for k, v in targets.items())
    return good


@pytest.mark.parametrize("targets", [{"ttft": 300.0}, {"ttft": 400.0, "tpot": 60.0}, {"e2el": 6000.0}])
def test_goodput_counts_requests_meeting_every_target(targets) -> None:
    w = make_workload("poisson", "poisson:129", "geometric:112", rate_per_s=12.0)
    result = simulate(w, SARATHI, T, 512, max_requests=800, seed=2, goodput=targets)
    m = result.metrics
    assert m.good_requests == _good_by_hand(result.requests, targets)
    assert 0 < m.good_requests < m.completed  # the targets are neither trivial nor impossible
    assert m.request_goodput == pytest.approx(m.good_requests / m.duration_s, rel=1e-12)


def test_goodput_is_throughput_under_loose_targets_and_nan_without_targets() -> None:
    w = make_workload("poisson", "129", "112", rate_per_s=8.0)
    loose = simulate(w, SARATHI, T, 512, max_requests=200, goodput={"e2el": 1e9}).metrics
    assert loose.good_requests == loose.completed
    assert loose.request_goodput == pytest.approx(loose.request_throughput, rel=1e-12)
    plain = simulate(w, SARATHI, T, 512, max_requests=200).metrics
    assert plain.good_requests is None and np.isnan(plain.request_goodput)


def test_goodput_from_folded_histograms_equals_the_exact_count() -> None:
    """Past ``exact_limit`` the recorder folds columns into histograms; the count stays exact."""
    rng = np.random.default_rng(5)
    n = 2500
    arrival = np.sort(rng.uniform(0, 1e4, n))
    first = arrival + rng.exponential(200.0, n)
    decode = rng.integers(0, 50, n)
    finish = first + decode * rng.exponential(40.0, n)
    targets = {"ttft": 250.0, "tpot": 45.0}
    counts = []
    for limit in (100, 10**9):
        rec = Recorder(keep_requests=False, exact_limit=limit, goodput=targets)
        for lo in range(0, n, 300):
            sl = slice(lo, lo + 300)
            for t, tokens in zip(arrival[sl], np.ones(len(arrival[sl]), dtype=int), strict=True):
                rec.arrival(float(t), int(tokens))
            rec.requests_done(np.arange(lo, lo + len(arrival[sl])), arrival[sl], first[sl], finish[sl],
                              np.ones(len(arrival[sl]), dtype=np.int64), decode[sl])
        counts.append(rec.finish(2e4).good_requests)
    tpot = np.where(decode > 0, (finish - first) / np.maximum(decode, 1), 0)
    ok = (first - arrival <= 250.0) & (tpot <= 45.0)
    assert counts == [int(ok.sum())] * 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [("ttft:500,tpot:50", {"ttft": 500.0, "tpot": 50.0}),
     ("ttft:500 e2el:2000", {"ttft": 500.0, "e2el": 2000.0}),
     ("TTFT_ms=100", {"ttft": 100.0})],
)
def test_goodput_specs_parse_as_vllm_writes_them(text, expected) -> None:
    assert parse_goodput(text) == expected


# -- max concurrency -----------------------------------------------------------------------------


def _max_in_engine(records) -> int:
    """The most requests present at once: sent (arrival_ms) and not finished."""
    events = sorted([(r.arrival_ms, 1) for r in records] + [(r.finish_ms, -1) for r in records
                                                             if np.isfinite(r.finish_ms)],
                    key=lambda e: (e[0], e[1]))  # a finish at t frees its seat before a send at t
    most = now = 0
    for _, delta in events:
        now += delta
        most = max(most, now)
    return most


@pytest.mark.parametrize("limit", [1, 3, 16])
def test_max_concurrency_bounds_the_requests_in_the_engine(limit) -> None:
    w = make_workload("poisson", "poisson:129", "geometric:112", rate_per_s=30.0)
    result = simulate(w, SARATHI, T, 512, max_requests=300, seed=1, max_concurrency=limit, drain_s=1e6)
    assert result.metrics.completed == 300
    assert _max_in_engine(result.requests) == limit
    assert any("closed loop" in n for n in result.notes)


def test_one_at_a_time_is_a_closed_form() -> None:
    """Everything arrives at 0 and N = 1: request k is sent when request k-1 finishes and takes
    the same service time S as a lone request, so it finishes at (k + 1) S."""
    t = ConstantTime(2.0)
    alone = simulate(fixed_requests([(0.0, 20, 5)]), SARATHI, t, 16, engine="reference")
    service = alone.requests[0].finish_ms
    many = simulate(fixed_requests([(0.0, 20, 5)] * 6), SARATHI, t, 16, max_concurrency=1)
    assert [r.finish_ms for r in many.requests] == [service * (k + 1) for k in range(6)]
    assert [r.arrival_ms for r in many.requests] == [service * k for k in range(6)]


@settings(max_examples=30, deadline=None)
@given(requests=workloads(), policy=st.sampled_from(SHIPPED), limit=st.integers(1, 6),
       batch_time=st.sampled_from([ConstantTime(1.0), LinearTime(0.5, 0.0625)]), budget=st.integers(4, 64))
def test_max_concurrency_runs_the_same_on_the_fast_and_the_reference_engine(
        requests, policy, limit, batch_time, budget) -> None:
    kwargs = dict(max_concurrency=limit, drain_s=1e6)
    ref = simulate(requests, policy, batch_time, budget, engine="reference", **kwargs)
    fast = simulate(requests, policy, batch_time, budget, engine="fast", **kwargs)
    assert ref.requests == fast.requests
    # requests that never finish (a prompt over a never-chunking budget) may hold their seat for
    # good; the bound is checked on the finished ones (unsent ones carry their client arrival)
    assert _max_in_engine([r for r in ref.requests if np.isfinite(r.finish_ms)]) <= limit


def test_cli_takes_vllms_option_names(capsys) -> None:
    """--max-num-batched-tokens, --max-num-seqs, --request-rate and --num-prompts are aliases."""
    docs = []
    for args in (["--budget", "1024", "--k-max", "64", "--rate", "9", "--requests", "120"],
                 ["--max-num-batched-tokens", "1024", "--max-num-seqs", "64", "--request-rate", "9",
                  "--num-prompts", "120"]):
        capsys.readouterr()
        assert main(["simulate", "--policy", "vllm-chunked", *args, "--json"]) == 0
        docs.append(json.loads(capsys.readouterr().out))
    assert docs[0] == docs[1]
    assert docs[0]["budget"] == 1024 and docs[0]["k_max"] == 64 and docs[0]["arrivals"] == 120


def test_cli_goodput_and_max_concurrency(capsys) -> None:
    capsys.readouterr()
    code = main(["simulate", "--requests", "200", "--rate", "20", "--max-concurrency", "8",
                 "--goodput", "ttft:2000,tpot:100", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["good_requests"] is not None and doc["request_goodput"] <= doc["request_throughput"]
    assert any("at most 8 request(s)" in n for n in doc["notes"])
