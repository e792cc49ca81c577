"""Driver of the compiled event loop (``llmqueue.kernel``): feeds arrivals, collects outputs.

``simulate(..., engine="auto")`` uses it for the shipped policies (``KFCFS`` and ``VLLMChunked``
instances, not subclasses) when numba is installed (``pip install 'llmqueue[fast]'``); otherwise
the pure-Python fast engine runs, with the same results. Arrivals come in numpy chunks and
finished requests leave in numpy chunks, so the loop never builds a Python object per request.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib.util import find_spec

import numpy as np

from llmqueue.batchtime import BatchTime
from llmqueue.errors import ConfigError
from llmqueue.metrics import Recorder, RequestRecord
from llmqueue.policies import KFCFS, VLLMChunked
from llmqueue.workload import Request

MAX_BUDGET = 1 << 17
"""Largest token budget the compiled loop takes (it tabulates t(n) for n = 1..budget)."""

Chunk = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""Arrivals in time order: (ids int64, arrival_ms float64, prefill int64, decode int64)."""
_NO_ARRIVALS: Chunk = (np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))


@cache
def available() -> bool:
    """Whether numba is installed (the ``fast`` extra; looked up once per process)."""
    return find_spec("numba") is not None


def supports(policy: object, budget: int, keep_batches: bool) -> bool:
    """Whether the compiled loop can run this setting (else the Python fast engine does)."""
    return (
        type(policy) in (KFCFS, VLLMChunked)
        and not keep_batches
        and isinstance(budget, int)
        and 1 <= budget <= MAX_BUDGET
        and available()
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a compiled run ended (what ``simulate`` needs besides the recorder)."""

    end_ms: float
    cut: bool
    blocked_since_ms: float | None
    in_system: int
    pending: tuple[RequestRecord, ...]


def _policy_params(policy: KFCFS | VLLMChunked, budget: int, k_max: int | None) -> np.ndarray:
    from llmqueue import kernel as K

    pol = np.zeros(K.N_POL, dtype=np.int64)
    pol[K.P_BUDGET] = budget
    pol[K.P_KMAX] = 0 if k_max is None else k_max
    if isinstance(policy, KFCFS):
        pol[K.P_KIND] = K.KIND_KFCFS
        pol[K.P_DECODE_FIRST] = int(policy.priority == "decode")
        pol[K.P_MIXED] = int(policy.mixed)
        pol[K.P_CHUNKED] = int(policy.chunked)
        pol[K.P_KP] = 0 if policy.k_p is None else policy.k_p
        pol[K.P_KD] = 0 if policy.k_d is None else policy.k_d
    else:
        pol[K.P_KIND] = K.KIND_VLLM_CHUNKED
    return pol


def _batch_time_table(batch_time: BatchTime, budget: int) -> np.ndarray:
    """t(n) for n = 0..budget; NaN where the model fails (reported only if such a batch runs)."""
    table = np.full(budget + 1, math.nan)
    for n in range(1, budget + 1):
        try:
            table[n] = float(batch_time(n))
        except Exception:
            table[n] = math.nan
    return table


class _State:
    """The kernel's arrays (see ``llmqueue.kernel`` for the layout), growable."""

    def __init__(self, policy: KFCFS | VLLMChunked, batch_time: BatchTime, budget: int,
                 k_max: int | None, capacity: int = 1024) -> None:
        from llmqueue import kernel as K

        self.K = K
        self.batch_time = batch_time
        self.si = np.zeros(K.N_SI, dtype=np.int64)
        self.sf = np.zeros(K.N_SF)
        self.sf[K.BATCH_END] = math.inf
        self.sf[K.HORIZON] = math.inf
        self.sf[K.BIN_WIDTH] = 1.0
        self.si[K.A_FINAL] = 0
        self.cap = 0
        self.slot_i = np.zeros((0, K.N_RI), dtype=np.int64)
        self.slot_f = np.zeros((0, K.N_RF))
        self.q = np.zeros((K.N_Q, 0), dtype=np.int64)
        self.heap = np.zeros((4, 0), dtype=np.int64)
        self.grow(capacity)
        self.pol = _policy_params(policy, budget, k_max)
        self.t_table = _batch_time_table(batch_time, budget)
        self.ends = np.zeros(K.MAX_REPEAT)
        self.targets = np.zeros(K.MAX_REPEAT, dtype=np.int64)
        self.bins = np.zeros(2048)
        # one step writes at most (served decoders + planned prompts + joiners + 4) <= 3 b + 4
        # records and ITL entries, so the kernel's "need room" always leaves room once drained
        room = max(1 << 14, 4 * budget + 64)
        self.out_f = np.zeros((room, 3))
        self.out_i = np.zeros((room, 4), dtype=np.int64)
        self.itl = np.zeros((2, room))
        self.kernel_args = self._kernel_args()

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` requests present at once (rings are unwrapped)."""
        K, si, old = self.K, self.si, self.cap
        slot_i = np.zeros((capacity, K.N_RI), dtype=np.int64)
        slot_i[:old] = self.slot_i
        slot_f = np.zeros((capacity, K.N_RF))
        slot_f[:old] = self.slot_f
        q = np.zeros((K.N_Q, capacity), dtype=np.int64)
        for row in (K.Q_SERVED, K.Q_JOIN, K.Q_PLAN_SLOT, K.Q_PLAN_TOK):
            q[row, :old] = self.q[row]
        for row, head, length in ((K.Q_PREFILL, K.PQ_HEAD, K.PQ_LEN), (K.Q_WAIT, K.WQ_HEAD, K.WQ_LEN)):
            n = si[length]
            if n:
                q[row, :n] = self.q[row, (si[head] + np.arange(n)) % old]
            si[head] = 0
        free = si[K.N_FREE]
        q[K.Q_FREE, :free] = self.q[K.Q_FREE, :free]
        q[K.Q_FREE, free : free + capacity - old] = np.arange(capacity - 1, old - 1, -1)
        si[K.N_FREE] = free + capacity - old
        heap = np.zeros((4, 2 * capacity), dtype=np.int64)
        heap[:, : si[K.HP_LEN]] = self.heap[:, : si[K.HP_LEN]]
        self.slot_i, self.slot_f, self.q, self.heap, self.cap = slot_i, slot_f, q, heap, capacity

    def _kernel_args(self) -> tuple[np.ndarray, ...]:
        return (self.si, self.sf, self.slot_i, self.slot_f, self.q, self.heap, self.pol, self.t_table,
                self.ends, self.targets, self.bins, self.out_f, self.out_i, self.itl)

    def call(self, arrivals: Chunk, on_room: Callable[[], None]) -> int:
        """Run the kernel on ``arrivals`` (ids, arrival_ms, prefill, decode) until it needs the
        caller: slots are grown and output room made (``on_room`` drains) here; returns the code."""
        K = self.K
        ids, arrival_ms, prefill, decode = arrivals
        while True:
            code = K.run(*self.kernel_args, arrival_ms, prefill, decode, ids)
            if code == K.NEED_ROOM:
                on_room()
            elif code == K.NEED_SLOTS:
                self.grow(2 * self.cap)
                self.kernel_args = self._kernel_args()
            elif code == K.BAD_BATCH_TIME:
                n = int(self.si[K.ERR_N])
                value = self.batch_time(n)  # re-raises the model's own error, if it has one
                raise ConfigError("batch-time", value, f"t({n}) must be a positive finite time")
            else:
                return code

    def stop(self, horizon_ms: float) -> None:
        """The kernel's ``stop`` at the horizon (the output buffers were drained before)."""
        args = self.kernel_args
        self.K.stop(*args[:7], *args[8:], horizon_ms)

    def next_times(self) -> tuple[float, float]:
        """(end of the running batch run, immediate start): each inf when there is none."""
        K, si, sf = self.K, self.si, self.sf
        if si[K.ACTIVE]:
            return float(sf[K.BATCH_END]), math.inf
        if si[K.IN_SYSTEM] and not si[K.BLOCKED]:
            return math.inf, float(sf[K.NOW])
        return math.inf, math.inf


def _drain(state: _State, recorder: Recorder) -> None:
    """Move finished requests and inter-token latencies into the recorder."""
    K, si = state.K, state.si
    n = int(si[K.N_OUT])
    if n:
        recorder.requests_done(
            state.out_i[:n, 1], state.out_f[:n, 0], state.out_f[:n, 1], state.out_f[:n, 2],
            state.out_i[:n, 2], state.out_i[:n, 3],
        )
        si[K.N_OUT] = 0
    g = int(si[K.N_ITL])
    if g:
        values, inverse = np.unique(state.itl[0, :g], return_inverse=True)
        counts = np.bincount(inverse, weights=state.itl[1, :g])
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            recorder.itl.add(value, int(count))
        si[K.N_ITL] = 0


_INT_TOTALS = (
    ("backlog_tokens", "BACKLOG"), ("in_system", "IN_SYSTEM"), ("arrivals", "ARRIVALS"),
    ("arrived_tokens", "ARRIVED_TOKENS"), ("batches_started", "BATCHES"),
    ("batch_tokens", "BATCH_TOKENS"), ("batch_requests", "BATCH_REQUESTS"),
    ("batch_prefill", "BATCH_PREFILL"), ("batch_decode", "BATCH_DECODE"),
    ("wc_target", "WC_TARGET"), ("wc_violations", "WC_VIOL"), ("wc_wasted", "WC_WASTED"),
)
_FLOAT_TOTALS = (
    ("last_ms", "REC_LAST"), ("backlog_area", "BACKLOG_AREA"), ("in_system_area", "IN_SYSTEM_AREA"),
    ("last_arrival_ms", "LAST_ARRIVAL"), ("busy_ms", "BUSY"), ("stall_ms", "STALL"),
)
"""Recorder field -> the kernel's scalar holding it (same meaning)."""


def _load_recorder(state: _State, recorder: Recorder) -> None:
    """Copy the kernel's integrals and counters into the recorder."""
    K, si, sf = state.K, state.si, state.sf
    for field, index in _INT_TOTALS:
        setattr(recorder, field, int(si[getattr(K, index)]))
    for field, index in _FLOAT_TOTALS:
        setattr(recorder, field, float(sf[getattr(K, index)]))
    recorder.backlog_bins.sums[:] = state.bins
    recorder.backlog_bins.width_ms = float(sf[K.BIN_WIDTH])


def run(
    chunks: Iterable[Chunk],
    policy: KFCFS | VLLMChunked,
    batch_time: BatchTime,
    budget: int,
    k_max: int | None,
    recorder: Recorder,
    horizon_for: Callable[[float], float],
    progress: Callable[[int], None] | None = None,
    keep_pending: bool = True,
) -> Outcome:
    """Run arrivals through one engine with the compiled loop; fills ``recorder``.

    ``horizon_for(last_arrival_ms)`` gives the horizon once the arrivals are over (the same rule
    as ``simulate``'s Python loop).
    """
    from llmqueue import kernel as K

    state = _State(policy, batch_time, budget, k_max)
    si, sf = state.si, state.sf
    source: Iterator[Chunk] = iter(chunks)
    current = next(source, _NO_ARRIVALS)
    while True:
        upcoming = next(source, None)
        final = upcoming is None
        ids, arrival_ms, prefill, decode = (
            _plain(a, t) for a, t in zip(current, (np.int64, np.float64, np.int64, np.int64), strict=True)
        )
        si[K.A_POS] = 0
        si[K.A_FINAL] = int(final)
        if final:
            last = float(arrival_ms[-1]) if arrival_ms.size else float(sf[K.LAST_ARRIVAL])
            sf[K.HORIZON] = horizon_for(last)
        code = state.call((ids, arrival_ms, prefill, decode), lambda: _drain(state, recorder))
        if progress is not None:
            progress(int(si[K.ARRIVALS]))
        if upcoming is None or code != K.NEED_ARRIVALS:
            break
        current = upcoming

    _drain(state, recorder)
    horizon = float(sf[K.HORIZON])
    t_next = min(state.next_times())
    cut = math.isfinite(t_next) and t_next >= horizon
    if cut:
        state.stop(horizon)
        _drain(state, recorder)
    _load_recorder(state, recorder)
    end_ms = horizon if cut else max(float(sf[K.NOW]), float(sf[K.LAST_ARRIVAL]))
    return Outcome(
        end_ms=end_ms,
        cut=cut,
        blocked_since_ms=float(sf[K.BLOCKED_SINCE]) if si[K.BLOCKED] else None,
        in_system=int(si[K.IN_SYSTEM]),
        pending=_pending(state) if keep_pending else (),
    )


def _plain(values: np.ndarray, dtype: type) -> np.ndarray:
    """A writable contiguous array of ``dtype``: one compiled signature for every source (numba
    compiles a new one for read-only or strided arrays)."""
    out = np.ascontiguousarray(values, dtype=dtype)
    return out if out.flags.writeable else out.copy()


def _pending(state: _State) -> tuple[RequestRecord, ...]:
    """Records of the requests still present (first token if reached, no finish), by arrival."""
    K, si = state.K, state.si
    free = np.zeros(state.cap, dtype=bool)
    free[state.q[K.Q_FREE, : si[K.N_FREE]]] = True
    slots = np.flatnonzero(~free)
    slots = slots[np.argsort(state.slot_i[slots, K.R_SEQ], kind="stable")]
    return tuple(
        RequestRecord(
            id=int(state.slot_i[s, K.R_ID]),
            arrival_ms=float(state.slot_f[s, K.R_ARR]),
            first_token_ms=float(state.slot_f[s, K.R_FIRST]),
            finish_ms=math.nan,
            prefill_tokens=int(state.slot_i[s, K.R_PRE]),
            decode_tokens=int(state.slot_i[s, K.R_DEC]),
        )
        for s in slots.tolist()
    )


class KernelEngine:
    """One engine of a network run by the compiled loop, with the engine interface the network
    simulator uses (``submit``, ``next_event_ms``, ``end_batch``/``start_at`` at a shared
    instant, ``stop``), plus ``advance``: run alone up to a time limit, stopping after a batch that
    finished requests so they are routed before the next batch starts.

    Arrivals handed in wait in a list until the next call; the kernel takes them in time order,
    exactly as ``FastEngine.submit`` would have at that moment (the engine's state does not change
    in between). Results equal those of ``FastEngine`` (tests/test_network.py).
    """

    def __init__(self, policy: KFCFS | VLLMChunked, batch_time: BatchTime, budget: int,
                 k_max: int | None, recorder: Recorder) -> None:
        from llmqueue import kernel as K

        self.K = K
        self.state = _State(policy, batch_time, budget, k_max)
        self.state.si[K.NET] = 1
        self.state.si[K.A_FINAL] = 1
        self.recorder = recorder
        self._times: list[float] = []
        self._prefill: list[int] = []
        self._decode: list[int] = []
        self._ids: list[int] = []
        self._stopped = False
        self._read = 0  # output records already handed to the router (drained only when full)
        finite = self.state.t_table[1:][np.isfinite(self.state.t_table[1:])]
        self._t_min = float(finite.min()) if finite.size else math.inf
        # the kernel's next batch end and immediate start, cached as floats after every call
        # (the network loop asks for them at every event)
        self._end, self._start = math.inf, math.inf

    # -- the engine interface ---------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Hand in an arrival (taken by the kernel at its next call)."""
        self._times.append(request.arrival_ms)
        self._prefill.append(request.prefill_tokens)
        self._decode.append(request.decode_tokens)
        self._ids.append(request.id)

    def next_event_ms(self) -> float:
        """The engine's next event: a batch end, an immediate start, a pending arrival, or inf."""
        t = self._end if self._end < self._start else self._start
        if self._times and self._times[0] < t:
            return self._times[0]
        return t

    @property
    def now_ms(self) -> float:
        return float(self.state.sf[self.K.NOW])

    @property
    def in_system(self) -> int:
        return int(self.state.si[self.K.IN_SYSTEM])

    @property
    def blocked_since_ms(self) -> float | None:
        K = self.K
        return float(self.state.sf[K.BLOCKED_SINCE]) if self.state.si[K.BLOCKED] else None

    def completion_bound_ms(self) -> float:
        """No request can finish here before this time: completions happen only where a run of
        repeats ends naturally. A pending arrival may cut the current run, but the part it keeps
        finishes nothing, and a new run lasts at least min t(n)."""
        start = self._start
        if self._times and self._times[0] < start:
            start = self._times[0]
        start += self._t_min
        return self._end if self._end < start else start

    def ends_at(self, t_ms: float) -> bool:
        """Whether a batch run ends exactly at ``t_ms``."""
        return self._end == t_ms

    def advance(self, limit_ms: float) -> tuple[list[int], float]:
        """Run events before ``limit_ms``; stop early after a batch that finished requests.
        Returns the finished requests' ids and the time they finished."""
        return self._call(math.nextafter(limit_ms, -math.inf), end_only=False, start_only=False)

    def end_batch(self) -> list[int]:
        """At a shared instant (this engine is due now): end the batch due now (if any), without
        starting the next."""
        return self._call(self.next_event_ms(), end_only=True, start_only=False)[0]

    def start_at(self, t_ms: float) -> None:
        """At the shared instant ``t_ms``: take the arrivals due then and start the next batch
        (nothing later: a batch ending after the instant is another event)."""
        finished, _ = self._call(t_ms, end_only=False, start_only=True)
        assert not finished, "start_at ended a batch"

    def stop(self, horizon_ms: float) -> None:
        """End at the horizon: book what ends before it and count the batch running."""
        if self._stopped:
            return
        self._stopped = True
        self.state.stop(horizon_ms)
        self._take()
        self._flush()
        self._end, self._start = self.state.next_times()

    def finish(self) -> None:
        """Move the kernel's totals into the recorder (before ``Recorder.finish``)."""
        self._take()
        self._flush()
        _load_recorder(self.state, self.recorder)

    # -- the call -----------------------------------------------------------------------------
    def _call(self, limit_ms: float, *, end_only: bool, start_only: bool) -> tuple[list[int], float]:
        K, state = self.K, self.state
        si, sf = state.si, state.sf
        sf[K.LIMIT] = limit_ms
        si[K.END_ONLY] = int(end_only)
        si[K.START_ONLY] = int(start_only)
        n = len(self._times)
        if n:
            ids = np.array(self._ids, dtype=np.int64)
            arrival_ms = np.array(self._times, dtype=np.float64)
            prefill = np.array(self._prefill, dtype=np.int64)
            decode = np.array(self._decode, dtype=np.int64)
        else:
            ids, arrival_ms, prefill, decode = _NO_ARRIVALS
        si[K.A_POS] = 0
        finished: list[int] = []

        def drain() -> None:
            finished.extend(self._take())
            self._flush()

        state.call((ids, arrival_ms, prefill, decode), drain)
        taken = int(si[K.A_POS])
        if taken:
            del self._times[:taken], self._prefill[:taken], self._decode[:taken], self._ids[:taken]
        finished.extend(self._take())
        self._end, self._start = state.next_times()
        return finished, float(sf[K.NOW])

    def _take(self) -> list[int]:
        """Ids of the finished requests not yet handed out (they stay buffered for the recorder)."""
        count = int(self.state.si[self.K.N_OUT])
        if count == self._read:
            return []
        out = self.state.out_i[self._read:count, 1].tolist()
        self._read = count
        return out

    def _flush(self) -> None:
        """Move the buffered records and inter-token latencies into the recorder."""
        _drain(self.state, self.recorder)
        self._read = 0
