"""The serving core: turns arrivals, engine events and plans into dispatches, evictions, swaps.

Sans-I/O, like h11's ``Connection``: facts go in (:meth:`ServeCore.on_arrival`,
:meth:`~ServeCore.on_event`, :meth:`~ServeCore.on_plan`, :meth:`~ServeCore.on_backpressure`),
decisions come out (:meth:`~ServeCore.decide` -> actions, :meth:`~ServeCore.next_wakeup_s`,
:meth:`~ServeCore.wants_improvement`), and run-log rows are collected for the driver
(:meth:`~ServeCore.take_log`). It never reads a clock: every fact carries ``now_s``.

How it works (the core keeps the records and handles the events; two helpers it owns do
the rest, on the same records):

* **Plan -> virtual queues.** A re-plan (on re-queues, instance changes, an instance
  running dry and predicted violations, at most every ``replan_min_interval_s``; on
  arrivals alone, every ``arrival_replan_share`` of the tightest TTFT target, if longer:
  :meth:`CoreConfig.arrival_replan_s`) asks the policy for a plan
  over the waiting requests (:meth:`~ServeCore.snapshot`; under a flood the
  ``max_planned`` most urgent) and rebuilds one virtual queue
  per instance: its groups in order, each a FIFO of request ids
  (:class:`~qlmctl.serve.queues.VirtualQueues`). A background improvement (the MILP) may
  replace the plan later through :meth:`~ServeCore.on_plan`; it is offered a snapshot
  only when the fast plan expects some waiting request to miss and some to be met.
* **Dispatch on arrival.** While nothing waits, a new request goes straight to an
  instance holding its model that would start prefilling it at once (nothing sent there
  still waiting for its first token, a free sequence, KV room): the one where its first
  token comes first. There is no queue to order, so a plan could only pick the instance;
  a burst or a backlog is planned (``CoreConfig.dispatch_on_arrival``; never for a
  policy whose plans place requests before they arrive, ``ServingStyle.places_ahead``).
* **Serving operations.** At each decision every up instance pulls the head of its
  virtual queue under backpressure (a head already too late for its deadline waits
  behind the rest), evicts less urgent work for a head that would miss its deadline, or
  drains and swaps to the head group's model (:class:`~qlmctl.serve.operations.ServingOps`).
* **Faults.** An instance that goes down has its in-flight requests re-queued (a failed
  attempt); after ``max_attempts`` failures a request is FAILED. A non-retryable abort
  (HTTP 4xx) is REJECTED at once. Every accepted request ends in exactly one final state,
  one run-log row per attempt (:meth:`ServeCore._end`).

NOTE: cost per event is O(1) in the number of requests; a re-plan is O(W log W) in the
waiting requests and is rate-limited; virtual queues drop stale ids lazily at their head.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import fields
from typing import Any

import numpy as np

from qlmctl.domain import ClusterSpec, Request, SLOClass
from qlmctl.engine.events import (
    Aborted,
    Action,
    EngineEvent,
    Evict,
    Finished,
    FirstToken,
    InstanceDown,
    InstanceReady,
)
from qlmctl.errors import BadInput
from qlmctl.perfmodel import PerfModel
from qlmctl.plan.estimator import ARRIVAL_HORIZON_S
from qlmctl.plan.types import Plan, Policy, QueueSnapshot, SolverStats
from qlmctl.serve.calibration import SpeedCalibration
from qlmctl.serve.config import (
    CoreConfig,
    CoreStats,
    ImproveFn,
    left_estimator,
    length_estimator,
    length_observer,
    split_policy,
)
from qlmctl.serve.operations import ServingOps
from qlmctl.serve.queues import VirtualQueues, instance_state, what_is_left
from qlmctl.serve.recent import RecentWindow
from qlmctl.serve.runlog import OperationLog, Outcome
from qlmctl.serve.state import InstanceRecord, InstStatus, ReqState, Tracked

# a snapshot carries this much arrival history (the rates' fit), as long as the rates are
# expected to hold
ARRIVAL_WINDOW_S = ARRIVAL_HORIZON_S
# NOTE: a re-plan row copies these shallowly: dataclasses.asdict (a deep copy) cost more
# than the rest of the row
_SOLVER_FIELDS = tuple(f.name for f in fields(SolverStats))
# final verb -> the outcome it logs
_FINAL_OUTCOME = {
    "finish": Outcome.FINISHED,
    "fail": Outcome.FAILED,
    "reject": Outcome.REJECTED,
    "cancel": Outcome.CANCELLED,
}


class ServeCore:
    """The event-driven serving core (see the module docstring)."""

    def __init__(
        self,
        cluster: ClusterSpec,
        slo_classes: Mapping[str, SLOClass],
        perf: Mapping[tuple[str, str], PerfModel],
        policy: Policy,
        config: CoreConfig | None = None,
        rng: np.random.Generator | None = None,
        *,
        log_wall_times: bool = True,
    ) -> None:
        """Args:
        cluster: the instances (all start UP with their resident model).
        slo_classes: class name -> SLO class of every request that will arrive.
        perf: (model, gpu) -> performance model, for snapshots and estimates.
        policy: a :class:`~qlmctl.plan.types.Policy`; see :func:`split_policy` for
            how its fast answer and its background improvement are found.
        config: the core's knobs.
        rng: the only source of randomness, passed to the policy.
        log_wall_times: write the policy's wall-clock solve times into the re-plan rows;
            False keeps every row a function of the inputs and seed (the simulated driver)
            and only totals them in ``stats().solver_wall_s``.
        """
        self.cluster = cluster
        self.config = config or CoreConfig()
        self._slo = dict(slo_classes)
        # Profiles as observed: step times scaled by the speed seen so far (or as given).
        self._speed = SpeedCalibration(perf) if self.config.calibrate_speed else None
        self._perf = self._speed.current if self._speed is not None else perf
        self.policy_name: str = policy.name
        self._dispatch_on_arrival = (
            self.config.dispatch_on_arrival and not policy.serving.places_ahead
        )
        self._fast, improver = split_policy(policy)
        self._observe = length_observer(policy)  # output lengths seen, for its estimates
        self._expected_tokens = length_estimator(policy)  # request -> expected output tokens
        self._rng = rng if rng is not None else np.random.default_rng(0)
        # the slow improvement (the MILP) the driver runs on wants_improvement() snapshots
        self.improver: ImproveFn | None = improver if self.config.improve else None
        self._insts = {i.id: InstanceRecord(i, i.model) for i in cluster.instances}
        for i in cluster.instances:  # models kept warm start asleep beside the resident one
            self._insts[i.id].sleeping.update(m for m in i.warm or () if m != i.model)
        self._reqs: dict[str, Tracked] = {}
        self._waiting: dict[str, Tracked] = {}  # id -> record, every WAITING request
        # arrivals since the last re-plan not dispatched yet, in arrival order
        self._unplanned: list[Tracked] = []
        self._queues = VirtualQueues(self._insts, self._reqs, self._waiting)
        self._log = OperationLog()
        self._ops = ServingOps(
            self.config, self._perf, self._insts, self._reqs, self._waiting, self._queues,
            self._log, left_estimator(policy),
        )  # fmt: skip
        self._recent = RecentWindow(ARRIVAL_WINDOW_S)
        self._first_arrival_s = math.inf
        self._replan_at_s = math.inf  # when the re-plan asked for is due (inf: none asked)
        self._last_replan_s = -math.inf
        self._next_check_s: float | None = None
        self._offer: QueueSnapshot | None = None
        self._improving = False
        self._last_improve_s = -math.inf
        self._topology = 0  # bumped when an instance goes down or comes back
        self._offer_topology = 0
        self._attempt_rows: list[dict[str, Any]] = []
        self._final: Counter[ReqState] = Counter()
        self._met_by_class: dict[str, list[int]] = {c: [0, 0] for c in self._slo}
        self._now = 0.0
        self._log_wall_times = log_wall_times
        self._solver_wall_s = 0.0  # build + solve time of every plan taken (wall clock)

    # ---- facts in -------------------------------------------------------------------

    def on_arrival(self, request: Request, now_s: float, resumable: bool = True) -> None:
        """A request joined the queue; it is planned at the next (rate-limited) re-plan.

        ``resumable``: an attempt cut mid-stream can be continued (False: it is never
        evicted or moved once its first token came; a live client's ``n`` > 1, say)."""
        if request.id in self._reqs:
            raise BadInput(f"request {request.id!r} arrived twice")
        if request.slo_class not in self._slo:
            raise BadInput(f"request {request.id!r}: unknown SLO class {request.slo_class!r}")
        tr = Tracked(
            request, self._slo[request.slo_class], self._expected_tokens(request),
            resumable=resumable,
        )  # fmt: skip
        self._reqs[request.id] = tr
        self._waiting[request.id] = tr
        self._unplanned.append(tr)
        self._recent.add(request)
        self._first_arrival_s = min(self._first_arrival_s, now_s)
        self._replan_after(self.config.arrival_replan_s(c.ttft_s for c in self._slo.values()))
        self._now = now_s

    def add_slo_class(self, slo: SLOClass) -> None:
        """A class defined while serving (an OpenAI Batch's completion window).

        Adding a class again is a no-op; another class of the same name is refused.
        """
        known = self._slo.get(slo.name)
        if known is not None and known != slo:
            raise BadInput(f"SLO class {slo.name!r} already exists with other targets")
        self._slo[slo.name] = slo
        self._met_by_class.setdefault(slo.name, [0, 0])

    def on_event(self, event: EngineEvent, now_s: float) -> None:
        """An engine reported ``event``. Stale events (an attempt already ended) are ignored."""
        self._now = now_s
        if isinstance(event, InstanceReady | InstanceDown):
            self._on_instance_event(event, now_s)
            return
        tr = self._reqs.get(event.request_id)
        if (
            tr is None
            or tr.instance_id != event.instance_id
            or not (tr.state.in_flight or tr.state is ReqState.EVICTED)
        ):
            return
        if isinstance(event, FirstToken):
            if tr.state is ReqState.DISPATCHED:
                tr.move("start")
                inst = self._insts[event.instance_id]
                inst.started(tr)
                tr.first_token_s = event.time_s
                if tr.first_output_s is None:
                    tr.first_output_s = event.time_s
                if inst.engine_waiting:  # it runs: no longer in the engine's queue
                    inst.engine_waiting -= 1
                p = tr.request.prompt_tokens
                inst.prefilled = (inst.prefilled[0] + p, inst.prefilled[1] + p * p)
                tr.prefilled_mark = inst.prefilled
        elif isinstance(event, Finished):
            inst = self._insts[event.instance_id]
            if self._speed is not None:
                self._speed.observe_finish(tr, inst, event.time_s, event.output_tokens)
            total = tr.kept_tokens + event.output_tokens  # a resumed attempt adds to its kept
            self._end(tr, event.time_s, "finish", total, "")
            if self._observe is not None:
                self._observe(tr.request.model, tr.request.slo_class, total)
            if not self._queues[inst.spec.id] and self._waiting:
                self._replan_after()  # an instance ran dry while work waits elsewhere
        elif isinstance(event, Aborted):
            self._on_aborted(tr, event)

    def on_backpressure(
        self, instance_id: str, waiting: int | None, kv_usage: float | None
    ) -> None:
        """The engine's own queue length and KV usage (from vLLM ``/metrics``)."""
        inst = self._insts[instance_id]
        inst.engine_waiting, inst.kv_usage = waiting, kv_usage

    def on_plan(self, plan: Plan | None, now_s: float) -> None:
        """The background improver's answer for the last offered snapshot.

        None means it found nothing better. Requests the plan does not place (arrived
        since) keep their current places after it. The plan is dropped if an instance
        went down or came back since the snapshot was taken.
        """
        self._improving = False
        self._last_improve_s = now_s
        if plan is None or self._offer_topology != self._topology:
            why = "no better plan" if plan is None else "instances changed"
            self._log.add(
                now_s, "replan", detail={"source": "improver", "adopted": False, "why": why}
            )
            return
        self._queues.adopt(plan, keep_leftovers=True)
        self._log_replan(now_s, plan, "improver")

    def improvement_failed(self, now_s: float, error: str) -> None:
        """The improver raised; the fast plan stays in force."""
        self._improving = False
        self._last_improve_s = now_s
        self._log.add(now_s, "replan", detail={"source": "improver", "error": error})

    def cancel_all(self, now_s: float, reason: str = "run stopped") -> list[Evict]:
        """Stop: every request not yet ended is CANCELLED; abort those in flight."""
        return [e for r in list(self._reqs) for e in self.cancel(r, now_s, reason)]

    def cancel(self, request_id: str, now_s: float, reason: str) -> list[Evict]:
        """End one request as CANCELLED (its client went away); abort it if in flight.

        A request that already ended is left alone (no action).
        """
        tr = self._reqs[request_id]
        if tr.state.is_final:
            return []
        out = []
        if tr.instance_id is not None and tr.state is not ReqState.WAITING:
            out.append(Evict(tr.id, tr.instance_id, reason))
        self._end(tr, now_s, "cancel", None, reason)
        return out

    def refuse(self, request: Request, now_s: float, reason: str) -> None:
        """Admission control turned ``request`` away: one final ``rejected`` row, never queued."""
        self.on_arrival(request, now_s)
        self._end(self._reqs[request.id], now_s, "refuse", None, reason, outcome=Outcome.REJECTED)

    # ---- decisions out --------------------------------------------------------------

    def decide(self, now_s: float) -> list[Action]:
        """What to do now: new arrivals straight to an engine while nothing waits (see
        :meth:`_admit_fresh`), re-plan if due, then pull, evict or swap per instance."""
        self._now = now_s
        admitted = self._admit_fresh(now_s)
        if self._next_check_s is not None and now_s >= self._next_check_s:
            self._next_check_s = None
            if self._queues.off_plan(now_s, self.config.lag_tolerance_s):
                self._replan_after()  # a head group runs late, or capacity idles
        if now_s >= self._replan_at_s:
            self._replan(now_s)
        actions = admitted + self._ops.serve(now_s)
        if self._next_check_s is None and self._waiting:
            self._next_check_s = now_s + self.config.check_interval_s
        return actions

    def _admit_fresh(self, now_s: float) -> list[Action]:
        """Dispatch at once the requests that arrived since the last re-plan, in arrival
        order, while no other request waits (none planned, none re-queued), none after the
        next has an earlier deadline, and an engine would start it at once
        (:meth:`ServingOps.admit`); the first that fails, and every one after, waits (for
        a later decision, or the re-plan). With no queue and arrivals in deadline order
        there is nothing to order, and a plan would only pick the instance: this saves the
        re-plan's wait (up to :meth:`CoreConfig.arrival_replan_s`) and its cost, which
        under light load are most of a request's time in qlmctl."""
        if not self._dispatch_on_arrival or len(self._waiting) > len(self._unplanned):
            return []  # a backlog (or re-queued work): the new requests are planned with it
        fresh = self._unplanned = [t for t in self._unplanned if t.state is ReqState.WAITING]
        if not fresh or len(fresh) != len(self._waiting):
            return []
        actions: list[Action] = []
        soonest_after = [math.inf] * len(fresh)  # the earliest deadline of the later ones
        for k in range(len(fresh) - 2, -1, -1):
            soonest_after[k] = min(soonest_after[k + 1], fresh[k + 1].deadline_s)
        for tr, soonest in zip(fresh, soonest_after, strict=True):
            if tr.deadline_s > soonest or not self._ops.admit(tr, now_s, actions):
                break
        if actions:  # forget the dispatched now: one re-queued later is no new arrival
            self._unplanned = [t for t in fresh if t.state is ReqState.WAITING]
        if not self._waiting:
            self._replan_at_s = math.inf  # nothing to plan
        return actions

    def next_wakeup_s(self) -> float | None:
        """When :meth:`decide` should run again if no event comes first (absolute time)."""
        times = [self._ops.hint_s]
        if self._replan_at_s < math.inf:
            times.append(max(self._now, self._replan_at_s))
        if self._next_check_s is not None:
            times.append(self._next_check_s)
        t = min(times)
        return None if t == math.inf else t

    def wants_improvement(self) -> QueueSnapshot | None:
        """A snapshot for the background improver, once per due re-plan; None otherwise."""
        if self._offer is None or self._improving:
            return None
        snap, self._offer = self._offer, None
        self._improving = True
        self._offer_topology = self._topology
        return snap

    def take_log(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Run-log rows produced since the last call: (request attempts, operations)."""
        attempts, self._attempt_rows = self._attempt_rows, []
        return attempts, self._log.take()

    # ---- views ----------------------------------------------------------------------

    @property
    def plan(self) -> Plan | None:
        """The plan in force."""
        return self._queues.plan

    @property
    def done(self) -> bool:
        """Whether every request that arrived has ended."""
        return self._final.total() == len(self._reqs)

    def state_of(self, request_id: str) -> ReqState:
        """The state of one request (tests and drivers)."""
        return self._reqs[request_id].state

    def attempt_of(self, request_id: str) -> int:
        """The index of the request's current (or last) attempt."""
        return self._reqs[request_id].attempt

    def instance_status(self, instance_id: str) -> InstStatus:
        return self._insts[instance_id].status

    def speed_factors(self) -> dict[str, float]:
        """Observed / profiled step time per ``model@gpu`` (empty without calibration)."""
        return self._speed.factors() if self._speed is not None else {}

    def stats(self) -> CoreStats:
        """Counts so far (O(instances + classes))."""
        f = self._final
        return CoreStats(
            arrived=len(self._reqs),
            waiting=len(self._waiting),
            in_flight=sum(len(i.inflight) for i in self._insts.values()),
            finished=f[ReqState.FINISHED],
            slo_met=sum(m for m, _ in self._met_by_class.values()),
            failed=f[ReqState.FAILED],
            rejected=f[ReqState.REJECTED],
            cancelled=f[ReqState.CANCELLED],
            queued_by_instance={k: i.queued for k, i in self._insts.items()},
            in_flight_by_instance={k: len(i.inflight) for k, i in self._insts.items()},
            operations=dict(self._log.counts),
            met_by_class={c: (m, n) for c, (m, n) in self._met_by_class.items()},
            solver_wall_s=self._solver_wall_s,
        )

    # ---- planning -------------------------------------------------------------------

    def _replan_after(self, wait_s: float | None = None) -> None:
        """Ask for a re-plan ``wait_s`` (default ``replan_min_interval_s``) after the last
        one, or sooner if asked so before."""
        wait_s = self.config.replan_min_interval_s if wait_s is None else wait_s
        self._replan_at_s = min(self._replan_at_s, self._last_replan_s + wait_s)

    def _replan(self, now_s: float) -> None:
        self._replan_at_s = math.inf
        self._unplanned = []
        self._last_replan_s = now_s
        self._fail_unservable(now_s)
        if not self._waiting:
            self._queues.adopt(None, keep_leftovers=False)
            return
        snap = self.snapshot(now_s)
        plan = self._fast(snap, self._rng)
        self._queues.adopt(plan, keep_leftovers=False, must_place=snap.waiting)
        self._log_replan(now_s, plan, "policy")
        if (
            self.improver is not None
            and not self._improving
            and now_s >= self._last_improve_s + self.config.improve_min_interval_s
            and plan.predicted_attainment < plan.attainable - 1e-9
        ):
            # NOTE: only a plan that loses some request another plan could save leaves the
            # improver anything to win: it is adopted only when it scores strictly higher.
            # In a flood's tail, where what is not lost is due an hour later, a third of
            # the offers at 2x load and above in the policy benchmark had nothing to win
            self._offer = snap

    def snapshot(self, now_s: float) -> QueueSnapshot:
        """The queue as a policy sees it: waiting requests (at most ``max_planned``, see
        :meth:`_to_plan`) in arrival order, instances."""
        waiting = sorted(self._to_plan(now_s), key=lambda t: (t.request.arrival_s, t.id))
        return QueueSnapshot(
            now_s=now_s,
            waiting=tuple(what_is_left(t) for t in waiting),
            instances=tuple(
                instance_state(i, now_s, self._perf, *self.config.instance_caps)
                for i in self._insts.values()
            ),
            slo_classes=self._slo,
            perf=dict(self._perf),  # a copy: calibration must not move it under a planner
            recent=self._recent.arrivals(
                now_s, min(ARRIVAL_WINDOW_S, max(now_s - self._first_arrival_s, 0.0))
            ),
        )

    def _to_plan(self, now_s: float) -> Collection[Tracked]:
        """The waiting requests a re-plan plans: all, or under a flood the ``max_planned``
        with the earliest deadlines not yet passed, then the longest waiting.

        NOTE: a plan's cost grows faster than its size (about W^1.35 for the heuristic: 0.07
        s at 4,096 waiting, 0.4 s at 16,000), and a flood of waiting requests is more than
        the cluster can start before most deadlines pass; the rest wait unplanned.
        """
        cap = self.config.max_planned
        if cap is None or len(self._waiting) <= cap:
            return self._waiting.values()
        return heapq.nsmallest(cap, self._waiting.values(), key=lambda t: _urgency(t, now_s))

    def _fail_unservable(self, now_s: float) -> None:
        """Fail waiting requests that no live instance may ever serve."""
        live = [i.spec for i in self._insts.values() if i.status is not InstStatus.DOWN]
        if len(live) == len(self._insts) or not self._waiting:
            return
        for tr in list(self._waiting.values()):
            if not any(s.can_serve(tr.request.model) for s in live):
                self._end(tr, now_s, "fail", None, f"no live instance may serve {tr.request.model}")

    # ---- ends of attempts -------------------------------------------------------------

    def _on_aborted(self, tr: Tracked, ev: Aborted) -> None:
        tokens = tr.kept_tokens + ev.output_tokens  # the request's output so far
        if tr.state is ReqState.EVICTED or ev.reason in ("evicted", "swap"):
            reason = tr.evict_reason or ev.reason
            self._end(tr, ev.time_s, "requeue", tokens, reason, outcome=Outcome.EVICTED)
        elif not ev.retryable:
            self._end(tr, ev.time_s, "reject", tokens, ev.reason)
        else:
            self._fail_attempt(tr, ev.time_s, tokens, ev.reason)

    def _fail_attempt(self, tr: Tracked, now_s: float, tokens: int | None, reason: str) -> None:
        tr.failures += 1
        if tr.failures >= self.config.max_attempts:
            why = f"{reason} (gave up after {tr.failures} failed attempts)"
            self._end(tr, now_s, "fail", tokens, why)
        else:
            self._end(tr, now_s, "requeue", tokens, reason, outcome=Outcome.FAILED)

    def _end(
        self,
        tr: Tracked,
        now_s: float,
        verb: str,
        tokens: int | None,
        reason: str,
        outcome: Outcome | None = None,
    ) -> None:
        """End the current attempt of ``tr`` with ``verb`` and log it (the outcome a final
        verb implies, unless given: a re-queue says why)."""
        was_waiting = tr.state is ReqState.WAITING
        if tr.instance_id is not None and not was_waiting:
            inst = self._insts[tr.instance_id]
            inst.remove_inflight(tr)
            inst.evicting.pop(tr.id, None)
        tr.move(verb)
        outcome = outcome or _FINAL_OUTCOME[verb]
        self._attempt_rows.append(tr.attempt_row(now_s, outcome, tokens, reason))
        if verb == "requeue":
            # evict-and-resume: the next attempt starts after the output kept (unknown
            # progress, e.g. an instance that died: what was kept before)
            if not self.config.resume_evicted:
                tr.kept_tokens = 0
            elif tokens is not None:
                tr.kept_tokens = tokens
            self._attempt_rows[-1]["kept_tokens"] = tr.kept_tokens
            tr.reset_attempt()
            self._waiting[tr.id] = tr
            self._replan_after()
            return
        if was_waiting:
            del self._waiting[tr.id]
            self._queues.leave(tr)
        self._final[tr.state] += 1
        met = self._met_by_class[tr.request.slo_class]
        met[0] += bool(self._attempt_rows[-1]["slo_met"])
        met[1] += 1

    # ---- instances --------------------------------------------------------------------

    def _on_instance_event(self, ev: InstanceReady | InstanceDown, now_s: float) -> None:
        inst = self._insts[ev.instance_id]
        if isinstance(ev, InstanceReady):
            if inst.status is InstStatus.LOADING:
                self._log.add(
                    now_s,
                    inst.load_kind,
                    inst.spec.id,
                    ev.model,
                    inst.load_from,
                    duration_s=now_s - inst.load_started_s,
                )
            elif inst.status is InstStatus.DOWN:
                self._topology += 1
                self._log.add(now_s, "instance_up", inst.spec.id, ev.model)
            inst.status, inst.model = InstStatus.UP, ev.model
            self._replan_after()
            return
        if ev.reason == "swap" and inst.status is InstStatus.LOADING:
            return  # the expected first half of a load
        self._topology += 1
        inst.status = InstStatus.DOWN
        inst.engine_waiting = inst.kv_usage = None
        self._log.add(
            now_s, "instance_down", inst.spec.id, inst.model, detail={"reason": ev.reason}
        )
        for tr in [*inst.inflight.values(), *inst.evicting.values()]:
            if tr.state is ReqState.EVICTED:
                self._end(tr, now_s, "requeue", None, tr.evict_reason, outcome=Outcome.EVICTED)
            else:
                self._fail_attempt(tr, now_s, None, f"instance {inst.spec.id} down: {ev.reason}")
        self._replan_after()

    # ---- log rows ---------------------------------------------------------------------

    def _log_replan(self, now_s: float, plan: Plan, source: str) -> None:
        solver = {name: getattr(plan.solver, name) for name in _SOLVER_FIELDS}
        wall_s = solver["build_s"] + solver["solve_s"]
        self._solver_wall_s += wall_s
        if not self._log_wall_times:  # the machine's speed, not the run's: kept out
            del solver["build_s"], solver["solve_s"]
        detail = {
            "source": source,
            "policy": plan.policy,
            "waiting": len(self._waiting),
            "groups": sum(len(ip.groups) for ip in plan.instances),
            "predicted_attainment": plan.predicted_attainment,
            **solver,
        }
        duration_s = wall_s if self._log_wall_times else None
        self._log.add(now_s, "replan", duration_s=duration_s, detail=detail)


def _urgency(tr: Tracked, now_s: float) -> tuple[bool, float, str]:
    """Sort key, most urgent first: deadline not passed, by deadline; then by arrival."""
    passed = tr.deadline_s < now_s
    return passed, tr.request.arrival_s if passed else tr.deadline_s, tr.id
