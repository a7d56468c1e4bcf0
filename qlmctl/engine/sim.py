"""A simulated vLLM cluster in virtual time: the engine the simulated driver talks to.

:class:`SimEngine` speaks the same events as the real vLLM driver (``engine/events.py``):
the core calls its verbs (``submit``, ``abort``, ``load_model``, ``fail``) at a time
``now_s`` and collects what happened with ``advance(until_s)``. Each instance is a
:class:`~qlmctl.engine.sim_instance.SimInstance` (vLLM V1 batching, KV cache, preemption);
step durations come from the instance's :class:`~qlmctl.perfmodel.PerfModel`.

Rules of time, which make a run deterministic:

- one heap of internal events keyed ``(time_s, kind, seq)``; the engine owns ``seq``, so
  ties resolve in creation order, and ``kind`` orders step ends before model loads
  completing before step starts at the same instant;
- a verb at ``now_s`` first runs every internal event up to ``now_s`` (step starts due at
  exactly ``now_s`` excepted), so verbs at one instant are batched: requests submitted
  together to an idle instance start in the same step;
- ``advance(until_s)`` runs everything up to ``until_s`` and returns the engine events
  with ``time_s <= until_s`` in time order; it starts the steps due at ``until_s``, so a
  request submitted at exactly ``until_s`` afterwards joins the step after those;
- each instance has at most one pending step or load event; a token invalidates it when
  a verb changes the instance (a cut-short multi-step, a failure, a swap). Entries into
  the engine and delayed reports (below) are heap events of their own, carrying the
  request, skipped when the request was aborted meanwhile.

What real ``vllm serve`` adds around the engine (measured by ``qlmctl profile``, see
``perfmodel.py``; both 0 in older profiles, which then behave as before):

- the API server takes requests in one at a time: on each instance, requests reach the
  engine's waiting queue ``admission_gap_s`` apart (the k-th of a burst sent at t enters
  at ``t + k * admission_gap_s``; a lone request enters at once). Until then a request
  is not in ``num_waiting`` (vLLM's ``/metrics`` does not count it either);
- each request's first token and its finish reach the client ``ttft_overhead_s`` after
  the engine step that produced them (the engine frees the KV at the step's end). This
  is how :func:`~qlmctl.profile.fit.predict_batch`, which the profile is fitted with,
  reads the same two numbers, so the fit and the simulator agree on a burst.

Evicting a request whose finish is already on its way to the client is a no-op: the
Finished event still arrives (the core counts it as finished).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import replace

from qlmctl.domain import ClusterSpec, InstanceSpec, Request
from qlmctl.engine.events import (
    Aborted,
    EngineEvent,
    Finished,
    FirstToken,
    InstanceDown,
    InstanceReady,
)
from qlmctl.engine.sim_instance import EnginePhase, SeqPhase, SimInstance, SimRequest
from qlmctl.errors import BadInput, EngineError
from qlmctl.perfmodel import PerfModel, swap_time_s

SCHEDULING = ("fcfs", "priority")
# Event kinds, in tie order: reports; entries before a step ends at the same instant, so
# the entering request joins the next step; step ends; model loads; step starts.
_REPORT, _ENTER, _STEP_END, _READY, _STEP_START = 0, 1, 2, 3, 4
_Payload = SimRequest | tuple[FirstToken | Finished, SimRequest]


class SimEngine:
    """vLLM V1 instances simulated from profiles; see the module docstring for time rules."""

    def __init__(
        self,
        cluster: ClusterSpec,
        perf: Mapping[tuple[str, str], PerfModel],
        *,
        scheduling: str = "fcfs",
        start_s: float = 0.0,
    ) -> None:
        """Instances start with their resident model ready (no event).

        Args:
            cluster: the instances; ``perf`` must cover each resident model on its GPU.
            perf: profiles by ``(model, gpu)``.
            scheduling: order inside each instance, ``fcfs`` or ``priority`` (lower
                ``priority`` first, then submission order).
            start_s: the clock's start.
        """
        if scheduling not in SCHEDULING:
            raise BadInput(f"unknown scheduling {scheduling!r}; valid: {', '.join(SCHEDULING)}")
        for p in perf.values():
            if p.max_num_seqs > p.max_num_batched_tokens:
                raise BadInput(
                    f"profile {p.model}@{p.gpu}: max_num_seqs ({p.max_num_seqs}) exceeds "
                    f"max_num_batched_tokens ({p.max_num_batched_tokens}); vLLM refuses that"
                )
        self._perf = dict(perf)
        self._specs = {spec.id: spec for spec in cluster.instances}
        self._instances = [SimInstance(s.id, scheduling == "priority") for s in cluster.instances]
        self._by_id = {inst.id: k for k, inst in enumerate(self._instances)}
        for spec, inst in zip(cluster.instances, self._instances, strict=True):
            if spec.model is not None:
                inst.perf = self._perf_for(spec, spec.model)
                inst.model, inst.phase = spec.model, EnginePhase.READY
            inst.asleep.update(m for m in spec.warm or () if m != spec.model)
        self._priority = scheduling == "priority"
        # time, kind, seq, instance index, token (-1: an entry or report, see _payloads)
        self._heap: list[tuple[float, int, int, int, int]] = []
        self._payloads: dict[int, _Payload] = {}  # seq -> request entering, or report
        self._api_free_s = [start_s] * len(self._instances)  # when each API server is free
        self._seq = 0
        self._now = start_s
        self._order = 0  # submissions so far
        self._pending: list[EngineEvent] = []  # happened, not yet returned by advance
        self._where: dict[str, tuple[SimInstance, SimRequest]] = {}  # request id -> place

    # ---- verbs -------------------------------------------------------------------

    def submit(
        self,
        request: Request,
        instance_id: str,
        priority: int,
        now_s: float,
        kept_tokens: int = 0,
    ) -> None:
        """Queue ``request`` on ``instance_id`` at ``now_s``.

        ``kept_tokens`` > 0 resumes it (see ``Dispatch``): its prompt is the original one
        plus that much output, served from the instance's prefix cache as far as the
        blocks it left there when it was evicted are still cached (see
        :class:`~qlmctl.engine.sim_instance.SimInstance`), and only the rest of its output
        is generated (and reported).

        An instance that is not ready, serves another model, or cannot hold the request's
        prompt plus output in its KV cache answers with an immediate Aborted (reason
        ``unavailable``, ``model-mismatch``, or ``too-long`` which is not retryable).
        ``priority`` counts only under priority scheduling.
        """
        inst = self._enter(instance_id, now_s)
        if request.id in self._where:
            raise EngineError(
                f"request {request.id!r} is already on {self._where[request.id][0].id}"
            )
        target = request.target_output_tokens - kept_tokens
        reason = None
        if inst.phase is not EnginePhase.READY:
            reason = "unavailable"
        elif request.model != inst.model:
            reason = "model-mismatch"
        elif (
            inst.perf is not None
            and request.prompt_tokens + request.target_output_tokens > inst.perf.kv_capacity_tokens
        ):
            reason = "too-long"
        if reason is not None:
            self._pending.append(
                Aborted(request.id, inst.id, now_s, 0, reason, retryable=reason != "too-long")
            )
            return
        self._order += 1
        if target <= 0:  # evicted as it produced its last token: nothing left to do
            self._pending.append(FirstToken(request.id, inst.id, now_s))
            self._pending.append(Finished(request.id, inst.id, now_s, 0))
            return
        req = SimRequest(
            request.id,
            request.prompt_tokens + kept_tokens,
            target,
            priority if self._priority else 0,
            self._order,
        )
        self._where[request.id] = (inst, req)
        k = self._by_id[inst.id]
        enter_s = max(now_s, self._api_free_s[k])
        assert inst.perf is not None
        self._api_free_s[k] = enter_s + inst.perf.admission_gap_s
        if enter_s > now_s:
            inst.arrive(req)
            self._push_payload(enter_s, _ENTER, k, req)
        else:
            inst.enqueue(req)
            self._touch(inst, now_s)

    def abort(self, request_id: str, now_s: float) -> None:
        """Evict ``request_id`` (Aborted, reason ``evicted``); a no-op if it already left
        or finished (its Finished may still be on its way: see the module docstring)."""
        self._sync(now_s)
        place = self._where.get(request_id)
        if place is None or place[1].phase is SeqPhase.DONE:
            return
        del self._where[request_id]
        inst, req = place
        tokens = inst.evict(req, now_s)
        self._pending.append(Aborted(request_id, inst.id, now_s, tokens, "evicted"))
        self._touch(inst, now_s)

    def load_model(
        self, instance_id: str, model: str, now_s: float, sleep_current: bool = False
    ) -> None:
        """Swap ``instance_id`` to ``model``: InstanceDown(``swap``) now, InstanceReady later.

        The delay is :func:`~qlmctl.perfmodel.swap_time_s` (a wake if ``model`` sleeps
        here); ``sleep_current`` puts the resident model to sleep where supported. Requests
        on the instance are aborted (reason ``swap``). Loading the model already served
        only reports InstanceReady now; a failed instance cold-starts.
        """
        inst = self._enter(instance_id, now_s)
        perf_to = self._perf_for(self._specs[instance_id], model)
        if inst.phase is EnginePhase.LOADING:
            raise EngineError(f"can't load a model on instance {instance_id!r} while it is loading")
        if inst.phase is EnginePhase.READY and inst.model == model:
            self._pending.append(InstanceReady(instance_id, now_s, model))
            return
        perf_from = inst.perf if inst.phase is EnginePhase.READY else None
        delay_s = swap_time_s(perf_to, perf_from, model in inst.asleep, sleep_current=sleep_current)
        self._take_down(inst, now_s, "swap")
        if perf_from is not None and sleep_current and perf_from.supports_sleep:
            inst.asleep.add(perf_from.model)
        inst.asleep.discard(model)
        inst.model, inst.perf, inst.phase = model, perf_to, EnginePhase.LOADING
        self._push(now_s + delay_s, _READY, inst)

    def fail(self, instance_id: str, now_s: float) -> None:
        """Crash ``instance_id``: InstanceDown(``failed``) and a retryable Aborted per request.

        Sleeping models are lost; ``load_model`` restarts the instance with a cold start.
        """
        inst = self._enter(instance_id, now_s)
        if inst.phase is EnginePhase.DOWN:
            return
        self._take_down(inst, now_s, "failed")
        inst.phase = EnginePhase.DOWN
        inst.asleep.clear()

    # ---- time --------------------------------------------------------------------

    def next_event_time(self) -> float | None:
        """When the next event happens (internal ones included), None when all is quiet."""
        if self._pending:
            return self._now  # already happened, waiting for advance
        heap = self._heap
        while heap and self._stale(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def advance(self, until_s: float) -> list[EngineEvent]:
        """Run to ``until_s``; every event with ``time_s <= until_s``, in time order."""
        self._check_time(until_s)
        self._run(until_s, defer_starts=False)
        self._now = until_s
        out, self._pending = self._pending, []
        return out

    def num_waiting(self, instance_id: str) -> int:
        """Requests in the waiting queue of ``instance_id`` (as vLLM's ``/metrics`` says)."""
        return self._instances[self._by_id[instance_id]].num_waiting

    def cached_tokens(self, request_id: str) -> int | None:
        """Prompt tokens the prefix cache served to the last admission of ``request_id``
        (None if it was never admitted); forgotten once read."""
        for inst in self._instances:
            if request_id in inst.cache_hits:
                return inst.cache_hits.pop(request_id)
        return None

    @property
    def num_preemptions(self) -> int:
        """Recompute preemptions so far, over all instances."""
        return sum(inst.num_preemptions for inst in self._instances)

    # ---- internals ---------------------------------------------------------------

    def _run(self, limit_s: float, defer_starts: bool) -> None:
        """Process internal events up to ``limit_s``; engine events go to ``_pending``."""
        heap, instances, out = self._heap, self._instances, self._pending
        while heap:
            t, kind, seq, k, token = heap[0]
            if t > limit_s or (defer_starts and t == limit_s and kind == _STEP_START):
                break
            heapq.heappop(heap)
            inst = instances[k]
            if kind == _REPORT:
                self._release(self._payloads.pop(seq))
            elif kind == _ENTER:
                self._enter_engine(inst, self._payloads.pop(seq), t)
            elif token != inst.token:
                continue
            elif kind == _STEP_END:
                first = len(out)
                inst.end_step(t, out)
                self._report(inst, first)
                if defer_starts and t == limit_s:
                    self._push(t, _STEP_START, inst)
                else:
                    self._start(inst, t)
            elif kind == _STEP_START:
                self._start(inst, t)
            else:
                inst.has_event = False
                inst.phase = EnginePhase.READY
                assert inst.model is not None
                out.append(InstanceReady(inst.id, t, inst.model))

    def _stale(self, entry: tuple[float, int, int, int, int]) -> bool:
        """Whether a heap entry was invalidated (only step and load events can be)."""
        return entry[4] >= 0 and entry[4] != self._instances[entry[3]].token

    def _enter_engine(self, inst: SimInstance, payload: _Payload, now_s: float) -> None:
        """The API server hands a request to the engine (unless it was aborted)."""
        assert isinstance(payload, SimRequest)
        if payload.phase is SeqPhase.ARRIVING:
            inst.enqueue(payload)
            self._touch(inst, now_s)

    def _report(self, inst: SimInstance, first: int) -> None:
        """Send the step's events in ``_pending[first:]`` to the client, each
        ``ttft_overhead_s`` late (now if 0)."""
        assert inst.perf is not None
        overhead_s = inst.perf.ttft_overhead_s
        if overhead_s <= 0:
            self._forget(first)
            return
        k = self._by_id[inst.id]
        for event in self._pending[first:]:
            assert isinstance(event, FirstToken | Finished)
            req = self._where[event.request_id][1]
            late = replace(event, time_s=event.time_s + overhead_s)
            self._push_payload(late.time_s, _REPORT, k, (late, req))
        del self._pending[first:]

    def _release(self, payload: _Payload) -> None:
        """A delayed report reaches the client, unless its request was aborted since."""
        assert isinstance(payload, tuple)
        event, req = payload
        if req.phase is SeqPhase.ABORTED:
            return
        self._pending.append(event)
        if isinstance(event, Finished):
            self._where.pop(event.request_id, None)

    def _push_payload(self, time_s: float, kind: int, k: int, payload: _Payload) -> None:
        self._seq += 1
        self._payloads[self._seq] = payload
        heapq.heappush(self._heap, (time_s, kind, self._seq, k, -1))

    def _start(self, inst: SimInstance, now_s: float) -> None:
        end_s = inst.start_step(now_s)
        if end_s is None:
            inst.has_event = False
        else:
            self._push(end_s, _STEP_END, inst)

    def _push(self, time_s: float, kind: int, inst: SimInstance) -> None:
        """Schedule ``inst``'s one pending event, invalidating any earlier one."""
        inst.token += 1
        inst.has_event = True
        self._seq += 1
        heapq.heappush(self._heap, (time_s, kind, self._seq, self._by_id[inst.id], inst.token))

    def _touch(self, inst: SimInstance, now_s: float) -> None:
        """The waiting queue or batch of ``inst`` changed at ``now_s``: reschedule it."""
        if inst.stepping:
            end_s = inst.truncate(now_s)
            if end_s is not None:
                self._push(end_s, _STEP_END, inst)
        elif not inst.has_event:
            self._push(now_s, _STEP_START, inst)

    def _take_down(self, inst: SimInstance, now_s: float, reason: str) -> None:
        self._pending.append(InstanceDown(inst.id, now_s, reason))
        first = len(self._pending)
        inst.drain(now_s, reason, self._pending)
        self._forget(first)
        inst.token += 1
        inst.has_event = False

    def _forget(self, first: int) -> None:
        """Drop the requests that finished or aborted in ``_pending[first:]``."""
        for event in self._pending[first:]:
            if isinstance(event, Finished | Aborted):
                self._where.pop(event.request_id, None)

    def _enter(self, instance_id: str, now_s: float) -> SimInstance:
        """Bring the engine to ``now_s`` before a verb on ``instance_id``."""
        if instance_id not in self._by_id:
            raise BadInput(f"unknown instance {instance_id!r}; the engine has {list(self._by_id)}")
        self._sync(now_s)
        return self._instances[self._by_id[instance_id]]

    def _sync(self, now_s: float) -> None:
        """Run internal events up to ``now_s``, leaving step starts at ``now_s`` for later."""
        self._check_time(now_s)
        self._run(now_s, defer_starts=True)
        self._now = now_s

    def _check_time(self, now_s: float) -> None:
        if now_s < self._now:
            raise EngineError(f"time went backwards: {now_s} s after {self._now} s")

    def _perf_for(self, spec: InstanceSpec, model: str) -> PerfModel:
        if not spec.can_serve(model) and model != spec.model:
            raise BadInput(f"instance {spec.id!r} may not serve model {model!r}")
        try:
            return self._perf[(model, spec.gpu)]
        except KeyError:
            raise BadInput(
                f"no profile for model {model!r} on gpu {spec.gpu!r} (instance {spec.id!r})"
            ) from None
