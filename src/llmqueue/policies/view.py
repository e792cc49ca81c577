"""Batch schedulers as pure functions: a read-only engine view in, a batch plan out.

A policy is any callable ``policy(view: EngineView) -> Mapping[int, int]`` mapping request ids to
the number of tokens each request gets in the next batch. The engine checks every plan against the
batch rules (see ``llmqueue.engines.reference.check_plan``), so a policy only decides *which* tokens to run.

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
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

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
