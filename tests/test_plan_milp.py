"""The stochastic program: exact against enumeration, agrees with the slot model, qlm
never below the heuristic, fallback, threads."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyomo.environ as pe
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlmctl.plan import heuristics as H
from qlmctl.plan import highs
from qlmctl.plan.edf_program import ProgramResult, build_model, queues_of, scenario_data, solve
from qlmctl.plan.estimator import LengthModel, sample_scenarios
from qlmctl.plan.policies import (
    QlmPolicy,
    _milp_sequence,
    best_candidate,
    heuristic_candidates,
    make_policy,
    prepare,
    program_moves,
    program_queues,
)
from qlmctl.plan.simulate import Queues, Score, instance_of, queue_misses, simulate
from qlmctl.plan.types import RecentArrivals
from tests.helpers import make_requests
from tests.test_plan_core import mixed_requests, snapshot

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_program_matches_enumeration_of_assignments(seed: int) -> None:
    rng = np.random.default_rng(seed)
    streams = [
        (str(rng.choice(["m1", "m2"])), str(rng.choice(["interactive", "batch"])), 40)
        for _ in range(3)
    ]
    snap = snapshot(mixed_requests(streams, gap_s=0.05), ("m1", "m2", "m1"), cold_start_s=8.0)
    ctx = prepare(snap, LengthModel(), rng, scenarios=3, max_group_size=24)
    pb = ctx.problem
    assert 3 <= pb.num_groups <= 7
    scen = sample_scenarios(pb, LengthModel(), rng, 3)
    data = scenario_data(pb, scen)

    def value(assign: tuple[int, ...]) -> float:
        """The program's optimum with every group's instance fixed (an LP)."""
        m = build_model(data)
        for (g, i), var in m.x.items():
            var.fix(float(assign[g] == i))
        sol = highs.run(m, 30.0, 0.0)
        assert sol.objective is not None
        return sol.objective

    choices = [
        [i for i in range(pb.num_instances) if pb.eligible[g, i]] for g in range(pb.num_groups)
    ]
    best = min(value(a) for a in itertools.product(*choices))
    res = solve(pb, scen, mip_gap=0.0, time_limit_s=30)
    assert res.status == "Optimal" and res.instance_of is not None
    assert res.objective == pytest.approx(best, abs=1e-5)
    assert value(tuple(res.instance_of)) == pytest.approx(best, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_choices_are_the_warm_start_and_the_roomiest_and_dropped_rows_change_nothing(
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    reqs = make_requests(400, gap_s=0.02, output_tokens=1000)  # overloaded: capacity binds
    snap = snapshot(reqs, ("m1", "m1", "m1"), now_s=10.0)
    ctx = prepare(snap, LengthModel(), rng, scenarios=3, max_group_size=8, clairvoyant=True)
    pb = ctx.problem
    warm = [int(g) for g in rng.integers(0, pb.num_instances, pb.num_groups)]
    pairs = scenario_data(pb, ctx.scen, warm=warm, max_choices=2)["pairs"]
    assert all(sum(1 for gg, _ in pairs if gg == g) == 2 for g in range(pb.num_groups))
    assert all((g, warm[g]) in pairs for g in range(pb.num_groups))
    # with one choice, the program keeps only the warm start's capacity rows: its optimum
    # is that of the whole program with every group fixed where the warm start puts it
    full = build_model(scenario_data(pb, ctx.scen))
    for (g, i), var in full.x.items():
        var.fix(float(warm[g] == i))
    fixed = highs.run(full, 30.0, 0.0).objective
    res = solve(pb, ctx.scen, warm, mip_gap=0.0, time_limit_s=30, max_choices=1)
    assert res.instance_of == warm
    assert fixed is not None and res.objective == pytest.approx(fixed, abs=1e-6)


def test_program_agrees_with_the_slot_model_on_one_instance() -> None:
    # one instance, the true lengths, overloaded: the groups the program keeps are the
    # ones the slot model serves on time in the program's queue, the ones it gives up
    # late. The program reads a fluid capacity off one run of the slot model; with equal
    # lengths slots free in waves, so a group at a wave's edge may land on either side.
    reqs = make_requests(300, gap_s=0.02, output_tokens=400, slo_class="interactive")
    snap = snapshot(reqs, residents=("m1",), now_s=10.0)
    ctx = prepare(snap, LengthModel(), np.random.default_rng(0), max_group_size=8, clairvoyant=True)
    pb = ctx.problem
    res = solve(pb, ctx.scen, mip_gap=0.0, time_limit_s=30)
    assert res.instance_of is not None and res.miss is not None
    queues = queues_of(pb, res.instance_of, res.miss, H.edf_order(pb))
    late = simulate(pb, ctx.scen, queues).miss_prob
    share = np.array(res.miss)
    assert 10 < (share < 0.5).sum() < pb.num_groups - 10
    agree = np.where(share < 0.5, late == 0, late == 1) | (share == 0.5)
    assert agree.sum() >= pb.num_groups - 1


def test_program_keeps_what_the_slot_model_serves_when_arrivals_go_ahead() -> None:
    # 1,200 batch requests of 3,000 tokens on one instance while interactive requests
    # keep arriving (10/s over the last minute): those go ahead and stretch the batch
    # groups' wait for a slot. The program keeps as many groups as the slot model serves
    # on time in its queue (scaling the capacity by the share left over kept 51 of 48).
    waiting = make_requests(1200, slo_class="batch", gap_s=0.01, start_s=95.0, output_tokens=3000)
    seen = make_requests(600, gap_s=0.1, start_s=40.0, prefix="past-")
    snap = replace(
        snapshot(waiting, residents=("m1",), now_s=100.0), recent=RecentArrivals(60.0, tuple(seen))
    )
    ctx = prepare(snap, LengthModel(), np.random.default_rng(0), max_group_size=8, clairvoyant=True)
    pb = ctx.problem
    assert 0.1 < ctx.scen.urgent_load.mean() < 0.5
    res = solve(pb, ctx.scen, mip_gap=0.0, time_limit_s=30)
    assert res.instance_of is not None and res.miss is not None
    late = simulate(pb, ctx.scen, queues_of(pb, res.instance_of, res.miss, H.edf_order(pb)))
    kept = int((np.array(res.miss) < 0.5).sum())
    assert 10 < kept < pb.num_groups - 10
    # (how long the arrivals keep coming differs by scenario: on time in most of them)
    assert abs(kept - int((late.miss_prob < 0.5).sum())) <= 1


def test_the_programs_plan_with_the_heuristics_assignment_is_the_heuristics_plan() -> None:
    # the long prompts' group is due later, but its last request's dispatch deadline comes
    # first (its prefill is long): queued by dispatch deadlines, that prefill went first
    # and held up the short prompts due before it
    short = make_requests(8, gap_s=0.01, prompt_tokens=100, prefix="s")
    long = make_requests(8, gap_s=0.01, start_s=0.5, prompt_tokens=8000, prefix="l")
    snap = snapshot(short + long, residents=("m1",), now_s=1.0)
    ctx = prepare(snap, LengthModel(), np.random.default_rng(0), max_group_size=8)
    pb = ctx.problem
    assert pb.dispatch_deadline_s()[1, 0] < pb.dispatch_deadline_s()[0, 0]
    cands = heuristic_candidates(ctx)
    heuristic = cands[best_candidate(cands)][0]
    assert heuristic == ((0, 1),)
    assigned = ProgramResult(
        instance_of(heuristic, pb.num_groups), [0.0] * pb.num_groups,
        None, None, "Optimal", 0.0, 0.0, 0.0, 0.0, 0, 0,
    )  # fmt: skip
    sequence = _milp_sequence(cands)
    assert program_queues(ctx, assigned, sequence)["milp"] == heuristic


def test_the_programs_moves_are_kept_only_where_the_plan_scores_higher() -> None:
    """``milp-moves``: from a plan crowding one instance, the program's spread assignment
    moves groups off it and scores higher; from the spread plan, a program crowding one
    instance moves nothing."""
    # about 3 s of prefill each: 36 s on one instance, 12 s over three (TTFT 20 s)
    waiting = make_requests(12, gap_s=0.1, start_s=28.0, prompt_tokens=30_000)
    ctx = prepare(
        snapshot(waiting, ("m1",) * 3, now_s=30.0), LengthModel(), np.random.default_rng(0),
        max_group_size=3,
    )  # fmt: skip
    pb, edf = ctx.problem, H.edf_order(ctx.problem)
    crowded = H.greedy_place(pb, ctx.mean, edf, dict.fromkeys(range(pb.num_groups), 0))
    spread = H.greedy_place(pb, ctx.mean, edf)

    def program(queues: Queues) -> ProgramResult:
        where = instance_of(queues, pb.num_groups)
        return ProgramResult(where, [0.0] * pb.num_groups, None, None, "", 0.0, 0, 0, 0, 0, 0)

    def candidate(queues: Queues) -> tuple[Queues, Score, list[int]]:
        return queues, simulate(pb, ctx.scen, queues), edf

    for queues in (crowded, spread):  # each queue's misses add up to the plan's
        parts = [queue_misses(pb, ctx.scen, i, q) for i, q in enumerate(queues)]
        assert sum(parts) == pytest.approx(simulate(pb, ctx.scen, queues).expected_misses)
    low = simulate(pb, ctx.scen, crowded).attainment
    moved, score = program_moves(ctx, candidate(crowded), program(spread))
    assert score.attainment > low and moved != crowded
    assert program_moves(ctx, candidate(spread), program(crowded))[0] == spread


def test_program_gives_up_a_lost_backlog_that_would_make_the_rest_late() -> None:
    # at t=30 the backlog's 20 s deadlines have passed; served first, in EDF, it would
    # make the four fresh requests late too, so the program gives it up
    lost = make_requests(200, gap_s=0.01, output_tokens=3000, prefix="old-")
    fresh = make_requests(4, gap_s=0.01, start_s=29.0, prefix="new-")
    snap = snapshot(lost + fresh, residents=("m1",), now_s=30.0)
    ctx = prepare(snap, LengthModel(), np.random.default_rng(0), scenarios=3)
    pb = ctx.problem
    res = solve(pb, ctx.scen, mip_gap=0.0, time_limit_s=30)
    assert res.status == "Optimal" and res.miss is not None and res.instance_of is not None
    is_fresh = [grp.requests[0].id.startswith("new-") for grp in pb.groups]
    assert all((share < 0.5) == f for share, f in zip(res.miss, is_fresh, strict=True))
    queue = queues_of(pb, res.instance_of, res.miss, H.edf_order(pb))[0]
    assert all(is_fresh[g] for g in queue[: sum(is_fresh)])  # the fresh ones run first


def test_model_is_pyomo_with_named_stage_costs_and_binaries_only_for_assignment() -> None:
    snap = snapshot(mixed_requests([("m1", "interactive", 10), ("m2", "batch", 10)]))
    ctx = prepare(snap, LengthModel(), np.random.default_rng(0), scenarios=2)
    m = build_model(scenario_data(ctx.problem, ctx.scen))
    assert len(m.second_stage_cost) == 2 and m.first_stage_cost is not None
    assert all(v.domain is pe.Binary for v in m.x.values())
    assert not any(v.is_integer() for v in m.z.values())


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 10_000))
def test_qlm_never_below_heuristic(seed: int) -> None:
    rng = np.random.default_rng(seed)
    streams = [
        (str(rng.choice(["m1", "m2"])), str(rng.choice(["interactive", "batch"])), 30)
        for _ in range(4)
    ]
    snap = snapshot(mixed_requests(streams, gap_s=0.1), ("m1", "m2"), cold_start_s=10.0)
    heur = make_policy("heuristic", scenarios=20, max_group_size=8).plan(
        snap, np.random.default_rng(seed).spawn(2)[0]
    )
    qlm = make_policy(
        "qlm", scenarios=20, max_group_size=8, time_limit_s=0.3, placement=False
    ).plan(snap, np.random.default_rng(seed))
    assert qlm.predicted_attainment >= heur.predicted_attainment - 1e-12
    assert qlm.solver.chosen in heur.solver.scores or qlm.solver.chosen.startswith("milp")


def test_timeout_without_incumbent_falls_back_to_heuristic() -> None:
    snap = snapshot(mixed_requests([("m1", "interactive", 60), ("m2", "batch", 60)], 0.05))
    pol = QlmPolicy(
        time_limit_s=0.0, warm_start=False, scenarios=10, max_group_size=4, placement=False
    )
    plan = pol.plan(snap, np.random.default_rng(0))
    assert not plan.solver.chosen.startswith("milp")
    assert "fell back to the heuristic" in plan.solver.note
    assert sorted(plan.request_ids()) == sorted(r.id for r in snap.waiting)


def test_quick_and_improve_in_worker_threads() -> None:
    snap = snapshot(mixed_requests([("m1", "interactive", 30), ("m2", "batch", 30)], 0.1))
    pol = QlmPolicy(scenarios=10, max_group_size=6)
    quick = pol.quick(snap, np.random.default_rng(0))
    assert quick.solver.status == "heuristic" and quick.policy == "qlm"
    results: list[object] = []
    threads = [
        threading.Thread(
            target=lambda s=s: results.append(pol.improve(snap, 0.5, np.random.default_rng(s)))
        )
        for s in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2  # each is a better plan or None, never an exception


def test_milp_solves_after_another_highs_run_in_the_process(tmp_path: Path) -> None:
    # HiGHS fixes its thread pool at the first run in a process: a solve made elsewhere
    # first, with HiGHS's defaults (the benchmark's capacity LP did), must not leave the
    # MILP unable to run
    script = """
import highspy
import numpy as np
h = highspy.Highs()
h.setOptionValue("output_flag", False)
h.addVars(1, np.zeros(1), np.ones(1))
h.run()
from tests.test_plan_milp import mixed_requests, snapshot
from qlmctl.plan.policies import QlmPolicy
snap = snapshot(mixed_requests([("m1", "interactive", 20), ("m2", "batch", 20)], 0.1))
plan = QlmPolicy(scenarios=5, max_group_size=6, time_limit_s=1.0).plan(
    snap, np.random.default_rng(0)
)
print(plan.solver.status)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.splitlines()[-1] in {"Optimal", "Time limit reached"}  # after a banner


def test_relaxation_bounds_the_program_and_late_arrivals_cannot_use_earlier_capacity() -> None:
    # every request is known at t=0 (the hindsight bound's snapshot): the LP relaxation
    # bounds the program, and a burst arriving at t=60 keeps no more than the same burst
    # arriving at t=0: the idle minute before it arrives is no use to it
    def kept(start_s: float) -> tuple[float, float]:
        burst = make_requests(400, gap_s=0.001, output_tokens=400, start_s=start_s)
        ctx = prepare(
            snapshot(burst, residents=("m1",), now_s=0.0),
            LengthModel(), np.random.default_rng(0), max_group_size=8, clairvoyant=True,
        )  # fmt: skip
        exact = solve(ctx.problem, ctx.scen, mip_gap=0.0, time_limit_s=30)
        relaxed = solve(ctx.problem, ctx.scen, time_limit_s=30, relaxed=True)
        assert exact.objective is not None and relaxed.bound is not None
        total = ctx.problem.total_weight()
        return -relaxed.bound / total, -exact.objective / total

    for start_s in (0.0, 60.0):
        bound, best = kept(start_s)
        assert best <= bound + 1e-9 and 0.2 < bound < 0.8
    assert kept(60.0)[0] <= kept(0.0)[0] + 0.02


def test_an_interior_solve_stopped_short_is_finished_by_the_simplex(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the interior-point method without crossover may end without a proven optimum: the
    # relaxation's bound must then come from the simplex, not be missing
    ctx = prepare(
        snapshot(make_requests(60, gap_s=0.01, output_tokens=400), residents=("m1", "m1")),
        LengthModel(), np.random.default_rng(0), max_group_size=4, clairvoyant=True,
    )  # fmt: skip
    full = solve(ctx.problem, ctx.scen, time_limit_s=30, relaxed=True)
    quiet = highs.new_highs

    def stopped_after_one_step() -> object:
        h = quiet()
        h.setOptionValue("ipm_iteration_limit", 1)
        return h

    monkeypatch.setattr(highs, "new_highs", stopped_after_one_step)
    short = solve(ctx.problem, ctx.scen, time_limit_s=30, relaxed=True)
    assert full.status == short.status == "Optimal"
    assert full.bound is not None and short.bound == pytest.approx(full.bound, rel=1e-6)


def test_work_arriving_before_a_burst_does_not_lend_it_the_idle_time_between() -> None:
    # two instances; for 55 s a stream of long prompts one instance alone could not keep
    # up with (so each one's capacity curve, which runs every group, is busy throughout),
    # then a burst at 60 s that does not fit its window: the stream adds its own
    # requests to the bound, not room for the burst (without release windows the bound
    # kept all 365 requests; with them 262 = 165 + 97)
    def bound(requests: list) -> float:
        ctx = prepare(
            snapshot(requests, residents=("m1", "m1"), now_s=0.0),
            LengthModel(), np.random.default_rng(0), max_group_size=8, clairvoyant=True,
        )  # fmt: skip
        res = solve(ctx.problem, ctx.scen, time_limit_s=60, relaxed=True)
        assert res.bound is not None
        return -res.bound / ctx.problem.total_weight() * len(requests)  # requests kept

    long = {"prompt_tokens": 4000, "output_tokens": 10}
    stream = make_requests(165, gap_s=1 / 3, prefix="s", **long)  # 1.2x one instance
    burst = make_requests(200, gap_s=0.001, start_s=60.0, prefix="b", **long)
    alone = bound(burst)
    assert alone < 0.8 * len(burst)  # the burst does not fit
    assert bound(stream + burst) <= len(stream) + alone + 0.02 * len(burst)


def test_a_swap_costs_its_load_and_the_drain_of_a_busy_batch() -> None:
    # one instance holding m1 with m2 work queued: switching idles the batch's slots
    # until its longest request ends, on top of the load itself
    reqs = mixed_requests([("m1", "batch", 60), ("m2", "batch", 20)], gap_s=0.01)
    snap = snapshot(reqs, ("m1",), cold_start_s=8.0)
    ctx = prepare(snap, LengthModel(), np.random.default_rng(0), scenarios=4)
    pb = ctx.problem
    data = scenario_data(pb, ctx.scen)
    m2 = pb.models.index("m2")
    load_s = pb.swap_s[0, pb.init_model[0], m2]
    assert data["swap"][(0, m2)] > load_s  # without the drain it would be the load alone
