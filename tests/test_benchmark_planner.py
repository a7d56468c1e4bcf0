"""The planner benchmark's local search: the headroom it reports must be real."""

from __future__ import annotations

import numpy as np

from benchmarks.planner_scaling import GROUP_SIZE, local_search, make_snapshot
from qlmctl.plan.estimator import LengthModel, sample_scenarios
from qlmctl.plan.policies import prepare
from qlmctl.plan.simulate import simulate


def test_local_search_spreads_a_plan_piled_on_one_instance() -> None:
    snap = make_snapshot(20, 4, seed=3)
    ctx = prepare(snap, LengthModel(), np.random.default_rng(0), 10, GROUP_SIZE, defer_late=True)
    pb = ctx.problem
    scen = sample_scenarios(pb, LengthModel(), np.random.default_rng(1), 10)
    order = list(range(pb.num_groups))
    # every group on the first instance that may serve it: the others mostly idle
    first = [int(np.flatnonzero(pb.eligible[g])[0]) for g in order]
    piled = tuple(tuple(g for g in order if first[g] == i) for i in range(pb.num_instances))
    searched = local_search(pb, scen, piled, order)
    assert sorted(g for q in searched for g in q) == order  # every group placed once
    assert all(pb.eligible[g, i] for i, q in enumerate(searched) for g in q)
    before, after = simulate(pb, scen, piled).attainment, simulate(pb, scen, searched).attainment
    assert after > before + 0.05
    # from its own answer it finds nothing more to gain
    again = local_search(pb, scen, searched, order)
    assert simulate(pb, scen, again).attainment == after
