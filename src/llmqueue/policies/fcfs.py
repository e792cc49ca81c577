"""The (K_p, K_d)-FCFS family (FasterTransformer, vanilla vLLM, Orca, Sarathi-Serve), current vLLM
with chunked prefill, and the name-to-policy registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import islice

from llmqueue.errors import ConfigError
from llmqueue.policies.view import (
    CompactPlan,
    CompactView,
    EngineView,
    Phase,
    Plan,
    compact,
)


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
