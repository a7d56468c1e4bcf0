"""Planner core: groups, estimator, scoring, fast policies, plan invariants and bad input."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlmctl.domain import Request
from qlmctl.errors import BadInput
from qlmctl.plan import heuristics as H
from qlmctl.plan.estimator import (
    Ahead,
    LengthModel,
    _inverse_mills,
    _norm_ppf,
    known_scenario,
    sample_scenarios,
)
from qlmctl.plan.groups import build_groups
from qlmctl.plan.policies import POLICIES, make_policy, prepare
from qlmctl.plan.simulate import Score, first_tokens, scenario_quantiles, simulate
from qlmctl.plan.slots import EngineState
from qlmctl.plan.types import (
    InstanceState,
    Plan,
    PlannedGroup,
    QueueSnapshot,
    RecentArrivals,
    RunningRequest,
)
from qlmctl.serve.state import Forecast
from tests.helpers import SLO_CLASSES, make_perf, make_requests

MODELS = ("m1", "m2")


def snapshot(
    requests: list[Request],
    residents: tuple[str | None, ...] = ("m1", "m2"),
    servable: tuple[frozenset[str] | None, ...] | None = None,
    now_s: float = 0.0,
    running: tuple[tuple[RunningRequest, ...], ...] | None = None,
    cold_start_s: float = 20.0,
) -> QueueSnapshot:
    """A snapshot with one instance per resident model on GPU ``G``."""
    perf = {(m, "G"): make_perf(m, cold_start_s=cold_start_s) for m in MODELS}
    insts = tuple(
        InstanceState(
            f"i{k}",
            "G",
            model,
            True,
            now_s,
            servable_models=servable[k] if servable else None,
            running=running[k] if running else (),
        )
        for k, model in enumerate(residents)
    )
    return QueueSnapshot(now_s, tuple(requests), insts, SLO_CLASSES, perf)


def mixed_requests(counts: list[tuple[str, str, int]], gap_s: float = 0.5) -> list[Request]:
    """Requests of several (model, class, n) streams, interleaved by arrival."""
    out: list[Request] = []
    for k, (model, cls, n) in enumerate(counts):
        out += make_requests(n, model=model, slo_class=cls, gap_s=gap_s, prefix=f"s{k}-")
    return sorted(out, key=lambda r: (r.arrival_s, r.id))


# ---- groups -----------------------------------------------------------------------


def test_groups_fifo_absolute_deadlines_and_split() -> None:
    reqs = make_requests(10, gap_s=1.0, start_s=100.0)
    groups = build_groups(reqs, SLO_CLASSES, lambda r: 50.0, max_size=4)
    assert [g.size for g in groups] == [4, 4, 2]
    assert [r.id for g in groups for r in g.requests] == [r.id for r in reqs]
    # absolute: arrival + TTFT of the first request, not the class's 20 s
    assert [g.deadline_s for g in groups] == [120.0, 124.0, 128.0]


def test_groups_tied_on_deadline_keep_one_order_across_replans() -> None:
    # A burst at one instant: every group's deadline ties. A re-plan after the first
    # dispatches re-cuts and renumbers the groups; the rest must keep their order
    # (ids "…/10" before "…/2" once reordered them).
    reqs = make_requests(60, gap_s=0.0) + make_requests(
        60, gap_s=0.0, prefix="b", prompt_tokens=900
    )

    def order(waiting: list[Request]) -> list[str]:
        groups = build_groups(waiting, SLO_CLASSES, lambda r: 50.0, max_size=4)
        return [r.id for g in groups for r in g.requests]

    first = order(reqs)
    assert order([r for r in reqs if r.id not in set(first[:6])]) == first[6:]


def test_groups_split_by_span_and_length_class() -> None:
    reqs = make_requests(3, gap_s=6.0) + make_requests(1, prompt_tokens=5000, prefix="long")
    groups = build_groups(reqs, SLO_CLASSES, lambda r: 50.0)
    sizes = sorted((g.length_class, g.size) for g in groups)
    assert sizes == [("to512", 1), ("to512", 2), ("to8k", 1)]  # span 10 s: 12 s is cut off


def test_length_classes_keep_a_groups_requests_within_twice_each_others_length() -> None:
    """A group is shed whole: a 600-token request does not share one with 1,500 tokens."""
    reqs = [
        *make_requests(2, prompt_tokens=550, prefix="a"),
        *make_requests(2, prompt_tokens=1450, prefix="b"),
    ]
    groups = build_groups(reqs, SLO_CLASSES, lambda r: 50.0)
    assert sorted((g.length_class, [r.id for r in g.requests]) for g in groups) == [
        ("to1k", ["a0", "a1"]),
        ("to2k", ["b0", "b1"]),
    ]


def test_unknown_class_is_bad_input() -> None:
    reqs = make_requests(1, slo_class="gold")
    with pytest.raises(BadInput, match="unknown SLO class 'gold'"):
        build_groups(reqs, SLO_CLASSES, lambda r: 1.0)


# ---- estimator --------------------------------------------------------------------


def test_length_posterior_moves_towards_observations() -> None:
    lm = LengthModel(prior_strength=10)
    lm.set_priors({("m1", "G"): make_perf(output_len_sample=(100, 200, 400))})
    req = make_requests(1, output_tokens=5000)[0]
    before = lm.expected(req)
    for _ in range(50):
        lm.observe("m1", "interactive", 1000)
    after = lm.expected(req)
    assert before < 400 < 800 < after
    assert lm.expected(make_requests(1, slo_class="batch", output_tokens=5000)[0]) == pytest.approx(
        before, rel=0.3
    )


def test_running_requests_count_as_lengths_at_least_what_they_generated() -> None:
    """Under load the short requests finish first: fifty 100-token completions alone put
    the median near 100; fifty requests still running past 400 tokens lift it (EM on the
    censored ones), while fifty just started carry no information (mean and spread as
    before)."""
    lm = LengthModel(prior_strength=10)
    lm.set_priors({("m1", "G"): make_perf(output_len_sample=(100, 200, 400))})
    for _ in range(50):
        lm.observe("m1", "batch", 100)
    mu, tau, sigma = lm.posterior("m1", "batch")
    lm.observe_running([("m1", "batch", 1)] * 50)
    assert lm.posterior("m1", "batch") == pytest.approx((mu, tau, sigma), rel=1e-3)
    lm.observe_running([("m1", "batch", 400)] * 50)
    mu_c, tau_c, _ = lm.posterior("m1", "batch")
    assert math.exp(mu) < 150 and math.exp(mu_c) > 200 and tau_c < tau
    lm.observe_running([])  # they ended: back to the completions alone
    assert lm.posterior("m1", "batch") == pytest.approx((mu, tau, sigma))


def test_a_long_answer_is_expected_to_go_on() -> None:
    """What is left after k tokens is the predictive log-normal's mean above k, less k
    (checked by sampling it), capped by the request's limit."""
    lm = LengthModel(prior_strength=10)
    lm.set_priors({("m1", "G"): make_perf(output_len_sample=(100, 200, 400))})
    mu, tau, sigma = lm.posterior("m1", "interactive")
    draws = np.exp(np.random.default_rng(0).normal(mu, math.hypot(tau, sigma), 2_000_000))
    req = make_requests(1, output_tokens=100_000)[0]
    for k in (1, 200, 1000):
        sampled = draws[draws > k].mean() - k
        assert lm.expected_left(req, k) == pytest.approx(sampled, rel=0.02)
    assert lm.expected_left(req, 1000) > lm.expected_left(req, 200) > lm.expected(req) - 200
    capped = make_requests(1, output_tokens=1100)[0]
    assert lm.expected_left(capped, 1000) == pytest.approx(100)
    assert lm.expected_left(capped, 1100) == 1.0


def test_inverse_mills_ratio_matches_erfc_into_the_far_tail() -> None:
    a = np.array([-6.0, -1.0, 0.0, 0.5, 2.0, 8.0, 30.0])
    ref = [
        math.exp(-x * x / 2) / math.sqrt(2 * math.pi) / (0.5 * math.erfc(x / math.sqrt(2)))
        for x in a
    ]
    assert _inverse_mills(a) == pytest.approx(ref, rel=1e-6)


def test_norm_ppf_matches_known_quantiles() -> None:
    p = np.array([0.001, 0.025, 0.5, 0.975, 0.999])
    expected = [-3.090232, -1.959964, 0.0, 1.959964, 3.090232]
    assert np.allclose(_norm_ppf(p), expected, atol=1e-5)


def test_running_requests_delay_their_instance() -> None:
    busy = RunningRequest(make_requests(1, prefix="run", output_tokens=4000)[0], 0.0, 0.5, 10)
    snap = snapshot(make_requests(4), running=((busy,), ()))
    ctx = prepare(snap, LengthModel(), np.random.default_rng(0), scenarios=30)
    busy_slots, idle_slots = ctx.scen.engines[0].slots, ctx.scen.engines[1].slots
    assert (busy_slots[:, -1] > 0).all() and (busy_slots[:, :-1] == 0).all()  # one slot held
    assert (idle_slots == 0).all()


def test_an_instance_has_at_least_the_slots_its_running_requests_hold() -> None:
    """Twenty short requests run; ten long ones wait. By the model's mean size fewer than
    twenty fit the KV cache, but the twenty running fit (the core admitted each by its
    size): the instance holding the model gets 20 slots, so none of them is modelled as
    queued behind the others; an instance holding another model keeps the mean's count."""
    perf = make_perf(kv_capacity_tokens=100_000)
    running = tuple(
        RunningRequest(r, 0.0, 0.1, 5) for r in make_requests(20, prefix="run", output_tokens=200)
    )
    waiting = make_requests(10, prompt_tokens=20_000, output_tokens=200, slo_class="batch")
    snap = QueueSnapshot(
        1.0,
        tuple(waiting),
        (
            InstanceState("i0", "G", "m1", True, 1.0, running=running),
            InstanceState("i1", "G", "m2", True, 1.0),
        ),
        SLO_CLASSES,
        {("m1", "G"): perf, ("m2", "G"): make_perf("m2")},
    )
    ctx = prepare(snap, LengthModel(), np.random.default_rng(0), scenarios=10)
    held, by_mean = ctx.problem.batch[ctx.problem.models.index("m1")].tolist()
    assert held == 20 and by_mean < 20
    assert ctx.scen.engines[0].slots.shape[1] == 20


def test_running_requests_decode_at_the_step_of_the_batch_running_not_of_the_queue() -> None:
    """The step a running request decodes at comes from the sizes of the requests running
    beside it: a queue of longer prompts (under overload, those served last pile up
    there) does not slow it down; a request of another model has its own step. (Forty
    run; the waiting prompts are so long that fewer than forty fit: the batch is forty
    either way.)"""
    running = tuple(
        RunningRequest(r, 0.0, 0.1, 5) for r in make_requests(40, prefix="run", output_tokens=200)
    )
    other = (RunningRequest(make_requests(1, model="m2", prefix="o")[0], 0.0, 0.1, 5),)

    def steps(prompt_tokens: int) -> np.ndarray:
        waiting = make_requests(10, prompt_tokens=prompt_tokens, slo_class="batch")
        ctx = prepare(
            snapshot(waiting, running=(running, other)),
            LengthModel(),
            np.random.default_rng(0),
            scenarios=4,
        )
        assert ctx.problem.batch[0, 0] == 40
        return ctx.problem.running_step_s

    long, longer = steps(20_000), steps(30_000)
    assert np.array_equal(long, longer)
    assert len(set(long[:40].tolist())) == 1 and long[40] != long[0]


def test_arrivals_going_ahead_stretch_the_wait_for_a_slot_not_for_the_pipeline() -> None:
    """Half the instance taken by arrivals that go ahead: a request waiting 10 s for a
    slot waits 10 s longer; one that has its slot now but waits 10 s behind other
    prompts in the pipeline (already sent: vLLM serves its queue in order) does not."""
    snap = snapshot(make_requests(2, slo_class="batch"))
    ctx = prepare(snap, LengthModel(), np.random.default_rng(0), max_group_size=2)
    pb, s = ctx.problem, ctx.scen.count
    decode = np.ones((s, 2))
    half = np.full(s, 0.5)
    b = ctx.scen.engines[0].slots.shape[1]

    def dispatch(slots_free_s: float, pipeline_free_s: float, urgent: np.ndarray) -> np.ndarray:
        engine = EngineState(np.full((s, b), slots_free_s), np.full(s, pipeline_free_s))
        return first_tokens(pb, engine, 0, 0, decode, Ahead(urgent, np.full(s, 60.0)))[0]

    slot_bound, unstretched = dispatch(10.0, 0.0, half), dispatch(10.0, 0.0, 0 * half)
    assert np.allclose(slot_bound, unstretched + 10.0)
    pipeline_bound, unstretched = dispatch(0.0, 10.0, half), dispatch(0.0, 10.0, 0 * half)
    assert (unstretched >= 10.0).all() and np.array_equal(pipeline_bound, unstretched)


def test_dispatch_keeps_the_cores_engine_queue_ahead_of_the_pipeline() -> None:
    """Slots free, a burst of long prompts: the core sends each when fewer than
    ``max_waiting`` wait in the engine, i.e. when the prompt that many places before it
    enters the pipeline; without that limit, as soon as its slot is free. Never after
    its own start."""
    reqs = make_requests(6, gap_s=0.0, prompt_tokens=5000)

    def score(max_waiting: int | None) -> Score:
        snap = snapshot(reqs, residents=("m1",))
        inst = replace(snap.instances[0], max_waiting=max_waiting)
        snap = replace(snap, instances=(inst,))
        ctx = prepare(snap, LengthModel(), np.random.default_rng(0), max_group_size=6)
        return simulate(ctx.problem, ctx.scen, ((0,),))

    paced, free = score(2), score(None)
    assert np.array_equal(paced.request_start_s, free.request_start_s)  # only dispatch moves
    assert np.array_equal(free.request_dispatch_s, np.zeros(6))
    assert np.array_equal(paced.request_dispatch_s[:2], np.zeros(2))
    assert np.allclose(paced.request_dispatch_s[2:], paced.request_start_s[:-2])
    assert (paced.request_dispatch_s[3:] > 0).all()  # the first prompt starts at once
    assert (paced.request_dispatch_s <= paced.request_start_s).all()


def test_a_requests_forecast_is_its_dispatch() -> None:
    """The run log's forecast is the dispatch; a plan from before it has the start."""
    group = PlannedGroup("g", "m1", "interactive", ("a",), 20.0, 5.0, 9.0, 0.1,
                         request_start_s=(5.0,), request_miss_probability=(0.1,))  # fmt: skip
    assert Forecast.of_group(group, 0).start_s == 5.0
    assert Forecast.of_group(replace(group, request_dispatch_s=(3.0,)), 0).start_s == 3.0


def test_scenarios_spread_and_clairvoyant_truth() -> None:
    snap = snapshot(mixed_requests([("m1", "interactive", 40), ("m2", "batch", 5)]))
    ctx = prepare(snap, LengthModel(), np.random.default_rng(1), scenarios=200)
    svc = ctx.scen.service_s[:, 0, :]
    assert (svc.std(axis=1) > 0).all()  # CLT and exact paths both random
    truth = known_scenario(ctx.problem)
    assert truth.count == 1 and np.isfinite(truth.service_s[:, 0, 0]).all()


def test_clairvoyant_policies_plan_on_the_true_lengths() -> None:
    reqs = make_requests(3, output_tokens=3000) + make_requests(3, prefix="s", output_tokens=5)
    snap = snapshot(reqs)
    guess = prepare(snap, LengthModel(), np.random.default_rng(0))
    truth = prepare(snap, LengthModel(), np.random.default_rng(0), clairvoyant=True)
    assert {g.length_class for g in guess.problem.groups} == {"to512"}
    assert {g.length_class for g in truth.problem.groups} == {"to512", "to4k"}
    known = known_scenario(truth.problem)
    assert truth.scen.count == 1 and np.allclose(truth.scen.service_s, known.service_s)
    for name in POLICIES:
        plan = make_policy(name, clairvoyant=True).plan(snap, np.random.default_rng(0))
        assert sorted(plan.request_ids()) == sorted(r.id for r in reqs)
        misses = [g.miss_probability for ip in plan.instances for g in ip.groups]
        assert set(misses) <= {0.0, 1.0}  # one known scenario: no uncertainty left


# ---- policies and plans --------------------------------------------------------------


@st.composite
def workloads(draw: st.DrawFn) -> tuple[QueueSnapshot, str]:
    streams = draw(
        st.lists(
            st.tuples(
                st.sampled_from(MODELS),
                st.sampled_from(["interactive", "batch"]),
                st.integers(1, 30),
            ),
            min_size=1,
            max_size=5,
        )
    )
    residents = draw(st.sampled_from([("m1",), ("m1", "m2"), ("m2", None, "m1")]))
    servable = tuple(frozenset([m]) if m else None for m in residents)
    restrict = draw(st.booleans()) and set(MODELS) <= set(residents)
    reqs = mixed_requests(streams, gap_s=draw(st.sampled_from([0.1, 2.0])))
    return snapshot(reqs, residents, servable if restrict else None), draw(
        st.sampled_from(sorted(POLICIES))
    )


@settings(max_examples=40, deadline=None)
@given(workloads())
def test_plan_invariants(case: tuple[QueueSnapshot, str]) -> None:
    snap, name = case
    models_up = {m for i in snap.instances for m in MODELS if i.can_serve(m)}
    if not {r.model for r in snap.waiting} <= models_up:
        with pytest.raises(BadInput, match="no live instance can serve"):
            make_policy(name, scenarios=10, time_limit_s=0.2).plan(snap, np.random.default_rng(0))
        return
    plan = make_policy(name, scenarios=10, time_limit_s=0.2).plan(snap, np.random.default_rng(0))
    ids = plan.request_ids()
    assert sorted(ids) == sorted(r.id for r in snap.waiting)  # every request exactly once
    arrival = {r.id: (r.arrival_s, r.id) for r in snap.waiting}
    insts = {i.instance_id: i for i in snap.instances}
    for ip in plan.instances:
        for g in ip.groups:
            assert insts[ip.instance_id].can_serve(g.model)
            assert [arrival[r] for r in g.request_ids] == sorted(arrival[r] for r in g.request_ids)
            assert 0.0 <= g.miss_probability <= 1.0
            assert g.predicted_finish_s >= g.predicted_start_s
    assert 0.0 <= plan.predicted_attainment <= 1.0


def test_priority_policy_sets_vllm_priority() -> None:
    snap = snapshot(mixed_requests([("m1", "interactive", 3), ("m1", "batch", 3)]))
    plan = make_policy("priority").plan(snap, np.random.default_rng(0))
    prios = {g.slo_class: g.priority for ip in plan.instances for g in ip.groups}
    assert prios == {"interactive": 0, "batch": 10}


def test_batching_beats_fcfs_when_swaps_hurt() -> None:
    # one instance, alternating models: FCFS swaps at every group, batching does not
    reqs = mixed_requests([("m1", "batch", 60), ("m2", "batch", 60)], gap_s=0.01)
    snap = snapshot(reqs, residents=("m1",), cold_start_s=120.0)
    fcfs = make_policy("fcfs", max_group_size=4).plan(snap, np.random.default_rng(0))
    heur = make_policy("heuristic", max_group_size=4).plan(snap, np.random.default_rng(0))
    assert heur.predicted_attainment > fcfs.predicted_attainment + 0.2


def test_groups_already_lost_go_last_under_overload() -> None:
    # at t=30 the backlog's 20 s deadlines have passed; serving it first (textbook EDF)
    # would make the requests that just arrived late as well
    lost = make_requests(200, gap_s=0.01, output_tokens=3000, prefix="old-")
    fresh = make_requests(4, gap_s=0.01, start_s=29.0, prefix="new-")
    snap = snapshot(lost + fresh, residents=("m1",), now_s=30.0)
    # groups of 32: the lost ones take the instance long enough to lose a fresh one
    edf = make_policy("edf", max_group_size=32).plan(snap, np.random.default_rng(0))
    heur = make_policy("heuristic", max_group_size=32).plan(snap, np.random.default_rng(0))
    assert edf.instances[0].groups[-1].deadline_s == 49.0  # EDF: the fresh group waits
    # the heuristic's plan is served deferring the lost (or it sheds them itself)
    assert heur.predicted_attainment == pytest.approx(4 / 204)  # the fresh four, surely
    assert edf.predicted_attainment < heur.predicted_attainment - 1 / 204  # a fresh one lost


def test_deadlines_in_plan_are_absolute() -> None:
    snap = snapshot(make_requests(3, start_s=500.0), now_s=505.0)
    plan = make_policy("edf").plan(snap, np.random.default_rng(0))
    assert [g.deadline_s for ip in plan.instances for g in ip.groups] == [520.0]


def test_bad_input_is_clear() -> None:
    with pytest.raises(BadInput, match="no waiting requests"):
        make_policy("edf").plan(snapshot([]), np.random.default_rng(0))
    with pytest.raises(BadInput, match="choose one of fcfs, edf, priority, heuristic, qlm"):
        make_policy("sjf")
    with pytest.raises(BadInput, match="must be >= 0"):
        make_perf(decode_s_per_seq=float("nan"))
    reqs = make_requests(2, model="m2")
    with pytest.raises(BadInput, match="no live instance can serve model 'm2'"):
        make_policy("heuristic").plan(
            snapshot(reqs, ("m1",), (frozenset({"m1"}),)), np.random.default_rng(0)
        )


def test_plan_json_round_trip(tmp_path: Path) -> None:
    snap = snapshot(mixed_requests([("m1", "interactive", 5), ("m2", "batch", 5)]))
    plan = make_policy("heuristic").plan(snap, np.random.default_rng(0))
    plan.save(tmp_path / "p.json")
    back = Plan.from_dict(__import__("json").loads((tmp_path / "p.json").read_text()))
    assert back == plan


def test_scores_are_reproducible_and_match_simulation() -> None:
    snap = snapshot(mixed_requests([("m1", "interactive", 12), ("m2", "interactive", 12)]))
    a = make_policy("edf").plan(snap, np.random.default_rng(3))
    b = make_policy("edf").plan(snap, np.random.default_rng(3))
    assert a.instances == b.instances and a.predicted_attainment == b.predicted_attainment
    ctx = prepare(snap, LengthModel(), np.random.default_rng(9), scenarios=20)
    sc = sample_scenarios(ctx.problem, LengthModel(), np.random.default_rng(9), 20)
    queues = tuple(tuple(range(ctx.problem.num_groups)) if i == 0 else () for i in range(2))
    score = simulate(ctx.problem, sc, queues)
    assert score.miss.shape == (ctx.problem.num_groups, 20)
    assert score.expected_misses == pytest.approx(
        float(np.sum(score.miss.mean(1) * ctx.problem.size))
    )


# ---- placement --------------------------------------------------------------------


@pytest.mark.parametrize("defer_late", [False, True])
def test_removal_from_a_checkpoint_equals_a_full_replay(defer_late: bool) -> None:
    """Shedding removes groups from checkpoints; the state must be what a replay of the
    whole queue gives (same engines, misses and queued work)."""
    from qlmctl.plan.heuristics import _Placement, edf_order

    reqs = mixed_requests([("m1", "interactive", 40), ("m2", "batch", 40), ("m1", "batch", 30)])
    ctx = prepare(snapshot(reqs), LengthModel(), np.random.default_rng(0), max_group_size=4)
    pb, mean = replace(ctx.problem, defer_late=defer_late), ctx.mean
    order = edf_order(pb)
    places = [_Placement(pb, mean, checkpoints=c) for c in (False, True)]
    for place in places:
        for g in order:
            place.add(g, place.best(g))
        for i, queue in enumerate(list(place.queues)):
            if len(queue) > 2:
                place.remove(queue[len(queue) // 2], i)
                place.remove(queue[0], i)
    full, fast = places
    assert full.queues == fast.queues and full.queued == fast.queued
    for a, b in zip(full.engines, fast.engines, strict=True):
        assert np.array_equal(a.slots, b.slots) and np.array_equal(a.pipeline_s, b.pipeline_s)
    assert list(full.loaded) == list(fast.loaded)
    for q in full.queues:
        for g in q:
            assert np.array_equal(full.misses[g], fast.misses[g])


def test_the_scorer_serves_the_hopeless_last_when_the_core_defers_them() -> None:
    # the backlog is lost at t=30; EDF puts it first: the fresh four make it only if the
    # core serves what is already lost after them
    lost = make_requests(200, gap_s=0.01, output_tokens=3000, prefix="old-")
    fresh = make_requests(4, gap_s=0.01, start_s=29.0, prefix="new-")
    snap = snapshot(lost + fresh, residents=("m1",), now_s=30.0)
    ctx = prepare(snap, LengthModel(), np.random.default_rng(0), max_group_size=32)
    edf = (tuple(H.edf_order(ctx.problem)),)
    deferring = simulate(replace(ctx.problem, defer_late=True), ctx.scen, edf)
    assert deferring.attainment == pytest.approx(4 / 204)
    assert simulate(ctx.problem, ctx.scen, edf).attainment < 4 / 204 - 1 / 204


def test_the_scorer_serves_the_hopeless_ahead_of_work_due_beyond_the_defer_horizon() -> None:
    # as above, the backlog is lost; batch work due at about 629 s comes after it
    lost = make_requests(200, gap_s=0.01, output_tokens=3000, prefix="old-")
    batch = make_requests(4, slo_class="batch", gap_s=0.01, start_s=29.0, prefix="new-")
    snap = snapshot(lost + batch, residents=("m1",), now_s=30.0)
    ctx = prepare(snap, LengthModel(), np.random.default_rng(0), max_group_size=32)
    edf = (tuple(H.edf_order(ctx.problem)),)
    served = replace(ctx.problem, defer_late=True)
    scores = {h: simulate(replace(served, defer_horizon_s=h), ctx.scen, edf)
              for h in (math.inf, 3600.0, 60.0)}  # fmt: skip
    last = ctx.problem.num_groups - 1
    assert ctx.problem.groups[last].slo_class == "batch"
    # due within an hour of the lost work's turn: the lost work waits behind it
    assert np.array_equal(scores[3600.0].start_s, scores[math.inf].start_s)
    # due more than a minute after it: the lost work goes first, 3000 tokens a request
    decode_s = float(ctx.mean.decode_s[0, 0, 0])
    assert scores[60.0].start_s[last] > scores[math.inf].start_s[last] + decode_s
    assert [s.attainment for s in scores.values()] == pytest.approx([4 / 204] * 3)


def test_plans_forecast_each_requests_first_token_and_finish_with_a_p90() -> None:
    snap = snapshot(mixed_requests([("m1", "interactive", 12), ("m2", "batch", 40)]))
    plan = make_policy("heuristic").plan(snap, np.random.default_rng(0))
    groups = [g for ip in plan.instances for g in ip.groups]
    assert groups
    for g in groups:
        cols = (g.request_first_token_s, g.request_first_token_p90_s, g.request_finish_s,
                g.request_finish_p90_s)  # fmt: skip
        assert all(len(c) == len(g.request_ids) for c in cols)
        for token, token_p90, finish, finish_p90 in zip(*cols, strict=True):
            # every scenario's finish comes after its first token, so every quantile does
            assert snap.now_s < token <= token_p90 and token < finish <= finish_p90


def test_a_request_served_after_the_queue_has_no_time_forecast(tmp_path: Path) -> None:
    # as in the test above: the old backlog is lost and served after the fresh four
    lost = make_requests(200, gap_s=0.01, output_tokens=3000, prefix="old-")
    fresh = make_requests(4, gap_s=0.01, start_s=29.0, prefix="new-")
    plan = make_policy("heuristic").plan(
        snapshot(lost + fresh, residents=("m1",), now_s=30.0), np.random.default_rng(0)
    )
    token = {r: t for ip in plan.instances for g in ip.groups
             for r, t in zip(g.request_ids, g.request_first_token_p90_s, strict=True)}  # fmt: skip
    assert all(np.isfinite(token[r.id]) for r in fresh)
    assert all(token[r.id] == np.inf for r in lost)
    plan.save(tmp_path / "p.json")
    data = __import__("json").loads((tmp_path / "p.json").read_text())
    nulls = [t for g in data["instances"][0]["groups"] for t in g["request_first_token_p90_s"]]
    assert nulls.count(None) == len(lost)
    assert Plan.from_dict(data) == plan


def test_scenario_quantiles_are_order_statistics() -> None:
    values = np.array([[float(s), 10.0 * s] for s in range(1, 11)])  # [S=10, N=2]
    values[9, 1] = np.inf  # one scenario serves request 1 after the queue
    p50, p90, p100 = scenario_quantiles(values, (0.5, 0.9, 1.0))
    assert p50.tolist() == [5.0, 50.0] and p90.tolist() == [9.0, 90.0]
    assert p100.tolist() == [10.0, np.inf]


def test_placement_goes_where_the_first_token_comes_first() -> None:
    # a wide GPU whose full batch decodes slowly, and a narrow one whose two slots are
    # busy for 10-20 s: the request's first token comes far sooner on the wide one,
    # although there it would finish later (2,000 tokens in a full batch: ~200 s)
    wide = make_perf(gpu="wide", max_num_seqs=256, decode_s_per_seq=1e-3)
    narrow = make_perf(gpu="narrow", max_num_seqs=2)
    busy = tuple(
        RunningRequest(r, 0.0, 0.1, 0)
        for r in make_requests(2, output_tokens=2000, gap_s=0.0, prefix="run-")
    )
    insts = (
        InstanceState("narrow-0", "narrow", "m1", True, 0.0, running=busy),
        InstanceState("wide-0", "wide", "m1", True, 0.0),
    )
    perf = {("m1", "narrow"): narrow, ("m1", "wide"): wide}
    new = make_requests(1, output_tokens=2000, start_s=1.0, prefix="new-")
    snap = QueueSnapshot(1.0, tuple(new), insts, SLO_CLASSES, perf)
    lengths = LengthModel()
    for _ in range(50):  # long outputs are no surprise
        lengths.observe("m1", "interactive", 2000)
    plan = make_policy("heuristic", lengths=lengths).plan(snap, np.random.default_rng(0))
    placed = {p.instance_id: [g.request_ids for g in p.groups] for p in plan.instances}
    assert placed == {"narrow-0": [], "wide-0": [("new-0",)]}


def test_lost_groups_gather_while_some_can_make_it_soon_and_spread_when_none_can() -> None:
    # four equal instances at t=100; requests that arrived at 0 (TTFT 20 s) are lost
    # anywhere, and the core serves them after each instance's queue; one instance alone
    # would take about 50 s to serve them all (fluid)
    insts = tuple(InstanceState(f"i{k}", "G", "m1", True, 100.0) for k in range(4))
    perf = {("m1", "G"): make_perf(step_base_s=1.0)}
    lost = make_requests(64, gap_s=0.0, prefix="lost-")
    fresh = make_requests(4, start_s=100.0, gap_s=0.0, prefix="new-")
    policy = make_policy("heuristic", max_group_size=4)

    def groups_per_instance(waiting: list[Request], recent: tuple[Request, ...] = ()) -> list[int]:
        arrivals = RecentArrivals(60.0, recent)
        snap = QueueSnapshot(100.0, tuple(waiting), insts, SLO_CLASSES, perf, arrivals)
        plan = policy.plan(snap, np.random.default_rng(0))
        return sorted(
            sum(g.request_ids[0].startswith("lost-") for g in p.groups) for p in plan.instances
        )

    assert groups_per_instance([*lost, *fresh]) == [0, 0, 0, 16]  # the others stay free
    assert groups_per_instance(lost, tuple(fresh)) == [0, 0, 0, 16]  # more may come
    assert groups_per_instance(lost) == [4, 4, 4, 4]  # nothing to save: drain everywhere
    # nor when what can still make it is due after one instance would have done it all
    later = make_requests(4, start_s=100.0, gap_s=0.0, prefix="batch-", slo_class="batch")
    assert groups_per_instance([*lost, *later]) == [4, 4, 4, 4]


def test_lost_groups_spread_without_swapping_models() -> None:
    # two instances per model; lost requests of m1 only: they stay on the m1 instances
    insts = tuple(InstanceState(f"i{k}", "G", ("m1", "m2")[k % 2], True, 100.0) for k in range(4))
    perf = {(m, "G"): make_perf(m) for m in ("m1", "m2")}
    lost = make_requests(64, gap_s=0.0, prefix="lost-")
    snap = QueueSnapshot(100.0, tuple(lost), insts, SLO_CLASSES, perf)
    plan = make_policy("heuristic", max_group_size=4).plan(snap, np.random.default_rng(0))
    assert {p.instance_id: len(p.groups) for p in plan.instances} == {
        "i0": 8, "i1": 0, "i2": 8, "i3": 0,
    }  # fmt: skip


def test_a_busy_instance_changes_model_only_where_the_holder_would_miss() -> None:
    """i0 holds m1 with 256 requests in flight (64 decoding); i1 holds m2 and runs one.
    After draining it and a swap of 20 ms, i1 would start an m1 request first; but the
    drain costs i1's batch what attainment does not see, so a request i0 serves in time
    stays there, and one i0 would serve too late goes to i1. An idle i1 drains nothing:
    the earliest first token decides."""
    i0 = tuple(
        RunningRequest(r, 0.0, 0.1 if k < 64 else None, 1 if k < 64 else 0)
        for k, r in enumerate(make_requests(256, prefix="run"))
    )
    i1 = (
        RunningRequest(make_requests(1, model="m2", prefix="b", output_tokens=400)[0], 0, 0.1, 300),
    )
    cheap_swaps = {(m, "G"): make_perf(m, cold_start_s=0.01, stop_s=0.01) for m in MODELS}

    def placed(arrival_s: float, on_i1: tuple[RunningRequest, ...]) -> str:
        req = make_requests(1, start_s=arrival_s, prefix="new")  # 20 s to its first token
        snap = replace(snapshot(req, now_s=30.0, running=(i0, on_i1)), perf=cheap_swaps)
        plan = make_policy("heuristic").plan(snap, np.random.default_rng(0))
        return next(p.instance_id for p in plan.instances if p.groups)

    assert placed(30.0, i1) == "i0"  # due at 50 s: i0 is in time
    assert placed(14.0, i1) == "i1"  # due at 34 s: only i1, drained and swapped, is
    assert placed(30.0, ()) == "i1"  # idle, i1 is the earliest


def test_attainable_leaves_out_the_requests_late_even_if_served_first() -> None:
    # at t=100, requests that arrived at 0 (TTFT 20 s) miss in any plan; those that
    # arrived at 100 need not; every plan scores at most what is attainable
    insts = tuple(InstanceState(f"i{k}", "G", "m1", True, 100.0) for k in range(2))
    perf = {("m1", "G"): make_perf()}
    waiting = (*make_requests(6, gap_s=0.0, prefix="lost-"), *make_requests(2, start_s=100.0))
    snap = QueueSnapshot(100.0, waiting, insts, SLO_CLASSES, perf)
    for name in ("edf", "heuristic"):
        plan = make_policy(name).plan(snap, np.random.default_rng(0))
        assert plan.attainable == pytest.approx(2 / 8)
        assert plan.predicted_attainment <= plan.attainable + 1e-9
