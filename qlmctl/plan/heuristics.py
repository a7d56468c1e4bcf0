"""Fast plans: group orders and swap-aware earliest-first-token placement.

How it works: an *order* is a sequence of group indices (arrival, deadline, class
priority, or a model-batched block order; :func:`shed_order` moves the groups that would
make others late to the back). :func:`greedy_place` walks the order and puts each group
on the eligible instance where its last request would get its first token earliest in
the mean scenario (the slot model of :mod:`qlmctl.plan.slots`), counting the swap from
that instance's last model and the group's release time, and changing a busy instance's
model only where no instance holding the group's model serves it in time; each instance
runs its groups in the order's sequence. First token, not finish: the SLO is on the
first token, and a wide GPU whose full batch decodes slowly still starts a request
sooner than a narrow one with its slots taken. A candidate costs a few scalar operations
per (group, instance) and one slot update per group: hundreds of groups take a few
milliseconds.

Block order (model batching): groups fall into blocks
``(tier, model)``; the tier is the SLO class (most urgent TTFT first) or a deadline
bucket; blocks run by (tier, earliest deadline in the block); EDF inside a block.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from qlmctl.plan.estimator import Scenarios, arrivals_delay_s
from qlmctl.plan.problem import Problem
from qlmctl.plan.simulate import Queues, serve_group, turn_to
from qlmctl.plan.slots import EngineState

Order = list[int]


def fcfs_order(problem: Problem) -> Order:
    """Global arrival order (first arrival of each group)."""
    return sorted(range(problem.num_groups), key=lambda g: (problem.release_s[g], g))


def edf_order(problem: Problem) -> Order:
    """Absolute deadline order."""
    return sorted(range(problem.num_groups), key=lambda g: (problem.deadline_s[g], g))


def priority_order(problem: Problem) -> Order:
    """vLLM priority scheduling: class priority (lower first), then arrival."""
    prio = [grp.priority for grp in problem.groups]
    return sorted(range(problem.num_groups), key=lambda g: (prio[g], problem.release_s[g], g))


class _Placement:
    """Each instance's queue and its engine in the mean scenario, as groups are added."""

    def __init__(self, problem: Problem, mean: Scenarios, checkpoints: bool = False) -> None:
        """``checkpoints``: keep each instance's engine before every group added, so
        :meth:`remove` replays only the groups after the one removed."""
        self.problem = problem
        self.mean = mean
        self.queues: list[list[int]] = [[] for _ in range(problem.num_instances)]
        # NOTE: the mean scenario's engines until a group is added (copied then)
        self.engines = list(mean.engines)
        self._own: set[int] = set()  # instances whose engine here is a copy of their own
        self.loaded = problem.init_model.copy()
        self.misses: dict[int, np.ndarray] = {}  # group -> [n] whether each request misses
        self.prefill_s = problem.group_prefill_s()
        # lost groups placed by their work, which happens only when nothing is left to
        # save (see best()); otherwise none
        lost = lost_groups(problem)
        self.spreads = lost if _nothing_to_save(problem, mean, lost) else np.zeros_like(lost)
        self.spread_work = [0.0] * problem.num_instances  # per instance: spread lost work
        self._spread_work_of: dict[int, float] = {}  # lost group -> its work where it is
        # per instance: the work queued on its engine (slot and pipeline free times summed)
        # and the lost work spread there; NOTE: kept up to date by add/remove, so best() does not
        # re-sum every engine
        self.queued = _work(self.engines)
        # per instance, per queue position: (engine, loaded model) before that group
        self.before: list[list[tuple[EngineState, int]]] | None = (
            [[] for _ in range(problem.num_instances)] if checkpoints else None
        )

    def first_token_s(self, g: int, i: int) -> float:
        """When ``g``'s last request would get its first token if queued next on ``i``
        (inf: ineligible), stretched by the arrivals that will go ahead of it there."""
        pb = self.problem
        if not pb.eligible[g, i]:
            return np.inf
        n = int(pb.size[g])
        prefill = float(self.prefill_s[g, i])
        hold = float(self.mean.decode_s[g, i, 0]) + prefill / n  # a slot, if the pipeline keeps up
        m, engine = pb.group_model[g], self.engines[i]
        free, pipeline = engine.slots[0], float(engine.pipeline_s[0])
        # the last request's slot: its rounds before it each take a hold
        if m != self.loaded[i]:
            pipeline = max(float(free[-1]), pipeline) + float(pb.swap_s[i, self.loaded[i], m])
            slot = max(pipeline, pb.release_s[g]) + (n - 1) // pb.group_batch(g, i) * hold
        else:
            b = len(free)
            slot = max(float(free[(n - 1) % b]), pb.release_s[g]) + (n - 1) // b * hold
        last = int(pb.req_offsets[g + 1]) - 1
        token = max(
            slot + float(pb.req_ttft_s[last, i]),
            max(pipeline, pb.release_s[g]) + prefill + float(pb.overhead_s[m, i]),
        )
        wait = max(token - pb.now_s, 0.0)
        delay = arrivals_delay_s(wait, self.mean.urgent_load[g, i, 0], self.mean.horizon_s[0])
        return pb.now_s + wait + float(delay)

    def _engine(self, i: int) -> EngineState:
        """Instance ``i``'s engine, to change: its own copy."""
        if i not in self._own:
            self.engines[i] = self.engines[i].copy()
            self._own.add(i)
        return self.engines[i]

    def add(self, g: int, i: int) -> None:
        """Queue ``g`` on ``i`` and predict its requests' first tokens."""
        pb = self.problem
        m = pb.group_model[g]
        if self.before is not None:
            self.before[i].append((self.engines[i], self.loaded[i]))
            self._own.discard(i)  # that one is kept: changes go to a copy
        engine = self._engine(i)
        turn_to(pb, engine, int(self.loaded[i]), g, i)
        self.loaded[i] = m
        decode = np.full((1, int(pb.size[g])), self.mean.decode_s[g, i, 0])
        self.misses[g] = serve_group(pb, engine, g, i, decode, self.mean.ahead(g, i))[3][0]
        self.queues[i].append(g)
        if self.spreads[g]:  # each request holds a slot and the pipeline, after the rest
            work = float(self._lost_work(g)[i])
            self._spread_work_of[g] = work
            self.spread_work[i] += work
        self.queued[i] = _work([engine])[0] + self.spread_work[i]

    def late(self, g: int) -> bool:
        """Whether a request of ``g`` (queued) misses its deadline."""
        return bool(self.misses[g].any())

    def remove(self, g: int, i: int) -> None:
        """Take ``g`` off ``i`` and replay the rest of its queue (from the start, or with
        checkpoints from just before ``g``: the same state, the replay is deterministic)."""
        k = self.queues[i].index(g) if self.before is not None else 0
        rest = [h for h in self.queues[i][k:] if h != g]
        for h in self.queues[i][k:]:
            self.spread_work[i] -= self._spread_work_of.pop(h, 0.0)
        del self.queues[i][k:]
        if self.before is not None:
            self.engines[i], self.loaded[i] = self.before[i][k]
            del self.before[i][k:]
        else:
            self.engines[i] = self.mean.engines[i]
            self.loaded[i] = self.problem.init_model[i]
        self._own.discard(i)
        self.queued[i] = _work([self.engines[i]])[0] + self.spread_work[i]
        for h in rest:
            self.add(h, i)

    def _lost_work(self, g: int) -> np.ndarray:
        """[I] the work a lost group adds to each instance: its requests' slot holds."""
        return self.problem.size[g] * self.mean.decode_s[g, :, 0] + self.prefill_s[g]

    def best(self, g: int) -> int:
        """The eligible instance where ``g``'s last request would get its first token
        first; among equals (free slots on several), the one with the least work queued,
        so load spreads. A busy instance changes model only where no instance holding
        the model serves it in time: the swap drains the work there, a cost attainment
        does not see (on vLLM-CPU, whose sleep and wake take milliseconds, the demo's qlm
        swapped an instance ten times in one burst of batch jobs for interactive requests
        the other instance served in time). An idle instance may change model: that
        drains nothing, and it leaves an instance holding the model free for the
        arrivals that need it.

        Lost groups (:func:`lost_groups`) leave an instance's engine as it was (they are
        served after its queue), so they tie and gather where the least work is queued:
        one instance takes the doomed work and the others stay free for requests that can
        still make it, or arrive (spreading them instead cost 2.5-4.7 points of attainment
        in four of the five reference cells of the policy benchmark, three seeds). When
        nothing is left to save (:func:`_nothing_to_save`: the tail of a flood), their work
        is counted and they spread, each where its work would be
        done first (queued work and its own over the slots) among the instances holding
        its model (if any does), so the backlog drains at the whole cluster's rate."""
        pb = self.problem
        if self.spreads[g]:  # no swap while an instance holds its model: swaps cost minutes
            ok = pb.eligible[g]
            swaps = np.where(ok, self.loaded != pb.group_model[g], 2)
            slots = np.maximum(pb.batch[pb.group_model[g]], 1)
            done = np.where(ok, (np.asarray(self.queued) + self._lost_work(g)) / slots, np.inf)
            return int(np.lexsort((done, swaps))[0])
        token = np.array([self.first_token_s(g, i) for i in range(pb.num_instances)])
        holds = self.loaded == pb.group_model[g]
        on_time = token <= pb.req_deadline_s[pb.req_offsets[g + 1] - 1]
        if not holds.all() and (holds & on_time).any():
            token[~holds & self._busy()] = np.inf
        return int(np.lexsort((np.asarray(self.queued), token))[0])

    def _busy(self) -> np.ndarray:
        """[I] whether each instance has work running or queued (a swap would drain it)."""
        ready = self.problem.ready_s
        return np.array(
            [
                float(e.slots.max()) > ready[i] or float(e.pipeline_s.max()) > ready[i]
                for i, e in enumerate(self.engines)
            ]
        )


def lost_groups(problem: Problem) -> np.ndarray:
    """[G] bool: groups whose every request will be deferred (served after the rest of
    its instance's queue) wherever it goes: with the core deferring late requests, its last
    request misses its deadline even if it started as soon as an instance is ready."""
    if not problem.defer_late:
        return np.zeros(problem.num_groups, bool)
    return problem.late_even_first()[problem.req_offsets[1:] - 1]


def _nothing_to_save(problem: Problem, mean: Scenarios, lost: np.ndarray) -> bool:
    """Whether keeping instances free of the ``lost`` groups' work saves nothing: nothing
    arrived in the window, and every group not lost is due after one instance alone would
    have done the whole queue's work (fluid, each group at its fastest instance's rate),
    so no placement of the lost work can make it late.

    NOTE: since the core serves late heads ahead of work due an hour later
    (``CoreConfig.defer_horizon_s``), such work is often all that is left beside the lost
    groups in a flood's tail; gathered on one instance while it waited, the lost work
    moved from instance to instance at every re-plan (A-mixed (8) at 2.5x: 400 re-plans
    against 170, a run 50 s longer)."""
    if problem.stream_seen.any():
        return False
    work = np.where(problem.eligible, mean.service_s[:, :, 0], np.inf).min(axis=1)
    done_s = problem.now_s + float(work[np.isfinite(work)].sum())
    return bool((problem.deadline_s[~lost] > done_s).all())


def _work(engines: list[EngineState]) -> list[float]:
    """Per engine: its slot and pipeline free times summed (the work queued on it).

    NOTE: engines of one shape are summed together: row sums of their stacked slots,
    each the sum one engine's gives.
    """
    if len(engines) == 1 or len({e.slots.shape for e in engines}) > 1:
        return [float(e.slots.sum() + e.pipeline_s.sum()) for e in engines]
    slots = np.concatenate([e.slots for e in engines]).reshape(len(engines), -1)
    pipelines = np.array([e.pipeline_s for e in engines])
    return (np.add.reduce(slots, axis=1) + np.add.reduce(pipelines, axis=1)).tolist()


def shed_order(problem: Problem, mean: Scenarios, order: Order) -> Order:
    """``order`` with the groups that would make others late moved to the back.

    Under overload, serving every group in ``order`` makes many late; serving the
    hopeless ones last keeps the others in time. The walk follows Moore and Hodgson's
    rule (which minimises late jobs on one machine): groups are placed as
    :func:`greedy_place` would; when one would be late on its instance, the group queued
    there (it, or one before it) that takes the most of the engine per weighted
    request is shed, until it is on time, shed itself, or alone in the queue (then only
    running work delays it, and the core may evict that). What a request takes is its
    fluid work: the larger of its slot hold over the B slots and its prompt's time in
    the prefill pipeline, so a burst of long prompts sheds the longest (the pipeline is
    what they wait for). A group whose first request is lost even on an instance
    emptied for it is shed at once.
    """
    return shed_order_and_queues(problem, mean, order)[0]


def shed_order_and_queues(
    problem: Problem, mean: Scenarios, order: Order, fixed: Mapping[int, int] | None = None
) -> tuple[Order, Queues | None]:
    """:func:`shed_order`, and when it sheds nothing the queues :func:`greedy_place`
    gives ``order`` (None otherwise); ``fixed`` as there (group -> instance chosen).

    NOTE: a walk that sheds nothing places every group of ``order`` where
    :func:`greedy_place` would, in the same sequence: its queues are greedy_place's, and
    a caller placing ``order`` too need not place it again.
    """
    place = _Placement(problem, mean, checkpoints=True)
    work = mean.service_s[:, :, 0] / problem.size[:, None]  # a request's fluid seconds
    cost = work / problem.weight[:, None]
    lost_first = problem.late_even_first()[problem.req_offsets[:-1]]
    shed: set[int] = set()
    for g in order:
        if lost_first[g]:
            shed.add(g)  # lost even if it went first
            continue
        i = fixed[g] if fixed is not None and g in fixed else place.best(g)
        place.add(g, i)
        while g not in shed and len(place.queues[i]) > 1 and place.late(g):
            victim = max(place.queues[i], key=lambda h: cost[h, i])
            shed.add(victim)
            place.remove(victim, i)
    if not shed:
        return list(order), tuple(tuple(q) for q in place.queues)
    return [g for g in order if g not in shed] + [g for g in order if g in shed], None


def block_order(problem: Problem, bucket_s: float | None = None) -> Order:
    """Model-batched order: blocks of one tier and one model, each in EDF order.

    Args:
        problem: the planning problem.
        bucket_s: deadline bucket width for the tier; None: the tier is the SLO class,
            most urgent (smallest TTFT) first.
    """
    if bucket_s is None:
        ttft = {g.slo_class: g.deadline_s - g.release_s for g in problem.groups}
        rank = {c: k for k, c in enumerate(sorted(ttft, key=lambda c: (ttft[c], c)))}
        tier = [rank[g.slo_class] for g in problem.groups]
    else:
        tier = [int((d - problem.now_s) // bucket_s) for d in problem.deadline_s]
    blocks: dict[tuple[int, int], list[int]] = {}
    for g in edf_order(problem):
        blocks.setdefault((tier[g], int(problem.group_model[g])), []).append(g)
    ranked = sorted(blocks.items(), key=lambda kv: (kv[0][0], problem.deadline_s[kv[1][0]]))
    return [g for _key, members in ranked for g in members]


def greedy_place(
    problem: Problem, mean: Scenarios, order: Order, fixed: Mapping[int, int] | None = None
) -> Queues:
    """Place groups in ``order``, each where its last request finishes earliest in
    the mean scenario (``mean``, one scenario).

    Args:
        problem: the planning problem.
        mean: the mean scenario (:meth:`Scenarios.mean`).
        order: the sequence to place and run groups in.
        fixed: group -> instance for groups whose instance is already chosen.
    """
    fixed = fixed or {}
    place = _Placement(problem, mean)
    for g in order:
        place.add(g, fixed[g] if g in fixed else place.best(g))
    return tuple(tuple(q) for q in place.queues)
