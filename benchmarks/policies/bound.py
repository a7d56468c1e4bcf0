"""The hindsight bound: the stochastic program given the whole run's arrivals and lengths.

How it works: every request of the run is one waiting request of a single snapshot taken
at the run's start, released at its arrival, with its true output length (the
clairvoyant scenario); the instances start idle with their resident models. The program
(:mod:`qlmctl.plan.edf_program`), relaxed to an LP (a group may be split over
instances), then chooses the assignment for the whole run at once; its optimum, as a
share of all requests, is the bound.

What it is and is not: it is the ceiling *in the planner's model of the engine*. The
program's capacity comes from one run of the engine model in which no request starts
before it arrives, and the relaxation may split a group over instances, so within that
model no plan does better; the engine itself (the simulator every policy runs on)
differs from the model, so a policy can land above it, and the benchmark says so when
one does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from qlmctl.domain import ClusterSpec
from qlmctl.perfmodel import PerfModel
from qlmctl.plan.edf_program import solve
from qlmctl.plan.estimator import LengthModel
from qlmctl.plan.policies import prepare
from qlmctl.plan.types import InstanceState, QueueSnapshot
from qlmctl.workload import Workload

TIME_LIMIT_S = 600.0  # the LP of a 6,000-request run on 8 instances: 22 s (B at 2.5x)


def hindsight_bound(
    workload: Workload, cluster: ClusterSpec, perf: Mapping[tuple[str, str], PerfModel]
) -> float:
    """The share of the run's requests that can meet their SLO at best (see above)."""
    instances = tuple(
        InstanceState(
            spec.id,
            spec.gpu,
            spec.model,
            True,
            0.0,
            servable_models=frozenset(spec.models) if spec.models else None,
        )
        for spec in cluster.instances
    )
    snap = QueueSnapshot(0.0, workload.requests, instances, workload.slo_classes, perf)
    ctx = prepare(snap, LengthModel(), np.random.default_rng(0), clairvoyant=True)
    res = solve(ctx.problem, ctx.scen, time_limit_s=TIME_LIMIT_S, relaxed=True)
    if res.bound is None:
        raise RuntimeError(f"hindsight bound: HiGHS proved no bound ({res.status})")
    return min(1.0, -res.bound / ctx.problem.total_weight())
