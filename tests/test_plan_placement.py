"""The placement program (``qlm``'s first stage): which model each instance holds."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from qlmctl.plan import policies
from qlmctl.plan.placement import MIN_GAIN, Targets, decide, has_choice, restrict, standing
from qlmctl.plan.policies import Arriving, Context, QlmPolicy, make_policy
from qlmctl.plan.types import QueueSnapshot, RecentArrivals
from tests.helpers import make_requests
from tests.test_plan_core import mixed_requests, snapshot


def prepared(snap: QueueSnapshot) -> Context:
    return make_policy("qlm", scenarios=10, max_group_size=8).prepare(
        snap, np.random.default_rng(0)
    )


def backlog(n: int = 2000) -> QueueSnapshot:
    """``n`` interactive m1 requests at once; i0 holds m1, i1 holds m2 with nothing to do."""
    return snapshot(make_requests(n, model="m1", gap_s=0.0), ("m1", "m2"), cold_start_s=5.0)


def test_an_idle_instance_takes_the_model_with_the_backlog() -> None:
    ctx = prepared(backlog())
    assert has_choice(ctx.problem)
    d = decide(ctx.problem, ctx.mean, None, np.random.default_rng(1), 10, 5.0)
    assert d.changed == ("i1",)
    assert d.models == {"i0": "m1", "i1": "m1"}
    assert d.gain >= MIN_GAIN and d.share >= 0.8


def test_no_change_where_the_placement_serves_everything() -> None:
    snap = snapshot(mixed_requests([("m1", "interactive", 4), ("m2", "interactive", 4)]))
    ctx = prepared(snap)
    d = decide(ctx.problem, ctx.mean, None, np.random.default_rng(1), 10, 5.0)
    assert d.changed == () and d.models == {"i0": "m1", "i1": "m2"}


def test_an_instance_that_changed_keeps_its_model_for_the_hold() -> None:
    ctx = prepared(backlog())
    # i1 was put on m2 five seconds ago: the backlog of m1 may not take it back yet
    held = Targets({"i0": "m1", "i1": "m2"}, {"i1": -5.0})
    d = decide(ctx.problem, ctx.mean, held, np.random.default_rng(1), 10, 5.0)
    assert d.changed == () and d.models["i1"] == "m2"
    # long ago: it may
    old = Targets({"i0": "m1", "i1": "m2"}, {"i1": -500.0})
    d = decide(ctx.problem, ctx.mean, old, np.random.default_rng(1), 10, 5.0)
    assert d.changed == ("i1",)


def test_instances_take_only_the_groups_of_the_model_they_hold() -> None:
    snap = snapshot(mixed_requests([("m1", "interactive", 8), ("m2", "batch", 8)]))
    pb = prepared(snap).problem
    both = Targets({"i0": "m2", "i1": "m2"}, {})
    held = restrict(pb, standing(pb, both))
    m1 = pb.group_model == pb.models.index("m1")
    assert held.eligible[~m1].all()  # m2's groups: both instances
    assert (held.eligible[m1] == pb.eligible[m1]).all()  # m1's: no instance holds m1
    mine = restrict(pb, standing(pb, Targets({"i0": "m1", "i1": "m2"}, {})))
    assert mine.eligible[m1, 0].all() and not mine.eligible[m1, 1].any()
    assert mine.eligible[~m1, 1].all() and not mine.eligible[~m1, 0].any()


def test_the_plan_follows_the_placement_once_its_answer_has_arrived() -> None:
    pol = QlmPolicy(scenarios=10, max_group_size=8, time_limit_s=2.0)
    plan = pol.improve(backlog(), 2.0, np.random.default_rng(0))
    assert plan is not None and "placement: i1 -> m1" in plan.solver.note
    # later, m2 work arrives: i1 now holds m1 (i0 too), so m2 goes where it can
    later = snapshot(
        make_requests(6, model="m2", gap_s=0.0, start_s=100.0, prefix="late"),
        ("m1", "m2"),
        now_s=100.0,
    )
    quick = pol.quick(later, np.random.default_rng(0))
    assert sorted(quick.request_ids()) == sorted(r.id for r in later.waiting)
    # while the answer is still on its way (the same virtual time as the snapshot), the
    # placement before it stands: none, so nothing is restricted
    assert pol._targets.at(0.0) is None


def test_an_arriving_request_takes_at_least_its_prompts_prefill_time() -> None:
    # long prompts, short outputs: the prefill pipeline, not the slots, bounds the rate
    # (counted by the slots alone, an 8B model's code prompts on an A100 took a third of
    # their time, and the program gave away instances the interactive traffic needed)
    reqs = make_requests(20, model="m1", prompt_tokens=4000, output_tokens=5, gap_s=1.0)
    snap = replace(snapshot(reqs[-2:]), recent=RecentArrivals(60.0, tuple(reqs)))
    pb = prepared(snap).problem
    k = list(pb.stream_model).index(pb.models.index("m1"))
    i = 0  # holds m1
    assert pb.stream_work_s[k, i] >= pb.req_prefill_s[0, i] > 0


def test_an_improvers_answer_counts_from_when_it_would_arrive() -> None:
    # the simulator runs the improver at its snapshot's time; a real run's worker thread
    # hands its answer over a solve later, and the answer before it stands until then
    first = Arriving[str]().then("first", ready_s=10.0)
    assert first.at(9.9) is None and first.at(10.0) == "first"
    second = first.then("second", ready_s=20.0)
    assert second.at(15.0) == "first" and second.at(20.0) == "second"


def test_a_failing_placement_program_leaves_the_plan_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("HiGHS crashed")

    monkeypatch.setattr(policies, "decide", broken)
    snap = backlog(200)
    plan = QlmPolicy(scenarios=10, max_group_size=8, time_limit_s=1.0).plan(
        snap, np.random.default_rng(0)
    )
    assert "placement program failed (RuntimeError: HiGHS crashed)" in plan.solver.note
    assert sorted(plan.request_ids()) == sorted(r.id for r in snap.waiting)
