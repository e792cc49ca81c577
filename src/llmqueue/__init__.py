"""llmqueue: queueing theory of LLM serving.

Exact batched-queue simulation of LLM engines and networks of them (AI agents), the paper's
schedulers as pure policies, batch-time models, capacity theory and stability verdicts (Dai, Deng,
Li, Peng, arXiv 2504.07347).
"""

from llmqueue.batchtime import (
    BatchTime,
    ConstantTime,
    LinearTime,
    PiecewiseTime,
    StaircaseTime,
    TableTime,
    parse_batch_time,
)
from llmqueue.engine import Batch, Engine, check_plan
from llmqueue.errors import ConfigError, LLMQueueError, PlanError
from llmqueue.metrics import RequestRecord, RunMetrics
from llmqueue.netsim import NetworkResult, simulate_network
from llmqueue.network import Network, analyze, load_network, parse_network
from llmqueue.policies import (
    FASTERTRANSFORMER,
    KFCFS,
    ORCA,
    SARATHI,
    VLLM,
    VLLM_CHUNKED,
    ClassPriority,
    EngineView,
    MaxPressure,
    Plan,
    RequestView,
    VLLMChunked,
    make_policy,
)
from llmqueue.profile import ProfileTime
from llmqueue.saturation import SaturationResult, saturated_throughput
from llmqueue.simulate import RunResult, TheorySummary, simulate, summarize_theory
from llmqueue.traces import RequestTrace, fit_trace, load_request_trace, trace_stats
from llmqueue.validate import ValidationReport, validate
from llmqueue.workload import Request, Workload, fixed_requests, make_workload

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
