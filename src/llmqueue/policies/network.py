"""Network policies: a strict class priority and max-pressure, over Sarathi-Serve batches (PAPER §5.4)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llmqueue.errors import ConfigError
from llmqueue.policies.view import EngineView, Plan, RequestView


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
