"""The compiled event loop: the fast engine's dynamics for the shipped policies, in numba.

``FastEngine`` pays per event but each event still costs tens of microseconds of Python (policy
call, plan check, records). This module runs the same event loop, the same float operations in
the same order, compiled with numba: the (K_p, K_d)-FCFS family and current vLLM are ported as
plain loops over the prompt queue, decoders stay implicit (served prefix, finish heap), and runs
of identical iterations are booked at once, exactly as in ``llmqueue.engines.fast`` (read that
module and docs/fastpath.md first: this one mirrors it line by line). A KV-cache limit is ported
too (single engines only): block growth in closed form, runs that end before a preemption, and
plans fitted request by request with the reference engine's rules (see "KV-cache memory" below).

All state lives in numpy arrays, so a run can stop and resume: the loop returns to Python when it
needs the next chunk of arrivals, room for its outputs, or more request slots. The arrays travel as
one record, ``EngineState`` (a NamedTuple that numba compiles, its fields read by name at compile
time), which ``run`` and ``stop`` unpack at their top; the helpers take the arrays they use (a
record handed to a helper that is not inlined is copied field by field at every call: the event
loop ran 30% slower that way). Entries inside the arrays are named by the integer constants
below (``si[NOW]``, ``slot_i[s, R_ID]``, ``q[Q_PREFILL, i]``...); the policy parameters are a
record of scalars (``Policy``: ``pol.budget``...). The driver
(``llmqueue.engines.compiled``) feeds it and turns what it returns into the usual metrics. In a
network whose engines are all compiled, ``llmqueue.engines.netkernel`` runs this loop for each
engine (network mode: ``si[NET]``) and the routing between them. ``TWINS`` (at the end) pairs each
function here with the Python code it ports.

Memory: a request holds a full slot only near the head of its queue; the prompts and the waiting
decoders deeper than any step can reach are compact records (see "Compact tails" below), so an
unstable run's memory grows by about 48 bytes per request present, not by a slot's ~300.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit

MAX_REPEAT = 1 << 16  # same as llmqueue.engines.fast.MAX_REPEAT
TARGETS_DUE = 2  # si[T_LIST] after _start_batch with a binding k_max, until _fill_targets

# -- return codes --------------------------------------------------------------------------------
DONE = 0
NEED_ARRIVALS = 1
NEED_ROOM = 2  # output buffers nearly full: drain them and call again
NEED_SLOTS = 3  # request slots or compact tails short (si[WANT_FREE], WANT_LP, WANT_LW): grow, call again
BAD_BATCH_TIME = 4  # t(n) not positive and finite; n in si[ERR_N]
PAUSED = 5  # network mode: the next event is past the time limit (or the requested step is done)
ENDED = 6  # network mode: a batch run ended (it finished requests, or only ending was asked for)

# -- integer scalars (si) ------------------------------------------------------------------------
(N_FREE, PQ_HEAD, PQ_LEN, WQ_HEAD, WQ_LEN, SV_LEN, JN_LEN, PP_LEN, HP_LEN, DECODERS, SERVES, SEQ,
 ACTIVE, P_DEC, P_PRE, RUN_OFF, RUN_LEN, T_LIST, T_OFF, T_BASE, T_X, STOPPED, BLOCKED, IN_SYSTEM,
 BACKLOG, PREFILL_LEFT, ARRIVALS, ARRIVED_TOKENS, BATCHES, BATCH_TOKENS, BATCH_REQUESTS,
 BATCH_PREFILL, BATCH_DECODE, WC_TARGET, WC_VIOL, WC_WASTED, N_OUT, N_ITL, A_POS, A_FINAL, ERR_N,
 N_CONT, PLAN_NO, CAP, NET, END_ONLY, START_ONLY,
 # KV cache (memory-limited engines only): free blocks, blocks held during the running run's first
 # repeat, decoders holding no blocks (prompt-less, never served), whether the served decoders are
 # not the oldest ones (after a fitted plan), the number of the current fit, recorder counters, and
 # the tokens preempted at the batch start not yet in the recorder's backlog (_book_preemptions),
 # the prompts holding blocks (they are near the head of the queue: scans stop after the last)
 KV_FREE, KV_RUN_USED, UNCACHED, IRREGULAR, FIT_NO, PREEMPTIONS, RECOMPUTED, REJECTED, KV_BATCHES,
 LOST, RES_PROMPTS,
 # compact tails (see "Compact tails"): head and length of the prompts' ring (lp) and of the waiting
 # decoders' ring (lw), new decoders bound for lw (q[Q_NEW]); what a NEED_SLOTS return asks for
 # (free slots, ring capacities)
 LP_HEAD, LP_LEN, LW_HEAD, LW_LEN, NEW_LEN, WANT_FREE, WANT_LP, WANT_LW, N_SI) = range(67)
KV = N_SI
"""si[KV:] (memory only): served decoders by block phase (block entries), then the running run's
block growth over one period as prefix sums (block + 1 entries); si has N_SI + 2 block + 1 entries."""

# -- float scalars (sf) --------------------------------------------------------------------------
(NOW, BATCH_END, BLOCKED_SINCE, SERVED_MS, DURATION, REC_LAST, BACKLOG_AREA, IN_SYSTEM_AREA, BUSY,
 STALL, LAST_ARRIVAL, HORIZON, BIN_WIDTH, LIMIT, KV_PEAK, KV_SUM, N_SF) = range(17)

# -- per-slot integers (slot_i columns) and floats (slot_f columns) ------------------------------
# R_KV, R_BLK: a request's blocks while a plan is fitted (R_BLK holds them when R_KV == si[FIT_NO];
# otherwise, at a batch boundary, a request holds ceil(cached / block) blocks: see _cached)
R_ID, R_PRE, R_DEC, R_PLEFT, R_DLEFT, R_C0, R_ACT, R_SEQ, R_MARK, R_TOK, R_KV, R_BLK, N_RI = range(13)
R_ARR, R_FIRST, R_LAST, N_RF = range(4)

# -- compact tails: records of the prompts (lp_i, lp_f) and waiting decoders (lw_i, lw_f) that no
# step reaches (see "Compact tails" below); LZ_TOK only in network mode (one more column there)
LZ_ID, LZ_SEQ, LZ_PRE, LZ_DEC, LZ_TOK = range(5)
N_LZI = 4  # int columns without LZ_TOK
LZ_ARR, LZ_FIRST, N_LZF = range(3)

# -- rows of the queue array q ---------------------------------------------------------------------
# Q_PREFILL, Q_WAIT: rings of the slotted heads of the prompt queue and of the waiting decoders
# (PQ_LEN, WQ_LEN entries; their compact tails follow them: lp, lw rings); Q_NEW: new decoders that
# join the compact tail at the top of the loop; Q_PLAN_C: cached tokens of each planned prompt when
# its run started (block growth); Q_FIT_SLOT, Q_FIT_TOK: a plan fitted request by request; Q_TMP:
# scratch (resident prompts, chosen decoders)
(Q_FREE, Q_PREFILL, Q_WAIT, Q_SERVED, Q_JOIN, Q_PLAN_SLOT, Q_PLAN_TOK, Q_PLAN_C, Q_FIT_SLOT,
 Q_FIT_TOK, Q_TMP, Q_NEW, N_Q) = range(13)


# -- an engine's arrays: the record ``run`` and ``stop`` take ---------------------------------------
class EngineState(NamedTuple):
    """An engine's arrays (``llmqueue.engines.compiled._State.kernel_state``), passed to ``run`` and
    ``stop``, which read the fields by name (numba resolves them at compile time). The integer
    constants above name the entries of ``si`` and ``sf``, the columns of the slot and tail arrays
    and the rows of ``q``; ``pol`` is a record of scalars (``Policy``, below)."""

    si: np.ndarray  # integer scalars (N_SI, then the KV tail: see KV)
    sf: np.ndarray  # float scalars (N_SF)
    slot_i: np.ndarray  # request slots: integer columns R_* (slots x N_RI)
    slot_f: np.ndarray  # request slots: float columns R_ARR, R_FIRST, R_LAST (slots x N_RF)
    q: np.ndarray  # queue rows Q_* (N_Q x slots)
    heap: np.ndarray  # finish heap of the served decoders: key, seq, activation, slot (4 x 2 slots)
    pol: Policy  # policy parameters (a record of scalars)
    t_table: np.ndarray  # batch time t(n) for n = 0 .. budget
    ends: np.ndarray  # the running run's batch ends (MAX_REPEAT)
    targets: np.ndarray  # the running run's fill targets under a binding k_max (MAX_REPEAT)
    bins: np.ndarray  # the recorder's time bins of the backlog
    out_f: np.ndarray  # finished requests: arrival, first token, finish (room x 3)
    out_i: np.ndarray  # finished requests: slot, id, prefill, decode, token (room x 5)
    itl: np.ndarray  # inter-token latencies: (value, count) rows (2 x room)
    lp_i: np.ndarray  # compact tail of the prompts: integer columns LZ_* (ring x N_LZI (+1))
    lp_f: np.ndarray  # compact tail of the prompts: float columns LZ_ARR, LZ_FIRST (ring x N_LZF)
    lw_i: np.ndarray  # compact tail of the waiting decoders, as lp_i (no rows with a KV cache)
    lw_f: np.ndarray  # compact tail of the waiting decoders, as lp_f


class Arrivals(NamedTuple):
    """The arrivals handed to ``run``, one entry per request (taken from ``si[A_POS]`` on)."""

    ms: np.ndarray  # arrival times (float)
    pre: np.ndarray  # prefill tokens
    dec: np.ndarray  # decode tokens
    id: np.ndarray  # request ids
    tok: np.ndarray  # each visit's network token, carried through untouched (the ids outside a network)


# -- policy parameters (pol) ---------------------------------------------------------------------
class Policy(NamedTuple):
    """The kernel's fixed parameters (``EngineState.pol``): the policy's knobs, the batch limits and
    the KV cache, all integers (``llmqueue.engines.compiled._policy_params``). A record of scalars:
    numba passes it by value, so ``pol.budget`` costs no memory read."""

    kind: int  # KIND_KFCFS or KIND_VLLM_CHUNKED
    decode_first: int  # K-FCFS: decodes before prefills (1) or after (0)
    mixed: int  # K-FCFS: prefills and decodes in one batch
    chunked: int  # K-FCFS: a prompt may be split over batches
    kp: int  # K-FCFS: most prompts per batch (0: no limit)
    kd: int  # K-FCFS: most decoders per batch (0: no limit)
    budget: int  # tokens per batch
    kmax: int  # most requests per batch (0: no limit)
    block: int  # KV block size in tokens (0: no memory limit)
    kv_total: int  # blocks in the pool
    kv_floor: int  # blocks admission keeps free (the watermark)
    margin: int  # slotted entries kept beyond the depth steps can reach (see "Compact tails"; 0 is
    # exact too, tests use it)


KIND_KFCFS, KIND_VLLM_CHUNKED = 0, 1


@njit(cache=True)
def _bins_fit(sf, wi, bins, t_ms):
    """TimeBins._fit: merge bins pairwise (width doubles) until t_ms fits; the width is sf[wi]."""
    nb = bins.shape[0]
    while t_ms > sf[wi] * nb:
        half = nb // 2
        for i in range(half):
            bins[i] = bins[2 * i] + bins[2 * i + 1]
        for i in range(half, nb):
            bins[i] = 0.0
        sf[wi] *= 2.0


@njit(cache=True)
def _bins_add(sf, wi, bins, t0, t1, value):
    """TimeBins.add: ``value`` held over [t0, t1); the bin width is sf[wi]."""
    if t1 <= t0:
        return
    _bins_fit(sf, wi, bins, t1)
    if value == 0.0:
        return
    w = sf[wi]
    nb = bins.shape[0]
    i0 = int(t0 // w)
    i1 = min(int(t1 // w), nb - 1)
    if i0 == i1:
        bins[i0] += value * (t1 - t0)
        return
    bins[i0] += value * ((i0 + 1) * w - t0)
    for i in range(i0 + 1, i1):
        bins[i] += value * w
    bins[i1] += value * (t1 - i1 * w)


@njit(cache=True)
def _advance(si, sf, bins, t_ms):
    """Recorder._advance: integrate backlog and requests in system up to t_ms."""
    dt = t_ms - sf[REC_LAST]
    if dt > 0:
        sf[BACKLOG_AREA] += si[BACKLOG] * dt
        sf[IN_SYSTEM_AREA] += si[IN_SYSTEM] * dt
        _bins_add(sf, BIN_WIDTH, bins, sf[REC_LAST], t_ms, float(si[BACKLOG]))
        sf[REC_LAST] = t_ms


@njit(cache=True)
def _earlier(key_a, seq_a, key_b, seq_b):
    """Heap order: by finish count, then arrival (seq)."""
    return key_a < key_b or (key_a == key_b and seq_a < seq_b)


@njit(cache=True)
def _heap_move(heap, dst, src):
    for r in range(4):
        heap[r, dst] = heap[r, src]


@njit(cache=True)
def _heap_put(heap, i, key, seq, act, slot):
    heap[0, i] = key
    heap[1, i] = seq
    heap[2, i] = act
    heap[3, i] = slot


@njit(cache=True)
def _heap_push(heap, si, key, seq, act, slot):
    """Push (finish count, seq, activation, slot) on the min-heap ordered by (key, seq)."""
    i = si[HP_LEN]
    si[HP_LEN] = i + 1
    while i > 0:
        parent = (i - 1) // 2
        if _earlier(heap[0, parent], heap[1, parent], key, seq):
            break
        _heap_move(heap, i, parent)
        i = parent
    _heap_put(heap, i, key, seq, act, slot)


@njit(cache=True)
def _heap_pop(heap, si):
    """Remove the top of the heap."""
    n = si[HP_LEN] - 1
    si[HP_LEN] = n
    if n == 0:
        return
    key, seq = heap[0, n], heap[1, n]
    act, slot = heap[2, n], heap[3, n]
    i = 0
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and _earlier(heap[0, child + 1], heap[1, child + 1], heap[0, child],
                                      heap[1, child]):
            child += 1
        if _earlier(key, seq, heap[0, child], heap[1, child]):
            break
        _heap_move(heap, i, child)
        i = child
    _heap_put(heap, i, key, seq, act, slot)


@njit(cache=True)
def _heap_compact(heap, si, slot_i):
    """Drop stale entries (a decoder that left the served prefix) and rebuild the heap."""
    n = si[HP_LEN]
    keep = 0
    for i in range(n):
        if heap[2, i] == slot_i[heap[3, i], R_ACT]:
            _heap_move(heap, keep, i)
            keep += 1
    kept = heap[:, :keep].copy()
    si[HP_LEN] = 0
    for i in range(keep):
        _heap_push(heap, si, kept[0, i], kept[1, i], kept[2, i], kept[3, i])


@njit(cache=True)
def _ring_get(q, row, head, i):
    cap = q.shape[1]
    return q[row, (head + i) % cap]


@njit(cache=True)
def _sync(si, sf, slot_i, slot_f, s):
    """Write a served decoder's counts back into its slot (decode_left, last token)."""
    serves = si[SERVES]
    if serves > slot_i[s, R_C0]:
        slot_i[s, R_DLEFT] -= serves - slot_i[s, R_C0]
        slot_f[s, R_LAST] = sf[SERVED_MS]
        slot_i[s, R_C0] = serves


@njit(cache=True)
def _cached(slot_i, s):
    """Tokens whose KV slot ``s`` holds: its prompt and decoded tokens less what it must still
    prefill (so 0 after a preemption). For a served decoder its decode count may be stale, but
    ``cached - c0`` is not (both advance together): its block phase is exact without a sync."""
    return slot_i[s, R_PRE] + slot_i[s, R_DEC] - slot_i[s, R_DLEFT] - slot_i[s, R_PLEFT]


@njit(cache=True)
def _ceil_div(a, b):
    return -((-a) // b)


# -- compact tails ---------------------------------------------------------------------------------
#
# An unstable run keeps most of its requests waiting: prompts not yet planned (Sarathi-Serve, the
# (K_p, K_d)-FCFS family) or decoders beyond the served prefix (vanilla vLLM). A step only reaches
# the head of each queue, so only the head holds slots; the rest of each queue is a ring of compact
# records in arrival order (id, seq, prefill, decode, arrival, first token; the network token too in
# network mode): 48 bytes, against ~300 for a slot with its queue rows and heap entries.
#
# - Prompts. A plan reads at most (started prompts) + budget + 1 prompts from the head (each prompt
#   it plans takes a token; vLLM's started prompts are at most one without memory, and hold blocks
#   with memory: RES_PROMPTS), and the batch booked just before it drops at most budget prompts
#   from the head. So 2 budget + 2 + RES_PROMPTS slotted prompts are enough (_prompts_slotted).
#   A compact prompt is fresh (never planned, no blocks), so the scans for prompts holding blocks
#   and the drop of finished prompts stay in the slots, and a preempted request, older than every
#   compact prompt, is inserted among the slotted ones. (Only a prompt-less request can decode while
#   older prompts are compact; with a KV cache it could be preempted back among them, so its
#   arrival first moves the compact prompts into slots.) The scan of the whole queue for a binding
#   k_max (_fill_targets) reads the compact prompts' sizes.
# - Waiting decoders (no KV cache only: with one, every decoder but a prompt-less one holds blocks,
#   so the cache bounds them). A plan serves at most budget decoders, the oldest, so budget waiting
#   decoders in slots are enough (_waiting_slotted). A compact decoder was never served (decode
#   left = decode, last token = first token). A new decoder younger than every slotted one, once
#   budget wait in slots or some are compact, is bound for the compact tail: it keeps its slot, in
#   no queue (no step reaches it), until the top of the loop moves it there in arrival order (among
#   younger compact decoders if there are: a prompt that finishes after a younger prompt-less
#   arrival) and frees its slot.
#
# At the top of the loop, where it can return for more slots, _stock moves those new decoders and
# moves records into slots as the heads shorten. It is called only when there is something to do:
# the loop is short, and a call costs a reference count per array it takes (so the hot path keeps
# the thresholds as plain integers, and _start_batch does not take the compact prompts: see
# _fill_targets). An arrival joins the prompts' compact tail once the slotted head is long enough.
# Everything an arrival books (backlog, counters, the recorder's integrals) happens at its arrival
# either way: where a request is held does not change any result.


@njit(cache=True)
def _prompts_slotted(pol, res_prompts):
    """Prompts kept in slots when more are present: what a plan reads, plus what the batch booked
    before it may drop from the head, plus the margin (``res_prompts``: prompts holding blocks)."""
    return 2 * pol.budget + 2 + res_prompts + pol.margin


@njit(cache=True)
def _waiting_slotted(pol):
    """Waiting decoders kept in slots when more are present: a plan serves at most budget."""
    return pol.budget + pol.margin


@njit(cache=True, inline="always")
def _need(si, free, lp, lw):
    """Ask the driver for at least ``free`` free slots and rings of ``lp`` and ``lw`` records."""
    si[WANT_FREE] = free
    si[WANT_LP] = lp
    si[WANT_LW] = lw
    return NEED_SLOTS


@njit(cache=True)
def _lz_write(lz_i, lz_f, r, rid, seq, pre, dec, tok, arr, first):
    """Write compact record ``r``."""
    lz_i[r, LZ_ID] = rid
    lz_i[r, LZ_SEQ] = seq
    lz_i[r, LZ_PRE] = pre
    lz_i[r, LZ_DEC] = dec
    if lz_i.shape[1] > LZ_TOK:
        lz_i[r, LZ_TOK] = tok
    lz_f[r, LZ_ARR] = arr
    lz_f[r, LZ_FIRST] = first


@njit(cache=True)
def _lz_append(si, head_i, len_i, lz_i, lz_f, rid, seq, pre, dec, tok, arr, first):
    """Append a record to a compact tail (the ring has room: _stock checked it)."""
    _lz_write(lz_i, lz_f, (si[head_i] + si[len_i]) % lz_i.shape[0], rid, seq, pre, dec, tok, arr,
              first)
    si[len_i] += 1


@njit(cache=True, inline="always")
def _slot_new(si, slot_i, slot_f, q, rid, tok, seq, pre, dec, pleft, arr, first):
    """Take a free slot for a request nothing has been served to (``pleft``: its prompt, or 0 for
    a decoder); returns it. (R_ACT, R_MARK, R_KV keep the previous holder's counts: they only grow.)"""
    si[N_FREE] -= 1
    s = q[Q_FREE, si[N_FREE]]
    slot_i[s, R_ID] = rid
    slot_i[s, R_TOK] = tok
    slot_i[s, R_PRE] = pre
    slot_i[s, R_DEC] = dec
    slot_i[s, R_PLEFT] = pleft
    slot_i[s, R_DLEFT] = dec
    slot_i[s, R_C0] = 0
    slot_i[s, R_SEQ] = seq
    slot_f[s, R_ARR] = arr
    slot_f[s, R_FIRST] = first
    slot_f[s, R_LAST] = first
    return s


@njit(cache=True)
def _slot_from_tail(si, slot_i, slot_f, q, head_i, len_i, lz_i, lz_f, prompt):
    """Move the first record of a compact tail into a new slot; returns the slot."""
    r = si[head_i]
    rid, pre = lz_i[r, LZ_ID], lz_i[r, LZ_PRE]
    tok = lz_i[r, LZ_TOK] if lz_i.shape[1] > LZ_TOK else rid  # single engine: the token is the id
    s = _slot_new(si, slot_i, slot_f, q, rid, tok, lz_i[r, LZ_SEQ], pre, lz_i[r, LZ_DEC],
                  pre if prompt else 0, lz_f[r, LZ_ARR], lz_f[r, LZ_FIRST])
    si[head_i] = (r + 1) % lz_i.shape[0]
    si[len_i] -= 1
    return s


@njit(cache=True)
def _decoder_to_tail(si, slot_i, slot_f, q, lw_i, lw_f, s, pos):
    """Move decoder ``s`` (never served) into the decoders' compact tail at position ``pos`` (the
    records from there move back one) and free its slot."""
    n, head, lcap = si[LW_LEN], si[LW_HEAD], lw_i.shape[0]
    for i in range(n, pos, -1):
        dst, src = (head + i) % lcap, (head + i - 1) % lcap
        lw_i[dst] = lw_i[src]
        lw_f[dst] = lw_f[src]
    _lz_write(lw_i, lw_f, (head + pos) % lcap, slot_i[s, R_ID], slot_i[s, R_SEQ], slot_i[s, R_PRE],
              slot_i[s, R_DEC], slot_i[s, R_TOK], slot_f[s, R_ARR], slot_f[s, R_FIRST])
    si[LW_LEN] = n + 1
    q[Q_FREE, si[N_FREE]] = s
    si[N_FREE] += 1


@njit(cache=True)
def _stock(si, slot_i, slot_f, q, pol, lp_i, lp_f, lw_i, lw_f):
    """Move the new decoders bound for the compact tail there, top up the slotted heads from the
    compact tails, and keep room in the prompts' ring for an arrival. Returns 0, or NEED_SLOTS
    having changed nothing more."""
    cap = q.shape[1]
    n_new = si[NEW_LEN]
    if n_new > 0:
        if si[LW_LEN] + n_new > lw_i.shape[0]:
            return _need(si, 0, 0, si[LW_LEN] + n_new)
        for k in range(n_new):
            s = q[Q_NEW, k]
            pos = si[LW_LEN]  # by arrival, from the youngest: a new decoder is usually the youngest
            while pos > 0 and slot_i[s, R_SEQ] < lw_i[(si[LW_HEAD] + pos - 1) % lw_i.shape[0], LZ_SEQ]:
                pos -= 1
            _decoder_to_tail(si, slot_i, slot_f, q, lw_i, lw_f, s, pos)
        si[NEW_LEN] = 0
    n_lp, n_lw = si[LP_LEN], si[LW_LEN]
    want_p, want_w = _prompts_slotted(pol, si[RES_PROMPTS]), _waiting_slotted(pol)
    short = max(0, min(n_lp, want_p - si[PQ_LEN])) + max(0, min(n_lw, want_w - si[WQ_LEN]))
    if short > si[N_FREE]:
        return _need(si, short, 0, 0)
    while si[LP_LEN] > 0 and si[PQ_LEN] < want_p:
        s = _slot_from_tail(si, slot_i, slot_f, q, LP_HEAD, LP_LEN, lp_i, lp_f, True)
        q[Q_PREFILL, (si[PQ_HEAD] + si[PQ_LEN]) % cap] = s
        si[PQ_LEN] += 1
    while si[LW_LEN] > 0 and si[WQ_LEN] < want_w:
        s = _slot_from_tail(si, slot_i, slot_f, q, LW_HEAD, LW_LEN, lw_i, lw_f, False)
        q[Q_WAIT, (si[WQ_HEAD] + si[WQ_LEN]) % cap] = s
        si[WQ_LEN] += 1
    if si[LP_LEN] == lp_i.shape[0]:
        return _need(si, 0, si[LP_LEN] + 1, 0)
    return 0


@njit(cache=True)
def _clear_served(si, b):
    """Empty the served prefix, its joiners, its finish heap and its block phases (b: block size,
    0 without a cache)."""
    si[SV_LEN] = 0
    si[N_CONT] = 0
    si[JN_LEN] = 0
    si[HP_LEN] = 0
    if b > 0:
        si[KV:KV + b] = 0


@njit(cache=True)
def _serve(si, sf, slot_i, slot_f, q, heap, b, count):
    """Make the served prefix exactly the oldest ``count`` decoders (FastEngine._serve)."""
    cap = q.shape[1]
    while si[SV_LEN] > count:
        s = q[Q_SERVED, si[SV_LEN] - 1]
        si[SV_LEN] -= 1
        _sync(si, sf, slot_i, slot_f, s)
        slot_i[s, R_ACT] += 1
        if b > 0:
            si[KV + (_cached(slot_i, s) - slot_i[s, R_C0]) % b] -= 1
        si[N_CONT] -= 1  # joiners are booked before the prefix can change again
        si[WQ_HEAD] = (si[WQ_HEAD] - 1) % cap
        q[Q_WAIT, si[WQ_HEAD]] = s
        si[WQ_LEN] += 1
    while si[SV_LEN] < count:
        s = q[Q_WAIT, si[WQ_HEAD]]
        si[WQ_HEAD] = (si[WQ_HEAD] + 1) % cap
        si[WQ_LEN] -= 1
        slot_i[s, R_C0] = si[SERVES]
        slot_i[s, R_ACT] += 1
        q[Q_SERVED, si[SV_LEN]] = s
        si[SV_LEN] += 1
        q[Q_JOIN, si[JN_LEN]] = s
        si[JN_LEN] += 1
        if si[HP_LEN] == heap.shape[1]:
            _heap_compact(heap, si, slot_i)
        _heap_push(heap, si, si[SERVES] + slot_i[s, R_DLEFT], slot_i[s, R_SEQ], slot_i[s, R_ACT], s)
        if b > 0:  # served decoders by block phase (cached - c0) mod block
            si[KV + (_cached(slot_i, s) - slot_i[s, R_C0]) % b] += 1


@njit(cache=True)
def _next_finish(si, slot_i, heap):
    """The serve count at which the next served decoder finishes."""
    while heap[2, 0] != slot_i[heap[3, 0], R_ACT]:
        _heap_pop(heap, si)
    return heap[0, 0]


@njit(cache=True)
def _enter_decode(si, sf, slot_i, slot_f, q, heap, b, want_w, s):
    """A request starts decoding: it joins the decoders in arrival order. Without a KV cache, one
    younger than every slotted decoder is bound for the compact tail (q[Q_NEW]) when some decoders
    are compact or ``want_w`` wait in slots (see "Compact tails")."""
    cap = q.shape[1]
    seq = slot_i[s, R_SEQ]
    si[DECODERS] += 1
    if b > 0 and _cached(slot_i, s) == 0:  # no prompt: it holds no blocks until first served
        si[UNCACHED] += 1
    newest = -1
    if si[WQ_LEN] > 0:
        newest = q[Q_WAIT, (si[WQ_HEAD] + si[WQ_LEN] - 1) % cap]
    elif si[SV_LEN] > 0:
        newest = q[Q_SERVED, si[SV_LEN] - 1]
    if newest < 0 or seq > slot_i[newest, R_SEQ]:
        if b == 0 and (si[NEW_LEN] > 0 or si[LW_LEN] > 0 or si[WQ_LEN] >= want_w):
            q[Q_NEW, si[NEW_LEN]] = s
            si[NEW_LEN] += 1
        else:
            q[Q_WAIT, (si[WQ_HEAD] + si[WQ_LEN]) % cap] = s
            si[WQ_LEN] += 1
    else:  # an older request starts decoding (no prompt, or recomputed): rebuild the order
        n_sv, n_wq = si[SV_LEN], si[WQ_LEN]
        everyone = np.empty(n_sv + n_wq + 1, dtype=np.int64)
        for i in range(n_sv):
            other = q[Q_SERVED, i]
            _sync(si, sf, slot_i, slot_f, other)
            slot_i[other, R_ACT] += 1
            everyone[i] = other
        for i in range(n_wq):
            everyone[n_sv + i] = q[Q_WAIT, (si[WQ_HEAD] + i) % cap]
        # insort by seq (after equal keys; seqs are unique)
        pos = n_sv + n_wq
        while pos > 0 and slot_i[everyone[pos - 1], R_SEQ] > seq:
            everyone[pos] = everyone[pos - 1]
            pos -= 1
        everyone[pos] = s
        for i in range(everyone.shape[0]):
            q[Q_WAIT, i] = everyone[i]
        si[WQ_HEAD] = 0
        si[WQ_LEN] = everyone.shape[0]
        _clear_served(si, b)


@njit(cache=True)
def _plan_prompt(si, q, s, take):
    """Append ``take`` prefill tokens of slot ``s`` to the plan."""
    q[Q_PLAN_SLOT, si[PP_LEN]] = s
    q[Q_PLAN_TOK, si[PP_LEN]] = take
    si[PP_LEN] += 1


@njit(cache=True)
def _plan_kfcfs(si, slot_i, q, pol, row, head, n_queue, decoders_present):
    """KFCFS.plan_compact over the prompts ``q[row]`` (a ring from ``head``, ``n_queue`` long) and
    ``decoders_present`` decoders: fills the planned prompts (q rows) and returns the decoder count."""
    cap = q.shape[1]
    budget, k_max = pol.budget, pol.kmax
    slots = n_queue + decoders_present if k_max == 0 else k_max
    tokens = budget
    decoders = 0
    si[PP_LEN] = 0
    for phase in range(2):
        decode_phase = (phase == 0) == (pol.decode_first == 1)
        if decode_phase:
            limit = min(tokens, slots - si[PP_LEN], decoders_present)
            if pol.kd > 0:
                limit = min(limit, pol.kd)
            decoders = max(limit, 0)
            tokens -= decoders
        else:
            max_count = slots - decoders
            if pol.kp > 0:
                max_count = min(max_count, pol.kp)
            n = min(max(max_count, 0), n_queue)
            for i in range(n):
                if tokens <= 0:
                    break
                s = q[row, (head + i) % cap]
                need = slot_i[s, R_PLEFT]
                if need <= tokens:
                    take = need
                elif pol.chunked == 1:
                    take = tokens
                else:
                    break
                _plan_prompt(si, q, s, take)
                tokens -= take
        if (decoders > 0 or si[PP_LEN] > 0) and pol.mixed == 0:
            break
    return decoders


@njit(cache=True)
def _plan_vllm_chunked(si, slot_i, q, pol, row, head, n_queue, decoders_present, n_res):
    """VLLMChunked.plan_compact over the prompts ``q[row]`` (see _plan_kfcfs). Without memory
    (``n_res < 0``) the started prompts are a prefix of the queue (FCFS admission), so the scan
    stops at the first waiting one. With memory, preempted requests wait among them, but every
    started prompt holds blocks: the scan stops after the ``n_res`` prompts that do."""
    cap = q.shape[1]
    budget, k_max = pol.budget, pol.kmax
    memory = n_res >= 0
    started = 0
    front = 0  # the started prompts are among the first ``front`` ones
    if memory:
        seen = 0
        while seen < n_res and front < n_queue:
            s = q[row, (head + front) % cap]
            front += 1
            if _cached(slot_i, s) > 0:
                seen += 1
                if slot_i[s, R_PLEFT] < slot_i[s, R_PRE]:
                    started += 1
    else:
        while started < n_queue:
            s = q[row, (head + started) % cap]
            if slot_i[s, R_PLEFT] == slot_i[s, R_PRE]:
                break
            started += 1
        front = started
    running = decoders_present + started
    max_seqs = running + (n_queue - started) if k_max == 0 else k_max
    tokens = budget
    decoders = max(min(decoders_present, tokens, max_seqs), 0)
    tokens -= decoders
    si[PP_LEN] = 0
    if decoders == decoders_present:
        for i in range(front):
            s = q[row, (head + i) % cap]
            if memory and slot_i[s, R_PLEFT] >= slot_i[s, R_PRE]:
                continue
            if tokens == 0 or decoders + si[PP_LEN] >= max_seqs:
                break
            take = min(slot_i[s, R_PLEFT], tokens)
            _plan_prompt(si, q, s, take)
            tokens -= take
    admitted = running
    for i in range(0 if memory else started, n_queue):
        s = q[row, (head + i) % cap]
        if memory and slot_i[s, R_PLEFT] < slot_i[s, R_PRE]:
            continue
        if tokens == 0 or admitted >= max_seqs:
            break
        take = min(slot_i[s, R_PLEFT], tokens)
        _plan_prompt(si, q, s, take)
        tokens -= take
        admitted += 1
    return decoders


@njit(cache=True)
def _plan(si, slot_i, q, pol, row, head, n_queue, decoders_present, n_res):
    """The policy's compact plan (prompts in the q plan rows; returns the decoder count), with
    memory (``n_res`` of the prompts hold blocks)."""
    if pol.kind == KIND_KFCFS:
        return _plan_kfcfs(si, slot_i, q, pol, row, head, n_queue, decoders_present)
    return _plan_vllm_chunked(si, slot_i, q, pol, row, head, n_queue, decoders_present, n_res)


@njit(cache=True)
def _fill_targets(si, slot_i, q, pol, lp_i, targets):
    """Fill targets of the run _start_batch set up with a binding k_max (fastengine.fill_targets;
    T_LIST was TARGETS_DUE): written to ``targets`` (T_LIST = 1), or every one the budget. The
    prompts are scanned in queue order: the slotted ones, then the compact ones (never planned,
    so their tokens left are their prompts). Called before that run is booked, at the top of the
    loop or by stop: in _start_batch it would cost every batch start one more array (the compact
    prompts' ring) for this rare case."""
    k = si[RUN_LEN]
    cap = q.shape[1]
    n_pq, n_lp = si[PQ_LEN], si[LP_LEN]
    budget, k_max = pol.budget, pol.kmax
    n_plan = si[PP_LEN]
    si[PLAN_NO] += 1
    mark = si[PLAN_NO]
    lower = 0
    for e in range(n_plan):
        s = q[Q_PLAN_SLOT, e]
        slot_i[s, R_MARK] = mark
        lower += slot_i[s, R_PLEFT] - q[Q_PLAN_TOK, e] * (k - 1)
    slots = k_max - n_plan
    for i in range(n_pq + n_lp):
        if lower >= budget or slots <= 0:
            break
        if i >= n_pq:
            lower += lp_i[(si[LP_HEAD] + i - n_pq) % lp_i.shape[0], LZ_PRE]
            slots -= 1
            continue
        s = q[Q_PREFILL, (si[PQ_HEAD] + i) % cap]
        if slot_i[s, R_MARK] != mark:
            lower += slot_i[s, R_PLEFT]
            slots -= 1
    decoders = si[DECODERS]
    if lower + min(max(slots, 0), decoders) >= budget:
        si[T_LIST] = 0  # every target is the budget
        si[T_BASE] = budget
        si[T_X] = 0
        return
    others = np.empty(n_pq + n_lp, dtype=np.int64)
    n_others = 0
    for i in range(n_pq):
        s = q[Q_PREFILL, (si[PQ_HEAD] + i) % cap]
        if slot_i[s, R_MARK] != mark:
            others[n_others] = slot_i[s, R_PLEFT]
            n_others += 1
    for i in range(n_lp):
        others[n_others] = lp_i[(si[LP_HEAD] + i) % lp_i.shape[0], LZ_PRE]
        n_others += 1
    others = np.sort(others[:n_others])[::-1]
    n_constant = n_others + decoders
    best_constant = np.zeros(k_max + 1, dtype=np.int64)
    for r in range(1, k_max + 1):
        if r <= n_others:
            best_constant[r] = best_constant[r - 1] + others[r - 1]
        elif r <= n_constant:
            best_constant[r] = best_constant[r - 1] + 1
        else:
            best_constant[r] = best_constant[r - 1]
    shrinking = np.empty(n_plan, dtype=np.int64)
    t_max = min(n_plan, k_max)
    if n_plan == 0:  # nothing shrinks: one target for every repeat
        value = min(budget, best_constant[min(k_max, n_constant)])
        for j in range(k):
            targets[j] = value
        si[T_LIST] = 1
        return
    for j in range(k):
        for e in range(n_plan):
            shrinking[e] = slot_i[q[Q_PLAN_SLOT, e], R_PLEFT] - q[Q_PLAN_TOK, e] * j
        ordered = np.sort(shrinking)[::-1]
        top = 0
        acc = 0
        for t in range(t_max + 1):
            if t > 0:
                acc += ordered[t - 1]
            rest = min(k_max - t, n_constant)
            top = max(top, acc + best_constant[rest])
        targets[j] = min(budget, top)
    si[T_LIST] = 1


@njit(cache=True)
def _linear_sum(budget, base, x, lo, hi):
    """LinearTargets._sum: sum of min(b, A - X j) over repeats lo..hi-1."""
    if hi <= lo:
        return 0
    split = _first_at_most(base, x, budget, lo, hi)
    count = hi - split
    return budget * (split - lo) + base * count - x * (count * (split + hi - 1) // 2)


@njit(cache=True)
def _first_at_most(base, x, n, lo, hi):
    """First repeat in [lo, hi) whose A - X j is at most n (hi if none)."""
    if x == 0:
        return hi if base > n else lo
    return min(hi, max(lo, -((n - base) // x)))


@njit(cache=True)
def _audit(si, pol, targets, m, n):
    """(target sum, batches short, tokens short) of the next m repeats of n tokens."""
    lo = si[T_OFF]
    hi = lo + m
    si[T_OFF] = hi
    budget = pol.budget
    if si[T_LIST] == 1:
        total = 0
        viol = 0
        wasted = 0
        for j in range(lo, hi):
            total += targets[j]
            if targets[j] > n:
                viol += 1
                wasted += targets[j] - n
        return total, viol, wasted
    base, x = si[T_BASE], si[T_X]
    total = _linear_sum(budget, base, x, lo, hi)
    if budget <= n:
        return total, 0, 0
    short_hi = _first_at_most(base, x, n, lo, hi)
    count = short_hi - lo
    return total, count, _linear_sum(budget, base, x, lo, short_hi) - n * count


@njit(cache=True)
def _batches(si, sf, count, busy_ms, prefill, decode, requests, total, viol, wasted):
    """Recorder.batches."""
    si[BATCHES] += count
    si[BATCH_TOKENS] += (prefill + decode) * count
    si[BATCH_REQUESTS] += requests * count
    si[BATCH_PREFILL] += prefill * count
    si[BATCH_DECODE] += decode * count
    sf[BUSY] += busy_ms
    si[WC_TARGET] += total
    si[WC_VIOL] += viol
    si[WC_WASTED] += wasted


# -- KV-cache memory (FastEngine's _fit_compact, _form_fitted, _Growth, _book_blocks) -------------
#
# At a batch boundary a request holds ceil(cached / block) blocks (_cached), so blocks are not
# stored. While a plan is fitted request by request, the requests it grows, admits or preempts
# hold R_BLK blocks (R_KV == si[FIT_NO]). During a run of repeats the served decoders' blocks are
# counted by phase (si[KV:KV + block]), and the growth of the run (its prefix sums over one
# period, si[KV + block:KV + 2 block + 1]) is in closed form.

FITTED = -2  # _form_memory: the plan would preempt: fit it request by request
BLOCKED_PLAN = -1  # the engine blocks: no plan, or memory refused all of it


@njit(cache=True)
def _blocks(si, slot_i, s, b):
    """Blocks slot ``s`` holds (during a fit: as the fit left them)."""
    if slot_i[s, R_KV] == si[FIT_NO]:
        return slot_i[s, R_BLK]
    return _ceil_div(_cached(slot_i, s), b)


@njit(cache=True)
def _ring_remove(si, q, row, head_i, len_i, s):
    """Remove ``s`` from the ring ``q[row]`` (head si[head_i], length si[len_i])."""
    cap = q.shape[1]
    head, n = si[head_i], si[len_i]
    pos = 0
    while q[row, (head + pos) % cap] != s:
        pos += 1
    for i in range(pos, n - 1):
        q[row, (head + i) % cap] = q[row, (head + i + 1) % cap]
    si[len_i] = n - 1


@njit(cache=True)
def _ring_insort(si, slot_i, q, row, head_i, len_i, s):
    """Insert ``s`` into the ring ``q[row]`` kept in arrival (seq) order, from the head (a
    preempted request is older than the prompts that wait behind it)."""
    cap = q.shape[1]
    head, n = si[head_i], si[len_i]
    seq = slot_i[s, R_SEQ]
    pos = 0
    while pos < n and slot_i[q[row, (head + pos) % cap], R_SEQ] < seq:
        pos += 1
    head = (head - 1) % cap
    for i in range(pos):
        q[row, (head + i) % cap] = q[row, (head + i + 1) % cap]
    q[row, (head + pos) % cap] = s
    si[head_i] = head
    si[len_i] = n + 1


@njit(cache=True)
def _unserve_all(si, sf, slot_i, slot_f, q, b):
    """Sync every served decoder and queue all decoders in arrival order again
    (FastEngine._unserve_all): the served ones go back in front, or merge when irregular."""
    cap = q.shape[1]
    n_sv, n_wq = si[SV_LEN], si[WQ_LEN]
    for i in range(n_sv):
        s = q[Q_SERVED, i]
        _sync(si, sf, slot_i, slot_f, s)
        slot_i[s, R_ACT] += 1
    if si[IRREGULAR] == 1:
        i = j = 0
        head = si[WQ_HEAD]
        while i < n_sv or j < n_wq:
            if j == n_wq or (i < n_sv and slot_i[q[Q_SERVED, i], R_SEQ]
                             < slot_i[q[Q_WAIT, (head + j) % cap], R_SEQ]):
                q[Q_TMP, i + j] = q[Q_SERVED, i]
                i += 1
            else:
                q[Q_TMP, i + j] = q[Q_WAIT, (head + j) % cap]
                j += 1
        for i in range(n_sv + n_wq):
            q[Q_WAIT, i] = q[Q_TMP, i]
        si[WQ_HEAD] = 0
        si[IRREGULAR] = 0
    else:
        for i in range(n_sv - 1, -1, -1):
            si[WQ_HEAD] = (si[WQ_HEAD] - 1) % cap
            q[Q_WAIT, si[WQ_HEAD]] = q[Q_SERVED, i]
    si[WQ_LEN] = n_sv + n_wq
    _clear_served(si, b)


@njit(cache=True)
def _preempt(si, slot_i, q, b, v):
    """Engine._preempt: ``v`` frees its blocks and must prefill its whole context again; a
    decoder goes back to the prompts in arrival order. The lost tokens are backlog again (the
    recorder's when the batch has started: _book_preemptions)."""
    lost = _cached(slot_i, v)
    si[KV_FREE] += _blocks(si, slot_i, v, b)
    slot_i[v, R_KV] = si[FIT_NO]
    slot_i[v, R_BLK] = 0
    if slot_i[v, R_PLEFT] == 0:  # decoding (every decoder is in the waiting ring during a fit)
        _ring_remove(si, q, Q_WAIT, WQ_HEAD, WQ_LEN, v)
        si[DECODERS] -= 1
        slot_i[v, R_ACT] += 1
        _ring_insort(si, slot_i, q, Q_PREFILL, PQ_HEAD, PQ_LEN, v)
    else:
        si[RES_PROMPTS] -= 1
    slot_i[v, R_PLEFT] += lost
    si[PREFILL_LEFT] += lost
    si[LOST] += lost
    si[PREEMPTIONS] += 1
    si[RECOMPUTED] += lost


@njit(cache=True)
def _book_preemptions(si, sf, bins):
    """Recorder.preempted for the preemptions of the batch just started: the backlog integral
    advances to the start (the same time for all of them, so once) and the lost tokens join it."""
    _advance(si, sf, bins, sf[NOW])
    si[BACKLOG] += si[LOST]
    si[LOST] = 0


@njit(cache=True)
def _newest_resident(si, slot_i, q, b):
    """The newest request holding blocks (prompts and decoders are each in arrival order)."""
    cap = q.shape[1]
    best = -1
    seen = 0
    i = 0
    while seen < si[RES_PROMPTS] and i < si[PQ_LEN]:  # the last of the prompts holding blocks
        s = q[Q_PREFILL, (si[PQ_HEAD] + i) % cap]
        i += 1
        if _blocks(si, slot_i, s, b) > 0:
            best = s
            seen += 1
    for i in range(si[WQ_LEN] - 1, -1, -1):
        s = q[Q_WAIT, (si[WQ_HEAD] + i) % cap]
        if _blocks(si, slot_i, s, b) > 0:
            if best < 0 or slot_i[s, R_SEQ] > slot_i[best, R_SEQ]:
                best = s
            break
    return best


@njit(cache=True)
def _expand(si, slot_i, q, pol, decoders, resident_only):
    """The planned prompts (q plan rows) and the oldest ``decoders`` decoders (of those holding
    blocks if ``resident_only``) as one plan in the policy's order (CompactPlan.expand), in the
    q fit rows; returns its length."""
    cap = q.shape[1]
    decode_first = pol.kind == KIND_VLLM_CHUNKED or pol.decode_first == 1
    n = 0
    for phase in range(2):
        if (phase == 0) == decode_first:
            taken = 0
            i = 0
            while taken < decoders:
                s = q[Q_WAIT, (si[WQ_HEAD] + i) % cap]
                i += 1
                if resident_only and _cached(slot_i, s) == 0:  # holds no blocks
                    continue
                q[Q_FIT_SLOT, n] = s
                q[Q_FIT_TOK, n] = 1
                n += 1
                taken += 1
        else:
            for e in range(si[PP_LEN]):
                q[Q_FIT_SLOT, n] = q[Q_PLAN_SLOT, e]
                q[Q_FIT_TOK, n] = q[Q_PLAN_TOK, e]
                n += 1
    return n


@njit(cache=True)
def _fit_memory(si, slot_i, q, pol, n_fit):
    """Engine._fit_memory on the plan in the q fit rows; returns how many entries it kept.

    Entries holding blocks grow first, in plan order; when one cannot, the newest resident
    request is preempted (maybe itself). Then, unless that happened, new entries are admitted in
    plan order while they leave the watermark free, up to the first refusal. Kept entries are
    those with R_BLK > 0 for this fit. (An entry holds blocks at the start of the fit unless it
    is new, and loses them only when preempted, which also makes it skipped: so entries are
    told apart as they come.)"""
    b = pol.block
    si[FIT_NO] += 1
    fit = si[FIT_NO]
    preempted = False
    for i in range(n_fit):
        s = q[Q_FIT_SLOT, i]
        held = _blocks(si, slot_i, s, b)
        if held == 0:  # new (or already preempted as a victim)
            continue
        need = _ceil_div(_cached(slot_i, s) + q[Q_FIT_TOK, i], b) - held
        while need > si[KV_FREE]:
            victim = _newest_resident(si, slot_i, q, b)
            _preempt(si, slot_i, q, b, victim)
            preempted = True
            if victim == s:
                break
        if slot_i[s, R_KV] == fit and slot_i[s, R_BLK] == 0:
            continue
        slot_i[s, R_KV] = fit
        slot_i[s, R_BLK] = held + need
        si[KV_FREE] -= need
    if not preempted:  # vLLM admits no new request in a step that preempted one
        floor = pol.kv_floor
        for i in range(n_fit):
            s = q[Q_FIT_SLOT, i]
            if slot_i[s, R_KV] == fit:  # grown above
                continue
            need = _ceil_div(q[Q_FIT_TOK, i], b)
            if si[KV_FREE] - need < floor:
                break
            slot_i[s, R_KV] = fit
            slot_i[s, R_BLK] = need
            si[KV_FREE] -= need
            if slot_i[s, R_PLEFT] > 0:
                si[RES_PROMPTS] += 1
    kept = 0
    for i in range(n_fit):
        s = q[Q_FIT_SLOT, i]
        if slot_i[s, R_KV] == fit and slot_i[s, R_BLK] > 0:
            kept += 1
    return kept


@njit(cache=True)
def _resident_prompts(si, slot_i, q):
    """The prompts holding blocks, in queue order, into q[Q_TMP]; returns how many. (At a batch
    boundary, and after a fit that kept nothing, a request holds blocks iff it has cached tokens.)"""
    cap = q.shape[1]
    n = 0
    i = 0
    while n < si[RES_PROMPTS] and i < si[PQ_LEN]:
        s = q[Q_PREFILL, (si[PQ_HEAD] + i) % cap]
        i += 1
        if _cached(slot_i, s) > 0:
            q[Q_TMP, n] = s
            n += 1
    return n


@njit(cache=True)
def _form_fitted(si, sf, slot_i, slot_f, q, heap, pol):
    """FastEngine._form_fitted: plan with the full view and fit the plan request by request
    (Engine.form_plan: victims, watermark, the resident-only re-plan). Leaves the kept prompts
    in the q plan rows and serves the kept decoders (not necessarily the oldest: IRREGULAR);
    returns their number, or BLOCKED_PLAN. The run is a single repeat."""
    cap = q.shape[1]
    b = pol.block
    _unserve_all(si, sf, slot_i, slot_f, q, b)  # every decoder synced, in the waiting ring
    decoders = _plan(si, slot_i, q, pol, Q_PREFILL, si[PQ_HEAD], si[PQ_LEN] + si[LP_LEN], si[DECODERS],
                     si[RES_PROMPTS])
    if decoders == 0 and si[PP_LEN] == 0:
        return BLOCKED_PLAN
    n_fit = _expand(si, slot_i, q, pol, decoders, False)
    kept = _fit_memory(si, slot_i, q, pol, n_fit)
    if kept == 0:  # memory refused every entry: plan again with the requests holding blocks
        n_vis = _resident_prompts(si, slot_i, q)
        n_dec = 0
        for i in range(si[WQ_LEN]):
            if _cached(slot_i, q[Q_WAIT, (si[WQ_HEAD] + i) % cap]) > 0:
                n_dec += 1
        if n_vis + n_dec > 0:
            decoders = _plan(si, slot_i, q, pol, Q_TMP, 0, n_vis, n_dec, n_vis)
            if decoders > 0 or si[PP_LEN] > 0:
                n_fit = _expand(si, slot_i, q, pol, decoders, True)
                kept = _fit_memory(si, slot_i, q, pol, n_fit)
    if kept == 0:
        return BLOCKED_PLAN
    fit = si[FIT_NO]
    n_dec = 0
    n_pre = 0
    for i in range(n_fit):
        s = q[Q_FIT_SLOT, i]
        if slot_i[s, R_KV] != fit or slot_i[s, R_BLK] == 0:
            continue
        if slot_i[s, R_PLEFT] == 0:  # a decoder (plan order is arrival order)
            if _cached(slot_i, s) == 0:
                si[UNCACHED] -= 1  # served now: it holds blocks from here on
            q[Q_TMP, n_dec] = s
            n_dec += 1
        else:
            q[Q_PLAN_SLOT, n_pre] = s
            q[Q_PLAN_TOK, n_pre] = q[Q_FIT_TOK, i]
            n_pre += 1
    si[PP_LEN] = n_pre
    if n_dec > 0:
        if q[Q_WAIT, (si[WQ_HEAD] + n_dec - 1) % cap] != q[Q_TMP, n_dec - 1]:
            # not the oldest (the re-plan skipped a decoder holding no blocks): queue the chosen
            # ones first, the others after them in arrival order, and serve the first n_dec
            head, n_wq = si[WQ_HEAD], si[WQ_LEN]
            rest = n_dec
            for i in range(n_wq):
                s = q[Q_WAIT, (head + i) % cap]
                if slot_i[s, R_KV] != fit or slot_i[s, R_BLK] == 0:
                    q[Q_TMP, rest] = s
                    rest += 1
            for i in range(n_wq):
                q[Q_WAIT, i] = q[Q_TMP, i]
            si[WQ_HEAD] = 0
            si[IRREGULAR] = 1
        _serve(si, sf, slot_i, slot_f, q, heap, b, n_dec)
    return n_dec


@njit(cache=True)
def _fit_compact(si, sf, slot_i, slot_f, q, heap, pol, decoders):
    """FastEngine._fit_compact: vLLM's block rules for a compact plan that preempts nobody.
    Serves the decoders, allocates, and leaves the admitted prompts in the q plan rows; returns
    their number, or FITTED (nothing allocated) when a request holding blocks could not grow."""
    b = pol.block
    need = 0
    if decoders > 0:
        _serve(si, sf, slot_i, slot_f, q, heap, b, decoders)
        need = si[KV + (-si[SERVES]) % b]
    for e in range(si[PP_LEN]):
        c = _cached(slot_i, q[Q_PLAN_SLOT, e])
        if c > 0:
            need += _ceil_div(c + q[Q_PLAN_TOK, e], b) - _ceil_div(c, b)
    if need > si[KV_FREE]:
        return FITTED
    si[KV_FREE] -= need
    floor = pol.kv_floor
    keep = 0
    refused = False
    for e in range(si[PP_LEN]):
        s, tok = q[Q_PLAN_SLOT, e], q[Q_PLAN_TOK, e]
        if _cached(slot_i, s) == 0:
            if refused:
                continue
            blocks = _ceil_div(tok, b)
            if si[KV_FREE] - blocks < floor:
                refused = True  # the first refusal stops admission (FCFS head of line)
                continue
            si[KV_FREE] -= blocks
            si[RES_PROMPTS] += 1
        q[Q_PLAN_SLOT, keep] = s
        q[Q_PLAN_TOK, keep] = tok
        keep += 1
    si[PP_LEN] = keep
    return keep


@njit(cache=True)
def _form_memory(si, sf, slot_i, slot_f, q, heap, pol, decoders):
    """FastEngine._form_compact after the policy planned ``decoders`` and the q plan rows: fit
    the plan (asking again with the resident prompts when memory refused all of it). Returns the
    decoders to serve, BLOCKED_PLAN, or FITTED (the caller then fits it request by request)."""
    kept = _fit_compact(si, sf, slot_i, slot_f, q, heap, pol, decoders)
    if kept == FITTED:
        return FITTED
    if kept == 0 and decoders == 0:  # memory refused the whole plan
        n_vis = _resident_prompts(si, slot_i, q)
        if n_vis > 0 or si[DECODERS] > 0:  # every decoder holds blocks here (none uncached)
            decoders = _plan(si, slot_i, q, pol, Q_TMP, 0, n_vis, si[DECODERS], n_vis)
            if decoders > 0 or si[PP_LEN] > 0:
                kept = _fit_compact(si, sf, slot_i, slot_f, q, heap, pol, decoders)
                if kept == FITTED:
                    return FITTED
        if kept == 0 and decoders == 0:
            return BLOCKED_PLAN
    return decoders


@njit(cache=True)
def _growth_at(si, q, b, i):
    """_Growth.at: blocks that repeats 1..i of the running run allocate beyond its first."""
    n = i + 1
    total = (n // b) * si[KV + 2 * b] + si[KV + b + n % b] - si[KV + b + 1]
    for e in range(si[PP_LEN]):
        c, t = q[Q_PLAN_C, e], q[Q_PLAN_TOK, e]
        total += _ceil_div(c + n * t, b) - _ceil_div(c + t, b)
    return total


@njit(cache=True)
def _repeats_within(si, q, b, free, k):
    """_Growth.repeats_within: most repeats (1..k) whose growth fits in ``free`` blocks."""
    if _growth_at(si, q, b, k - 1) <= free:
        return k
    lo, hi = 0, k - 1  # at(lo) <= free < at(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _growth_at(si, q, b, mid) <= free:
            lo = mid
        else:
            hi = mid
    return lo + 1


@njit(cache=True)
def _kv_used(si, sf, pol, used):
    """Recorder.kv_used: a batch started with ``used`` blocks held."""
    usage = used / pol.kv_total
    if usage > sf[KV_PEAK]:
        sf[KV_PEAK] = usage
    sf[KV_SUM] += usage
    si[KV_BATCHES] += 1


@njit(cache=True)
def _book_blocks(si, sf, q, pol, m):
    """FastEngine._book_blocks: take what the next m repeats allocate beyond the run's first
    from the pool, and report the blocks held at each of their starts."""
    b = pol.block
    done = si[RUN_OFF]
    before = _growth_at(si, q, b, done - 1) if done > 0 else 0
    si[KV_FREE] -= _growth_at(si, q, b, done + m - 1) - before
    used = si[KV_RUN_USED]
    for i in range(done, done + m):
        _kv_used(si, sf, pol, used + _growth_at(si, q, b, i))


@njit(cache=True)
def _start_batch(si, sf, slot_i, slot_f, q, heap, pol, t_table, ends, targets, next_arrival):
    """Ask the policy once and set up the run of repeats of its plan (FastEngine.begin_batch).

    The run stops at the first batch end at or after ``next_arrival``: that arrival would cut it
    there anyway (the same repeats are kept), so later ends are never computed. With memory, the
    plan is fitted into the cache first, and the run stops before the first repeat that would
    preempt; a plan that preempts (or serves a decoder holding no blocks) runs one repeat. With a
    binding k_max its fill targets are left due (T_LIST = TARGETS_DUE: see _fill_targets).
    """
    if si[IN_SYSTEM] == 0:
        return 0
    b = pol.block
    prompts = si[PQ_LEN] + si[LP_LEN]  # the planners read only the slotted head of them
    fitted = False
    if b > 0 and si[UNCACHED] > 0:
        decoders = _form_fitted(si, sf, slot_i, slot_f, q, heap, pol)
        fitted = True
    else:
        if pol.kind == KIND_KFCFS:
            decoders = _plan_kfcfs(si, slot_i, q, pol, Q_PREFILL, si[PQ_HEAD], prompts, si[DECODERS])
        else:
            decoders = _plan_vllm_chunked(si, slot_i, q, pol, Q_PREFILL, si[PQ_HEAD], prompts,
                                          si[DECODERS], si[RES_PROMPTS] if b > 0 else -1)
        if decoders == 0 and si[PP_LEN] == 0:
            decoders = BLOCKED_PLAN
        elif b > 0:
            decoders = _form_memory(si, sf, slot_i, slot_f, q, heap, pol, decoders)
            if decoders == FITTED:
                decoders = _form_fitted(si, sf, slot_i, slot_f, q, heap, pol)
                fitted = True
    if decoders == BLOCKED_PLAN:
        si[BLOCKED] = 1
        sf[BLOCKED_SINCE] = sf[NOW]
        return 0
    n_plan = si[PP_LEN]
    prefill = 0
    k = 1 if fitted else MAX_REPEAT
    for e in range(n_plan):
        tok = q[Q_PLAN_TOK, e]
        prefill += tok
        k = min(k, slot_i[q[Q_PLAN_SLOT, e], R_PLEFT] // tok)
    n = prefill + decoders
    duration = t_table[n]
    if not duration > 0 or math.isinf(duration):
        si[ERR_N] = n
        return BAD_BATCH_TIME
    if decoders > 0:
        if not fitted:
            _serve(si, sf, slot_i, slot_f, q, heap, b, decoders)
        k = min(k, _next_finish(si, slot_i, heap) - si[SERVES])
    if b > 0:  # the run's block growth (_Growth), and its last repeat that fits
        s0 = si[SERVES]
        si[KV + b] = 0
        acc = 0
        for j in range(b):
            if decoders > 0 and not fitted:
                acc += si[KV + (-(s0 + j)) % b]
            si[KV + b + j + 1] = acc
        for e in range(n_plan):
            q[Q_PLAN_C, e] = _cached(slot_i, q[Q_PLAN_SLOT, e])
        k = _repeats_within(si, q, b, si[KV_FREE], k)
        si[KV_RUN_USED] = pol.kv_total - si[KV_FREE]
    e = sf[NOW]
    run = k
    for i in range(k):
        e = e + duration
        ends[i] = e
        if e >= next_arrival:
            run = i + 1
            break
    k = run
    si[RUN_OFF] = 0
    si[RUN_LEN] = k
    si[T_OFF] = 0
    if pol.kmax == 0 or si[PQ_LEN] + si[LP_LEN] + si[DECODERS] <= pol.kmax:
        si[T_LIST] = 0
        si[T_BASE] = si[PREFILL_LEFT] + si[DECODERS]
        si[T_X] = prefill
    else:
        si[T_LIST] = TARGETS_DUE
    si[ACTIVE] = 1
    si[P_DEC] = decoders
    si[P_PRE] = prefill
    sf[DURATION] = duration
    si[STOPPED] = 0
    sf[BATCH_END] = ends[k - 1]
    return 0


@njit(cache=True)
def _emit(si, slot_i, slot_f, out_f, out_i, s, finish_ms):
    """Append one request's record to the output buffer."""
    r = si[N_OUT]
    out_i[r, 0] = s
    out_i[r, 1] = slot_i[s, R_ID]
    out_i[r, 2] = slot_i[s, R_PRE]
    out_i[r, 3] = slot_i[s, R_DEC]
    out_i[r, 4] = slot_i[s, R_TOK]
    out_f[r, 0] = slot_f[s, R_ARR]
    out_f[r, 1] = slot_f[s, R_FIRST]
    out_f[r, 2] = finish_ms
    si[N_OUT] = r + 1


@njit(cache=True)
def _itl(si, itl, gap, count):
    r = si[N_ITL]
    itl[0, r] = gap
    itl[1, r] = count
    si[N_ITL] = r + 1


@njit(cache=True)
def _drop_prompts(si, slot_i, q, count):
    """Remove the ``count`` prompts that finished prefill (FastEngine._drop_prompts, memory
    only). They held blocks, so they are among the first prompts: the ones before the last of
    them move up behind it and the head advances."""
    cap = q.shape[1]
    head = si[PQ_HEAD]
    last = -1
    seen = 0
    while seen < count and last + 1 < si[PQ_LEN]:
        last += 1
        if slot_i[q[Q_PREFILL, (head + last) % cap], R_PLEFT] == 0:
            seen += 1
    to = last
    for i in range(last, -1, -1):
        s = q[Q_PREFILL, (head + i) % cap]
        if slot_i[s, R_PLEFT] > 0:
            q[Q_PREFILL, (head + to) % cap] = s
            to -= 1
    si[PQ_HEAD] = (head + count) % cap
    si[PQ_LEN] -= count
    si[RES_PROMPTS] -= count


@njit(cache=True)
def _book(si, sf, slot_i, slot_f, q, heap, pol, ends, targets, bins, out_f, out_i, itl, m):
    """Apply the first m running repeats: tokens, timestamps, metrics (FastEngine._book)."""
    cap = q.shape[1]
    b = pol.block
    off = si[RUN_OFF]
    prefill, decode, duration = si[P_PRE], si[P_DEC], sf[DURATION]
    n = prefill + decode
    now = ends[off + m - 1]
    first_out = si[N_OUT]
    if b > 0:
        _book_blocks(si, sf, q, pol, m)
    if decode > 0:
        first_end = ends[off]
        if si[N_CONT] > 0:
            _itl(si, itl, first_end - sf[SERVED_MS], si[N_CONT])
        for i in range(si[JN_LEN]):
            _itl(si, itl, first_end - slot_f[q[Q_JOIN, i], R_LAST], 1)
        si[JN_LEN] = 0
        if m > 1:
            _itl(si, itl, duration, (m - 1) * decode)
        si[SERVES] += m
        sf[SERVED_MS] = now
        done = 0
        while si[HP_LEN] > 0 and heap[0, 0] <= si[SERVES]:
            s, act = heap[3, 0], heap[2, 0]
            _heap_pop(heap, si)
            if act != slot_i[s, R_ACT]:
                continue
            if b > 0:
                si[KV + (_cached(slot_i, s) - slot_i[s, R_C0]) % b] -= 1
            slot_i[s, R_DLEFT] = 0
            slot_f[s, R_LAST] = now
            slot_i[s, R_ACT] += 1
            slot_i[s, R_C0] = -1  # marks "finished" for the removal below
            _emit(si, slot_i, slot_f, out_f, out_i, s, now)
            done += 1
        if done > 0:
            keep = 0
            for i in range(si[SV_LEN]):
                s = q[Q_SERVED, i]
                if slot_i[s, R_C0] != -1:
                    q[Q_SERVED, keep] = s
                    keep += 1
            si[SV_LEN] = keep
        si[DECODERS] -= done
        si[N_CONT] = decode - done
    if si[IRREGULAR] == 1:  # a fitted batch served decoders out of order: restore the order
        _unserve_all(si, sf, slot_i, slot_f, q, b)
    prompts_done = 0
    want_w = _waiting_slotted(pol)
    for e in range(si[PP_LEN]):
        s = q[Q_PLAN_SLOT, e]
        slot_i[s, R_PLEFT] -= q[Q_PLAN_TOK, e] * m
        if slot_i[s, R_PLEFT] == 0:
            prompts_done += 1
            if math.isnan(slot_f[s, R_FIRST]):  # else a recomputation: it keeps its first token
                slot_f[s, R_FIRST] = now
            slot_f[s, R_LAST] = now
            if slot_i[s, R_DLEFT] > 0:
                _enter_decode(si, sf, slot_i, slot_f, q, heap, b, want_w, s)
            else:
                _emit(si, slot_i, slot_f, out_f, out_i, s, now)
    if prompts_done > 0:
        if b > 0:  # with memory a finished prompt need not be among the oldest
            _drop_prompts(si, slot_i, q, prompts_done)
        else:  # the oldest ones (FCFS prefill)
            si[PQ_HEAD] = (si[PQ_HEAD] + prompts_done) % cap
            si[PQ_LEN] -= prompts_done
    si[PREFILL_LEFT] -= prefill * m
    total, viol, wasted = _audit(si, pol, targets, m, n)
    # recorder: tokens done over the m batch ends (closed form), then the batch statistics
    if m == 1:
        _advance(si, sf, bins, now)
        si[BACKLOG] -= n
    else:
        t0 = sf[REC_LAST]
        inner = 0.0
        for i in range(off, off + m - 1):
            inner += now - ends[i]
        area = si[BACKLOG] * (now - t0) - n * inner
        sf[BACKLOG_AREA] += area
        sf[IN_SYSTEM_AREA] += si[IN_SYSTEM] * (now - t0)
        _bins_fit(sf, BIN_WIDTH, bins, now)
        w = sf[BIN_WIDTH]
        nb = bins.shape[0]
        b0 = int(t0 // w)
        if b0 == min(int(now // w), nb - 1):
            bins[b0] += area
        else:
            start = t0
            for i in range(m):
                _bins_add(sf, BIN_WIDTH, bins, start, ends[off + i], float(si[BACKLOG] - n * i))
                start = ends[off + i]
        sf[REC_LAST] = now
        si[BACKLOG] -= n * m
    _batches(si, sf, m, duration * m, prefill, decode, si[PP_LEN] + decode, total, viol, wasted)
    sf[NOW] = now
    si[RUN_OFF] = off + m
    si[RUN_LEN] -= m
    if si[RUN_LEN] == 0:
        si[ACTIVE] = 0
        sf[BATCH_END] = np.inf
    # settle: finished requests leave the engine, free their blocks and their slots
    for r in range(first_out, si[N_OUT]):
        s = out_i[r, 0]
        si[IN_SYSTEM] -= 1
        if b > 0:
            si[KV_FREE] += _ceil_div(slot_i[s, R_PRE] + slot_i[s, R_DEC], b)
        q[Q_FREE, si[N_FREE]] = s
        si[N_FREE] += 1


@njit(cache=True)
def _cut(si, sf, slot_i, slot_f, q, heap, pol, ends, targets, bins, out_f, out_i, itl, t_ms):
    """Keep the repeats that start before t_ms; book all but the last of them."""
    off, length = si[RUN_OFF], si[RUN_LEN]
    lo, hi = off, off + length - 1  # bisect_left over ends[off : off + length - 1]
    while lo < hi:
        mid = (lo + hi) // 2
        if ends[mid] < t_ms:
            lo = mid + 1
        else:
            hi = mid
    keep = max(1, 1 + lo - off)
    if keep < length:
        si[RUN_LEN] = keep
        sf[BATCH_END] = ends[off + keep - 1]
    if keep > 1:
        _book(si, sf, slot_i, slot_f, q, heap, pol, ends, targets, bins, out_f, out_i, itl,
              keep - 1)


@njit(cache=True)
def _next_event(si, sf):
    if si[ACTIVE] == 1:
        return sf[BATCH_END]
    if si[IN_SYSTEM] > 0 and si[BLOCKED] == 0:
        return sf[NOW]
    return np.inf


@njit(cache=True)
def run(state, arrivals):
    """Run the event loop of ``simulate`` until done or until the driver must act (return code).

    ``state``: the engine's arrays, an ``EngineState`` (the driver's
    ``llmqueue.engines.compiled._State.kernel_state``). ``arrivals``: the arrivals handed in, an
    ``Arrivals`` (times, prefill and decode tokens, ids, and each visit's network token, carried
    through untouched), taken from ``si[A_POS]`` on.

    Finished requests are appended to ``state.out_f`` (arrival, first token, finish) and
    ``state.out_i`` (slot, id, prefill, decode, token); inter-token latencies to ``state.itl`` as
    (value, count) columns. ``lp_*``, ``lw_*``: the compact tails of the prompts and of the
    waiting decoders.
    """
    si, sf, slot_i, slot_f, q, heap = state.si, state.sf, state.slot_i, state.slot_f, state.q, state.heap
    pol, t_table, ends, targets, bins = state.pol, state.t_table, state.ends, state.targets, state.bins
    out_f, out_i, itl = state.out_f, state.out_i, state.itl
    lp_i, lp_f, lw_i, lw_f = state.lp_i, state.lp_f, state.lw_i, state.lw_f
    a_ms, a_pre, a_dec, a_id, a_tok = arrivals.ms, arrivals.pre, arrivals.dec, arrivals.id, arrivals.tok
    cap = q.shape[1]
    b = pol.block
    n_arr = a_ms.shape[0]
    room = out_f.shape[0]
    itl_room = itl.shape[1]
    lp_cap = lp_i.shape[0]
    prompts_slotted = _prompts_slotted(pol, 0)  # + si[RES_PROMPTS]
    waiting_slotted = _waiting_slotted(pol)
    while True:
        # a step books at most (served prefix + planned prompts) records and ITL entries
        need = si[SV_LEN] + si[PP_LEN] + si[JN_LEN] + 4
        if si[N_OUT] + need > room or si[N_ITL] + need > itl_room:
            return NEED_ROOM
        if si[T_LIST] == TARGETS_DUE:
            _fill_targets(si, slot_i, q, pol, lp_i, targets)
        if (si[NEW_LEN] > 0 or si[LP_LEN] == lp_cap  # whether _stock has something to do
                or (si[LP_LEN] > 0 and si[PQ_LEN] < prompts_slotted + si[RES_PROMPTS])
                or (si[LW_LEN] > 0 and si[WQ_LEN] < waiting_slotted)):
            code = _stock(si, slot_i, slot_f, q, pol, lp_i, lp_f, lw_i, lw_f)
            if code != 0:
                return code
        t = _next_event(si, sf)
        if si[A_POS] < n_arr:
            i = si[A_POS]
            arrival = a_ms[i]
            if arrival <= t:
                pre, dec = a_pre[i], a_dec[i]
                if si[N_FREE] == 0:
                    return _need(si, 1, 0, 0)
                if b > 0 and pre == 0 and si[N_FREE] <= si[LP_LEN]:  # it slots the compact prompts
                    return _need(si, si[LP_LEN] + 1, 0, 0)
                # -- submit (FastEngine.submit, then Engine.submit) --
                if si[ACTIVE] == 1 and arrival >= sf[NOW]:
                    _cut(si, sf, slot_i, slot_f, q, heap, pol, ends, targets, bins, out_f, out_i,
                         itl, arrival)
                overdue = si[ACTIVE] == 0 and si[IN_SYSTEM] > 0 and si[BLOCKED] == 0
                if overdue and arrival > sf[NOW]:  # (not reached from this loop: kept for parity)
                    code = _start_batch(si, sf, slot_i, slot_f, q, heap, pol, t_table, ends, targets,
                                        np.inf)
                    if si[LOST] > 0:
                        _book_preemptions(si, sf, bins)
                    if code != 0:
                        return code
                if si[ACTIVE] == 0:
                    if si[BLOCKED] == 1:
                        sf[STALL] += arrival - sf[BLOCKED_SINCE]
                        si[BLOCKED] = 0
                    sf[NOW] = arrival
                if b > 0 and _ceil_div(pre + dec, b) > pol.kv_total - pol.kv_floor:
                    si[REJECTED] += 1  # its KV cache can never fit (KVCache.fits_alone): refused
                    si[A_POS] = i + 1
                    continue
                seq = si[SEQ]
                si[SEQ] += 1
                first = np.nan if pre > 0 else arrival
                tokens = pre + dec
                _advance(si, sf, bins, arrival)
                si[BACKLOG] += tokens
                si[IN_SYSTEM] += 1
                si[ARRIVALS] += 1
                si[ARRIVED_TOKENS] += tokens
                sf[LAST_ARRIVAL] = arrival
                if pre > 0:
                    si[PREFILL_LEFT] += pre
                    if si[LP_LEN] > 0 or si[PQ_LEN] >= prompts_slotted + si[RES_PROMPTS]:
                        _lz_append(si, LP_HEAD, LP_LEN, lp_i, lp_f, a_id[i], seq, pre, dec, a_tok[i],
                                   arrival, first)
                    else:
                        s = _slot_new(si, slot_i, slot_f, q, a_id[i], a_tok[i], seq, pre, dec, pre,
                                      arrival, first)
                        q[Q_PREFILL, (si[PQ_HEAD] + si[PQ_LEN]) % cap] = s
                        si[PQ_LEN] += 1
                else:
                    while b > 0 and si[LP_LEN] > 0:  # with memory: every older prompt into slots
                        s = _slot_from_tail(si, slot_i, slot_f, q, LP_HEAD, LP_LEN, lp_i, lp_f, True)
                        q[Q_PREFILL, (si[PQ_HEAD] + si[PQ_LEN]) % cap] = s
                        si[PQ_LEN] += 1
                    s = _slot_new(si, slot_i, slot_f, q, a_id[i], a_tok[i], seq, pre, dec, 0, arrival,
                                  first)
                    _enter_decode(si, sf, slot_i, slot_f, q, heap, b, waiting_slotted, s)
                si[A_POS] = i + 1
                continue
        elif si[A_FINAL] == 0:
            return NEED_ARRIVALS
        if si[A_POS] >= n_arr and si[A_FINAL] == 1 and (t >= sf[HORIZON] or math.isinf(t)):
            return DONE
        # -- step --
        if si[NET] == 1:  # network mode: stop where the driver must route (see compiled.py)
            if t > sf[LIMIT]:
                return PAUSED
            if si[ACTIVE] == 1:
                before = si[N_OUT]
                _book(si, sf, slot_i, slot_f, q, heap, pol, ends, targets, bins, out_f, out_i,
                      itl, si[RUN_LEN])
                if si[END_ONLY] == 1 or si[N_OUT] > before:
                    return ENDED
            elif si[END_ONLY] == 1:
                return PAUSED
            next_arrival = a_ms[si[A_POS]] if si[A_POS] < n_arr else np.inf
            code = _start_batch(si, sf, slot_i, slot_f, q, heap, pol, t_table, ends, targets,
                                next_arrival)
            if code != 0:
                return code
            if si[START_ONLY] == 1:
                return PAUSED
            continue
        if si[ACTIVE] == 1:
            _book(si, sf, slot_i, slot_f, q, heap, pol, ends, targets, bins, out_f, out_i, itl,
                  si[RUN_LEN])
        next_arrival = a_ms[si[A_POS]] if si[A_POS] < n_arr else np.inf
        code = _start_batch(si, sf, slot_i, slot_f, q, heap, pol, t_table, ends, targets,
                            next_arrival)
        if si[LOST] > 0:
            _book_preemptions(si, sf, bins)
        if code != 0:
            return code


@njit(cache=True)
def stop(state, horizon):
    """End at the horizon: book the repeats that end before it and count the one running.
    ``state``: the engine's arrays (``EngineState``), as for ``run``."""
    si, sf, slot_i, slot_f, q, heap = state.si, state.sf, state.slot_i, state.slot_f, state.q, state.heap
    pol, ends, targets, bins = state.pol, state.ends, state.targets, state.bins
    out_f, out_i, itl, lp_i = state.out_f, state.out_i, state.itl, state.lp_i
    if si[ACTIVE] == 0 or si[STOPPED] == 1:
        return
    if si[T_LIST] == TARGETS_DUE:  # the run was set up and the loop returned before its top
        _fill_targets(si, slot_i, q, pol, lp_i, targets)
    _cut(si, sf, slot_i, slot_f, q, heap, pol, ends, targets, bins, out_f, out_i, itl, horizon)
    n = si[P_PRE] + si[P_DEC]
    total, viol, wasted = _audit(si, pol, targets, 1, n)
    _batches(si, sf, 1, sf[DURATION], si[P_PRE], si[P_DEC], si[PP_LEN] + si[P_DEC], total, viol,
             wasted)
    b = pol.block
    if b > 0:
        _kv_used(si, sf, pol, si[KV_RUN_USED] + _growth_at(si, q, b, si[RUN_OFF]))
    si[STOPPED] = 1


# -- twins: each compiled function and the Python code it ports -------------------------------------

_FAST = "llmqueue.engines.fast:"
_REF = "llmqueue.engines.reference:"
_MET = "llmqueue.engines.metrics:"
_HEAP = "the finish heap of the served decoders (FastEngine keeps it with heapq)"
_TAIL = "compact tails: kernel-only storage of requests no step reaches (see 'Compact tails')"

TWINS: dict[str, tuple[str | None, str]] = {
    "_bins_fit": (_MET + "TimeBins._fit", ""),
    "_bins_add": (_MET + "TimeBins.add", ""),
    "_advance": (_MET + "Recorder._advance", ""),
    "_earlier": (None, _HEAP),
    "_heap_move": (None, _HEAP),
    "_heap_put": (None, _HEAP),
    "_heap_push": (None, _HEAP),
    "_heap_pop": (None, _HEAP),
    "_heap_compact": (None, _HEAP),
    "_ring_get": (None, "ring-buffer read: the queues are Python lists in FastEngine"),
    "_sync": (_FAST + "FastEngine._sync", ""),
    "_cached": (None, "Job.cached (a slot's tokens in the KV cache), computed from its columns"),
    "_ceil_div": (_FAST + "_ceil_div", ""),
    "_prompts_slotted": (None, _TAIL),
    "_waiting_slotted": (None, _TAIL),
    "_need": (None, "asks the driver for more slots or tail room (NEED_SLOTS)"),
    "_lz_write": (None, _TAIL),
    "_lz_append": (None, _TAIL),
    "_slot_new": (None, "slot allocation for a new request (FastEngine makes a Job)"),
    "_slot_from_tail": (None, _TAIL),
    "_decoder_to_tail": (None, _TAIL),
    "_stock": (None, _TAIL),
    "_clear_served": (None, "empties the served prefix: part of FastEngine._serve and _unserve_all"),
    "_serve": (_FAST + "FastEngine._serve", ""),
    "_next_finish": (_FAST + "FastEngine._next_finish", ""),
    "_enter_decode": (_FAST + "FastEngine.enter_decode", ""),
    "_plan_prompt": (None, "appends one prompt to a plan (a dict entry in the Python planners)"),
    "_plan_kfcfs": ("llmqueue.policies.fcfs:KFCFS.plan_compact", ""),
    "_plan_vllm_chunked": ("llmqueue.policies.fcfs:VLLMChunked.plan_compact", ""),
    "_plan": (None, "dispatch on the policy kind (pol.kind) to _plan_kfcfs or _plan_vllm_chunked"),
    "_fill_targets": (_FAST + "fill_targets", ""),
    "_linear_sum": (_FAST + "LinearTargets._sum", ""),
    "_first_at_most": (_FAST + "LinearTargets._first_at_most", ""),
    "_audit": (_FAST + "LinearTargets.audit", ""),
    "_batches": (_MET + "Recorder.batches", ""),
    "_blocks": (None, "Job.blocks, read from a slot (during a fit, as the fit left them)"),
    "_ring_remove": (None, "list.remove on a ring-buffer queue"),
    "_ring_insort": (None, "bisect.insort by arrival on a ring-buffer queue"),
    "_unserve_all": (_FAST + "FastEngine._unserve_all", ""),
    "_preempt": (_REF + "Engine._preempt", ""),
    "_book_preemptions": (_MET + "Recorder.preempted", ""),
    "_newest_resident": (None, "the newest request holding blocks, a scan Engine._fit_memory does inline"),
    "_expand": (None, "a compact plan as request entries (FastEngine._form_fitted builds them inline)"),
    "_fit_memory": (_REF + "Engine._fit_memory", ""),
    "_resident_prompts": (None, "the prompts holding blocks (FastEngine._compact_view(resident_only=True))"),
    "_form_fitted": (_FAST + "FastEngine._form_fitted", ""),
    "_fit_compact": (_FAST + "FastEngine._fit_compact", ""),
    "_form_memory": (_FAST + "FastEngine._form_compact", ""),
    "_growth_at": (_FAST + "_Growth.at", ""),
    "_repeats_within": (_FAST + "_Growth.repeats_within", ""),
    "_kv_used": (_MET + "Recorder.kv_used", ""),
    "_book_blocks": (_FAST + "FastEngine._book_blocks", ""),
    "_start_batch": (_FAST + "FastEngine.begin_batch", ""),
    "_emit": (None, "appends a finished request to the output buffer (Job.record in Python)"),
    "_itl": (None, "appends inter-token latencies to the output buffer (the recorder's ValueCounts)"),
    "_drop_prompts": (_FAST + "FastEngine._drop_prompts", ""),
    "_book": (_FAST + "FastEngine._book", ""),
    "_cut": (_FAST + "FastEngine._cut", ""),
    "_next_event": (_REF + "Engine.next_event_ms", ""),
    "run": ("llmqueue.sim.run:_run_engine", ""),
    "stop": (_FAST + "FastEngine.stop", ""),
}
"""Each compiled function of this module -> (the Python function or method it ports, as
"module:qualified.name", or None; a note: why there is no twin). Read both side by side when
changing either; tests/test_kernel_twins.py checks that the table is complete and every twin
exists."""


def tie_cache(namespace: dict[str, object], module: str, *upstream: object) -> None:
    """Make numba's cache of the compiled functions of ``module`` (those among ``namespace``, its
    globals) stale whenever the files of the ``upstream`` compiled functions change as well.

    numba stamps a function's cache with its own source file only, yet the cached code includes
    the functions it calls from other modules (netkernel.py and polkernel.py call this module's).
    The stamp becomes the pair (the file's stamp, the upstream files' stamps). Best effort: with
    numba internals other than expected, the cache keeps numba's own stamp (edit the calling file
    too after editing an upstream one)."""
    try:
        stamps = tuple(f._cache._impl.locator.get_source_stamp() for f in upstream)  # type: ignore[attr-defined]
        for value in list(namespace.values()):
            cache = getattr(value, "_cache", None)
            if getattr(getattr(value, "py_func", None), "__module__", None) == module and cache:
                cache_file = cache._cache_file
                cache_file._source_stamp = (cache_file._source_stamp, stamps)
    except (AttributeError, OSError):
        return
