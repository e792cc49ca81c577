"""Sweeps: a grid of runs from one config file, in parallel, stored as they finish, resumable.

The config (TOML or YAML) has a ``grid`` (policies x budgets x rates or loads x k_max x seeds x
batch times x workloads x KV caches) and ``run`` settings (requests per run, duration, drain,
engine). It is validated whole before any run starts: unknown keys, wrong types, empty lists,
numbers outside ``llmqueue.limits``, grids of more than ``MAX_GRID_RUNS`` runs (counted, never
expanded) and settings the simulator would refuse fail at once with one line naming the key.
Every run's configuration is a plain mapping whose hash keys the results store
(``llmqueue.io.store``), so a rerun skips what is already there; a value repeated in an axis gives
the same run, which is run once. Runs go to a local process pool, or to a Ray cluster with
``llmqueue[ray]``; two sweeps on one results file claim runs so each runs once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmqueue.errors import ConfigError, LLMQueueError
from llmqueue.io.configfile import first_error, read_table
from llmqueue.io.store import STALE_CLAIM_S, Owner, Store, StoreWriteError, package_version, run_key
from llmqueue.limits import (
    MAX_BATCH_REQUESTS,
    MAX_BUDGET_TOKENS,
    MAX_DURATION_S,
    MAX_GRID_RUNS,
    MAX_LOAD,
    MAX_RATE_PER_S,
    MAX_REQUESTS,
    MAX_SEED,
    MAX_WORKERS,
    MIN_RATE_PER_S,
)
from llmqueue.model.batchtime import parse_batch_time
from llmqueue.model.memory import KVCache, parse_memory
from llmqueue.policies.fcfs import make_policy
from llmqueue.policies.view import policy_name
from llmqueue.sim.run import simulate
from llmqueue.sim.settings import DEFAULT_BATCH_TIME, default_sizes, is_trace_spec, resolve_workload

NO_LIMIT_WORDS = ("none", "None", "null")
PositiveInt = Annotated[int, Field(strict=True, ge=1)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Rate = Annotated[float, Field(ge=MIN_RATE_PER_S, le=MAX_RATE_PER_S, allow_inf_nan=False)]
Load = Annotated[float, Field(gt=0, le=MAX_LOAD, allow_inf_nan=False)]
BatchRequests = Annotated[int, Field(strict=True, ge=1, le=MAX_BATCH_REQUESTS)]
Seconds = Annotated[float, Field(ge=0, le=MAX_DURATION_S, allow_inf_nan=False)]


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


class RateSpan(Span):
    """A span of arrival rates (requests/s), within ``llmqueue.limits``."""

    start: Rate
    stop: Rate


class LoadSpan(Span):
    """A span of loads (fractions of lambda*), within ``llmqueue.limits``."""

    start: Load
    stop: Load


class PolicySpec(_Model):
    """A policy by name, with the (K_p, K_d)-FCFS knobs for ``kfcfs``."""

    name: str
    priority: Literal["prefill", "decode"] = "decode"
    mixed: bool = True
    chunked: bool = True
    k_p: BatchRequests | None = None
    k_d: BatchRequests | None = None


class WorkloadSpec(_Model):
    """Arrivals and sizes as the CLI's spec strings; sizes default to 129 + 112 (or the trace's)."""

    name: str | None = None
    arrival: str = "poisson"
    prefill: str | None = None
    decode: str | None = None


class Grid(_Model):
    """The axes of the sweep; the runs are every combination."""

    policies: Annotated[list[str | PolicySpec], Field(min_length=1)]
    budgets: Annotated[list[Annotated[int, Field(strict=True, ge=1, le=MAX_BUDGET_TOKENS)]],
                       Field(min_length=1)] = [512]
    rates: Annotated[list[Rate], Field(min_length=1)] | RateSpan | None = None
    loads: Annotated[list[Load], Field(min_length=1)] | LoadSpan | None = None
    k_max: Annotated[list[BatchRequests | None], Field(min_length=1)] = [None]
    seeds: Annotated[list[Annotated[int, Field(strict=True, ge=0, le=MAX_SEED)]], Field(min_length=1)] = [0]
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

    requests: Annotated[int, Field(strict=True, ge=1, le=MAX_REQUESTS)] | None = 5000
    duration_s: Annotated[float, Field(gt=0, le=MAX_DURATION_S, allow_inf_nan=False)] | None = None
    drain_s: Seconds | None = None
    engine: Literal["auto", "compiled", "fast", "reference"] = "auto"


class SweepConfig(_Model):
    """A whole sweep file."""

    grid: Grid
    run: RunSettings = RunSettings()


def load_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file (TOML or YAML)."""
    return parse_config(read_table(path, "config"), source=Path(path).name)


def parse_config(data: Any, source: str = "config") -> SweepConfig:
    """Validate a sweep given as a mapping; then build every distinct setting once to catch bad
    values (every run is made of these, so no run can fail to build later)."""
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
    _check_size(grid, source)
    limited = [spec for spec in grid.memory_specs() if spec is not None]
    for spec in limited:
        memory_of(spec, source)
    axes = _axes(config)
    # A run is built from its batch time, policy, workload, budget and level alone, and each
    # part fails on its own inputs: each policy once, and each (workload, batch time, budget,
    # level) once, cover every run without building the seeds x k_max x memory product. Of the
    # levels, the smallest and the largest suffice: a rate (or the rate a load gives, which grows
    # with the load) is checked against a range, so validation stays fast for long spans.
    base = {name: values[0] for name, values in axes.items()}
    for policy in axes["policy"]:
        _build(_run({**base, "policy": policy}, config.run), source)
    levels = axes["level"]
    ends = _distinct([min(levels, key=_level_value), max(levels, key=_level_value)])
    for w, bt, budget, level in itertools.product(axes["workload"], axes["batch_time"], axes["budget"],
                                                  ends):
        _build(_run({**base, "workload": w, "batch_time": bt, "budget": budget, "level": level},
                    config.run), source)
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


def _axis_lengths(grid: Grid) -> dict[str, int]:
    """How many values each axis has as written (a span counts its ``num``; nothing expanded)."""
    levels = grid.rates if grid.rates is not None else grid.loads
    return {
        "workloads": len(grid.workloads), "batch_times": len(grid.batch_times),
        "budgets": len(grid.budgets), "k_max": len(grid.k_max), "memory": len(grid.memory_specs()),
        "policies": len(grid.policies),
        "rates" if grid.rates is not None else "loads":
            1 if levels is None else levels.num if isinstance(levels, Span) else len(levels),
        "seeds": len(grid.seeds),
    }


def _check_size(grid: Grid, source: str) -> None:
    """Refuse a grid of more than MAX_GRID_RUNS runs, counted as the product of the axis lengths
    (a span of 10^8 loads is refused at once, not expanded); the error names the longest axis."""
    lengths = _axis_lengths(grid)
    runs = math.prod(lengths.values())
    if runs > MAX_GRID_RUNS:
        axis = max(lengths, key=lambda name: lengths[name])
        raise ConfigError(f"{source}: grid.{axis}", f"{lengths[axis]:,} values",
                          f"the grid has {runs:,} runs, more than {MAX_GRID_RUNS:,} "
                          "(llmqueue.limits.MAX_GRID_RUNS); split the sweep")


def _level_value(level: tuple[float | None, float | None]) -> float:
    """The number of a (rate, load) level, for ordering (a trace at its own rate: 0)."""
    rate, load = level
    return rate if rate is not None else load if load is not None else 0.0


def _distinct(values: Sequence[Any]) -> list[Any]:
    """``values`` without repeats (tables compared by canonical JSON), in their first order."""
    if all(not isinstance(v, dict) for v in values):  # numbers, strings, None, (rate, load) pairs
        return list(dict.fromkeys(values))
    first: dict[str, Any] = {}
    for value in values:
        first.setdefault(json.dumps(value, sort_keys=True), value)
    return list(first.values())


def _axes(config: SweepConfig) -> dict[str, list[Any]]:
    """Each axis as the distinct values it puts into a run, in the file's order.

    Every axis sets its own fields of the run mapping, so two runs are the same run exactly when
    they agree on every axis: the product of these lists is every run once (``loads = [0.5,
    0.5]``, two spellings of one policy or a span rounded onto itself give no repeats).
    """
    grid = config.grid
    rates = grid.rates.values() if isinstance(grid.rates, Span) else grid.rates
    loads = grid.loads.values() if isinstance(grid.loads, Span) else grid.loads
    levels: list[tuple[float | None, float | None]]
    if rates is not None:
        levels = [(r, None) for r in rates]
    elif loads is not None:
        levels = [(None, x) for x in loads]
    else:
        levels = [(None, None)]  # a trace at its own rate
    workloads = []
    for w in grid.workloads:
        prefill, decode = _sizes(w)
        workloads.append({"workload": w.name, "arrival": w.arrival, "prefill": prefill, "decode": decode})
    return {
        "workload": _distinct(workloads), "batch_time": _distinct(grid.batch_times),
        "budget": _distinct(grid.budgets), "k_max": _distinct(grid.k_max),
        "memory": _distinct(grid.memory_specs()),
        "policy": _distinct([_policy_config(spec) for spec in grid.policies]),
        "level": _distinct(levels), "seed": _distinct(grid.seeds),
    }


def _run(values: Mapping[str, Any], settings: RunSettings) -> dict[str, Any]:
    """The configuration mapping of one run from one value of each axis."""
    rate, load = values["level"]
    run: dict[str, Any] = {
        **values["workload"],
        "batch_time": values["batch_time"],
        "budget": values["budget"],
        "k_max": values["k_max"],
        "policy": dict(values["policy"]),
        "rate": rate,
        "load": load,
        "seed": values["seed"],
        "requests": settings.requests,
        "duration_s": settings.duration_s,
        "drain_s": settings.drain_s,
    }
    if values["memory"] is not None:
        run["memory"] = values["memory"]
    return run


def grid_size(config: SweepConfig) -> tuple[int, int]:
    """(distinct runs, repeats dropped): the grid as written has the sum of both runs."""
    lengths = _axis_lengths(config.grid)
    runs = math.prod(len(values) for values in _axes(config).values())
    return runs, math.prod(lengths.values()) - runs


def expand(config: SweepConfig) -> Iterator[dict[str, Any]]:
    """Every run of the grid once, lazily, as a plain configuration mapping (its key is its hash).

    ``memory`` is in the mapping only when the run has a KV cache, so a run without one keeps the
    key it had before sweeps knew memory (stored results stay valid).
    """
    axes = _axes(config)
    outer = ("workload", "batch_time", "budget", "k_max", "memory", "policy")
    for head in itertools.product(*(axes[name] for name in outer)):
        for level, seed in itertools.product(axes["level"], axes["seed"]):
            yield _run({**dict(zip(outer, head, strict=True)), "level": level, "seed": seed},
                       config.run)


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
    """What a sweep call did: of ``total`` distinct runs, ``already_done`` were stored before,
    ``ran`` ran here, ``skipped`` were left to another sweep on the same file (it held them or
    stored them meanwhile); ``duplicates`` repeated grid values were dropped. ``signal`` is the
    signal that interrupted it (SIGINT, SIGTERM), if any."""

    total: int
    already_done: int
    ran: int
    interrupted: bool
    wall_s: float
    skipped: int = 0
    duplicates: int = 0
    signal: int | None = None


@dataclass(frozen=True, slots=True)
class SweepPlan:
    """What a sweep would do (``--dry-run``): distinct runs, repeats dropped, runs already stored."""

    total: int
    duplicates: int
    already_done: int

    @property
    def to_run(self) -> int:
        return self.total - self.already_done


def plan_sweep(config: SweepConfig, db_path: str | Path) -> SweepPlan:
    """Count the runs of a sweep and those already stored, reading the results file read-only (a
    missing file is an empty store and is not created)."""
    total, duplicates = grid_size(config)
    stored: set[str] = set()
    if Path(db_path).exists():
        with Store(db_path, readonly=True) as store:
            stored = store.keys() | store.pending_keys()
    done = sum(1 for run in expand(config) if run_key(run) in stored) if stored else 0
    return SweepPlan(total, duplicates, done)


class _Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a sweep: the same clean stop as Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Interrupts:
    """SIGINT and SIGTERM handler of a running sweep. The first signal raises _Interrupted, but
    not while a finished run is being stored (it is raised right after); later signals are
    ignored while the sweep stops its workers and releases its claims."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._held: int | None = None
        self._deferring = False
        self._stopping = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None or self._stopping:
            self.signum = self.signum or signum
            return
        if self._deferring:
            self._held = signum
            return
        self.signum = signum
        raise _Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold a signal until the block ends (storing a finished run is never cut in half)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._held is not None and self.signum is None:
            self.signum = self._held
            raise _Interrupted(self._held)

    def stopping(self) -> None:
        """From now on a signal is only noted (the sweep is cleaning up)."""
        self._stopping = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """This handler for SIGINT and SIGTERM during the block (main thread only: elsewhere
        Python cannot install handlers, and Ctrl-C stays a KeyboardInterrupt)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self) for s in self.SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _worker_init() -> None:
    """In a pool worker: Ctrl-C is the parent's to handle (it terminates the workers), and
    SIGTERM ends the worker at once (the parent's handler is not inherited)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@dataclass
class _Recorder:
    """Stores finished runs; once the store cannot take a write (locked past its timeout, a full
    disk), keeps them in memory (``pending``) for a side file instead, and says so (``failure``)."""

    store: Store
    owner: Owner
    version: str
    interrupts: _Interrupts
    on_done: Callable[[Mapping[str, Any], Mapping[str, Any]], None] | None
    ran: int = 0
    pending: list[dict[str, Any]] = field(default_factory=list)
    failure: StoreWriteError | None = None

    def __call__(self, run: Mapping[str, Any], result: Mapping[str, Any], wall_s: float) -> None:
        with self.interrupts.deferred():
            if self.failure is None:
                try:
                    self.store.put(run, result, wall_s, self.version, owner=self.owner)
                except StoreWriteError as err:
                    self.failure = err
            if self.failure is not None:
                self.pending.append({"config": dict(run), "result": dict(result), "wall_s": wall_s,
                                     "version": self.version, "finished_at": time.time()})
                return
            self.ran += 1
        if self.on_done is not None:
            self.on_done(run, result)


def run_sweep(
    config: SweepConfig,
    store: Store,
    *,
    workers: int = 1,
    backend: Literal["local", "ray"] = "local",
    ray_address: str | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_done: Callable[[Mapping[str, Any], Mapping[str, Any]], None] | None = None,
    stale_claim_s: float = STALE_CLAIM_S,
) -> SweepOutcome:
    """Run every configuration of the grid not yet in ``store``, storing each as it finishes.

    ``on_start(total, to_run)`` is called once, ``on_done(run, result)`` after each stored run.
    Each run is claimed in the store before it starts, so another sweep on the same file skips it.
    Ctrl-C or SIGTERM stops the sweep: finished runs are kept, workers are terminated, claims are
    released, and the outcome says ``interrupted`` (and which signal). If the store cannot take a
    write (locked by another writer past its lock timeout, a full disk), the sweep stops, the
    finished runs it could not store go to a side file that the next sweep imports, and
    LLMQueueError says so.
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= MAX_WORKERS:
        raise ConfigError("workers", workers, f"must be an integer from 1 to {MAX_WORKERS:,}")
    if backend == "local" and ray_address is not None:
        raise ConfigError("ray_address", ray_address, "is used only with backend 'ray'")
    start = time.perf_counter()
    total, duplicates = grid_size(config)
    store.import_pending()
    stored = store.keys()
    already = sum(1 for run in expand(config) if run_key(run) in stored)
    if on_start is not None:
        on_start(total, total - already)
    ran, skipped, signum = run_stored(expand(config), store, engine=config.run.engine, workers=workers,
                                      backend=backend, ray_address=ray_address, on_done=on_done,
                                      stale_claim_s=stale_claim_s)
    return SweepOutcome(total, already, ran, signum is not None, time.perf_counter() - start, skipped,
                        duplicates, signum)


ExecuteFn = Callable[[Mapping[str, Any], str], tuple[dict[str, Any], float]]
"""A run's executor: (run configuration, engine) -> (flat result, wall s); module-level, so a worker
process or a Ray task can call it."""


def run_stored(
    runs: Iterable[dict[str, Any]],
    store: Store,
    *,
    execute_fn: ExecuteFn | None = None,
    engine: str = "auto",
    workers: int = 1,
    backend: Literal["local", "ray"] = "local",
    ray_address: str | None = None,
    on_done: Callable[[Mapping[str, Any], Mapping[str, Any]], None] | None = None,
    stale_claim_s: float = STALE_CLAIM_S,
    pool: ProcessPoolExecutor | None = None,
) -> tuple[int, int, int | None]:
    """Run every configuration of ``runs`` not yet in ``store`` with ``execute_fn`` (default: a
    sweep run), claimed first and stored as each finishes: the machinery of :func:`run_sweep`, for
    other studies (``llmqueue plan``) too. Returns (runs stored here, runs left to another process
    on the same file, the signal that interrupted it or None); LLMQueueError when the store cannot
    take a write (the finished runs go to a side file). ``pool`` (``worker_pool``) lets a caller
    that runs several batches keep its workers (and their loaded event loops) between them; it is
    stopped if a signal interrupts the runs."""
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= MAX_WORKERS:
        raise ConfigError("workers", workers, f"must be an integer from 1 to {MAX_WORKERS:,}")
    execute_fn = execute_fn or execute
    stored = store.keys()
    interrupts = _Interrupts()
    owner = Owner.new()
    recorder = _Recorder(store, owner, package_version(), interrupts, on_done)
    skipped = 0

    def claimed() -> Iterator[dict[str, Any]]:
        """The runs to start: not stored, and claimed here (not by another sweep)."""
        nonlocal skipped
        for run in runs:
            if recorder.failure is not None:
                return
            key = run_key(run)
            if key in stored:
                continue
            try:
                mine = store.claim(key, owner, stale_claim_s)
            except StoreWriteError as err:
                recorder.failure = err
                return
            if mine:
                yield run
            else:
                skipped += 1

    with interrupts.installed():
        try:
            if backend == "ray":
                _run_ray(claimed(), engine, recorder, ray_address, execute_fn)
            elif workers == 1:
                for run in claimed():
                    result, wall_s = execute_fn(run, engine)
                    recorder(run, result, wall_s)
            else:
                _run_pool(claimed(), engine, recorder, workers, execute_fn, pool)
        except KeyboardInterrupt as err:  # _Interrupted, or Ctrl-C outside the main thread
            interrupts.signum = int(getattr(err, "signum", signal.SIGINT))
        finally:
            interrupts.stopping()
            store.release(owner)
    if recorder.failure is not None:
        raise _write_failed(store, recorder)
    return recorder.ran, skipped, interrupts.signum




def _write_failed(store: Store, recorder: _Recorder) -> LLMQueueError:
    """The one line that ends a sweep whose store could not take a write (locked too long, a full
    disk), after saving what it could not store (the next sweep imports the side file)."""
    err = recorder.failure
    assert err is not None
    text = f"{err}; {recorder.ran} run(s) stored"
    if recorder.pending:
        try:
            side = store.save_pending(recorder.pending)
            text += (f", {len(recorder.pending)} finished run(s) saved to {side} (the next sweep "
                     "stores them)")
        except OSError as write_err:
            text += (f", {len(recorder.pending)} finished run(s) lost: cannot write "
                     f"{write_err.filename}: {write_err.strerror}")
    return LLMQueueError(f"{text}; rerun to resume")


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel queued runs and end the workers now: SIGTERM, then SIGKILL after 5 s; joined, so
    no worker outlives the sweep (or keeps its caller's pipes open)."""
    # The worker processes: Python 3.14 has pool.terminate_workers(); before, only this attribute.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(OSError, ValueError):
            process.terminate()
    for process in processes:
        with contextlib.suppress(OSError, ValueError):
            process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join(5.0)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A local process pool whose workers leave Ctrl-C to the parent (for ``run_stored(pool=)``)."""
    return ProcessPoolExecutor(max_workers=workers, initializer=_worker_init)


def _run_pool(runs: Iterator[dict[str, Any]], engine: str, recorder: _Recorder, workers: int,
              execute_fn: ExecuteFn = execute, given: ProcessPoolExecutor | None = None) -> None:
    """Local process pool: at most ``2 x workers`` runs queued at once, stored as they finish. A
    ``given`` pool is kept running when every run is done (its owner shuts it down)."""
    pool = given or worker_pool(workers)
    pending: dict[Future[tuple[dict[str, Any], float]], dict[str, Any]] = {}
    finished = False
    try:
        while recorder.failure is None:
            while len(pending) < 2 * workers:
                run = next(runs, None)
                if run is None:
                    break
                pending[pool.submit(execute_fn, run, engine)] = run
            if not pending:
                finished = True
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                run = pending.pop(future)
                result, wall_s = future.result()
                recorder(run, result, wall_s)
    except BrokenProcessPool:
        raise LLMQueueError(
            "a sweep worker died (out of memory or killed); finished runs are stored: "
            "rerun the same command to resume"
        ) from None
    finally:
        if not finished:
            _stop_workers(pool)
        elif given is None:
            pool.shutdown(wait=True)


def _run_ray(runs: Iterator[dict[str, Any]], engine: str, recorder: _Recorder,
             address: str | None, execute_fn: ExecuteFn = execute) -> None:
    """Ray backend (``pip install 'llmqueue[ray]'``): one task per run, stored as they finish."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "backend", "ray", "needs the optional extra: pip install 'llmqueue[ray]'"
        ) from None
    address = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(execute_fn)
    pending = {remote.remote(run, engine): run for run in runs}
    try:
        while pending and recorder.failure is None:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                run = pending.pop(ref)
                result, wall_s = ray.get(ref)
                recorder(run, result, wall_s)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
