"""Compile the numba event loops once, ahead of a first real run (``llmqueue warmup``).

numba compiles the compiled engine's loop on its first use after an install or an upgrade and
caches it on disk; that first use costs a minute or two on a slow machine. Tiny runs through
every compiled path (one engine with and without a KV cache, a network with compiled routing, the
network policies' engine driven from Python) pay that cost up front, so later runs start at once.
"""

from __future__ import annotations

import time

from llmqueue.engines import compiled
from llmqueue.engines.contract import choose_engine
from llmqueue.errors import ConfigError
from llmqueue.model.batchtime import BatchTime, ConstantTime, ShapeTime
from llmqueue.model.memory import KVCache
from llmqueue.model.network import parse_network
from llmqueue.model.workload import fixed_requests
from llmqueue.policies.fcfs import SARATHI, VLLM_CHUNKED
from llmqueue.sim.network import simulate_network
from llmqueue.sim.run import EngineKind, simulate

_NETWORK = {
    "engines": {"a": {"policy": "sarathi", "budget": 16, "batch_time": "constant:c=1"},
                "b": {"policy": "sarathi", "budget": 16, "batch_time": "constant:c=1"}},
    "classes": {"task": {"rate": 1.0, "start": "a",
                         "nodes": {"a": {"engine": "a", "prefill": "4", "decode": "2", "next": "b"},
                                   "b": {"engine": "b", "prefill": "4", "decode": "2", "next": "exit"}}}},
}


_POLICY_NETWORK = {  # class priority and max-pressure, next to a KV-cache engine: the Python loop
    "engines": {"a": {"policy": "priority", "priority": ["task"], "budget": 16, "batch_time": "constant:c=1"},
                "b": {"policy": "max-pressure", "budget": 16, "batch_time": "constant:c=1"},
                "c": {"policy": "sarathi", "budget": 16, "batch_time": "constant:c=1",
                      "memory": "tokens=64"}},
    "classes": {"task": {"rate": 1.0, "start": "a",
                         "nodes": {"a": {"engine": "a", "prefill": "4", "decode": "2", "next": "b"},
                                   "b": {"engine": "b", "prefill": "4", "decode": "2", "next": "c"},
                                   "c": {"engine": "c", "prefill": "4", "decode": "2", "next": "exit"}}}},
}


def compiles_first(policy: object, batch_time: BatchTime | ShapeTime, budget: int, engine: EngineKind,
                   max_concurrency: int | None = None) -> bool:
    """Whether a run of this setting (as :func:`~llmqueue.sim.run.simulate` picks its engine)
    compiles the event loop before it starts, so the caller can say why the first run waits."""
    try:
        kind = choose_engine(engine, policy, batch_time, budget, max_concurrency=max_concurrency)
    except ConfigError:  # the run itself will say why it cannot run
        return False
    return kind == "compiled" and compiled.needs_compiling()


def warm_up_engine() -> None:
    """Compile (or load) the single-engine event loop: ``kernel.run`` and ``kernel.stop``."""
    requests = fixed_requests([(0.0, 8, 3), (0.5, 20, 2), (1.0, 3, 5)])
    t = ConstantTime(1.0)
    simulate(requests, SARATHI, t, 16, engine="compiled", keep_requests=False)
    simulate(requests, VLLM_CHUNKED, t, 16, k_max=2, engine="compiled", keep_requests=True,
             memory=KVCache(64, block_tokens=4), drain_s=0.0)  # cut at a horizon: compiles stop


def warm_up_network() -> None:
    """Compile (or load) the network loop, which includes the network policies' engine."""
    simulate_network(parse_network(_NETWORK), max_requests=3, engine="compiled")
    simulate_network(parse_network(_POLICY_NETWORK), max_requests=3)  # network policies, Python routing


def warm_up() -> float:
    """Compile (or load from numba's cache) every compiled event loop; the seconds it took.
    Returns 0.0 without numba (nothing to compile: the Python engines run)."""
    if not compiled.available():
        return 0.0
    start = time.perf_counter()
    warm_up_engine()
    warm_up_network()
    return time.perf_counter() - start
