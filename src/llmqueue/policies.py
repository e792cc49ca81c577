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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class EngineView:
    """What a policy sees before a batch: the clock, the batch limits and the requests present.

    ``prefilling`` holds the requests with prefill tokens left and ``decoding`` those whose prompt
    is done and that still have decode tokens, each in arrival order. The request objects are the
    engine's own (not copied, for speed): policies must only read them.
    """

    now_ms: float
    budget: int
    k_max: int | None
    prefilling: Sequence[RequestView]
    decoding: Sequence[RequestView]

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
        for field, value in (("k_p", self.k_p), ("k_d", self.k_d)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(field, value, "must be an integer >= 1")

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
        waiting = [r for r in view.prefilling if r.prefill_left == r.prefill_tokens]
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
