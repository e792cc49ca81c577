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
from bisect import insort

import numpy as np

from llmqueue.engine import Batch, Engine, Job, _seq
from llmqueue.metrics import RequestRecord
from llmqueue.policies import EngineView
from llmqueue.workload import Request

MAX_REPEAT = 1 << 16
"""Most iterations booked in one step (bounds the per-step arrays; longer runs take more steps)."""


def fill_targets(
    view: EngineView, entries: list[tuple[Job, int]], prefill_left_tokens: int, k: int
) -> np.ndarray:
    """The work-conservation fill target of each of ``k`` repeats of a plan, from the view at the
    first one (see ``llmqueue.engine.fill_target``): only the planned prompts' remaining tokens
    change over the repeats, by their chunk per iteration."""
    j = np.arange(k, dtype=np.int64)
    n_pre, n_dec = len(view.prefilling), len(view.decoding)
    chunked = [(job.prefill_left, tokens) for job, tokens in entries if job.prefill_left]
    per_iteration = sum(tokens for _, tokens in chunked)
    if view.k_max is None or n_pre + n_dec <= view.k_max:
        return np.minimum(view.budget, prefill_left_tokens + n_dec - per_iteration * j)
    # Top-k_max demands: the planned prompts shrink, the rest (other prompts, decoders at 1) stay.
    planned = {id(job) for job, tokens in entries if job.prefill_left}
    constant = sorted(
        [r.prefill_left for r in view.prefilling if id(r) not in planned] + [1] * n_dec,
        reverse=True,
    )
    best_constant = np.concatenate(([0], np.cumsum(constant)))
    shrinking = np.array([p for p, _ in chunked])[:, None] - np.array(
        [x for _, x in chunked]
    )[:, None] * j[None, :]
    best_shrinking = np.vstack(
        [np.zeros(k, dtype=np.int64), np.cumsum(-np.sort(-shrinking, axis=0), axis=0)]
    )
    top = np.zeros(k, dtype=np.int64)
    for t in range(min(len(chunked), view.k_max) + 1):
        rest = min(view.k_max - t, len(constant))
        top = np.maximum(top, best_shrinking[t] + best_constant[rest])
    return np.minimum(view.budget, top)


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
        steps = np.full(k + 1, duration)
        steps[0] = self.now_ms
        ends = np.cumsum(steps)[1:]  # sequential additions: the reference engine's clock
        self._plan = entries
        self._ends = ends
        self._targets = fill_targets(view, entries, self._prefill_left_tokens, k)
        self._shape = (prefill, decode, duration)
        self._stopped = False
        self._batch_end_ms = float(ends[-1])

    def step(self) -> list[RequestRecord]:
        """Process the next event: book the running repeats (if any), then plan the next ones."""
        finished: list[RequestRecord] = []
        if self._plan is not None:
            finished = self._book(len(self._ends))
        self._start_batch()
        return finished

    def _starts_before(self, t_ms: float) -> int:
        """How many of the running repeats start strictly before ``t_ms``."""
        starts = np.concatenate(([self.now_ms], self._ends[:-1]))
        return int(np.searchsorted(starts, t_ms, side="left"))

    def _cut(self, t_ms: float) -> None:
        """Keep only the repeats that start before ``t_ms`` and book all but the last of them."""
        keep = max(1, self._starts_before(t_ms))  # the repeat running at t_ms always stays
        if keep < len(self._ends):
            self._ends = self._ends[:keep]
            self._targets = self._targets[:keep]
            self._batch_end_ms = float(self._ends[-1])
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
        if self.recorder is not None:
            self.recorder.batches(duration, prefill, decode, len(self._plan), self._targets[:1])
        self._keep_batches(1)
        self._stopped = True

    def _keep_batches(self, m: int) -> None:
        """Append the next ``m`` repeats to ``self.batches`` when batches are kept."""
        if self.batches is None:
            return
        assert self._plan is not None
        prefill, decode, _ = self._shape
        plan = tuple((job.id, tokens) for job, tokens in self._plan)
        start = self.now_ms
        for i in range(m):
            end = float(self._ends[i])
            self.batches.append(
                Batch(
                    index=self._batch_count,
                    start_ms=start,
                    end_ms=end,
                    plan=plan,
                    prefill_tokens=prefill,
                    decode_tokens=decode,
                    fill_target_tokens=int(self._targets[i]),
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
        now = float(ends[m - 1])
        first_end = float(ends[0])
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
                        self._enter_decode(job)
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
        self.backlog_tokens -= (prefill + decode) * m
        self._prefill_left_tokens -= prefill * m
        if recorder is not None:
            if decode and m > 1:
                gaps, counts = np.unique(np.diff(ends[:m]), return_counts=True)
                for gap, count in zip(gaps.tolist(), counts.tolist(), strict=True):
                    intervals[gap] = intervals.get(gap, 0) + count * decode
            for gap, count in intervals.items():
                recorder.itl.add(gap, count)
            recorder.tokens_done_steps(ends[:m], prefill + decode)
            recorder.batches(duration * m, prefill, decode, len(entries), self._targets[:m])
        self.now_ms = now
        self._ends = ends[m:]
        self._targets = self._targets[m:]
        if not len(self._ends):
            self._plan = None
            self._batch_end_ms = math.inf
        self._settle(finished, prefill_done, decode_done)
        return finished

    def _enter_decode(self, job: Job) -> None:
        insort(self._decoding, job, key=_seq)


def needs_reference(policy: object) -> bool:
    """Whether ``policy`` lacks the declaration the fast engine relies on."""
    return getattr(policy, "repeats_plan", None) is not True

