"""The network policies compiled: class priority and max-pressure engines, one batch per event.

``llmqueue.engines.kernel`` is specialised to FCFS orders (implicit decoders, runs of identical
iterations, compact tails). The network policies (``llmqueue.policies.network``: ``ClassPriority``,
``MaxPressure``) order requests by class and by the network's buffer counts instead, so this module
is a second, plain engine: the reference engine (``llmqueue.engines.reference.Engine``) ported
line by line, every request in a slot, one batch per event. At each batch start it forms the plan
as the policy does over the reference engine's view, times it with ``t(n)``, and books the batch;
at the batch end it updates the requests in plan order, emits the finished ones and integrates
the backlog, with the same float operations in the same order. It runs only inside a network
(``llmqueue.engines.netkernel.net_run``, or one engine driven by ``compiled.PolicyEngine``).

Its scalars are the kernel's (``si``/``sf`` with the kernel's names, so the network loop reads
every engine's next event, output records and counters the same way; ``N_PROMPTS``,
``N_DECODERS`` and ``PLAN_LEN`` below reuse three kernel entries), its outputs the kernel's
(``out_f``, ``out_i``, ``itl``, ``bins``), so ``compiled._drain`` and ``_load_recorder`` turn them
into the same metrics.

The view's order. A request belongs to a group: its class's rank for class priority (several
buffers can share a rank), its buffer for max-pressure. Each group keeps three lists in arrival
order (linked through the slots): its decoding requests, its started prompts (part of the
prompt processed) and its waiting prompts. The reference engine's ``view.decoding`` and
``view.prefilling`` are these lists merged by arrival (``S_SEQ``), so:

- class priority (decoders by (rank, arrival), then started prompts, then waiting ones) walks
  the groups in rank order, phase by phase;
- max-pressure sorts the requests by (-weight, phase, arrival): it sorts the groups by weight and,
  among groups of equal weight, merges their lists phase by phase by arrival.

Both stop as ``_fill`` does (budget spent, or ``k_max`` entries), so a batch costs O(its entries +
groups), whatever the queues' length. Weights are ``MaxPressure.weight`` with the same operations
in the same order, Python's ``sum`` included (a left fold before CPython 3.12, Neumaier's
compensated sum since: ``G_NEUMAIER``), so the order is the same to the bit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit

from llmqueue.engines.kernel import (
    A_POS,
    ACTIVE,
    ARRIVALS,
    ARRIVED_TOKENS,
    BACKLOG,
    BAD_BATCH_TIME,
    BATCH_END,
    BLOCKED,
    BLOCKED_SINCE,
    DECODERS,
    DONE,
    END_ONLY,
    ENDED,
    ERR_N,
    IN_SYSTEM,
    LAST_ARRIVAL,
    LIMIT,
    N_FREE,
    N_ITL,
    N_OUT,
    NEED_ROOM,
    NEED_SLOTS,
    NOW,
    P_DEC,
    P_PRE,
    PAUSED,
    PP_LEN,
    PQ_LEN,
    PREFILL_LEFT,
    R_ARR,
    R_DEC,
    R_FIRST,
    R_ID,
    R_PRE,
    R_TOK,
    SEQ,
    STALL,
    START_ONLY,
    WANT_FREE,
    Policy,
    _advance,
    _batches,
    _emit,
    _itl,
    tie_cache,
)

KIND_PRIORITY, KIND_PRESSURE = 2, 3
"""``Policy.kind`` of these engines (the kernel's FCFS kinds are 0 and 1)."""

N_PROMPTS = PQ_LEN  # prompts present (started or waiting)
N_DECODERS = DECODERS  # decoding requests present
PLAN_LEN = PP_LEN  # entries of the running (or forming) batch

# -- slot columns: integers (slot_i) and floats (slot_f); those the kernel's ``_emit`` reads are at
# the kernel's columns (R_ID, R_PRE, R_DEC, R_TOK; R_ARR, R_FIRST) ----------------------------------
S_ID, S_PRE, S_DEC, S_PLEFT, S_DLEFT, S_GRP, S_PHASE, S_SEQ, S_PREV, S_TOK, S_NEXT, N_SCOL = range(12)
S_ARR, S_FIRST, S_LAST, N_SFCOL = range(4)
assert (S_ID, S_PRE, S_DEC, S_TOK, S_ARR, S_FIRST) == (R_ID, R_PRE, R_DEC, R_TOK, R_ARR, R_FIRST)

# -- phases (a group's three lists) -----------------------------------------------------------------
PH_DECODE, PH_STARTED, PH_WAITING = range(3)

# -- rows of q: free slots (a stack, si[N_FREE] of them), the batch's slots and tokens, scratch -----
Q_FREE, Q_PLAN_SLOT, Q_PLAN_TOK, Q_TMP, N_PQ = range(5)

# -- group columns: integers (grp_i) and floats (grp_f) ---------------------------------------------
# G_HEAD + phase, G_TAIL + phase: a list's first and last slot (-1: empty); G_NODE: the buffer's
# node (max-pressure); G_R0, G_RN: its routes in route_node/route_prob; G_SIZED: whether the policy
# knows its size (else weight 0); G_NEUMAIER: Python's sum is compensated (the same in every row);
# G_ORDER, G_CUR: scratch (groups by weight, merge cursors)
(G_HEAD, G_TAIL, G_NODE, G_R0, G_RN, G_SIZED, G_NEUMAIER, G_ORDER, G_CUR, N_GI) = (0, 3, 6, 7, 8, 9, 10,
                                                                                  11, 12, 13)
GF_SIZE, GF_W, N_GF = range(3)


class PolicyState(NamedTuple):
    """One engine's arrays (``llmqueue.engines.compiled._PolicyState``), read by field name."""

    si: np.ndarray  # integer scalars, the kernel's layout
    sf: np.ndarray  # float scalars, the kernel's layout
    slot_i: np.ndarray  # request slots: integer columns S_*
    slot_f: np.ndarray  # request slots: float columns S_ARR, S_FIRST, S_LAST
    q: np.ndarray  # rows Q_* (N_PQ x slots)
    pol: Policy  # kind (KIND_PRIORITY or KIND_PRESSURE), budget, kmax; the rest 0
    t_table: np.ndarray  # batch time t(n) for n = 0 .. budget
    bins: np.ndarray  # the recorder's time bins of the backlog
    out_f: np.ndarray  # finished requests: arrival, first token, finish (room x 3)
    out_i: np.ndarray  # finished requests: slot, id, prefill, decode, token (room x 5)
    itl: np.ndarray  # inter-token latencies: (value, count) rows (2 x room)
    grp_i: np.ndarray  # groups: integer columns G_*
    grp_f: np.ndarray  # groups: float columns GF_*
    node_grp: np.ndarray  # each network node's group here (-1: none)
    route_node: np.ndarray  # max-pressure: the buffers a group's requests go to (their node; the
    # last entry of ``counts``, always 0, for a buffer not in the network) ...
    route_prob: np.ndarray  # ... and the expected requests entering each per request leaving


@njit(cache=True)
def _link(slot_i, grp_i, g, phase, s):
    """Insert slot ``s`` into group g's list ``phase`` by arrival (searched from the youngest: a
    newcomer is usually among the youngest)."""
    seq = slot_i[s, S_SEQ]
    after = grp_i[g, G_TAIL + phase]
    while after >= 0 and slot_i[after, S_SEQ] > seq:
        after = slot_i[after, S_PREV]
    if after < 0:
        nxt = grp_i[g, G_HEAD + phase]
        grp_i[g, G_HEAD + phase] = s
    else:
        nxt = slot_i[after, S_NEXT]
        slot_i[after, S_NEXT] = s
    slot_i[s, S_PREV] = after
    slot_i[s, S_NEXT] = nxt
    if nxt < 0:
        grp_i[g, G_TAIL + phase] = s
    else:
        slot_i[nxt, S_PREV] = s
    slot_i[s, S_GRP] = g
    slot_i[s, S_PHASE] = phase


@njit(cache=True)
def _unlink(slot_i, grp_i, s):
    """Remove slot ``s`` from its list."""
    g, phase = slot_i[s, S_GRP], slot_i[s, S_PHASE]
    prev, nxt = slot_i[s, S_PREV], slot_i[s, S_NEXT]
    if prev < 0:
        grp_i[g, G_HEAD + phase] = nxt
    else:
        slot_i[prev, S_NEXT] = nxt
    if nxt < 0:
        grp_i[g, G_TAIL + phase] = prev
    else:
        slot_i[nxt, S_PREV] = prev


@njit(cache=True)
def _serve(si, slot_i, q, s, tokens):
    """_fill's step: plan one token for a decoder, a chunk for a prompt; returns the tokens."""
    pleft = slot_i[s, S_PLEFT]
    take = 1
    if pleft > 0:
        take = pleft if pleft < tokens else tokens
    k = si[PLAN_LEN]
    q[Q_PLAN_SLOT, k] = s
    q[Q_PLAN_TOK, k] = take
    si[PLAN_LEN] = k + 1
    return take


@njit(cache=True)
def _plan_priority(si, slot_i, q, grp_i, pol):
    """ClassPriority.__call__ then _fill: decoders by (rank, arrival), then, if they leave room,
    started prompts and waiting prompts, each by (rank, arrival); the plan in q."""
    si[PLAN_LEN] = 0
    budget = pol.budget
    limit = pol.kmax if pol.kmax > 0 else 1 << 62
    slots = pol.kmax if pol.kmax > 0 else si[N_DECODERS] + si[N_PROMPTS]
    phases = 3 if si[N_DECODERS] < min(budget, slots) else 1
    tokens = budget
    for phase in range(phases):
        for g in range(grp_i.shape[0]):
            s = grp_i[g, G_HEAD + phase]
            while s >= 0:
                if tokens <= 0 or si[PLAN_LEN] >= limit:
                    return
                tokens -= _serve(si, slot_i, q, s, tokens)
                s = slot_i[s, S_NEXT]


@njit(cache=True)
def _weight(grp_i, grp_f, route_node, route_prob, counts, g):
    """MaxPressure.weight of group g's buffer, with the network counts ``counts`` (by node)."""
    if grp_i[g, G_SIZED] == 0:
        return 0.0
    here = counts[grp_i[g, G_NODE]]
    r0 = grp_i[g, G_R0]
    neumaier = grp_i[g, G_NEUMAIER] == 1
    down = 0.0
    comp = 0.0
    for k in range(r0, r0 + grp_i[g, G_RN]):
        x = route_prob[k] * float(counts[route_node[k]])
        if neumaier:
            t = down + x
            if abs(down) >= abs(x):
                comp += (down - t) + x
            else:
                comp += (x - t) + down
            down = t
        else:
            down += x
    if neumaier and comp != 0.0 and math.isfinite(comp):
        down += comp
    pressure = float(here) - down
    if abs(pressure) <= 1e-9 * (1.0 + (float(abs(here)) + abs(down))):  # _pressure_tolerance
        return 0.0
    return pressure / grp_f[g, GF_SIZE]


@njit(cache=True)
def _plan_pressure(si, slot_i, q, grp_i, grp_f, pol, route_node, route_prob, counts):
    """MaxPressure.__call__ then _fill: requests of weight >= 0 by (-weight, phase, arrival); the
    plan in q. Groups are sorted by weight; groups of equal weight are merged by arrival."""
    si[PLAN_LEN] = 0
    n_grp = grp_i.shape[0]
    n = 0  # groups with requests and weight >= 0, by decreasing weight (insertion sort: few groups)
    for g in range(n_grp):
        if grp_i[g, G_HEAD] < 0 and grp_i[g, G_HEAD + 1] < 0 and grp_i[g, G_HEAD + 2] < 0:
            continue
        w = _weight(grp_i, grp_f, route_node, route_prob, counts, g)
        if not w >= 0.0:
            continue
        grp_f[g, GF_W] = w
        i = n
        while i > 0 and grp_f[grp_i[i - 1, G_ORDER], GF_W] < w:
            grp_i[i, G_ORDER] = grp_i[i - 1, G_ORDER]
            i -= 1
        grp_i[i, G_ORDER] = g
        n += 1
    limit = pol.kmax if pol.kmax > 0 else 1 << 62
    tokens = pol.budget
    lo = 0
    while lo < n:
        w = grp_f[grp_i[lo, G_ORDER], GF_W]
        hi = lo + 1
        while hi < n and grp_f[grp_i[hi, G_ORDER], GF_W] == w:
            hi += 1
        for phase in range(3):
            for i in range(lo, hi):
                g = grp_i[i, G_ORDER]
                grp_i[g, G_CUR] = grp_i[g, G_HEAD + phase]
            while True:  # the tied groups' lists merged by arrival
                best = -1
                for i in range(lo, hi):
                    s = grp_i[grp_i[i, G_ORDER], G_CUR]
                    if s >= 0 and (best < 0 or slot_i[s, S_SEQ] < slot_i[best, S_SEQ]):
                        best = s
                if best < 0:
                    break
                if tokens <= 0 or si[PLAN_LEN] >= limit:
                    return
                tokens -= _serve(si, slot_i, q, best, tokens)
                grp_i[slot_i[best, S_GRP], G_CUR] = slot_i[best, S_NEXT]
        lo = hi


@njit(cache=True)
def _fill_target(si, slot_i, q, grp_i, pol):
    """reference.fill_target: the most tokens the batch rules let one batch take."""
    budget = pol.budget
    n_pre, n_dec = si[N_PROMPTS], si[N_DECODERS]
    k = pol.kmax
    if k == 0 or n_pre + n_dec <= k:
        return min(budget, si[PREFILL_LEFT] + n_dec)
    m = min(k, n_pre)
    # the m largest remaining prompts: a min-heap of m in q[Q_TMP]; the first m prompts alone
    # bound them from below, which often reaches the budget already (then no scan)
    n = 0
    top = 0
    for phase in (PH_STARTED, PH_WAITING):
        for g in range(grp_i.shape[0]):
            s = grp_i[g, G_HEAD + phase]
            while s >= 0:
                v = slot_i[s, S_PLEFT]
                s = slot_i[s, S_NEXT]
                if n < m:
                    _heap_up(q, n, v)
                    top += v
                    n += 1
                    if n == m and top >= budget:
                        return budget
                elif v > q[Q_TMP, 0]:
                    top += v - q[Q_TMP, 0]
                    _heap_down(q, m, v)
    return min(budget, top + min(k - m, n_dec))


@njit(cache=True)
def _heap_up(q, n, v):
    """Push ``v`` onto the min-heap of the first ``n`` entries of q[Q_TMP]."""
    i = n
    while i > 0:
        parent = (i - 1) // 2
        if q[Q_TMP, parent] <= v:
            break
        q[Q_TMP, i] = q[Q_TMP, parent]
        i = parent
    q[Q_TMP, i] = v


@njit(cache=True)
def _heap_down(q, n, v):
    """Replace the least of the min-heap of ``n`` entries of q[Q_TMP] by ``v``."""
    i = 0
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and q[Q_TMP, child + 1] < q[Q_TMP, child]:
            child += 1
        if v <= q[Q_TMP, child]:
            break
        q[Q_TMP, i] = q[Q_TMP, child]
        i = child
    q[Q_TMP, i] = v


@njit(cache=True)
def _start_batch(state, counts):
    """Engine.begin_batch: ask the policy, check the time, book the batch (the recorder books a
    batch when it starts). No plan: the engine blocks."""
    si, sf, slot_i, q, grp_i, pol = state.si, state.sf, state.slot_i, state.q, state.grp_i, state.pol
    if si[IN_SYSTEM] == 0:
        return 0
    if pol.kind == KIND_PRIORITY:
        _plan_priority(si, slot_i, q, grp_i, pol)
    else:
        _plan_pressure(si, slot_i, q, grp_i, state.grp_f, pol, state.route_node, state.route_prob,
                       counts)
    n_plan = si[PLAN_LEN]
    if n_plan == 0:
        si[BLOCKED] = 1
        sf[BLOCKED_SINCE] = sf[NOW]
        return 0
    prefill = 0
    decode = 0
    for k in range(n_plan):
        if slot_i[q[Q_PLAN_SLOT, k], S_PLEFT] > 0:
            prefill += q[Q_PLAN_TOK, k]
        else:
            decode += 1
    n = prefill + decode
    duration = state.t_table[n]
    if not duration > 0 or math.isinf(duration):
        si[ERR_N] = n
        si[PLAN_LEN] = 0
        return BAD_BATCH_TIME
    target = _fill_target(si, slot_i, q, grp_i, pol)
    short = max(target - n, 0)
    _batches(si, sf, 1, duration, prefill, decode, n_plan, target, int(short > 0), short)
    si[ACTIVE] = 1
    si[P_PRE] = prefill
    si[P_DEC] = decode
    sf[BATCH_END] = sf[NOW] + duration
    return 0


@njit(cache=True)
def _end_batch(state):
    """Engine._end_batch and settle: the batch's entries in plan order (prompts advance, finished
    prompts start decoding or finish, decoders take their token), inter-token latencies, the
    backlog, then the finished requests leave (their records in plan order)."""
    si, sf, slot_i, slot_f, q, grp_i = state.si, state.sf, state.slot_i, state.slot_f, state.q, state.grp_i
    out_f, out_i, itl = state.out_f, state.out_i, state.itl
    now = sf[BATCH_END]
    sf[NOW] = now
    first_out = si[N_OUT]
    total = 0
    prefill_total = 0
    gap_run = 0  # equal gaps in a row go out as one (value, count) row
    gap_value = 0.0
    for k in range(si[PLAN_LEN]):
        s, tokens = q[Q_PLAN_SLOT, k], q[Q_PLAN_TOK, k]
        total += tokens
        if slot_i[s, S_PLEFT] > 0:
            prefill_total += tokens
            slot_i[s, S_PLEFT] -= tokens
            if slot_i[s, S_PLEFT] == 0:
                if math.isnan(slot_f[s, S_FIRST]):
                    slot_f[s, S_FIRST] = now
                slot_f[s, S_LAST] = now
                _unlink(slot_i, grp_i, s)
                si[N_PROMPTS] -= 1
                if slot_i[s, S_DLEFT] > 0:
                    _link(slot_i, grp_i, slot_i[s, S_GRP], PH_DECODE, s)
                    si[N_DECODERS] += 1
                else:
                    _emit(si, slot_i, slot_f, out_f, out_i, s, now)
            elif slot_i[s, S_PHASE] == PH_WAITING:  # its first chunk: it is started now
                _unlink(slot_i, grp_i, s)
                _link(slot_i, grp_i, slot_i[s, S_GRP], PH_STARTED, s)
        else:
            slot_i[s, S_DLEFT] -= 1
            gap = now - slot_f[s, S_LAST]
            if gap_run > 0 and gap != gap_value:
                _itl(si, itl, gap_value, gap_run)
                gap_run = 0
            gap_value = gap
            gap_run += 1
            slot_f[s, S_LAST] = now
            if slot_i[s, S_DLEFT] == 0:
                _unlink(slot_i, grp_i, s)
                si[N_DECODERS] -= 1
                _emit(si, slot_i, slot_f, out_f, out_i, s, now)
    if gap_run > 0:
        _itl(si, itl, gap_value, gap_run)
    si[PREFILL_LEFT] -= prefill_total
    _advance(si, sf, state.bins, now)  # Recorder.tokens_done
    si[BACKLOG] -= total
    si[PLAN_LEN] = 0
    si[ACTIVE] = 0
    sf[BATCH_END] = np.inf
    for r in range(first_out, si[N_OUT]):
        si[IN_SYSTEM] -= 1
        q[Q_FREE, si[N_FREE]] = out_i[r, 0]
        si[N_FREE] += 1


@njit(cache=True)
def _submit(state, arrivals, nodes, i):
    """Engine.submit of arrival i (the engine has a free slot)."""
    si, sf, slot_i, slot_f, q = state.si, state.sf, state.slot_i, state.slot_f, state.q
    arrival = arrivals.ms[i]
    pre, dec = arrivals.pre[i], arrivals.dec[i]
    if si[ACTIVE] == 0:
        if si[BLOCKED] == 1:
            sf[STALL] += arrival - sf[BLOCKED_SINCE]
            si[BLOCKED] = 0
        sf[NOW] = arrival
    si[N_FREE] -= 1
    s = q[Q_FREE, si[N_FREE]]
    first = np.nan if pre > 0 else arrival
    slot_i[s, S_ID] = arrivals.id[i]
    slot_i[s, S_TOK] = arrivals.tok[i]
    slot_i[s, S_SEQ] = si[SEQ]
    si[SEQ] += 1
    slot_i[s, S_PRE] = pre
    slot_i[s, S_DEC] = dec
    slot_i[s, S_PLEFT] = pre
    slot_i[s, S_DLEFT] = dec
    slot_f[s, S_ARR] = arrival
    slot_f[s, S_FIRST] = first
    slot_f[s, S_LAST] = first
    tokens = pre + dec
    _advance(si, sf, state.bins, arrival)  # Recorder.arrival
    si[BACKLOG] += tokens
    si[IN_SYSTEM] += 1
    si[ARRIVALS] += 1
    si[ARRIVED_TOKENS] += tokens
    sf[LAST_ARRIVAL] = arrival
    g = state.node_grp[nodes[i]]
    if pre > 0:
        si[PREFILL_LEFT] += pre
        si[N_PROMPTS] += 1
        _link(slot_i, state.grp_i, g, PH_WAITING, s)  # the youngest: at the end
    else:
        _link(slot_i, state.grp_i, g, PH_DECODE, s)
        si[N_DECODERS] += 1


@njit(cache=True)
def _next_event(si, sf):
    if si[ACTIVE] == 1:
        return sf[BATCH_END]
    if si[IN_SYSTEM] > 0 and si[BLOCKED] == 0:
        return sf[NOW]
    return np.inf


@njit(cache=True)
def run(state, arrivals, nodes, counts):
    """One engine's events, as ``kernel.run`` in network mode (``si[LIMIT]``, ``si[END_ONLY]``,
    ``si[START_ONLY]`` say how far; the same return codes): arrivals due before the next event are
    taken first, then the running batch ends (return after it if it finished requests), then the
    next starts. ``nodes[i]``: arrival i's buffer (its route node); ``counts``: the network's
    requests per buffer (max-pressure), by node."""
    si, sf = state.si, state.sf
    n_arr = arrivals.ms.shape[0]
    room = state.out_f.shape[0]
    itl_room = state.itl.shape[1]
    while True:
        need = si[PLAN_LEN] + 4  # a batch end writes at most one record and ITL row per entry
        if si[N_OUT] + need > room or si[N_ITL] + need > itl_room:
            return NEED_ROOM
        t = _next_event(si, sf)
        if si[A_POS] < n_arr and arrivals.ms[si[A_POS]] <= t:
            if si[N_FREE] == 0:
                si[WANT_FREE] = 1
                return NEED_SLOTS
            _submit(state, arrivals, nodes, si[A_POS])
            si[A_POS] += 1
            continue
        if si[A_POS] >= n_arr and math.isinf(t):
            return DONE
        if t > sf[LIMIT]:
            return PAUSED
        if si[ACTIVE] == 1:
            before = si[N_OUT]
            _end_batch(state)
            if si[END_ONLY] == 1 or si[N_OUT] > before:
                return ENDED
        elif si[END_ONLY] == 1:
            return PAUSED
        code = _start_batch(state, counts)
        if code != 0:
            return code
        if si[START_ONLY] == 1:
            return PAUSED


@njit(cache=True)
def wake(si, sf, t_ms):
    """Engine.wake: a blocked engine asks its policy again at ``t_ms`` (the idle time is stall)."""
    if si[ACTIVE] == 0 and si[BLOCKED] == 1 and si[IN_SYSTEM] > 0 and t_ms >= sf[NOW]:
        sf[STALL] += t_ms - sf[BLOCKED_SINCE]
        si[BLOCKED] = 0
        sf[NOW] = t_ms


# -- twins: each compiled function and the Python code it ports -------------------------------------

_REF = "llmqueue.engines.reference:"
_POL = "llmqueue.policies.network:"
_LIST = "a group's arrival-ordered list, linked through the slots (the view's lists are Python lists)"

TWINS: dict[str, tuple[str | None, str]] = {
    "_link": (None, _LIST),
    "_unlink": (None, _LIST),
    "_serve": (None, "one step of _fill (llmqueue.policies.network), writing the plan's arrays"),
    "_plan_priority": (_POL + "ClassPriority.__call__", ""),
    "_weight": (_POL + "MaxPressure.weight", ""),
    "_plan_pressure": (_POL + "MaxPressure.__call__", ""),
    "_fill_target": (_REF + "fill_target", ""),
    "_heap_up": (None, "a min-heap of the largest prompts (fill_target uses heapq.nlargest)"),
    "_heap_down": (None, "a min-heap of the largest prompts (fill_target uses heapq.nlargest)"),
    "_start_batch": (_REF + "Engine.begin_batch", ""),
    "_end_batch": (_REF + "Engine._end_batch", ""),
    "_submit": (_REF + "Engine.submit", ""),
    "_next_event": (_REF + "Engine.next_event_ms", ""),
    "run": (_REF + "Engine.step", ""),
    "wake": (_REF + "Engine.wake", ""),
}
"""Each compiled function of this module -> (the Python function or method it ports, or None; a
note: why there is no twin), as ``llmqueue.engines.kernel.TWINS``."""


# numba stamps this module's cache with this file only, yet the cached code includes the kernel
# helpers it calls (``_advance``, ``_batches``, ``_emit``, ``_itl``): kernel.py's stamp joins it.
tie_cache(globals(), __name__, _advance)
