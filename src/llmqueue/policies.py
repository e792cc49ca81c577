"""Batch schedulers as pure functions: a read-only engine view in, a batch plan out.

A policy is any callable ``policy(view: EngineView) -> Mapping[int, int]`` mapping request ids to
the number of tokens each request gets in the next batch. The engine checks every plan against the
batch rules (see ``llmqueue.engine.check_plan``), so a policy only decides *which* tokens to run.

Optional attributes tell the engine and the stability verdict what the policy guarantees:
``name`` (str), ``work_conserving`` (bool: every batch holds ``min(b, demand)`` tokens),
``chunks_prefill`` (bool: may split a prompt across batches) and ``repeats_plan`` (bool: without
arrivals, the same plan comes back as long as each planned decoder has a token left and each
planned prompt has at least its chunk left; this lets the fast engine skip identical iterations).
A policy without them is treated as "unknown": no stability guarantee is claimed for it, and it
runs on the reference engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Literal, Protocol, runtime_checkable

from llmqueue.errors import ConfigError

Plan = dict[int, int]
"""Request id -> tokens in the next batch (prefill tokens, or exactly 1 decode token)."""

Phase = Literal["prefill", "decode"]


class RequestView(Protocol):
    """Read-only view of one request present in the engine."""

    @property
    def id(self) -> int: ...
    @property
    def arrival_ms(self) -> float: ...
    @property
    def prefill_tokens(self) -> int: ...
    @property
    def decode_tokens(self) -> int: ...
    @property
    def prefill_left(self) -> int: ...
    @property
    def decode_left(self) -> int: ...
    @property
    def cls(self) -> str: ...


@dataclass(frozen=True, slots=True)
class EngineView:
    """What a policy sees before a batch: the clock, the batch limits and the requests present.

    ``prefilling`` holds the requests with prefill tokens left and ``decoding`` those whose prompt
    is done and that still have decode tokens, each in arrival order. The request objects are the
    engine's own (not copied, for speed): policies must only read them. ``buffers`` (networks
    only) counts the requests in every buffer ``class.node`` of the network, for policies that
    weigh downstream congestion (max-pressure); it is empty for a single engine.
    """

    now_ms: float
    budget: int
    k_max: int | None
    prefilling: Sequence[RequestView]
    decoding: Sequence[RequestView]
    buffers: Mapping[str, int] = field(default_factory=dict)

    @property
    def demand_tokens(self) -> int:
        """The paper's demand: remaining prefill of prompts plus one token per decoding request."""
        return sum(r.prefill_left for r in self.prefilling) + len(self.decoding)


@runtime_checkable
class Policy(Protocol):
    """A scheduler: maps an engine view to a batch plan."""

    def __call__(self, view: EngineView) -> Mapping[int, int]: ...


def policy_name(policy: Callable[[EngineView], Mapping[int, int]]) -> str:
    """The policy's ``name`` attribute, else its function or class name."""
    name = getattr(policy, "name", None)
    if isinstance(name, str):
        return name
    return getattr(policy, "__name__", type(policy).__name__)


def is_work_conserving(policy: object) -> bool | None:
    """Whether the policy declares itself work-conserving (None: not declared)."""
    value = getattr(policy, "work_conserving", None)
    return value if isinstance(value, bool) else None


def chunks_prefill(policy: object) -> bool | None:
    """Whether the policy declares that it splits prompts across batches (None: not declared)."""
    value = getattr(policy, "chunks_prefill", None)
    return value if isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class CompactView:
    """An ``EngineView`` with the decoding requests given only by their number.

    Enough for policies that serve decoders as a first-come first-served prefix; it lets the fast
    engine keep decoders implicit (docs/fastpath.md).
    """

    now_ms: float
    budget: int
    k_max: int | None
    prefilling: Sequence[RequestView]
    decoders: int


@dataclass(frozen=True, slots=True)
class CompactPlan:
    """A plan in which the decode tokens go to the oldest ``decoders`` decoding requests.

    ``prompts`` lists (request id, prefill tokens) in plan order; ``decode_first`` says whether
    the decode tokens come before the prompts (only the order of the expanded plan depends on it).
    """

    decoders: int
    prompts: tuple[tuple[int, int], ...]
    decode_first: bool

    def expand(self, decoding: Sequence[RequestView]) -> Plan:
        """The ordinary plan, given the decoding requests in arrival order."""
        plan: Plan = {}
        if not self.decode_first:
            plan.update(self.prompts)
        for r in decoding[: self.decoders]:
            plan[r.id] = 1
        if self.decode_first:
            plan.update(self.prompts)
        return plan


def compact(view: EngineView) -> CompactView:
    """The compact view of an engine view."""
    return CompactView(view.now_ms, view.budget, view.k_max, view.prefilling, len(view.decoding))


def _decode_count(view: CompactView, tokens: int, slots: int, k_d: int | None) -> int:
    """How many decoding requests (oldest first) get a token: one each, within the limits."""
    limit = min(tokens, slots, view.decoders)
    if k_d is not None:
        limit = min(limit, k_d)
    return max(limit, 0)


def _take_prefill(
    view: CompactView, tokens: int, slots: int, k_p: int | None, chunked: bool
) -> list[tuple[int, int]]:
    """Prefill tokens FCFS: chunks filling the budget, or whole prompts while they fit."""
    taken: list[tuple[int, int]] = []
    max_count = slots if k_p is None else min(slots, k_p)
    for r in islice(view.prefilling, max(max_count, 0)):
        if tokens <= 0:
            break
        need = r.prefill_left
        if need <= tokens:
            take = need
        elif chunked:
            take = tokens
        else:
            break  # whole prompts only, FCFS: the head does not fit, so nothing behind it goes
        taken.append((r.id, take))
        tokens -= take
    return taken


@dataclass(frozen=True, slots=True)
class KFCFS:
    """The (K_p, K_d)-FCFS family as orthogonal knobs; the four production systems are members.

    ``priority``: which phase is served first. ``mixed``: whether one batch may hold both phases
    (if not, the batch holds only the priority phase, or the other phase when the priority phase
    has nothing it can run). ``chunked``: whether a prompt may be split across batches (if not,
    whole prompts are admitted FCFS while they fit). ``k_p``/``k_d``: at most that many requests
    with prefill/decode tokens in one batch. The engine's ``k_max`` bounds all requests in a batch.
    """

    priority: Phase = "decode"
    mixed: bool = True
    chunked: bool = True
    k_p: int | None = None
    k_d: int | None = None
    name: str = "kfcfs"

    def __post_init__(self) -> None:
        if self.priority not in ("prefill", "decode"):
            raise ConfigError("priority", self.priority, "must be 'prefill' or 'decode'")
        for knob, value in (("k_p", self.k_p), ("k_d", self.k_d)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(knob, value, "must be an integer >= 1")

    @property
    def work_conserving(self) -> bool:
        """Mixed, chunked and with no per-phase request cap: every batch fills to min(b, demand)."""
        return self.mixed and self.chunked and self.k_p is None and self.k_d is None

    @property
    def chunks_prefill(self) -> bool:
        """Whether prompts may be split across batches."""
        return self.chunked

    @property
    def repeats_plan(self) -> bool:
        """Without arrivals the plan repeats while its requests keep their phase and chunk size
        (what the fast engine relies on: docs/fastpath.md)."""
        return True

    def plan_compact(self, view: CompactView) -> CompactPlan:
        """The plan with decoders as a count (the fast engine's entry point)."""
        slots = len(view.prefilling) + view.decoders if view.k_max is None else view.k_max
        tokens = view.budget
        decoders = 0
        prompts: list[tuple[int, int]] = []
        decode_first = self.priority == "decode"
        for phase in ("decode", "prefill") if decode_first else ("prefill", "decode"):
            if phase == "decode":
                decoders = _decode_count(view, tokens, slots - len(prompts), self.k_d)
                tokens -= decoders
            else:
                prompts = _take_prefill(view, tokens, slots - decoders, self.k_p, self.chunked)
                tokens -= sum(take for _, take in prompts)
            if (decoders or prompts) and not self.mixed:
                break
        return CompactPlan(decoders, tuple(prompts), decode_first)

    def __call__(self, view: EngineView) -> Plan:
        return self.plan_compact(compact(view)).expand(view.decoding)


@dataclass(frozen=True, slots=True)
class VLLMChunked:
    """Current vLLM (V1 scheduler) with chunked prefill, in the paper's model.

    Running requests (prompt started or decoding) are served first in arrival order, a decoding
    request one token and a started prompt its next chunk, until ``max_num_batched_tokens`` (the
    engine's budget) is spent; then waiting prompts are admitted FCFS, chunked to fill, while the
    running set stays within ``max_num_seqs`` (the engine's ``k_max``).
    """

    name: str = "vllm-chunked"
    work_conserving: bool = True
    chunks_prefill: bool = True
    repeats_plan: bool = True

    def plan_compact(self, view: CompactView) -> CompactPlan:
        """The plan with decoders as a count (the fast engine's entry point)."""
        tokens = view.budget
        started = [r for r in view.prefilling if r.prefill_left < r.prefill_tokens]
        # waiting: prompts not started, and requests preempted by memory (they recompute their
        # prompt and decoded tokens, so more than their prompt is left): vLLM re-queues them
        waiting = [r for r in view.prefilling if r.prefill_left >= r.prefill_tokens]
        # admission order: with FCFS admission every decoder was admitted before any prompt
        # still in progress (requests that arrive with no prompt count as admitted first)
        running = view.decoders + len(started)
        max_seqs = running + len(waiting) if view.k_max is None else view.k_max
        decoders = max(min(view.decoders, tokens, max_seqs), 0)
        tokens -= decoders
        prompts: list[tuple[int, int]] = []
        if decoders == view.decoders:
            for r in started:
                if tokens == 0 or decoders + len(prompts) >= max_seqs:
                    break
                take = min(r.prefill_left, tokens)
                prompts.append((r.id, take))
                tokens -= take
        admitted = running
        for r in waiting:
            if tokens == 0 or admitted >= max_seqs:
                break
            take = min(r.prefill_left, tokens)
            prompts.append((r.id, take))
            tokens -= take
            admitted += 1
        return CompactPlan(decoders, tuple(prompts), True)

    def __call__(self, view: EngineView) -> Plan:
        return self.plan_compact(compact(view)).expand(view.decoding)


FASTERTRANSFORMER = KFCFS(priority="decode", mixed=False, chunked=False, name="fastertransformer")
"""Decode-only batches while anything decodes; else whole prompts FCFS while they fit."""

VLLM = KFCFS(priority="prefill", mixed=False, chunked=False, name="vllm")
"""Vanilla vLLM (2023): prefill-only batches of whole prompts while any wait; else decode-only."""

ORCA = KFCFS(priority="prefill", mixed=True, chunked=True, name="orca")
"""Prefill tokens first (FCFS, the last prompt chunked to fill), then decode tokens in the rest."""

SARATHI = KFCFS(priority="decode", mixed=True, chunked=True, name="sarathi")
"""One decode token per decoding request first, then prefill chunks, oldest first, to fill."""

VLLM_CHUNKED = VLLMChunked()

POLICY_NAMES = ("fastertransformer", "vllm", "orca", "sarathi", "vllm-chunked", "kfcfs")


def make_policy(
    name: str,
    *,
    priority: Phase = "decode",
    mixed: bool = True,
    chunked: bool = True,
    k_p: int | None = None,
    k_d: int | None = None,
) -> KFCFS | VLLMChunked:
    """Build a shipped policy by name; the knobs apply to ``kfcfs`` only."""
    key = name.strip().lower().replace("_", "-")
    named: dict[str, KFCFS | VLLMChunked] = {
        "fastertransformer": FASTERTRANSFORMER,
        "ft": FASTERTRANSFORMER,
        "vllm": VLLM,
        "orca": ORCA,
        "sarathi": SARATHI,
        "sarathi-serve": SARATHI,
        "vllm-chunked": VLLM_CHUNKED,
    }
    if key in named:
        return named[key]
    if key in ("kfcfs", "k-fcfs"):
        return KFCFS(priority=priority, mixed=mixed, chunked=chunked, k_p=k_p, k_d=k_d)
    raise ConfigError("policy", name, f"unknown policy; choose from {', '.join(POLICY_NAMES)}")


def as_policy(policy: object, field: str = "policy") -> Callable[[EngineView], Mapping[int, int]]:
    """A policy from a policy function or a shipped policy's name; ConfigError naming ``field``
    for anything else (a path, a number, a class instead of an instance)."""
    if isinstance(policy, str):
        try:
            return make_policy(policy)
        except ConfigError as err:
            raise ConfigError(field, policy, err.problem) from None
    if not callable(policy) or isinstance(policy, type):
        raise ConfigError(field, policy, "must be a function view -> {request_id: tokens} or a "
                          f"policy name ({', '.join(POLICY_NAMES)})")
    return policy  # type: ignore[return-value]


def _fill(ordered: Sequence[RequestView], budget: int, k_max: int | None) -> Plan:
    """Serve ``ordered`` greedily: one token per decoding request, prompts chunked to fill, until
    the budget or the request limit ``k_max`` is spent (a prompt chunk counts as one request)."""
    plan: Plan = {}
    tokens = budget
    slots = len(ordered) if k_max is None else k_max
    for r in ordered:
        if tokens <= 0 or len(plan) >= slots:
            break
        take = min(r.prefill_left, tokens) if r.prefill_left else 1
        plan[r.id] = take
        tokens -= take
    return plan


def _started(r: RequestView) -> bool:
    """Whether a request in prefill has had part of its prompt processed already."""
    return r.prefill_left < r.prefill_tokens


@dataclass(frozen=True, slots=True)
class ClassPriority:
    """Sarathi-Serve batches under a strict, non-preemptive class priority (PAPER §5.4).

    ``order`` lists classes, highest priority first. A request's rank is the index of the first
    entry equal to its ``cls`` or a class prefix of it (entry ``"A"`` matches ``"A.short"``, the
    buffer of class A at node ``short``); requests matching no entry rank last. The batch is
    Sarathi's: decode tokens first (one per decoding request), then prefill chunks filling the
    budget. Non-preemptive: work already started keeps its place, so decoding requests come first
    by (rank, arrival), then prompts partly processed by (rank, arrival), and only then prompts
    not yet started by (rank, arrival). A high-priority arrival thus overtakes waiting prompts of
    lower classes but never a started one. This is the policy of the Rybko–Stolyar experiment,
    where one choice of ``order`` per engine makes a nominally underloaded network unstable.

    Without ``k_max`` every batch holds ``min(b, demand)`` tokens (work-conserving); with it, at
    most ``k_max`` requests are served, a prompt chunk counting as one.
    """

    order: tuple[str, ...]
    name: str = "priority"

    def __post_init__(self) -> None:
        order = self.order
        if isinstance(order, list):
            order = tuple(order)
            object.__setattr__(self, "order", order)
        if not isinstance(order, tuple) or not order:
            raise ConfigError("order", self.order, "must be a non-empty tuple of class names")
        for entry in order:
            if not isinstance(entry, str) or not entry:
                raise ConfigError("order", self.order, "every entry must be a non-empty string")
        if len(set(order)) != len(order):
            raise ConfigError("order", self.order, "entries must not repeat")

    @property
    def work_conserving(self) -> bool:
        """Mixed and chunked, decoders and prompts alike: fills min(b, demand) without k_max."""
        return True

    @property
    def chunks_prefill(self) -> bool:
        """Prompts are split across batches to fill the budget."""
        return True

    def rank(self, cls: str) -> int:
        """Priority rank of a class label (0 is highest; ``len(order)`` when nothing matches)."""
        for i, entry in enumerate(self.order):
            if cls == entry or cls.startswith(entry + "."):
                return i
        return len(self.order)

    def __call__(self, view: EngineView) -> Plan:
        ranks: dict[str, int] = {}
        lowest = len(self.order)

        def buckets(requests: Sequence[RequestView], started: bool | None) -> list[list[RequestView]]:
            """Requests by rank, each bucket in arrival order (one pass, no sort)."""
            out: list[list[RequestView]] = [[] for _ in range(lowest + 1)]
            for r in requests:
                if started is not None and (r.prefill_left < r.prefill_tokens) != started:
                    continue
                cls = r.cls
                rank = ranks.get(cls)
                if rank is None:
                    rank = ranks[cls] = self.rank(cls)
                out[rank].append(r)
            return out

        decoding = view.decoding
        slots = view.k_max if view.k_max is not None else len(decoding) + len(view.prefilling)
        ordered = [r for bucket in buckets(decoding, None) for r in bucket]
        if len(ordered) < min(view.budget, slots):  # prompts only when decoders leave room
            prefilling = view.prefilling
            ordered.extend(r for bucket in buckets(prefilling, True) for r in bucket)
            ordered.extend(r for bucket in buckets(prefilling, False) for r in bucket)
        return _fill(ordered, view.budget, view.k_max)


def _pressure_tolerance(*counts: float) -> float:
    """How far below zero a pressure may fall by floating-point rounding alone."""
    return 1e-9 * (1.0 + sum(abs(c) for c in counts))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class MaxPressure:
    """Max-pressure (Dai & Lin, Operations Research 2005) adapted to batched token service.

    ``routes[c]`` lists the buffers a request leaving buffer ``c`` (``"class.node"``) moves to,
    with the expected number of requests entering each per request leaving: probabilities that
    sum to 1, or more after a fork (each branch gets a copy); ``"exit"``, or no entry, means it
    leaves the network.
    ``sizes[c]`` is the mean number of tokens one request needs on its visit to ``c`` (prefill
    plus decode means). With ``N`` the network-wide counts in ``view.buffers`` (missing buffers
    and ``"exit"`` count 0), one token of buffer ``c`` is worth

        ``w_c = (N_c - sum_{(d, p) in routes[c]} p * N_d) / sizes[c]``.

    Dai and Lin weigh buffers by service rates; here a token is worth the pressure difference
    over the tokens one request takes, so finishing a request moves one unit of pressure whatever
    its size. (Counting raw tokens instead favours buffers of long requests and diverges on the
    Rybko–Stolyar network.) The batch maximises ``sum_c w_c * tokens_c`` under the batch rules:
    requests are served in decreasing weight (ties: decoding requests, then started prompts, then
    waiting prompts, each in arrival order), decoders one token each, prompts chunked to fill the
    budget. Requests of negative weight get nothing, since serving them lowers the objective (a
    pressure that is negative only by floating-point rounding counts as zero); zero-weight ones
    are served, since ties do not change the objective and serving them costs nothing in it. A
    request whose ``cls`` is not in ``sizes`` has weight 0 (no pressure information: served
    after every positive-weight request). In a single engine ``view.buffers`` is empty, all
    weights are 0 and the policy is Sarathi with started prompts first.

    Where it can fail:

    - It may idle (``work_conserving`` is False): an engine whose requests all have negative
      weight forms no batch, and the reference engine then waits for its next arrival; a network
      simulator must wake it when downstream buffers drain, or it stays blocked.
    - With ``k_max`` the batch-size limit is a cardinality bound, not a token budget: the greedy
      fill by weight is no longer the argmax of the pressure objective (k decoders of high weight
      can be worth less than one long prompt chunk of slightly lower weight), so the max-pressure
      argument no longer applies as such.
    - It needs the global counts of every buffer (centralized, up-to-date state); with stale or
      local counts the guarantee is lost.
    - The weights use mean sizes, not a request's remaining work, and the objective is per batch,
      not per unit time: with a batch time ``t(n)`` that has a fixed cost, a small batch formed
      by leaving negative-weight work idle wastes capacity. The fluid argument of Dai and Lin is
      for unbatched service; stability here is not proved, only plausible below the capacity.
    """

    routes: Mapping[str, tuple[tuple[str, float], ...]]
    sizes: Mapping[str, float]
    name: str = "max-pressure"

    def __post_init__(self) -> None:
        if not isinstance(self.routes, Mapping):
            raise ConfigError("routes", self.routes, "must map each buffer to (target, probability) pairs")
        routes: dict[str, tuple[tuple[str, float], ...]] = {}
        for buffer, targets in self.routes.items():
            if not isinstance(buffer, str) or not buffer:
                raise ConfigError("routes", buffer, "buffer names must be non-empty strings")
            try:
                pairs = tuple((target, prob) for target, prob in targets)
            except (TypeError, ValueError):
                raise ConfigError(
                    "routes", {buffer: targets}, "must be a sequence of (target, probability) pairs"
                ) from None
            for target, prob in pairs:
                if not isinstance(target, str) or not target:
                    raise ConfigError("routes", {buffer: targets}, "targets must be non-empty strings")
                if not _is_number(prob) or not 0.0 <= prob < math.inf:
                    raise ConfigError("routes", {buffer: targets},
                                      "weights must be finite numbers >= 0")
            routes[buffer] = tuple((target, float(prob)) for target, prob in pairs if target != "exit")
        if not isinstance(self.sizes, Mapping):
            raise ConfigError("sizes", self.sizes, "must map each buffer to its mean tokens per request")
        sizes: dict[str, float] = {}
        for buffer, size in self.sizes.items():
            if not isinstance(buffer, str) or not buffer:
                raise ConfigError("sizes", buffer, "buffer names must be non-empty strings")
            if not _is_number(size) or not 0.0 < size < float("inf"):
                raise ConfigError("sizes", {buffer: size}, "must be a finite number > 0")
            sizes[buffer] = float(size)
        # private copies: later changes to the caller's mappings cannot bypass the checks above
        object.__setattr__(self, "routes", routes)
        object.__setattr__(self, "sizes", sizes)

    @property
    def work_conserving(self) -> bool:
        """No: requests of negative weight are left waiting even when the budget has room."""
        return False

    @property
    def chunks_prefill(self) -> bool:
        """Prompts are split across batches to fill the budget."""
        return True

    def weight(self, cls: str, buffers: Mapping[str, int]) -> float:
        """Pressure-weighted value of one token of buffer ``cls`` given the network counts."""
        size = self.sizes.get(cls)
        if size is None:
            return 0.0
        here = buffers.get(cls, 0)
        downstream = sum(p * buffers.get(d, 0) for d, p in self.routes.get(cls, ()))
        pressure = here - downstream
        if abs(pressure) <= _pressure_tolerance(here, downstream):
            return 0.0
        return pressure / size

    def __call__(self, view: EngineView) -> Plan:
        buffers = view.buffers
        weights: dict[str, float] = {}
        keyed: list[tuple[float, int, int, RequestView]] = []
        groups = (
            (0, view.decoding),
            (1, [r for r in view.prefilling if _started(r)]),
            (2, [r for r in view.prefilling if not _started(r)]),
        )
        for phase, group in groups:
            for i, r in enumerate(group):
                w = weights.get(r.cls)
                if w is None:
                    w = weights[r.cls] = self.weight(r.cls, buffers)
                if w >= 0.0:
                    keyed.append((-w, phase, i, r))
        keyed.sort(key=lambda item: item[:3])
        return _fill([item[3] for item in keyed], view.budget, view.k_max)
