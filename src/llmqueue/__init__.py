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
    "Network": "llmqueue.model.network",
    "NetworkResult": "llmqueue.sim.network",
    "ORCA": "llmqueue.policies.fcfs",
    "PiecewiseTime": "llmqueue.model.batchtime",
    "Plan": "llmqueue.policies.view",
    "PlanError": "llmqueue.errors",
    "ProfileTime": "llmqueue.model.profile",
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

__all__ = [
    "FASTERTRANSFORMER",
    "KFCFS",
    "ORCA",
    "SARATHI",
    "VLLM",
    "VLLM_CHUNKED",
    "Batch",
    "BatchTime",
    "ClassPriority",
    "ConfigError",
    "ConstantTime",
    "Engine",
    "EngineView",
    "LLMQueueError",
    "LinearTime",
    "MaxPressure",
    "Network",
    "NetworkResult",
    "PiecewiseTime",
    "Plan",
    "PlanError",
    "ProfileTime",
    "Request",
    "RequestRecord",
    "RequestTrace",
    "RequestView",
    "RunMetrics",
    "RunResult",
    "SaturationResult",
    "StaircaseTime",
    "TableTime",
    "TheorySummary",
    "VLLMChunked",
    "ValidationReport",
    "Workload",
    "analyze",
    "check_plan",
    "fit_trace",
    "fixed_requests",
    "load_network",
    "load_request_trace",
    "make_policy",
    "make_workload",
    "parse_batch_time",
    "parse_network",
    "saturated_throughput",
    "simulate",
    "simulate_network",
    "summarize_theory",
    "trace_stats",
    "validate",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Load a public name's module on first use (PEP 562)."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'llmqueue' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


if TYPE_CHECKING:  # what type checkers and IDEs see
    from llmqueue.engines.metrics import RequestRecord, RunMetrics
    from llmqueue.engines.reference import Batch, Engine, check_plan
    from llmqueue.errors import ConfigError, LLMQueueError, PlanError
    from llmqueue.model.batchtime import (
        BatchTime,
        ConstantTime,
        LinearTime,
        PiecewiseTime,
        StaircaseTime,
        TableTime,
        parse_batch_time,
    )
    from llmqueue.model.network import Network, load_network, parse_network
    from llmqueue.model.profile import ProfileTime
    from llmqueue.model.specs import make_workload
    from llmqueue.model.traces import RequestTrace, fit_trace, load_request_trace, trace_stats
    from llmqueue.model.workload import Request, Workload, fixed_requests
    from llmqueue.policies.fcfs import (
        FASTERTRANSFORMER,
        KFCFS,
        ORCA,
        SARATHI,
        VLLM,
        VLLM_CHUNKED,
        VLLMChunked,
        make_policy,
    )
    from llmqueue.policies.network import ClassPriority, MaxPressure
    from llmqueue.policies.view import EngineView, Plan, RequestView
    from llmqueue.sim.network import NetworkResult, simulate_network
    from llmqueue.sim.run import RunResult, TheorySummary, simulate, summarize_theory
    from llmqueue.studies.saturation import SaturationResult, saturated_throughput
    from llmqueue.studies.validate import ValidationReport, validate
    from llmqueue.theory.network import analyze
