"""llmqueue: queueing theory of LLM serving.

Exact batched-queue simulation of LLM engines and networks of them (AI agents), the paper's
schedulers as pure policies, batch-time models, capacity theory and stability verdicts (Dai, Deng,
Li, Peng, arXiv 2504.07347).

The names below load their modules on first use, so ``import llmqueue`` stays light (numpy,
scipy, numba and matplotlib load when a function needs them). The package's layers are listed in
docs/model.md ("Architecture").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "Batch": "llmqueue.engines.reference",
    "BatchTime": "llmqueue.model.batchtime",
    "ClassPriority": "llmqueue.policies.network",
    "ConfigError": "llmqueue.errors",
    "ConstantTime": "llmqueue.model.batchtime",
    "Engine": "llmqueue.engines.reference",
    "EngineView": "llmqueue.policies.view",
    "FASTERTRANSFORMER": "llmqueue.policies.fcfs",
    "KFCFS": "llmqueue.policies.fcfs",
    "LLMQueueError": "llmqueue.errors",
    "LinearTime": "llmqueue.model.batchtime",
    "MaxPressure": "llmqueue.policies.network",
    "MemberView": "llmqueue.policies.routers",
    "Network": "llmqueue.model.network",
    "NetworkResult": "llmqueue.sim.network",
    "ORCA": "llmqueue.policies.fcfs",
    "PiecewiseTime": "llmqueue.model.batchtime",
    "Plan": "llmqueue.policies.view",
    "PlanError": "llmqueue.errors",
    "PoolSpec": "llmqueue.model.network",
    "PoolView": "llmqueue.policies.routers",
    "ProfileTime": "llmqueue.model.profile",
    "ROUTERS": "llmqueue.policies.routers",
    "Request": "llmqueue.model.workload",
    "RequestRecord": "llmqueue.engines.metrics",
    "RequestTrace": "llmqueue.model.traces",
    "RequestView": "llmqueue.policies.view",
    "RunMetrics": "llmqueue.engines.metrics",
    "RunResult": "llmqueue.sim.run",
    "SARATHI": "llmqueue.policies.fcfs",
    "SaturationResult": "llmqueue.studies.saturation",
    "StaircaseTime": "llmqueue.model.batchtime",
    "TableTime": "llmqueue.model.batchtime",
    "TheorySummary": "llmqueue.sim.run",
    "VLLM": "llmqueue.policies.fcfs",
    "VLLMChunked": "llmqueue.policies.fcfs",
    "VLLM_CHUNKED": "llmqueue.policies.fcfs",
    "ValidationReport": "llmqueue.studies.validate",
    "Workload": "llmqueue.model.workload",
    "analyze": "llmqueue.theory.network",
    "check_plan": "llmqueue.engines.reference",
    "fit_trace": "llmqueue.model.traces",
    "fixed_requests": "llmqueue.model.workload",
    "load_network": "llmqueue.model.network",
    "load_request_trace": "llmqueue.model.traces",
    "make_policy": "llmqueue.policies.fcfs",
    "make_workload": "llmqueue.model.specs",
    "parse_batch_time": "llmqueue.model.batchtime",
    "parse_network": "llmqueue.model.network",
    "saturated_throughput": "llmqueue.studies.saturation",
    "simulate": "llmqueue.sim.run",
    "simulate_network": "llmqueue.sim.network",
    "summarize_theory": "llmqueue.sim.run",
    "trace_stats": "llmqueue.model.traces",
    "validate": "llmqueue.studies.validate",
}
"""Each public name and the module that defines it."""

__all__ = sorted(_PUBLIC)



def __getattr__(name: str) -> Any:
    """Load a public name's module on first use (PEP 562)."""
    if name == "__version__":  # one source: the installed package's metadata
        from llmqueue.io.store import package_version

        return package_version()
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'llmqueue' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


if TYPE_CHECKING:  # what type checkers and IDEs see (``X as X``: re-exported)
    from llmqueue.engines.metrics import RequestRecord as RequestRecord
    from llmqueue.engines.metrics import RunMetrics as RunMetrics
    from llmqueue.engines.reference import Batch as Batch
    from llmqueue.engines.reference import Engine as Engine
    from llmqueue.engines.reference import check_plan as check_plan
    from llmqueue.errors import ConfigError as ConfigError
    from llmqueue.errors import LLMQueueError as LLMQueueError
    from llmqueue.errors import PlanError as PlanError
    from llmqueue.model.batchtime import BatchTime as BatchTime
    from llmqueue.model.batchtime import ConstantTime as ConstantTime
    from llmqueue.model.batchtime import LinearTime as LinearTime
    from llmqueue.model.batchtime import PiecewiseTime as PiecewiseTime
    from llmqueue.model.batchtime import StaircaseTime as StaircaseTime
    from llmqueue.model.batchtime import TableTime as TableTime
    from llmqueue.model.batchtime import parse_batch_time as parse_batch_time
    from llmqueue.model.network import Network as Network
    from llmqueue.model.network import load_network as load_network
    from llmqueue.model.network import parse_network as parse_network
    from llmqueue.model.profile import ProfileTime as ProfileTime
    from llmqueue.model.specs import make_workload as make_workload
    from llmqueue.model.traces import RequestTrace as RequestTrace
    from llmqueue.model.traces import fit_trace as fit_trace
    from llmqueue.model.traces import load_request_trace as load_request_trace
    from llmqueue.model.traces import trace_stats as trace_stats
    from llmqueue.model.workload import Request as Request
    from llmqueue.model.workload import Workload as Workload
    from llmqueue.model.workload import fixed_requests as fixed_requests
    from llmqueue.policies.fcfs import FASTERTRANSFORMER as FASTERTRANSFORMER
    from llmqueue.policies.fcfs import KFCFS as KFCFS
    from llmqueue.policies.fcfs import ORCA as ORCA
    from llmqueue.policies.fcfs import SARATHI as SARATHI
    from llmqueue.policies.fcfs import VLLM as VLLM
    from llmqueue.policies.fcfs import VLLM_CHUNKED as VLLM_CHUNKED
    from llmqueue.policies.fcfs import VLLMChunked as VLLMChunked
    from llmqueue.policies.fcfs import make_policy as make_policy
    from llmqueue.policies.network import ClassPriority as ClassPriority
    from llmqueue.policies.network import MaxPressure as MaxPressure
    from llmqueue.policies.view import EngineView as EngineView
    from llmqueue.policies.view import Plan as Plan
    from llmqueue.policies.view import RequestView as RequestView
    from llmqueue.sim.network import NetworkResult as NetworkResult
    from llmqueue.sim.network import simulate_network as simulate_network
    from llmqueue.sim.run import RunResult as RunResult
    from llmqueue.sim.run import TheorySummary as TheorySummary
    from llmqueue.sim.run import simulate as simulate
    from llmqueue.sim.run import summarize_theory as summarize_theory
    from llmqueue.studies.saturation import SaturationResult as SaturationResult
    from llmqueue.studies.saturation import saturated_throughput as saturated_throughput
    from llmqueue.studies.validate import ValidationReport as ValidationReport
    from llmqueue.studies.validate import validate as validate
    from llmqueue.theory.network import analyze as analyze
