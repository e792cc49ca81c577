"""The compiled event loop: the fast engine's dynamics for the shipped policies, in numba.

``FastEngine`` pays per event but each event still costs tens of microseconds of Python (policy
call, plan check, records). This module runs the same event loop, the same float operations in
the same order, compiled with numba: the (K_p, K_d)-FCFS family and current vLLM are ported as
plain loops over the prompt queue, decoders stay implicit (served prefix, finish heap), and runs
of identical iterations are booked at once, exactly as in ``llmqueue.fastengine`` (read that
module and docs/fastpath.md first: this one mirrors it line by line).

All state lives in numpy arrays, so a run can stop and resume: the loop returns to Python when it
needs the next chunk of arrivals, room for its outputs, or more request slots. The driver
(``llmqueue.compiled``) feeds it and turns what it returns into the usual metrics.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

MAX_REPEAT = 1 << 16  # same as llmqueue.fastengine.MAX_REPEAT

# -- return codes --------------------------------------------------------------------------------
DONE = 0
NEED_ARRIVALS = 1
NEED_ROOM = 2  # output buffers nearly full: drain them and call again
NEED_SLOTS = 3  # request slots exhausted: grow the state and call again
BAD_BATCH_TIME = 4  # t(n) not positive and finite; n in si[ERR_N]
PAUSED = 5  # network mode: the next event is past the time limit (or the requested step is done)
ENDED = 6  # network mode: a batch run ended (it finished requests, or only ending was asked for)

# -- integer scalars (si) ------------------------------------------------------------------------
(N_FREE, PQ_HEAD, PQ_LEN, WQ_HEAD, WQ_LEN, SV_LEN, JN_LEN, PP_LEN, HP_LEN, DECODERS, SERVES, SEQ,
 ACTIVE, P_DEC, P_PRE, RUN_OFF, RUN_LEN, T_LIST, T_OFF, T_BASE, T_X, STOPPED, BLOCKED, IN_SYSTEM,
 BACKLOG, PREFILL_LEFT, ARRIVALS, ARRIVED_TOKENS, BATCHES, BATCH_TOKENS, BATCH_REQUESTS,
 BATCH_PREFILL, BATCH_DECODE, WC_TARGET, WC_VIOL, WC_WASTED, N_OUT, N_ITL, A_POS, A_FINAL, ERR_N,
 N_CONT, PLAN_NO, CAP, NET, END_ONLY, START_ONLY, N_SI) = range(48)

# -- float scalars (sf) --------------------------------------------------------------------------
(NOW, BATCH_END, BLOCKED_SINCE, SERVED_MS, DURATION, REC_LAST, BACKLOG_AREA, IN_SYSTEM_AREA, BUSY,
 STALL, LAST_ARRIVAL, HORIZON, BIN_WIDTH, LIMIT, N_SF) = range(15)

# -- per-slot integers (slot_i columns) and floats (slot_f columns) ------------------------------
R_ID, R_PRE, R_DEC, R_PLEFT, R_DLEFT, R_C0, R_ACT, R_SEQ, R_MARK, N_RI = range(10)
R_ARR, R_FIRST, R_LAST, N_RF = range(4)

# -- rows of the queue array q ---------------------------------------------------------------------
Q_FREE, Q_PREFILL, Q_WAIT, Q_SERVED, Q_JOIN, Q_PLAN_SLOT, Q_PLAN_TOK, N_Q = range(8)

# -- policy parameters (pol) ---------------------------------------------------------------------
P_KIND, P_DECODE_FIRST, P_MIXED, P_CHUNKED, P_KP, P_KD, P_BUDGET, P_KMAX, N_POL = range(9)
KIND_KFCFS, KIND_VLLM_CHUNKED = 0, 1


@njit(cache=True)
def _bins_fit(sf, bins, t_ms):
    """TimeBins._fit: merge bins pairwise (width doubles) until t_ms fits."""
    nb = bins.shape[0]
    while t_ms > sf[BIN_WIDTH] * nb:
        half = nb // 2
        for i in range(half):
            bins[i] = bins[2 * i] + bins[2 * i + 1]
        for i in range(half, nb):
            bins[i] = 0.0
        sf[BIN_WIDTH] *= 2.0


@njit(cache=True)
def _bins_add(sf, bins, t0, t1, value):
    """TimeBins.add: ``value`` held over [t0, t1)."""
    if t1 <= t0:
        return
    _bins_fit(sf, bins, t1)
    if value == 0.0:
        return
    w = sf[BIN_WIDTH]
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
        _bins_add(sf, bins, sf[REC_LAST], t_ms, float(si[BACKLOG]))
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
def _serve(si, sf, slot_i, slot_f, q, heap, count):
    """Make the served prefix exactly the oldest ``count`` decoders (FastEngine._serve)."""
    cap = q.shape[1]
    while si[SV_LEN] > count:
        s = q[Q_SERVED, si[SV_LEN] - 1]
        si[SV_LEN] -= 1
        _sync(si, sf, slot_i, slot_f, s)
        slot_i[s, R_ACT] += 1
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


@njit(cache=True)
def _next_finish(si, slot_i, heap):
    """The serve count at which the next served decoder finishes."""
    while heap[2, 0] != slot_i[heap[3, 0], R_ACT]:
        _heap_pop(heap, si)
    return heap[0, 0]


@njit(cache=True)
def _enter_decode(si, sf, slot_i, slot_f, q, heap, s):
    """A request starts decoding: it joins the decoders in arrival order."""
    cap = q.shape[1]
    seq = slot_i[s, R_SEQ]
    newest = -1
    if si[WQ_LEN] > 0:
        newest = q[Q_WAIT, (si[WQ_HEAD] + si[WQ_LEN] - 1) % cap]
    elif si[SV_LEN] > 0:
        newest = q[Q_SERVED, si[SV_LEN] - 1]
    if newest < 0 or seq > slot_i[newest, R_SEQ]:
        q[Q_WAIT, (si[WQ_HEAD] + si[WQ_LEN]) % cap] = s
        si[WQ_LEN] += 1
    else:  # an older request starts decoding (it had no prompt): rebuild the order
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
        si[SV_LEN] = 0
        si[N_CONT] = 0
        si[JN_LEN] = 0
        si[HP_LEN] = 0
    si[DECODERS] += 1


@njit(cache=True)
def _plan_prompt(si, q, s, take):
    """Append ``take`` prefill tokens of slot ``s`` to the plan."""
    q[Q_PLAN_SLOT, si[PP_LEN]] = s
    q[Q_PLAN_TOK, si[PP_LEN]] = take
    si[PP_LEN] += 1


@njit(cache=True)
def _plan_kfcfs(si, slot_i, q, pol):
    """KFCFS.plan_compact: fills the planned prompts (q rows) and returns the decoder count."""
    cap = q.shape[1]
    budget, k_max = pol[P_BUDGET], pol[P_KMAX]
    decoders_present = si[DECODERS]
    slots = si[PQ_LEN] + decoders_present if k_max == 0 else k_max
    tokens = budget
    decoders = 0
    si[PP_LEN] = 0
    for phase in range(2):
        decode_phase = (phase == 0) == (pol[P_DECODE_FIRST] == 1)
        if decode_phase:
            limit = min(tokens, slots - si[PP_LEN], decoders_present)
            if pol[P_KD] > 0:
                limit = min(limit, pol[P_KD])
            decoders = max(limit, 0)
            tokens -= decoders
        else:
            max_count = slots - decoders
            if pol[P_KP] > 0:
                max_count = min(max_count, pol[P_KP])
            n = min(max(max_count, 0), si[PQ_LEN])
            for i in range(n):
                if tokens <= 0:
                    break
                s = q[Q_PREFILL, (si[PQ_HEAD] + i) % cap]
                need = slot_i[s, R_PLEFT]
                if need <= tokens:
                    take = need
                elif pol[P_CHUNKED] == 1:
                    take = tokens
                else:
                    break
                _plan_prompt(si, q, s, take)
                tokens -= take
        if (decoders > 0 or si[PP_LEN] > 0) and pol[P_MIXED] == 0:
            break
    return decoders


@njit(cache=True)
def _plan_vllm_chunked(si, slot_i, q, pol):
    """VLLMChunked.plan_compact (started prompts are a prefix of the queue: FCFS admission)."""
    cap = q.shape[1]
    budget, k_max = pol[P_BUDGET], pol[P_KMAX]
    n_queue = si[PQ_LEN]
    started = 0
    while started < n_queue:
        s = q[Q_PREFILL, (si[PQ_HEAD] + started) % cap]
        if slot_i[s, R_PLEFT] == slot_i[s, R_PRE]:
            break
        started += 1
    decoders_present = si[DECODERS]
    running = decoders_present + started
    max_seqs = running + (n_queue - started) if k_max == 0 else k_max
    tokens = budget
    decoders = max(min(decoders_present, tokens, max_seqs), 0)
    tokens -= decoders
    si[PP_LEN] = 0
    if decoders == decoders_present:
        for i in range(started):
            if tokens == 0 or decoders + si[PP_LEN] >= max_seqs:
                break
            s = q[Q_PREFILL, (si[PQ_HEAD] + i) % cap]
            take = min(slot_i[s, R_PLEFT], tokens)
            _plan_prompt(si, q, s, take)
            tokens -= take
    admitted = running
    for i in range(started, n_queue):
        if tokens == 0 or admitted >= max_seqs:
            break
        s = q[Q_PREFILL, (si[PQ_HEAD] + i) % cap]
        take = min(slot_i[s, R_PLEFT], tokens)
        _plan_prompt(si, q, s, take)
        tokens -= take
        admitted += 1
    return decoders


@njit(cache=True)
def _list_targets(si, slot_i, q, pol, targets, k):
    """Fill targets of ``k`` repeats with a binding k_max (fastengine.fill_targets); returns
    True when they were written to ``targets``, False when every target is the budget."""
    cap = q.shape[1]
    budget, k_max = pol[P_BUDGET], pol[P_KMAX]
    n_plan = si[PP_LEN]
    si[PLAN_NO] += 1
    mark = si[PLAN_NO]
    lower = 0
    for e in range(n_plan):
        s = q[Q_PLAN_SLOT, e]
        slot_i[s, R_MARK] = mark
        lower += slot_i[s, R_PLEFT] - q[Q_PLAN_TOK, e] * (k - 1)
    slots = k_max - n_plan
    for i in range(si[PQ_LEN]):
        if lower >= budget or slots <= 0:
            break
        s = q[Q_PREFILL, (si[PQ_HEAD] + i) % cap]
        if slot_i[s, R_MARK] != mark:
            lower += slot_i[s, R_PLEFT]
            slots -= 1
    decoders = si[DECODERS]
    if lower + min(max(slots, 0), decoders) >= budget:
        return False
    others = np.empty(si[PQ_LEN], dtype=np.int64)
    n_others = 0
    for i in range(si[PQ_LEN]):
        s = q[Q_PREFILL, (si[PQ_HEAD] + i) % cap]
        if slot_i[s, R_MARK] != mark:
            others[n_others] = slot_i[s, R_PLEFT]
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
        return True
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
    return True


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
    budget = pol[P_BUDGET]
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


@njit(cache=True)
def _start_batch(si, sf, slot_i, slot_f, q, heap, pol, t_table, ends, targets, next_arrival):
    """Ask the policy once and set up the run of repeats of its plan (FastEngine._start_batch).

    The run stops at the first batch end at or after ``next_arrival``: that arrival would cut it
    there anyway (the same repeats are kept), so later ends are never computed.
    """
    if si[IN_SYSTEM] == 0:
        return 0
    if pol[P_KIND] == KIND_KFCFS:
        decoders = _plan_kfcfs(si, slot_i, q, pol)
    else:
        decoders = _plan_vllm_chunked(si, slot_i, q, pol)
    n_plan = si[PP_LEN]
    if decoders == 0 and n_plan == 0:
        si[BLOCKED] = 1
        sf[BLOCKED_SINCE] = sf[NOW]
        return 0
    prefill = 0
    k = MAX_REPEAT
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
        _serve(si, sf, slot_i, slot_f, q, heap, decoders)
        k = min(k, _next_finish(si, slot_i, heap) - si[SERVES])
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
    if pol[P_KMAX] == 0 or si[PQ_LEN] + si[DECODERS] <= pol[P_KMAX]:
        si[T_LIST] = 0
        si[T_BASE] = si[PREFILL_LEFT] + si[DECODERS]
        si[T_X] = prefill
    elif _list_targets(si, slot_i, q, pol, targets, k):
        si[T_LIST] = 1
    else:
        si[T_LIST] = 0
        si[T_BASE] = pol[P_BUDGET]
        si[T_X] = 0
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
def _book(si, sf, slot_i, slot_f, q, heap, pol, ends, targets, bins, out_f, out_i, itl, m):
    """Apply the first m running repeats: tokens, timestamps, metrics (FastEngine._book)."""
    cap = q.shape[1]
    off = si[RUN_OFF]
    prefill, decode, duration = si[P_PRE], si[P_DEC], sf[DURATION]
    n = prefill + decode
    now = ends[off + m - 1]
    first_out = si[N_OUT]
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
    prompts_done = 0
    for e in range(si[PP_LEN]):
        s = q[Q_PLAN_SLOT, e]
        slot_i[s, R_PLEFT] -= q[Q_PLAN_TOK, e] * m
        if slot_i[s, R_PLEFT] == 0:
            prompts_done += 1
            slot_f[s, R_FIRST] = now
            slot_f[s, R_LAST] = now
            if slot_i[s, R_DLEFT] > 0:
                _enter_decode(si, sf, slot_i, slot_f, q, heap, s)
            else:
                _emit(si, slot_i, slot_f, out_f, out_i, s, now)
    if prompts_done > 0:  # finished prompts are the oldest ones (FCFS prefill)
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
        _bins_fit(sf, bins, now)
        w = sf[BIN_WIDTH]
        nb = bins.shape[0]
        b0 = int(t0 // w)
        if b0 == min(int(now // w), nb - 1):
            bins[b0] += area
        else:
            start = t0
            for i in range(m):
                _bins_add(sf, bins, start, ends[off + i], float(si[BACKLOG] - n * i))
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
    # settle: finished requests leave the engine and free their slots
    for r in range(first_out, si[N_OUT]):
        si[IN_SYSTEM] -= 1
        q[Q_FREE, si[N_FREE]] = out_i[r, 0]
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
        _book(si, sf, slot_i, slot_f, q, heap, pol, ends, targets, bins, out_f, out_i, itl, keep - 1)


@njit(cache=True)
def _next_event(si, sf):
    if si[ACTIVE] == 1:
        return sf[BATCH_END]
    if si[IN_SYSTEM] > 0 and si[BLOCKED] == 0:
        return sf[NOW]
    return np.inf


@njit(cache=True)
def run(si, sf, slot_i, slot_f, q, heap, pol, t_table, ends, targets, bins, out_f, out_i, itl,
        a_ms, a_pre, a_dec, a_id):
    """Run the event loop of ``simulate`` until done or until the driver must act (return code).

    Finished requests are appended to ``out_f`` (arrival, first token, finish) and ``out_i``
    (slot, id, prefill, decode); inter-token latencies to ``itl`` as (value, count) columns.
    """
    cap = q.shape[1]
    n_arr = a_ms.shape[0]
    room = out_f.shape[0]
    itl_room = itl.shape[1]
    while True:
        # a step books at most (served prefix + planned prompts) records and ITL entries
        need = si[SV_LEN] + si[PP_LEN] + si[JN_LEN] + 4
        if si[N_OUT] + need > room or si[N_ITL] + need > itl_room:
            return NEED_ROOM
        t = _next_event(si, sf)
        if si[A_POS] < n_arr:
            i = si[A_POS]
            arrival = a_ms[i]
            if arrival <= t:
                if si[N_FREE] == 0:
                    return NEED_SLOTS
                # -- submit (FastEngine.submit, then Engine.submit) --
                if si[ACTIVE] == 1 and arrival >= sf[NOW]:
                    _cut(si, sf, slot_i, slot_f, q, heap, pol, ends, targets, bins, out_f, out_i,
                         itl, arrival)
                overdue = si[ACTIVE] == 0 and si[IN_SYSTEM] > 0 and si[BLOCKED] == 0
                if overdue and arrival > sf[NOW]:  # (not reached from this loop: kept for parity)
                    code = _start_batch(si, sf, slot_i, slot_f, q, heap, pol, t_table, ends, targets,
                                        np.inf)
                    if code != 0:
                        return code
                if si[ACTIVE] == 0:
                    if si[BLOCKED] == 1:
                        sf[STALL] += arrival - sf[BLOCKED_SINCE]
                        si[BLOCKED] = 0
                    sf[NOW] = arrival
                si[N_FREE] -= 1
                s = q[Q_FREE, si[N_FREE]]
                pre, dec = a_pre[i], a_dec[i]
                slot_i[s, R_ID] = a_id[i]
                slot_i[s, R_PRE] = pre
                slot_i[s, R_DEC] = dec
                slot_i[s, R_PLEFT] = pre
                slot_i[s, R_DLEFT] = dec
                slot_i[s, R_C0] = 0
                slot_i[s, R_SEQ] = si[SEQ]
                si[SEQ] += 1
                slot_f[s, R_ARR] = arrival
                slot_f[s, R_FIRST] = np.nan if pre > 0 else arrival
                slot_f[s, R_LAST] = slot_f[s, R_FIRST]
                tokens = pre + dec
                _advance(si, sf, bins, arrival)
                si[BACKLOG] += tokens
                si[IN_SYSTEM] += 1
                si[ARRIVALS] += 1
                si[ARRIVED_TOKENS] += tokens
                sf[LAST_ARRIVAL] = arrival
                if pre > 0:
                    si[PREFILL_LEFT] += pre
                    q[Q_PREFILL, (si[PQ_HEAD] + si[PQ_LEN]) % cap] = s
                    si[PQ_LEN] += 1
                else:
                    _enter_decode(si, sf, slot_i, slot_f, q, heap, s)
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
                _book(si, sf, slot_i, slot_f, q, heap, pol, ends, targets, bins, out_f, out_i, itl,
                      si[RUN_LEN])
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
        if code != 0:
            return code


@njit(cache=True)
def stop(si, sf, slot_i, slot_f, q, heap, pol, ends, targets, bins, out_f, out_i, itl, horizon):
    """End at the horizon: book the repeats that end before it and count the one running."""
    if si[ACTIVE] == 0 or si[STOPPED] == 1:
        return
    _cut(si, sf, slot_i, slot_f, q, heap, pol, ends, targets, bins, out_f, out_i, itl, horizon)
    n = si[P_PRE] + si[P_DEC]
    total, viol, wasted = _audit(si, pol, targets, 1, n)
    _batches(si, sf, 1, sf[DURATION], si[P_PRE], si[P_DEC], si[PP_LEN] + si[P_DEC], total, viol,
             wasted)
    si[STOPPED] = 1
