"""Following a committed plan (``serve --plan``): the plan's queues unless a change pays.

How it works: :class:`PlanFollower` is a policy around the policy the plan was made
with. On every re-plan the core asks it for a plan; it builds two:

- the *committed* plan: the plan file's groups, instance by instance, in their order
  (the core keeps only the ids still waiting, so requests not yet arrived slot in at
  their planned place when they arrive); requests the plan does not place, or placed on
  an instance that is down or may not serve their model, go where a fresh plan puts them;
- a *fresh* plan from the wrapped policy's fast answer.

Both are scored on one scenario set of the current queue (the planner's slot model). The
fresh plan replaces the committed one only when its predicted attainment beats the
committed plan's by more than ``margin`` (hysteresis: small predicted gains do not churn
the schedule); it then becomes the committed plan for the requests it places, and the
old plan still places those not yet arrived. Every answer says which it is in its solver
stats (``chosen`` is ``committed`` or ``replanned``; ``note`` gives the reason), which
the core logs with the re-plan: the run log's record of where execution left the plan.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np

from qlmctl.plan import heuristics as H
from qlmctl.plan.policies import BasePolicy, Context
from qlmctl.plan.simulate import Queues, Score, simulate
from qlmctl.plan.types import (
    PER_REQUEST,
    PER_REQUEST_TIMES,
    InstancePlan,
    Plan,
    PlannedGroup,
    QueueSnapshot,
    SolverStats,
)
from qlmctl.serve.config import split_policy

DEFAULT_MARGIN = 0.05  # a fresh plan must predict this much more attainment to replace it
KEPT, REPLANNED = "committed", "replanned"


class PlanFollower:
    """A policy that follows ``plan`` and departs from it only for a clear predicted gain.

    Args:
        inner: the policy the plan was made with (re-plans use its fast answer).
        plan: the committed plan (from ``qlmctl plan``).
        margin: how much more predicted attainment a fresh plan needs to replace it.
    """

    def __init__(self, inner: BasePolicy, plan: Plan, margin: float = DEFAULT_MARGIN) -> None:
        self.name: str = inner.name
        self.inner = inner
        self.serving = replace(inner.serving, places_ahead=True)
        self.lengths = inner.lengths  # the core's length estimates
        self.committed = plan
        self.margin = margin
        self._fresh, _ = split_policy(inner)
        self.departures = 0  # re-plans that replaced the committed plan

    def start_at(self, offset_s: float) -> None:
        """Shift the committed plan's times by ``offset_s``: its work arrived then, not at
        the plan's time 0 (a Batch file planned ahead and submitted to the gateway later)."""
        self.committed = shifted(self.committed, offset_s)

    def plan(self, snapshot: QueueSnapshot, rng: np.random.Generator) -> Plan:
        """The committed plan for ``snapshot``, or a fresh one if it beats it by the margin."""
        t0 = time.perf_counter()
        fresh = self._fresh(snapshot, rng)
        follow, moved = self._following(snapshot, fresh)
        ctx: Context = self.inner.prepare(snapshot, rng)
        kept_q, fresh_q = _queues(ctx, follow), _queues(ctx, fresh)
        kept_s = simulate(ctx.problem, ctx.scen, kept_q)
        if fresh_q == kept_q:
            return self._answer(follow, kept_s, kept_s, t0, moved)
        fresh_s = simulate(ctx.problem, ctx.scen, fresh_q)
        if fresh_s.attainment > kept_s.attainment + self.margin:
            self.departures += 1
            self.committed = _merge(fresh, self.committed)
            note = (
                f"left the plan: a fresh plan predicts {fresh_s.attainment:.3f} against "
                f"{kept_s.attainment:.3f} for the committed one (margin {self.margin:g})"
            )
            stats = _stats(REPLANNED, kept_s, fresh_s, note, t0, fresh.solver)
            return replace(fresh, solver=stats)
        return self._answer(follow, kept_s, fresh_s, t0, moved)

    def _answer(
        self,
        follow: Plan,
        kept_s: Score,
        fresh_s: Score,
        t0: float,
        moved: list[str],
    ) -> Plan:
        note = "following the plan"
        if moved:
            note += f"; re-placed {len(moved)} requests it cannot run as planned ({moved[0]})"
        stats = _stats(KEPT, kept_s, fresh_s, note, t0, None)
        return replace(
            follow,
            predicted_attainment=kept_s.attainment,
            predicted_attainment_by_class=kept_s.by_class,
            solver=stats,
        )

    def _following(self, snapshot: QueueSnapshot, fresh: Plan) -> tuple[Plan, list[str]]:
        """The committed groups where they can still run, then ``fresh``'s placements for
        the waiting requests they do not cover; also the reasons requests were moved."""
        waiting = {r.id for r in snapshot.waiting}
        inst = {s.instance_id: s for s in snapshot.instances}
        covered: set[str] = set()
        moved: list[str] = []
        queues: dict[str, list[PlannedGroup]] = {s.instance_id: [] for s in snapshot.instances}
        for ip in self.committed.instances:
            state = inst.get(ip.instance_id)
            for pg in ip.groups:
                live = [r for r in pg.request_ids if r in waiting and r not in covered]
                if state is None or not state.can_serve(pg.model):
                    if live:
                        why = "down" if state is not None and not state.up else "unavailable"
                        moved.append(f"instance {ip.instance_id} {why}")
                    continue
                queues[ip.instance_id].append(pg)
                covered.update(live)
        for ip in fresh.instances:
            for pg in ip.groups:
                keep = [k for k, r in enumerate(pg.request_ids) if r not in covered]
                if keep:
                    queues[ip.instance_id].append(_subset(pg, keep))
        plan = Plan(
            policy=self.name,
            created_s=snapshot.now_s,
            instances=tuple(InstancePlan(i, tuple(gs)) for i, gs in queues.items()),
            predicted_attainment=self.committed.predicted_attainment,
            predicted_attainment_by_class=dict(self.committed.predicted_attainment_by_class),
        )
        return plan, moved


def shifted(plan: Plan, offset_s: float) -> Plan:
    """``plan`` with every absolute time (deadlines, predicted starts and finishes) later
    by ``offset_s``."""

    def move(pg: PlannedGroup) -> PlannedGroup:
        times: dict[str, Any] = {
            k: tuple(t + offset_s for t in getattr(pg, k)) for k in PER_REQUEST_TIMES
        }
        return replace(
            pg,
            deadline_s=pg.deadline_s + offset_s,
            predicted_start_s=pg.predicted_start_s + offset_s,
            predicted_finish_s=pg.predicted_finish_s + offset_s,
            **times,
        )

    return replace(
        plan,
        created_s=plan.created_s + offset_s,
        instances=tuple(
            InstancePlan(ip.instance_id, tuple(move(g) for g in ip.groups)) for ip in plan.instances
        ),
    )


def _subset(pg: PlannedGroup, keep: list[int]) -> PlannedGroup:
    """``pg`` with only the requests at positions ``keep`` (forecasts kept aligned)."""
    if len(keep) == len(pg.request_ids):
        return pg
    pick = lambda xs: tuple(xs[k] for k in keep) if xs else ()  # noqa: E731
    columns: dict[str, Any] = {k: pick(getattr(pg, k)) for k in PER_REQUEST}
    return replace(pg, **columns)


def _merge(fresh: Plan, old: Plan) -> Plan:
    """``fresh``, then per instance ``old``'s groups for the requests ``fresh`` leaves out
    (those not yet arrived): the new committed plan."""
    placed = set(fresh.request_ids())
    extra: dict[str, list[PlannedGroup]] = {}
    for ip in old.instances:
        for pg in ip.groups:
            keep = [k for k, r in enumerate(pg.request_ids) if r not in placed]
            if keep:
                extra.setdefault(ip.instance_id, []).append(_subset(pg, keep))
    instances = [InstancePlan(ip.instance_id, ip.groups + tuple(extra.pop(ip.instance_id, ())))
                 for ip in fresh.instances]  # fmt: skip
    instances += [InstancePlan(i, tuple(gs)) for i, gs in extra.items()]
    return replace(fresh, instances=tuple(instances))


def _queues(ctx: Context, plan: Plan) -> Queues:
    """``plan`` as queues of the current problem's groups: each group on the instance
    holding most of its requests, groups in the order of their earliest planned request;
    groups the plan does not place (or cannot place there) placed greedily after."""
    pb = ctx.problem
    index = {iid: i for i, iid in enumerate(pb.instance_ids)}
    where: dict[str, tuple[int, int]] = {}  # request id -> (instance, rank in the plan)
    rank = 0
    for ip in plan.instances:
        for pg in ip.groups:
            for r in pg.request_ids:
                if ip.instance_id in index and r not in where:
                    where[r] = (index[ip.instance_id], rank)
                rank += 1
    fixed: dict[int, int] = {}
    first: dict[int, int] = {}
    for g, grp in enumerate(pb.groups):
        spots = [where[r.id] for r in grp.requests if r.id in where]
        if spots:
            i = Counter(s[0] for s in spots).most_common(1)[0][0]
            if pb.eligible[g, i]:
                fixed[g] = i
                first[g] = min(s[1] for s in spots)
    order = sorted(range(pb.num_groups), key=lambda g: (first.get(g, math.inf), g))
    return H.greedy_place(pb, ctx.mean, order, fixed)


def _stats(
    chosen: str, kept: Score, fresh: Score, note: str, t0: float, base: SolverStats | None
) -> SolverStats:
    scores = {KEPT: kept.attainment, "fresh": fresh.attainment}
    if base is not None:
        return replace(base, chosen=chosen, scores={**base.scores, **scores}, note=note)
    return SolverStats(
        build_s=time.perf_counter() - t0, status="plan", chosen=chosen, scores=scores, note=note
    )
