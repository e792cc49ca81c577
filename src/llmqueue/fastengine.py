"""The fast engine: exact dynamics that advance runs of identical iterations in one step.

Between two events (an arrival, a prompt finishing, a request finishing, a prompt's remaining
tokens dropping below its chunk) the shipped schedulers form the same plan at every boundary, so
the engine asks the policy once, works out how many iterations ``k`` that plan repeats, and books
all ``k`` at once: batch end times by the same sequence of float additions as the reference
engine (so times agree to the bit), inter-token latencies, backlog integrals, batch statistics and
the work-conservation audit, each vectorised over the ``k`` iterations. An arrival inside such a
run cuts it at the first boundary after the arrival, exactly where the reference engine would
form a new plan. See docs/fastpath.md for why this is exact and what it costs.

A policy opts in by declaring ``repeats_plan = True`` (see ``llmqueue.policies``); ``simulate``
runs every other policy on the reference engine.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import Counter
from itertools import accumulate, repeat
from operator import sub

import numpy as np

from llmqueue.engine import Batch, Engine, Job, _seq
from llmqueue.metrics import RequestRecord
from llmqueue.policies import EngineView
from llmqueue.workload import Request

MAX_REPEAT = 1 << 16
"""Most iterations booked in one step (bounds the per-step lists; longer runs take more steps)."""

VECTOR_FROM = 32
"""Runs at least this long have their backlog integral booked with numpy, shorter ones in Python."""


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
    view: EngineView, entries: list[tuple[Job, int]], prefill_left_tokens: int, k: int
) -> LinearTargets | ListTargets:
    """The work-conservation fill targets of ``k`` repeats of a plan, from the view at the first
    one (see ``llmqueue.engine.fill_target``): only the planned prompts' remaining tokens change
    over the repeats, by their chunk per iteration."""
    n_pre, n_dec = len(view.prefilling), len(view.decoding)
    chunked = [(job.prefill_left, tokens) for job, tokens in entries if job.prefill_left]
    if view.k_max is None or n_pre + n_dec <= view.k_max:
        per_iteration = sum(tokens for _, tokens in chunked)
        return LinearTargets(view.budget, prefill_left_tokens + n_dec, per_iteration)
    # Top-k_max demands: the planned prompts shrink, the rest (other prompts, decoders at 1) stay.
    j = np.arange(k, dtype=np.int64)
    planned = {id(job) for job, tokens in entries if job.prefill_left}
    constant = sorted(
        [r.prefill_left for r in view.prefilling if id(r) not in planned] + [1] * n_dec,
        reverse=True,
    )
    best_constant = np.concatenate(([0], np.cumsum(constant, dtype=np.int64)))
    shrinking = np.array([p for p, _ in chunked], dtype=np.int64)[:, None] - np.array(
        [x for _, x in chunked], dtype=np.int64
    )[:, None] * j[None, :]
    best_shrinking = np.vstack(
        [np.zeros(k, dtype=np.int64), np.cumsum(-np.sort(-shrinking, axis=0), axis=0)]
    )
    top = np.zeros(k, dtype=np.int64)
    for t in range(min(len(chunked), view.k_max) + 1):
        rest = min(view.k_max - t, len(constant))
        top = np.maximum(top, best_shrinking[t] + best_constant[rest])
    return ListTargets(np.minimum(view.budget, top).tolist())


class FastEngine(Engine):
    """An ``Engine`` that books each run of identical iterations in one step (same results).

    Same interface and semantics as the reference ``Engine``; the policy must declare
    ``repeats_plan = True``.
    """

    def _start_batch(self) -> None:
        formed = self._form_plan()
        if formed is None:
            return
        view, plan, prefill, decode = formed
        n = prefill + decode
        duration = self._duration(n)
        jobs = self._jobs
        entries = [(jobs[rid], tokens) for rid, tokens in plan.items()]
        k = MAX_REPEAT
        for job, tokens in entries:
            repeats = job.prefill_left // tokens if job.prefill_left else job.decode_left
            if repeats < k:
                k = repeats
        # batch ends by the same sequential float additions as the reference engine's clock
        self._ends = list(accumulate(repeat(duration, k), initial=self.now_ms))[1:]
        self._plan = entries
        self._targets = fill_targets(view, entries, self._prefill_left_tokens, k)
        self._shape = (prefill, decode, duration)
        self._stopped = False
        self._batch_end_ms = self._ends[-1]

    def step(self) -> list[RequestRecord]:
        """Process the next event: book the running repeats (if any), then plan the next ones."""
        finished: list[RequestRecord] = []
        if self._plan is not None:
            finished = self._book(len(self._ends))
        self._start_batch()
        return finished

    def _cut(self, t_ms: float) -> None:
        """Keep only the repeats that start before ``t_ms`` and book all but the last of them."""
        # repeat i starts at ends[i - 1] (repeat 0 at now): count the starts before t_ms
        keep = max(1, 1 + bisect_left(self._ends, t_ms, 0, len(self._ends) - 1))
        if keep < len(self._ends):
            del self._ends[keep:]
            self._batch_end_ms = self._ends[-1]
        if keep > 1:
            self._book(keep - 1)

    def submit(self, request: Request) -> None:
        """Hand in an arrival; it cuts the running repeats at the first boundary after it."""
        if self._plan is not None and request.arrival_ms >= self.now_ms:
            self._cut(request.arrival_ms)
        super().submit(request)

    def stop(self, horizon_ms: float) -> None:
        """End at ``horizon_ms``: book the repeats that end before it, and count the one running."""
        if self._plan is None or self._stopped:
            return
        self._cut(horizon_ms)
        prefill, decode, duration = self._shape
        self._keep_batches(1)
        audit = self._targets.audit(1, prefill + decode)
        if self.recorder is not None:
            self.recorder.batches(1, duration, prefill, decode, len(self._plan), audit)
        self._stopped = True

    def _keep_batches(self, m: int) -> None:
        """Append the next ``m`` repeats to ``self.batches`` when batches are kept."""
        if self.batches is None:
            return
        assert self._plan is not None
        prefill, decode, _ = self._shape
        plan = tuple((job.id, tokens) for job, tokens in self._plan)
        start = self.now_ms
        for end, target in zip(self._ends[:m], self._targets.values(m), strict=True):
            self.batches.append(
                Batch(
                    index=self._batch_count,
                    start_ms=start,
                    end_ms=end,
                    plan=plan,
                    prefill_tokens=prefill,
                    decode_tokens=decode,
                    fill_target_tokens=target,
                )
            )
            self._batch_count += 1
            start = end

    def _book(self, m: int) -> list[RequestRecord]:
        """Apply the first ``m`` running repeats: tokens, timestamps, metrics; advance the clock."""
        entries = self._plan
        assert entries is not None
        ends = self._ends
        prefill, decode, duration = self._shape
        n = prefill + decode
        now = ends[m - 1]
        first_end = ends[0]
        recorder = self.recorder
        self._keep_batches(m)
        intervals: dict[float, int] = {}
        finished: list[RequestRecord] = []
        prefill_done = decode_done = False
        for job, tokens in entries:
            if job.prefill_left:
                job.prefill_left -= tokens * m
                if job.prefill_left == 0:
                    prefill_done = True
                    job.first_token_ms = job.last_token_ms = now
                    if job.decode_left:
                        insort(self._decoding, job, key=_seq)
                    else:
                        finished.append(job.record(now))
            else:
                gap = first_end - job.last_token_ms
                intervals[gap] = intervals.get(gap, 0) + 1
                job.decode_left -= m
                job.last_token_ms = now
                if job.decode_left == 0:
                    decode_done = True
                    finished.append(job.record(now))
        self.backlog_tokens -= n * m
        self._prefill_left_tokens -= prefill * m
        audit = self._targets.audit(m, n)
        if recorder is not None:
            if decode and m > 1:  # every planned decoder waited each of these batch times
                for gap, count in Counter(map(sub, ends[1:m], ends[: m - 1])).items():
                    intervals[gap] = intervals.get(gap, 0) + count * decode
            for gap, count in intervals.items():
                recorder.itl.add(gap, count)
            if m < VECTOR_FROM:
                for end in ends[:m]:
                    recorder.tokens_done(end, n)
            else:
                recorder.tokens_done_steps(np.array(ends[:m]), n)
            recorder.batches(m, duration * m, prefill, decode, len(entries), audit)
        self.now_ms = now
        del ends[:m]
        if not ends:
            self._plan = None
            self._batch_end_ms = math.inf
        self._settle(finished, prefill_done, decode_done)
        return finished


def needs_reference(policy: object) -> bool:
    """Whether ``policy`` lacks the declaration the fast engine relies on."""
    return getattr(policy, "repeats_plan", None) is not True

