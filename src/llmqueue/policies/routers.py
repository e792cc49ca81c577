"""Routers: which member of a pool of engines a request goes to (docs/networks.md, Pools).

A router is a pure function ``router(view: PoolView) -> int`` (the chosen member's index) of a
read-only view of the pool at the instant a request reaches it. The view holds what a load
balancer in front of the engines observes: for each member, the visits it sent there and the
completions it saw come back (``in_system``, their ``outstanding_tokens``), the visits sent since
the member last finished one (``waiting``: the load balancer's own increments between reports),
and static figures (nominal capacity, budget, KV cache size). It does not read the engines'
internals (a member's batch plan, tokens already served, KV blocks in use): these are the same
on the reference, fast and compiled engines only at batch boundaries, and a router's view must
be identical on all three at every routing instant (the run is the same to the bit).

Randomness comes from the view too: ``draws`` are two uniform values of the pool's own random
stream, drawn for every routing whether used or not, and ``routed`` counts the requests the pool
routed before; so random, power-of-two and round-robin routers stay pure and reproducible.

The built-in routers (``ROUTERS``) also run compiled (``llmqueue.engines.netkernel._pick``, the
same comparisons in the same order); a user router (any callable) runs the routing in Python.
Ties go to the lowest member index throughout (vLLM's scan starts at its client index, 0 for one
front end).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from llmqueue.errors import ConfigError

VLLM_WAITING_WEIGHT = 4
"""vLLM's DP load balancer scores an engine ``waiting * 4 + running`` (``vllm/v1/engine/core_client.py``,
``DPLBAsyncMPClient.get_core_engine_for_request``)."""


@dataclass(frozen=True, slots=True)
class MemberView:
    """One pool member as its router sees it at the routing instant."""

    index: int
    name: str  # the member engine's name (pool/i)
    in_system: int  # visits routed here and not yet finished (nor refused)
    waiting: int  # of those, the visits routed here since it last finished one
    outstanding_tokens: int  # prefill + decode tokens of the visits it holds (as routed)
    capacity_tokens_per_s: float  # nominal capacity b / t(b)
    budget: int  # tokens per batch
    kv_capacity_tokens: int | None  # its KV cache (None: unlimited)

    @property
    def running(self) -> int:
        """Visits held that were routed before its last completion (``in_system - waiting``)."""
        return self.in_system - self.waiting


@dataclass(frozen=True, slots=True)
class PoolView:
    """A pool at the instant a request reaches it (read only)."""

    pool: str
    now_ms: float
    prefill_tokens: int  # the request's prompt at this visit
    decode_tokens: int  # and its output tokens
    members: tuple[MemberView, ...]
    routed: int  # requests this pool routed before this one
    draws: tuple[float, float]  # two uniform values in [0, 1) of the pool's own stream


Router = Callable[[PoolView], int]
"""A router: the index of the member that takes the request."""


def _argmin(values: list[float] | list[int]) -> int:
    """The index of the smallest value (ties: the lowest index)."""
    best = 0
    for i in range(1, len(values)):
        if values[i] < values[best]:
            best = i
    return best


def round_robin(view: PoolView) -> int:
    """Members in turn: request k of the pool goes to member k mod N."""
    return view.routed % len(view.members)


def random_router(view: PoolView) -> int:
    """A member uniformly at random (the view's first draw)."""
    n = len(view.members)
    return min(int(view.draws[0] * n), n - 1)


def jsq(view: PoolView) -> int:
    """Join the shortest queue: fewest requests in system (ties: lowest index)."""
    return _argmin([m.in_system for m in view.members])


def jsq_tokens(view: PoolView) -> int:
    """Fewest outstanding tokens (prefill + decode of the visits held; ties: lowest index)."""
    return _argmin([m.outstanding_tokens for m in view.members])


def p2c(view: PoolView) -> int:
    """Power of two choices: two distinct members at random (the view's two draws), the one with
    fewer requests in system (ties: the lower index)."""
    n = len(view.members)
    if n == 1:
        return 0
    i = min(int(view.draws[0] * n), n - 1)
    j = min(int(view.draws[1] * (n - 1)), n - 2)
    if j >= i:
        j += 1
    a, b = (i, j) if i < j else (j, i)
    return b if view.members[b].in_system < view.members[a].in_system else a


def kv_fraction(member: MemberView) -> float:
    """``least-kv``'s key: outstanding tokens (the KV the visits held will grow to) over the KV
    cache's tokens; a member without a cache counts them against its budget."""
    denominator = member.kv_capacity_tokens if member.kv_capacity_tokens is not None else member.budget
    return member.outstanding_tokens / denominator


def least_kv(view: PoolView) -> int:
    """The lowest KV usage fraction (``kv_fraction``; ties: lowest index)."""
    return _argmin([kv_fraction(m) for m in view.members])


def vllm_dp(view: PoolView) -> int:
    """vLLM's data-parallel load balancer: the lowest ``4 * waiting + running``, scanned from
    member 0 (one front end), ties to the first scanned. ``waiting`` holds the router's own
    increments since the member's last report (here: its last completion)."""
    return _argmin([VLLM_WAITING_WEIGHT * m.waiting + m.running for m in view.members])


ROUTERS: Mapping[str, Router] = {
    "jsq": jsq,
    "jsq-tokens": jsq_tokens,
    "p2c": p2c,
    "least-kv": least_kv,
    "vllm-dp": vllm_dp,
    "round-robin": round_robin,
    "random": random_router,
}
"""The built-in routers by name (the names a network file's ``router`` takes)."""

THROUGHPUT_OPTIMAL: Mapping[str, tuple[bool, bool]] = {
    "jsq": (True, True),
    "jsq-tokens": (True, True),
    "least-kv": (True, True),
    "vllm-dp": (True, True),
    "p2c": (True, False),
    "round-robin": (True, False),
    "random": (True, False),
}
"""Router -> (stable below the pool's summed capacity with identical members, with heterogeneous
members), for work-conserving K-FCFS members (docs/networks.md, Pools: the argument and the
simulations that check it). p2c with two members is jsq (it always compares both)."""


def make_router(name: str, where: str = "router") -> Router:
    """The built-in router ``name``; ConfigError naming ``where`` for an unknown one."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in ROUTERS:
        raise ConfigError(where, name, f"unknown router; choose from {', '.join(ROUTERS)}")
    return ROUTERS[key]


def router_name(router: Router) -> str:
    """A built-in router's name, or the callable's own name for a user router."""
    for name, fn in ROUTERS.items():
        if fn is router:
            return name
    return getattr(router, "__name__", type(router).__name__)
