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


def _take_decode(view: EngineView, plan: Plan, tokens: int, slots: int, k_d: int | None) -> int:
    """Add one decode token per decoding request, FCFS; return the tokens used."""
    limit = min(tokens, slots, len(view.decoding))
    if k_d is not None:
        limit = min(limit, k_d)
    for r in view.decoding[:limit]:
        plan[r.id] = 1
    return max(limit, 0)


def _take_prefill(
    view: EngineView, plan: Plan, tokens: int, slots: int, k_p: int | None, chunked: bool
) -> int:
    """Add prefill tokens FCFS: chunks filling the budget, or whole prompts while they fit."""
    used = 0
    max_count = slots if k_p is None else min(slots, k_p)
    for r in view.prefilling[:max(max_count, 0)]:
        left = tokens - used
        if left <= 0:
            break
        need = r.prefill_left
        if need <= left:
            take = need
        elif chunked:
            take = left
        else:
            break  # whole prompts only, FCFS: the head does not fit, so nothing behind it goes
        plan[r.id] = take
        used += take
    return used


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

    def __call__(self, view: EngineView) -> Plan:
        plan: Plan = {}
        slots = len(view.prefilling) + len(view.decoding) if view.k_max is None else view.k_max
        order: tuple[Phase, Phase] = (
            ("prefill", "decode") if self.priority == "prefill" else ("decode", "prefill")
        )
        tokens = view.budget
        for phase in order:
            if phase == "decode":
                used = _take_decode(view, plan, tokens, slots - len(plan), self.k_d)
            else:
                used = _take_prefill(
                    view, plan, tokens, slots - len(plan), self.k_p, self.chunked
                )
            tokens -= used
            if plan and not self.mixed:
                break
        return plan


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

    def __call__(self, view: EngineView) -> Plan:
        plan: Plan = {}
        tokens = view.budget
        started = [r for r in view.prefilling if r.prefill_left < r.prefill_tokens]
        waiting = [r for r in view.prefilling if r.prefill_left == r.prefill_tokens]
        # admission order: with FCFS admission every decoder was admitted before any prompt
        # still in progress (requests that arrive with no prompt count as admitted first)
        running = [*view.decoding, *started]
        max_seqs = len(running) + len(waiting) if view.k_max is None else view.k_max
        for r in running:
            if tokens == 0 or len(plan) >= max_seqs:
                break
            take = min(r.prefill_left, tokens) if r.prefill_left else 1
            plan[r.id] = take
            tokens -= take
        admitted = len(running)
        for r in waiting:
            if tokens == 0 or admitted >= max_seqs:
                break
            take = min(r.prefill_left, tokens)
            plan[r.id] = take
            tokens -= take
            admitted += 1
        return plan


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
