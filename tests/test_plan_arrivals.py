"""Coming arrivals: fitted from the recent window, they delay the groups they go ahead of."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from qlmctl.plan.arrivals import EXPECTED_PREFIX, is_expected, repeat_window
from qlmctl.plan.estimator import (
    ARRIVAL_HORIZON_S,
    MAX_URGENT_LOAD,
    LengthModel,
    arrival_rates,
    arrivals_delay_s,
    horizons,
)
from qlmctl.plan.policies import make_policy, prepare
from qlmctl.plan.types import Plan, QueueSnapshot, RecentArrivals
from qlmctl.serve.core import ARRIVAL_WINDOW_S
from tests.helpers import make_requests
from tests.test_plan_core import snapshot
from tests.test_serve_core import make_core


def busy_batch_queue(
    recent_interactive: int,
    residents: tuple[str, ...] = ("m1",),
    cold_start_s: float = 20.0,
    batch: int = 400,
) -> QueueSnapshot:
    """``batch`` batch requests of m1 waiting at t=100 (400: more than the slots), and
    ``recent_interactive`` interactive arrivals of m1 over the last 60 s (all served)."""
    waiting = make_requests(batch, slo_class="batch", gap_s=0.01, start_s=95.0, output_tokens=400)
    seen = make_requests(
        recent_interactive, gap_s=60.0 / max(recent_interactive, 1), start_s=40.0, prefix="past-"
    )
    snap = snapshot(waiting, residents=residents, now_s=100.0, cold_start_s=cold_start_s)
    return replace(snap, recent=RecentArrivals(60.0, tuple(seen)))


def test_rates_follow_the_window_and_are_uncertain() -> None:
    ctx = prepare(busy_batch_queue(120), LengthModel(), np.random.default_rng(0), scenarios=2)
    pb = ctx.problem
    assert pb.stream_seen.tolist() == [120.0]
    assert arrival_rates(pb)[0, 0] == (120 + 0.5) / 60.0
    draws = arrival_rates(pb, np.random.default_rng(0), 2000)
    assert abs(draws.mean() - 2.0) < 0.05 and 0.1 < draws.std() < 0.2  # ~sqrt(120)/60


def last_start(plan: Plan) -> float:
    return max(g.predicted_start_s for ip in plan.instances for g in ip.groups)


def load_on(plan: Plan) -> dict[str, int]:
    return {ip.instance_id: sum(len(g.request_ids) for g in ip.groups) for ip in plan.instances}


def test_interactive_arrivals_delay_batch_groups_only() -> None:
    rng = np.random.default_rng(0)
    quiet = make_policy("heuristic", scenarios=20).plan(busy_batch_queue(0), rng)
    busy = make_policy("heuristic", scenarios=20).plan(busy_batch_queue(1800), rng)  # 30/s
    assert last_start(busy) > last_start(quiet) + 5.0
    # interactive groups are not delayed by later interactive arrivals: theirs come later
    assert prepare(
        busy_batch_queue(1800), LengthModel(), rng, scenarios=2
    ).problem.stream_ahead.all()
    now = make_requests(5, gap_s=0.1, start_s=99.0, prefix="now-")
    snap = replace(busy_batch_queue(1800), waiting=tuple(now))
    assert not prepare(snap, LengthModel(), rng, scenarios=2).problem.stream_ahead.any()


def test_arrivals_go_ahead_for_their_horizon_only() -> None:
    # half the instance for the next minute: a 20 s wait doubles, a 200 s one grows 30 s
    delays = arrivals_delay_s(np.array([0.0, 20.0, 200.0]), 0.5, 60.0)
    assert delays.tolist() == [0.0, 20.0, 30.0]
    assert arrivals_delay_s(-5.0, 0.5, 60.0) == 0.0 and arrivals_delay_s(100.0, 0.0, 60.0) == 0.0
    # how long the rates hold: exponential quantiles of mean ~ the horizon, one: the mean
    assert horizons(1).tolist() == [ARRIVAL_HORIZON_S]
    many = horizons(1000)
    assert np.all(np.diff(many) > 0) and abs(many.mean() / ARRIVAL_HORIZON_S - 1) < 0.01
    assert abs(np.median(many) - ARRIVAL_HORIZON_S * np.log(2)) < 0.1
    # minutes of batch backlog behind a heavy stream: its last group waits at most the
    # stream's share of the horizon longer than without the stream (stretched, minutes)
    rng = np.random.default_rng(0)
    quiet = make_policy("heuristic", scenarios=20).plan(busy_batch_queue(0, batch=3000), rng)
    busy = make_policy("heuristic", scenarios=20).plan(busy_batch_queue(1800, batch=3000), rng)
    assert last_start(quiet) > 100.0 + 2 * ARRIVAL_HORIZON_S
    assert 5.0 < last_start(busy) - last_start(quiet) <= MAX_URGENT_LOAD * ARRIVAL_HORIZON_S


def test_batch_work_leaves_headroom_where_the_urgent_stream_lands() -> None:
    # i0 holds m1, which the interactive stream needs; i1 holds m2 and can switch to m1
    # for batch work. The stream spreads over the instances holding m1, i0 alone, so
    # with a heavy stream placement moves batch work from i0 to i1
    quiet = make_policy("heuristic", scenarios=20).plan(
        busy_batch_queue(0, ("m1", "m2"), 2.0), np.random.default_rng(0)
    )
    busy = make_policy("heuristic", scenarios=20).plan(
        busy_batch_queue(1800, ("m1", "m2"), 2.0), np.random.default_rng(0)
    )
    assert load_on(busy)["i0"] < load_on(quiet)["i0"] - 40


def test_core_snapshot_carries_the_recent_window() -> None:
    core = make_core(1, make_policy("fcfs"), models=("m1",))
    for k, r in enumerate(make_requests(100, gap_s=1.0)):
        core.on_arrival(r, float(k))
    snap = core.snapshot(99.0)
    assert snap.recent.window_s == ARRIVAL_WINDOW_S
    assert min(r.arrival_s for r in snap.recent.requests) >= 99.0 - ARRIVAL_WINDOW_S
    assert len(snap.recent.requests) == 61


def test_the_window_repeats_one_window_later() -> None:
    seen = make_requests(6, gap_s=10.0, start_s=40.0, prefix="past-")  # 40, 50, ..., 90
    coming = repeat_window(RecentArrivals(60.0, tuple(seen)), now_s=105.0)
    assert [r.arrival_s for r in coming] == [110.0, 120.0, 130.0, 140.0, 150.0]  # not 100
    assert [r.id for r in coming] == [f"{EXPECTED_PREFIX}past-{k}" for k in range(1, 6)]
    assert all(is_expected(r.id) for r in coming)
    assert [r.prompt_tokens for r in coming] == [r.prompt_tokens for r in seen[1:]]
    assert repeat_window(RecentArrivals(0.0, tuple(seen)), now_s=105.0) == ()


def test_a_look_ahead_plan_leaves_room_for_arrivals_and_queues_none() -> None:
    rng = np.random.default_rng(0)
    plans = {
        n: make_policy("heuristic", scenarios=20, look_ahead=True).plan(busy_batch_queue(n), rng)
        for n in (0, 1800)
    }
    assert last_start(plans[1800]) > last_start(plans[0]) + 5.0  # batch waits behind them
    waiting = {r.id for r in busy_batch_queue(1800).waiting}
    for plan in plans.values():
        placed = [r for ip in plan.instances for g in ip.groups for r in g.request_ids]
        assert sorted(placed) == sorted(waiting)  # every waiting request, nothing expected
    ctx = prepare(busy_batch_queue(1800), LengthModel(), rng, scenarios=2, look_ahead=True)
    groups = ctx.problem.groups
    assert not ctx.problem.stream_seen.size  # planned as requests, not as a stretch
    assert sum(is_expected(g.group_id) for g in groups) >= 1800 // 8
    assert all(is_expected(g.group_id) == is_expected(g.requests[0].id) for g in groups)
    assert all(len({is_expected(r.id) for r in g.requests}) == 1 for g in groups)


def test_work_due_beyond_the_deferral_horizon_waits_behind_every_arrival_ahead() -> None:
    # the stream (120/s) wants more than the instance: of the arrivals ahead of work due
    # within the core's deferral horizon, those beyond MAX_URGENT_LOAD are late and wait
    # behind it; work due beyond the horizon waits behind them all
    snap = busy_batch_queue(7200)

    def urgent(horizon_s: float) -> np.ndarray:
        rng = np.random.default_rng(0)
        ctx = prepare(snap, LengthModel(), rng, 4, defer_late=True, defer_horizon_s=horizon_s)
        return ctx.scen.urgent_load

    within, beyond = urgent(3600.0), urgent(60.0)
    assert within.max() == MAX_URGENT_LOAD and beyond.min() > 1.0
    # a long wait grows by all they bring over the horizon, a short one as much as at
    # MAX_URGENT_LOAD (a group that starts now waits for none)
    assert arrivals_delay_s(100.0, 2.5, 60.0) == 150.0
    assert arrivals_delay_s(1.0, 2.5, 60.0) == arrivals_delay_s(1.0, MAX_URGENT_LOAD, 60.0)
