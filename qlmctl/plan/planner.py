"""Offline planning for ``qlmctl plan``: a snapshot from a workload, policies compared.

How it works: :func:`snapshot_from_workload` pictures the cluster at time ``at_s`` (0 by
default: every request of the workload is waiting, later arrivals released when they
arrive; with ``at_s``: the requests arrived by then) with instances idle on their
resident models. :func:`compare_policies` plans with each policy (on the snapshot with
the caps the serving core would give it, :func:`with_core_caps`, so a plan's forecasts
are those ``serve --plan`` makes), then scores every plan on one common held-out
scenario set drawn from an independent stream, so the comparison does not favour the
policy whose own scenarios were used to pick its plan.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from qlmctl.domain import ClusterSpec, SLOClass
from qlmctl.errors import BadInput
from qlmctl.perfmodel import PerfModel
from qlmctl.plan.estimator import LengthModel, sample_scenarios
from qlmctl.plan.groups import DEFAULT_MAX_GROUP_SIZE
from qlmctl.plan.policies import make_policy, prepare
from qlmctl.plan.simulate import Score, check_queues, simulate
from qlmctl.plan.types import InstanceState, Plan, Policy, QueueSnapshot, known_time
from qlmctl.workload import Workload

HELD_OUT_SCENARIOS = 200

# a policy -> the caps the serving core puts on each instance for it: requests it runs
# there, requests it leaves waiting in the engine (None: no cap)
CoreCaps = Callable[[Policy], tuple[int | None, int | None]]


def snapshot_from_workload(
    workload: Workload,
    cluster: ClusterSpec,
    perf: Mapping[tuple[str, str], PerfModel],
    at_s: float | None = None,
) -> QueueSnapshot:
    """The queue at ``at_s`` (None: time 0 with the whole workload waiting)."""
    reqs = workload.requests
    if at_s is not None:
        if at_s < 0:
            raise BadInput(f"--at must be >= 0, got {at_s}")
        reqs = tuple(r for r in reqs if r.arrival_s <= at_s)
    if not reqs:
        when = "" if at_s is None else f" by t={at_s:g} s"
        raise BadInput(f"{workload.source}: no requests have arrived{when}; nothing to plan")
    now = 0.0 if at_s is None else at_s
    instances = tuple(
        InstanceState(
            instance_id=i.id,
            gpu=i.gpu,
            model=i.model,
            up=True,
            ready_at_s=now,
            servable_models=frozenset(i.models) if i.models is not None else None,
        )
        for i in cluster.instances
    )
    classes: dict[str, SLOClass] = dict(workload.slo_classes)
    return QueueSnapshot(now, reqs, instances, classes, perf)


def with_core_caps(
    snapshot: QueueSnapshot, max_running: int | None, max_waiting: int | None
) -> QueueSnapshot:
    """``snapshot`` with the serving core's caps on every instance, as its re-plans see
    them (the forecast dispatch of a burst is paced by ``max_waiting``)."""
    instances = tuple(
        replace(i, max_running=max_running, max_waiting=max_waiting) for i in snapshot.instances
    )
    return replace(snapshot, instances=instances)


@dataclass(frozen=True)
class Compared:
    """One policy's plan and its score on the common held-out scenarios."""

    plan: Plan
    held_out: Score
    wall_s: float


def compare_policies(
    snapshot: QueueSnapshot,
    names: Sequence[str],
    options: dict[str, Any],
    seed: int = 0,
    held_out: int = HELD_OUT_SCENARIOS,
    caps: CoreCaps | None = None,
) -> dict[str, Compared]:
    """Plan with each policy in ``names`` (on ``snapshot`` with the ``caps`` the core
    gives it, if given); score all on the same held-out scenarios."""
    out_plans: dict[str, tuple[Plan, float, bool]] = {}  # plan, wall, served deferring late
    for name in names:
        policy = make_policy(name, **options)
        planned = snapshot if caps is None else with_core_caps(snapshot, *caps(policy))
        t0 = time.perf_counter()
        plan = policy.plan(planned, np.random.default_rng(seed))
        out_plans[name] = (plan, time.perf_counter() - t0, policy.serving.defers_late)
    ctx = prepare(snapshot, LengthModel(), np.random.default_rng(seed), 1, _group_size(options))
    scen = sample_scenarios(
        ctx.problem, LengthModel(), np.random.default_rng(seed + 7919), held_out
    )
    index = {g.group_id: k for k, g in enumerate(ctx.problem.groups)}
    result = {}
    for name, (plan, wall, defer_late) in out_plans.items():
        queues = tuple(tuple(index[g.group_id] for g in ip.groups) for ip in plan.instances)
        check_queues(ctx.problem, queues)
        served = replace(ctx.problem, defer_late=defer_late)
        result[name] = Compared(plan, simulate(served, scen, queues), wall)
    return result


def _group_size(options: dict[str, Any]) -> int:
    return int(options.get("max_group_size", DEFAULT_MAX_GROUP_SIZE))


def plan_workload(
    workload_path: Path,
    cluster_path: Path,
    profiles: Path | None,
    policies: Sequence[str],
    options: dict[str, Any],
    seed: int = 0,
    at_s: float | None = None,
    out_dir: Path | None = None,
    caps: CoreCaps | None = None,
) -> dict[str, Compared]:
    """Load the inputs, plan with each policy (``caps``: see :func:`compare_policies`),
    write ``<out_dir>/<workload>-<policy>.json``."""
    from qlmctl.domain import check_models_served
    from qlmctl.plan.planfile import plan_meta
    from qlmctl.profile.store import ProfileStore
    from qlmctl.specs import load_cluster
    from qlmctl.workload import load_workload

    workload = load_workload(workload_path)
    cluster = load_cluster(cluster_path)
    check_models_served(cluster, workload.models)
    perf = ProfileStore.load(profiles).for_cluster(cluster)
    snapshot = snapshot_from_workload(workload, cluster, perf, at_s)
    result = compare_policies(snapshot, policies, options, seed, caps=caps)
    meta = plan_meta(workload, cluster, perf, options, seed, at_s)
    meta["cluster"] = str(cluster_path)
    result = {
        name: replace(
            c, plan=replace(c.plan, meta={**meta, "held_out_attainment": c.held_out.attainment})
        )
        for name, c in result.items()
    }
    if out_dir is not None:
        for name, c in result.items():
            c.plan.save(out_dir / f"{Path(workload_path).stem}-{name}.json")
    return result


def instance_rows(plan: Plan) -> dict[str, list[list[Any]]]:
    """Per instance, one row per group: order, group, model, class, size, times (and
    when its last first token comes, 90th percentile: None if it may come after the
    queue, see :class:`~qlmctl.plan.types.PlannedGroup`), miss."""
    return {
        ip.instance_id: [
            [
                k + 1,
                g.group_id,
                g.model,
                g.slo_class,
                len(g.request_ids),
                g.deadline_s,
                g.predicted_start_s,
                known_time(max(g.request_first_token_p90_s, default=math.inf)),
                g.predicted_finish_s,
                g.miss_probability,
            ]
            for k, g in enumerate(ip.groups)
        ]
        for ip in plan.instances
    }


def summary(result: Mapping[str, Compared]) -> dict[str, Any]:
    """A JSON-ready summary: per policy the held-out attainment, by class, solver stats."""
    return {
        name: {
            "held_out_attainment": c.held_out.attainment,
            "held_out_by_class": c.held_out.by_class,
            "predicted_attainment": c.plan.predicted_attainment,
            "wall_s": c.wall_s,
            "solver": asdict(c.plan.solver),
        }
        for name, c in result.items()
    }
