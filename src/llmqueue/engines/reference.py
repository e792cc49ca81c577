"""The reference engine: exact per-iteration dynamics of one batched LLM engine, event by event.

Time is continuous. An idle engine starts a batch when work arrives; a request arriving during a
batch waits for the next batch boundary. At each boundary the policy sees a read-only view and
returns a plan; ``check_plan`` enforces the batch rules; the batch of ``n`` tokens takes ``t(n)`` ms.

The engine does not own a clock loop: an outer loop asks ``next_event_ms()`` and calls ``step()``,
and hands arrivals in with ``submit()``. That lets several engines share one clock (networks).
Submitting every arrival whose time is <= ``next_event_ms()`` before stepping makes an arrival at
exactly a batch boundary join the batch that starts there.
"""

from __future__ import annotations

import heapq
import math
from bisect import insort
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, overload

from llmqueue.engines.metrics import Recorder, RequestRecord
from llmqueue.errors import ConfigError, PlanError
from llmqueue.model.batchtime import BatchShape, BatchTime, ShapeTime, is_shape_model
from llmqueue.model.memory import KVCache
from llmqueue.model.workload import Request
from llmqueue.policies.view import EngineView

PolicyFn = Callable[[EngineView], Mapping[int, int]]
ShapeTimeFn = Callable[[BatchShape], float]
T = TypeVar("T")


class ReadOnlyList(Sequence[T]):
    """A read-only window on a list the engine owns: policies index, slice and iterate it, but
    cannot change it. No copy is made (the engine changes the list only between policy calls)."""

    __slots__ = ("_items",)

    def __init__(self, items: list[T]) -> None:
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...
    def __getitem__(self, index: int | slice) -> T | list[T]:
        return self._items[index]

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    def __repr__(self) -> str:
        return f"ReadOnlyList({self._items!r})"


class Job:
    """A request inside the engine with its progress (the policy sees it read-only)."""

    __slots__ = (
        "activation",
        "arrival_ms",
        "blocks",
        "c0",
        "cached",
        "cls",
        "decode_left",
        "decode_tokens",
        "first_token_ms",
        "id",
        "last_token_ms",
        "prefill_left",
        "prefill_tokens",
        "seq",
    )

    def __init__(self, request: Request, seq: int) -> None:
        self.id = request.id
        self.cls = request.cls
        self.seq = seq
        self.arrival_ms = request.arrival_ms
        self.prefill_tokens = request.prefill_tokens
        self.decode_tokens = request.decode_tokens
        self.prefill_left = request.prefill_tokens
        self.decode_left = request.decode_tokens
        self.first_token_ms = math.nan if request.prefill_tokens else request.arrival_ms
        self.last_token_ms = self.first_token_ms
        self.c0 = 0  # fast engine: decode counter when this decoder joined the served prefix
        self.activation = 0  # fast engine: bumped whenever it joins or leaves that prefix
        self.cached = request.context_tokens  # tokens whose KV it holds (context, prompt, decoded)
        self.blocks = 0  # KV blocks it holds (memory-limited engines)

    def record(self, finish_ms: float = math.nan) -> RequestRecord:
        """This request's outcome as a plain record."""
        return RequestRecord(
            id=self.id,
            arrival_ms=self.arrival_ms,
            first_token_ms=self.first_token_ms,
            finish_ms=finish_ms,
            prefill_tokens=self.prefill_tokens,
            decode_tokens=self.decode_tokens,
        )


@dataclass(frozen=True, slots=True)
class Batch:
    """One iteration as it ran: when, which tokens of which requests, and what it could have held."""

    index: int
    start_ms: float
    end_ms: float
    plan: tuple[tuple[int, int], ...]
    prefill_tokens: int
    decode_tokens: int
    fill_target_tokens: int

    @property
    def tokens(self) -> int:
        """Tokens in the batch."""
        return self.prefill_tokens + self.decode_tokens


def fill_target(view: EngineView, prefill_left_tokens: int | None = None) -> int:
    """Most tokens the batch rules let one batch take from the requests present.

    Without ``k_max`` this is the paper's ``min(b, demand)``; with it, the ``k_max`` requests of
    largest demand (prompts before decoders) bound the fill. A batch below this is not
    work-conserving. ``prefill_left_tokens`` (the sum of the prompts' remaining tokens) may be
    passed when known, to skip summing it.
    """
    n_pre, n_dec = len(view.prefilling), len(view.decoding)
    if view.k_max is None or n_pre + n_dec <= view.k_max:
        if prefill_left_tokens is None:
            prefill_left_tokens = sum(r.prefill_left for r in view.prefilling)
        return min(view.budget, prefill_left_tokens + n_dec)
    k = view.k_max
    top = heapq.nlargest(min(k, n_pre), (r.prefill_left for r in view.prefilling))
    return min(view.budget, sum(top) + min(k - len(top), n_dec))


def check_plan(
    plan: Mapping[int, int], view: EngineView, jobs: Mapping[int, Job]
) -> tuple[int, int]:
    """Enforce the batch rules on a plan; return its (prefill, decode) token counts.

    Rules: every id is a request present; every entry has >= 1 token; a request with prefill left
    takes only prefill tokens (at most what is left: prefill before decode); a decoding request
    takes exactly one token; at most ``budget`` tokens; at most ``k_max`` requests.
    """
    if not isinstance(plan, Mapping):
        shown = repr(plan)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise PlanError("plan is a mapping", f"the policy returned {type(plan).__name__} {shown}, "
                        "not a mapping {request_id: tokens}")
    if view.k_max is not None and len(plan) > view.k_max:
        raise PlanError("batch-size limit", f"{len(plan)} requests > k_max={view.k_max}")
    prefill = decode = 0
    for rid, tokens in plan.items():
        job = jobs.get(rid)
        if job is None:
            raise PlanError("known request", f"request {rid!r} is not in the engine")
        if not isinstance(tokens, int) or tokens < 1:
            raise PlanError("positive tokens", f"request {rid} given {tokens!r} tokens")
        if job.prefill_left:
            if tokens > job.prefill_left:
                raise PlanError(
                    "prefill before decode",
                    f"request {rid} has {job.prefill_left} prefill tokens left, given {tokens}",
                )
            prefill += tokens
        else:
            if tokens != 1:
                raise PlanError(
                    "one decode token per request", f"decoding request {rid} given {tokens}"
                )
            decode += 1
    if prefill + decode > view.budget:
        raise PlanError("token budget", f"{prefill + decode} tokens > budget={view.budget}")
    return prefill, decode


@dataclass(slots=True, eq=False)
class EngineState:
    """What an engine holds between events: the requests present, the prompts, the KV-cache
    pool and the running batch.

    The reference engine and the engines built on it (the fast engine) share these parts through
    this record's public fields rather than through each other's private members; decoders are
    not here because each engine keeps them its own way (a list; a served prefix and a queue).
    """

    jobs: dict[int, Job] = field(default_factory=dict)
    """The requests present, by id."""
    prefilling: list[Job] = field(default_factory=list)
    """The requests with prefill tokens left, in arrival order."""
    prefill_left_tokens: int = 0
    """The sum of their remaining prefill tokens."""
    free_blocks: int = 0
    """KV blocks free (memory-limited engines)."""
    resident: dict[int, Job] = field(default_factory=dict)
    """The requests holding KV blocks, by id."""
    running: list[tuple[Job, int]] | None = None
    """The running batch's (request, tokens) entries (prompt entries only in the fast engine,
    whose decoders are implicit); None while no batch runs."""
    batch_end_ms: float = math.inf
    """When the running batch (run of batches, in the fast engine) ends; inf while none runs."""
    blocked_since: float | None = None
    """When the policy last formed no batch although requests were present (None: not blocked)."""
    batch_count: int = 0
    """Batches started so far (the index of the next ``Batch`` record)."""


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """A batch the policy planned, checked against the batch rules and fitted into memory: the
    view it was planned from, its (request, tokens) entries in plan order, and its token counts."""

    view: EngineView
    entries: list[tuple[Job, int]]
    prefill_tokens: int
    decode_tokens: int

    @property
    def tokens(self) -> int:
        """Tokens in the batch."""
        return self.prefill_tokens + self.decode_tokens


class Engine:
    """One engine: a policy, a batch-time model (``t(n)`` ms, or a composition-aware model timing
    each batch's shape), a token budget, an optional per-batch request limit ``k_max`` and an
    optional KV-cache ``memory``. Reports to a ``Recorder`` if given.

    Memory is the engine's, not the policy's: policies plan as if memory were unlimited and the
    engine fits each plan into the cache (``_fit_memory``), as vLLM's block manager does.
    """

    def __init__(
        self,
        policy: PolicyFn,
        batch_time: BatchTime | ShapeTime,
        budget: int,
        k_max: int | None = None,
        *,
        recorder: Recorder | None = None,
        keep_batches: bool = False,
        memory: KVCache | None = None,
    ) -> None:
        if not isinstance(budget, int) or budget < 1:
            raise ConfigError("budget", budget, "must be an integer >= 1")
        if k_max is not None and (not isinstance(k_max, int) or k_max < 1):
            raise ConfigError("k_max", k_max, "must be an integer >= 1")
        if memory is not None and not isinstance(memory, KVCache):
            raise ConfigError("memory", memory, "must be a KVCache (see llmqueue.model.memory)")
        self.policy = policy
        self.batch_time = batch_time
        self.memory = memory
        self.shape_time: ShapeTimeFn | None = (
            batch_time.shape_time_ms if is_shape_model(batch_time) else None  # type: ignore[union-attr]
        )
        """The composition-aware time of a batch shape (None: batches are timed by ``t(n)``)."""
        self.budget = budget
        self.k_max = k_max
        self.recorder = recorder
        self.batches: list[Batch] | None = [] if keep_batches else None
        self.now_ms = 0.0
        self.backlog_tokens = 0
        self.state = EngineState(free_blocks=memory.total_blocks if memory is not None else 0)
        self._decoding: list[Job] = []
        self._seq = 0

    # -- state -------------------------------------------------------------------------------
    @property
    def in_system(self) -> int:
        """Requests present (waiting, prefilling or decoding)."""
        return len(self.state.jobs)

    @property
    def busy(self) -> bool:
        """Whether a batch is running."""
        return self.state.running is not None

    @property
    def blocked_since_ms(self) -> float | None:
        """When the engine last found requests waiting but the policy formed no batch (else None).

        A blocked engine stays idle until a new arrival; it is not an event of its own.
        """
        return self.state.blocked_since

    def jobs(self) -> list[Job]:
        """The requests present, in arrival order (read-only use)."""
        return sorted(self.state.jobs.values(), key=lambda j: j.seq)

    def view(self) -> EngineView:
        """The read-only view a policy gets."""
        return EngineView(
            now_ms=self.now_ms,
            budget=self.budget,
            k_max=self.k_max,
            prefilling=ReadOnlyList(self.state.prefilling),
            decoding=ReadOnlyList(self._decoding),
        )

    def next_event_ms(self) -> float:
        """Time of this engine's next event: a batch end, an immediate start, or inf if idle."""
        state = self.state
        if state.running is not None:
            return state.batch_end_ms
        if state.jobs and state.blocked_since is None:
            return self.now_ms
        return math.inf

    # -- events ------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Hand a request to the engine at its arrival time (not earlier than the engine's clock)."""
        if request.arrival_ms < self.now_ms:
            raise ConfigError(
                "arrival_ms", request.arrival_ms, f"is before the engine clock {self.now_ms} ms"
            )
        state = self.state
        if request.id in state.jobs:
            raise ConfigError("id", request.id, "a request with this id is already present")
        overdue = state.running is None and state.jobs and state.blocked_since is None
        if overdue and request.arrival_ms > self.now_ms:
            self.begin_batch()  # an overdue start at the engine's own clock comes first
        if state.running is None:
            if state.blocked_since is not None:
                if self.recorder is not None:
                    self.recorder.stall(request.arrival_ms - state.blocked_since)
                state.blocked_since = None
            self.now_ms = request.arrival_ms
        if self.memory is not None and not self.memory.fits_alone(
            request.context_tokens + request.prefill_tokens + request.decode_tokens
        ):
            if self.recorder is not None:  # vLLM refuses such a request too: its KV can never fit
                self.recorder.rejected()
            return
        job = Job(request, self._seq)
        self._seq += 1
        state.jobs[job.id] = job
        tokens = job.prefill_left + job.decode_left
        self.backlog_tokens += tokens
        if self.recorder is not None:
            self.recorder.arrival(request.arrival_ms, tokens)
        if job.prefill_left:
            state.prefill_left_tokens += job.prefill_left
            state.prefilling.append(job)
        else:
            self.enter_decode(job)

    def end_batch(self) -> list[RequestRecord]:
        """The first half of ``step``: end the running batch (if any) at its end time; returns
        the records of the requests that finished. A network routes them before ``start_batch``,
        so a request routed at a batch boundary joins the batch that starts there."""
        if self.state.running is None:
            return []
        self.now_ms = self.state.batch_end_ms
        return self._end_batch()

    def wake(self, t_ms: float) -> None:
        """Let a blocked engine ask its policy again at ``t_ms`` (a network calls this when the
        state a policy reads outside the engine changed, e.g. downstream buffers for
        max-pressure). The idle time since it blocked counts as stall."""
        state = self.state
        if state.running is None and state.blocked_since is not None and state.jobs and t_ms >= self.now_ms:
            if self.recorder is not None:
                self.recorder.stall(t_ms - state.blocked_since)
            state.blocked_since = None
            self.now_ms = t_ms

    def start_batch(self) -> None:
        """The second half of ``step``: start the next batch now, unless one is running."""
        if self.state.running is None:
            self.begin_batch()

    # -- what a network loop asks of every engine (llmqueue.sim.network) ----------------------------
    def completion_bound_ms(self) -> float:
        """No request finishes here before this time: the next event (a safe bound; the compiled
        engine gives a later one)."""
        return self.next_event_ms()

    def ends_at(self, t_ms: float) -> bool:
        """Whether the running batch (run of batches, for the fast engine) ends exactly at ``t_ms``."""
        state = self.state
        return state.running is not None and state.batch_end_ms == t_ms

    def start_at(self, t_ms: float) -> None:
        """``start_batch`` at the shared instant ``t_ms`` (the engine's clock is there already)."""
        self.start_batch()

    def step(self) -> list[RequestRecord]:
        """Process the next event: end the running batch (if any), then start the next one.

        Returns the records of the requests that finished at this event.
        """
        finished = self.end_batch()
        self.start_batch()
        return finished

    def _end_batch(self) -> list[RequestRecord]:
        now = self.now_ms
        state = self.state
        plan = state.running
        assert plan is not None
        state.running = None
        state.batch_end_ms = math.inf
        recorder = self.recorder
        intervals: dict[float, int] = {}  # inter-token latencies of this batch, counted
        finished: list[RequestRecord] = []
        prefill_done = False
        decode_done = False
        total = prefill_total = 0
        for job, tokens in plan:
            total += tokens
            job.cached += tokens
            if job.prefill_left:
                prefill_total += tokens
                job.prefill_left -= tokens
                if job.prefill_left == 0:
                    prefill_done = True
                    if job.first_token_ms != job.first_token_ms:  # NaN: not a recomputation
                        job.first_token_ms = now
                    job.last_token_ms = now
                    if job.decode_left:
                        self.enter_decode(job)
                    else:
                        finished.append(job.record(now))
            else:
                job.decode_left -= 1
                gap = now - job.last_token_ms
                intervals[gap] = intervals.get(gap, 0) + 1
                job.last_token_ms = now
                if job.decode_left == 0:
                    decode_done = True
                    finished.append(job.record(now))
        self.backlog_tokens -= total
        state.prefill_left_tokens -= prefill_total
        if recorder is not None:
            for gap, count in intervals.items():
                recorder.itl.add(gap, count)
            recorder.tokens_done(now, total)
        self.settle(finished, prefill_done, decode_done)
        return finished

    # -- the extension surface: what an engine built on this one (the fast engine) uses -------------
    # Hooks it replaces (``begin_batch``, ``enter_decode``, ``leave_decode``, ``decoders_in_order``)
    # and steps it reuses (``form_plan``, ``admit``, ``settle``, ``batch_duration_ms``), with the
    # shared ``state``. Not for callers driving an engine: they use the contract
    # (``llmqueue.engines.contract``).
    def enter_decode(self, job: Job) -> None:
        """A request starts decoding: it joins the decoders in arrival order."""
        insort(self._decoding, job, key=arrival_order)

    def settle(self, finished: list[RequestRecord], prefill_done: bool, decode_done: bool) -> None:
        """Drop finished phases from the phase lists and finished requests from the engine
        (freeing their KV blocks), and report the finished to the recorder."""
        state = self.state
        if prefill_done:
            state.prefilling = [j for j in state.prefilling if j.prefill_left]
        if decode_done:
            self._decoding = [j for j in self._decoding if j.decode_left]
        for record in finished:
            job = state.jobs.pop(record.id)
            if job.blocks:
                state.free_blocks += job.blocks
                job.blocks = 0
                del state.resident[job.id]
        if self.recorder is not None:
            for record in finished:
                self.recorder.request_done(record)

    def form_plan(self) -> BatchPlan | None:
        """Ask the policy for the next batch, check it and fit it into memory.

        None when nothing is present, or when the policy forms no batch (the engine blocks).
        With memory, a plan whose every entry memory refuses is asked for again with only the
        requests that hold KV blocks in view (vLLM then runs its running requests).
        """
        state = self.state
        if not state.jobs:
            return None
        view = self.view()
        plan = self.policy(view)
        if plan is None or (isinstance(plan, Mapping) and not plan):  # no batch: the engine blocks
            state.blocked_since = self.now_ms
            return None
        jobs = state.jobs
        prefill, decode = check_plan(plan, view, jobs)
        if self.memory is None:
            return BatchPlan(view, [(jobs[rid], tokens) for rid, tokens in plan.items()], prefill, decode)
        entries = self._fit_memory(plan)
        if not entries and state.resident:
            resident = self._resident_view(view)
            plan = self.policy(resident)
            if plan:
                check_plan(plan, resident, jobs)
                entries = self._fit_memory(plan)
        if not entries:
            state.blocked_since = self.now_ms
            return None
        prefill = sum(tokens for job, tokens in entries if job.prefill_left)
        return BatchPlan(view, entries, prefill, sum(1 for job, _ in entries if not job.prefill_left))

    def _resident_view(self, view: EngineView) -> EngineView:
        """``view`` without the requests that hold no KV blocks."""
        return EngineView(
            now_ms=view.now_ms,
            budget=view.budget,
            k_max=view.k_max,
            prefilling=ReadOnlyList([j for j in self.state.prefilling if j.blocks]),
            decoding=ReadOnlyList([j for j in self.decoders_in_order() if j.blocks]),
        )

    def decoders_in_order(self) -> list[Job]:
        """All decoding requests in arrival order."""
        return self._decoding

    def _fit_memory(self, plan: Mapping[int, int]) -> list[tuple[Job, int]]:
        """The part of ``plan`` that memory allows, allocating its blocks (vLLM's rules).

        Requests already holding blocks come first, in plan order: each grows by the blocks its
        tokens need; when none are free, the newest resident request is preempted (it frees its
        blocks and must recompute its whole context later), possibly itself. Then new requests,
        in plan order, are admitted while their first chunk leaves the watermark free; the first
        refusal stops admission (FCFS head of line), and a round that preempted admits nobody.
        """
        memory = self.memory
        assert memory is not None
        state = self.state
        jobs = state.jobs
        kept: list[tuple[Job, int]] = []
        fresh: list[tuple[Job, int]] = []
        resident: list[tuple[Job, int]] = []
        for rid, tokens in plan.items():
            job = jobs[rid]
            (resident if job.blocks else fresh).append((job, tokens))
        preempted: set[int] = set()
        for job, tokens in resident:
            need = memory.blocks_for(job.cached + tokens) - job.blocks
            while job.id not in preempted and need > state.free_blocks:
                victim = max(state.resident.values(), key=arrival_order)
                self._preempt(victim)
                preempted.add(victim.id)
                kept = [(j, t) for j, t in kept if j is not victim]
            if job.id in preempted:
                continue
            job.blocks += need
            state.free_blocks -= need
            kept.append((job, tokens))
        if not preempted:  # vLLM admits no new request in a step that preempted one
            kept.extend(self.admit(fresh))
        if len(kept) > 1:
            order = {rid: i for i, rid in enumerate(plan)}
            kept.sort(key=lambda entry: order[entry[0].id])
        return kept

    def admit(self, fresh: list[tuple[Job, int]]) -> list[tuple[Job, int]]:
        """Admit new requests in plan order while the blocks of their first chunk (with the context
        they bring) leave the watermark free; the first refusal stops admission (FCFS head of
        line). Returns the admitted."""
        memory = self.memory
        assert memory is not None
        state = self.state
        admitted: list[tuple[Job, int]] = []
        for job, tokens in fresh:
            need = memory.blocks_for(job.cached + tokens)
            if state.free_blocks - need < memory.watermark_blocks:
                break
            job.blocks = need
            state.free_blocks -= need
            state.resident[job.id] = job
            admitted.append((job, tokens))
        return admitted

    def _preempt(self, job: Job) -> None:
        """Recompute preemption: ``job`` frees its blocks and must prefill its whole context
        again (prompt and decoded tokens) before it decodes on."""
        decoding = not job.prefill_left
        if decoding:
            self.leave_decode(job)
        state = self.state
        state.free_blocks += job.blocks
        job.blocks = 0
        del state.resident[job.id]
        lost = job.cached
        job.cached = 0
        if decoding:
            insort(state.prefilling, job, key=arrival_order)
        job.prefill_left += lost
        state.prefill_left_tokens += lost
        self.backlog_tokens += lost
        if self.recorder is not None:
            self.recorder.preempted(self.now_ms, lost)

    def leave_decode(self, job: Job) -> None:
        """A decoding request is preempted: it leaves the decoders (it prefills again)."""
        self._decoding.remove(job)

    def batch_duration_ms(self, n: int, entries: list[tuple[Job, int]] | None = None) -> float:
        """The batch's time in ms (``t(n)``, or the shape model's time of ``entries``), refused
        unless positive and finite (a run must always move forward)."""
        if self.shape_time is not None and entries is not None:
            duration = self.shape_time(batch_shape(entries))
        else:
            duration = self.batch_time(n)  # type: ignore[operator]
        if not duration > 0 or math.isinf(duration):
            raise ConfigError("batch-time", duration, f"t({n}) must be a positive finite time")
        return duration

    def stop(self, horizon_ms: float) -> None:
        """The run ends at ``horizon_ms``: nothing to do here (each batch is booked as it starts)."""

    def begin_batch(self) -> None:
        """Form the next batch and start it now (the engine is idle): the hook that
        ``start_batch`` and an overdue start in ``submit`` call, which engines built on this one
        replace with their own way of starting batches."""
        planned = self.form_plan()
        if planned is None:
            return
        state = self.state
        entries, prefill, decode = planned.entries, planned.prefill_tokens, planned.decode_tokens
        n = prefill + decode
        duration = self.batch_duration_ms(n, entries)
        target = fill_target(planned.view, state.prefill_left_tokens)
        state.running = entries
        state.batch_end_ms = self.now_ms + duration
        if self.recorder is not None:
            short = max(target - n, 0)
            self.recorder.batches(1, duration, prefill, decode, len(entries), (target, int(short > 0), short))
            if self.memory is not None:
                total = self.memory.total_blocks
                self.recorder.kv_used(total - state.free_blocks, total)
        if self.batches is not None:
            self.batches.append(
                Batch(
                    index=self.state.batch_count,
                    start_ms=self.now_ms,
                    end_ms=self.state.batch_end_ms,
                    plan=tuple((job.id, tokens) for job, tokens in entries),
                    prefill_tokens=prefill,
                    decode_tokens=decode,
                    fill_target_tokens=target,
                )
            )
        self.state.batch_count += 1


def arrival_order(job: Job) -> int:
    return job.seq


def batch_shape(entries: Sequence[tuple[Job, int]]) -> BatchShape:
    """The shape of a batch of (request, tokens) entries, from the requests' progress."""
    chunks: list[int] = []
    prefixes: list[int] = []
    decode = kv = rows = 0
    for job, tokens in entries:
        if job.prefill_left:
            chunks.append(tokens)
            prefixes.append(job.cached)
            if tokens == job.prefill_left:
                rows += 1
        else:
            decode += 1
            kv += job.cached + 1
    return BatchShape(
        prefill_tokens=sum(chunks),
        decode_tokens=decode,
        chunk_tokens=tuple(chunks),
        chunk_prefix_tokens=tuple(prefixes),
        decode_kv_tokens=kv,
        logit_rows=rows + decode,
    )
