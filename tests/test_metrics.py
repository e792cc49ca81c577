"""Metric building blocks: exact time integrals in bounded memory, exact percentiles, horizon."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmqueue.engines.metrics import LogHistogram, Recorder, TimeBins, ValueCounts
from llmqueue.model.batchtime import ConstantTime, StaircaseTime
from llmqueue.model.specs import make_workload
from llmqueue.model.workload import Request
from llmqueue.policies.fcfs import SARATHI, VLLM
from llmqueue.sim.run import simulate

segments = st.lists(
    st.tuples(st.floats(0.0, 500.0), st.floats(0.0, 1e4)), min_size=1, max_size=60
)


@given(segments)
def test_time_bins_keep_the_integral_in_bounded_memory(pieces) -> None:
    """Adding pieces keeps the total integral exact whatever coarsening happened."""
    bins = TimeBins(width_ms=1.0, max_bins=16)
    t = 0.0
    total = 0.0
    for length, value in pieces:
        bins.add(t, t + length, value)
        total += length * value
        t += length
    assert bins.sums.shape == (16,)
    assert float(bins.sums.sum()) == pytest.approx(total, rel=1e-9, abs=1e-6)
    assert bins.width_ms * bins.max_bins >= t


@given(st.lists(st.sampled_from([1.0, 2.5, 3.0, 46.75, 153.16, 0.1]), min_size=1, max_size=200),
       st.sampled_from([50.0, 90.0, 99.0, 0.0, 100.0, 37.5]))
def test_value_counts_percentile_equals_numpy(values, q) -> None:
    counts = ValueCounts()
    for v in values:
        counts.add(v)
    assert counts.percentile(q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    assert counts.mean() == pytest.approx(float(np.mean(values)), rel=1e-12)
    assert counts.exact


def test_value_counts_fold_past_the_cap() -> None:
    counts = ValueCounts(max_distinct=10)
    for i in range(100):
        counts.add(1.0 + i * 1e-9)
    assert not counts.exact
    assert len(counts.counts) <= 11
    assert counts.percentile(50) == pytest.approx(1.0, rel=1e-5)


def test_itl_percentiles_match_per_token_intervals() -> None:
    """ITL from the multiset equals numpy on intervals re-derived from the batches."""
    requests = [Request(i, 7.0 * i, 3 + i % 5, 2 + i % 4) for i in range(30)]
    result = simulate(requests, VLLM, StaircaseTime(1.0, 2.0, 4), 8, keep_batches=True)
    last: dict[int, float] = {}
    left = {r.id: r.prefill_tokens for r in requests}
    intervals = []
    for b in result.batches or ():
        for rid, n in b.plan:
            if left[rid]:
                left[rid] -= n
                if not left[rid]:
                    last[rid] = b.end_ms
            else:
                intervals.append(b.end_ms - last[rid])
                last[rid] = b.end_ms
    lat = result.metrics.latency
    assert lat["mean_itl_ms"] == pytest.approx(float(np.mean(intervals)))
    for label, q in (("median", 50), ("p90", 90), ("p99", 99)):
        assert lat[f"{label}_itl_ms"] == pytest.approx(float(np.percentile(intervals, q)))


def test_unstable_run_stops_at_its_horizon() -> None:
    """Overload: arrivals stop after 60 s, the drain is capped at 10 s, the rest is incomplete."""
    workload = make_workload("poisson", "100", "100", 40.0)
    result = simulate(workload, SARATHI, StaircaseTime(11.28, 35.47, 128), 512, seed=3,
                      duration_s=60.0, drain_s=10.0)
    m = result.metrics
    assert m.duration_s == pytest.approx(70.0)
    assert m.incomplete > 0 and m.completed + m.incomplete == m.arrivals
    assert result.observed.verdict == "unstable"
    assert any("horizon" in note for note in result.notes)
    assert len(result.metrics.backlog_series) <= 512


def test_empty_metrics_are_nan_not_errors() -> None:
    """A single request with nothing to decode has no TPOT or ITL: NaN, not a crash."""
    result = simulate([Request(0, 0.0, 5, 0)], SARATHI, ConstantTime(1.0), 8)
    lat = result.metrics.latency
    assert math.isnan(lat["mean_tpot_ms"]) and math.isnan(lat["p99_itl_ms"])
    assert lat["mean_ttft_ms"] == 1.0 and lat["mean_e2el_ms"] == 1.0


@given(
    st.lists(st.floats(0.0, 1e9) | st.sampled_from([0.0, 1.0, 46.75]), min_size=1, max_size=300),
    st.sampled_from([0.0, 1.0, 37.5, 50.0, 90.0, 99.0, 100.0]),
)
def test_log_histogram_percentiles_are_within_alpha(values, q) -> None:
    """Every percentile lies within relative alpha of numpy's exact one (values above 1e-6 ms)."""
    histogram = LogHistogram(alpha=1e-4)
    histogram.add(np.array(values))
    exact = float(np.percentile(values, q))
    got = histogram.percentile(q)
    assert got == pytest.approx(exact, rel=1e-4, abs=1e-6)
    assert histogram.mean() == pytest.approx(float(np.mean(values)), rel=1e-12)


def test_recorder_folds_into_histograms_without_keeping_requests() -> None:
    """The same run with and without per-request columns: equal counts, percentiles within 1e-4."""
    workload = make_workload("poisson", "poisson:129", "geometric:112", 12.0)
    t = StaircaseTime(11.28, 35.47, 128)
    kept = simulate(workload, SARATHI, t, 512, seed=3, max_requests=4000)
    folded = simulate(workload, SARATHI, t, 512, seed=3, max_requests=4000, keep_requests=False)
    assert kept.metrics.latency_exact and folded.metrics.latency_exact  # under the limit
    recorder = Recorder(keep_requests=False, exact_limit=500)
    for record in kept.requests or ():
        recorder.totals.in_system += 1
        recorder.request_done(record)
    small = recorder.finish(kept.metrics.duration_s * 1000.0)
    assert not small.latency_exact
    assert recorder.histograms is not None and len(recorder.done["id"]) < 500
    assert small.completed == kept.metrics.completed
    assert small.output_throughput == kept.metrics.output_throughput
    for name in ("ttft", "tpot", "e2el"):
        for label in ("mean", "median", "p90", "p99"):
            key = f"{label}_{name}_ms"
            assert small.latency[key] == pytest.approx(kept.metrics.latency[key], rel=1e-4), key
    with pytest.raises(ValueError, match="folded"):
        list(recorder.completed_records())
