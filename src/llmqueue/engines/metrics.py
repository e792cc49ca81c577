"""Run metrics with vLLM ``bench serve`` names, collected online in bounded memory.

The engine reports arrivals, batches and completions to a ``Recorder``; ``Recorder.finish`` turns
them into a ``RunMetrics`` record. Time-averages (backlog, requests in system) are exact integrals of
piecewise-constant functions; the backlog series is kept as time-bins whose width doubles when they
fill, so memory stays fixed however long the run.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from llmqueue.errors import ConfigError

PERCENTILES = (("mean", None), ("median", 50.0), ("p90", 90.0), ("p99", 99.0))
LATENCIES = ("ttft", "tpot", "itl", "e2el")
_LATENCY_KEYS = tuple(f"{label}_{name}_ms" for name in LATENCIES for label, _ in PERCENTILES)


class TimeBins:
    """Integral of a piecewise-constant function over equal time bins starting at 0.

    When a value lands beyond the last bin, neighbouring bins merge pairwise (width doubles), so at
    most ``max_bins`` bins are ever held.
    """

    def __init__(self, width_ms: float = 1.0, max_bins: int = 2048) -> None:
        self.width_ms = width_ms
        self.max_bins = max_bins
        self.sums = np.zeros(max_bins)

    def _fit(self, t_ms: float) -> None:
        while t_ms > self.width_ms * self.max_bins:
            merged = self.sums.reshape(-1, 2).sum(axis=1)
            self.sums[: self.max_bins // 2] = merged
            self.sums[self.max_bins // 2 :] = 0.0
            self.width_ms *= 2.0

    def add(self, t0_ms: float, t1_ms: float, value: float) -> None:
        """Add ``value`` held constant over [t0, t1)."""
        if t1_ms <= t0_ms:
            return
        self._fit(t1_ms)
        if value == 0.0:
            return
        w = self.width_ms
        i0 = int(t0_ms // w)
        i1 = min(int(t1_ms // w), self.max_bins - 1)
        if i0 == i1:
            self.sums[i0] += value * (t1_ms - t0_ms)
            return
        self.sums[i0] += value * ((i0 + 1) * w - t0_ms)
        if i1 > i0 + 1:
            self.sums[i0 + 1 : i1] += value * w
        self.sums[i1] += value * (t1_ms - i1 * w)

    def add_steps(self, t0_ms: float, ends_ms: np.ndarray, values: np.ndarray) -> None:
        """Add a step function: ``values[i]`` held over [previous end, ``ends_ms[i]``), from t0.

        Vectorised (for skipped identical iterations): the running integral is piecewise linear,
        so interpolating it at the bin edges gives each bin's share exactly.
        """
        t1_ms = float(ends_ms[-1])
        if t1_ms <= t0_ms:
            return
        self._fit(t1_ms)
        w = self.width_ms
        knots = np.concatenate(([t0_ms], ends_ms))
        integral = np.concatenate(([0.0], np.cumsum(values * np.diff(knots))))
        i0 = int(t0_ms // w)
        i1 = min(int(t1_ms // w), self.max_bins - 1)
        at = np.concatenate(([t0_ms], np.arange(i0 + 1, i1 + 1) * w, [t1_ms]))
        self.sums[i0 : i1 + 1] += np.diff(np.interp(at, knots, integral))

    def series(self, end_ms: float) -> tuple[np.ndarray, np.ndarray]:
        """Bin start times (ms) and bin averages over [0, end_ms) (the last bin may be partial; one
        that the run enters by less than 1e-9 of a bin is left out (NaN): its average would be
        float rounding divided by almost nothing)."""
        self._fit(end_ms)
        n = max(1, math.ceil(end_ms / self.width_ms))
        starts = np.arange(n) * self.width_ms
        spans = np.minimum(starts + self.width_ms, end_ms) - starts
        spans[spans <= 1e-9 * self.width_ms] = np.nan
        return starts, self.sums[:n] / spans


class ValueCounts:
    """Exact multiset of float values (counts per distinct value), for percentiles of ITL.

    In the paper's model inter-token latencies are batch times, so distinct values are few. Past
    ``max_distinct`` values, new and held values are rounded to 6 significant digits (relative
    error below 5e-6), which bounds memory; ``exact`` says whether that happened.
    """

    def __init__(self, max_distinct: int = 200_000) -> None:
        self.counts: dict[float, int] = {}
        self.max_distinct = max_distinct
        self.exact = True
        self.total = 0
        self.sum = 0.0

    def add(self, value: float, count: int = 1) -> None:
        """Add ``count`` copies of ``value``."""
        self.total += count
        self.sum += value * count
        if not self.exact:
            value = float(f"{value:.6g}")
        counts = self.counts
        counts[value] = counts.get(value, 0) + count
        if len(counts) > self.max_distinct and self.exact:
            self.exact = False
            rounded: dict[float, int] = {}
            for v, c in counts.items():
                key = float(f"{v:.6g}")
                rounded[key] = rounded.get(key, 0) + c
            self.counts = rounded

    def percentile(self, q: float) -> float:
        """The q-th percentile with numpy's default (linear) interpolation."""
        if self.total == 0:
            return math.nan
        values = np.array(sorted(self.counts))
        cum = np.cumsum([self.counts[v] for v in values])
        pos = q / 100.0 * (self.total - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        v_lo = values[np.searchsorted(cum, lo + 1)]
        v_hi = values[np.searchsorted(cum, hi + 1)]
        return float(v_lo + (v_hi - v_lo) * (pos - lo))

    def mean(self) -> float:
        """Mean of the values added (exact, from a running sum)."""
        return self.sum / self.total if self.total else math.nan


class LogHistogram:
    """Fixed log-spaced histogram of non-negative values: percentiles within relative ``alpha``.

    Bin i holds values in (m g^(i-1), m g^i] with g = (1 + alpha) / (1 - alpha), and reports the
    value 2 m g^i / (g + 1), within relative ``alpha`` of every value in the bin (the DDSketch
    mapping, with a fixed range instead of a growing one). Values up to ``min_ms`` count as 0
    and values above ``max_ms`` as ``max_ms``. About 1.6 MB for the defaults; the mean is exact.
    """

    def __init__(self, alpha: float = 1e-4, min_ms: float = 1e-6, max_ms: float = 1e12) -> None:
        self.alpha = alpha
        self.min_ms = min_ms
        self.max_ms = max_ms
        self.log_gamma = math.log((1.0 + alpha) / (1.0 - alpha))
        self.bins = math.ceil(math.log(max_ms / min_ms) / self.log_gamma) + 1
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.total = 0
        self.sum = 0.0

    def add(self, values: np.ndarray) -> None:
        """Count every value of ``values``."""
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return
        self.total += int(values.size)
        self.sum += float(values.sum())
        scaled = np.clip(values, self.min_ms, self.max_ms) / self.min_ms
        index = np.ceil(np.log(scaled) / self.log_gamma).astype(np.int64)
        self.counts += np.bincount(np.clip(index, 0, self.bins - 1), minlength=self.bins)

    def _value(self, i: int) -> float:
        if i == 0:
            return 0.0
        gamma = math.exp(self.log_gamma)
        return 2.0 * self.min_ms * math.exp(i * self.log_gamma) / (gamma + 1.0)

    def percentile(self, q: float) -> float:
        """The q-th percentile with numpy's default (linear) interpolation between the ranks."""
        if self.total == 0:
            return math.nan
        cum = np.cumsum(self.counts)
        pos = q / 100.0 * (self.total - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        v_lo = self._value(int(np.searchsorted(cum, lo + 1)))
        v_hi = self._value(int(np.searchsorted(cum, hi + 1)))
        return v_lo + (v_hi - v_lo) * (pos - lo)

    def mean(self) -> float:
        """Exact mean of the values added."""
        return self.sum / self.total if self.total else math.nan


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request's outcome; ``first_token_ms``/``finish_ms`` are NaN if not reached."""

    id: int
    arrival_ms: float
    first_token_ms: float
    finish_ms: float
    prefill_tokens: int
    decode_tokens: int


@dataclass(frozen=True, slots=True)
class RunMetrics:
    """The metrics of one run (vLLM ``bench serve`` names plus queueing and batch statistics)."""

    arrivals: int
    completed: int
    incomplete: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    latency: dict[str, float]
    mean_requests_in_system: float
    mean_backlog_tokens: float
    num_batches: int
    mean_batch_tokens: float
    mean_batch_requests: float
    mean_batch_prefill_tokens: float
    mean_batch_decode_tokens: float
    busy_fraction: float
    wc_violations: int
    wc_wasted_tokens: int
    wc_wasted_fraction: float
    stall_ms: float
    itl_exact: bool
    latency_exact: bool
    backlog_series: tuple[tuple[float, float], ...] = field(repr=False)
    preemptions: int = 0
    recomputed_tokens: int = 0
    rejected_requests: int = 0
    peak_kv_usage: float = math.nan
    mean_kv_usage: float = math.nan
    good_requests: int | None = None
    request_goodput: float = math.nan

    def as_dict(self) -> dict[str, object]:
        """Flat mapping with vLLM-style keys (``mean_ttft_ms``...); the series as [s, tokens]."""
        out: dict[str, object] = {
            "arrivals": self.arrivals,
            "completed": self.completed,
            "incomplete": self.incomplete,
            "duration_s": self.duration_s,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "request_goodput": self.request_goodput,
            "good_requests": self.good_requests,
        }
        out.update(self.latency)
        out.update(
            mean_requests_in_system=self.mean_requests_in_system,
            mean_backlog_tokens=self.mean_backlog_tokens,
            num_batches=self.num_batches,
            mean_batch_tokens=self.mean_batch_tokens,
            mean_batch_requests=self.mean_batch_requests,
            mean_batch_prefill_tokens=self.mean_batch_prefill_tokens,
            mean_batch_decode_tokens=self.mean_batch_decode_tokens,
            busy_fraction=self.busy_fraction,
            wc_violations=self.wc_violations,
            wc_wasted_tokens=self.wc_wasted_tokens,
            wc_wasted_fraction=self.wc_wasted_fraction,
            stall_ms=self.stall_ms,
            itl_exact=self.itl_exact,
            latency_exact=self.latency_exact,
            preemptions=self.preemptions,
            recomputed_tokens=self.recomputed_tokens,
            rejected_requests=self.rejected_requests,
            peak_kv_usage=self.peak_kv_usage,
            mean_kv_usage=self.mean_kv_usage,
            backlog_series=[[t, b] for t, b in self.backlog_series],
        )
        return out


GOODPUT_KEYS = ("ttft", "tpot", "e2el")
"""What a goodput target may bound (ms), as ``vllm bench serve --goodput ttft:500 tpot:50``."""


def check_goodput(targets: Mapping[str, float]) -> dict[str, float]:
    """Goodput targets ``{ttft|tpot|e2el: ms}``, checked: known keys, finite values > 0."""
    if not isinstance(targets, Mapping) or not targets:
        raise ConfigError("goodput", targets, "must map ttft, tpot or e2el to a target in ms")
    out: dict[str, float] = {}
    for key, value in targets.items():
        if key not in GOODPUT_KEYS:
            raise ConfigError("goodput", key, f"unknown target (known: {', '.join(GOODPUT_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and value > 0):
            raise ConfigError("goodput", value, f"the {key} target must be a finite number of ms > 0")
        out[key] = float(value)
    return out


def parse_goodput(text: str) -> dict[str, float]:
    """``ttft:500,tpot:50`` (or ``ttft=500 tpot=50``, vLLM's form) into checked targets."""
    pieces = [p for p in text.replace(",", " ").split() if p]
    targets: dict[str, float] = {}
    for piece in pieces:
        key, sep, value = piece.replace("=", ":").partition(":")
        key = key.strip().lower().removesuffix("_ms")
        if not sep:
            raise ConfigError("goodput", text, f"expected KEY:MS pairs like ttft:500, found {piece!r}")
        try:
            targets[key] = float(value)
        except ValueError:
            raise ConfigError("goodput", text, f"{key} target must be a number of ms, "
                              f"not {value!r}") from None
    return check_goodput(targets)


def summary(name: str, values: np.ndarray) -> dict[str, float]:
    """mean/median/p90/p99 of ``values`` under vLLM-style keys (NaN when empty)."""
    out: dict[str, float] = {}
    for label, q in PERCENTILES:
        if values.size == 0:
            out[f"{label}_{name}_ms"] = math.nan
        elif q is None:
            out[f"{label}_{name}_ms"] = float(values.mean())
        else:
            out[f"{label}_{name}_ms"] = float(np.percentile(values, q))
    return out


@dataclass(slots=True)
class Totals:
    """A recorder's running counters and time integrals, in one typed record.

    The Python engines update them event by event through the ``Recorder``'s methods; the
    compiled loop keeps the same quantities in its kernel and hands them over at the end of a run
    as one ``Totals`` (``Recorder.load``), so a name cannot drift between the two.
    """

    last_ms: float = 0.0
    """Time up to which the integrals run."""
    backlog_tokens: int = 0
    """Unprocessed tokens present now."""
    in_system: int = 0
    """Requests present now."""
    backlog_area: float = 0.0
    """Integral of the backlog (token-ms)."""
    in_system_area: float = 0.0
    """Integral of the requests present (request-ms)."""
    arrivals: int = 0
    arrived_tokens: int = 0
    last_arrival_ms: float = 0.0
    batches_started: int = 0
    batch_tokens: int = 0
    batch_requests: int = 0
    batch_prefill: int = 0
    batch_decode: int = 0
    busy_ms: float = 0.0
    """Busy time of the batches started, each booked in full when it starts."""
    wc_violations: int = 0
    """Batches below their fill target (the work-conservation audit)."""
    wc_wasted: int = 0
    """Tokens they fell short by."""
    wc_target: int = 0
    """Sum of the fill targets."""
    stall_ms: float = 0.0
    """Idle time while requests waited (the policy formed no batch)."""
    preemptions: int = 0
    recomputed_tokens: int = 0
    rejected_requests: int = 0
    kv_peak: float = 0.0
    """Highest KV-cache usage (fraction) at a batch start."""
    kv_sum: float = 0.0
    """Sum of the KV-cache usage at batch starts."""
    kv_batches: int = 0
    """Batches whose KV-cache usage was reported."""


class Recorder:
    """Collects what the engine reports and produces ``RunMetrics``; one per run, no shared state.

    Finished requests are kept as compact columns (exact percentiles, and the records for
    ``--requests-out``). With ``keep_requests=False``, once ``exact_limit`` requests have
    finished the columns are folded into ``LogHistogram``s (relative accuracy 1e-4) and emptied
    again at every ``exact_limit``, so memory stays fixed however long the run;
    ``RunMetrics.latency_exact`` then says False.
    """

    def __init__(
        self, *, max_bins: int = 2048, keep_requests: bool = True, exact_limit: int = 100_000,
        goodput: Mapping[str, float] | None = None,
    ) -> None:
        self.keep_requests = keep_requests
        self.goodput = None if goodput is None else check_goodput(goodput)
        self.good = 0  # completed requests folded so far that met every goodput target
        self.exact_limit = exact_limit
        self.histograms: dict[str, LogHistogram] | None = None
        self.folded = {"completed": 0, "prefill_tokens": 0, "decode_tokens": 0}
        self.totals = Totals()
        self.backlog_bins = TimeBins(max_bins=max_bins)
        self.busy_past_end_ms = 0.0  # of the batch running when the run was cut (see ``cut``)
        self.itl = ValueCounts()
        # completed requests, one compact column per RequestRecord field
        self.done = {
            name: array("d" if name.endswith("_ms") else "q") for name in RequestRecord.__slots__
        }

    def _advance(self, t_ms: float) -> None:
        t = self.totals
        dt = t_ms - t.last_ms
        if dt > 0:
            t.backlog_area += t.backlog_tokens * dt
            t.in_system_area += t.in_system * dt
            self.backlog_bins.add(t.last_ms, t_ms, float(t.backlog_tokens))
            t.last_ms = t_ms

    def load(self, totals: Totals, bin_sums: np.ndarray, bin_width_ms: float) -> None:
        """Take over the totals and backlog bins of a run kept elsewhere (the compiled loop),
        replacing this recorder's (before ``finish``)."""
        self.totals = totals
        self.backlog_bins.sums[:] = bin_sums
        self.backlog_bins.width_ms = bin_width_ms

    def arrival(self, t_ms: float, tokens: int) -> None:
        """A request with ``tokens`` unprocessed tokens arrived."""
        self._advance(t_ms)
        t = self.totals
        t.backlog_tokens += tokens
        t.in_system += 1
        t.arrivals += 1
        t.arrived_tokens += tokens
        t.last_arrival_ms = t_ms

    def batches(
        self,
        count: int,
        busy_ms: float,
        prefill_tokens: int,
        decode_tokens: int,
        requests: int,
        audit: tuple[int, int, int],
    ) -> None:
        """``count`` identical batches started, together busy ``busy_ms``. ``audit`` is (sum of
        their fill targets, how many fell short of theirs, tokens short in all): the fill target
        is what the batch rules allowed a batch to hold (the work-conservation audit)."""
        n = prefill_tokens + decode_tokens
        t = self.totals
        t.batches_started += count
        t.batch_tokens += n * count
        t.batch_requests += requests * count
        t.batch_prefill += prefill_tokens * count
        t.batch_decode += decode_tokens * count
        t.busy_ms += busy_ms
        target_sum, violations, wasted = audit
        t.wc_target += target_sum
        t.wc_violations += violations
        t.wc_wasted += wasted

    def cut(self, end_ms: float, batch_end_ms: float) -> None:
        """The run was cut at ``end_ms`` while a batch, booked in full when it started, ran until
        ``batch_end_ms`` (inf: none ran): its time past the end is not busy time of the run, so
        ``busy_fraction`` is the busy time within [0, end] over end."""
        if math.isfinite(batch_end_ms) and batch_end_ms > end_ms:
            self.busy_past_end_ms = batch_end_ms - end_ms

    def tokens_done(self, t_ms: float, tokens: int) -> None:
        """A batch of ``tokens`` tokens ended at ``t_ms``."""
        self._advance(t_ms)
        self.totals.backlog_tokens -= tokens

    def tokens_done_steps(self, ends_ms: list[float], tokens: int) -> None:
        """Identical batches of ``tokens`` tokens ended at each of ``ends_ms`` (increasing): the
        backlog steps down by ``tokens`` at each end. Integrated in closed form (and, when the
        steps straddle time bins, bin by bin with numpy)."""
        steps = len(ends_ms)
        if steps == 0:
            return
        totals = self.totals
        t0, t1 = totals.last_ms, ends_ms[-1]
        # area under B, B - n, ..., B - (m - 1) n over [t0, e_0), [e_0, e_1), ..., [e_{m-2}, t1)
        inner = (steps - 1) * t1 - math.fsum(ends_ms[:-1])
        area = totals.backlog_tokens * (t1 - t0) - tokens * inner
        totals.backlog_area += area
        totals.in_system_area += totals.in_system * (t1 - t0)
        bins = self.backlog_bins
        bins._fit(t1)
        if int(t0 // bins.width_ms) == min(int(t1 // bins.width_ms), bins.max_bins - 1):
            bins.sums[int(t0 // bins.width_ms)] += area
        else:
            values = totals.backlog_tokens - tokens * np.arange(steps, dtype=np.float64)
            bins.add_steps(t0, np.array(ends_ms), values)
        totals.last_ms = t1
        totals.backlog_tokens -= tokens * steps

    def preempted(self, t_ms: float, tokens: int) -> None:
        """A request lost ``tokens`` cached tokens to a preemption: they are work again."""
        self._advance(t_ms)
        t = self.totals
        t.backlog_tokens += tokens
        t.preemptions += 1
        t.recomputed_tokens += tokens

    def rejected(self) -> None:
        """A request was refused at arrival: its KV cache could never fit."""
        self.totals.rejected_requests += 1

    def kv_used(self, used_blocks: int, total_blocks: int) -> None:
        """A batch started with ``used_blocks`` of ``total_blocks`` KV blocks held."""
        usage = used_blocks / total_blocks
        t = self.totals
        t.kv_peak = max(t.kv_peak, usage)
        t.kv_sum += usage
        t.kv_batches += 1

    def kv_used_steps(self, used_blocks: list[int], total_blocks: int) -> None:
        """Consecutive batches started with each of ``used_blocks`` blocks held (fast engine)."""
        for used in used_blocks:
            self.kv_used(used, total_blocks)

    def stall(self, duration_ms: float) -> None:
        """The engine sat idle for ``duration_ms`` although requests were waiting."""
        self.totals.stall_ms += duration_ms

    def request_done(self, record: RequestRecord) -> None:
        """A request finished its last token."""
        self.totals.in_system -= 1
        for name, column in self.done.items():
            column.append(getattr(record, name))
        if not self.keep_requests and len(self.done["id"]) >= self.exact_limit:
            self._fold()

    def _columns(self) -> tuple[np.ndarray, ...]:
        """(arrival, first token, finish, prefill, decode) of the requests held as columns."""
        return tuple(
            np.frombuffer(self.done[name], dtype=float if name.endswith("_ms") else np.int64)
            for name in ("arrival_ms", "first_token_ms", "finish_ms", "prefill_tokens", "decode_tokens")
        )

    def _fold(self) -> None:
        """Move the held columns into the latency histograms and empty them."""
        if self.histograms is None:
            self.histograms = {name: LogHistogram() for name in ("ttft", "tpot", "e2el")}
        arrival, first, finish, prefill, decode = self._columns()
        self.good += self._count_good(arrival, first, finish, decode)
        has_decode = decode > 0
        self.histograms["ttft"].add(first - arrival)
        self.histograms["tpot"].add((finish[has_decode] - first[has_decode]) / decode[has_decode])
        self.histograms["e2el"].add(finish - arrival)
        self.folded["completed"] += len(arrival)
        self.folded["prefill_tokens"] += int(prefill.sum())
        self.folded["decode_tokens"] += int(decode.sum())
        self.done = {name: array(column.typecode) for name, column in self.done.items()}

    def requests_done(
        self,
        ids: np.ndarray,
        arrival_ms: np.ndarray,
        first_token_ms: np.ndarray,
        finish_ms: np.ndarray,
        prefill_tokens: np.ndarray,
        decode_tokens: np.ndarray,
    ) -> None:
        """Many requests finished (columns of equal length, any order)."""
        self.totals.in_system -= len(ids)
        columns = (ids, arrival_ms, first_token_ms, finish_ms, prefill_tokens, decode_tokens)
        for (name, column), values in zip(self.done.items(), columns, strict=True):
            dtype = np.float64 if name.endswith("_ms") else np.int64
            column.frombytes(np.ascontiguousarray(values, dtype=dtype).tobytes())
        if not self.keep_requests and len(self.done["id"]) >= self.exact_limit:
            self._fold()

    def finish(self, end_ms: float, max_points: int = 512) -> RunMetrics:
        """Close the integrals at ``end_ms`` and compute every metric."""
        self._advance(end_ms)
        latency: dict[str, float] = {}
        if self.histograms is None:
            arrival, first, finish, prefill, decode = self._columns()
            good = self._count_good(arrival, first, finish, decode)
            completed = len(arrival)
            prefill_sum, decode_sum = float(prefill.sum()), float(decode.sum())
            has_decode = decode > 0
            latency.update(summary("ttft", first - arrival))
            latency.update(
                summary("tpot", (finish[has_decode] - first[has_decode]) / decode[has_decode])
            )
            latency.update(summary("e2el", finish - arrival))
        else:
            self._fold()
            good = self.good
            completed = self.folded["completed"]
            prefill_sum = float(self.folded["prefill_tokens"])
            decode_sum = float(self.folded["decode_tokens"])
            for name, histogram in self.histograms.items():
                for label, q in PERCENTILES:
                    value = histogram.mean() if q is None else histogram.percentile(q)
                    latency[f"{label}_{name}_ms"] = value
        for label, q in PERCENTILES:
            latency[f"{label}_itl_ms"] = self.itl.mean() if q is None else self.itl.percentile(q)
        latency = {key: latency[key] for key in _LATENCY_KEYS}
        duration_s = end_ms / 1000.0

        def per_s(x: float) -> float:
            return x / duration_s if duration_s > 0 else math.nan

        t = self.totals

        def per_batch(x: int) -> float:
            return x / t.batches_started if t.batches_started else math.nan

        starts, means = self.backlog_bins.series(end_ms)
        series = downsample(starts / 1000.0, means, max_points)
        return RunMetrics(
            arrivals=t.arrivals,
            completed=completed,
            incomplete=t.arrivals - completed,
            duration_s=duration_s,
            request_throughput=per_s(completed),
            output_throughput=per_s(decode_sum),
            total_token_throughput=per_s(decode_sum + prefill_sum),
            latency=latency,
            mean_requests_in_system=t.in_system_area / end_ms if end_ms > 0 else math.nan,
            mean_backlog_tokens=t.backlog_area / end_ms if end_ms > 0 else math.nan,
            num_batches=t.batches_started,
            mean_batch_tokens=per_batch(t.batch_tokens),
            mean_batch_requests=per_batch(t.batch_requests),
            mean_batch_prefill_tokens=per_batch(t.batch_prefill),
            mean_batch_decode_tokens=per_batch(t.batch_decode),
            # busy time within [0, end] (the last batch may run past a cut), in [0, 1] despite rounding
            busy_fraction=(min(1.0, max(0.0, (t.busy_ms - self.busy_past_end_ms) / end_ms))
                           if end_ms > 0 else math.nan),
            wc_violations=t.wc_violations,
            wc_wasted_tokens=t.wc_wasted,
            wc_wasted_fraction=t.wc_wasted / t.wc_target if t.wc_target else 0.0,
            stall_ms=t.stall_ms,
            itl_exact=self.itl.exact,
            latency_exact=self.histograms is None,
            backlog_series=series,
            preemptions=t.preemptions,
            recomputed_tokens=t.recomputed_tokens,
            rejected_requests=t.rejected_requests,
            peak_kv_usage=t.kv_peak if t.kv_batches else math.nan,
            mean_kv_usage=t.kv_sum / t.kv_batches if t.kv_batches else math.nan,
            good_requests=None if self.goodput is None else good,
            request_goodput=math.nan if self.goodput is None else per_s(good),
        )

    def _count_good(self, arrival: np.ndarray, first: np.ndarray, finish: np.ndarray,
                    decode: np.ndarray) -> int:
        """How many of these completed requests meet every goodput target (vLLM's rule: TPOT is
        0 for a request without decode tokens)."""
        if self.goodput is None:
            return 0
        ok = np.ones(len(arrival), dtype=bool)
        for key, target in self.goodput.items():
            if key == "ttft":
                ok &= first - arrival <= target
            elif key == "e2el":
                ok &= finish - arrival <= target
            else:
                safe = np.maximum(decode, 1)
                ok &= np.where(decode > 0, (finish - first) / safe, 0.0) <= target
        return int(np.count_nonzero(ok))

    def completed_records(self) -> Iterable[RequestRecord]:
        """Records of the completed requests, in completion order (needs ``keep_requests``)."""
        if self.histograms is not None:
            raise ValueError("the request records were folded into histograms (keep_requests off)")
        for values in zip(*self.done.values(), strict=True):
            yield RequestRecord(*values)


def downsample(
    times_s: np.ndarray, values: np.ndarray, max_points: int
) -> tuple[tuple[float, float], ...]:
    """Average consecutive bins so at most ``max_points`` (time, value) pairs remain."""
    n = len(times_s)
    group = max(1, math.ceil(n / max_points))
    out = []
    for i in range(0, n, group):
        chunk = values[i : i + group]
        chunk = chunk[~np.isnan(chunk)]
        if chunk.size:
            out.append((float(times_s[i]), float(chunk.mean())))
    return tuple(out)


REQUEST_LATENCIES = ("ttft", "tpot", "e2el")
"""The per-request latencies (vLLM names) that ``merged_latency`` gives."""


def merged_latency(recorders: Sequence[Recorder]) -> dict[str, float]:
    """TTFT, TPOT and E2EL (mean/median/p90/p99 under vLLM names) over the finished requests of
    several recorders taken together (a pool's members; call after their ``finish``): exact while
    every recorder holds its requests as columns, else from their log-histograms summed."""
    columns = [r._columns() for r in recorders]
    values: dict[str, list[np.ndarray]] = {name: [] for name in REQUEST_LATENCIES}
    for arrival, first, finish, _, decode in columns:
        has_decode = decode > 0
        values["ttft"].append(first - arrival)
        values["tpot"].append((finish[has_decode] - first[has_decode]) / decode[has_decode])
        values["e2el"].append(finish - arrival)
    out: dict[str, float] = {}
    folded = [r.histograms for r in recorders if r.histograms is not None]
    for name in REQUEST_LATENCIES:
        exact = np.concatenate(values[name]) if values[name] else np.zeros(0)
        if not folded:
            out.update(summary(name, exact))
            continue
        total = LogHistogram()
        total.add(exact)
        for histograms in folded:
            total.counts += histograms[name].counts
            total.total += histograms[name].total
            total.sum += histograms[name].sum
        for label, q in PERCENTILES:
            out[f"{label}_{name}_ms"] = total.mean() if q is None else total.percentile(q)
    return out
