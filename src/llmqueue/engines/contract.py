"""The engine contract: what the simulation drivers call on an engine, and which engine runs.

Three engines implement one batched LLM engine exactly: the reference engine (every iteration),
the fast engine (runs of identical iterations at once) and the compiled loop (``KernelEngine``
gives one compiled engine this interface). The drivers in ``llmqueue.sim`` use only what is
declared here, so an engine is interchangeable with another when it satisfies these protocols
(tests/test_contract.py checks all three):

- ``EngineContract``: what the network loop (``llmqueue.sim.network``) calls. Engines share one
  clock there: the loop hands arrivals in with ``submit``, asks every engine for its
  ``next_event_ms``, and at a shared instant first ends the due batches (``ends_at``,
  ``end_batch``), routes the finished requests, then starts the next batches (``start_at``);
  ``completion_bound_ms`` lets one engine run ahead alone; ``stop`` ends the run at the horizon.
- ``SteppedEngine``: what the single-run driver (``llmqueue.sim.run``) adds for the Python
  engines: ``step`` (end the batch, start the next), the requests still present and the batch
  log.

``choose_engine`` is the one place that decides which engine runs a setting, for single runs
and for each engine of a network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from llmqueue.engines import compiled
from llmqueue.engines.fast import needs_reference
from llmqueue.engines.metrics import RequestRecord
from llmqueue.engines.reference import Batch, Job
from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import is_shape_model
from llmqueue.model.memory import KVCache
from llmqueue.model.workload import Request
from llmqueue.policies.view import policy_name

EngineKind = Literal["auto", "compiled", "fast", "reference"]
"""An engine choice as a caller gives it (``auto``: the fastest exact engine that can run it)."""
ENGINES: tuple[EngineKind, ...] = ("auto", "compiled", "fast", "reference")
RunKind = Literal["compiled", "fast", "reference"]
"""The engine that runs: the compiled loop, the Python fast engine or the reference engine."""


@runtime_checkable
class EngineContract(Protocol):
    """What the network loop calls on every engine (reference, fast, compiled)."""

    @property
    def now_ms(self) -> float:
        """The engine's clock (ms): the time of its last event."""
        ...

    @property
    def in_system(self) -> int:
        """Requests present (waiting, prefilling or decoding)."""
        ...

    @property
    def blocked_since_ms(self) -> float | None:
        """When the policy last formed no batch although requests waited (None: not blocked)."""
        ...

    def submit(self, request: Request) -> None:
        """Hand in a request at its arrival time (not before the engine's clock)."""
        ...

    def next_event_ms(self) -> float:
        """The engine's next event: a batch end, an immediate start, or inf when idle."""
        ...

    def completion_bound_ms(self) -> float:
        """No request finishes here before this time (the network loop lets another engine run
        alone until then)."""
        ...

    def ends_at(self, t_ms: float) -> bool:
        """Whether the running batch (run of batches) ends exactly at ``t_ms``."""
        ...

    def end_batch(self) -> Sequence[RequestRecord | int]:
        """End the batch due now, without starting the next; the requests that finished (records,
        or ids from the compiled loop)."""
        ...

    def start_at(self, t_ms: float) -> None:
        """Start the next batch at the shared instant ``t_ms`` (after the finished were routed)."""
        ...

    def stop(self, horizon_ms: float) -> None:
        """End the run at ``horizon_ms``: book what ends before it and count the batch running."""
        ...


@runtime_checkable
class SteppedEngine(EngineContract, Protocol):
    """What the single-run driver calls on a Python engine (reference or fast), beyond the
    network contract."""

    batches: list[Batch] | None
    """The batches run, when kept (``keep_batches``); else None."""

    def step(self) -> Sequence[RequestRecord]:
        """Process the next event: end the running batch (if any), then start the next one."""
        ...

    def jobs(self) -> list[Job]:
        """The requests present, in arrival order (their records are the run's pending ones)."""
        ...


def choose_engine(
    requested: str,
    policy: object,
    batch_time: object,
    budget: int,
    *,
    memory: KVCache | None = None,
    keep_batches: bool = False,
    max_concurrency: int | None = None,
    network_engine: str | None = None,
) -> RunKind:
    """Which engine runs a setting for the caller's choice ``requested``; ConfigError when that
    choice cannot run it.

    ``auto`` takes the compiled loop when it can run the setting (numba installed, a shipped
    policy, a budget it supports, batches timed by token count, no batch log, no client gate),
    else the fast engine when the policy declares ``repeats_plan``, else the reference engine.
    ``network_engine`` names the engine of a network being chosen for: there the compiled
    loop also runs the network policies (class priority, max-pressure: ``compiled.PolicyEngine``)
    but does not model a KV cache, and ``fast`` falls back to the reference engine for a policy
    that needs it (a single run refuses that choice instead).
    """
    shaped = is_shape_model(batch_time)
    if network_engine is not None:
        name = network_engine
        if memory is not None and requested == "compiled":
            raise ConfigError("engine", requested, f"engine {name} has a KV cache (memory): the compiled "
                              "network loop does not model it (use 'auto', 'fast' or 'reference')")
        if shaped and requested == "compiled":
            raise ConfigError("engine", requested, f"engine {name} has a composition-aware batch time: "
                              "the compiled loop times batches by token count only (use 'auto', 'fast' or "
                              "'reference')")
        supported = memory is None and not shaped and (
            compiled.supports(policy, budget, keep_batches)
            or compiled.supports_network_policy(policy, budget))
        if requested == "compiled" and not supported:
            raise ConfigError("engine", requested, f"engine {name}: policy '{policy_name(policy)}' "
                              "has no compiled form (or numba is not installed)")
        if requested in ("auto", "compiled") and supported:
            return "compiled"
        if requested == "reference" or needs_reference(policy):
            return "reference"
        return "fast"
    if max_concurrency is not None and requested == "compiled":
        raise ConfigError("engine", requested, "max_concurrency runs on the fast and reference engines")
    if requested not in ENGINES:
        raise ConfigError("engine", requested, f"must be one of {', '.join(ENGINES)}")
    if requested in ("fast", "compiled") and needs_reference(policy):
        raise ConfigError(
            "engine", requested, f"policy '{policy_name(policy)}' does not declare repeats_plan"
        )
    if requested == "compiled" and shaped:
        raise ConfigError(
            "engine", requested, "a composition-aware batch time runs on the fast and reference engines only"
        )
    can_compile = not shaped and max_concurrency is None and compiled.supports(policy, budget, keep_batches)
    if requested == "compiled" and not can_compile:
        raise ConfigError(
            "engine", requested,
            "needs numba (pip install 'llmqueue[fast]'), a shipped policy, a budget <= "
            f"{compiled.MAX_BUDGET} and keep_batches off",
        )
    if can_compile and requested in ("auto", "compiled"):
        return "compiled"
    if requested == "fast" or (requested == "auto" and not needs_reference(policy)):
        return "fast"
    return "reference"
