"""Tests of lazily read traces: a run reads only the requests it replays (rows past them may be
bad and are never met), windows and statistics equal the eager computation, trace columns are one
int32 array, and binary or non-UTF-8 files are one-line errors."""

from __future__ import annotations

import csv
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from llmqueue.errors import ConfigError
from llmqueue.model import workload as workload_module
from llmqueue.model.specs import make_workload, parse_arrival, parse_size
from llmqueue.model.traces import load_request_trace
from llmqueue.model.workload import CHUNK_SIZE, Empirical, TokenCounts, TraceArrivals

from .conftest import SHARED_DATA
from .helpers import run_cli

CONV = str(SHARED_DATA / "traces" / "azure_conv_2023.csv")
VLLM = str(SHARED_DATA / "validation" / "rtxpro6000_llama31_8b" / "vllm_run" / "requests.jsonl")
HEADER = "arrived_at,num_prefill_tokens,num_decode_tokens\n"


@pytest.fixture(scope="module")
def columns() -> dict[str, np.ndarray]:
    """The Azure conversation trace's columns, read with the csv module (independent of llmqueue)."""
    with open(CONV, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {name: np.array([float(row[name]) for row in rows]) for name in rows[0]}


def _rows(n: int, gap_s: float = 0.1) -> list[str]:
    return [f"{i * gap_s:.3f},{10 + i % 50},{1 + i % 7}\n" for i in range(n)]


def _write(path: Path, lines: list[str], tail: bytes = b"") -> str:
    path.write_bytes((HEADER + "".join(lines)).encode("utf-8") + tail)
    return str(path)


def _replay(workload_or_arrival: object, **bounds: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A workload's requests (or a replay's whole chunks) as three arrays."""
    if isinstance(workload_or_arrival, TraceArrivals):
        chunks = list(workload_or_arrival.chunks())
    else:
        chunks = [c[1:] for c in workload_or_arrival.chunks(0, **bounds)]  # type: ignore[attr-defined]
    t, p, d = (np.concatenate(parts) for parts in zip(*chunks, strict=True))
    return t, p, d


class _ParseCounter:
    """Counts the data rows the CSV reader parses (the hook on its block parser)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows = 0
        original = workload_module._CsvParser.parse

        def parse(parser: object, block: bytes, line: int, row: int) -> object:
            parsed, lines = original(parser, block, line, row)  # type: ignore[arg-type]
            self.rows += len(parsed)
            return parsed, lines

        monkeypatch.setattr(workload_module._CsvParser, "parse", parse)


# --------------------------------------------------------------------------------------------
# A run reads what it replays, and no further
# --------------------------------------------------------------------------------------------


def test_rows_past_the_limit_are_never_met(tmp_path: Path) -> None:
    """6,000 good rows, then a bad cell: the first 6,000 requests replay (and scale, and have
    statistics); asking for one more meets the bad row, named by row and line."""
    path = _write(tmp_path / "tail.csv", [*_rows(6000), "oops,1,1\n", *_rows(50)])
    workload = make_workload(f"trace:{path}", None, None, None)
    t, p, _ = _replay(workload, max_requests=6000)
    assert t.shape == (6000,) and t[-1] == pytest.approx(599_900.0)
    np.testing.assert_array_equal(p, [10 + i % 50 for i in range(6000)])
    rate, mean_p, _ = workload.offered(6000)
    assert rate == pytest.approx(5999 / 599.9, rel=1e-12) and mean_p == float(np.mean(p))
    scaled = make_workload(f"trace:{path}", None, None, 50.0)
    ts, _, _ = _replay(scaled, max_requests=6000)
    assert (ts.shape[0] - 1) / (ts[-1] / 1000.0) == pytest.approx(50.0, rel=1e-12)
    assert len(list(workload.requests(seed=0, duration_ms=400_000.0))) == 4000  # a horizon before it
    with pytest.raises(ConfigError) as exc:
        _replay(workload, max_requests=6001)
    message = str(exc.value)
    assert exc.value.field == "arrival" and "\n" not in message
    assert "trace row 6001 (line 6002) column 'arrived_at' is not a finite number: 'oops'" in message


def test_a_binary_tail_past_the_limit_is_never_met(tmp_path: Path) -> None:
    path = _write(tmp_path / "binary_tail.csv", _rows(5000), tail=b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage\n")
    workload = make_workload(f"trace:{path}", None, None, None)
    assert len(list(workload.requests(seed=0, max_requests=5000))) == 5000
    with pytest.raises(ConfigError, match=r"line 5002 is not UTF-8 text \(byte 0x89\)") as exc:
        list(workload.requests(seed=0))
    assert exc.value.field == "arrival"


def test_a_run_reads_only_the_blocks_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first 1,000 requests of the 19,366-row trace come from the first block of lines."""
    workload = make_workload(f"trace:{CONV}", None, None, None)  # reads its first CHUNK_SIZE + 1
    counter = _ParseCounter(monkeypatch)
    assert len(list(workload.requests(seed=0, max_requests=1000))) == 1000
    assert 1000 <= counter.rows < 4000
    counter.rows = 0
    assert len(workload.arrival) == 19_366  # the whole replay: one pass over every row
    assert counter.rows == 19_366


def test_whole_trace_figures_are_known_without_reading_only_when_read(tmp_path: Path) -> None:
    """A short trace is known whole from the start; a long one only after a pass over all of it
    (a caller that just compares need not read it past what its run used)."""
    short = parse_arrival(f"trace:{_write(tmp_path / 'short.csv', _rows(100))}", None)
    assert isinstance(short, TraceArrivals) and short.whole_if_known() == (100, short.offered())
    long = parse_arrival(f"trace:{CONV}", 20.0)
    assert isinstance(long, TraceArrivals) and long.whole_if_known() is None
    assert long.offered(1000).rate_per_s == pytest.approx(20.0, rel=1e-12)
    assert long.whole_if_known() is None  # the first 1,000 are not the whole trace
    assert len(long) == 19_366
    known = long.whole_if_known()
    assert known is not None and known[0] == 19_366 and known[1].rate_per_s == pytest.approx(20.0, rel=1e-12)


def test_small_traces_are_read_once_and_checked_whole(tmp_path: Path) -> None:
    """A trace of at most CHUNK_SIZE requests is checked when the replay is made (errors at
    --arrival parse time, as before) and then replayed from memory."""
    path = tmp_path / "small.csv"
    _write(path, _rows(10))
    replay = parse_arrival(f"trace:{path}", None)
    path.unlink()  # held in memory: the file is not read again
    assert isinstance(replay, TraceArrivals) and len(replay) == 10 and replay.times_ms[-1] == 900.0
    _write(path, [*_rows(CHUNK_SIZE - 1), "1e9,0,0\n"])
    with pytest.raises(ConfigError, match=f"trace row {CHUNK_SIZE} .*has no tokens"):
        parse_arrival(f"trace:{path}", None)


# --------------------------------------------------------------------------------------------
# The same requests and statistics as the eager computation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "end"),
                         [(600, 1200), (3000, None), (None, 60), (0, 3600), (1842.878126, 1902.878126)])
def test_windows_replay_the_same_requests(columns: dict[str, np.ndarray], start: float | None,
                                          end: float | None) -> None:
    t = columns["arrived_at"] - columns["arrived_at"][0]
    lo, hi = start or 0.0, math.inf if end is None else end
    keep = (t >= lo) & (t < hi)
    spec = CONV + ("" if start is None else f",start={start}") + ("" if end is None else f",end={end}")
    replay = parse_arrival(f"trace:{spec}", None)
    assert isinstance(replay, TraceArrivals)
    times, prefill, decode = _replay(replay)
    expected = t[keep] - lo
    np.testing.assert_array_equal(times, (expected - expected[0]) * 1000.0)
    np.testing.assert_array_equal(prefill, columns["num_prefill_tokens"][keep])
    np.testing.assert_array_equal(decode, columns["num_decode_tokens"][keep])
    eager = load_request_trace(CONV).window(lo, hi).to_arrivals()
    np.testing.assert_array_equal(times, eager.times_ms)
    assert replay.rate_per_s == eager.rate_per_s and len(replay) == int(keep.sum())


def test_streamed_statistics_equal_the_eager_ones(columns: dict[str, np.ndarray]) -> None:
    t = columns["arrived_at"] - columns["arrived_at"][0]
    p, d = columns["num_prefill_tokens"], columns["num_decode_tokens"]
    workload = make_workload(f"trace:{CONV}", None, None, None)
    whole = load_request_trace(CONV)
    assert workload.rate_per_s == pytest.approx(whole.rate_per_s, rel=1e-12)  # ms vs s: an ulp
    assert workload.mean_prefill_tokens == float(np.mean(p))
    assert workload.mean_decode_tokens == float(np.mean(d))
    # the first N requests: their own rate and sizes, not the file's
    for n in (2, 1000, 4097, 12_345):
        rate, mean_p, mean_d = workload.offered(n)
        assert rate == pytest.approx((n - 1) / (t[n - 1] - t[0]), rel=1e-12)
        assert (mean_p, mean_d) == (float(np.mean(p[:n])), float(np.mean(d[:n])))
    # a duration: the requests arriving before it
    for seconds in (30.0, 900.0):
        n = int(np.count_nonzero(t * 1000.0 < seconds * 1000.0))
        rate, mean_p, _ = workload.offered(None, seconds * 1000.0)
        assert rate == pytest.approx((n - 1) / t[n - 1], rel=1e-12)
        assert mean_p == float(np.mean(p[:n]))
    # a time-scaled replay: the replayed requests run at the rate, and their sizes ride along
    scaled = make_workload(f"trace:{CONV}", None, None, 20.0)
    assert scaled.offered(1000).rate_per_s == pytest.approx(20.0, rel=1e-12)
    times, prefill, _ = _replay(scaled, max_requests=1000)
    assert (times.shape[0] - 1) / (times[-1] / 1000.0) == pytest.approx(20.0, rel=1e-12)
    np.testing.assert_allclose(times, t[:1000] * 1000.0 * ((999 / t[999]) / 20.0), rtol=1e-12)
    np.testing.assert_array_equal(prefill, p[:1000])
    # sizes drawn by the workload: their distribution's mean
    sized = make_workload(f"trace:{CONV}", "uniform:3,5", None, None)
    assert sized.offered(1000).mean_prefill_tokens == 4.0


def test_unscaled_replay_is_prefix_stable() -> None:
    workload = make_workload(f"trace:{CONV}", "poisson:30", None, None)
    full = list(workload.requests(seed=3, max_requests=3 * CHUNK_SIZE))
    for k in (1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE + 17):
        assert list(workload.requests(seed=3, max_requests=k)) == full[:k]


def test_a_window_deep_in_a_long_file_skips_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """200,000 rows (3 MB) with blank lines early on: a window from 1,500 s passes over the
    blocks before it unparsed, replays exactly its requests, and an error inside it names the
    right row and line (blank lines counted as lines, not rows)."""
    n = 200_000
    lines = [f"{i * 0.01:.2f},{1 + i % 97},{1 + i % 13}\n" for i in range(n)]
    lines.insert(1000, "\n")
    lines.insert(2000, "   \n")
    lines.insert(3000, "\r\n")
    bad = 170_000  # a row inside the window
    text = HEADER + "".join(lines)
    path = tmp_path / "long.csv"
    path.write_text(text, encoding="utf-8")
    replay = parse_arrival(f"trace:{path},start=1500,end=1600", None)
    counter = _ParseCounter(monkeypatch)
    times, prefill, _ = _replay(replay)
    i = np.arange(n)
    t = np.round(i * 0.01, 2)
    keep = (t >= 1500) & (t < 1600)
    assert times.shape[0] == int(keep.sum()) == 10_000
    np.testing.assert_allclose(times, (t[keep] - 1500 - (t[keep][0] - 1500)) * 1000.0, atol=1e-6)
    np.testing.assert_array_equal(prefill, 1 + i[keep] % 97)
    assert counter.rows < 120_000  # of the 150,000 rows before the window, most were passed over
    lines[bad + 3] = "nope,1,1\n"  # data row bad + 1 (three blank lines come before it)
    path.write_text(HEADER + "".join(lines), encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        _replay(parse_arrival(f"trace:{path},start=1650", None))
    assert f"trace row {bad + 1} (line {bad + 5}) column 'arrived_at' is not a finite" in str(exc.value)
    with pytest.raises(ConfigError, match=r"no request arrives in \[2500, 2600\) s .*to 1999\.99 s"):
        parse_arrival(f"trace:{path},start=2500,end=2600", None)


# --------------------------------------------------------------------------------------------
# Trace columns as size distributions
# --------------------------------------------------------------------------------------------


def test_a_trace_column_is_one_int32_array(columns: dict[str, np.ndarray]) -> None:
    dist = parse_size(f"trace:{CONV}", "--prefill")
    assert isinstance(dist, Empirical) and isinstance(dist.values, TokenCounts)
    assert dist.array.dtype == np.int32 and not dist.array.flags.writeable
    assert dist.values.array is dist.array  # one copy of the column
    expected = tuple(int(v) for v in columns["num_prefill_tokens"])
    assert dist.values == expected and expected == dist.values and hash(dist.values) == hash(expected)
    assert dist.mean == math.fsum(expected) / len(expected)
    assert dist == Empirical(expected, CONV, "num_prefill_tokens")
    assert dist.sample(np.random.default_rng(1), 10).dtype == np.int64
    assert dist.values[:3] == expected[:3] and list(dist.values)[-1] == expected[-1]
    vllm = parse_size(f"trace:{VLLM}", "--decode")
    assert isinstance(vllm.values, TokenCounts) and vllm.mean == 652.51


# --------------------------------------------------------------------------------------------
# Formats and bad input
# --------------------------------------------------------------------------------------------


def test_quotes_crlf_and_multiline_fields(tmp_path: Path) -> None:
    """Quoted cells (one spanning two lines) and CRLF line ends: the csv module's reading, with its
    line numbers."""
    text = ('id,arrived_at,prompt,num_prefill_tokens,num_decode_tokens\r\n'
            '1,0.5,"hello, world",12,3\r\n'
            '2,1.0,"two\r\nlines",40,1\r\n'
            '3,"2.5",plain,"7",9\r\n')
    path = tmp_path / "quoted.csv"
    path.write_bytes(text.encode("utf-8"))
    times, prefill, decode = _replay(parse_arrival(f"trace:{path}", None))  # type: ignore[arg-type]
    np.testing.assert_array_equal(times, [0.0, 500.0, 2000.0])
    np.testing.assert_array_equal(prefill, [12, 40, 7])
    np.testing.assert_array_equal(decode, [3, 1, 9])
    path.write_bytes((text + '4,3.0,"x",bad,1\r\n').encode("utf-8"))
    with pytest.raises(ConfigError, match=r"trace row 4 \(line 6\) column 'num_prefill_tokens'"):
        parse_arrival(f"trace:{path}", None)


def test_pickled_trace_workload_replays_the_same(tmp_path: Path) -> None:
    path = _write(tmp_path / "long.csv", _rows(6000))
    workload = make_workload(f"trace:{path}", None, None, 7.0)
    again = pickle.loads(pickle.dumps(workload))
    assert again == workload
    assert list(again.requests(seed=0, max_requests=50)) == list(workload.requests(seed=0, max_requests=50))


BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00\xff\xfe"


@pytest.mark.parametrize("name", ["image.csv", "utf16.csv", "latin1.csv"])
def test_binary_or_non_utf8_files_are_one_line_errors(tmp_path: Path, name: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    body = {"image.csv": BINARY, "utf16.csv": (HEADER + "0,1,1\n1,2,2\n").encode("utf-16"),
            "latin1.csv": (HEADER + "0,1,1\n").encode() + "1,2,2,é\n".encode("latin-1")}[name]
    path = tmp_path / name
    path.write_bytes(body)
    for call, field in ((lambda: parse_arrival(f"trace:{path}", None), "arrival"),
                        (lambda: parse_size(f"trace:{path}", "--prefill"), "--prefill"),
                        (lambda: load_request_trace(str(path)), "trace")):
        with pytest.raises(ConfigError) as exc:
            call()
        assert exc.value.field == field and "\n" not in str(exc.value) and "not UTF-8 text" in str(exc.value)
    for args in (["simulate", "--arrival", f"trace:{path}", "--requests", "5"],
                 ["simulate", "--prefill", f"trace:{path}", "--requests", "5"],
                 ["trace", "stats", str(path)]):
        code, out, err = run_cli(capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2 and out == "" and len(lines) == 1 and "not UTF-8 text" in lines[0], err


def test_binary_vllm_log_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(BINARY)
    with pytest.raises(ConfigError) as exc:
        parse_arrival(f"trace:{path}", None)
    assert exc.value.field == "arrival" and "\n" not in str(exc.value)
