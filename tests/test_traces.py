"""Tests of llmqueue.model.traces: the three trace formats on the real data files, windows, rate scaling,
trace specs as workloads, statistics, fitted distributions, the ``trace`` commands and bad input."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from llmqueue.errors import ConfigError
from llmqueue.model.specs import make_workload, parse_arrival, parse_size
from llmqueue.model.traces import (
    RequestTrace,
    TraceFit,
    fit_lengths,
    fit_trace,
    ks_distance,
    load_request_trace,
    parse_trace_spec,
    parse_window,
    read_vllm_log,
    size_cdf,
    size_quantile,
    trace_arrivals,
    trace_stats,
)
from llmqueue.model.workload import (
    Constant,
    Empirical,
    GammaArrivals,
    Geometric,
    LogNormal,
    Poisson,
    SizeDist,
    TraceArrivals,
    Uniform,
)

from .conftest import SHARED_DATA
from .helpers import run_cli

CONV = str(SHARED_DATA / "traces" / "azure_conv_2023.csv")
CODE = str(SHARED_DATA / "traces" / "azure_code_2023.csv")
ARXIV = str(SHARED_DATA / "traces" / "arxiv_summarization_lengths.csv")
VLLM = str(SHARED_DATA / "validation" / "rtxpro6000_llama31_8b" / "vllm_run" / "requests.jsonl")


def _csv_columns(path: str) -> dict[str, np.ndarray]:
    """Every column of a CSV as float64, read with the csv module (independent of llmqueue)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {name: np.array([float(row[name]) for row in rows]) for name in rows[0]}


def _jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.fixture(scope="module")
def conv() -> RequestTrace:
    return load_request_trace(CONV)


@pytest.fixture(scope="module")
def conv_columns() -> dict[str, np.ndarray]:
    return _csv_columns(CONV)


@pytest.fixture(scope="module")
def conv_fit(conv: RequestTrace) -> TraceFit:
    return fit_trace(conv)


def _generic_csv(tmp_path: Path, name: str = "log.csv") -> tuple[str, list[tuple[int, int, int]]]:
    """A small CSV with user-named columns, epoch milliseconds and an extra column."""
    rows = [(1_700_000_000_000, 12, 3), (1_700_000_000_250, 40, 1), (1_700_000_001_000, 7, 9),
            (1_700_000_001_000, 5, 2), (1_700_000_004_500, 30, 30)]
    lines = ["in,user,ts,out"] + [f"{p},u{i},{t},{d}" for i, (t, p, d) in enumerate(rows)]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path), rows


# --------------------------------------------------------------------------------------------
# The three formats on the real files
# --------------------------------------------------------------------------------------------


def test_azure_conv_loads_exactly(conv: RequestTrace, conv_columns: dict[str, np.ndarray]) -> None:
    assert len(conv) == 19_366
    assert conv.spec.format == "csv" and conv.spec.text == CONV
    assert conv.arrival_s is not None
    np.testing.assert_array_equal(conv.arrival_s, conv_columns["arrived_at"] - conv_columns["arrived_at"][0])
    np.testing.assert_array_equal(conv.prefill_tokens, conv_columns["num_prefill_tokens"])
    np.testing.assert_array_equal(conv.decode_tokens, conv_columns["num_decode_tokens"])
    assert float(np.mean(conv.prefill_tokens)) == pytest.approx(1154.6974078281523, rel=1e-12)
    assert float(np.mean(conv.decode_tokens)) == pytest.approx(211.12594237323142, rel=1e-12)
    span = conv_columns["arrived_at"][-1] - conv_columns["arrived_at"][0]
    assert conv.rate_per_s == pytest.approx((19_366 - 1) / span, rel=1e-12)
    assert conv.rate_per_s == pytest.approx(5.53, abs=0.01)


def test_azure_code_loads_exactly() -> None:
    trace = load_request_trace(CODE)
    columns = _csv_columns(CODE)
    assert len(trace) == 8_819
    assert trace.prefill_tokens.sum() == columns["num_prefill_tokens"].sum()
    assert trace.decode_tokens.sum() == columns["num_decode_tokens"].sum()
    assert trace.rate_per_s == pytest.approx(8_818 / (columns["arrived_at"][-1] - columns["arrived_at"][0]))


def test_lengths_only_csv() -> None:
    trace = load_request_trace(ARXIV)
    columns = _csv_columns(ARXIV)
    assert trace.arrival_s is None and len(trace) == 28_257
    np.testing.assert_array_equal(trace.prefill_tokens, columns["num_prefill_tokens"])
    np.testing.assert_array_equal(trace.decode_tokens, columns["num_decode_tokens"])
    stats_ = trace_stats(trace)
    assert stats_.rate_per_s is None and stats_.interarrival_cv is None and stats_.gap_ms is None
    with pytest.raises(ConfigError) as exc:
        trace.to_arrivals()
    assert exc.value.field == "arrival" and "arrived_at" in str(exc.value)
    with pytest.raises(ConfigError, match="no column 'arrived_at'") as exc:
        parse_arrival(f"trace:{ARXIV}", None)
    assert exc.value.field == "arrival"
    # one column of a lengths-only file as a size distribution
    total = parse_size(f"trace:{ARXIV},column=num_total_tokens", "--prefill")
    assert isinstance(total, Empirical)
    assert total.mean == pytest.approx(float(np.mean(columns["num_total_tokens"])), rel=1e-12)


def test_vllm_log_loads_exactly() -> None:
    trace = load_request_trace(VLLM)
    records = _jsonl(VLLM)
    assert trace.spec.format == "vllm" and len(trace) == 300
    assert float(np.mean(trace.prefill_tokens)) == pytest.approx(857.4633333333334, rel=1e-12)
    assert float(np.mean(trace.decode_tokens)) == pytest.approx(652.51, rel=1e-12)
    assert float(np.mean(trace.prefill_tokens)) == sum(r["input_toks"] for r in records) / 300
    # arrivals keep the client's gaps (wall clock), in arrival order, from 0
    client = np.sort(np.array([r["arrival_time"] for r in records]))
    assert trace.arrival_s is not None and trace.arrival_s[0] == 0.0
    np.testing.assert_allclose(np.diff(trace.arrival_s), np.diff(client), atol=1e-6)
    log = read_vllm_log(VLLM)
    np.testing.assert_array_equal(trace.arrival_s, log.arrival_ms / 1000.0)


def test_format_key_overrides_the_extension(tmp_path: Path) -> None:
    copy = tmp_path / "requests.log"
    shutil.copy(VLLM, copy)
    spec = parse_trace_spec(f"{copy},format=vllm")
    assert spec.format == "vllm" and spec.text == f"{copy},format=vllm"
    trace = load_request_trace(spec)
    np.testing.assert_array_equal(trace.prefill_tokens, load_request_trace(VLLM).prefill_tokens)
    sizes = parse_size(f"trace:{copy},format=vllm", "--decode")
    assert isinstance(sizes, Empirical) and sizes.mean == 652.51
    assert parse_size(sizes.spec, "--decode") == sizes


def test_generic_csv_mapping(tmp_path: Path) -> None:
    path, rows = _generic_csv(tmp_path)
    text = f"{path},arrival=ts,prefill=in,decode=out,unit=ms"
    trace = load_request_trace(text)
    assert trace.spec.text == text and parse_trace_spec(trace.spec.text) == trace.spec
    assert trace.arrival_s is not None
    np.testing.assert_array_equal(trace.arrival_s, [(t - rows[0][0]) / 1000.0 for t, _, _ in rows])
    np.testing.assert_array_equal(trace.prefill_tokens, [p for _, p, _ in rows])
    np.testing.assert_array_equal(trace.decode_tokens, [d for _, _, d in rows])
    replay = parse_arrival(f"trace:{text}", None)
    assert isinstance(replay, TraceArrivals)
    np.testing.assert_allclose(replay.times_ms, [0.0, 250.0, 1000.0, 1000.0, 4500.0], rtol=0, atol=1e-9)
    assert replay.spec == f"trace:{text}"
    again = parse_arrival(replay.spec, None)
    np.testing.assert_array_equal(again.times_ms, replay.times_ms)  # type: ignore[union-attr]
    prefill = parse_size(f"trace:{text}", "--prefill")
    assert isinstance(prefill, Empirical) and prefill.values == (12, 40, 7, 5, 30)
    assert prefill.spec == f"trace:{path},column=in"
    # the same columns in seconds and microseconds scale the times exactly
    for unit, factor in (("s", 1.0), ("us", 1e-6)):
        other = load_request_trace(f"{path},arrival=ts,prefill=in,decode=out,unit={unit}")
        assert other.arrival_s is not None
        np.testing.assert_allclose(other.arrival_s, trace.arrival_s * 1000.0 * factor, rtol=1e-12)


def test_unknown_extension_reads_as_csv(tmp_path: Path) -> None:
    path, _ = _generic_csv(tmp_path, "log.txt")
    trace = load_request_trace(f"{path},arrival=ts,prefill=in,decode=out,unit=ms")
    assert trace.spec.format == "csv" and len(trace) == 5


# --------------------------------------------------------------------------------------------
# Windows, busiest window and rate scaling
# --------------------------------------------------------------------------------------------


def test_window_equals_direct_filter(conv: RequestTrace, conv_columns: dict[str, np.ndarray]) -> None:
    t = conv_columns["arrived_at"]
    keep = (t >= 600) & (t < 1200)
    window = conv.window(600, 1200)
    assert len(window) == int(keep.sum())
    assert window.arrival_s is not None
    np.testing.assert_array_equal(window.arrival_s, t[keep] - 600)
    np.testing.assert_array_equal(window.prefill_tokens, conv_columns["num_prefill_tokens"][keep])
    assert window.spec.text == f"{CONV},start=600,end=1200"
    reloaded = load_request_trace(window.spec.text)
    np.testing.assert_array_equal(reloaded.arrival_s, window.arrival_s)  # type: ignore[arg-type]
    replay = parse_arrival(f"trace:{CONV},start=600,end=1200", None)
    assert len(replay) == int(keep.sum())  # type: ignore[arg-type]
    # windows compose in the file's time and clip to the outer window
    inner = window.window(100, 200)
    assert inner.spec.text == f"{CONV},start=700,end=800"
    assert len(inner) == int(((t >= 700) & (t < 800)).sum())
    assert window.window(500).spec.end_s == 1200
    # an open end keeps everything from the start on
    tail = conv.window(3000)
    assert len(tail) == int((t >= 3000).sum()) and tail.spec.text == f"{CONV},start=3000"


def test_vllm_window_and_scaling() -> None:
    trace = load_request_trace(VLLM)
    assert trace.arrival_s is not None
    direct = int(((trace.arrival_s >= 5.0) & (trace.arrival_s < 20.0)).sum())
    replay = parse_arrival(f"trace:{VLLM},start=5,end=20", 4.0)
    assert isinstance(replay, TraceArrivals) and len(replay) == direct
    assert replay.rate_per_s == pytest.approx(4.0, rel=1e-12)
    assert replay.spec == f"trace:{VLLM},start=5,end=20"


@pytest.mark.parametrize("which", ["conv", "vllm", "generic", "window"])
@pytest.mark.parametrize("rate", [0.5, 12.5])
def test_rate_scaling_is_exact_for_every_format(tmp_path: Path, which: str, rate: float) -> None:
    path, _ = _generic_csv(tmp_path)
    text = {"conv": CONV, "vllm": VLLM, "generic": f"{path},arrival=ts,prefill=in,decode=out,unit=ms",
            "window": f"{CONV},start=60,end=660"}[which]
    plain = parse_arrival(f"trace:{text}", None)
    scaled = parse_arrival(f"trace:{text}", rate)
    assert isinstance(plain, TraceArrivals) and isinstance(scaled, TraceArrivals)
    n = len(scaled)
    assert (n - 1) / (scaled.times_ms[-1] / 1000.0) == pytest.approx(rate, rel=1e-12)
    assert scaled.rate_per_s == pytest.approx(rate, rel=1e-12)
    np.testing.assert_allclose(scaled.times_ms, plain.times_ms * (plain.rate_per_s / rate), rtol=1e-12)
    np.testing.assert_array_equal(scaled.prefill, plain.prefill)
    requests = list(make_workload(f"trace:{text}", None, None, rate).requests(seed=0))
    assert [r.decode_tokens for r in requests] == plain.decode.tolist()


def test_trace_arrivals_reads_every_format() -> None:
    replay = trace_arrivals(VLLM, 2.0)
    assert len(replay) == 300 and replay.rate_per_s == pytest.approx(2.0, rel=1e-12)
    assert trace_arrivals(CONV).spec == f"trace:{CONV}"  # plain CSV specs are unchanged


def test_busiest_window_on_real_trace(conv: RequestTrace) -> None:
    best = conv.busiest_window(60.0)
    assert best.end_s - best.start_s == pytest.approx(60.0)
    assert len(conv.window(best.start_s, best.end_s)) == best.requests
    t = conv.arrival_s
    assert t is not None
    starts = np.arange(0.0, float(t[-1]), 7.0)
    direct = max(int(((t >= s) & (t < s + 60.0)).sum()) for s in starts)
    assert best.requests >= direct
    assert best.requests > 60 * conv.rate_per_s  # busier than the mean


@given(gaps=st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0]), min_size=1, max_size=30),
       length=st.sampled_from([0.25, 0.5, 1.0, 2.5, 10.0]))
def test_busiest_window_is_the_maximum(gaps: list[float], length: float) -> None:
    times = np.cumsum([0.0, *gaps])
    trace = RequestTrace(parse_trace_spec("x.csv"), times, np.ones(times.shape[0], dtype=np.int64),
                         np.ones(times.shape[0], dtype=np.int64))
    best = trace.busiest_window(length)
    brute = max(int(((times >= s) & (times < s + length)).sum()) for s in times)
    assert best.requests == brute
    assert best.start_s in times
    assert len(trace.window(best.start_s, best.end_s)) == best.requests


# --------------------------------------------------------------------------------------------
# Sizes from traces
# --------------------------------------------------------------------------------------------


def test_vllm_sizes_resampled_jointly() -> None:
    prefill = parse_size(f"trace:{VLLM}", "--prefill")
    decode = parse_size(f"trace:{VLLM}", "--decode")
    assert isinstance(prefill, Empirical) and isinstance(decode, Empirical)
    assert prefill.mean == pytest.approx(857.4633333333334, rel=1e-12) and decode.mean == 652.51
    assert prefill.spec == f"trace:{VLLM},column=input_toks"
    assert parse_size(prefill.spec, "--prefill") == prefill
    workload = make_workload("poisson", f"trace:{VLLM}", f"trace:{VLLM}", 3.0)
    assert workload.paired
    pairs = {(r["input_toks"], r["output_toks"]) for r in _jsonl(VLLM)}
    drawn = {(r.prefill_tokens, r.decode_tokens) for r in workload.requests(seed=3, max_requests=2000)}
    assert drawn <= pairs and len(drawn) > 200


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def test_stats_match_independent_computation(conv: RequestTrace, conv_columns: dict[str, np.ndarray]) -> None:
    s = trace_stats(conv)
    t, p, d = (conv_columns[c] for c in ("arrived_at", "num_prefill_tokens", "num_decode_tokens"))
    gaps = np.diff(t)
    assert s.requests == 19_366
    assert s.span_s == pytest.approx(t[-1] - t[0], rel=1e-12)
    assert s.interarrival_cv == pytest.approx(gaps.std() / gaps.mean(), rel=1e-9)
    assert s.interarrival_cv == pytest.approx(1.094, abs=1e-3)
    ordered = np.sort(p)
    for q, value in ((0.5, s.prefill.p50), (0.9, s.prefill.p90), (0.99, s.prefill.p99)):
        assert value == ordered[math.ceil(q * p.shape[0]) - 1]
    assert (s.prefill.min, s.prefill.max) == (p.min(), p.max())
    assert s.decode.std == pytest.approx(d.std(), rel=1e-12)
    ranks_p, ranks_d = stats.rankdata(p), stats.rankdata(d)
    assert s.spearman_rho == pytest.approx(float(np.corrcoef(ranks_p, ranks_d)[0, 1]), abs=1e-12)
    assert s.peak_rate_per_s == conv.busiest_window(60.0).rate_per_s
    assert s.peak_rate_per_s > 1.5 * s.rate_per_s  # the conversation trace's rate changes over time


# --------------------------------------------------------------------------------------------
# Fitted distributions
# --------------------------------------------------------------------------------------------


def test_lognormal_fit_recovers_parameters() -> None:
    rng = np.random.Generator(np.random.PCG64(2024))
    sample = LogNormal(800.0, 0.9, 1).sample(rng, 200_000)
    fit = fit_lengths(sample, "prefill_tokens")
    assert fit.best.model.__class__ is LogNormal
    mle = next(c for c in fit.candidates if c.method == "lognormal, MLE sigma").model
    assert mle.sigma == pytest.approx(0.9, abs=0.005)
    assert mle.mean_param == pytest.approx(800.0, rel=0.01)
    assert fit.best.ks < 0.005
    assert {c.method for c in fit.candidates[2:]} == {"geometric", "poisson"}


def test_every_fit_keeps_the_mean(conv_fit: TraceFit) -> None:
    for part in (conv_fit.prefill, conv_fit.decode):
        assert [c.ks for c in part.candidates] == sorted(c.ks for c in part.candidates)
        for c in part.candidates:
            assert c.model.mean == pytest.approx(part.trace.mean, rel=1e-5), c.spec
            assert parse_size(c.spec, "--prefill") == c.model  # the printed spec is the model
    assert conv_fit.rate_per_s == pytest.approx(5.53014, rel=1e-6)
    assert conv_fit.arrival is not None and conv_fit.rate_per_s is not None
    for c in conv_fit.arrival.candidates:
        assert c.summary.mean == pytest.approx(1000.0 / conv_fit.rate_per_s, rel=1e-12)
        assert parse_arrival(c.spec, conv_fit.rate_per_s).spec == c.spec


def test_fitted_spec_reproduces_the_trace(conv_fit: TraceFit) -> None:
    args = conv_fit.simulate_args()
    opts = dict(zip(args[::2], args[1::2], strict=True))
    assert set(opts) == {"--arrival", "--rate", "--prefill", "--decode"}
    workload = make_workload(opts["--arrival"], opts["--prefill"], opts["--decode"], float(opts["--rate"]))
    chunks = list(workload.chunks(seed=11, max_requests=100_000))
    times = np.concatenate([c[1] for c in chunks])
    prefill = np.concatenate([c[2] for c in chunks])
    decode = np.concatenate([c[3] for c in chunks])
    assert prefill.mean() == pytest.approx(conv_fit.stats.prefill.mean, rel=0.02)
    assert decode.mean() == pytest.approx(conv_fit.stats.decode.mean, rel=0.02)
    assert (times.shape[0] - 1) / (times[-1] / 1000.0) == pytest.approx(conv_fit.stats.rate_per_s, rel=0.02)
    if isinstance(workload.arrival, GammaArrivals):
        gaps = np.diff(times)
        assert gaps.std() / gaps.mean() == pytest.approx(workload.arrival.cv, rel=0.03)


def test_vllm_fit_prefers_lognormal_prompts() -> None:
    fit = fit_trace(load_request_trace(VLLM))
    assert fit.prefill.best.spec.startswith("lognormal:") and fit.prefill.best.ks < 0.06
    assert fit.prefill.best.model.min_tokens == 262  # the shortest prompt of the run
    assert fit.stats.spearman_rho is not None and fit.stats.spearman_rho > 0.1
    assert fit.stats.peak_rate_per_s is None  # 29 s of arrivals: too short for a 60 s peak


def test_constant_column_fits_a_constant() -> None:
    fit = fit_lengths(np.full(50, 128, dtype=np.int64))
    assert [c.spec for c in fit.candidates] == ["128"] and fit.best.ks == 0.0


DISTS = [Constant(7), Uniform(3, 40), Poisson(25.0), Geometric(60.0), Geometric(5.0, 3),
         LogNormal(300.0, 0.7), LogNormal(20.0, 1.2, 4)]


@pytest.mark.parametrize("dist", DISTS, ids=[d.spec for d in DISTS])
def test_cdf_and_quantiles_match_sampling(dist: SizeDist) -> None:
    sample = dist.sample(np.random.Generator(np.random.PCG64(5)), 100_000)
    # DKW: P(KS > 0.0075) < 2 exp(-2 n 0.0075^2) ~ 3e-5 for a correct CDF
    assert ks_distance(sample, dist) < 0.0075
    for q in (0.05, 0.5, 0.9, 0.99):
        k = size_quantile(dist, q)
        assert size_cdf(dist, np.array([k]))[0] >= q - 1e-12
        assert size_cdf(dist, np.array([k - 1]))[0] < q
    stretched = np.floor(sample * 1.1 + 0.5).astype(np.int64)  # 10 % longer: clearly another law
    assert ks_distance(stretched, dist) > 0.02


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (f"{CONV},prefill=nope", ("no column 'nope'",)),
        (f"{CONV},arrival=nope", ("no column 'nope'",)),
        (f"{CONV},format=parquet", ("unknown trace format 'parquet'",)),
        (f"{CONV},unit=h", ("unknown time unit 'h'",)),
        (f"{CONV},start=4000,end=5000", ("no request arrives", "[4000, 5000)")),
        (f"{CONV},start=9,end=3", ("end (3 s) must be after start",)),
        (f"{CONV},start=-1", ("start must be a finite number",)),
        (f"{CONV},colour=red", ("unknown trace parameter 'colour'",)),
        (f"{CONV},unit=ms,unit=s", ("given twice",)),
        (f"{VLLM},unit=ms", ("applies to CSV traces only",)),
        (f"{VLLM},column=foo", ("input_toks or output_toks",)),
        (f"{CONV},column=num_prefill_tokens", ("a whole trace takes no column",)),
        (f"{ARXIV},start=0,end=10", ("need arrival times",)),
        ("trace:", ("missing trace path",)),
        ("/no/such/file.csv", ("not found",)),
    ],
)
def test_bad_trace_specs(text: str, words: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as exc:
        load_request_trace(text, "SPEC")
    message = str(exc.value)
    assert exc.value.field == "SPEC" and message.startswith("SPEC: ") and "\n" not in message
    for word in words:
        assert word in message


def test_bad_windows(conv: RequestTrace) -> None:
    for text in ("40", "a:b", "5:2", "-3:4", "1:2:3", "nan:5"):
        with pytest.raises(ConfigError) as exc:
            parse_window(text)
        assert exc.value.field == "--window"
    assert parse_window("600:") == (600.0, math.inf) and parse_window(":60") == (0.0, 60.0)
    assert parse_window(":") == (0.0, math.inf)
    with pytest.raises(ConfigError, match="no request arrives") as exc:
        conv.window(3600, 3700)
    assert exc.value.field == "window"
    with pytest.raises(ConfigError) as exc:
        conv.busiest_window(0.0)
    assert exc.value.field == "busiest"


def test_size_spec_rejects_a_window() -> None:
    with pytest.raises(ConfigError, match="start=/end=") as exc:
        parse_size(f"trace:{CONV},start=0,end=60", "--prefill")
    assert exc.value.field == "--prefill"


def test_fit_rejects_bad_lengths() -> None:
    for values in (np.array([], dtype=np.int64), np.array([3, 0, 2]), np.array([1.5, 2.0])):
        with pytest.raises(ConfigError) as exc:
            fit_lengths(values, "decode_tokens")
        assert exc.value.field == "decode_tokens"


# --------------------------------------------------------------------------------------------
# The trace commands
# --------------------------------------------------------------------------------------------


def test_cli_trace_stats_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "trace", "stats", CONV, "--window", "600:1200", "--busiest", "30",
                             "--json")
    assert code == 0, err
    doc = json.loads(out)
    t = _csv_columns(CONV)["arrived_at"]
    assert doc["requests"] == int(((t >= 600) & (t < 1200)).sum())
    assert doc["spec"] == f"{CONV},start=600,end=1200"
    assert doc["busiest"]["requests"] >= doc["requests"] * 30 / 600


def test_cli_trace_stats_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "trace", "stats", f"trace:{VLLM}")
    assert code == 0, err
    assert "300 requests" in out and "857.5" in out and "652.5" in out and "Spearman" in out


def test_cli_trace_fit_then_simulate(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "trace", "fit", VLLM, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["prefill_tokens"]["trace"]["mean"] == pytest.approx(857.4633333333334, rel=1e-12)
    args = doc["simulate_args"]
    assert args[:2] == ["--arrival", doc["arrival"]["best"]]
    code, out, err = run_cli(capsys, "simulate", *args, "--requests", "300", "--budget", "8192",
                             "--batch-time", "constant:c=5", "--json")
    assert code == 0, err
    assert json.loads(out)["arrivals"] == 300
    code, out, err = run_cli(capsys, "trace", "fit", ARXIV)
    assert code == 0, err
    assert "llmqueue simulate --prefill lognormal:" in out and "no arrival times" in out


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["trace", "stats", f"{CONV},prefill=nope"], ("SPEC", "nope")),
        (["trace", "stats", f"{CONV},format=xml"], ("SPEC", "xml")),
        (["trace", "fit", f"{CONV},unit=weeks"], ("SPEC", "weeks")),
        (["trace", "stats", CONV, "--window", "4000:5000"], ("--window", "4000:5000")),
        (["trace", "stats", CONV, "--window", "9"], ("--window",)),
        (["simulate", "--arrival", f"trace:{ARXIV}", "--requests", "5"], ("arrival", "arrived_at")),
        (["simulate", "--arrival", f"trace:{CONV},format=xml", "--requests", "5"], ("arrival", "xml")),
    ],
)
def test_cli_bad_trace_input_exits_2(capsys: pytest.CaptureFixture[str], args: list[str],
                                     words: tuple[str, ...]) -> None:
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmqueue: error: ")
    for word in words:
        assert word in lines[0]
