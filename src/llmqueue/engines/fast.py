"""The fast engine: exact dynamics that advance runs of identical iterations in one step.

Between two events (an arrival, a prompt finishing, a request finishing, a prompt's remaining
tokens dropping below its chunk) the shipped schedulers form the same plan at every boundary, so
the engine asks the policy once, works out how many iterations ``k`` that plan repeats, and books
all ``k`` at once: batch end times by the same sequence of float additions as the reference
engine (so times agree to the bit), inter-token latencies, backlog integrals, batch statistics and
the work-conservation audit, each in closed form over the ``k`` iterations. An arrival inside such
a run cuts it at the first boundary after the arrival, exactly where the reference engine would
form a new plan. See docs/fastpath.md for why this is exact and what it costs.

A policy opts in with ``repeats_plan = True`` and a compact planner ``plan_compact`` (see
``llmqueue.policies.view``); ``simulate`` runs every other policy on the reference engine.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from heapq import heappop, heappush, merge
from itertools import accumulate, repeat

import numpy as np

from llmqueue.engines.metrics import RequestRecord
from llmqueue.engines.reference import Batch, Engine, Job, ReadOnlyList, arrival_order
from llmqueue.errors import ConfigError, PlanError
from llmqueue.model.batchtime import BatchShape
from llmqueue.model.workload import Request
from llmqueue.policies.view import CompactPlan, CompactView, EngineView, policy_name

MAX_REPEAT = 1 << 16
"""Most iterations booked in one step (bounds the per-step lists; longer runs take more steps)."""

SHAPE_REPEAT = 32
"""Most iterations in one step with a composition-aware batch time: each repeat is timed from
its own shape (contexts grow), so a step costs one model call per repeat, and an arrival that
cuts the run early wastes the rest."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class LinearTargets:
    """Fill targets ``min(b, A - X j)`` of repeats ``j = 0, 1, ...`` (no binding ``k_max``): only
    the planned prompts' remaining tokens change, by ``X`` per iteration. Audited in closed form."""

    __slots__ = ("base", "budget", "offset", "per_iteration")

    def __init__(self, budget: int, base: int, per_iteration: int) -> None:
        self.budget = budget
        self.base = base
        self.per_iteration = per_iteration
        self.offset = 0

    def _sum(self, lo: int, hi: int) -> int:
        """Sum of the targets of repeats lo..hi-1."""
        if hi <= lo:
            return 0
        b, a, x = self.budget, self.base, self.per_iteration
        split = self._first_at_most(b, lo, hi)  # before it the budget binds
        count = hi - split
        return b * (split - lo) + a * count - x * (count * (split + hi - 1) // 2)

    def _first_at_most(self, n: int, lo: int, hi: int) -> int:
        """First repeat in [lo, hi) whose ``A - X j`` is at most n (hi if none)."""
        if self.per_iteration == 0:
            return hi if self.base > n else lo
        return min(hi, max(lo, _ceil_div(self.base - n, self.per_iteration)))

    def audit(self, m: int, n: int) -> tuple[int, int, int]:
        """(target sum, batches short of target, tokens short) for the next ``m`` repeats of n."""
        lo, hi = self.offset, self.offset + m
        self.offset = hi
        total = self._sum(lo, hi)
        if self.budget <= n:
            return total, 0, 0
        short_hi = self._first_at_most(n, lo, hi)
        count = short_hi - lo
        return total, count, self._sum(lo, short_hi) - n * count

    def values(self, m: int) -> list[int]:
        """The next ``m`` targets (for batch records)."""
        b, a, x, j = self.budget, self.base, self.per_iteration, self.offset
        return [min(b, a - x * i) for i in range(j, j + m)]


class ListTargets:
    """Fill targets given one per repeat (a binding ``k_max``)."""

    __slots__ = ("offset", "targets")

    def __init__(self, targets: list[int]) -> None:
        self.targets = targets
        self.offset = 0

    def audit(self, m: int, n: int) -> tuple[int, int, int]:
        """(target sum, batches short of target, tokens short) for the next ``m`` repeats of n."""
        chunk = self.targets[self.offset : self.offset + m]
        self.offset += m
        short = [t - n for t in chunk if t > n]
        return sum(chunk), len(short), sum(short)

    def values(self, m: int) -> list[int]:
        """The next ``m`` targets (for batch records)."""
        return self.targets[self.offset : self.offset + m]


def fill_targets(
    budget: int,
    k_max: int | None,
    prefilling: Sequence[Job],
    decoders: int,
    entries: list[tuple[Job, int]],
    prefill_left_tokens: int,
    k: int,
) -> LinearTargets | ListTargets:
    """The work-conservation fill targets of ``k`` repeats of a plan (see
    ``llmqueue.engines.reference.fill_target``): only the planned prompts' remaining tokens change over the
    repeats, by their chunk per iteration."""
    if k_max is None or len(prefilling) + decoders <= k_max:
        per_iteration = sum(tokens for _, tokens in entries)
        return LinearTargets(budget, prefill_left_tokens + decoders, per_iteration)
    # Top-k_max demands: the planned prompts shrink, the rest (other prompts, decoders at 1) stay.
    planned = {id(job) for job, _ in entries}
    # Cheap case first: any k_max requests whose demand fills the budget even at the last repeat
    # bound the top-k_max demand from below, so every target is then the budget.
    lower = sum(job.prefill_left - tokens * (k - 1) for job, tokens in entries)
    slots = k_max - len(entries)
    for r in prefilling:
        if lower >= budget or slots <= 0:
            break
        if id(r) not in planned:
            lower += r.prefill_left
            slots -= 1
    if lower + min(max(slots, 0), decoders) >= budget:
        return LinearTargets(budget, budget, 0)
    j = np.arange(k, dtype=np.int64)
    constant = sorted(
        [r.prefill_left for r in prefilling if id(r) not in planned] + [1] * decoders,
        reverse=True,
    )
    best_constant = np.concatenate(([0], np.cumsum(constant, dtype=np.int64)))
    left = np.array([job.prefill_left for job, _ in entries], dtype=np.int64).reshape(-1, 1)
    chunk = np.array([tokens for _, tokens in entries], dtype=np.int64).reshape(-1, 1)
    shrinking = left - chunk * j[None, :]
    best_shrinking = np.vstack(
        [np.zeros(k, dtype=np.int64), np.cumsum(-np.sort(-shrinking, axis=0), axis=0)]
    )
    top = np.zeros(k, dtype=np.int64)
    for t in range(min(len(entries), k_max) + 1):
        rest = min(k_max - t, len(constant))
        top = np.maximum(top, best_shrinking[t] + best_constant[rest])
    return ListTargets(np.minimum(budget, top).tolist())


class _Growth:
    """Blocks that iterations 1..i of a run of repeats allocate beyond its first (monotone in i).

    A planned prompt with ``c`` cached tokens taking ``t`` a repeat holds ``ceil((c + (i + 1) t) /
    block)`` blocks after repeat i. A served decoder needs a new block at each repeat that starts
    with its cached tokens a multiple of the block, so the decoders' needs repeat with period
    ``block``: ``per_step[j]`` of them need one at repeat j of each period.
    """

    __slots__ = ("block", "first", "period", "prefix", "prompts")

    def __init__(self, block: int, prompts: list[tuple[int, int]], per_step: list[int]) -> None:
        self.block = block
        self.prompts = [(c, t, _ceil_div(c + t, block)) for c, t in prompts]
        self.prefix = [0, *accumulate(per_step)]
        self.period = self.prefix[-1]
        self.first = per_step[0]

    def at(self, i: int) -> int:
        """Blocks allocated by repeats 1..i."""
        b, n = self.block, i + 1
        total = (n // b) * self.period + self.prefix[n % b] - self.first
        for c, t, base in self.prompts:
            total += _ceil_div(c + n * t, b) - base
        return total

    def many(self, lo: int, hi: int) -> list[int]:
        """``at(i)`` for i in [lo, hi)."""
        if hi - lo <= 64:
            return [self.at(i) for i in range(lo, hi)]
        n = np.arange(lo + 1, hi + 1, dtype=np.int64)
        b = self.block
        total = (n // b) * self.period + np.array(self.prefix, dtype=np.int64)[n % b] - self.first
        for c, t, base in self.prompts:
            total += -(-(c + n * t) // b) - base
        return total.tolist()

    def repeats_within(self, free: int, k: int) -> int:
        """Most repeats (1..k) whose growth fits in ``free`` blocks (the next would preempt)."""
        if self.at(k - 1) <= free:
            return k
        lo, hi = 0, k - 1  # at(lo) <= free < at(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.at(mid) <= free:
                lo = mid
            else:
                hi = mid
        return lo + 1


@dataclass(frozen=True, slots=True)
class CompactBatch:
    """A batch the fast engine planned: the prompts' (request, tokens) entries in plan order,
    how many of the oldest decoders (or, after a fitted plan, which: the served ones) take a
    token, whether the decoders come first in the plan, and whether it was fitted request by
    request with the reference rules (it then runs as a single repeat)."""

    prompts: list[tuple[Job, int]]
    decoders: int
    decode_first: bool
    fitted: bool


class FastEngine(Engine):
    """An ``Engine`` that books each run of identical iterations in one step (same results).

    Decoders are kept implicit. The shipped policies give decode tokens to the oldest ``L``
    decoders (a compact plan), so the engine keeps those ``L`` as the *served prefix*, counts how
    often the whole prefix got a token, and finds the next decoder to finish with a heap keyed by
    that count. A run of repeats then costs O(prompts in the plan + decoders that join, leave or
    finish), not O(decoders). The policy must provide ``plan_compact`` and ``repeats_plan``.

    With a KV cache the served decoders' blocks are booked lazily too: they are counted by their
    phase within a block, so the blocks a run allocates are known in closed form and a run ends
    before the first repeat that would preempt. A plan that preempts, or that serves a decoder
    holding no blocks, is fitted request by request with the reference rules (one repeat).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        planner = getattr(self.policy, "plan_compact", None)
        if planner is None or needs_reference(self.policy):
            raise ConfigError(
                "engine", "fast",
                f"policy '{policy_name(self.policy)}' does not provide plan_compact/repeats_plan",
            )
        self._planner = planner
        self._served: list[Job] = []  # the served prefix of the decoders, arrival order
        self._waiting: deque[Job] = deque()  # the other decoders, arrival order
        self._finish_heap: list[tuple[int, int, int, Job]] = []
        self._serves = 0  # how many times the served prefix got a token
        self._served_ms = 0.0  # when it last did
        self._last_tokens: dict[float, int] = {}  # last-token times in the served prefix
        self._decoders = 0
        self._prompts: list[tuple[Job, int]] = []
        self._decode_first = True
        self._stopped = False
        # KV cache (memory-limited engines only)
        self._block = self.memory.block_tokens if self.memory is not None else 0
        self._phases = [0] * self._block  # served decoders by (cached - c0) mod block
        self._uncached = 0  # decoders that hold no blocks (no prompt): fitted request by request
        self._irregular = False  # the served decoders are not the oldest ones (after a fitted plan)
        self._growth: _Growth | None = None  # the running run's block growth
        self._run_done = 0  # repeats of the running run booked so far
        self._run_used = 0  # blocks held during its first repeat
        # composition-aware batch times: each repeat's own time, and the served decoders' context
        self._durations: list[float] | None = None
        self._served_context = 0  # sum of (cached - c0) over the served prefix

    # -- decoders kept implicit ----------------------------------------------------------------
    def _sync(self, job: Job) -> None:
        """Write a served decoder's counts back into its record (decode_left, cached, blocks,
        last token)."""
        if self._serves > job.c0:
            delta = self._serves - job.c0
            job.decode_left -= delta
            job.cached += delta
            if self._block:
                job.blocks = _ceil_div(job.cached, self._block)
            job.last_token_ms = self._served_ms
            job.c0 = self._serves

    def _serve(self, count: int) -> None:
        """Make the served prefix exactly the oldest ``count`` decoders."""
        served, last = self._served, self._last_tokens
        while len(served) > count:
            job = served.pop()
            self._sync(job)
            job.activation += 1
            if self._block:
                self._phases[(job.cached - job.c0) % self._block] -= 1
            self._served_context -= job.cached - job.c0
            last[job.last_token_ms] -= 1
            if not last[job.last_token_ms]:
                del last[job.last_token_ms]
            self._waiting.appendleft(job)
        while len(served) < count:
            job = self._waiting.popleft()
            self._join(job)
            served.append(job)

    def _join(self, job: Job) -> None:
        """Book a decoder into the served prefix (the caller appends it to ``_served``)."""
        job.c0 = self._serves
        job.activation += 1
        last = self._last_tokens
        last[job.last_token_ms] = last.get(job.last_token_ms, 0) + 1
        heappush(self._finish_heap, (self._serves + job.decode_left, job.seq, job.activation, job))
        self._served_context += job.cached - job.c0
        if self._block:
            self._phases[(job.cached - job.c0) % self._block] += 1

    def _unserve_all(self) -> None:
        """Sync every served decoder and queue all decoders in arrival order again."""
        served = self._served
        for job in served:
            self._sync(job)
            job.activation += 1
        if self._irregular:
            self._waiting = deque(merge(served, self._waiting, key=arrival_order))
            self._irregular = False
        else:
            self._waiting.extendleft(reversed(served))
        self._served, self._last_tokens, self._finish_heap = [], {}, []
        self._phases = [0] * self._block
        self._served_context = 0

    def _serve_exactly(self, jobs: list[Job]) -> None:
        """Make ``jobs`` (arrival order) the served decoders, whichever they are (after a fitted
        plan; the arrival order is restored when the batch is booked)."""
        chosen = {id(job) for job in jobs}
        self._waiting = deque(job for job in self._waiting if id(job) not in chosen)
        for job in jobs:
            self._join(job)
        self._served = list(jobs)
        self._irregular = True

    def _next_finish(self) -> int:
        """The serve count at which the next served decoder finishes."""
        heap = self._finish_heap
        while heap[0][2] != heap[0][3].activation:
            heappop(heap)
        return heap[0][0]

    def enter_decode(self, job: Job) -> None:
        """A request starts decoding: it joins the waiting decoders (the newest, usually; an
        older one, without a prompt, rebuilds the arrival order)."""
        newest = self._waiting[-1] if self._waiting else (self._served[-1] if self._served else None)
        if newest is None or job.seq > newest.seq:
            self._waiting.append(job)
        else:  # an older request starts decoding (it had no prompt): rebuild the order
            for other in self._served:
                self._sync(other)
                other.activation += 1
            everyone = [*self._served, *self._waiting]
            insort(everyone, job, key=arrival_order)
            self._served, self._waiting = [], deque(everyone)
            self._last_tokens, self._finish_heap = {}, []
            self._phases = [0] * self._block
            self._served_context = 0
        self._decoders += 1
        if self._block and not job.blocks:
            self._uncached += 1

    def decoders_in_order(self) -> list[Job]:
        """All decoding requests in arrival order."""
        if self._irregular:
            return list(merge(self._served, self._waiting, key=arrival_order))
        return [*self._served, *self._waiting]

    def view(self) -> EngineView:
        """The read-only view of the reference engine (built on demand: O(requests))."""
        for job in self._served:
            self._sync(job)
        return EngineView(
            now_ms=self.now_ms,
            budget=self.budget,
            k_max=self.k_max,
            prefilling=ReadOnlyList(self.state.prefilling),
            decoding=ReadOnlyList(self.decoders_in_order()),
        )

    def leave_decode(self, job: Job) -> None:
        """A decoder is preempted while a plan is fitted (the served ones are synced then)."""
        waiting, served = self._waiting, self._served
        if waiting and waiting[-1] is job:  # the newest decoder, usually
            waiting.pop()
        elif any(other is job for other in served):
            served.remove(job)
            self._phases[(job.cached - job.c0) % self._block] -= 1
            self._served_context -= job.cached - job.c0
            last = self._last_tokens
            last[job.last_token_ms] -= 1
            if not last[job.last_token_ms]:
                del last[job.last_token_ms]
            job.activation += 1
        else:
            waiting.remove(job)
        self._decoders -= 1

    # -- planning --------------------------------------------------------------------------------
    def _check(self, plan: CompactPlan) -> list[tuple[Job, int]]:
        """The batch rules for a compact plan; returns the planned prompts as (job, tokens)."""
        if not isinstance(plan.decoders, int) or not 0 <= plan.decoders <= self._decoders:
            raise PlanError(
                "known request", f"{plan.decoders!r} decoders planned, {self._decoders} decoding"
            )
        entries: list[tuple[Job, int]] = []
        seen: set[int] = set()
        prefill = 0
        for rid, tokens in plan.prompts:
            job = self.state.jobs.get(rid)
            if job is None or rid in seen:
                raise PlanError("known request", f"request {rid!r} is not a prompt in the engine")
            seen.add(rid)
            if not isinstance(tokens, int) or tokens < 1:
                raise PlanError("positive tokens", f"request {rid} given {tokens!r} tokens")
            if tokens > job.prefill_left:
                raise PlanError(
                    "prefill before decode",
                    f"request {rid} has {job.prefill_left} prefill tokens left, given {tokens}",
                )
            entries.append((job, tokens))
            prefill += tokens
        if self.k_max is not None and plan.decoders + len(entries) > self.k_max:
            raise PlanError(
                "batch-size limit", f"{plan.decoders + len(entries)} requests > k_max={self.k_max}"
            )
        if prefill + plan.decoders > self.budget:
            raise PlanError(
                "token budget", f"{prefill + plan.decoders} tokens > budget={self.budget}"
            )
        return entries

    def _compact_view(self, resident_only: bool = False) -> CompactView:
        """The compact view a planner gets (only the prompts holding blocks if ``resident_only``)."""
        prompts = self.state.prefilling
        if resident_only:
            prompts = [job for job in prompts if job.blocks]
        return CompactView(self.now_ms, self.budget, self.k_max, ReadOnlyList(prompts), self._decoders)

    def _form_compact(self) -> CompactBatch | None:
        """The next batch (the served decoders made the planned ones), or None when the engine
        blocks."""
        if self._block and self._uncached:
            return self._form_fitted()
        plan = self._planner(self._compact_view())
        if not plan.decoders and not plan.prompts:
            self.state.blocked_since = self.now_ms
            return None
        entries = self._check(plan)
        if not self._block:
            return CompactBatch(entries, plan.decoders, plan.decode_first, fitted=False)
        kept = self._fit_compact(plan.decoders, entries)
        if kept is None:
            return self._form_fitted()
        if not kept and not plan.decoders and self.state.resident:  # memory refused the whole plan
            plan = self._planner(self._compact_view(resident_only=True))
            if plan.decoders or plan.prompts:
                kept = self._fit_compact(plan.decoders, self._check(plan))
                if kept is None:
                    return self._form_fitted()
        if not kept and not plan.decoders:
            self.state.blocked_since = self.now_ms
            return None
        return CompactBatch(kept, plan.decoders, plan.decode_first, fitted=False)

    def _fit_compact(self, decoders: int, entries: list[tuple[Job, int]]) -> list[tuple[Job, int]] | None:
        """vLLM's block rules (as the reference engine fits a plan into memory) for a compact plan
        that preempts nobody: allocate and return the prompts memory admits; None, changing
        nothing, when a request holding blocks could not grow (the plan is then fitted request by
        request)."""
        memory = self.memory
        assert memory is not None
        if decoders:
            self._serve(decoders)
        need = self._phases[-self._serves % self._block] if decoders else 0
        fresh: list[tuple[Job, int]] = []
        for job, tokens in entries:
            if job.blocks:
                need += memory.blocks_for(job.cached + tokens) - job.blocks
            else:
                fresh.append((job, tokens))
        if need > self.state.free_blocks:
            return None
        self.state.free_blocks -= need
        for job, tokens in entries:
            if job.blocks:
                job.blocks = memory.blocks_for(job.cached + tokens)
        self.admit(fresh)
        return [(job, tokens) for job, tokens in entries if job.blocks]

    def _form_fitted(self) -> CompactBatch | None:
        """Form and fit the next batch request by request with the reference rules (it may
        preempt); it runs as a single repeat."""
        for job in self._served:
            self._sync(job)
        planned = self.form_plan()
        if planned is None:
            return None
        entries = planned.entries
        decoders = sorted((job for job, _ in entries if not job.prefill_left), key=arrival_order)
        prompts = [(job, tokens) for job, tokens in entries if job.prefill_left]
        if decoders and self._nth_decoder(len(decoders) - 1) is decoders[-1]:
            self._serve(len(decoders))  # the oldest ones, as usual
        elif decoders:  # not the oldest (the re-plan skipped a decoder holding no blocks)
            self._unserve_all()
            self._serve_exactly(decoders)
        return CompactBatch(prompts, len(decoders), not entries[0][0].prefill_left, fitted=True)

    def _nth_decoder(self, i: int) -> Job:
        """The decoder with ``i`` older ones."""
        served = self._served
        return served[i] if i < len(served) else self._waiting[i - len(served)]

    def begin_batch(self) -> None:
        """Plan once and start a run of up to ``k`` repeats of that plan (the reference engine's
        hook, replaced): ``k`` stops at the next phase change, a decoder finishing, the block
        growth memory allows, or the per-step cap."""
        if not self.state.jobs:
            return
        planned = self._form_compact()
        if planned is None:
            return
        entries, decoders, fitted = planned.prompts, planned.decoders, planned.fitted
        prefill = sum(tokens for _, tokens in entries)
        shaped = self.shape_time is not None
        duration = 0.0 if shaped else self.batch_duration_ms(prefill + decoders)
        k = 1 if fitted else SHAPE_REPEAT if shaped else MAX_REPEAT
        for job, tokens in entries:
            k = min(k, job.prefill_left // tokens)
        if decoders:
            if not fitted:
                self._serve(decoders)
            k = min(k, self._next_finish() - self._serves)
        if self._block:
            phases, b, s0 = self._phases, self._block, self._serves
            per_step = [phases[-(s0 + j) % b] for j in range(b)] if decoders and not fitted else [0] * b
            self._growth = _Growth(b, [(job.cached, tokens) for job, tokens in entries], per_step)
            k = self._growth.repeats_within(self.state.free_blocks, k)
            self._run_done = 0
            assert self.memory is not None
            self._run_used = self.memory.total_blocks - self.state.free_blocks
        # batch ends by the same sequential float additions as the reference engine's clock
        if shaped:
            self._durations = self._shape_durations(entries, decoders, k)
            self._ends = list(accumulate(self._durations, initial=self.now_ms))[1:]
        else:
            self._ends = list(accumulate(repeat(duration, k), initial=self.now_ms))[1:]
        self._targets = fill_targets(
            self.budget, self.k_max, self.state.prefilling, self._decoders, entries,
            self.state.prefill_left_tokens, k,
        )
        self.state.running = entries
        self._prompts = entries
        self._decode_first = planned.decode_first
        self._shape = (prefill, decoders, duration)
        self._stopped = False
        self.state.batch_end_ms = self._ends[-1]

    def _shape_durations(self, entries: list[tuple[Job, int]], decoders: int, k: int) -> list[float]:
        """The time of each of ``k`` repeats from its own shape (``engine.batch_shape``): chunk
        prefixes grow by the chunk, the decoders' KV reads by one token each, and a prompt's last
        chunk adds a logit row."""
        shape_time = self.shape_time
        assert shape_time is not None
        chunks = tuple(tokens for _, tokens in entries)
        prefill = sum(chunks)
        kv = self._served_context + decoders * (self._serves + 1) if decoders else 0
        out: list[float] = []
        for j in range(k):
            prefixes = tuple(job.cached + j * tokens for job, tokens in entries)
            rows = sum(1 for job, tokens in entries if job.prefill_left - j * tokens == tokens)
            duration = shape_time(BatchShape(prefill, decoders, chunks, prefixes, kv + j * decoders,
                                             rows + decoders))
            if not duration > 0 or math.isinf(duration):
                raise ConfigError("batch-time", duration,
                                  f"t({prefill + decoders}) must be a positive finite time")
            out.append(duration)
        return out

    def end_batch(self) -> list[RequestRecord]:
        """Book the running repeats (all of them: the next event is the end of the run)."""
        if self.state.running is None:
            return []
        return self._book(len(self._ends))

    def _cut(self, t_ms: float) -> None:
        """Keep only the repeats that start before ``t_ms`` and book all but the last of them."""
        # repeat i starts at ends[i - 1] (repeat 0 at now): count the starts before t_ms
        keep = max(1, 1 + bisect_left(self._ends, t_ms, 0, len(self._ends) - 1))
        if keep < len(self._ends):
            del self._ends[keep:]
            if self._durations is not None:
                del self._durations[keep:]
            self.state.batch_end_ms = self._ends[-1]
        if keep > 1:
            self._book(keep - 1)

    def submit(self, request: Request) -> None:
        """Hand in an arrival; it cuts the running repeats at the first boundary after it."""
        if self.state.running is not None and request.arrival_ms >= self.now_ms:
            self._cut(request.arrival_ms)
        super().submit(request)

    def stop(self, horizon_ms: float) -> None:
        """End at ``horizon_ms``: book the repeats that end before it, and count the one running."""
        if self.state.running is None or self._stopped:
            return
        self._cut(horizon_ms)
        prefill, decode, duration = self._shape
        if self._durations is not None:
            duration = self._durations[0]
        self._keep_batches(1)
        audit = self._targets.audit(1, prefill + decode)
        if self.recorder is not None:
            requests = len(self._prompts) + decode
            self.recorder.batches(1, duration, prefill, decode, requests, audit)
            if self._growth is not None and self.memory is not None:
                used = self._run_used + self._growth.at(self._run_done)
                self.recorder.kv_used(used, self.memory.total_blocks)
        self._stopped = True

    def _keep_batches(self, m: int) -> None:
        """Append the next ``m`` repeats to ``self.batches`` when batches are kept."""
        if self.batches is None:
            return
        prefill, decode, _ = self._shape
        prompts = tuple((job.id, tokens) for job, tokens in self._prompts)
        decoders = tuple((job.id, 1) for job in self._served[:decode])
        plan = decoders + prompts if self._decode_first else prompts + decoders
        start = self.now_ms
        for end, target in zip(self._ends[:m], self._targets.values(m), strict=True):
            self.batches.append(
                Batch(
                    index=self.state.batch_count,
                    start_ms=start,
                    end_ms=end,
                    plan=plan,
                    prefill_tokens=prefill,
                    decode_tokens=decode,
                    fill_target_tokens=target,
                )
            )
            self.state.batch_count += 1
            start = end

    def _book(self, m: int) -> list[RequestRecord]:
        """Apply the first ``m`` running repeats: tokens, timestamps, metrics; advance the clock."""
        ends = self._ends
        prefill, decode, duration = self._shape
        n = prefill + decode
        now = ends[m - 1]
        recorder = self.recorder
        self._keep_batches(m)
        if self._growth is not None:
            self._book_blocks(m)
        intervals: dict[float, int] = {}
        finished: list[RequestRecord] = []
        if decode:
            first_end = ends[0]
            for last, count in self._last_tokens.items():
                gap = first_end - last
                intervals[gap] = intervals.get(gap, 0) + count
            if m > 1 and self._durations is not None:  # repeats of their own lengths
                for i in range(1, m):
                    gap = ends[i] - ends[i - 1]
                    intervals[gap] = intervals.get(gap, 0) + decode
            elif m > 1:  # every served decoder waited each of these batch times
                intervals[duration] = intervals.get(duration, 0) + (m - 1) * decode
            self._serves += m
            self._served_ms = now
            heap = self._finish_heap
            done = 0
            while heap and heap[0][0] <= self._serves:
                _, _, activation, job = heappop(heap)
                if activation != job.activation:
                    continue
                self._served_context -= job.cached - job.c0
                if self._block:  # its cached tokens and blocks, freed when it settles
                    self._sync(job)
                    self._phases[(job.cached - job.c0) % self._block] -= 1
                job.decode_left = 0
                job.last_token_ms = now
                job.activation += 1
                self._served.remove(job)
                finished.append(job.record(now))
                done += 1
            self._decoders -= done
            self._last_tokens = {now: decode - done} if decode > done else {}
        if self._irregular:  # a fitted batch served decoders out of order: restore the order
            self._unserve_all()
        if self._uncached:  # only fitted batches serve them: the served ones now hold blocks
            self._uncached = sum(1 for job in self._waiting if not job.blocks)
        prompts_done = 0
        block = self._block
        for job, tokens in self._prompts:
            job.prefill_left -= tokens * m
            job.cached += tokens * m
            if block:
                job.blocks = _ceil_div(job.cached, block)
            if job.prefill_left == 0:
                prompts_done += 1
                if job.first_token_ms != job.first_token_ms:  # NaN: not a recomputation
                    job.first_token_ms = now
                job.last_token_ms = now
                if job.decode_left:
                    self.enter_decode(job)
                else:
                    finished.append(job.record(now))
        if prompts_done:
            self._drop_prompts(prompts_done)
        self.backlog_tokens -= n * m
        self.state.prefill_left_tokens -= prefill * m
        audit = self._targets.audit(m, n)
        if recorder is not None:
            for gap, count in intervals.items():
                recorder.itl.add(gap, count)
            if m == 1:
                recorder.tokens_done(now, n)
            else:
                recorder.tokens_done_steps(ends[:m], n)
            requests = len(self._prompts) + decode
            busy = duration * m if self._durations is None else math.fsum(self._durations[:m])
            recorder.batches(m, busy, prefill, decode, requests, audit)
        self.now_ms = now
        del ends[:m]
        if self._durations is not None:
            del self._durations[:m]
        if not ends:
            self.state.running = None
            self.state.batch_end_ms = math.inf
        self.settle(finished, False, False)
        return finished

    def _book_blocks(self, m: int) -> None:
        """Take the blocks that the next ``m`` repeats of the run allocate beyond its first
        from the pool, and report the blocks held at each of their starts."""
        growth, done, memory = self._growth, self._run_done, self.memory
        assert growth is not None and memory is not None
        self.state.free_blocks -= growth.at(done + m - 1) - (growth.at(done - 1) if done else 0)
        self._run_done = done + m
        if self.recorder is not None:
            used = self._run_used
            self.recorder.kv_used_steps([used + g for g in growth.many(done, done + m)], memory.total_blocks)

    def _drop_prompts(self, count: int) -> None:
        """Remove ``count`` prompts that finished prefill (usually the oldest ones)."""
        prompts = self.state.prefilling
        head = 0
        while head < len(prompts) and not prompts[head].prefill_left:
            head += 1
        if head == count:
            del prompts[:head]
        else:
            self.state.prefilling = [j for j in prompts if j.prefill_left]


def needs_reference(policy: object) -> bool:
    """Whether ``policy`` lacks what the fast engine relies on (``repeats_plan`` and a compact
    planner ``plan_compact``)."""
    return getattr(policy, "repeats_plan", None) is not True or not callable(
        getattr(policy, "plan_compact", None)
    )

