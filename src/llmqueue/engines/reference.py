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
from dataclasses import dataclass
from typing import TypeVar, overload

from llmqueue.engines.metrics import Recorder, RequestRecord
from llmqueue.errors import ConfigError, PlanError
from llmqueue.model.batchtime import BatchShape, BatchTime, ShapeTime, is_shape_model
from llmqueue.model.memory import KVCache
from llmqueue.model.workload import Request
from llmqueue.policies.view import EngineView

PolicyFn = Callable[[EngineView], Mapping[int, int]]
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
        self.cached = 0  # tokens whose KV this request holds (prompt, then one per decoded token)
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
        self._shape_time = batch_time.shape_time_ms if is_shape_model(batch_time) else None  # type: ignore[union-attr]
        self._free_blocks = memory.total_blocks if memory is not None else 0
        self._resident: dict[int, Job] = {}  # requests holding KV blocks, by id
        self.budget = budget
        self.k_max = k_max
        self.recorder = recorder
        self.batches: list[Batch] | None = [] if keep_batches else None
        self.now_ms = 0.0
        self.backlog_tokens = 0
        self._prefill_left_tokens = 0
        self._jobs: dict[int, Job] = {}
        self._prefilling: list[Job] = []
        self._decoding: list[Job] = []
        self._seq = 0
        self._plan: list[tuple[Job, int]] | None = None
        self._batch_end_ms = math.inf
        self._blocked_since: float | None = None
        self._batch_count = 0

    # -- state -------------------------------------------------------------------------------
    @property
    def in_system(self) -> int:
        """Requests present (waiting, prefilling or decoding)."""
        return len(self._jobs)

    @property
    def busy(self) -> bool:
        """Whether a batch is running."""
        return self._plan is not None

    @property
    def blocked_since_ms(self) -> float | None:
        """When the engine last found requests waiting but the policy formed no batch (else None).

        A blocked engine stays idle until a new arrival; it is not an event of its own.
        """
        return self._blocked_since

    def jobs(self) -> list[Job]:
        """The requests present, in arrival order (read-only use)."""
        return sorted(self._jobs.values(), key=lambda j: j.seq)

    def view(self) -> EngineView:
        """The read-only view a policy gets."""
        return EngineView(
            now_ms=self.now_ms,
            budget=self.budget,
            k_max=self.k_max,
            prefilling=ReadOnlyList(self._prefilling),
            decoding=ReadOnlyList(self._decoding),
        )

    def next_event_ms(self) -> float:
        """Time of this engine's next event: a batch end, an immediate start, or inf if idle."""
        if self._plan is not None:
            return self._batch_end_ms
        if self._jobs and self._blocked_since is None:
            return self.now_ms
        return math.inf

    # -- events ------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Hand a request to the engine at its arrival time (not earlier than the engine's clock)."""
        if request.arrival_ms < self.now_ms:
            raise ConfigError(
                "arrival_ms", request.arrival_ms, f"is before the engine clock {self.now_ms} ms"
            )
        if request.id in self._jobs:
            raise ConfigError("id", request.id, "a request with this id is already present")
        overdue = self._plan is None and self._jobs and self._blocked_since is None
        if overdue and request.arrival_ms > self.now_ms:
            self._start_batch()  # an overdue start at the engine's own clock comes first
        if self._plan is None:
            if self._blocked_since is not None:
                if self.recorder is not None:
                    self.recorder.stall(request.arrival_ms - self._blocked_since)
                self._blocked_since = None
            self.now_ms = request.arrival_ms
        if self.memory is not None and not self.memory.fits_alone(
            request.prefill_tokens + request.decode_tokens
        ):
            if self.recorder is not None:  # vLLM refuses such a request too: its KV can never fit
                self.recorder.rejected()
            return
        job = Job(request, self._seq)
        self._seq += 1
        self._jobs[job.id] = job
        tokens = job.prefill_left + job.decode_left
        self.backlog_tokens += tokens
        if self.recorder is not None:
            self.recorder.arrival(request.arrival_ms, tokens)
        if job.prefill_left:
            self._prefill_left_tokens += job.prefill_left
            self._prefilling.append(job)
        else:
            self._enter_decode(job)

    def end_batch(self) -> list[RequestRecord]:
        """The first half of ``step``: end the running batch (if any) at its end time; returns
        the records of the requests that finished. A network routes them before ``start_batch``,
        so a request routed at a batch boundary joins the batch that starts there."""
        if self._plan is None:
            return []
        self.now_ms = self._batch_end_ms
        return self._end_batch()

    def wake(self, t_ms: float) -> None:
        """Let a blocked engine ask its policy again at ``t_ms`` (a network calls this when the
        state a policy reads outside the engine changed, e.g. downstream buffers for
        max-pressure). The idle time since it blocked counts as stall."""
        if self._plan is None and self._blocked_since is not None and self._jobs and t_ms >= self.now_ms:
            if self.recorder is not None:
                self.recorder.stall(t_ms - self._blocked_since)
            self._blocked_since = None
            self.now_ms = t_ms

    def start_batch(self) -> None:
        """The second half of ``step``: start the next batch now, unless one is running."""
        if self._plan is None:
            self._start_batch()

    # -- what a network loop asks of every engine (llmqueue.sim.network) ----------------------------
    def completion_bound_ms(self) -> float:
        """No request finishes here before this time: the next event (a safe bound; the compiled
        engine gives a later one)."""
        return self.next_event_ms()

    def ends_at(self, t_ms: float) -> bool:
        """Whether the running batch (run of batches, for the fast engine) ends exactly at ``t_ms``."""
        return self._plan is not None and self._batch_end_ms == t_ms

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
        plan = self._plan
        assert plan is not None
        self._plan = None
        self._batch_end_ms = math.inf
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
                        self._enter_decode(job)
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
        self._prefill_left_tokens -= prefill_total
        if recorder is not None:
            for gap, count in intervals.items():
                recorder.itl.add(gap, count)
            recorder.tokens_done(now, total)
        self._settle(finished, prefill_done, decode_done)
        return finished

    def _enter_decode(self, job: Job) -> None:
        """A request starts decoding: it joins the decoders in arrival order."""
        insort(self._decoding, job, key=_seq)

    def _settle(self, finished: list[RequestRecord], prefill_done: bool, decode_done: bool) -> None:
        """Drop finished phases from the phase lists and finished requests from the engine."""
        if prefill_done:
            self._prefilling = [j for j in self._prefilling if j.prefill_left]
        if decode_done:
            self._decoding = [j for j in self._decoding if j.decode_left]
        for record in finished:
            job = self._jobs.pop(record.id)
            if job.blocks:
                self._free_blocks += job.blocks
                job.blocks = 0
                del self._resident[job.id]
        if self.recorder is not None:
            for record in finished:
                self.recorder.request_done(record)

    def _form_plan(self) -> tuple[EngineView, list[tuple[Job, int]], int, int] | None:
        """Ask the policy for the next batch, check it and fit it into memory: (view, entries,
        prefill, decode tokens).

        None when nothing is present, or when the policy forms no batch (the engine blocks).
        With memory, a plan whose every entry memory refuses is asked for again with only the
        requests that hold KV blocks in view (vLLM then runs its running requests).
        """
        if not self._jobs:
            return None
        view = self.view()
        plan = self.policy(view)
        if plan is None or (isinstance(plan, Mapping) and not plan):  # no batch: the engine blocks
            self._blocked_since = self.now_ms
            return None
        prefill, decode = check_plan(plan, view, self._jobs)
        jobs = self._jobs
        if self.memory is None:
            return view, [(jobs[rid], tokens) for rid, tokens in plan.items()], prefill, decode
        entries = self._fit_memory(plan)
        if not entries and self._resident:
            resident = self._resident_view(view)
            plan = self.policy(resident)
            if plan:
                check_plan(plan, resident, jobs)
                entries = self._fit_memory(plan)
        if not entries:
            self._blocked_since = self.now_ms
            return None
        prefill = sum(tokens for job, tokens in entries if job.prefill_left)
        return view, entries, prefill, sum(1 for job, _ in entries if not job.prefill_left)

    def _resident_view(self, view: EngineView) -> EngineView:
        """``view`` without the requests that hold no KV blocks."""
        return EngineView(
            now_ms=view.now_ms,
            budget=view.budget,
            k_max=view.k_max,
            prefilling=ReadOnlyList([j for j in self._prefilling if j.blocks]),
            decoding=ReadOnlyList([j for j in self._decoders_in_order() if j.blocks]),
        )

    def _decoders_in_order(self) -> list[Job]:
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
        jobs = self._jobs
        kept: list[tuple[Job, int]] = []
        fresh: list[tuple[Job, int]] = []
        resident: list[tuple[Job, int]] = []
        for rid, tokens in plan.items():
            job = jobs[rid]
            (resident if job.blocks else fresh).append((job, tokens))
        preempted: set[int] = set()
        for job, tokens in resident:
            need = memory.blocks_for(job.cached + tokens) - job.blocks
            while job.id not in preempted and need > self._free_blocks:
                victim = max(self._resident.values(), key=_seq)
                self._preempt(victim)
                preempted.add(victim.id)
                kept = [(j, t) for j, t in kept if j is not victim]
            if job.id in preempted:
                continue
            job.blocks += need
            self._free_blocks -= need
            kept.append((job, tokens))
        if not preempted:  # vLLM admits no new request in a step that preempted one
            kept.extend(self._admit(fresh))
        if len(kept) > 1:
            order = {rid: i for i, rid in enumerate(plan)}
            kept.sort(key=lambda entry: order[entry[0].id])
        return kept

    def _admit(self, fresh: list[tuple[Job, int]]) -> list[tuple[Job, int]]:
        """Admit new requests in plan order while the blocks of their first chunk leave the
        watermark free; the first refusal stops admission (FCFS head of line). Returns the admitted."""
        memory = self.memory
        assert memory is not None
        admitted: list[tuple[Job, int]] = []
        for job, tokens in fresh:
            need = memory.blocks_for(tokens)
            if self._free_blocks - need < memory.watermark_blocks:
                break
            job.blocks = need
            self._free_blocks -= need
            self._resident[job.id] = job
            admitted.append((job, tokens))
        return admitted

    def _preempt(self, job: Job) -> None:
        """Recompute preemption: ``job`` frees its blocks and must prefill its whole context
        again (prompt and decoded tokens) before it decodes on."""
        decoding = not job.prefill_left
        if decoding:
            self._leave_decode(job)
        self._free_blocks += job.blocks
        job.blocks = 0
        del self._resident[job.id]
        lost = job.cached
        job.cached = 0
        if decoding:
            insort(self._prefilling, job, key=_seq)
        job.prefill_left += lost
        self._prefill_left_tokens += lost
        self.backlog_tokens += lost
        if self.recorder is not None:
            self.recorder.preempted(self.now_ms, lost)

    def _leave_decode(self, job: Job) -> None:
        """A decoding request is preempted: it leaves the decoders (it prefills again)."""
        self._decoding.remove(job)

    def _duration(self, n: int, entries: list[tuple[Job, int]] | None = None) -> float:
        """The batch's time in ms (``t(n)``, or the shape model's time of ``entries``), refused
        unless positive and finite (a run must always move forward)."""
        if self._shape_time is not None and entries is not None:
            duration = self._shape_time(batch_shape(entries))
        else:
            duration = self.batch_time(n)  # type: ignore[operator]
        if not duration > 0 or math.isinf(duration):
            raise ConfigError("batch-time", duration, f"t({n}) must be a positive finite time")
        return duration

    def stop(self, horizon_ms: float) -> None:
        """The run ends at ``horizon_ms``: nothing to do here (each batch is booked as it starts)."""

    def _start_batch(self) -> None:
        formed = self._form_plan()
        if formed is None:
            return
        view, entries, prefill, decode = formed
        n = prefill + decode
        duration = self._duration(n, entries)
        target = fill_target(view, self._prefill_left_tokens)
        self._plan = entries
        self._batch_end_ms = self.now_ms + duration
        if self.recorder is not None:
            short = max(target - n, 0)
            self.recorder.batches(1, duration, prefill, decode, len(entries), (target, int(short > 0), short))
            if self.memory is not None:
                self.recorder.kv_used(self.memory.total_blocks - self._free_blocks, self.memory.total_blocks)
        if self.batches is not None:
            self.batches.append(
                Batch(
                    index=self._batch_count,
                    start_ms=self.now_ms,
                    end_ms=self._batch_end_ms,
                    plan=tuple((job.id, tokens) for job, tokens in entries),
                    prefill_tokens=prefill,
                    decode_tokens=decode,
                    fill_target_tokens=target,
                )
            )
        self._batch_count += 1


def _seq(job: Job) -> int:
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
