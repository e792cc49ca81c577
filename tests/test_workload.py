"""Tests of llmqueue.model.workload: exact means, spec round trips, arrivals, determinism, bad input."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special

from llmqueue.errors import ConfigError
from llmqueue.model.specs import make_workload, parse_arrival, parse_size
from llmqueue.model.workload import (
    CHUNK_SIZE,
    Constant,
    DeterministicArrivals,
    Empirical,
    GammaArrivals,
    Geometric,
    LogNormal,
    Poisson,
    PoissonArrivals,
    Request,
    TraceArrivals,
    Uniform,
    Workload,
    fixed_requests,
    load_trace,
)

DATA = Path(__file__).parent / "data"
PAIRS = str(DATA / "workload_pairs.csv")
PAIR_ROWS = {(10 * k, k) for k in range(1, 9)}
AZURE_CONV = Path(__file__).resolve().parents[2] / "shared/data/traces/azure_conv_2023.csv"
AZURE_ROWS = 19_366
N_DRAWS = 200_000


def rng(seed: int = 12345) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def first_arrivals(process: object, n: int, seed: int = 7) -> np.ndarray:
    chunks = []
    total = 0
    for chunk in process.chunks_ms(rng(seed)):  # type: ignore[attr-defined]
        chunks.append(chunk)
        total += chunk.shape[0]
        if total >= n:
            break
    return np.concatenate(chunks)[:n]


# --------------------------------------------------------------------------------------------
# Size distributions
# --------------------------------------------------------------------------------------------

SIZE_SPECS = [
    "129",
    "poisson:129",
    "poisson:0.5",
    "poisson:3,min=5",
    "geometric:112",
    "geometric:5,min=3",
    "geometric:1",
    "uniform:10,200",
    "uniform:7,7",
    "lognormal:mean=500,sigma=0.8",
    "lognormal:mean=500,sigma=0.8,min=16",
    "lognormal:mean=3,sigma=2",
    "lognormal:mean=4,sigma=0.3",
    f"trace:{PAIRS},column=num_prefill_tokens",
]


@pytest.mark.parametrize("spec", SIZE_SPECS)
def test_sample_mean_matches_exact_mean(spec: str) -> None:
    dist = parse_size(spec, "prefill")
    x = dist.sample(rng(), N_DRAWS)
    assert x.dtype == np.int64 and x.shape == (N_DRAWS,)
    se = float(np.std(x)) / math.sqrt(N_DRAWS)
    assert abs(float(np.mean(x)) - dist.mean) <= 5 * se + 1e-12


@pytest.mark.parametrize("spec", SIZE_SPECS)
def test_spec_round_trips(spec: str) -> None:
    dist = parse_size(spec, "prefill")
    again = parse_size(dist.spec, "decode")
    assert again == dist
    assert again.spec == dist.spec


@pytest.mark.parametrize(
    ("spec", "low"),
    [("poisson:0.5", 1), ("poisson:3,min=5", 5), ("geometric:2", 1), ("geometric:20,min=9", 9),
     ("lognormal:mean=20,sigma=1.5,min=4", 4), ("lognormal:mean=2,sigma=1", 1)],
)
def test_minimum_is_respected_and_reached(spec: str, low: int) -> None:
    x = parse_size(spec, "decode").sample(rng(3), 50_000)
    assert int(x.min()) == low


def test_uniform_support_is_inclusive() -> None:
    x = Uniform(10, 14).sample(rng(), 10_000)
    assert set(np.unique(x).tolist()) == {10, 11, 12, 13, 14}


def test_geometric_support_starts_at_one() -> None:
    x = Geometric(1.5).sample(rng(), 10_000)
    assert int(x.min()) == 1 and np.all(x >= 1)


def test_exact_means() -> None:
    assert Constant(129).mean == 129.0
    assert Uniform(10, 200).mean == 105.0
    assert Geometric(112).mean == pytest.approx(112.0, rel=1e-15)
    assert Geometric(5, min_tokens=3).mean == pytest.approx(3 + 0.8**3 * 5, rel=1e-15)
    assert Poisson(129).mean == pytest.approx(129.0, rel=1e-15)


def test_poisson_clamp_mean_formula() -> None:
    assert parse_size("poisson:0.5", "prefill").mean == pytest.approx(0.5 + math.exp(-0.5),
                                                                       rel=1e-14)
    lam, m = 2.0, 4
    pmf = [math.exp(-lam) * lam**k / math.factorial(k) for k in range(60)]
    brute = sum(max(m, k) * p for k, p in enumerate(pmf))
    assert Poisson(lam, min_tokens=m).mean == pytest.approx(brute, rel=1e-13)


@pytest.mark.parametrize(("mean", "sigma", "low"), [(50.0, 0.8, 16), (3.0, 2.0, 1), (2.0, 0.5, 1)])
def test_lognormal_mean_matches_brute_force_pmf(mean: float, sigma: float, low: int) -> None:
    mu = math.log(mean) - sigma * sigma / 2

    def sf(x: np.ndarray | float) -> np.ndarray:
        return special.ndtr((mu - np.log(x)) / sigma)

    k = np.arange(1, 2_000_001, dtype=np.float64)
    pmf = sf(k - 0.5) - sf(k + 0.5)
    pmf[0] = 1.0 - float(sf(1.5))
    c = 2_000_000.5  # beyond: round(X) ~ X, E[X; X > c] in closed form
    brute = math.fsum((np.maximum(k, low) * pmf).tolist()) \
        + mean * float(special.ndtr((mu + sigma * sigma - math.log(c)) / sigma))
    assert LogNormal(mean, sigma, low).mean == pytest.approx(brute, rel=1e-9)


def test_lognormal_rounds_to_nearest() -> None:
    mean, sigma = 4.0, 0.3
    mu = math.log(mean) - sigma * sigma / 2
    x = LogNormal(mean, sigma).sample(rng(), N_DRAWS)
    for k in range(2, 8):
        p = float(special.ndtr((math.log(k + 0.5) - mu) / sigma)
                  - special.ndtr((math.log(k - 0.5) - mu) / sigma))
        freq = float(np.mean(x == k))
        assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / N_DRAWS) + 1e-9, k


def test_lognormal_continuous_mean_is_the_parameter() -> None:
    dist = LogNormal(500.0, 0.8)
    assert dist.mean == pytest.approx(500.0, rel=1e-6)  # rounding half-up is unbiased here
    assert LogNormal(500.0, 0.8, 400).mean > 500.0  # the clamp raises the mean


@settings(max_examples=25, deadline=None)
@given(
    mean=st.floats(0.05, 5000.0, allow_nan=False),
    sigma=st.floats(0.05, 3.0),
    low=st.integers(1, 50),
)
def test_generated_specs_round_trip(mean: float, sigma: float, low: int) -> None:
    for dist in (Poisson(mean, low), Geometric(1.0 + mean, low), LogNormal(mean, sigma, low),
                 Uniform(low, low + int(mean))):
        assert parse_size(dist.spec, "prefill") == dist


def test_empirical_from_trace_columns() -> None:
    prefill = parse_size(f"trace:{PAIRS}", "--prefill")
    decode = parse_size(f"trace:{PAIRS}", "--decode")
    assert isinstance(prefill, Empirical) and isinstance(decode, Empirical)
    assert prefill.values == (10, 20, 30, 40, 50, 60, 70, 80)
    assert decode.values == (1, 2, 3, 4, 5, 6, 7, 8)
    assert prefill.mean == 45.0 and decode.mean == 4.5
    assert set(prefill.sample(rng(), 1000).tolist()) == set(prefill.values)
    total = parse_size(f"trace:{PAIRS},column=num_decode_tokens", "x")
    assert total == decode


def test_empirical_reads_azure_column() -> None:
    dist = parse_size(f"trace:{AZURE_CONV}", "prefill")
    assert len(dist) == AZURE_ROWS
    assert dist.mean == pytest.approx(1154.697, abs=1e-3)


# --------------------------------------------------------------------------------------------
# Arrivals
# --------------------------------------------------------------------------------------------


def test_deterministic_spacing_is_exact() -> None:
    process = parse_arrival("deterministic", 4.0)
    assert isinstance(process, DeterministicArrivals)
    times = first_arrivals(process, 3 * CHUNK_SIZE + 5)
    assert times[0] == 0.0
    assert np.array_equal(times, np.arange(times.shape[0]) * 250.0)


@pytest.mark.parametrize(("spec", "cv"), [("poisson", 1.0), ("gamma:cv=2", 2.0),
                                          ("gamma:cv=0.5", 0.5)])
def test_renewal_interarrival_mean_and_cv(spec: str, cv: float) -> None:
    rate_per_s = 8.0
    process = parse_arrival(spec, rate_per_s)
    assert process.rate_per_s == rate_per_s
    times = first_arrivals(process, N_DRAWS)
    assert times[0] > 0.0  # the first arrival comes after one inter-arrival time
    gaps = np.diff(np.concatenate([[0.0], times]))
    mean_ms = 1000.0 / rate_per_s
    assert abs(float(gaps.mean()) - mean_ms) <= 5 * cv * mean_ms / math.sqrt(N_DRAWS)
    assert float(gaps.std() / gaps.mean()) == pytest.approx(cv, rel=0.03)


def test_gamma_spec_round_trip() -> None:
    process = GammaArrivals(3.0, 2.0)
    assert process.spec == "gamma:cv=2"
    assert parse_arrival(process.spec, 3.0) == process
    assert parse_arrival("poisson", 2.5) == PoissonArrivals(2.5)


def test_azure_trace_replay() -> None:
    trace = load_trace(str(AZURE_CONV))
    assert len(trace) == AZURE_ROWS
    replay = parse_arrival(f"trace:{AZURE_CONV}", None)
    assert isinstance(replay, TraceArrivals)
    assert len(replay) == AZURE_ROWS and replay.times_ms[0] == 0.0
    span_s = float(trace.arrived_s[-1] - trace.arrived_s[0])
    assert replay.rate_per_s == pytest.approx((AZURE_ROWS - 1) / span_s, rel=1e-12)

    scaled = parse_arrival(f"trace:{AZURE_CONV}", 12.5)
    assert isinstance(scaled, TraceArrivals)
    assert scaled.rate_per_s == pytest.approx(12.5, rel=1e-12)
    assert (AZURE_ROWS - 1) / (scaled.times_ms[-1] / 1000.0) == pytest.approx(12.5, rel=1e-12)
    assert scaled.times_ms[0] == 0.0
    ratio = scaled.times_ms[1:] / replay.times_ms[1:]
    assert np.allclose(ratio, replay.rate_per_s / 12.5, rtol=1e-12)

    requests = list(make_workload(f"trace:{AZURE_CONV}", None, None, 12.5).requests(seed=0))
    assert len(requests) == AZURE_ROWS
    assert [r.prefill_tokens for r in requests] == trace.prefill_tokens.tolist()
    assert [r.decode_tokens for r in requests] == trace.decode_tokens.tolist()
    assert [r.arrival_ms for r in requests] == scaled.times_ms.tolist()


def test_trace_replay_of_fixture_with_duration() -> None:
    workload = make_workload(f"trace:{PAIRS}", None, None, None)
    assert workload.rate_per_s == pytest.approx(7 / 6.0)
    assert workload.mean_prefill_tokens == 45.0 and workload.mean_decode_tokens == 4.5
    got = [(r.arrival_ms, r.prefill_tokens, r.decode_tokens)
           for r in workload.requests(seed=1, duration_ms=2000.0)]
    assert got == [(0.0, 10, 1), (500.0, 20, 2), (1250.0, 30, 3), (1250.0, 40, 4)]


def test_trace_arrivals_with_size_override() -> None:
    workload = make_workload(f"trace:{PAIRS}", "uniform:3,5", None, None)
    got = list(workload.requests(seed=2))
    assert len(got) == 8
    assert [r.decode_tokens for r in got] == list(range(1, 9))
    assert {r.prefill_tokens for r in got} <= {3, 4, 5}
    assert workload.mean_prefill_tokens == 4.0 and workload.mean_decode_tokens == 4.5
    assert list(workload.requests(seed=2, max_requests=3)) == got[:3]


# --------------------------------------------------------------------------------------------
# Workload streams: determinism, prefix property, joint sampling
# --------------------------------------------------------------------------------------------


def gamma_workload() -> Workload:
    return make_workload("gamma:cv=2", "lognormal:mean=300,sigma=1", "geometric:40", 20.0)


def test_same_seed_same_requests() -> None:
    workload = gamma_workload()
    first = list(workload.requests(seed=42, max_requests=5000))
    assert first == list(workload.requests(seed=42, max_requests=5000))
    assert first != list(workload.requests(seed=43, max_requests=5000))
    assert [r.id for r in first] == list(range(5000))
    assert all(a.arrival_ms <= b.arrival_ms for a, b in itertools.pairwise(first))


FULL_PREFIX = list(gamma_workload().requests(seed=9, max_requests=3 * CHUNK_SIZE))


@settings(max_examples=30, deadline=None)
@given(k=st.integers(0, 3 * CHUNK_SIZE))
def test_prefix_property_max_requests(k: int) -> None:
    assert list(gamma_workload().requests(seed=9, max_requests=k)) == FULL_PREFIX[:k]


@settings(max_examples=20, deadline=None)
@given(frac=st.floats(0.0, 1.0))
def test_prefix_property_duration(frac: float) -> None:
    horizon_ms = frac * FULL_PREFIX[-1].arrival_ms
    got = list(gamma_workload().requests(seed=9, duration_ms=horizon_ms))
    expected = [r for r in FULL_PREFIX if r.arrival_ms < horizon_ms]
    assert got == expected


def test_joint_trace_sampling_keeps_pairs() -> None:
    workload = make_workload("poisson", f"trace:{PAIRS}", f"trace:{PAIRS}", 50.0)
    assert workload.paired
    pairs = [(r.prefill_tokens, r.decode_tokens)
             for r in workload.requests(seed=5, max_requests=5000)]
    assert set(pairs) <= PAIR_ROWS
    assert set(pairs) == PAIR_ROWS  # and every row is used
    independent = Workload(workload.arrival, workload.prefill, workload.decode, paired=False)
    mixed = {(r.prefill_tokens, r.decode_tokens)
             for r in independent.requests(seed=5, max_requests=5000)}
    assert not mixed <= PAIR_ROWS  # without pairing the rows are broken up


def test_offered_load_of_a_synthetic_workload() -> None:
    """A synthetic workload offers its process's rate and its distributions' means, whatever the
    run's bounds (a trace replay offers those of its replayed requests: test_trace_stream.py)."""
    workload = gamma_workload()
    assert workload.offered(100, 5000.0) == (20.0, workload.mean_prefill_tokens, 40.0)
    assert workload.offered() == workload.offered(3)


def test_paired_needs_two_empirical_columns() -> None:
    with pytest.raises(ConfigError, match=r"^paired:"):
        Workload(PoissonArrivals(1.0), Constant(3), Constant(4), paired=True)


# --------------------------------------------------------------------------------------------
# Requests and bad input
# --------------------------------------------------------------------------------------------


def test_fixed_requests() -> None:
    got = fixed_requests([(0.0, 5, 1), (2.5, 0, 3), (2.5, 4, 0)])
    assert got == [Request(0, 0.0, 5, 1), Request(1, 2.5, 0, 3), Request(2, 2.5, 4, 0)]
    with pytest.raises(ConfigError, match=r"^requests\[1\]\.arrival_ms:"):
        fixed_requests([(3.0, 1, 1), (1.0, 1, 1)])


@pytest.mark.parametrize("args", [(0, 0.0, 0, 0), (0, 0.0, -1, 5), (-1, 0.0, 1, 1),
                                  (0, math.nan, 1, 1), (0, -1.0, 1, 1), (0, 0.0, 1.5, 1),
                                  (0, 0.0, True, 1)])
def test_bad_request_rejected(args: tuple[object, ...]) -> None:
    with pytest.raises(ConfigError, match=r"^request"):
        Request(*args)  # type: ignore[arg-type]


def assert_one_line_error(exc: pytest.ExceptionInfo[ConfigError], field_name: str) -> None:
    message = str(exc.value)
    assert message.startswith(f"{field_name}: "), message
    assert "\n" not in message
    assert exc.value.field == field_name


@pytest.mark.parametrize(
    "spec",
    ["poisson:-3", "poisson:0", "poisson:", "poisson:abc", "poisson:nan", "poisson:inf",
     "poisson:3,min=0", "poisson:3,max=4", "poisson:1,2,3", "uniform:5,2", "uniform:0,3",
     "uniform:1.5,3", "uniform:4", "geometric:0.5", "lognormal:mean=x", "lognormal:mean=500",
     "lognormal:mean=500,sigma=0", "lognormal:mean=500,sigma=1,foo=2",
     "lognormal:mean=-5,sigma=1", "lognormal:mean=500,sigma=1,min=2.5", "bogus:1", "0", "-4",
     "12.5", "", "   ", "trace:", f"trace:{DATA}/no_such_file.csv",
     f"trace:{DATA}/workload_missing_column.csv", f"trace:{DATA}/workload_negative.csv",
     f"trace:{PAIRS},column=nope"],
)
def test_bad_size_spec(spec: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_size(spec, "--decode")
    assert_one_line_error(exc, "--decode")


def test_size_errors_say_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match=r"num_decode_tokens.*workload_missing_column\.csv"):
        parse_size(f"trace:{DATA}/workload_missing_column.csv", "decode")
    with pytest.raises(ConfigError, match=r"row 3 .*num_decode_tokens"):
        parse_size(f"trace:{DATA}/workload_negative.csv", "decode")
    with pytest.raises(ConfigError, match="trace column"):
        parse_size(f"trace:{PAIRS}", "size")
    with pytest.raises(ConfigError, match=r"'poisson:-3'"):
        parse_size("poisson:-3", "prefill")


@pytest.mark.parametrize("bad", [None, 0.0, -2.0, math.nan, math.inf, "3"])
@pytest.mark.parametrize("spec", ["poisson", "deterministic", "gamma:cv=2"])
def test_bad_rate(spec: str, bad: object) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_arrival(spec, bad)  # type: ignore[arg-type]
    assert_one_line_error(exc, "rate")


def test_bad_rate_for_trace() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_arrival(f"trace:{PAIRS}", 0.0)
    assert_one_line_error(exc, "rate")


@pytest.mark.parametrize(
    "spec",
    ["bogus", "gamma", "gamma:cv=0", "gamma:cv=x", "gamma:sigma=2", "poisson:3", "trace:",
     "", f"trace:{DATA}/no_such_file.csv"],
)
def test_bad_arrival_spec(spec: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_arrival(spec, 5.0)
    assert_one_line_error(exc, "arrival")


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        ("arrived_at,num_prefill_tokens\n0,1\n1,2\n", "num_decode_tokens"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,1,1\n1,-2,1\n",
         "row 2 .*num_prefill_tokens"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,1,1\n1,2.5,1\n",
         "row 2 .*num_prefill_tokens"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,1,1\nx,2,1\n", "row 2 .*arrived_at"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,1,1\n2,2,1\n1,3,1\n",
         "row 3 .*back in time"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,1,1\n1,0,0\n", "row 2 .*no tokens"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,1,1\n", "at least 2 rows"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,1,1\n0,1,1\n", "same time"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,1,1\n1,2\n", "row 2 .*2 fields"),
        ("", "empty"),
    ],
)
def test_bad_trace_file(tmp_path: Path, body: str, pattern: str) -> None:
    path = tmp_path / "workload_bad.csv"
    path.write_text(body)
    with pytest.raises(ConfigError, match=pattern) as exc:
        parse_arrival(f"trace:{path}", None)
    assert_one_line_error(exc, "arrival")
    assert "workload_bad.csv" in str(exc.value)


def test_unbounded_stream_is_refused() -> None:
    workload = gamma_workload()
    with pytest.raises(ConfigError, match=r"^max_requests:"):
        workload.requests(seed=1)
    with pytest.raises(ConfigError, match=r"^seed:"):
        workload.requests(seed=-1, max_requests=3)
    with pytest.raises(ConfigError, match=r"^prefill:"):
        Workload(PoissonArrivals(1.0), None, Constant(3))
    with pytest.raises(ConfigError, match=r"^prefill:"):
        make_workload("poisson", None, "5", 1.0)


def test_distribution_constructors_validate() -> None:
    with pytest.raises(ConfigError, match=r"^constant.value:"):
        Constant(0)
    with pytest.raises(ConfigError, match=r"^uniform.high:"):
        Uniform(5, 2)
    with pytest.raises(ConfigError, match=r"^lognormal.sigma:"):
        LogNormal(100.0, -1.0)
    with pytest.raises(ConfigError, match=r"^empirical.values:"):
        Empirical((3, 0, 2), "inline")
    with pytest.raises(ConfigError, match=r"^n:"):
        Constant(3).sample(rng(), -1)
