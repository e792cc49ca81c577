"""Validation against a real engine run: replay its requests through the simulator and compare
every request's TTFT, TPOT and end-to-end latency with what the engine measured.

The replay keeps the run's arrival times (on the engine clock) and token counts. A vLLM request
of ``N`` output tokens gets its first token from the prefill and ``N - 1`` decode iterations, so
it enters the simulator with ``N - 1`` decode tokens; TPOT is (finish - first token) / (N - 1) on
both sides, as vLLM's ``bench serve`` defines it. The batch-time model must come from elsewhere
(a kernel profile, a fit on other measurements): never from the run's own latencies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmqueue.engines.metrics import PERCENTILES, summary
from llmqueue.engines.reference import PolicyFn
from llmqueue.errors import ConfigError
from llmqueue.io.plotting import pyplot, save
from llmqueue.model.batchtime import BatchTime, ShapeTime, parse_batch_time
from llmqueue.model.memory import KVCache, parse_memory
from llmqueue.model.profile import KNOWN_MODELS, parse_profile_spec
from llmqueue.model.traces import RunLog, read_vllm_log
from llmqueue.model.workload import Request
from llmqueue.policies.fcfs import VLLM_CHUNKED
from llmqueue.policies.view import policy_name
from llmqueue.sim.run import RunResult, simulate

__all__ = [
    "METRICS",
    "ErrorRow",
    "ReplaySetup",
    "RunSettings",
    "ValidationReport",
    "find_profile",
    "format_rows",
    "load_batch_time",
    "memory_for",
    "prepare",
    "read_run",
    "validate",
]

METRICS = ("ttft", "tpot", "e2el")
"""The latencies compared, under vLLM's names (``mean_ttft_ms``, ``p99_tpot_ms``...)."""
_FIELD = "run"
_LOG_NAMES = ("requests.jsonl",)
_CLUSTER_NAMES = ("llmservingsim_cluster_config.json", "cluster_config.json")


# ---------------------------------------------------------------- the run and its settings


@dataclass(frozen=True, slots=True)
class RunSettings:
    """What a run folder says about the engine: scheduler limits, model, GPU memory, and the
    files each setting came from (None: not recorded)."""

    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    model: str | None = None
    tensor_parallel: int = 1
    gpu_memory_gib: float | None = None
    gpu_utilization: float | None = None
    sources: tuple[str, ...] = ()


def _int_setting(value: object, key: str, path: Path) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{_FIELD}.{key}", value, f"must be an integer >= 1 in {path}")
    return value


def _read_json(path: Path) -> Mapping[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(_FIELD, str(path), f"cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(_FIELD, str(path), f"not JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(_FIELD, str(path), "expected a JSON object")
    return data


def _settings(folder: Path) -> RunSettings:
    """Engine limits from ``meta.json`` (vLLM ``engine_kwargs``), GPU memory from a cluster
    config in the folder or one up (LLMServingSim's ``npu_mem.mem_size`` and ``mem_util``)."""
    values: dict[str, Any] = {}
    sources: list[str] = []
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = _read_json(meta_path)
        kwargs = meta.get("engine_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ConfigError(f"{_FIELD}.engine_kwargs", kwargs, f"must be an object in {meta_path}")
        values["max_num_batched_tokens"] = _int_setting(
            kwargs.get("max_num_batched_tokens"), "max_num_batched_tokens", meta_path)
        values["max_num_seqs"] = _int_setting(kwargs.get("max_num_seqs"), "max_num_seqs", meta_path)
        values["tensor_parallel"] = _int_setting(
            kwargs.get("tensor_parallel_size", 1), "tensor_parallel_size", meta_path) or 1
        model = meta.get("model") or kwargs.get("model")
        values["model"] = str(model) if model else None
        sources.append(str(meta_path))
    cluster = next((base / n for base in (folder, folder.parent) for n in _CLUSTER_NAMES
                    if (base / n).is_file()), None)
    if cluster is not None:
        data = _read_json(cluster)
        try:
            instance = data["nodes"][0]["instances"][0]
            mem = instance["npu_mem"]
            values["gpu_memory_gib"] = float(mem["mem_size"])
            values["gpu_utilization"] = float(mem.get("mem_util", 0.9))
        except (KeyError, IndexError, TypeError, ValueError):
            raise ConfigError(_FIELD, str(cluster),
                              "expected nodes[0].instances[0].npu_mem.mem_size") from None
        if not values.get("model") and instance.get("model_name"):
            values["model"] = str(instance["model_name"])
        sources.append(str(cluster))
    return RunSettings(**values, sources=tuple(sources))


def read_run(path: str | Path) -> tuple[RunLog, RunSettings]:
    """A run: a folder holding ``requests.jsonl`` (and ``meta.json``), or the JSONL log itself
    (settings then from a ``meta.json`` beside it, if any)."""
    p = Path(path)
    if p.is_dir():
        log = next((p / n for n in _LOG_NAMES if (p / n).is_file()), None)
        if log is None:
            raise ConfigError(_FIELD, str(path), "folder holds no requests.jsonl")
        folder = p
    elif p.is_file():
        log, folder = p, p.parent
    else:
        raise ConfigError(_FIELD, str(path), "no such run folder or log file")
    return read_vllm_log(str(log), _FIELD), _settings(folder)


def find_profile(run_path: str | Path, tensor_parallel: int = 1) -> Path | None:
    """The shipped layout's kernel profile for a run: ``profile_tp<N>`` beside the run folder."""
    p = Path(run_path)
    folder = p if p.is_dir() else p.parent
    for base in (folder, folder.parent):
        candidate = base / f"profile_tp{tensor_parallel}"
        if (candidate / "dense.csv").is_file():
            return candidate
    return None


def load_batch_time(spec: str) -> BatchTime | ShapeTime:
    """``profile:DIR[,...]`` (a kernel profile, :func:`llmqueue.model.profile.parse_profile_spec`) or any
    spec :func:`llmqueue.model.batchtime.parse_batch_time` reads (e.g. a fitted ``composition:...``)."""
    if isinstance(spec, str) and spec.strip().lower().startswith("profile:"):
        return parse_profile_spec(spec.strip())
    return parse_batch_time(spec)


def memory_for(settings: RunSettings, reserved_gib: float = 0.0) -> KVCache | None:
    """The KV cache vLLM would size for the run: ``gpu_memory_gib * gpu_utilization`` minus the
    model's bf16 weights (and ``reserved_gib``), over its KV bytes per token; None when the run
    does not say which GPU memory or which known model."""
    dims = KNOWN_MODELS.get(settings.model or "")
    if dims is None or settings.gpu_memory_gib is None:
        return None
    return KVCache.from_gpu(
        settings.gpu_memory_gib, dims.kv_shape(), tensor_parallel=settings.tensor_parallel,
        utilization=settings.gpu_utilization if settings.gpu_utilization is not None else 0.9,
        reserved_gib=reserved_gib,
    )


# ---------------------------------------------------------------- the report


@dataclass(frozen=True, slots=True)
class ErrorRow:
    """One statistic of one latency: measured, simulated, and the simulation's relative error."""

    metric: str
    stat: str
    measured_ms: float
    simulated_ms: float

    @property
    def key(self) -> str:
        """vLLM's name of the statistic, e.g. ``p99_tpot_ms``."""
        return f"{self.stat}_{self.metric}_ms"

    @property
    def error(self) -> float:
        """(simulated - measured) / measured: positive when the simulator is slower."""
        if not self.measured_ms:
            return math.nan
        return (self.simulated_ms - self.measured_ms) / self.measured_ms


@dataclass(frozen=True, slots=True, eq=False)
class ValidationReport:
    """The comparison: error rows (metric x mean/median/p90/p99), per-request latencies of both
    sides in arrival order (NaN where not reached), the setting, and the simulator's run."""

    rows: tuple[ErrorRow, ...]
    measured: Mapping[str, np.ndarray]
    simulated: Mapping[str, np.ndarray]
    setting: Mapping[str, Any]
    result: RunResult = field(repr=False)
    notes: tuple[str, ...] = ()

    def row(self, key: str) -> ErrorRow:
        """The row named ``key`` (e.g. ``mean_ttft_ms``)."""
        for r in self.rows:
            if r.key == key:
                return r
        raise KeyError(key)

    @property
    def max_abs_error(self) -> float:
        """Largest |relative error| over the table."""
        return max(abs(r.error) for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the setting, one entry per row, the simulator's run summary, notes."""
        m = self.result.metrics
        return {
            **self.setting,
            "rows": [
                {"key": r.key, "metric": r.metric, "stat": r.stat, "measured_ms": r.measured_ms,
                 "simulated_ms": r.simulated_ms, "error": r.error}
                for r in self.rows
            ],
            "max_abs_error": self.max_abs_error,
            "simulated_completed": m.completed,
            "simulated_incomplete": m.incomplete,
            "simulated_batches": m.num_batches,
            "simulated_mean_batch_tokens": m.mean_batch_tokens,
            "preemptions": m.preemptions,
            "peak_kv_usage": m.peak_kv_usage,
            "notes": list(self.notes),
        }

    def plot_cdfs(self, folder: str | Path, prefix: str = "validate_") -> list[Path]:
        """One PNG per metric, ``<prefix><metric>_cdf.png``: measured and simulated CDFs."""
        out = Path(folder)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError("plot", str(folder), f"cannot create the folder: {err.strerror}") from None
        plt = pyplot()
        titles = {"ttft": "time to first token", "tpot": "time per output token",
                  "e2el": "end-to-end latency"}
        paths = []
        for metric in METRICS:
            fig, ax = plt.subplots(figsize=(6, 4))
            for label, data, style in (("measured (vLLM)", self.measured[metric], "-"),
                                       ("simulated", self.simulated[metric], "--")):
                values = np.sort(data[np.isfinite(data)])
                if values.size:
                    ax.step(values, np.arange(1, values.size + 1) / values.size, style, where="post",
                            label=f"{label}, n={values.size}")
            ax.set_xlabel(f"{metric}_ms")
            ax.set_ylabel("fraction of requests")
            mean = self.row(f"mean_{metric}_ms")
            p99 = self.row(f"p99_{metric}_ms")
            ax.set_title(f"{titles[metric]}: mean error {mean.error:+.1%}, p99 {p99.error:+.1%}",
                         fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right")
            paths.append(save(fig, out / f"{prefix}{metric}_cdf.png"))
        return paths


def _per_request(arrival: np.ndarray, first: np.ndarray, finish: np.ndarray,
                 outputs: np.ndarray) -> dict[str, np.ndarray]:
    gaps = (outputs - 1).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(gaps > 0, (finish - first) / gaps, np.nan)
    return {"ttft": first - arrival, "tpot": tpot, "e2el": finish - arrival}


def validate(
    run_log: RunLog,
    batch_time: BatchTime | ShapeTime,
    budget: int,
    k_max: int | None,
    memory: KVCache | None,
    policy: PolicyFn = VLLM_CHUNKED,
    *,
    drain_s: float | None = None,
    engine: str = "auto",
    notes: Sequence[str] = (),
) -> ValidationReport:
    """Replay ``run_log`` (same arrivals and token counts) through ``policy`` with this budget
    (max_num_batched_tokens), ``k_max`` (max_num_seqs), KV cache and batch-time model, and
    compare per-request TTFT, TPOT and E2EL with the measured ones.

    ``drain_s`` bounds the simulated time after the last arrival (default: ten times the run's
    own span, at least 60 s); requests still unfinished then count as not reached. ``notes``
    are put first in the report's notes (where the setting came from).
    """
    if not isinstance(run_log, RunLog):
        raise ConfigError(_FIELD, type(run_log).__name__, "expected a RunLog (see read_run)")
    if len(run_log) == 0:
        raise ConfigError(_FIELD, run_log.path, "run log holds no requests")
    outputs = run_log.decode_tokens.astype(np.int64)
    prompts = run_log.prefill_tokens.astype(np.int64)
    if np.any(outputs < 1):
        bad = int(np.argmax(outputs < 1))
        raise ConfigError(f"{_FIELD}.output_toks", int(outputs[bad]),
                          f"request {run_log.request_ids[bad]} has no output token to time")
    arrival = np.maximum(run_log.arrival_ms, 0.0)
    requests = [
        Request(i, float(arrival[i]), int(prompts[i]), int(outputs[i] - 1))
        for i in range(len(run_log))
    ]
    finite = run_log.finish_ms[np.isfinite(run_log.finish_ms)]
    span_s = float(finite.max() / 1000.0) if finite.size else float(arrival[-1] / 1000.0)
    if drain_s is None:
        drain_s = max(10.0 * span_s, 60.0)
    result = simulate(
        requests, policy, batch_time, budget, k_max=k_max, memory=memory, drain_s=drain_s,
        keep_requests=True, engine=engine,  # type: ignore[arg-type]
    )
    first = np.full(len(run_log), np.nan)
    finish = np.full(len(run_log), np.nan)
    for record in result.requests or ():
        first[record.id] = record.first_token_ms
        finish[record.id] = record.finish_ms
    measured = _per_request(run_log.arrival_ms, run_log.first_token_ms, run_log.finish_ms, outputs)
    simulated = _per_request(arrival, first, finish, outputs)
    rows = []
    for metric in METRICS:
        m_stats, s_stats = (summary(metric, v[np.isfinite(v)]) for v in (measured[metric], simulated[metric]))
        for label, _ in PERCENTILES:
            key = f"{label}_{metric}_ms"  # summary's key, ErrorRow.key
            rows.append(ErrorRow(metric, label, m_stats[key], s_stats[key]))
    all_notes = [*notes, *result.notes]
    unfinished = int(np.count_nonzero(~np.isfinite(finish)))
    if unfinished:
        all_notes.append(f"{unfinished} request(s) did not finish in the simulation within the drain "
                     f"allowance: their latencies are missing from the simulated column")
    setting = {
        "run": run_log.path,
        "requests": len(run_log),
        "policy": policy_name(policy),
        "budget": budget,
        "k_max": k_max,
        "batch_time": getattr(batch_time, "spec", repr(batch_time)),
        "memory": memory.spec if memory is not None else None,
        "memory_source": memory.source if memory is not None else None,
        "measured_duration_s": span_s,
        "simulated_duration_s": float(np.nanmax(finish) / 1000.0) if np.isfinite(finish).any() else math.nan,
    }
    return ValidationReport(tuple(rows), measured, simulated, setting, result, tuple(all_notes))


@dataclass(frozen=True, slots=True, eq=False)
class ReplaySetup:
    """Everything :func:`validate` needs for one run, and where each setting came from."""

    run_log: RunLog
    batch_time: BatchTime | ShapeTime
    budget: int
    k_max: int | None
    memory: KVCache | None
    notes: tuple[str, ...]


_NO_MEMORY = ("none", "off", "unlimited")


def prepare(run: str | Path, *, profile: str | Path | None = None, batch_time: str | None = None,
            budget: int | None = None, max_seqs: int | None = None,
            memory: str | None = None) -> ReplaySetup:
    """Read a run and settle the replay's setting: explicit values win, else the run's
    ``meta.json`` (max_num_batched_tokens, max_num_seqs), the cluster config's GPU memory for the
    KV cache, and the ``profile_tp<N>`` folder beside the run for the batch time."""
    if profile is not None and batch_time is not None:
        raise ConfigError("profile", str(profile), "give a profile or a batch-time spec, not both")
    log, settings = read_run(run)
    notes: list[str] = []
    if batch_time is not None:
        model = load_batch_time(batch_time)
    else:
        folder = Path(profile) if profile is not None else find_profile(run, settings.tensor_parallel)
        if folder is None:
            raise ConfigError("profile", str(run), f"no profile_tp{settings.tensor_parallel} folder beside "
                              "the run: give a profile folder or a batch-time spec")
        model = load_batch_time(f"profile:{folder}")
        notes.extend(getattr(model, "notes", ()))
    if budget is None:
        budget = settings.max_num_batched_tokens
        if budget is None:
            raise ConfigError("budget", None, "the run does not record max_num_batched_tokens: give it")
        notes.append(f"budget {budget} = max_num_batched_tokens of the run's meta.json")
    if max_seqs is None:
        max_seqs = settings.max_num_seqs
        notes.append(f"k_max {max_seqs} = max_num_seqs of the run's meta.json" if max_seqs is not None
                     else "the run does not record max_num_seqs: no limit on requests per batch")
    cache: KVCache | None
    if memory is not None and memory.strip().lower() in _NO_MEMORY:
        cache = None
    elif memory is not None:
        cache = parse_memory(memory)
    else:
        cache = memory_for(settings)
        if cache is None:
            notes.append("the run does not say which GPU memory and known model: KV cache unlimited")
        else:
            notes.append(f"KV cache {cache.capacity_tokens:,} tokens from {settings.gpu_memory_gib:g} GiB x "
                         f"{settings.gpu_utilization:g} minus the bf16 weights of {settings.model}")
    return ReplaySetup(log, model, budget, max_seqs, cache, tuple(notes))


def format_rows(rows: Sequence[ErrorRow]) -> list[list[str]]:
    """The table as text cells: key, measured, simulated, error in percent."""
    return [[r.key, f"{r.measured_ms:,.1f}", f"{r.simulated_ms:,.1f}", f"{r.error:+.1%}"] for r in rows]
