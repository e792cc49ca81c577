"""The compiled network loop: every engine of a network compiled, and the routing between them too.

``net_run`` is ``llmqueue.sim.network._Run``'s event loop (``result`` and ``_route``/``_advance``)
with each engine driven as ``llmqueue.engines.compiled.KernelEngine`` drives it: the same engine
calls (advance alone up to a limit, end only, start only) at the same moments, the same routing
order and the same random draws, so the run is the same; a visit to a pool asks the pool's built-in
router (``_pick``) for the member, from the counts ``_walk`` and ``_take`` keep per engine. Each
engine runs the single-engine kernel (``llmqueue.engines.kernel.run``) in network mode. It is a
resumable state machine: whenever it needs the driver (an engine's output buffers are full, an
engine or a pool needs more room, a random stream or a class's arrivals need their next chunk, the
horizon must be computed), it returns a code with ``ns[NS_ASK]`` saying for whom, having consumed
nothing of the step it could not finish, and the driver (``llmqueue.engines.compiled.NetworkLoop``)
calls it again once done.

Its arguments come in groups, each a record of arrays (a ``NamedTuple``: numba reads the fields
by name at compile time; see ``net_run``): the loop's scalars (``Loop``), the route tables
(``Routes``), work lists (``Work``), tokens and fork frames (``Tokens``), pending arrivals
(``Pending``), random streams (``Streams``), per-class outputs (``Classes``), per-engine scalars
(``Engines``), and the engines' other arrays as typed lists (``EngineLists``).

Prefill/decode pairs: a visit to a pair runs its prompt on the prefill side, then a KV transfer
(an event kind of its own: ``ST_TRANSFERS``, a heap ported from ``heapq``), then its output on the
decode member picked when the transfer started (``_pair_step``), as ``_Run`` does.

Caching: numba caches a function with the code of the functions it calls, but checks only its
own file for changes; ``kernel.tie_cache`` makes this module's cache stale whenever kernel.py or
polkernel.py changes too, so an edit of an engine kernel is never hidden by a cached network loop.

Network policies: an engine whose policy is class priority or max-pressure runs
``llmqueue.engines.polkernel.run`` (one batch per event) instead of ``kernel.run``, with the same
scalars, outputs and call protocol. The loop keeps the buffer counts max-pressure reads
(``Tokens.counts``: +1 when a visit is handed to its engine, -1 when it is routed on, as
``_Run.counts``) and wakes blocked max-pressure engines after routing finished visits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit
from numba.typed import List

from llmqueue.engines import kernel, polkernel
from llmqueue.engines.kernel import (
    A_POS,
    ACTIVE,
    BAD_BATCH_TIME,
    BATCH_END,
    BLOCKED,
    END_ONLY,
    IN_SYSTEM,
    LIMIT,
    N_OUT,
    NEED_ROOM,
    NEED_SLOTS,
    NOW,
    START_ONLY,
    Arrivals,
    EngineState,
    _bins_add,
    run,
)
from llmqueue.engines.polkernel import KIND_PRIORITY, PolicyState
from llmqueue.model.network import ROUTER_NAMES
from llmqueue.policies.routers import VLLM_WAITING_WEIGHT

# -- return codes of net_run -----------------------------------------------------------------------
(NET_DONE, NET_ROOM, NET_SLOTS, NET_BAD_BATCH_TIME, NET_SIZES, NET_CHOICES, NET_TOKENS, NET_FRAMES,
 NET_PENDING, NET_LATENCY, NET_ARRIVALS, NET_HORIZON, NET_BROKEN) = range(13)
NET_POOL_DRAWS = 13  # a pool's random stream needs its next chunk (ns[NS_ASK]: the pool)
NET_TRANSFERS = 14  # the heap of KV transfers in flight is full
NET_PAIR_LATENCY = 15  # the buffer of finished pair visits (their TTFT, TPOT, E2EL) is full

# -- stages (where the loop resumes) and engine call modes -----------------------------------------
ST_NEXT_EXT, ST_TOP, ST_CALL, ST_ROUTE, ST_ENDS, ST_STARTS, ST_DONE, ST_TRANSFERS = range(8)
MODE_ADVANCE, MODE_END, MODE_START = range(3)

# -- integer scalars (ns) and float scalars (nf) of the network loop -------------------------------
(NS_STAGE, NS_ROUTE_AFTER, NS_CALL_E, NS_CALL_MODE, NS_DUE_N, NS_DUE_I, NS_FIN_LEN, NS_FIN_POS,
 NS_STK_LEN, NS_ARRIVED, NS_MAX_REQ, NS_HAVE_NXT, NS_NXT_CLS, NS_VISITS, NS_ASK, NS_TOK_FREE,
 NS_FR_FREE, NS_LAT_N, NS_XF_N, NS_XF_SEQ, NS_PD_N, N_NS) = range(22)
NF_T_ENGINE, NF_T_ROUTE, NF_HORIZON, NF_STOP, NF_NXT_T, NF_LAST_ARRIVAL, NF_T_XFER, N_NF = range(8)

# -- route nodes (rows of ``nodes``; node index = row; next targets -1 = exit) ---------------------
ND_KIND, ND_ENGINE, ND_NEXT0, ND_NEXT_N, ND_BR0, ND_BR_N, ND_JOIN, ND_POOL, ND_PAIR, N_ND = range(10)
# (a visit names an engine, ND_ENGINE, a pool, ND_POOL, or a prefill/decode pair, ND_PAIR; the
# others are -1)
KIND_VISIT, KIND_FORK, KIND_JOIN = range(3)
EXIT_NODE = -1

# -- tokens (requests or fork branches in the network), fork frames, stream and class state --------
TK_CLS, TK_FRAME, TK_NODE, N_TK = range(4)
FR_PARENT, FR_LEFT, FR_JOIN, N_FR = range(4)
DS_POS, DS_LEN = range(2)  # a random stream's buffer: next value, values held
EX_POS, EX_LEN, EX_END = range(3)  # a class's arrival chunk: next arrival, arrivals held, stream over
CI_ARRIVALS, CI_DONE, CI_PRESENT, N_CI = range(4)
CF_AREA, CF_LAST, CF_WIDTH, N_CF = range(4)
PS_ROUTED = 2  # a pool stream's third column: requests the pool routed so far
# -- the built-in routers' numbers: their index in llmqueue.model.network.ROUTER_NAMES --------------
R_JSQ, R_JSQ_TOKENS, R_P2C, R_LEAST_KV, R_VLLM_DP, R_ROUND_ROBIN, R_RANDOM = (
    ROUTER_NAMES.index(name) for name in ("jsq", "jsq-tokens", "p2c", "least-kv", "vllm-dp",
                                          "round-robin", "random"))
# -- prefill/decode pairs: tables (side: each side's engine or pool, -1 for the other; link), counts,
# the link's floats, each token's pair visit, the transfers in flight (a binary heap ordered as the
# Python loop's (end, sequence) tuples, heapq's algorithm, one spare row at the end) and the
# finished pair visits buffered for the recorders
PR_PRE_ENGINE, PR_PRE_POOL, PR_DEC_ENGINE, PR_DEC_POOL, PR_SHARED, N_PR = range(6)
PF_FIXED, PF_PER_TOKEN, N_PF = range(3)
(PC_ARRIVALS, PC_COMPLETED, PC_IN_PREFILL, PC_IN_TRANSFER, PC_IN_DECODE, PC_STARTED, PC_FINISHED,
 N_PC) = range(8)
PL_FREE, PL_WAIT, PL_BUSY, N_PL = range(4)
PV_PHASE, PV_PRE, PV_DEC, N_PV = range(4)
PV_ARRIVAL, PV_FIRST, N_PVF = range(3)
PH_PREFILL, PH_TRANSFER, PH_DECODE = range(3)
XF_END, XF_START, N_XFF = range(3)
XF_SEQ, XF_VID, XF_TOK, XF_ENGINE, XF_PAIR, N_XFI = range(6)
PD_ARRIVAL, PD_FIRST, PD_FINISH, N_PDF = range(4)
PD_PAIR, PD_CLS, PD_PRE, PD_DEC, N_PDI = range(5)


# -- the argument groups of net_run (records of arrays; the driver builds them) --------------------
class Loop(NamedTuple):
    """The loop's scalars."""

    ns: np.ndarray  # integers NS_* (stage, counters, free-list lengths, what the driver is asked)
    nf: np.ndarray  # floats NF_* (times)


class Routes(NamedTuple):
    """The route tables (``llmqueue.engines.compiled.RouteTables``; read only)."""

    nodes: np.ndarray  # one row per node, columns ND_*
    next_target: np.ndarray  # each node's next targets (node index, EXIT_NODE: exit) ...
    next_prob: np.ndarray  # ... and their cumulative probabilities
    branches: np.ndarray  # each fork's branch heads (ND_BR0, ND_BR_N)
    cls_start: np.ndarray  # each class's first node
    pool_first: np.ndarray  # each pool's first entry in pool_members ...
    pool_n: np.ndarray  # ... and its number of members
    pool_members: np.ndarray  # the members' engine indices, pool by pool
    pool_router: np.ndarray  # each pool's router (R_*)
    pool_kv: np.ndarray  # each member's least-kv denominator (KV cache tokens, else budget)


class Work(NamedTuple):
    """Work lists."""

    due: np.ndarray  # the engines due at a shared instant
    times: np.ndarray  # each engine's next event time
    fin: np.ndarray  # the tokens of finished visits to route
    stack: np.ndarray  # the routing stack (rows: token, node)


class Tokens(NamedTuple):
    """Requests and fork branches in the network (tokens) and fork frames, with their free lists."""

    tok_i: np.ndarray  # TK_* columns
    tok_f: np.ndarray  # arrival time in the network
    tok_free: np.ndarray  # free tokens (NS_TOK_FREE of them)
    frames: np.ndarray  # FR_* columns
    fr_free: np.ndarray  # free frames (NS_FR_FREE of them)
    tok_work: np.ndarray  # prefill + decode tokens of the visit a token waits at
    counts: np.ndarray  # requests in each buffer (visits submitted, not finished), by node; one
    # more entry, always 0 (max-pressure reads it for buffers outside the network)


class Pending(NamedTuple):
    """Arrivals routed to an engine, waiting for its next call, one row per engine (as in
    ``KernelEngine.submit``)."""

    ms: np.ndarray  # arrival times
    pre: np.ndarray  # prefill tokens
    dec: np.ndarray  # decode tokens
    id: np.ndarray  # visit ids
    tok: np.ndarray  # tokens
    ht: np.ndarray  # each engine's head and tail
    node: np.ndarray  # the visit's node (its buffer): network-policy engines group by it


class Streams(NamedTuple):
    """The random inputs, buffered by chunks."""

    ext_t: np.ndarray  # each class's external arrival times (EX_* state in ext_st)
    ext_st: np.ndarray
    size_buf: np.ndarray  # each visit node's prefill and decode sizes (rows 2 node, 2 node + 1)
    size_st: np.ndarray  # DS_* state
    choice_buf: np.ndarray  # each node's uniform draws for its routing
    choice_st: np.ndarray  # DS_* state
    pool_buf: np.ndarray  # each pool's uniform draws (two per request routed)
    pool_st: np.ndarray  # DS_* state and PS_ROUTED


class Classes(NamedTuple):
    """Per-class outputs."""

    cls_i: np.ndarray  # counters CI_*
    cls_f: np.ndarray  # time integrals CF_*
    cls_bins: np.ndarray  # their time bins
    lat_f: np.ndarray  # end-to-end latencies buffered (NS_LAT_N of them) ...
    lat_c: np.ndarray  # ... with their class


class Engines(NamedTuple):
    """Per-engine scalars."""

    si_all: np.ndarray  # engine e's kernel integer scalars are row si_all[e] ...
    sf_all: np.ndarray  # ... and its float scalars row sf_all[e]
    rd: np.ndarray  # its output records already taken
    t_min: np.ndarray  # its shortest batch time
    in_system: np.ndarray  # what a router sees of it: visits routed here, not finished ...
    waiting: np.ndarray  # ... those routed since it last finished one ...
    work: np.ndarray  # ... and their prefill + decode tokens (as _Run keeps them)
    wakes: np.ndarray  # 1: a max-pressure engine, woken when routing changed the counts


class Pairs(NamedTuple):
    """Prefill/decode pairs (``_Run``'s ``_PairRun``, ``_PairVisit`` and transfer heap), pair by
    pair and token by token."""

    side: np.ndarray  # PR_* columns: each side's engine or pool (read only)
    link: np.ndarray  # PF_* columns: the transfer time's fixed and per-token parts (read only)
    counts: np.ndarray  # PC_* columns
    link_f: np.ndarray  # PL_* columns: the shared link's free time, summed waits and busy time
    tok_i: np.ndarray  # PV_* columns: each token's pair visit (phase, prompt, output tokens) ...
    tok_f: np.ndarray  # ... arrival at the pair and first token (PV_ARRIVAL, PV_FIRST)
    xf_f: np.ndarray  # the transfers in flight (NS_XF_N, a heap): XF_END, XF_START ...
    xf_i: np.ndarray  # ... XF_SEQ, XF_VID, XF_TOK, XF_ENGINE (decode engine), XF_PAIR
    done_f: np.ndarray  # finished pair visits (NS_PD_N of them): PD_ARRIVAL, PD_FIRST, PD_FINISH ...
    done_i: np.ndarray  # ... PD_PAIR, PD_CLS, PD_PRE, PD_DEC


class EngineLists(NamedTuple):
    """The engines' other kernel arrays (``kernel.EngineState`` less ``si``, ``sf``), one typed
    list per array (``pol``: of ``kernel.Policy`` records), indexed by engine."""

    slot_i: object
    slot_f: object
    q: object
    heap: object
    pol: object
    t_table: object
    ends: object
    targets: object
    bins: object
    out_f: object
    out_i: object
    itl: object
    lp_i: object
    lp_f: object
    lw_i: object
    lw_f: object


class PolicyLists(NamedTuple):
    """The network-policy engines' group tables (``polkernel.PolicyState``'s fields that a kernel
    engine lacks; empty arrays for a kernel engine), one typed list per array, indexed by engine."""

    grp_i: object
    grp_f: object
    node_grp: object
    route_node: object
    route_prob: object



@njit(cache=True)
def list_of(first):
    """A typed list holding ``first`` (built here, compiled and cached: ``numba.typed.List``
    methods called from Python compile anew in every process, about 2 s)."""
    out = List()
    out.append(first)
    return out


@njit(cache=True)
def list_append(items, value):
    """``items.append(value)`` for a typed list (see ``list_of``)."""
    items.append(value)


@njit(cache=True)
def list_set(items, i, value):
    """``items[i] = value`` for a typed list (see ``list_of``)."""
    items[i] = value


@njit(cache=True)
def _engine_next(si_all, sf_all, pend_ms, pend_ht, e):
    """KernelEngine.next_event_ms: a batch end, an immediate start or a pending arrival, or inf.
    (Engine e's scalars are row e of ``si_all``/``sf_all``: read in place, no array views, whose
    reference counting would cost more than the rest of this scan.)"""
    if si_all[e, ACTIVE] == 1:
        t = sf_all[e, BATCH_END]
    elif si_all[e, IN_SYSTEM] > 0 and si_all[e, BLOCKED] == 0:
        t = sf_all[e, NOW]
    else:
        t = np.inf
    h = pend_ht[e, 0]
    if h < pend_ht[e, 1] and pend_ms[e, h] < t:
        return pend_ms[e, h]
    return t


@njit(cache=True)
def _completion_bound(si_all, sf_all, pend_ms, pend_ht, t_min, e):
    """KernelEngine.completion_bound_ms: no request can finish at engine e before this time."""
    active = si_all[e, ACTIVE] == 1
    end = sf_all[e, BATCH_END] if active else np.inf
    start = np.inf
    if not active and si_all[e, IN_SYSTEM] > 0 and si_all[e, BLOCKED] == 0:
        start = sf_all[e, NOW]
    h = pend_ht[e, 0]
    if h < pend_ht[e, 1] and pend_ms[e, h] < start:
        start = pend_ms[e, h]
    start += t_min
    return end if end < start else start


@njit(cache=True)
def _class_present(cls_i, cls_f, cls_bins, c, t_ms, delta):
    """_Run._present: requests of class c in the network, time-integrated (area and bins)."""
    last = cls_f[c, CF_LAST]
    if t_ms > last:
        n = cls_i[c, CI_PRESENT]
        cls_f[c, CF_AREA] += n * (t_ms - last)
        _bins_add(cls_f[c], CF_WIDTH, cls_bins[c], last, t_ms, float(n))
        cls_f[c, CF_LAST] = t_ms
    cls_i[c, CI_PRESENT] += delta


@njit(cache=True)
def _choice_ready(nodes, choice_st, node):
    """Whether _choose can run at ``node`` (one target, or a uniform draw is buffered)."""
    return nodes[node, ND_NEXT_N] == 1 or choice_st[node, DS_POS] < choice_st[node, DS_LEN]


@njit(cache=True)
def _choose(nodes, next_target, next_prob, choice_buf, choice_st, node):
    """_Run._choose: the next node (a draw of the node's own stream when there are several)."""
    n = nodes[node, ND_NEXT_N]
    k0 = nodes[node, ND_NEXT0]
    if n == 1:
        return next_target[k0]
    u = choice_buf[node, choice_st[node, DS_POS]]
    choice_st[node, DS_POS] += 1
    acc = 0.0
    for k in range(k0, k0 + n):
        acc += next_prob[k]
        if u < acc:
            return next_target[k]
    return next_target[k0 + n - 1]


@njit(cache=True)
def _push(ns, stack, tok, node):
    k = ns[NS_STK_LEN]
    stack[0, k] = tok
    stack[1, k] = node
    ns[NS_STK_LEN] = k + 1


@njit(cache=True)
def _back(ns, stack, tok, node, code, ask):
    """_walk stops short of ``node``: (tok, node) pushed back, ``ns[NS_ASK] = ask``; returns code."""
    _push(ns, stack, tok, node)
    ns[NS_ASK] = ask
    return code


@njit(cache=True)
def _new_token(ns, tok_i, tok_f, tok_free, cls, frame, arrival_ms):
    ns[NS_TOK_FREE] -= 1
    tok = tok_free[ns[NS_TOK_FREE]]
    tok_i[tok, TK_CLS] = cls
    tok_i[tok, TK_FRAME] = frame
    tok_i[tok, TK_NODE] = -1
    tok_f[tok] = arrival_ms
    return tok


@njit(cache=True)
def _free_token(ns, tok_free, tok):
    tok_free[ns[NS_TOK_FREE]] = tok
    ns[NS_TOK_FREE] += 1


@njit(cache=True)
def _pick(router, first, n, members, in_system, waiting, work, kv, u1, u2, routed):
    """policies.routers: the engine a pool's router sends a visit to (the same comparisons in the
    same order: ties go to the lowest member index)."""
    if router == R_ROUND_ROBIN:
        return members[first + routed % n]
    if router == R_RANDOM:
        i = int(u1 * n)
        return members[first + (i if i < n - 1 else n - 1)]
    if router == R_P2C:
        if n == 1:
            return members[first]
        i = int(u1 * n)
        if i > n - 1:
            i = n - 1
        j = int(u2 * (n - 1))
        if j > n - 2:
            j = n - 2
        if j >= i:
            j += 1
        a, b = (i, j) if i < j else (j, i)
        ea, eb = members[first + a], members[first + b]
        return eb if in_system[eb] < in_system[ea] else ea
    best = 0
    best_e = members[first]
    for i in range(1, n):
        e = members[first + i]
        if router == R_JSQ:
            better = in_system[e] < in_system[best_e]
        elif router == R_JSQ_TOKENS:
            better = work[e] < work[best_e]
        elif router == R_LEAST_KV:
            better = work[e] / kv[first + i] < work[best_e] / kv[first + best]
        else:  # R_VLLM_DP
            score = VLLM_WAITING_WEIGHT * waiting[e] + (in_system[e] - waiting[e])
            best_score = VLLM_WAITING_WEIGHT * waiting[best_e] + (in_system[best_e] - waiting[best_e])
            better = score < best_score
        if better:
            best = i
            best_e = e
    return best_e


@njit(cache=True)
def _pend_room(pending, e):
    """The row where engine e's next pending arrival goes (the rows compacted to the front when
    the end is reached), or -1 when every row holds one."""
    pend_ms, pend_ht = pending.ms, pending.ht
    h, tail = pend_ht[e, 0], pend_ht[e, 1]
    if tail == pend_ms.shape[1]:
        if h == 0:
            return -1
        n = tail - h  # compact: pending arrivals move to the front (forward copy)
        for i in range(n):
            pend_ms[e, i] = pend_ms[e, h + i]
            pending.pre[e, i] = pending.pre[e, h + i]
            pending.dec[e, i] = pending.dec[e, h + i]
            pending.id[e, i] = pending.id[e, h + i]
            pending.tok[e, i] = pending.tok[e, h + i]
            pending.node[e, i] = pending.node[e, h + i]
        pend_ht[e, 0] = 0
        pend_ht[e, 1] = n
        tail = n
    return tail


@njit(cache=True)
def _pend_put(pending, e, tail, t, pre, dec, vid, tok, node):
    """KernelEngine.submit: an arrival for engine e's next call, in row ``tail`` (``_pend_room``)."""
    pending.ms[e, tail] = t
    pending.pre[e, tail] = pre
    pending.dec[e, tail] = dec
    pending.id[e, tail] = vid
    pending.tok[e, tail] = tok
    pending.node[e, tail] = node
    pending.ht[e, 1] = tail + 1


@njit(cache=True)
def _xf_less(xf_f, xf_i, a, b):
    """Whether transfer row a comes before row b (the Python loop's tuples: end, then sequence)."""
    ea, eb = xf_f[a, XF_END], xf_f[b, XF_END]
    return ea < eb or (ea == eb and xf_i[a, XF_SEQ] < xf_i[b, XF_SEQ])


@njit(cache=True)
def _xf_copy(xf_f, xf_i, dst, src):
    for k in range(N_XFF):
        xf_f[dst, k] = xf_f[src, k]
    for k in range(N_XFI):
        xf_i[dst, k] = xf_i[src, k]


@njit(cache=True)
def _xf_siftdown(xf_f, xf_i, start, pos, item):
    """heapq._siftdown: the entry of row ``item`` moves up from ``pos`` to its place."""
    while pos > start:
        parent = (pos - 1) >> 1
        if _xf_less(xf_f, xf_i, item, parent):
            _xf_copy(xf_f, xf_i, pos, parent)
            pos = parent
            continue
        break
    _xf_copy(xf_f, xf_i, pos, item)


@njit(cache=True)
def _xf_push(ns, xf_f, xf_i, end, start, seq, vid, tok, e, q):
    """heapq.heappush of a transfer (the caller checked a row is free: ``NS_XF_N`` < rows - 1)."""
    n = ns[NS_XF_N]
    spare = xf_f.shape[0] - 1
    xf_f[spare, XF_END] = end
    xf_f[spare, XF_START] = start
    xf_i[spare, XF_SEQ] = seq
    xf_i[spare, XF_VID] = vid
    xf_i[spare, XF_TOK] = tok
    xf_i[spare, XF_ENGINE] = e
    xf_i[spare, XF_PAIR] = q
    ns[NS_XF_N] = n + 1
    _xf_siftdown(xf_f, xf_i, 0, n, spare)


@njit(cache=True)
def _xf_pop(ns, xf_f, xf_i):
    """heapq.heappop: the first transfer (row 0, read by the caller) leaves the heap."""
    n = ns[NS_XF_N] - 1
    ns[NS_XF_N] = n
    if n == 0:
        return
    spare = xf_f.shape[0] - 1
    _xf_copy(xf_f, xf_i, spare, n)  # the last entry, sifted from the top (heapq._siftup)
    pos = 0
    child = 1
    while child < n:
        right = child + 1
        if right < n and not _xf_less(xf_f, xf_i, child, right):
            child = right
        _xf_copy(xf_f, xf_i, pos, child)
        pos = child
        child = 2 * pos + 1
    _xf_siftdown(xf_f, xf_i, 0, pos, spare)


@njit(cache=True)
def _walk(loop, routes, stack, tokens, pending, streams, classes, engines, pairs, tok, node):
    """_Run._advance: move token ``tok`` to ``node`` and on, until it waits at an engine (a pending
    arrival there) or a join, or leaves. Returns 0, or a NET_ code with (tok, node) pushed back
    after the last node it completed (each node's step checks what it needs before changing
    anything). A fork pushes its branches, the first on top: depth first, as the recursion.
    A visit to a pool asks its router (``_pick``) which member takes it, before anything is
    consumed; a visit to a prefill/decode pair goes to its prefill side (or, without a prompt,
    to its decode side) and starts the token's pair visit (``pairs.tok_i``, ``pairs.tok_f``). The
    groups are ``net_run``'s (``stack``: its work lists' routing stack)."""
    ns, nf = loop.ns, loop.nf
    nodes, next_target, next_prob = routes.nodes, routes.next_target, routes.next_prob
    branches = routes.branches
    tok_i, tok_f, tok_free = tokens.tok_i, tokens.tok_f, tokens.tok_free
    frames, fr_free = tokens.frames, tokens.fr_free
    size_buf, size_st = streams.size_buf, streams.size_st
    choice_buf, choice_st = streams.choice_buf, streams.choice_st
    cls_i, cls_f, cls_bins = classes.cls_i, classes.cls_f, classes.cls_bins
    lat_f, lat_c = classes.lat_f, classes.lat_c
    t = nf[NF_T_ROUTE]
    while True:
        if node == EXIT_NODE:
            if tok_i[tok, TK_FRAME] >= 0:  # validated impossible: a branch always meets its join
                return _back(ns, stack, tok, node, NET_BROKEN, -1)
            n = ns[NS_LAT_N]
            if n == lat_f.shape[0]:
                return _back(ns, stack, tok, node, NET_LATENCY, -1)
            c = tok_i[tok, TK_CLS]
            cls_i[c, CI_DONE] += 1
            lat_f[n] = t - tok_f[tok]
            lat_c[n] = c
            ns[NS_LAT_N] = n + 1
            _class_present(cls_i, cls_f, cls_bins, c, t, -1)
            _free_token(ns, tok_free, tok)
            return 0
        kind = nodes[node, ND_KIND]
        if kind == KIND_VISIT:
            pre_s, dec_s = 2 * node, 2 * node + 1
            for s in (pre_s, dec_s):
                if size_st[s, DS_POS] == size_st[s, DS_LEN]:
                    return _back(ns, stack, tok, node, NET_SIZES, s)
            if not _choice_ready(nodes, choice_st, node):  # needed if the visit draws no tokens
                return _back(ns, stack, tok, node, NET_CHOICES, node)
            pre = size_buf[pre_s, size_st[pre_s, DS_POS]]
            dec = size_buf[dec_s, size_st[dec_s, DS_POS]]
            if pre + dec == 0:  # nothing to do at this visit
                size_st[pre_s, DS_POS] += 1
                size_st[dec_s, DS_POS] += 1
                node = _choose(nodes, next_target, next_prob, choice_buf, choice_st, node)
                continue
            q = nodes[node, ND_PAIR]
            if q >= 0:  # _Run._enter_pair: the prompt to the prefill side, or (none) the output
                side = PR_PRE_ENGINE if pre > 0 else PR_DEC_ENGINE  # to the decode side at once
                e = pairs.side[q, side]
                p = pairs.side[q, side + 1]
                sub_pre, sub_dec = pre, (dec if pre == 0 else 0)
            else:
                e = nodes[node, ND_ENGINE]
                p = nodes[node, ND_POOL]
                sub_pre, sub_dec = pre, dec
            if p >= 0:  # the pool's router picks the member (two draws of its stream, peeked)
                pool_buf, pool_st = streams.pool_buf, streams.pool_st
                k = pool_st[p, DS_POS]
                if k + 2 > pool_st[p, DS_LEN]:
                    return _back(ns, stack, tok, node, NET_POOL_DRAWS, p)
                e = _pick(routes.pool_router[p], routes.pool_first[p], routes.pool_n[p],
                          routes.pool_members, engines.in_system, engines.waiting, engines.work,
                          routes.pool_kv, pool_buf[p, k], pool_buf[p, k + 1], pool_st[p, PS_ROUTED])
            tail = _pend_room(pending, e)
            if tail < 0:
                return _back(ns, stack, tok, node, NET_PENDING, e)
            size_st[pre_s, DS_POS] += 1
            size_st[dec_s, DS_POS] += 1
            if p >= 0:
                streams.pool_st[p, DS_POS] += 2
                streams.pool_st[p, PS_ROUTED] += 1
            engines.in_system[e] += 1
            engines.waiting[e] += 1
            engines.work[e] += sub_pre + sub_dec
            tokens.tok_work[tok] = sub_pre + sub_dec
            vid = ns[NS_VISITS]
            ns[NS_VISITS] = vid + 1
            tok_i[tok, TK_NODE] = node
            _pend_put(pending, e, tail, t, sub_pre, sub_dec, vid, tok, node)
            tokens.counts[node] += 1  # _Run.counts: a visit submitted to its buffer
            if q >= 0:
                pairs.counts[q, PC_ARRIVALS] += 1
                pairs.tok_i[tok, PV_PRE] = pre
                pairs.tok_i[tok, PV_DEC] = dec
                pairs.tok_f[tok, PV_ARRIVAL] = t
                if pre == 0:  # its first token now
                    pairs.tok_i[tok, PV_PHASE] = PH_DECODE
                    pairs.tok_f[tok, PV_FIRST] = t
                    pairs.counts[q, PC_IN_DECODE] += 1
                else:
                    pairs.tok_i[tok, PV_PHASE] = PH_PREFILL
                    pairs.tok_f[tok, PV_FIRST] = np.nan
                    pairs.counts[q, PC_IN_PREFILL] += 1
            return 0
        if kind == KIND_FORK:
            nb = nodes[node, ND_BR_N]
            if ns[NS_TOK_FREE] < nb or ns[NS_FR_FREE] < 1:
                return _back(ns, stack, tok, node, NET_TOKENS if ns[NS_TOK_FREE] < nb else NET_FRAMES, -1)
            ns[NS_FR_FREE] -= 1
            f = fr_free[ns[NS_FR_FREE]]
            frames[f, FR_PARENT] = tok
            frames[f, FR_LEFT] = nb
            frames[f, FR_JOIN] = nodes[node, ND_JOIN]
            b0 = nodes[node, ND_BR0]
            for i in range(nb - 1, -1, -1):
                child = _new_token(ns, tok_i, tok_f, tok_free, tok_i[tok, TK_CLS], f, tok_f[tok])
                _push(ns, stack, child, branches[b0 + i])
            return 0
        # a join: a branch arrives; the last one lets the forking request go on
        if not _choice_ready(nodes, choice_st, node):
            return _back(ns, stack, tok, node, NET_CHOICES, node)
        f = tok_i[tok, TK_FRAME]
        if f < 0 or frames[f, FR_JOIN] != node:
            return _back(ns, stack, tok, node, NET_BROKEN, -1)
        frames[f, FR_LEFT] -= 1
        _free_token(ns, tok_free, tok)
        if frames[f, FR_LEFT] > 0:
            return 0
        tok = frames[f, FR_PARENT]
        fr_free[ns[NS_FR_FREE]] = f
        ns[NS_FR_FREE] += 1
        node = _choose(nodes, next_target, next_prob, choice_buf, choice_st, node)


@njit(cache=True)
def _pair_step(loop, routes, stack, tokens, streams, engines, pairs, tok, node, q):
    """_Run._pair_step for the finished visit of ``tok`` at ``node``, a visit to pair q: after the
    prompt, the KV transfer starts, to the decode member picked now (counted in the routers' view
    while in flight); after the output (or a prompt without output), the pair visit ends: its
    latencies are buffered and the token goes on as any finished visit. Returns 0 (the finished
    visit taken) or a NET_ code, having changed nothing."""
    ns, nf = loop.ns, loop.nf
    t = nf[NF_T_ROUTE]
    pv_i, pv_f = pairs.tok_i, pairs.tok_f
    pre, dec = pv_i[tok, PV_PRE], pv_i[tok, PV_DEC]
    counts = pairs.counts
    if pv_i[tok, PV_PHASE] == PH_PREFILL and dec > 0:
        e = pairs.side[q, PR_DEC_ENGINE]
        p = pairs.side[q, PR_DEC_POOL]
        k = 0
        if p >= 0:
            k = streams.pool_st[p, DS_POS]
            if k + 2 > streams.pool_st[p, DS_LEN]:
                ns[NS_ASK] = p
                return NET_POOL_DRAWS
        if ns[NS_XF_N] >= pairs.xf_f.shape[0] - 1:
            return NET_TRANSFERS
        ns[NS_FIN_POS] += 1
        if p >= 0:
            e = _pick(routes.pool_router[p], routes.pool_first[p], routes.pool_n[p],
                      routes.pool_members, engines.in_system, engines.waiting, engines.work,
                      routes.pool_kv, streams.pool_buf[p, k], streams.pool_buf[p, k + 1],
                      streams.pool_st[p, PS_ROUTED])
            streams.pool_st[p, DS_POS] += 2
            streams.pool_st[p, PS_ROUTED] += 1
        counts[q, PC_IN_PREFILL] -= 1
        pv_f[tok, PV_FIRST] = t
        engines.in_system[e] += 1
        engines.waiting[e] += 1
        engines.work[e] += dec
        tokens.tok_work[tok] = dec
        link = pairs.link_f
        duration = pairs.link[q, PF_FIXED] + pairs.link[q, PF_PER_TOKEN] * pre
        shared = pairs.side[q, PR_SHARED] == 1
        start = link[q, PL_FREE] if shared and link[q, PL_FREE] > t else t
        end = start + duration
        if shared:
            link[q, PL_FREE] = end
            link[q, PL_WAIT] += start - t
        link[q, PL_BUSY] += duration
        counts[q, PC_STARTED] += 1
        counts[q, PC_IN_TRANSFER] += 1
        pv_i[tok, PV_PHASE] = PH_TRANSFER
        vid = ns[NS_VISITS]
        ns[NS_VISITS] = vid + 1
        seq = ns[NS_XF_SEQ]
        ns[NS_XF_SEQ] = seq + 1
        _xf_push(ns, pairs.xf_f, pairs.xf_i, end, start, seq, vid, tok, e, q)
        return 0
    # the pair visit ends (_Run._pair_done)
    if not _choice_ready(routes.nodes, streams.choice_st, node):
        ns[NS_ASK] = node
        return NET_CHOICES
    n = ns[NS_PD_N]
    if n == pairs.done_f.shape[0]:
        return NET_PAIR_LATENCY
    ns[NS_FIN_POS] += 1
    if pv_i[tok, PV_PHASE] == PH_PREFILL:
        counts[q, PC_IN_PREFILL] -= 1
        pv_f[tok, PV_FIRST] = t
    else:
        counts[q, PC_IN_DECODE] -= 1
    counts[q, PC_COMPLETED] += 1
    done_f, done_i = pairs.done_f, pairs.done_i
    done_f[n, PD_ARRIVAL] = pv_f[tok, PV_ARRIVAL]
    done_f[n, PD_FIRST] = pv_f[tok, PV_FIRST]
    done_f[n, PD_FINISH] = t
    done_i[n, PD_PAIR] = q
    done_i[n, PD_CLS] = tokens.tok_i[tok, TK_CLS]
    done_i[n, PD_PRE] = pre
    done_i[n, PD_DEC] = dec
    ns[NS_PD_N] = n + 1
    tokens.counts[node] -= 1  # _Run.counts: the pair visit left its buffer
    target = _choose(routes.nodes, routes.next_target, routes.next_prob, streams.choice_buf,
                     streams.choice_st, node)
    _push(ns, stack, tok, target)
    return 0


@njit(cache=True)
def _take(si, out_i, rd, fin, ns, e, tok_work, in_system, waiting, work):
    """KernelEngine._take: append the tokens of engine e's newly finished visits to ``fin``; what
    the routers see of engine e loses them (as ``_Run._route`` books them)."""
    count = si[N_OUT]
    n = ns[NS_FIN_LEN]
    if n + count - rd[e] > fin.shape[0]:
        return False
    if count > rd[e]:
        waiting[e] = 0
    for r in range(rd[e], count):
        tok = out_i[r, 4]
        fin[n] = tok
        in_system[e] -= 1
        work[e] -= tok_work[tok]
        n += 1
    ns[NS_FIN_LEN] = n
    rd[e] = count
    return True


@njit(cache=True)
def _setup_call(ns, si_all, sf_all, e, mode, limit_ms):
    """KernelEngine._call's settings: the time limit and the kind of step."""
    ns[NS_CALL_E] = e
    ns[NS_CALL_MODE] = mode
    sf_all[e, LIMIT] = limit_ms
    si_all[e, END_ONLY] = int(mode == MODE_END)
    si_all[e, START_ONLY] = int(mode == MODE_START)
    si_all[e, A_POS] = 0
    ns[NS_STAGE] = ST_CALL


@njit(cache=True)
def net_run(loop, routes, work, tokens, pending, streams, classes, engines, lists, plists, pairs):
    """Run the network until done or until the driver must act (a NET_ code; see above).

    The arguments, each a record of arrays (a ``NamedTuple`` defined above, read by field name;
    the driver builds them in ``llmqueue.engines.compiled.NetworkLoop._args``):

    - ``loop`` (``Loop``): the loop's scalars ``ns``, ``nf`` (``NS_*``, ``NF_*``: stage, counters,
      times).
    - ``routes`` (``Routes``): the route tables (``compiled.RouteTables``; read only).
    - ``work`` (``Work``): the engines due at a shared instant, each engine's next event time, the
      tokens of finished visits to route, the routing stack (rows: token, node).
    - ``tokens`` (``Tokens``): requests and fork branches in the network and fork frames, with
      their free lists.
    - ``pending`` (``Pending``): arrivals routed to an engine, waiting for its next call, one row
      per engine (``pending.ht[e]``: head and tail), as in ``KernelEngine.submit``.
    - ``streams`` (``Streams``): the random inputs, buffered by chunks: each class's external
      arrival times, each visit node's prefill and decode sizes (rows 2 node, 2 node + 1), each
      node's uniform draws for its routing.
    - ``classes`` (``Classes``): per-class outputs: counters, time integrals and their bins,
      end-to-end latencies buffered with their class.
    - ``engines`` (``Engines``): per-engine scalars: the kernel scalars of engine e are rows
      ``si_all[e]``, ``sf_all[e]``; ``rd[e]``: its output records already taken; ``t_min[e]``:
      its shortest batch time.
    - ``lists`` (``EngineLists``): the engines' other kernel arrays (the fields of
      ``kernel.EngineState`` but ``si``, ``sf``), one typed list per array (``pol``: of
      ``kernel.Policy`` records); engine e's
      ``EngineState`` is assembled from row e of the scalars and entry e of each list.
    - ``plists`` (``PolicyLists``): the group tables of the network-policy engines (``pol.kind``
      >= ``polkernel.KIND_PRIORITY``), whose ``polkernel.PolicyState`` is assembled from the
      scalars, the lists and these; ``polkernel.run`` drives them with the same call protocol.
    - ``pairs`` (``Pairs``): the prefill/decode pairs' tables, counts and link, each token's pair
      visit, the KV transfers in flight (an event kind of its own, ``ST_TRANSFERS``: as in
      ``_Run._loop``, external arrivals come first at an instant, then transfer ends, then batch
      ends) and the finished pair visits' times buffered for the recorders.

    Engines are numbered in engine-name order.
    """
    ns, nf = loop.ns, loop.nf
    nodes, next_target, next_prob = routes.nodes, routes.next_target, routes.next_prob
    cls_start = routes.cls_start
    due, times, fin, stack = work.due, work.times, work.fin, work.stack
    tok_i, tok_f, tok_free = tokens.tok_i, tokens.tok_f, tokens.tok_free
    pend_ms, pend_pre, pend_dec, pend_id = pending.ms, pending.pre, pending.dec, pending.id
    pend_tok, pend_ht = pending.tok, pending.ht
    ext_t, ext_st = streams.ext_t, streams.ext_st
    choice_buf, choice_st = streams.choice_buf, streams.choice_st
    cls_i, cls_f, cls_bins = classes.cls_i, classes.cls_f, classes.cls_bins
    si_all, sf_all, rd, t_min = engines.si_all, engines.sf_all, engines.rd, engines.t_min
    n_eng = si_all.shape[0]
    n_cls = cls_start.shape[0]
    while True:
        stage = ns[NS_STAGE]
        if stage == ST_NEXT_EXT:
            # the next external arrival, all classes merged in time order (ties: class order)
            have = 0
            if ns[NS_MAX_REQ] < 0 or ns[NS_ARRIVED] < ns[NS_MAX_REQ]:
                best = -1
                best_t = np.inf
                for c in range(n_cls):
                    if ext_st[c, EX_END] == 1:
                        continue
                    if ext_st[c, EX_POS] == ext_st[c, EX_LEN]:
                        ns[NS_ASK] = c
                        return NET_ARRIVALS
                    t = ext_t[c, ext_st[c, EX_POS]]
                    if best < 0 or t < best_t:
                        best = c
                        best_t = t
                if best >= 0:
                    have = 1
                    ns[NS_NXT_CLS] = best
                    nf[NF_NXT_T] = best_t
            if have == 1 and nf[NF_NXT_T] >= nf[NF_STOP]:
                have = 0
            ns[NS_HAVE_NXT] = have
            ns[NS_STAGE] = ST_TOP
            if have == 0:
                return NET_HORIZON  # the driver sets nf[NF_HORIZON] from the last arrival
        elif stage == ST_TOP:
            t_engine = np.inf
            first = 0
            for e in range(n_eng):
                t = _engine_next(si_all, sf_all, pend_ms, pend_ht, e)
                times[e] = t
                if e == 0 or t < t_engine:
                    t_engine = t
                    first = e
            t_xfer = pairs.xf_f[0, XF_END] if ns[NS_XF_N] > 0 else np.inf
            if ns[NS_HAVE_NXT] == 1 and nf[NF_NXT_T] <= t_engine and nf[NF_NXT_T] <= t_xfer:
                if ns[NS_TOK_FREE] == 0:
                    return NET_TOKENS
                c = ns[NS_NXT_CLS]
                t = nf[NF_NXT_T]
                ext_st[c, EX_POS] += 1
                cls_i[c, CI_ARRIVALS] += 1
                _class_present(cls_i, cls_f, cls_bins, c, t, 1)
                nf[NF_LAST_ARRIVAL] = t
                tok = _new_token(ns, tok_i, tok_f, tok_free, c, -1, t)
                _push(ns, stack, tok, cls_start[c])
                ns[NS_ARRIVED] += 1
                nf[NF_T_ROUTE] = t
                ns[NS_ROUTE_AFTER] = ST_NEXT_EXT
                ns[NS_STAGE] = ST_ROUTE
                continue
            horizon = nf[NF_HORIZON]
            if t_xfer <= t_engine and t_xfer < horizon:  # KV arrives: joins the batch starting now
                nf[NF_T_XFER] = t_xfer
                ns[NS_STAGE] = ST_TRANSFERS
                continue
            if t_engine >= horizon or math.isinf(t_engine):
                ns[NS_STAGE] = ST_DONE
                return NET_DONE
            # an engine runs alone until another engine could finish a request (only that can
            # send it work), the next external arrival or the horizon
            alone = np.inf
            for e in range(n_eng):
                if e != first:
                    if engines.wakes[e] == 1:  # PolicyEngine.completion_bound_ms (max-pressure)
                        bound = _engine_next(si_all, sf_all, pend_ms, pend_ht, e)
                    else:
                        bound = _completion_bound(si_all, sf_all, pend_ms, pend_ht, t_min[e], e)
                    if bound < alone:
                        alone = bound
            if alone > t_engine:
                until = alone
                if horizon < until:
                    until = horizon
                if ns[NS_HAVE_NXT] == 1 and nf[NF_NXT_T] < until:
                    until = nf[NF_NXT_T]
                if t_xfer < until:
                    until = t_xfer
                _setup_call(ns, si_all, sf_all, first, MODE_ADVANCE, np.nextafter(until, -np.inf))
                continue
            # a shared instant: every due engine ends its batch, the finished are routed, then
            # they all start
            n_due = 0
            for e in range(n_eng):
                if times[e] == t_engine:
                    due[n_due] = e
                    n_due += 1
            ns[NS_DUE_N] = n_due
            ns[NS_DUE_I] = 0
            nf[NF_T_ENGINE] = t_engine
            ns[NS_STAGE] = ST_ENDS
        elif stage == ST_ENDS:
            t_engine = nf[NF_T_ENGINE]
            called = False
            while ns[NS_DUE_I] < ns[NS_DUE_N]:
                e = due[ns[NS_DUE_I]]
                ns[NS_DUE_I] += 1
                if si_all[e, ACTIVE] == 1 and sf_all[e, BATCH_END] == t_engine:
                    _setup_call(ns, si_all, sf_all, e, MODE_END,
                                _engine_next(si_all, sf_all, pend_ms, pend_ht, e))
                    called = True
                    break
            if not called:
                nf[NF_T_ROUTE] = t_engine
                ns[NS_ROUTE_AFTER] = ST_STARTS
                ns[NS_DUE_I] = 0
                ns[NS_STAGE] = ST_ROUTE
        elif stage == ST_TRANSFERS:
            # _Run._transfers_end: each transfer ending now, in the order they started, hands its
            # request to the decode engine picked at its start (already in the routers' view)
            t = nf[NF_T_XFER]
            xf_f, xf_i = pairs.xf_f, pairs.xf_i
            while ns[NS_XF_N] > 0 and xf_f[0, XF_END] == t:
                e = xf_i[0, XF_ENGINE]
                tail = _pend_room(pending, e)
                if tail < 0:
                    ns[NS_ASK] = e
                    return NET_PENDING
                tok, vid, q = xf_i[0, XF_TOK], xf_i[0, XF_VID], xf_i[0, XF_PAIR]
                _xf_pop(ns, xf_f, xf_i)
                pairs.counts[q, PC_IN_TRANSFER] -= 1
                pairs.counts[q, PC_FINISHED] += 1
                _pend_put(pending, e, tail, t, 0, pairs.tok_i[tok, PV_DEC], vid, tok, tok_i[tok, TK_NODE])
                pairs.tok_i[tok, PV_PHASE] = PH_DECODE
                pairs.counts[q, PC_IN_DECODE] += 1
            ns[NS_STAGE] = ST_TOP
        elif stage == ST_STARTS:
            if ns[NS_DUE_I] < ns[NS_DUE_N]:
                e = due[ns[NS_DUE_I]]
                ns[NS_DUE_I] += 1
                _setup_call(ns, si_all, sf_all, e, MODE_START, nf[NF_T_ENGINE])
            else:
                ns[NS_STAGE] = ST_TOP
        elif stage == ST_CALL:
            e = ns[NS_CALL_E]
            si, sf, out_i = si_all[e], sf_all[e], lists.out_i[e]
            h, tail = pend_ht[e, 0], pend_ht[e, 1]
            state = EngineState(si, sf, lists.slot_i[e], lists.slot_f[e], lists.q[e], lists.heap[e],
                                lists.pol[e], lists.t_table[e], lists.ends[e], lists.targets[e],
                                lists.bins[e], lists.out_f[e], out_i, lists.itl[e], lists.lp_i[e],
                                lists.lp_f[e], lists.lw_i[e], lists.lw_f[e])
            arrivals = Arrivals(pend_ms[e, h:tail], pend_pre[e, h:tail], pend_dec[e, h:tail],
                                pend_id[e, h:tail], pend_tok[e, h:tail])
            if lists.pol[e].kind >= KIND_PRIORITY:  # a network policy's engine (polkernel)
                pstate = PolicyState(si, sf, lists.slot_i[e], lists.slot_f[e], lists.q[e], lists.pol[e],
                                     lists.t_table[e], lists.bins[e], lists.out_f[e], out_i,
                                     lists.itl[e], plists.grp_i[e], plists.grp_f[e],
                                     plists.node_grp[e], plists.route_node[e], plists.route_prob[e])
                code = polkernel.run(pstate, arrivals, pending.node[e, h:tail], tokens.counts)
            else:
                code = run(state, arrivals)
            if not _take(si, out_i, rd, fin, ns, e, tokens.tok_work, engines.in_system,
                         engines.waiting, engines.work):
                return NET_BROKEN
            if code in (NEED_ROOM, NEED_SLOTS, BAD_BATCH_TIME):
                ns[NS_ASK] = e
                if code == NEED_ROOM:
                    return NET_ROOM  # the driver drains engine e's outputs; the call resumes
                return NET_SLOTS if code == NEED_SLOTS else NET_BAD_BATCH_TIME
            h += si[A_POS]
            if h == tail:
                h = 0
                tail = 0
            pend_ht[e, 0] = h
            pend_ht[e, 1] = tail
            mode = ns[NS_CALL_MODE]
            if mode == MODE_ADVANCE:
                nf[NF_T_ROUTE] = sf[NOW]
                ns[NS_ROUTE_AFTER] = ST_TOP
                ns[NS_STAGE] = ST_ROUTE
            elif mode == MODE_END:
                ns[NS_STAGE] = ST_ENDS
            else:
                if ns[NS_FIN_LEN] > 0:  # a start never ends a batch
                    return NET_BROKEN
                ns[NS_STAGE] = ST_STARTS
        elif stage == ST_ROUTE:
            # _Run._route: each finished visit in order goes to its next node and on, depth first
            while True:
                if ns[NS_STK_LEN] > 0:
                    k = ns[NS_STK_LEN] - 1
                    ns[NS_STK_LEN] = k
                    code = _walk(loop, routes, stack, tokens, pending, streams, classes, engines, pairs,
                                 stack[0, k], stack[1, k])
                    if code != 0:
                        return code
                elif ns[NS_FIN_POS] < ns[NS_FIN_LEN]:
                    tok = fin[ns[NS_FIN_POS]]
                    node = tok_i[tok, TK_NODE]
                    q = nodes[node, ND_PAIR]
                    if q >= 0:  # a visit to a pair: its next phase, or on
                        code = _pair_step(loop, routes, stack, tokens, streams, engines, pairs, tok,
                                          node, q)
                        if code != 0:
                            return code
                        continue
                    if not _choice_ready(nodes, choice_st, node):
                        ns[NS_ASK] = node
                        return NET_CHOICES
                    target = _choose(nodes, next_target, next_prob, choice_buf, choice_st, node)
                    ns[NS_FIN_POS] += 1
                    tokens.counts[node] -= 1  # _Run.counts: the visit left its buffer
                    _push(ns, stack, tok, target)
                else:
                    if ns[NS_FIN_LEN] > 0:  # finished visits were routed: blocked max-pressure
                        for e in range(n_eng):  # engines look again (_Run._route)
                            if engines.wakes[e] == 1:
                                polkernel.wake(si_all[e], sf_all[e], nf[NF_T_ROUTE])
                    ns[NS_FIN_LEN] = 0
                    ns[NS_FIN_POS] = 0
                    ns[NS_STAGE] = ns[NS_ROUTE_AFTER]
                    break
        else:
            return NET_DONE


# -- twins: each compiled function and the Python code it ports -------------------------------------

_LIST = "typed-list helper: numba.typed.List methods called from Python compile anew in every process"
_ENGINE = "llmqueue.engines.compiled:KernelEngine."
_NET = "llmqueue.sim.network:_Run."
_POOL = "token pool of the network loop (the Python routing makes a _Token object)"

TWINS: dict[str, tuple[str | None, str]] = {
    "list_of": (None, _LIST),
    "list_append": (None, _LIST),
    "list_set": (None, _LIST),
    "_engine_next": (_ENGINE + "next_event_ms", ""),
    "_completion_bound": (_ENGINE + "completion_bound_ms", ""),
    "_class_present": (_NET + "_present", ""),
    "_choice_ready": (None, "checks a random draw is buffered before _choose (Python draws on demand)"),
    "_choose": (_NET + "_choose", ""),
    "_push": (None, "routing stack: the Python routing recurses instead"),
    "_back": (None, "routing stack: pushes a step back when the driver must act first"),
    "_new_token": (None, _POOL),
    "_free_token": (None, _POOL),
    "_pick": ("llmqueue.policies.routers:jsq", "every built-in router (ROUTERS), by its number R_*"),
    "_walk": (_NET + "_advance", ""),
    "_pend_room": (None, "room in an engine's ring of pending arrivals (a Python list grows by itself)"),
    "_pend_put": (_ENGINE + "submit", ""),
    "_xf_less": (None, "tuple order (end, sequence) of the Python loop's transfers, for the heap"),
    "_xf_copy": (None, "copies one transfer row of the heap (a Python heap moves tuples)"),
    "_xf_siftdown": ("heapq:_siftdown", ""),
    "_xf_push": ("heapq:heappush", ""),
    "_xf_pop": ("heapq:heappop", ""),
    "_pair_step": (_NET + "_pair_step", ""),
    "_take": (_ENGINE + "_take", ""),
    "_setup_call": (_ENGINE + "_call", ""),
    "net_run": (_NET + "_loop", ""),
}
"""Each compiled function of this module -> (the Python function or method it ports, or None; a
note: why there is no twin), as ``llmqueue.engines.kernel.TWINS``."""


# numba stamps this module's cache with this file only, yet ``net_run`` holds a copy of
# ``kernel.run`` and ``polkernel.run``: their files' stamps join it (see ``kernel.tie_cache``).
kernel.tie_cache(globals(), __name__, kernel.run, polkernel.run)
