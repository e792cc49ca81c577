"""Sweeps: a grid of runs from one config file, in parallel, stored as they finish, resumable.

The config (TOML or YAML) has a ``grid`` (policies x budgets x rates or loads x k_max x seeds x
batch times x workloads x KV caches) and ``run`` settings (requests per run, duration, drain,
engine). It is validated whole before any run starts: unknown keys, wrong types, empty lists
and settings the simulator would refuse fail at once with one line naming the key. Every run's
configuration is a plain mapping whose hash keys the results store (``llmqueue.store``), so a
rerun skips what is already there. Runs go to a local process pool, or to a Ray cluster with
``llmqueue[ray]``.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmqueue.batchtime import parse_batch_time
from llmqueue.configfile import first_error, read_table
from llmqueue.errors import ConfigError, LLMQueueError
from llmqueue.memory import KVCache, parse_memory
from llmqueue.policies import make_policy, policy_name
from llmqueue.settings import DEFAULT_BATCH_TIME, default_sizes, is_trace_spec, resolve_workload
from llmqueue.simulate import simulate
from llmqueue.store import Store, run_key

NO_LIMIT_WORDS = ("none", "None", "null")
PositiveInt = Annotated[int, Field(strict=True, ge=1)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Span(_Model):
    """``num`` evenly spaced values from ``start`` to ``stop`` (both included), rounded to 12
    significant digits (so 0.6 + 3 x 0.1 is stored and queried as 0.9)."""

    start: PositiveFloat
    stop: PositiveFloat
    num: PositiveInt

    def values(self) -> list[float]:
        return [float(f"{x:.12g}") for x in np.linspace(self.start, self.stop, self.num)]


class PolicySpec(_Model):
    """A policy by name, with the (K_p, K_d)-FCFS knobs for ``kfcfs``."""

    name: str
    priority: Literal["prefill", "decode"] = "decode"
    mixed: bool = True
    chunked: bool = True
    k_p: PositiveInt | None = None
    k_d: PositiveInt | None = None


class WorkloadSpec(_Model):
    """Arrivals and sizes as the CLI's spec strings; sizes default to 129 + 112 (or the trace's)."""

    name: str | None = None
    arrival: str = "poisson"
    prefill: str | None = None
    decode: str | None = None


class Grid(_Model):
    """The axes of the sweep; the runs are every combination."""

    policies: Annotated[list[str | PolicySpec], Field(min_length=1)]
    budgets: Annotated[list[PositiveInt], Field(min_length=1)] = [512]
    rates: Annotated[list[PositiveFloat], Field(min_length=1)] | Span | None = None
    loads: Annotated[list[PositiveFloat], Field(min_length=1)] | Span | None = None
    k_max: Annotated[list[PositiveInt | None], Field(min_length=1)] = [None]
    seeds: Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(min_length=1)] = [0]
    batch_times: Annotated[list[str], Field(min_length=1)] = [DEFAULT_BATCH_TIME]
    workloads: Annotated[list[WorkloadSpec], Field(min_length=1)] = [WorkloadSpec()]
    memory: Annotated[list[str | None], Field(min_length=1)] | None = None

    @field_validator("k_max", mode="before")
    @classmethod
    def _none_words(cls, value: Any) -> Any:
        """TOML has no null: ``"none"`` (or 0) in k_max means no limit."""
        if isinstance(value, list):
            return [None if v in (*NO_LIMIT_WORDS, 0) else v for v in value]
        return value

    @field_validator("memory", mode="before")
    @classmethod
    def _memory_axis(cls, value: Any) -> Any:
        """One spec string is a one-value axis; ``"none"`` in the list means an unlimited cache."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [None if isinstance(v, str) and v.strip() in NO_LIMIT_WORDS else v for v in value]
        return value

    def memory_specs(self) -> list[str | None]:
        """The memory axis: spec strings (stripped), None for an unlimited cache (the default)."""
        return [None if m is None else m.strip() for m in self.memory] if self.memory else [None]


class RunSettings(_Model):
    """What every run of the sweep shares."""

    requests: PositiveInt | None = 5000
    duration_s: PositiveFloat | None = None
    drain_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    engine: Literal["auto", "compiled", "fast", "reference"] = "auto"


class SweepConfig(_Model):
    """A whole sweep file."""

    grid: Grid
    run: RunSettings = RunSettings()


def load_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file (TOML or YAML)."""
    return parse_config(read_table(path, "config"), source=Path(path).name)


def parse_config(data: Any, source: str = "config") -> SweepConfig:
    """Validate a sweep given as a mapping; then build every run once to catch bad values."""
    if not isinstance(data, dict):
        raise ConfigError(source, type(data).__name__, "must be a table with a [grid] section")
    try:
        config = SweepConfig.model_validate(data)
    except ValidationError as err:
        raise first_error(err, source) from None
    grid = config.grid
    if (grid.rates is None) == (grid.loads is None) and not _all_traces(grid):
        raise ConfigError(f"{source}: grid", "rates/loads", "give exactly one of rates and loads")
    if config.run.requests is None and config.run.duration_s is None and not _all_traces(grid):
        raise ConfigError(f"{source}: run.requests", None, "give requests or duration_s")
    limited = [spec for spec in grid.memory_specs() if spec is not None]
    for spec in limited:
        memory_of(spec, source)
    for run in expand(config):  # every value the simulator would refuse fails now
        _build(run, source)
    return config


def memory_of(spec: str | None, source: str = "config") -> KVCache | None:
    """The KV cache of a memory spec (None: unlimited); errors name ``grid.memory`` and the key."""
    if spec is None:
        return None
    try:
        return parse_memory(spec)
    except ConfigError as err:
        key = err.field.removeprefix("memory")
        raise ConfigError(f"{source}: grid.memory{key}", spec, err.problem) from None


def _all_traces(grid: Grid) -> bool:
    return all(is_trace_spec(w.arrival) for w in grid.workloads)


def _policy_config(spec: str | PolicySpec) -> dict[str, Any]:
    if isinstance(spec, str):
        return {"name": spec.strip().lower()}
    out: dict[str, Any] = {"name": spec.name.strip().lower()}
    if out["name"] in ("kfcfs", "k-fcfs"):
        out.update(priority=spec.priority, mixed=spec.mixed, chunked=spec.chunked, k_p=spec.k_p,
                   k_d=spec.k_d)
    return out


def _sizes(w: WorkloadSpec) -> tuple[str | None, str | None]:
    return default_sizes(w.arrival, w.prefill, w.decode)


def expand(config: SweepConfig) -> Iterator[dict[str, Any]]:
    """Every run of the grid as a plain configuration mapping (its key is its hash).

    ``memory`` is in the mapping only when the run has a KV cache, so a run without one keeps the
    key it had before sweeps knew memory (stored results stay valid).
    """
    grid, settings = config.grid, config.run
    rates = grid.rates.values() if isinstance(grid.rates, Span) else grid.rates
    loads = grid.loads.values() if isinstance(grid.loads, Span) else grid.loads
    for w, bt_spec, budget, k_max, memory, spec in itertools.product(
        grid.workloads, grid.batch_times, grid.budgets, grid.k_max, grid.memory_specs(), grid.policies
    ):
        prefill, decode = _sizes(w)
        levels: list[tuple[float | None, float | None]]
        if rates is not None:
            levels = [(r, None) for r in rates]
        elif loads is not None:
            levels = [(None, x) for x in loads]
        else:
            levels = [(None, None)]  # a trace at its own rate
        for (rate, load), seed in itertools.product(levels, grid.seeds):
            run: dict[str, Any] = {
                "workload": w.name,
                "arrival": w.arrival,
                "prefill": prefill,
                "decode": decode,
                "batch_time": bt_spec,
                "budget": budget,
                "k_max": k_max,
                "policy": _policy_config(spec),
                "rate": rate,
                "load": load,
                "seed": seed,
                "requests": settings.requests,
                "duration_s": settings.duration_s,
                "drain_s": settings.drain_s,
            }
            if memory is not None:
                run["memory"] = memory
            yield run


def _build(run: Mapping[str, Any], source: str = "config") -> tuple[Any, Any, Any, float | None]:
    """(workload, policy, batch time, rate) of a run; errors name the grid key."""
    try:
        bt = parse_batch_time(run["batch_time"])
    except ConfigError as err:
        raise ConfigError(f"{source}: grid.batch_times", run["batch_time"], err.problem) from None
    p = run["policy"]
    try:
        policy = make_policy(p["name"], **{k: v for k, v in p.items() if k != "name"})
    except ConfigError as err:
        raise ConfigError(f"{source}: grid.policies", p["name"], err.problem) from None
    except TypeError:
        raise ConfigError(f"{source}: grid.policies", p["name"], "unknown policy options") from None
    try:
        workload = resolve_workload(run["arrival"], run["prefill"], run["decode"], batch_time=bt,
                                    budget=run["budget"], rate=run["rate"], load=run["load"],
                                    default_load=None)
    except ConfigError as err:
        raise ConfigError(f"{source}: grid.workloads", err.value, f"{err.field}: {err.problem}") from None
    return workload, policy, bt, workload.rate_per_s


def execute(run: Mapping[str, Any], engine: str = "auto") -> tuple[dict[str, Any], float]:
    """One run of a sweep (in a worker): the flat result mapping and its wall time (s)."""
    start = time.perf_counter()
    workload, policy, bt, _ = _build(run)
    memory = memory_of(run.get("memory"))
    result = simulate(
        workload, policy, bt, run["budget"], k_max=run["k_max"], seed=run["seed"],
        max_requests=run["requests"], duration_s=run["duration_s"], drain_s=run["drain_s"],
        keep_requests=False, engine=engine, memory=memory,  # type: ignore[arg-type]
    )
    out = result.to_dict()
    out["policy"] = policy_name(policy)
    out["memory"] = run.get("memory")  # every row carries the axis, None for an unlimited cache
    out["kv_capacity_tokens"] = None if memory is None else memory.capacity_tokens
    return out, time.perf_counter() - start


@dataclass(frozen=True, slots=True)
class SweepOutcome:
    """What a sweep call did."""

    total: int
    already_done: int
    ran: int
    interrupted: bool
    wall_s: float


def _version() -> str:
    from llmqueue import __version__

    return __version__


def run_sweep(
    config: SweepConfig,
    store: Store,
    *,
    workers: int = 1,
    backend: Literal["local", "ray"] = "local",
    ray_address: str | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_done: Callable[[Mapping[str, Any], Mapping[str, Any]], None] | None = None,
) -> SweepOutcome:
    """Run every configuration of the grid not yet in ``store``, storing each as it finishes.

    ``on_start(total, to_run)`` is called once, ``on_done(run, result)`` after each stored run.
    Ctrl-C stops the sweep: finished runs are kept, and the outcome says ``interrupted``.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError("workers", workers, "must be an integer >= 1")
    start = time.perf_counter()
    runs = list(expand(config))
    stored = store.keys()
    todo = [run for run in runs if run_key(run) not in stored]
    if on_start is not None:
        on_start(len(runs), len(todo))
    engine = config.run.engine
    version = _version()
    ran = 0

    def record(run: Mapping[str, Any], result: Mapping[str, Any], wall_s: float) -> None:
        nonlocal ran
        store.put(run, result, wall_s, version)
        ran += 1
        if on_done is not None:
            on_done(run, result)

    interrupted = False
    try:
        if backend == "ray":
            _run_ray(todo, engine, record, ray_address)
        elif workers == 1:
            for run in todo:
                result, wall_s = execute(run, engine)
                record(run, result, wall_s)
        else:
            _run_pool(todo, engine, record, workers)
    except KeyboardInterrupt:
        interrupted = True
    return SweepOutcome(len(runs), len(runs) - len(todo), ran, interrupted,
                        time.perf_counter() - start)


def _run_pool(todo: list[dict[str, Any]], engine: str,
              record: Callable[[Mapping[str, Any], Mapping[str, Any], float], None],
              workers: int) -> None:
    """Local process pool: at most ``2 x workers`` runs queued at once, stored as they finish."""
    pool = ProcessPoolExecutor(max_workers=workers)
    pending: dict[Future[tuple[dict[str, Any], float]], dict[str, Any]] = {}
    queue = iter(todo)
    try:
        while True:
            while len(pending) < 2 * workers:
                run = next(queue, None)
                if run is None:
                    break
                pending[pool.submit(execute, run, engine)] = run
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                run = pending.pop(future)
                result, wall_s = future.result()
                record(run, result, wall_s)
    except BrokenProcessPool:
        raise LLMQueueError(
            "a sweep worker died (out of memory or killed); finished runs are stored: "
            "rerun the same command to resume"
        ) from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _run_ray(todo: list[dict[str, Any]], engine: str,
             record: Callable[[Mapping[str, Any], Mapping[str, Any], float], None],
             address: str | None) -> None:
    """Ray backend (``pip install 'llmqueue[ray]'``): one task per run, stored as they finish."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "backend", "ray", "needs the optional extra: pip install 'llmqueue[ray]'"
        ) from None
    address = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(execute)
    pending = {remote.remote(run, engine): run for run in todo}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                run = pending.pop(ref)
                result, wall_s = ray.get(ref)
                record(run, result, wall_s)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
