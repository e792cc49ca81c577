"""Driver of the compiled event loop (``llmqueue.engines.kernel``): feeds arrivals, collects outputs.

``simulate(..., engine="auto")`` uses it for the shipped policies (``KFCFS`` and ``VLLMChunked``
instances, not subclasses) when numba is installed (``pip install 'llmqueue[fast]'``), with or
without a KV cache; otherwise the pure-Python fast engine runs, with the same results. Arrivals
come in numpy chunks and finished requests leave in numpy chunks, so the loop never builds a
Python object per request.

In a network, ``KernelEngine`` gives one engine the interface of the Python network loop
(``PolicyEngine`` one whose policy is class priority or max-pressure: ``llmqueue.engines.polkernel``),
and ``NetworkLoop`` runs a network whose engines are all compiled with the routing compiled as well
(engines without a KV cache only: the network simulator runs those with one on the fast engine).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.util import find_spec
from typing import NoReturn

import numpy as np

from llmqueue.engines.metrics import Recorder, RequestRecord, Totals
from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import BatchTime
from llmqueue.model.memory import KVCache
from llmqueue.model.network import EXIT, ROUTER_NAMES, Network
from llmqueue.model.workload import CHUNK_SIZE, Request
from llmqueue.policies.fcfs import KFCFS, VLLMChunked
from llmqueue.policies.network import ClassPriority, MaxPressure

MAX_BUDGET = 1 << 17
"""Largest token budget the compiled loop takes (it tabulates t(n) for n = 1..budget)."""

SLOTTED_MARGIN = 64
"""Prompts and waiting decoders kept in slots beyond the depth a step can reach (the rest of each
queue is compact records: ``llmqueue.engines.kernel``, "Compact tails"). Any value >= 0 gives the same
results; tests lower it to 0 to move requests in and out of the compact tails often."""

Chunk = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""Arrivals in time order: (ids int64, arrival_ms float64, prefill int64, decode int64)."""
_NO_ARRIVALS: Chunk = (np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))


@cache
def available() -> bool:
    """Whether numba is installed (the ``fast`` extra; looked up once per process)."""
    return find_spec("numba") is not None


def needs_compiling() -> bool:
    """Whether the next compiled run compiles the event loop first (a minute or two on a slow
    machine): numba has no up-to-date on-disk cache of it and this process has not compiled it.
    Best effort (it reads where numba keeps its cache); False without numba."""
    if not available():
        return False
    from llmqueue.engines import kernel  # imports numba: only when a compiled run is about to happen

    if kernel.run.signatures:
        return False
    try:
        index = kernel.run._cache._cache_file._index_path
        return not os.path.exists(index) or os.path.getmtime(index) < os.path.getmtime(kernel.__file__)
    except (AttributeError, OSError):
        return True


def supports(policy: object, budget: int, keep_batches: bool) -> bool:
    """Whether the compiled loop can run this setting (else the Python fast engine does)."""
    return (
        type(policy) in (KFCFS, VLLMChunked)
        and not keep_batches
        and isinstance(budget, int)
        and 1 <= budget <= MAX_BUDGET
        and available()
    )


def supports_network_policy(policy: object, budget: int) -> bool:
    """Whether the compiled network loop can run this network policy (``ClassPriority`` or
    ``MaxPressure`` instances, not subclasses: ``llmqueue.engines.polkernel``) on an engine of a
    network without a KV cache."""
    return (
        type(policy) in (ClassPriority, MaxPressure)
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


def _policy_params(policy: KFCFS | VLLMChunked, budget: int, k_max: int | None,
                   memory: KVCache | None = None, margin: int = 0) -> tuple[int, ...]:
    """The kernel's fixed parameters (a ``kernel.Policy``): the policy's knobs, the batch limits, the
    KV cache and the slotted margin."""
    from llmqueue.engines import kernel as K

    knobs = dict(kind=K.KIND_VLLM_CHUNKED, decode_first=0, mixed=0, chunked=0, kp=0, kd=0)
    if isinstance(policy, KFCFS):
        knobs = dict(kind=K.KIND_KFCFS, decode_first=int(policy.priority == "decode"),
                     mixed=int(policy.mixed), chunked=int(policy.chunked),
                     kp=0 if policy.k_p is None else int(policy.k_p),
                     kd=0 if policy.k_d is None else int(policy.k_d))
    return K.Policy(**knobs, budget=int(budget), kmax=0 if k_max is None else int(k_max),
                    block=0 if memory is None else int(memory.block_tokens),
                    kv_total=0 if memory is None else int(memory.total_blocks),
                    kv_floor=0 if memory is None else int(memory.watermark_blocks), margin=int(margin))


def _batch_time_table(batch_time: BatchTime, budget: int) -> np.ndarray:
    """t(n) for n = 0..budget; NaN where the model fails (reported only if such a batch runs)."""
    table = np.full(budget + 1, math.nan)
    for n in range(1, budget + 1):
        try:
            table[n] = float(batch_time(n))
        except Exception:
            table[n] = math.nan
    return table


def _grown(a: np.ndarray, size: int, axis: int = 0) -> np.ndarray:
    """``a`` with ``size`` entries along ``axis`` (the old ones copied, the new ones zero)."""
    shape = list(a.shape)
    shape[axis] = size
    out = np.zeros(shape, dtype=a.dtype)
    out[tuple(slice(n) for n in a.shape)] = a
    return out


def _resized(a: np.ndarray, rows: int) -> np.ndarray:
    """``a`` with ``rows`` rows, the old ones kept and the new ones zero, resized in place: numpy
    reallocates the buffer, which for a large array remaps its pages instead of copying them, so
    the old and the new buffers do not coexist. Nothing may keep a view of ``a`` across this (the
    kernel's typed lists of a network are set again after growth)."""
    a.resize((rows, *a.shape[1:]), refcheck=False)
    return a


def _shift_rows(a: np.ndarray, lo: int, hi: int, by: int) -> None:
    """Move rows ``lo:hi`` of ``a`` to ``lo + by:hi + by``, from the end in blocks of at most ``by``
    rows (a block and its destination never overlap, so numpy needs no temporary copy)."""
    while hi > lo:
        start = max(lo, hi - by)
        a[start + by : hi + by] = a[start:hi]
        hi = start


def _free_list(free_list: np.ndarray, n_free: int, capacity: int) -> tuple[np.ndarray, int]:
    """A stack of free indices grown from ``free_list.size`` to ``capacity`` entries: the
    ``n_free`` free ones kept, the new indices pushed above them (the lowest on top). Returns
    the stack and its new length."""
    old = free_list.shape[0]
    out = np.zeros(capacity, dtype=np.int64)
    out[:n_free] = free_list[:n_free]
    out[n_free : n_free + capacity - old] = np.arange(capacity - 1, old - 1, -1)
    return out, n_free + capacity - old


class _State:
    """The kernel's arrays (see ``llmqueue.engines.kernel`` for the layout), growable.

    Memory: each request in a slot costs about 300 bytes (13 + 3 slot columns, 13 queue rows, 8 heap
    entries), each compact record 48 bytes (56 in a network). Slots are needed only near the head
    of the queues (about 3 budget + the margin, plus, with a KV cache, the requests holding blocks),
    so in overload the compact tails hold nearly everyone.
    """

    MIN_ROOM = 1 << 14
    """Least room of the output buffers (finished requests, inter-token latencies)."""
    START_SLOTS = 1024
    """Request slots at first."""
    START_RING = 1024
    """Records each compact tail holds at first."""
    SLOT_GROWTH = 1.5
    """Slots grow by this factor at least."""
    RING_GROWTH = 1.25
    """The compact tails grow by this factor at least (they hold nearly all of an unstable run's
    requests, so their slack is what counts)."""

    def __init__(self, policy: KFCFS | VLLMChunked, batch_time: BatchTime, budget: int,
                 k_max: int | None, memory: KVCache | None = None, network: bool = False) -> None:
        from llmqueue.engines import kernel as K

        self.K = K
        self.batch_time = batch_time
        block = 0 if memory is None else memory.block_tokens
        self.si = np.zeros(K.N_SI + 2 * block + 1, dtype=np.int64)  # KV tail: see kernel.KV
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
        self.grow(self.START_SLOTS)
        # compact tails (kernel, "Compact tails"): prompts, and waiting decoders (none with a KV cache)
        n_int = K.N_LZI + int(network)  # the network token (LZ_TOK) only in a network
        self.lp_i = np.zeros((self.START_RING, n_int), dtype=np.int64)
        self.lp_f = np.zeros((self.START_RING, K.N_LZF))
        waiting = 0 if memory is not None else self.START_RING
        self.lw_i = np.zeros((waiting, n_int), dtype=np.int64)
        self.lw_f = np.zeros((waiting, K.N_LZF))
        self.pol = _policy_params(policy, budget, k_max, memory, SLOTTED_MARGIN)
        if memory is not None:
            self.si[K.KV_FREE] = memory.total_blocks
        self.t_table = _batch_time_table(batch_time, budget)
        self.ends = np.zeros(K.MAX_REPEAT)
        self.targets = np.zeros(K.MAX_REPEAT, dtype=np.int64)
        self.bins = np.zeros(2048)
        # one step writes at most (served decoders + planned prompts + joiners + 4) <= 3 b + 4
        # records and ITL entries, so the kernel's "need room" always leaves room once drained
        room = max(self.MIN_ROOM, 4 * budget + 64)
        self.out_f = np.zeros((room, 3))
        self.out_i = np.zeros((room, 5), dtype=np.int64)  # slot, id, prefill, decode, token
        self.itl = np.zeros((2, room))
        self.kernel_state = self._kernel_state()

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` requests in slots (rings are unwrapped). One array at a time, each
        old one released before the next grows, and only what is in use is copied."""
        K, si, old = self.K, self.si, self.cap
        q = np.zeros((K.N_Q, capacity), dtype=np.int64)
        used = ((K.Q_SERVED, si[K.SV_LEN]), (K.Q_JOIN, si[K.JN_LEN]), (K.Q_PLAN_SLOT, si[K.PP_LEN]),
                (K.Q_PLAN_TOK, si[K.PP_LEN]), (K.Q_PLAN_C, si[K.PP_LEN]))  # the other rows: scratch
        for row, n in used:
            q[row, :n] = self.q[row, :n]
        for row, head, length in ((K.Q_PREFILL, K.PQ_HEAD, K.PQ_LEN), (K.Q_WAIT, K.WQ_HEAD, K.WQ_LEN)):
            n = si[length]
            if n:
                q[row, :n] = self.q[row, (si[head] + np.arange(n)) % old]
            si[head] = 0
        q[K.Q_FREE], si[K.N_FREE] = _free_list(self.q[K.Q_FREE], int(si[K.N_FREE]), capacity)
        self.q = q
        heap = np.zeros((4, 2 * capacity), dtype=np.int64)
        heap[:, : si[K.HP_LEN]] = self.heap[:, : si[K.HP_LEN]]
        self.heap = heap
        self.slot_i = _resized(self.slot_i, capacity)
        self.slot_f = _resized(self.slot_f, capacity)
        self.cap = capacity

    def _grow_ring(self, name: str, head: int, length: int, capacity: int) -> None:
        """A compact tail (``lp`` or ``lw``) with room for ``capacity`` records, resized in place;
        a ring that wraps has its records from the head to the old end moved to the new end."""
        si = self.si
        ints, floats = getattr(self, name + "_i"), getattr(self, name + "_f")
        h, n, old = int(si[head]), int(si[length]), ints.shape[0]
        for a in (ints, floats):
            _resized(a, capacity)
            if h + n > old:
                _shift_rows(a, h, old, capacity - old)
        if h + n > old:
            si[head] = h + capacity - old

    def more_slots(self) -> None:
        """Grow what the kernel found short (it returned ``NEED_SLOTS``; ``si[WANT_*]`` say what):
        the slots by ``SLOT_GROWTH``, a compact tail by ``RING_GROWTH``, or more if asked."""
        K, si = self.K, self.si
        short = int(si[K.WANT_FREE] - si[K.N_FREE])
        if short > 0:
            self.grow(max(self.cap + short, math.ceil(self.cap * self.SLOT_GROWTH)))
        for name, head, length, want in (("lp", K.LP_HEAD, K.LP_LEN, K.WANT_LP),
                                         ("lw", K.LW_HEAD, K.LW_LEN, K.WANT_LW)):
            rows = getattr(self, name + "_i").shape[0]
            if si[want] > rows:
                self._grow_ring(name, head, length,
                                max(int(si[want]), math.ceil(rows * self.RING_GROWTH)))
        si[K.WANT_FREE] = si[K.WANT_LP] = si[K.WANT_LW] = 0
        self.kernel_state = self._kernel_state()

    def _kernel_state(self) -> tuple[np.ndarray, ...]:
        """The record ``kernel.run`` and ``kernel.stop`` take: a ``kernel.EngineState`` of this
        object's arrays (its fields are named as the attributes here). Built again whenever an
        array is replaced."""
        K = self.K
        return K.EngineState(*(getattr(self, name) for name in K.EngineState._fields))

    def call(self, arrivals: Chunk, on_room: Callable[[], None], nodes: np.ndarray | None = None,
             counts: np.ndarray | None = None) -> int:
        """Run the kernel on ``arrivals`` (ids, arrival_ms, prefill, decode) until it needs the
        caller: slots are grown and output room made (``on_room`` drains) here; returns the code.
        (``nodes``, ``counts``: what a network policy engine reads, ``_PolicyState.call``.)"""
        return self._drive(self.K.run, arrivals, on_room)

    def _drive(self, run: Callable[..., int], arrivals: Chunk, on_room: Callable[[], None],
               *extra: np.ndarray) -> int:
        """The loop of ``call``: ``run`` (a kernel's) on this object's current arrays, the
        arrivals and ``extra``, until it returns a code the caller handles."""
        K = self.K
        ids, arrival_ms, prefill, decode = arrivals
        batch = K.Arrivals(arrival_ms, prefill, decode, ids, ids)
        while True:
            code = run(self.kernel_state, batch, *extra)
            if code == K.NEED_ROOM:
                on_room()
            elif code == K.NEED_SLOTS:
                self.more_slots()
            elif code == K.BAD_BATCH_TIME:
                self.bad_batch_time()
            else:
                return code

    def bad_batch_time(self) -> NoReturn:
        """Raise for the batch size the kernel found no valid time for (``BAD_BATCH_TIME``)."""
        n = int(self.si[self.K.ERR_N])
        value = self.batch_time(n)  # re-raises the model's own error, if it has one
        raise ConfigError("batch-time", value, f"t({n}) must be a positive finite time")

    def stop(self, horizon_ms: float) -> None:
        """The kernel's ``stop`` at the horizon (the output buffers were drained before)."""
        self.K.stop(self.kernel_state, horizon_ms)

    def next_times(self) -> tuple[float, float]:
        """(end of the running batch run, immediate start): each inf when there is none."""
        K, si, sf = self.K, self.si, self.sf
        if si[K.ACTIVE]:
            return float(sf[K.BATCH_END]), math.inf
        if si[K.IN_SYSTEM] and not si[K.BLOCKED]:
            return math.inf, float(sf[K.NOW])
        return math.inf, math.inf


class _PolicyState:
    """The arrays of one network-policy engine (``llmqueue.engines.polkernel``), growable: request
    slots, free slots and the batch's plan, the groups' lists and tables, and the kernel's scalar
    and output arrays (the same layout: the network loop and ``_drain`` read them as a kernel's).

    Groups: class priority has one per rank (``ClassPriority.rank`` of each buffer); max-pressure
    one per buffer of the network, with its size and its routes (``MaxPressure.sizes``,
    ``routes``) against the network's buffer counts by route node (``route_tables``' numbering; a
    buffer outside the network reads the last count, always 0). The arrays a kernel engine has
    and this one does not use (``heap``, ``ends``, ``targets``, the compact tails) are empty, so
    the network loop keeps one typed list per array for both kinds of engine."""

    START_SLOTS = 1024
    """Request slots at first (grown by ``_State.SLOT_GROWTH`` when short)."""

    def __init__(self, policy: ClassPriority | MaxPressure, batch_time: BatchTime, budget: int,
                 k_max: int | None, net: Network) -> None:
        from llmqueue.engines import kernel as K
        from llmqueue.engines import polkernel as P

        self.K, self.P = K, P
        self.batch_time = batch_time
        self.si = np.zeros(K.N_SI + 1, dtype=np.int64)  # the kernel's length without a KV cache
        self.sf = np.zeros(K.N_SF)
        self.sf[K.BATCH_END] = math.inf
        self.sf[K.HORIZON] = math.inf
        self.sf[K.BIN_WIDTH] = 1.0
        self.si[K.NET] = 1
        self.si[K.A_FINAL] = 1
        self.cap = 0
        self.slot_i = np.zeros((0, P.N_SCOL), dtype=np.int64)
        self.slot_f = np.zeros((0, P.N_SFCOL))
        self.q = np.zeros((P.N_PQ, 0), dtype=np.int64)
        self.grow(self.START_SLOTS)
        kind = P.KIND_PRIORITY if isinstance(policy, ClassPriority) else P.KIND_PRESSURE
        self.pol = K.Policy(kind=kind, decode_first=0, mixed=0, chunked=0, kp=0, kd=0, budget=int(budget),
                            kmax=0 if k_max is None else int(k_max), block=0, kv_total=0, kv_floor=0,
                            margin=0)
        self.t_table = _batch_time_table(batch_time, budget)
        self.bins = np.zeros(2048)
        room = max(_State.MIN_ROOM, 4 * budget + 64)
        self.out_f = np.zeros((room, 3))
        self.out_i = np.zeros((room, 5), dtype=np.int64)
        self.itl = np.zeros((2, room))
        self.heap = np.zeros((4, 0), dtype=np.int64)
        self.ends = np.zeros(0)
        self.targets = np.zeros(0, dtype=np.int64)
        self.lp_i = self.lw_i = np.zeros((0, K.N_LZI + 1), dtype=np.int64)
        self.lp_f = self.lw_f = np.zeros((0, K.N_LZF))
        self._groups(policy, net)
        self.kernel_state = self._kernel_state()

    def _groups(self, policy: ClassPriority | MaxPressure, net: Network) -> None:
        """The group tables of this engine's policy (see the class docstring)."""
        P = self.P
        keys = node_keys(net)
        buffers = {f"{c}.{nid}": i for i, (c, nid) in enumerate(keys)
                   if net.classes[c].nodes[nid].kind == "visit"}
        self.node_grp = np.full(len(keys), -1, dtype=np.int64)
        route_node: list[int] = []
        route_prob: list[float] = []
        if isinstance(policy, ClassPriority):
            rows = len(policy.order) + 1
            grp_i = np.zeros((rows, P.N_GI), dtype=np.int64)
            grp_f = np.zeros((rows, P.N_GF))
            for name, i in buffers.items():
                self.node_grp[i] = policy.rank(name)
        else:
            # one group per buffer of the network (not only this engine's: which buffers reach
            # an engine is the routing's business; a group without requests costs a test per batch)
            grp_i = np.zeros((len(buffers), P.N_GI), dtype=np.int64)
            grp_f = np.zeros((len(buffers), P.N_GF))
            for g, (name, i) in enumerate(buffers.items()):
                self.node_grp[i] = g
                grp_i[g, P.G_NODE] = i
                size = policy.sizes.get(name)
                grp_i[g, P.G_SIZED] = int(size is not None)
                grp_f[g, P.GF_SIZE] = 1.0 if size is None else size
                routes = policy.routes.get(name, ())
                grp_i[g, P.G_R0], grp_i[g, P.G_RN] = len(route_node), len(routes)
                for target, prob in routes:
                    route_node.append(buffers.get(target, len(keys)))  # len(keys): always 0
                    route_prob.append(prob)
        grp_i[:, P.G_HEAD : P.G_HEAD + 3] = -1
        grp_i[:, P.G_TAIL : P.G_TAIL + 3] = -1
        grp_i[:, P.G_NEUMAIER] = int(sys.version_info >= (3, 12))  # how sum() adds floats
        self.grp_i, self.grp_f = grp_i, grp_f
        self.route_node = np.array(route_node, dtype=np.int64)
        self.route_prob = np.array(route_prob, dtype=np.float64)
        self.node_index = buffers  # buffer name -> its node (requests handed in from Python)

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` requests: the slots resized in place, the new ones free."""
        P, K, si = self.P, self.K, self.si
        q = np.zeros((P.N_PQ, capacity), dtype=np.int64)
        q[:, : self.cap] = self.q
        q[P.Q_FREE], si[K.N_FREE] = _free_list(self.q[P.Q_FREE], int(si[K.N_FREE]), capacity)
        self.q = q
        self.slot_i = _resized(self.slot_i, capacity)
        self.slot_f = _resized(self.slot_f, capacity)
        self.cap = capacity

    def more_slots(self) -> None:
        """Grow the slots (the engine returned ``NEED_SLOTS``)."""
        self.grow(max(self.cap + 1, math.ceil(self.cap * _State.SLOT_GROWTH)))
        self.si[self.K.WANT_FREE] = 0
        self.kernel_state = self._kernel_state()

    def _kernel_state(self) -> tuple[np.ndarray, ...]:
        """The record ``polkernel.run`` takes (built again whenever an array is replaced)."""
        P = self.P
        return P.PolicyState(*(getattr(self, name) for name in P.PolicyState._fields))

    def call(self, arrivals: Chunk, on_room: Callable[[], None], nodes: np.ndarray | None = None,
             counts: np.ndarray | None = None) -> int:
        """``_State.call`` for this engine: ``nodes`` are the arrivals' buffers (route nodes),
        ``counts`` the network's requests per buffer (max-pressure)."""
        assert nodes is not None and counts is not None
        return self._drive(self.P.run, arrivals, on_room, nodes, counts)

    _drive = _State._drive
    bad_batch_time = _State.bad_batch_time
    next_times = _State.next_times

    def stop(self, horizon_ms: float) -> None:
        """Nothing to book: each batch was booked when it started (as the reference engine)."""



def _drain(state: _State | _PolicyState, recorder: Recorder) -> None:
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


def _load_recorder(state: _State | _PolicyState, recorder: Recorder) -> None:
    """Hand the kernel's integrals and counters to the recorder, as one ``Totals`` record (each
    kernel scalar named once, next to the field it fills), with its backlog bins."""
    K, si, sf = state.K, state.si, state.sf
    totals = Totals(
        last_ms=float(sf[K.REC_LAST]),
        backlog_tokens=int(si[K.BACKLOG]),
        in_system=int(si[K.IN_SYSTEM]),
        backlog_area=float(sf[K.BACKLOG_AREA]),
        in_system_area=float(sf[K.IN_SYSTEM_AREA]),
        arrivals=int(si[K.ARRIVALS]),
        arrived_tokens=int(si[K.ARRIVED_TOKENS]),
        last_arrival_ms=float(sf[K.LAST_ARRIVAL]),
        batches_started=int(si[K.BATCHES]),
        batch_tokens=int(si[K.BATCH_TOKENS]),
        batch_requests=int(si[K.BATCH_REQUESTS]),
        batch_prefill=int(si[K.BATCH_PREFILL]),
        batch_decode=int(si[K.BATCH_DECODE]),
        busy_ms=float(sf[K.BUSY]),
        wc_violations=int(si[K.WC_VIOL]),
        wc_wasted=int(si[K.WC_WASTED]),
        wc_target=int(si[K.WC_TARGET]),
        stall_ms=float(sf[K.STALL]),
        preemptions=int(si[K.PREEMPTIONS]),
        recomputed_tokens=int(si[K.RECOMPUTED]),
        rejected_requests=int(si[K.REJECTED]),
        kv_peak=float(sf[K.KV_PEAK]),
        kv_sum=float(sf[K.KV_SUM]),
        kv_batches=int(si[K.KV_BATCHES]),
    )
    recorder.load(totals, state.bins, float(sf[K.BIN_WIDTH]))


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
    memory: KVCache | None = None,
) -> Outcome:
    """Run arrivals through one engine with the compiled loop; fills ``recorder``.

    ``horizon_for(last_arrival_ms)`` gives the horizon once the arrivals are over (the same rule
    as ``simulate``'s Python loop). ``memory``: the engine's KV cache (None: unlimited).
    """
    from llmqueue.engines import kernel as K

    state = _State(policy, batch_time, budget, k_max, memory=memory)
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
            sf[K.HORIZON] = horizon_for(_last_admitted(arrival_ms, prefill, decode, memory,
                                                       float(sf[K.LAST_ARRIVAL])))
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
        recorder.cut(horizon, state.next_times()[0])  # the running batch's end: busy only to the horizon
    _load_recorder(state, recorder)
    end_ms = horizon if cut else max(float(sf[K.NOW]), float(sf[K.LAST_ARRIVAL]))
    return Outcome(
        end_ms=end_ms,
        cut=cut,
        blocked_since_ms=float(sf[K.BLOCKED_SINCE]) if si[K.BLOCKED] else None,
        in_system=int(si[K.IN_SYSTEM]),
        pending=_pending(state) if keep_pending else (),
    )


def _last_admitted(arrival_ms: np.ndarray, prefill: np.ndarray, decode: np.ndarray,
                   memory: KVCache | None, before: float) -> float:
    """The last arrival of the final chunk that the engine takes in (``before`` if none): the
    horizon counts from it, as from ``Totals.last_arrival_ms`` (a refused request is no
    arrival)."""
    if memory is not None and arrival_ms.size:
        blocks = -(-(prefill + decode) // memory.block_tokens)
        admitted = np.flatnonzero(blocks <= memory.total_blocks - memory.watermark_blocks)
        arrival_ms = arrival_ms[admitted]
    return float(arrival_ms[-1]) if arrival_ms.size else before


def _plain(values: np.ndarray, dtype: type) -> np.ndarray:
    """A writable contiguous array of ``dtype``: one compiled signature for every source (numba
    compiles a new one for read-only or strided arrays)."""
    out = np.ascontiguousarray(values, dtype=dtype)
    return out if out.flags.writeable else out.copy()


def _pending(state: _State) -> tuple[RequestRecord, ...]:
    """Records of the requests still present (first token if reached, no finish), by arrival: the
    requests in slots and those in the compact tails."""
    K, si = state.K, state.si
    free = np.zeros(state.cap, dtype=bool)
    free[state.q[K.Q_FREE, : si[K.N_FREE]]] = True
    slots = np.flatnonzero(~free)
    i, f = state.slot_i[slots], state.slot_f[slots]
    parts = [(i[:, K.R_SEQ], i[:, K.R_ID], f[:, K.R_ARR], f[:, K.R_FIRST], i[:, K.R_PRE], i[:, K.R_DEC])]
    for ints, floats, head, length in ((state.lp_i, state.lp_f, K.LP_HEAD, K.LP_LEN),
                                       (state.lw_i, state.lw_f, K.LW_HEAD, K.LW_LEN)):
        if si[length]:
            rows = (si[head] + np.arange(si[length])) % ints.shape[0]
            i, f = ints[rows], floats[rows]
            parts.append((i[:, K.LZ_SEQ], i[:, K.LZ_ID], f[:, K.LZ_ARR], f[:, K.LZ_FIRST],
                          i[:, K.LZ_PRE], i[:, K.LZ_DEC]))
    seq, ids, arrival, first, prefill, decode = (np.concatenate(c) for c in zip(*parts, strict=True))
    order = np.argsort(seq, kind="stable")
    return tuple(
        RequestRecord(id=int(r), arrival_ms=float(a), first_token_ms=float(t), finish_ms=math.nan,
                      prefill_tokens=int(p), decode_tokens=int(d))
        for r, a, t, p, d in zip(ids[order].tolist(), arrival[order].tolist(), first[order].tolist(),
                                 prefill[order].tolist(), decode[order].tolist(), strict=True)
    )


class KernelEngine:
    """One engine of a network run by the compiled loop, with the engine interface the network
    simulator uses (``llmqueue.engines.contract.EngineContract``: ``submit``, ``next_event_ms``,
    ``end_batch``/``start_at`` at a shared instant, ``stop``, ...), plus ``advance``: run alone
    up to a time limit, stopping after a batch that finished requests so they are routed before
    the next batch starts.

    Arrivals handed in wait in a list until the next call; the kernel takes them in time order,
    exactly as ``FastEngine.submit`` would have at that moment (the engine's state does not change
    in between). Results equal those of ``FastEngine`` (tests/test_network.py).
    """

    def __init__(self, policy: KFCFS | VLLMChunked, batch_time: BatchTime, budget: int,
                 k_max: int | None, recorder: Recorder) -> None:
        from llmqueue.engines import kernel as K

        self.K = K
        self.state = _State(policy, batch_time, budget, k_max, network=True)
        self.state.si[K.NET] = 1
        self.state.si[K.A_FINAL] = 1
        self.recorder = recorder
        self._times: list[float] = []
        self._prefill: list[int] = []
        self._decode: list[int] = []
        self._ids: list[int] = []
        self._nodes: list[int] = []  # each arrival's buffer (route node): read by PolicyEngine only
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
        self._nodes.append(self._node_of(request.cls))

    def _node_of(self, buffer: str) -> int:
        """The route node of a request's buffer (only network policies read it)."""
        return 0

    def _counts(self) -> np.ndarray | None:
        """The network's requests per buffer for the next call (only max-pressure reads them)."""
        return None

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
        self._hand_in()
        self.state.stop(horizon_ms)
        self._take()
        self._flush()
        self._end, self._start = self.state.next_times()

    def finish(self) -> None:
        """Move the kernel's totals into the recorder (before ``Recorder.finish``)."""
        self._hand_in()
        self._take()
        self._flush()
        _load_recorder(self.state, self.recorder)

    def _hand_in(self) -> None:
        """Give the kernel the arrivals still waiting here, and nothing else (no batch ends or
        starts): at the end of a run, an arrival at the horizon (no drain) counts as handed in,
        as in the Python engines, which book an arrival when it is submitted."""
        if self._times:
            finished, _ = self._call(-math.inf, end_only=False, start_only=False)
            assert not finished, "handing in arrivals ended a batch"

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
        nodes = np.array(self._nodes, dtype=np.int64)
        si[K.A_POS] = 0
        finished: list[int] = []

        def drain() -> None:
            finished.extend(self._take())
            self._flush()

        state.call((ids, arrival_ms, prefill, decode), drain, nodes, self._counts())
        taken = int(si[K.A_POS])
        if taken:
            del self._times[:taken], self._prefill[:taken], self._decode[:taken], self._ids[:taken]
            del self._nodes[:taken]
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


class PolicyEngine(KernelEngine):
    """A ``KernelEngine`` whose engine is a network policy's (``ClassPriority`` or ``MaxPressure``:
    ``llmqueue.engines.polkernel``, one batch per event), for an engine of ``net``. The same
    interface and call protocol; each arrival carries its buffer, and max-pressure reads the
    network's counts (``buffers``: ``_Run.counts`` when the routing runs in Python; the network
    loop keeps its own) and is woken (``wake``) when routing changed them. Results equal those of
    the reference engine with the same policy (tests/test_netpolicies_compiled.py)."""

    def __init__(self, policy: ClassPriority | MaxPressure, batch_time: BatchTime, budget: int,
                 k_max: int | None, recorder: Recorder, net: Network, buffers: Mapping[str, int]) -> None:
        from llmqueue.engines import kernel as K
        from llmqueue.engines import polkernel as P

        self.K, self.P = K, P
        self.state = _PolicyState(policy, batch_time, budget, k_max, net)  # type: ignore[assignment]
        self.pressure = isinstance(policy, MaxPressure)
        self.recorder = recorder
        self._times, self._prefill, self._decode, self._ids, self._nodes = [], [], [], [], []
        self._stopped = False
        self._read = 0
        finite = self.state.t_table[1:][np.isfinite(self.state.t_table[1:])]
        self._t_min = float(finite.min()) if finite.size else math.inf
        self._end, self._start = math.inf, math.inf
        self._buffers = buffers
        self._names = [f"{c}.{nid}" for c, nid in node_keys(net)]
        self._count_array = np.zeros(len(self._names) + 1, dtype=np.int64)

    def _node_of(self, buffer: str) -> int:
        node = self.state.node_index.get(buffer)  # type: ignore[attr-defined]
        if node is None:
            raise ConfigError("cls", buffer, "is no buffer of this network")
        return node

    def _counts(self) -> np.ndarray:
        """The network's counts by route node, read from ``buffers`` (0 where it has none)."""
        if self.pressure:
            buffers = self._buffers
            self._count_array[:-1] = [buffers.get(name, 0) for name in self._names]
        return self._count_array

    def completion_bound_ms(self) -> float:
        """How long another engine may run alone: a max-pressure engine reads the network's counts
        at each batch start, which another engine's finished requests change, so no later than its
        next event; class priority reads only its own requests (the kernel engine's bound)."""
        return self.next_event_ms() if self.pressure else super().completion_bound_ms()

    def wake(self, t_ms: float) -> None:
        """Engine.wake: a blocked engine asks its policy again at ``t_ms`` (max-pressure, after
        routing changed the counts)."""
        state = self.state
        self.P.wake(state.si, state.sf, float(t_ms))
        self._end, self._start = state.next_times()


# -- a whole network in the compiled loop ----------------------------------------------------------

DRAW_CHUNK = 1024
"""Values per draw of a route's random streams (as ``llmqueue.sim.network``'s Python routing draws)."""


@dataclass(frozen=True, slots=True)
class RouteTables:
    """A network's routes as the network loop's arrays (``llmqueue.engines.netkernel``).

    Nodes are numbered class by class (classes and node ids in sorted order); ``keys[i]`` is
    node ``i``'s (class, node id). A node's next targets and fork branches are slices of
    ``next_target``/``next_prob`` and ``branches`` (targets -1: exit). Pools are numbered in name
    order (``pools``); pool p's members are ``pool_members[pool_first[p]:][:pool_n[p]]`` (engine
    indices), its router ``pool_router[p]`` (``netkernel.R_*``). Prefill/decode pairs are numbered
    in name order (``pairs``): ``pair_side[q]`` holds each side's engine index or pool number
    (``netkernel.PR_*``, -1 for the other) and whether the link is shared, ``pair_link[q]`` the
    transfer time's fixed and per-token parts (``netkernel.PF_*``).
    """

    classes: tuple[str, ...]
    keys: tuple[tuple[str, str], ...]
    nodes: np.ndarray
    next_target: np.ndarray
    next_prob: np.ndarray
    branches: np.ndarray
    class_start: np.ndarray
    pools: tuple[str, ...] = ()
    pool_first: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pool_n: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pool_members: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    pool_router: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pool_kv: np.ndarray = dataclasses.field(default_factory=lambda: np.ones(1))
    pairs: tuple[str, ...] = ()
    pair_side: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 5), dtype=np.int64))
    pair_link: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 2)))


def node_keys(net: Network) -> tuple[tuple[str, str], ...]:
    """Every node of ``net`` as (class, node id), classes and node ids in sorted order: node ``i``
    of the route tables (a visit node's index also numbers its buffer)."""
    return tuple((c, nid) for c in sorted(net.classes) for nid in sorted(net.classes[c].nodes))


def route_tables(net: Network, engine_names: Sequence[str],
                 routers: Mapping[str, str] | None = None) -> RouteTables:
    """The routes of ``net`` for the network loop; engines are numbered as in ``engine_names``;
    ``routers``: pools' built-in router names when they differ from the file's."""
    from llmqueue.engines import netkernel as K

    classes = tuple(sorted(net.classes))
    keys = node_keys(net)
    index = {key: i for i, key in enumerate(keys)}
    engine_index = {name: i for i, name in enumerate(engine_names)}
    kinds = {"visit": K.KIND_VISIT, "fork": K.KIND_FORK, "join": K.KIND_JOIN}
    nodes = np.full((len(keys), K.N_ND), -1, dtype=np.int64)
    targets: list[int] = []
    probs: list[float] = []
    branches: list[int] = []
    for i, (cname, nid) in enumerate(keys):
        spec = net.classes[cname]
        node = spec.nodes[nid]
        row = nodes[i]
        row[K.ND_KIND] = kinds[node.kind]
        if node.kind == "visit" and node.engine in net.pairs:
            row[K.ND_PAIR] = sorted(net.pairs).index(node.engine)
        elif node.kind == "visit" and node.engine in net.pools:
            row[K.ND_POOL] = sorted(net.pools).index(node.engine)
        elif node.kind == "visit":
            row[K.ND_ENGINE] = engine_index[node.engine or ""]
        if node.kind == "fork":
            row[K.ND_JOIN] = index[(cname, spec.join_of(nid))]
        row[K.ND_NEXT0], row[K.ND_NEXT_N] = len(targets), len(node.next)
        for target, prob in node.next:
            targets.append(K.EXIT_NODE if target == EXIT else index[(cname, target)])
            probs.append(float(prob))
        row[K.ND_BR0], row[K.ND_BR_N] = len(branches), len(node.branches)
        branches.extend(index[(cname, b)] for b in node.branches)
    return RouteTables(
        classes=classes,
        keys=keys,
        nodes=nodes,
        next_target=np.array([*targets, K.EXIT_NODE], dtype=np.int64),  # never empty
        next_prob=np.array([*probs, 0.0]),
        branches=np.array([*branches, -1], dtype=np.int64),
        class_start=np.array([index[(c, net.classes[c].start)] for c in classes], dtype=np.int64),
        **_pool_tables(net, engine_index, routers or {}),
        **_pair_tables(net, engine_index),
    )


def _pair_tables(net: Network, engine_index: Mapping[str, int]) -> dict:
    """The pair fields of ``RouteTables``."""
    from llmqueue.engines import netkernel as K

    pairs = tuple(sorted(net.pairs))
    pools = sorted(net.pools)
    side = np.full((len(pairs), K.N_PR), -1, dtype=np.int64)
    link = np.zeros((len(pairs), K.N_PF))
    for q, name in enumerate(pairs):
        pair = net.pairs[name]
        for target, col in ((pair.prefill, K.PR_PRE_ENGINE), (pair.decode, K.PR_DEC_ENGINE)):
            if target in engine_index:
                side[q, col] = engine_index[target]
            else:
                side[q, col + 1] = pools.index(target)  # the pool column follows the engine's
        side[q, K.PR_SHARED] = int(pair.shared_link)
        link[q, K.PF_FIXED], link[q, K.PF_PER_TOKEN] = pair.fixed_ms, pair.per_token_ms
    assert (K.N_PR, K.N_PF) == (5, 2)  # RouteTables' defaults
    return {"pairs": pairs, "pair_side": side, "pair_link": link}


def _pool_tables(net: Network, engine_index: Mapping[str, int], routers: Mapping[str, str]) -> dict:
    """The pool fields of ``RouteTables``."""
    from llmqueue.engines import netkernel as K

    pools = tuple(sorted(net.pools))
    first, count, members, router, kv = [], [], [], [], []
    for name in pools:
        pool = net.pools[name]
        first.append(len(members))
        count.append(len(pool.members))
        router.append(ROUTER_NAMES.index(routers.get(name, pool.router)))
        for m in pool.members:
            members.append(engine_index[m])
            spec = net.engines[m]
            kv.append(float(spec.memory.capacity_tokens if spec.memory is not None else spec.budget))
    assert K.N_ND > K.ND_POOL
    return {"pools": pools, "pool_first": np.array(first, dtype=np.int64),
            "pool_n": np.array(count, dtype=np.int64),
            "pool_members": np.array([*members, -1], dtype=np.int64),  # never empty
            "pool_router": np.array(router, dtype=np.int64), "pool_kv": np.array([*kv, 1.0])}


def _typed_list(arrays: Iterable[np.ndarray]) -> object:
    """A numba typed list of ``arrays`` (all of one type), built by cached compiled helpers."""
    from llmqueue.engines import netkernel as K

    items = iter(arrays)
    out = K.list_of(next(items))
    for a in items:
        K.list_append(out, a)
    return out


@dataclass(frozen=True, slots=True)
class PairTotals:
    """One prefill/decode pair's counters after a network loop (what ``netsim._PairRun`` keeps)."""

    arrivals: int
    completed: int
    in_prefill: int
    in_transfer: int
    in_decode: int
    transfers_started: int
    transfers_finished: int
    link_free_ms: float
    wait_ms: float
    busy_ms: float


def _feed(recorder: Recorder, times: np.ndarray, sizes: np.ndarray) -> None:
    """``recorder.request_done`` for each finished pair visit in order (rows of (arrival, first
    token, finish) and (prompt, output tokens)), in blocks that end where one by one would fold
    its columns into histograms: so the folds, hence the sums, are those of the Python routing."""
    total = times.shape[0]
    at = 0
    while at < total:
        k = total - at
        if not recorder.keep_requests:
            k = min(k, max(1, recorder.exact_limit - len(recorder.done["id"])))
        rows = slice(at, at + k)
        recorder.requests_done(np.zeros(k, dtype=np.int64), times[rows, 0], times[rows, 1],
                               times[rows, 2], sizes[rows, 0], sizes[rows, 1])
        at += k


@dataclass(frozen=True, slots=True)
class ClassTotals:
    """One class's counters after a network loop (what ``netsim._Run`` keeps per class)."""

    arrivals: int
    done: int
    present: int
    area: float
    last_ms: float
    bins: np.ndarray
    bin_width_ms: float


class NetworkLoop:
    """A network run entirely in the compiled loop (``llmqueue.engines.netkernel.net_run``): the engines (each
    a ``KernelEngine``, whose arrays the loop works on in place) and the routing between them.

    Python only feeds it: the next chunk of a random stream or of a class's arrivals, more room
    (engine slots, tokens, fork frames, pending arrivals, KV transfers in flight), draining engine
    outputs into their recorders, finished requests' latencies into ``latency`` and finished pair
    visits into their pairs' recorders, and the horizon once arrivals end. The random streams are
    those of the Python routing (chunks of ``DRAW_CHUNK`` values from
    the same sources), consumed in the same order, so the run is the same.

    The engines' scalar arrays (``si``, ``sf``) become rows of two stacked arrays here, so the
    loop reads every engine's next event without building array views. After ``run``, the engines
    are left as if the Python loop had driven them (``KernelEngine``'s pending arrivals and cached
    times synced), ready for ``stop`` and ``finish``; per-class counters: ``class_totals``.
    Memory: the pools (tokens, fork frames, pending arrivals) grow to the most ever present at
    once; buffers of draws, arrivals, latencies and engine outputs are fixed and drained.
    """

    START_TOKENS = 1024
    """Tokens (requests and fork branches in the network) held at first; doubled when short."""
    START_FRAMES = 256
    """Forks in progress held at first; doubled when short."""
    START_PENDING = 1024
    """Arrivals waiting for an engine's next call, per engine, held at first; doubled when short."""
    LATENCY_ROOM = 4096
    """End-to-end latencies buffered before they are moved to the per-class arrays."""
    START_TRANSFERS = 256
    """KV transfers in flight held at first; doubled when short."""
    PAIR_LATENCY_ROOM = 4096
    """Finished pair visits buffered before they are moved to the pairs' recorders."""
    DRAW_CHUNKS = 4
    """Chunks of ``DRAW_CHUNK`` values a random stream is refilled with at once."""
    GROWN = ("slot_i", "slot_f", "q", "heap", "lp_i", "lp_f", "lw_i", "lw_f")
    """The engine arrays (fields of ``netkernel.EngineLists``) that ``_State.more_slots`` replaces or
    resizes in place."""

    def __init__(
        self,
        tables: RouteTables,
        engines: Sequence[KernelEngine],
        arrivals: Sequence[Iterator[np.ndarray]],
        sizes: Sequence[Callable[[], np.ndarray] | None],
        choices: Sequence[Callable[[], np.ndarray] | None],
        latency: Sequence[array],
        max_requests: int | None,
        stop_ms: float,
        horizon_for: Callable[[float], float],
        pool_draws: Sequence[Callable[[], np.ndarray]] = (),
        pair_recorders: Sequence[Recorder] = (),
        class_pair_recorders: Sequence[Recorder | None] = (),
    ) -> None:
        """``arrivals[c]``: class c's arrival-time chunks (ms); ``sizes[2 i]``/``sizes[2 i + 1]``:
        node i's next chunk of prefill/decode sizes (None: not a visit); ``choices[i]``: node i's
        next chunk of uniform draws for its routing choice; ``latency[c]``: where class c's
        end-to-end latencies are appended; ``horizon_for(last_arrival_ms)``: the run's end once
        arrivals are over; ``pool_draws[p]``: pool p's next chunk of uniform draws (its router's);
        ``pair_recorders[q]``: where pair q's finished visits go (their TTFT, TPOT, E2EL), and
        ``class_pair_recorders[c]`` (None: none) where class c's go too."""
        from llmqueue.engines import netkernel as K

        if any(engine._times or engine._read for engine in engines):
            raise ValueError("the network loop starts with fresh engines")
        self.K = K
        self.engines = list(engines)
        self.arrivals = list(arrivals)
        self.sizes = list(sizes)
        self.choices = list(choices)
        self.pool_draws = list(pool_draws)
        self.latency = list(latency)
        self.horizon_for = horizon_for
        self.pair_recorders = list(pair_recorders)
        self.class_pair_recorders = list(class_pair_recorders)
        n_eng, n_cls, n_nodes = len(engines), len(tables.classes), len(tables.keys)
        self.ns = np.zeros(K.N_NS, dtype=np.int64)
        self.nf = np.zeros(K.N_NF)
        self.ns[K.NS_STAGE] = K.ST_NEXT_EXT
        self.ns[K.NS_MAX_REQ] = -1 if max_requests is None else max_requests
        self.nf[K.NF_HORIZON] = math.inf
        self.nf[K.NF_STOP] = stop_ms
        self.tables = tables
        self.due = np.zeros(n_eng, dtype=np.int64)
        self.times = np.zeros(n_eng)
        self.fin = np.zeros(sum(e.state.out_i.shape[0] for e in engines) + 16, dtype=np.int64)
        self.tok_i = np.zeros((0, K.N_TK), dtype=np.int64)
        self.tok_f = np.zeros(0)
        self.tok_free = np.zeros(0, dtype=np.int64)
        self.tok_work = np.zeros(0, dtype=np.int64)
        self.stack = np.zeros((2, 0), dtype=np.int64)
        self.pv_i = np.zeros((0, K.N_PV), dtype=np.int64)  # each token's pair visit
        self.pv_f = np.zeros((0, K.N_PVF))
        self._grow_tokens(self.START_TOKENS)
        n_pairs = len(tables.pairs)
        self.pair_counts = np.zeros((n_pairs, K.N_PC), dtype=np.int64)
        self.pair_link = np.zeros((n_pairs, K.N_PL))
        self.xf_f = np.zeros((self.START_TRANSFERS + 1, K.N_XFF))  # the heap, and one spare row
        self.xf_i = np.zeros((self.START_TRANSFERS + 1, K.N_XFI), dtype=np.int64)
        self.pd_f = np.zeros((self.PAIR_LATENCY_ROOM, K.N_PDF))
        self.pd_i = np.zeros((self.PAIR_LATENCY_ROOM, K.N_PDI), dtype=np.int64)
        self.frames = np.zeros((0, K.N_FR), dtype=np.int64)
        self.fr_free = np.zeros(0, dtype=np.int64)
        self._grow_frames(self.START_FRAMES)
        self.pend_ms = np.zeros((n_eng, 0))
        self.pend_i = [np.zeros((n_eng, 0), dtype=np.int64) for _ in range(5)]  # pre, dec, id, tok, node
        self.pend_ht = np.zeros((n_eng, 2), dtype=np.int64)
        self._grow_pending(self.START_PENDING)
        self.ext_t = np.zeros((n_cls, CHUNK_SIZE))
        self.ext_st = np.zeros((n_cls, 3), dtype=np.int64)
        for c in range(n_cls):
            self._next_arrivals(c)
        self.size_buf = np.zeros((2 * n_nodes, self.DRAW_CHUNKS * DRAW_CHUNK), dtype=np.int64)
        self.size_st = np.zeros((2 * n_nodes, 2), dtype=np.int64)
        self.choice_buf = np.zeros((n_nodes, self.DRAW_CHUNKS * DRAW_CHUNK))
        self.choice_st = np.zeros((n_nodes, 2), dtype=np.int64)
        self.pool_buf = np.zeros((len(tables.pools), self.DRAW_CHUNKS * DRAW_CHUNK))
        self.pool_st = np.zeros((len(tables.pools), 3), dtype=np.int64)  # DS_POS, DS_LEN, PS_ROUTED
        self.in_system = np.zeros(n_eng, dtype=np.int64)
        self.waiting = np.zeros(n_eng, dtype=np.int64)
        self.work = np.zeros(n_eng, dtype=np.int64)
        self.class_i = np.zeros((n_cls, K.N_CI), dtype=np.int64)
        self.class_f = np.zeros((n_cls, K.N_CF))
        self.class_f[:, K.CF_WIDTH] = 1.0  # TimeBins() defaults
        self.class_bins = np.zeros((n_cls, 2048))
        self.lat_f = np.zeros(self.LATENCY_ROOM)
        self.lat_c = np.zeros(self.LATENCY_ROOM, dtype=np.int64)
        states = [e.state for e in engines]
        # the engines' scalars move into two stacked arrays (their own become row views)
        self.si_all = np.stack([s.si for s in states])
        self.sf_all = np.stack([s.sf for s in states])
        for e, state in enumerate(states):
            state.si, state.sf = self.si_all[e], self.sf_all[e]
            state.kernel_state = state._kernel_state()
        # the engines' other arrays, one typed list each (named as the _State attributes)
        self.lists = [_typed_list(getattr(s, name) for s in states) for name in K.EngineLists._fields]
        # the network-policy engines' group tables (empty for a kernel engine)
        from llmqueue.engines import polkernel as P

        empty = {"grp_i": np.zeros((0, P.N_GI), dtype=np.int64), "grp_f": np.zeros((0, P.N_GF)),
                 "node_grp": np.zeros(0, dtype=np.int64), "route_node": np.zeros(0, dtype=np.int64),
                 "route_prob": np.zeros(0)}
        self.plists = [_typed_list(getattr(s, name, empty[name]) for s in states)
                       for name in K.PolicyLists._fields]
        self.rd = np.zeros(n_eng, dtype=np.int64)
        self.t_min = np.array([e._t_min for e in engines])
        self.wakes = np.array([int(getattr(e, "pressure", False)) for e in engines], dtype=np.int64)
        self.counts = np.zeros(n_nodes + 1, dtype=np.int64)  # requests per buffer, by node

    # -- growth and refills (the loop asked for them) ------------------------------------------------
    def _grow_tokens(self, capacity: int) -> None:
        K, ns = self.K, self.ns
        self.tok_i = _grown(self.tok_i, capacity)
        self.tok_f = _grown(self.tok_f, capacity)
        self.tok_work = _grown(self.tok_work, capacity)
        self.pv_i = _grown(self.pv_i, capacity)
        self.pv_f = _grown(self.pv_f, capacity)
        self.tok_free, ns[K.NS_TOK_FREE] = _free_list(self.tok_free, int(ns[K.NS_TOK_FREE]), capacity)
        self.stack = _grown(self.stack, capacity, axis=1)  # each entry is a distinct live token

    def _grow_frames(self, capacity: int) -> None:
        K, ns = self.K, self.ns
        self.frames = _grown(self.frames, capacity)
        self.fr_free, ns[K.NS_FR_FREE] = _free_list(self.fr_free, int(ns[K.NS_FR_FREE]), capacity)

    def _grow_pending(self, width: int) -> None:
        self.pend_ms = _grown(self.pend_ms, width, axis=1)
        self.pend_i = [_grown(a, width, axis=1) for a in self.pend_i]

    def _next_arrivals(self, c: int) -> None:
        """Class c's next chunk of arrival times (an empty or missing chunk ends its stream)."""
        chunk = np.asarray(next(self.arrivals[c], np.zeros(0)), dtype=np.float64)
        if chunk.size > self.ext_t.shape[1]:
            self.ext_t = _grown(self.ext_t, chunk.size, axis=1)
        self.ext_t[c, : chunk.size] = chunk
        self.ext_st[c] = (0, chunk.size, int(chunk.size == 0))

    def _refill(self, buf: np.ndarray, st: np.ndarray, row: int,
                source: Callable[[], np.ndarray] | None, sizes: bool) -> None:
        """Fill an empty stream buffer with the source's next chunks."""
        if source is None:
            raise AssertionError(f"stream {row} has no source")
        for k in range(buf.shape[1] // DRAW_CHUNK):
            values = np.asarray(source())
            if values.shape != (DRAW_CHUNK,):
                raise ValueError(f"a sampler returned {values.shape} values for {DRAW_CHUNK}")
            if sizes:
                values = values.astype(np.int64)  # as int(value) does (truncation)
                if values.min() < 0:
                    bad = int(values.min())
                    raise ConfigError("request.tokens", bad, "a visit's token count must be >= 0")
            buf[row, k * DRAW_CHUNK : (k + 1) * DRAW_CHUNK] = values
        st[row, :2] = (0, buf.shape[1])

    def _drain_latency(self) -> None:
        K = self.K
        n = int(self.ns[K.NS_LAT_N])
        values, classes = self.lat_f[:n], self.lat_c[:n]
        for c, out in enumerate(self.latency):
            out.frombytes(np.ascontiguousarray(values[classes == c]).tobytes())
        self.ns[K.NS_LAT_N] = 0

    def _drain_pairs(self) -> None:
        """Move the finished pair visits buffered into their pair's and class's recorders."""
        K = self.K
        n = int(self.ns[K.NS_PD_N])
        times = self.pd_f[:n, [K.PD_ARRIVAL, K.PD_FIRST, K.PD_FINISH]]
        sizes = self.pd_i[:n, [K.PD_PRE, K.PD_DEC]]
        for column, recorders in ((K.PD_PAIR, self.pair_recorders), (K.PD_CLS, self.class_pair_recorders)):
            for index, recorder in enumerate(recorders):
                if recorder is not None:
                    rows = self.pd_i[:n, column] == index
                    _feed(recorder, times[rows], sizes[rows])
        self.ns[K.NS_PD_N] = 0

    def _args(self) -> tuple[tuple[object, ...], ...]:
        """``net_run``'s argument groups, records of ``netkernel`` (see ``net_run``'s docstring),
        built again after a pool grows."""
        K, t = self.K, self.tables
        return (
            K.Loop(self.ns, self.nf),
            K.Routes(t.nodes, t.next_target, t.next_prob, t.branches, t.class_start, t.pool_first,
                     t.pool_n, t.pool_members, t.pool_router, t.pool_kv),
            K.Work(self.due, self.times, self.fin, self.stack),
            K.Tokens(self.tok_i, self.tok_f, self.tok_free, self.frames, self.fr_free, self.tok_work,
                     self.counts),
            K.Pending(self.pend_ms, *self.pend_i[:4], self.pend_ht, self.pend_i[4]),
            K.Streams(self.ext_t, self.ext_st, self.size_buf, self.size_st, self.choice_buf,
                      self.choice_st, self.pool_buf, self.pool_st),
            K.Classes(self.class_i, self.class_f, self.class_bins, self.lat_f, self.lat_c),
            K.Engines(self.si_all, self.sf_all, self.rd, self.t_min, self.in_system, self.waiting,
                      self.work, self.wakes),
            K.EngineLists(*self.lists),
            K.PolicyLists(*self.plists),
            K.Pairs(t.pair_side, t.pair_link, self.pair_counts, self.pair_link, self.pv_i, self.pv_f,
                    self.xf_f, self.xf_i, self.pd_f, self.pd_i),
        )

    # -- the run ---------------------------------------------------------------------------------------
    def run(self) -> float:
        """Run until no engine has an event before the horizon; returns the horizon."""
        K, ns = self.K, self.ns
        args = self._args()
        while True:
            code = K.net_run(*args)
            ask = int(ns[K.NS_ASK])
            if code == K.NET_DONE:
                break
            if code == K.NET_ROOM:
                engine = self.engines[ask]
                _drain(engine.state, engine.recorder)
                self.rd[ask] = 0
            elif code == K.NET_SLOTS:
                state = self.engines[ask].state
                state.more_slots()  # grown or resized in place: the lists get them again
                for name in self.GROWN:
                    K.list_set(self.lists[K.EngineLists._fields.index(name)], ask, getattr(state, name))
            elif code == K.NET_BAD_BATCH_TIME:
                self.engines[ask].state.bad_batch_time()
            elif code == K.NET_SIZES:
                self._refill(self.size_buf, self.size_st, ask, self.sizes[ask], sizes=True)
            elif code == K.NET_CHOICES:
                self._refill(self.choice_buf, self.choice_st, ask, self.choices[ask], sizes=False)
            elif code == K.NET_POOL_DRAWS:
                self._refill(self.pool_buf, self.pool_st, ask, self.pool_draws[ask], sizes=False)
            elif code == K.NET_TOKENS:
                self._grow_tokens(2 * self.tok_f.shape[0])
                args = self._args()
            elif code == K.NET_FRAMES:
                self._grow_frames(2 * self.frames.shape[0])
                args = self._args()
            elif code == K.NET_PENDING:
                self._grow_pending(2 * self.pend_ms.shape[1])
                args = self._args()
            elif code == K.NET_LATENCY:
                self._drain_latency()
            elif code == K.NET_ARRIVALS:
                self._next_arrivals(ask)
                args = self._args()
            elif code == K.NET_TRANSFERS:
                rows = 2 * (self.xf_f.shape[0] - 1) + 1
                self.xf_f, self.xf_i = _grown(self.xf_f, rows), _grown(self.xf_i, rows)
                args = self._args()
            elif code == K.NET_PAIR_LATENCY:
                self._drain_pairs()
            elif code == K.NET_HORIZON:
                self.nf[K.NF_HORIZON] = self.horizon_for(float(self.nf[K.NF_LAST_ARRIVAL]))
            else:
                raise AssertionError(f"network loop: inconsistent routing state (code {code})")
        self._drain_latency()
        self._drain_pairs()
        for e, engine in enumerate(self.engines):  # hand the engines back to the Python interface
            h, tail = (int(x) for x in self.pend_ht[e])
            engine._times = self.pend_ms[e, h:tail].tolist()
            engine._prefill, engine._decode, engine._ids = (
                a[e, h:tail].tolist() for a in self.pend_i[:3]
            )
            engine._nodes = self.pend_i[4][e, h:tail].tolist()
            engine._read = int(self.rd[e])
            engine._end, engine._start = engine.state.next_times()
        return float(self.nf[K.NF_HORIZON])

    def class_totals(self, c: int) -> ClassTotals:
        """Class c's counters and time integrals (class index as in ``RouteTables.classes``)."""
        K, ci, cf = self.K, self.class_i[c], self.class_f[c]
        return ClassTotals(
            arrivals=int(ci[K.CI_ARRIVALS]), done=int(ci[K.CI_DONE]), present=int(ci[K.CI_PRESENT]),
            area=float(cf[K.CF_AREA]), last_ms=float(cf[K.CF_LAST]), bins=self.class_bins[c].copy(),
            bin_width_ms=float(cf[K.CF_WIDTH]),
        )

    def pair_totals(self, q: int) -> PairTotals:
        """Pair q's counters and link figures (pair index as in ``RouteTables.pairs``)."""
        K, pc, pl = self.K, self.pair_counts[q], self.pair_link[q]
        return PairTotals(
            arrivals=int(pc[K.PC_ARRIVALS]), completed=int(pc[K.PC_COMPLETED]),
            in_prefill=int(pc[K.PC_IN_PREFILL]), in_transfer=int(pc[K.PC_IN_TRANSFER]),
            in_decode=int(pc[K.PC_IN_DECODE]), transfers_started=int(pc[K.PC_STARTED]),
            transfers_finished=int(pc[K.PC_FINISHED]), link_free_ms=float(pl[K.PL_FREE]),
            wait_ms=float(pl[K.PL_WAIT]), busy_ms=float(pl[K.PL_BUSY]),
        )

    def transfers(self) -> list[tuple[float, int, int, float, int]]:
        """The KV transfers still in flight, (end ms, sequence, visit id, start ms, pair), in the
        order of the heap's rows (the Python loop's heap list, as heapq leaves it)."""
        K, n = self.K, int(self.ns[self.K.NS_XF_N])
        return [(float(f[K.XF_END]), int(i[K.XF_SEQ]), int(i[K.XF_VID]), float(f[K.XF_START]),
                 int(i[K.XF_PAIR])) for f, i in zip(self.xf_f[:n], self.xf_i[:n], strict=True)]

    @property
    def visits(self) -> int:
        """Engine visit ids handed out (visits handed to engines, and transfers in flight, whose
        id their decode visit will take)."""
        return int(self.ns[self.K.NS_VISITS])

    @property
    def last_arrival_ms(self) -> float:
        """Time of the last external arrival (0 before any)."""
        return float(self.nf[self.K.NF_LAST_ARRIVAL])
