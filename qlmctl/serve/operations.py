"""Serving operations on the instances: pull, evict, swap, and the estimates behind them.

How it works (:meth:`ServingOps.serve`, once per decision, visits every up instance):

* **Pulling.** An up instance dispatches the head of its virtual queue while its
  in-flight count (and the engine's reported waiting count and KV usage) is under limits;
  the sequence limit leaves ``dispatch_ahead`` requests waiting in the engine, so a slot
  that frees is refilled at once (one such request of a less urgent class gives its place
  to a head: it has no output to lose).
  A head that can no longer get its first token by its deadline (``defer_late``, as the
  policy's serving style says) goes behind the rest of that queue due within
  ``defer_horizon_s``: it misses either way, and served first it would make the requests
  behind it miss too (EDF's domino effect). Groups due later (a batch class's hour) lose
  nothing by letting it go first, and the test is early on purpose (see
  :func:`_first_token_alone_s`): some heads it defers still make their deadline.
  The test is the planner's (its first-token time beside the decodes running there), and
  plans are scored deferring the same requests behind the same work
  (:func:`~qlmctl.plan.simulate.serve_group`). While nothing
  waits, a new arrival skips the queue for an instance that would start it at once
  (:meth:`ServingOps.admit`).
* **Eviction.** When the plan in force says the head would miss its deadline waiting for
  a slot (or the start it forecast for the head has passed), the head can still make it,
  and less urgent work (a higher class ``priority`` number) fills the instance, the newest
  such requests are evicted and re-queued; bounded per request (``max_evictions``) and per
  instance (``evict_batch`` per round, ``evict_cooldown_s`` between rounds). A victim must
  have twice its estimated service time (:meth:`ServingOps._service_s`: prefill plus the
  rest of its output at the instance's current load) left before its own deadline.
* **Moving.** While nothing waits, a request decoding where the rest of its output would
  take at least twice as long as on another instance holding its model (its prompt and
  the output so far prefilled again there, beside what runs there) is evicted and resumed
  there (:meth:`ServingOps._move_running`): the one that saves the most, one at a time,
  at most every ``evict_cooldown_s``. What is left is the length model's expectation
  given the output so far (a long answer is expected to go on). Once the queue drains,
  long answers left on slow instances otherwise decide when the work is done.
* **Swap.** When the head group needs another model, the instance stops pulling, drains
  (or evicts for an urgent head), then loads the model, waking it where it sleeps; nothing
  is dispatched until the engine reports ``InstanceReady``.

The operations change the core's records (requests, instances, virtual queues) in place,
append their actions to the decision's list and log evictions and sleeps.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, MutableMapping

from qlmctl.domain import Request
from qlmctl.engine.events import Action, Dispatch, Evict, LoadModel
from qlmctl.perfmodel import PerfModel, swap_time_s
from qlmctl.plan.problem import first_token_s
from qlmctl.plan.types import PlannedGroup
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.queues import VirtualQueues, generated_tokens
from qlmctl.serve.runlog import OperationLog
from qlmctl.serve.state import (
    Forecast,
    InstanceRecord,
    InstStatus,
    QueuedGroup,
    ReqState,
    Tracked,
)


class ServingOps:
    """Pull, evict and swap on the core's instances (see the module docstring)."""

    def __init__(
        self,
        config: CoreConfig,
        perf: Mapping[tuple[str, str], PerfModel],
        insts: Mapping[str, InstanceRecord],
        reqs: Mapping[str, Tracked],
        waiting: MutableMapping[str, Tracked],
        queues: VirtualQueues,
        log: OperationLog,
        left_tokens: Callable[[Request, int], float],
    ) -> None:
        """Args: the core's knobs, profiles (as calibrated), instances, requests (all and
        waiting, by id), virtual queues and operation log, shared with the core; the
        output a request is expected to generate after the tokens it has."""
        self.config = config
        self._perf = perf
        self._insts, self._reqs, self._waiting = insts, reqs, waiting
        self._queues = queues
        self._log = log
        self._left_tokens = left_tokens
        self._moving: dict[str, InstanceRecord] = {}  # request id -> where it moves
        self._next_move_s = -math.inf  # the next look for a request to move
        self.hint_s = math.inf  # the earliest end of an eviction cooldown met in the last pass
        # instance -> (head, profile, requests in flight, first-token time): _alone_s's last
        self._last_alone: dict[str, tuple[Tracked, PerfModel, int, float]] = {}

    def serve(self, now_s: float) -> list[Action]:
        """Pull, evict or swap on every up instance, in order (first landing the requests
        being moved), then look for one to move; the actions to apply."""
        self.hint_s = math.inf
        actions: list[Action] = []
        if self._moving:
            self._land_moved(now_s, actions)
        for inst in self._insts.values():
            if inst.status is InstStatus.UP:
                self._serve(inst, now_s, actions)
        cfg = self.config
        if (
            not self._waiting
            and not self._moving
            and now_s >= self._next_move_s
            and cfg.move_running
            and cfg.resume_evicted
            and cfg.evict_batch > 0
        ):
            self._next_move_s = now_s + cfg.evict_cooldown_s
            self._move_running(now_s, actions)
        return actions

    def _serve(self, inst: InstanceRecord, now_s: float, actions: list[Action]) -> None:
        head = self._head(inst, now_s)
        if head is None:
            return
        group, tr = head
        if group.plan.model != inst.model:
            if inst.inflight or inst.evicting:
                if self.config.evict_for_swap and not inst.evicting:
                    self._maybe_evict(inst, group, tr, now_s, actions, for_swap=True)
            else:
                self._load(inst, group.plan.model, now_s, actions)
            return
        while self._can_pull(inst, tr):
            self._dispatch(inst, group, tr, now_s, actions)
            head = self._head(inst, now_s)
            if head is None or head[0].plan.model != inst.model:
                return
            group, tr = head
        ahead = self._sent_ahead_of(inst, group, tr, now_s)
        if ahead is not None:
            self._evict(inst, ahead, f"gave its place to {tr.id} ({tr.slo.name})", now_s, actions)
            if self._can_pull(inst, tr):
                self._dispatch(inst, group, tr, now_s, actions)
                return
        self._maybe_evict(inst, group, tr, now_s, actions, for_swap=False)

    def _head(self, inst: InstanceRecord, now_s: float) -> tuple[QueuedGroup, Tracked] | None:
        """The first still-waiting request of the instance's virtual queue and its group;
        heads too late for their deadline move back on the way (:func:`_defer`)."""
        vq = self._queues[inst.spec.id]
        due_by_s = now_s + self.config.defer_horizon_s  # one look: the same for every head
        filled = 0  # where the last request deferred here went (0: none yet)
        while vq:
            g = vq[0]
            while g.ids:
                tr = self._reqs[g.ids[0]]
                if tr.state is ReqState.WAITING and tr.vq_instance == inst.spec.id:
                    if g.deferred or not self._defers(tr, inst, now_s):
                        return g, tr
                    filled = _defer(vq, g, tr.id, due_by_s, filled)
                g.ids.popleft()
            vq.popleft()
            filled = max(filled - 1, 0)
        return None

    def _defers(self, tr: Tracked, inst: InstanceRecord, now_s: float) -> bool:
        """Whether the head ``tr`` goes behind the queue (never mid-stream)."""
        return self.config.defer_late and not tr.kept_tokens and self._too_late(tr, inst, now_s)

    def _too_late(self, tr: Tracked, inst: InstanceRecord, now_s: float) -> bool:
        """Whether ``tr``, dispatched now on ``inst``, gets its first token past its
        deadline even with the prefill pipeline to itself (beside the decodes running
        there: the planner's ``req_ttft_s``)."""
        deadline_s = tr.deadline_s
        return now_s > deadline_s or now_s + self._alone_s(tr, inst) > deadline_s

    def _alone_s(self, tr: Tracked, inst: InstanceRecord) -> float:
        """The planner's first-token time of ``tr`` dispatched now on ``inst`` beside the
        decodes running there (:func:`_first_token_alone_s`).

        NOTE: asked for every instance's head at every decision, mostly for the same head,
        load and profile as the last time: the last answer per instance is kept, matched
        by identity (the speed calibration replaces a profile it moves, never changes it).
        It replaces an LRU cache of :func:`_first_token_alone_s`, whose every call hashed
        the profile (a dataclass of 20 fields)."""
        perf = self._perf[(tr.request.model, inst.spec.gpu)]
        n = len(inst.inflight)
        last = self._last_alone.get(inst.spec.id)
        if last is not None and last[0] is tr and last[1] is perf and last[2] == n:
            return last[3]
        ttft = _first_token_alone_s(perf, tr.request.prompt_tokens, *inst.decode_load(tr))
        self._last_alone[inst.spec.id] = (tr, perf, n, ttft)
        return ttft

    def _can_pull(self, inst: InstanceRecord, head: Tracked) -> bool:
        """Backpressure: sequences, KV tokens, and what vLLM itself reports."""
        cfg = self.config
        perf = self._perf[(head.request.model, inst.spec.gpu)]
        n = len(inst.inflight)
        return (
            n < (cfg.max_inflight or perf.max_num_seqs + self._ahead(perf))
            and (
                n == 0 or inst.kv_tokens + head.kv_tokens <= cfg.kv_budget * perf.kv_capacity_tokens
            )
            and self._engine_queue_short(inst)
            and (inst.kv_usage is None or inst.kv_usage < cfg.max_kv_usage)
        )

    def _engine_queue_short(self, inst: InstanceRecord) -> bool:
        """Whether fewer requests wait in the engine than ``max_engine_waiting``."""
        limit = self.config.max_engine_waiting
        return limit is None or inst.engine_waiting is None or inst.engine_waiting < limit

    def _ahead(self, perf: PerfModel) -> int:
        """Requests sent ahead to wait in a full engine (``CoreConfig.dispatch_ahead``)."""
        ahead = self.config.dispatch_ahead
        if ahead is None:
            return int(perf.ttft_overhead_s + perf.admission_gap_s > 0)
        return ahead

    def admit(self, tr: Tracked, now_s: float, actions: list[Action]) -> bool:
        """Dispatch the new arrival ``tr`` now if an instance holding its model would start
        prefilling it at once (:meth:`_starts_at_once`): the one where its first token
        comes first by the planner's estimate (its prefill, after the prompts sent there
        not started yet, beside the running decodes). Whether it was dispatched."""
        best, best_s = None, math.inf
        for inst in self._insts.values():
            if inst.status is not InstStatus.UP or inst.model != tr.request.model:
                continue
            perf = self._perf[(tr.request.model, inst.spec.gpu)]
            if not self._starts_at_once(inst, tr, perf):
                continue
            # the prompts sent there and not started yet go first in the engine's steps
            prompts = inst.unstarted_tokens + tr.prefill_tokens
            first_s = _first_token_alone_s(perf, prompts, *inst.decode_load(tr))
            if first_s < best_s:
                best, best_s = inst, first_s
        if best is None:
            return False
        # no queue: its own prefill decides its first token (no spread to give a p90 of)
        first_s = now_s + best_s
        finish_s = first_s + tr.remaining_output_tokens * self._step_s(tr, best)
        tr.forecast = Forecast(now_s, float(first_s > tr.deadline_s), first_s, finish_s=finish_s)
        self._start(best, tr, now_s, tr.slo.priority, actions)
        return True

    def _starts_at_once(self, inst: InstanceRecord, tr: Tracked, perf: PerfModel) -> bool:
        """Whether the engine would start prefilling ``tr`` at its next step: nothing sent
        there is still waiting for its first token, or its whole prompt fits in the step's
        token budget beside them (vLLM V1: one token per decode, then the waiting prompts
        in order, chunked) and the engine's queue is short; and ``tr`` is within the
        core's pull limits and the engine's own (its sequences and KV cache)."""
        cfg = self.config
        n = len(inst.inflight)
        step = n - inst.unstarted + inst.unstarted_tokens + tr.prefill_tokens
        return (
            (
                not inst.unstarted
                or (step <= perf.max_num_batched_tokens and self._engine_queue_short(inst))
            )
            and n < min(cfg.max_inflight or perf.max_num_seqs, perf.max_num_seqs)
            and inst.kv_tokens + tr.kv_tokens <= min(cfg.kv_budget, 1.0) * perf.kv_capacity_tokens
            and (inst.kv_usage is None or inst.kv_usage < min(cfg.max_kv_usage, 1.0))
        )

    def _dispatch(
        self,
        inst: InstanceRecord,
        group: QueuedGroup,
        tr: Tracked,
        now_s: float,
        actions: list[Action],
    ) -> None:
        """Dispatch ``tr``, the head of ``group`` in ``inst``'s virtual queue."""
        group.ids.popleft()
        inst.queued -= 1
        tr.vq_instance = None
        if tr.forecast is None:  # a plan without per-request forecasts
            tr.forecast = Forecast(group.plan.predicted_start_s, group.plan.miss_probability)
        self._start(inst, tr, now_s, group.plan.priority, actions)

    def _start(
        self, inst: InstanceRecord, tr: Tracked, now_s: float, priority: int, actions: list[Action]
    ) -> None:
        """Send waiting ``tr`` to ``inst`` (with ``priority`` where vLLM is told it)."""
        tr.move("dispatch")
        del self._waiting[tr.id]
        tr.instance_id = inst.spec.id
        tr.dispatch_s = now_s
        tr.priority = priority if self.config.vllm_priority else 0
        inst.add_inflight(tr)
        if inst.engine_waiting is not None:
            inst.engine_waiting += 1  # waits in the engine until its next report says otherwise
        actions.append(Dispatch(tr.id, inst.spec.id, tr.priority, tr.kept_tokens))

    def _sent_ahead_of(
        self, inst: InstanceRecord, group: QueuedGroup, head: Tracked, now_s: float
    ) -> Tracked | None:
        """A request sent ahead to a full instance (no first token yet), of a less urgent
        class than ``head``, to evict so ``head`` takes its place, the plan in force having
        ``head`` late if it waits: it has no output to lose. None if there is none."""
        cfg = self.config
        perf = self._perf[(head.request.model, inst.spec.gpu)]
        if (
            cfg.max_inflight
            or cfg.evict_batch == 0
            or not self._ahead(perf)
            or len(inst.inflight) < perf.max_num_seqs
            or not _late_by_plan(group.plan, head.id, now_s)
        ):
            return None
        return next((t for t in self._evictable(inst, head) if t.first_token_s is None), None)

    def _evictable(self, inst: InstanceRecord, head: Tracked) -> Iterator[Tracked]:
        """The requests in flight on ``inst`` of a less urgent class than ``head`` that may
        be evicted again (not mid-stream where that cannot be resumed), newest first."""
        for t in reversed(inst.inflight.values()):
            if (
                t.slo.priority > head.slo.priority
                and t.evictions < self.config.max_evictions
                and (t.resumable or t.first_token_s is None)
            ):
                yield t

    def _maybe_evict(
        self,
        inst: InstanceRecord,
        group: QueuedGroup,
        head: Tracked,
        now_s: float,
        actions: list[Action],
        *,
        for_swap: bool,
    ) -> None:
        """Evict less urgent running work if it makes the head group miss its deadline."""
        cfg = self.config
        if cfg.evict_batch == 0 or not inst.inflight:
            return
        head_prio = head.slo.priority
        if not any(p > head_prio and n > 0 for p, n in inst.prio_counts.items()):
            return
        if now_s < inst.last_evict_s + cfg.evict_cooldown_s:
            self.hint_s = min(self.hint_s, inst.last_evict_s + cfg.evict_cooldown_s)
            return
        if self._too_late(head, inst, now_s):
            return  # too late to save; evicting would only waste work
        if not _late_by_plan(group.plan, head.id, now_s):
            return  # the plan has the head on time by waiting (for a swap: by draining)
        victims = [
            t
            for t in self._evictable(inst, head)
            if t.deadline_s - now_s > 2 * self._service_s(t, inst)
        ]
        if for_swap and len(victims) < len(inst.inflight):
            return  # some work must drain anyway: evicting the rest gains nothing
        n = len(victims) if for_swap else min(len(victims), cfg.evict_batch, len(group.ids))
        for t in victims[:n]:
            self._evict(inst, t, f"evicted for {head.id} ({head.slo.name})", now_s, actions)
        if n:
            inst.last_evict_s = now_s

    def _evict(
        self, inst: InstanceRecord, tr: Tracked, reason: str, now_s: float, actions: list[Action]
    ) -> None:
        tr.move("evict")
        tr.evictions += 1
        tr.evict_reason = reason
        inst.remove_inflight(tr)
        inst.evicting[tr.id] = tr
        actions.append(Evict(tr.id, inst.spec.id, reason))
        self._log.add(
            now_s,
            "evict",
            inst.spec.id,
            tr.request.model,
            request_id=tr.id,
            detail={"reason": reason, "attempt": tr.attempt},
        )

    def _move_running(self, now_s: float, actions: list[Action]) -> None:
        """Evict the started request that saves the most time resumed on another
        instance holding its model, if it saves at least half (see the module
        docstring); it lands there in :meth:`_land_moved`."""
        up = [i for i in self._insts.values() if i.status is InstStatus.UP and i.model]
        step_s = {i.spec.id: (self._mean_step_s(i, 0), self._mean_step_s(i, 1)) for i in up}
        best: tuple[float, Tracked, InstanceRecord, InstanceRecord] | None = None
        for dst in up:
            if dst.evicting or dst.unstarted:
                continue  # prompts wait there: no room to start one at once
            for src in up:
                # NOTE: a first test per pair, at each one's mean request (tested request
                # by request, the look took a fifth of sim_speed's trace replay); it may
                # pass over a move the test per request would make (in D at 1.5x, seed 2,
                # `heuristic` ended at 85.3 % with it, 84.9 % without)
                if (
                    src is dst
                    or src.model != dst.model
                    or 2 * step_s[dst.spec.id][1] > step_s[src.spec.id][0]
                ):
                    continue
                for tr in src.inflight.values():
                    if (
                        tr.first_token_s is None
                        or not tr.resumable
                        or tr.evictions >= self.config.max_evictions
                    ):
                        continue
                    saved_s = self._move_saves_s(tr, src, dst, now_s)
                    if saved_s > 0 and (best is None or saved_s > best[0]):
                        best = (saved_s, tr, src, dst)
        if best is not None:
            saved_s, tr, src, dst = best
            self._evict(src, tr, f"moved to {dst.spec.id} ({saved_s:.0f} s sooner)", now_s, actions)
            self._moving[tr.id] = dst

    def _mean_step_s(self, inst: InstanceRecord, joining: int) -> float:
        """A decode step of ``inst`` at its current load, ``joining`` more requests of its
        mean context (prompt + expected output) beside it."""
        n = len(inst.inflight)
        context = inst.kv_tokens * (n + joining) // n if n else 0
        return self._perf[(inst.model or "", inst.spec.gpu)].decode_step_s(n + joining, context)

    def _move_saves_s(
        self, tr: Tracked, src: InstanceRecord, dst: InstanceRecord, now_s: float
    ) -> float:
        """Seconds ``tr``, decoding on ``src``, would finish sooner resumed on ``dst``
        now; 0 unless it takes at most half as long there, and ``dst`` would start it at
        once."""
        perf_dst = self._perf[(tr.request.model, dst.spec.gpu)]
        step_src, step_dst = self._step_s(tr, src), self._step_s(tr, dst, joining=True)
        if 2 * step_dst > step_src:  # decoding alone is not twice as fast there
            return 0.0
        generated = tr.kept_tokens + generated_tokens(tr, src, self._perf, now_s)
        left = self._left_tokens(tr.request, generated)
        stay_s = left * step_src
        move_s = perf_dst.prefill_time_s(tr.request.prompt_tokens + generated) + left * step_dst
        if 2 * move_s > stay_s or not self._starts_at_once(dst, tr, perf_dst):
            return 0.0
        return stay_s - move_s

    def _land_moved(self, now_s: float, actions: list[Action]) -> None:
        """Dispatch the requests :meth:`_move_running` evicted, once re-queued, where they
        move (if it can still take them; else they wait for the plan like any other)."""
        for rid, dst in list(self._moving.items()):
            tr = self._reqs[rid]
            if tr.state is ReqState.EVICTED:
                continue  # the engine has not confirmed the abort yet
            del self._moving[rid]
            if (
                tr.state is not ReqState.WAITING
                or dst.status is not InstStatus.UP
                or dst.model != tr.request.model
                or not self._can_pull(dst, tr)
            ):
                continue
            self._queues.leave(tr)  # a re-plan may have queued it meanwhile
            self._start(dst, tr, now_s, tr.slo.priority, actions)

    def _load(self, inst: InstanceRecord, model: str, now_s: float, actions: list[Action]) -> None:
        """Start loading ``model`` on a drained instance."""
        gpu = inst.spec.gpu
        sleep_current = self._release(inst)[1]
        asleep = model in inst.sleeping
        inst.ready_at_s = now_s + self._load_time(inst, model)
        inst.load_kind = "wake" if asleep and self._perf[(model, gpu)].supports_sleep else "swap"
        inst.load_from, inst.model = inst.model, model
        inst.load_started_s = now_s
        inst.status = InstStatus.LOADING
        if sleep_current and inst.load_from is not None:
            inst.sleeping.add(inst.load_from)
            self._log.add(now_s, "sleep", inst.spec.id, inst.load_from)
        inst.sleeping.discard(model)
        actions.append(LoadModel(inst.spec.id, model, sleep_current))

    def _load_time(self, inst: InstanceRecord, model: str) -> float:
        from_perf, sleep = self._release(inst)
        to_perf = self._perf[(model, inst.spec.gpu)]
        return swap_time_s(to_perf, from_perf, model in inst.sleeping, sleep_current=sleep)

    def _release(self, inst: InstanceRecord) -> tuple[PerfModel | None, bool]:
        """(profile of the resident model or None, whether a swap puts it to sleep: only
        where its profile supports sleep and the instance keeps it warm)."""
        from_perf = self._perf.get((inst.model, inst.spec.gpu)) if inst.model else None
        sleeps = (
            from_perf is not None and from_perf.supports_sleep and inst.spec.keeps_warm(inst.model)
        )
        return from_perf, sleeps

    def _service_s(self, tr: Tracked, inst: InstanceRecord) -> float:
        """Estimated time from dispatch to finish of ``tr`` at the instance's current load."""
        perf = self._perf[(tr.request.model, inst.spec.gpu)]
        out = tr.remaining_output_tokens  # a resumed request only generates the rest
        return perf.prefill_time_s(tr.request.prompt_tokens) + out * self._step_s(tr, inst)

    def _step_s(self, tr: Tracked, inst: InstanceRecord, joining: bool = False) -> float:
        """A decode step of ``tr``'s model on ``inst`` at its current load (``joining``:
        with ``tr`` added to it)."""
        perf = self._perf[(tr.request.model, inst.spec.gpu)]
        return perf.decode_step_s(*inst.decode_load(tr, joining))


def _first_token_alone_s(perf: PerfModel, prompt_tokens: int, batch: int, context: int) -> float:
    """The planner's first-token time of one prompt beside ``batch - 1`` decodes.

    NOTE: callers pass :meth:`InstanceRecord.decode_load`'s context, the batch's summed,
    where :func:`~qlmctl.plan.problem.first_token_s` reads one sequence's: the decode
    term grows with the batch squared (a 2,000-token prompt beside 136 running on an
    A100: about 5 s, not 0.3 s), so a busy instance defers heads early. Measured
    (2026-12-02, ``heuristic``, three seeds at the reference loads): the per-sequence
    context defers fewer heads and scores 78.1 / 76.1 / 86.1 / 66.4 / 75.3 against
    84.7 / 85.0 / 88.0 / 68.6 / 77.6; adding the engine's prefill backlog gives
    84.1 / 79.0 / 87.6 / 69.9 / 79.4; deferring also what the plan expects to miss,
    82.5 / 80.3 / 87.9 / 69.7 / 78.3. Again with groups of like lengths (2026-12-05,
    78c0884, whose shedding walk gives up long prompts itself): the per-sequence context
    73.0 / 79.1 / 75.5 / 84.0 / 84.6 against 77.3 / 80.4 / 80.9 / 86.4 / 85.2. Kept
    until a deferral rule from the engine's real wait does better (issue 13)."""
    return float(first_token_s(perf, float(prompt_tokens), batch, context))


def _defer(
    vq: deque[QueuedGroup], group: QueuedGroup, request_id: str, due_by_s: float, filled: int
) -> int:
    """Queue ``request_id`` of ``group`` (``vq``'s head) behind the groups of ``vq`` due
    by ``due_by_s`` and the requests deferred before it, ahead of the first group due
    later (``CoreConfig.defer_horizon_s``); the position of the deferred group it joins.

    ``filled``: the position this returned for the last request deferred in ``vq`` with
    the same ``due_by_s`` (0: none). Every group up to it is passed over again, so the
    walk starts after it (a burst of late heads defers hundreds at once, and the walk
    from the head made each one pass the whole queue)."""
    pos = filled + 1
    for later in itertools.islice(vq, pos, None):
        if not (later.deferred or later.plan.deadline_s <= due_by_s):
            break
        pos += 1
    before = vq[pos - 1]
    if before.deferred and before.plan is group.plan:
        before.ids.append(request_id)
        return pos - 1
    vq.insert(pos, QueuedGroup(group.plan, deque([request_id]), deferred=True))
    return pos


def _late_by_plan(group: PlannedGroup, request_id: str, now_s: float) -> bool:
    """Whether waiting for a slot makes ``request_id`` of ``group`` late: the plan said it
    more likely misses than not, or the start the plan predicted for it has passed."""
    if not group.request_miss_probability:
        return group.miss_probability >= 0.5 or now_s > group.predicted_start_s
    k = group.request_ids.index(request_id)
    return group.request_miss_probability[k] >= 0.5 or now_s > group.request_start_s[k]
