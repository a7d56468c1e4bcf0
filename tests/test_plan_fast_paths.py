"""Fast paths of the planner and the serving core give exactly what the general
computation gives (same floats)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qlmctl.plan import heuristics as H
from qlmctl.plan.estimator import Ahead, LengthModel
from qlmctl.plan.heuristics import _Placement
from qlmctl.plan.policies import make_policy, prepare
from qlmctl.plan.simulate import first_tokens
from qlmctl.plan.slots import EngineState, started_engines
from qlmctl.plan.types import InstanceState, QueueSnapshot, RecentArrivals, RunningRequest
from qlmctl.serve.calibration import _STEP_COEFFICIENTS, scaled
from qlmctl.serve.recent import RecentWindow
from tests.helpers import SLO_CLASSES, make_perf, make_requests


def sorted_serve(
    engine: EngineState, decode: np.ndarray, prefill: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`EngineState.serve` for one round (n <= B), sorting whole rows: the general
    computation its fast path must match."""
    n = decode.shape[1]
    ready = engine.slots[:, :n]
    total = np.cumsum(prefill, axis=-1)
    start = np.maximum.accumulate(ready - (total - prefill), axis=1)
    end = total + np.maximum(engine.pipeline_s[:, None], start)
    slots = engine.slots.copy()
    slots[:, :n] = end + decode
    slots.sort(axis=1)
    return slots, end[:, -1]


@pytest.mark.parametrize("busy", [0, 3, 8])
@pytest.mark.parametrize("n", [1, 4, 8])
def test_serve_sorts_rows_as_a_full_sort_does(busy: int, n: int) -> None:
    """Slots taken that free after every other slot skip the full sort; others do not."""
    rng = np.random.default_rng(busy * 10 + n)
    engine = EngineState.idle(5.0, 8, 6)
    engine.slots[:, 8 - busy :] = 5.0 + rng.uniform(0, 30, (6, busy))  # still running
    engine.slots.sort(axis=1)
    decode, prefill = rng.uniform(0, 20, (6, n)), rng.uniform(0, 1, n)
    want_slots, want_pipeline = sorted_serve(engine, decode, prefill)
    engine.serve(decode, prefill)
    assert np.array_equal(engine.slots, want_slots)
    assert np.array_equal(engine.pipeline_s, want_pipeline)


def test_started_engines_equal_idle_engines_serving_their_running_requests() -> None:
    """Instances with no running request, a few, more than their slots, another batch
    size, no slots (0): each engine is what an idle engine serving its requests gives."""
    rng = np.random.default_rng(7)
    ready = np.array([1.0, 2.5, 2.5, 4.0, 0.5, 3.0, 1.5, 2.0, 2.0])
    batch = [4, 4, 4, 2, 0, 4, 8, 8, 3]
    # none on 0 and 2; all slots taken on 5; one left on 8, several on 6 and 7
    running = np.array([1, 1, 1, 3, 3, 3, 4, 5, 5, 5, 5, 6, 7, 7, 7, 8, 8])
    decode = rng.uniform(0, 50, (len(running), 5))
    prefill = np.where(rng.random(len(running)) < 0.5, 0.0, rng.uniform(0, 2, len(running)))
    got = started_engines(ready, batch, running, decode, prefill)
    for i, engine in enumerate(got):
        want = EngineState.idle(float(ready[i]), batch[i], 5)
        mine = np.flatnonzero(running == i)
        if mine.size > want.slots.shape[1]:  # more than one round: the general path
            want.serve(decode[mine].T, prefill[mine])
        elif mine.size:
            want.slots, want.pipeline_s = sorted_serve(want, decode[mine].T, prefill[mine])
        assert np.array_equal(engine.slots, want.slots), i
        assert np.array_equal(engine.pipeline_s, want.pipeline_s), i
        mean, want_mean = engine.mean(), want.mean()  # computed with the others', or alone
        assert np.array_equal(mean.slots, want_mean.slots), i
        assert np.array_equal(mean.pipeline_s, want_mean.pipeline_s), i
    got[1].serve(decode[:1].T, prefill[:1])  # a changed engine: its own mean again
    assert np.array_equal(
        got[1].mean().slots, EngineState(got[1].slots, got[1].pipeline_s).mean().slots
    )


def test_placement_shares_the_mean_engines_until_it_changes_them() -> None:
    """Two models, an instance that may serve only one, running requests, groups larger
    than the batch, swaps, removals: the mean scenario's engines never change, and the
    work queued is each engine's own sum."""
    perf = {(m, "G"): make_perf(m, max_num_seqs=2) for m in ("m1", "m2")}
    running = tuple(
        RunningRequest(r, 0.0, 0.5, 3) for r in make_requests(3, gap_s=0.0, prefix="run-")
    )
    insts = (
        InstanceState("i0", "G", "m1", True, 2.0, running=running),
        InstanceState("i1", "G", "m2", True, 2.0, servable_models=frozenset({"m2"})),
        InstanceState("i2", "G", None, True, 5.0),
    )
    waiting = sorted(
        make_requests(9, gap_s=0.2, prefix="a-")
        + make_requests(7, model="m2", slo_class="batch", gap_s=0.3, prefix="b-"),
        key=lambda r: (r.arrival_s, r.id),
    )
    snap = QueueSnapshot(2.0, tuple(waiting), insts, SLO_CLASSES, perf)
    ctx = prepare(snap, LengthModel(), np.random.default_rng(3), max_group_size=3)
    before = [e.copy() for e in ctx.mean.engines]
    for checkpoints in (False, True):
        place = _Placement(ctx.problem, ctx.mean, checkpoints=checkpoints)
        for k, g in enumerate(H.edf_order(ctx.problem)):
            place.add(g, 2 if k % 3 == 2 else place.best(g))  # i2 swaps now and then
        place.remove(place.queues[2][0], 2)
        sums = [float(e.slots.sum() + e.pipeline_s.sum()) for e in place.engines]
        assert place.queued == sums
    for a, b in zip(ctx.mean.engines, before, strict=True):
        assert np.array_equal(a.slots, b.slots) and np.array_equal(a.pipeline_s, b.pipeline_s)


@pytest.mark.parametrize("overload", [False, True])
def test_a_walk_that_sheds_nothing_gives_greedy_placements(overload: bool) -> None:
    """The EDF candidate reuses the shedding walk's queues only when it shed nothing;
    they are then what placing EDF greedily gives."""
    perf = {("m1", "G"): make_perf("m1", max_num_seqs=4)}
    insts = tuple(InstanceState(f"i{k}", "G", "m1", True, 30.0) for k in range(3))
    waiting = make_requests(12, gap_s=0.5, start_s=25.0, prefix="new-")
    if overload:  # a backlog whose deadlines have passed: it is shed
        waiting = make_requests(60, gap_s=0.01, output_tokens=3000, prefix="old-") + waiting
    snap = QueueSnapshot(30.0, tuple(waiting), insts, SLO_CLASSES, perf)
    ctx = prepare(snap, LengthModel(), np.random.default_rng(0), max_group_size=3)
    edf = H.edf_order(ctx.problem)
    shed, queues = H.shed_order_and_queues(ctx.problem, ctx.mean, edf)
    assert shed == H.shed_order(ctx.problem, ctx.mean, edf)
    if overload:
        assert shed != edf and queues is None
    else:
        assert shed == edf and queues == H.greedy_place(ctx.problem, ctx.mean, edf)
        assert sum(len(q) > 0 for q in queues) > 1  # spread over several instances


def test_a_fixed_assignment_is_kept_and_the_walk_sheds_on_it() -> None:
    """The program's assignment shed by the slot model (``qlm``'s ``milp-shed``): every
    group stays where it was put, and crowding one instance sheds what a free walk over
    three does not need to."""
    perf = {("m1", "G"): make_perf("m1", max_num_seqs=4)}
    insts = tuple(InstanceState(f"i{k}", "G", "m1", True, 30.0) for k in range(3))
    # about 3 s of prefill each: 36 s on one instance, 12 s over three (TTFT 20 s)
    waiting = make_requests(12, gap_s=0.1, start_s=28.0, prompt_tokens=30_000)
    snap = QueueSnapshot(30.0, tuple(waiting), insts, SLO_CLASSES, perf)
    ctx = prepare(snap, LengthModel(), np.random.default_rng(0), max_group_size=3)
    pb, edf = ctx.problem, H.edf_order(ctx.problem)
    assert H.shed_order_and_queues(pb, ctx.mean, edf)[0] == edf
    fixed = dict.fromkeys(range(pb.num_groups), 0)
    shed, queues = H.shed_order_and_queues(pb, ctx.mean, edf, fixed)
    assert shed != edf and queues is None
    placed = H.greedy_place(pb, ctx.mean, shed, fixed)
    assert placed == (tuple(shed), (), ())


def test_first_tokens_with_nothing_going_ahead_are_the_unstretched_ones() -> None:
    """With no urgent load the stretch is 0: the fast return equals the full formula."""
    perf = {("m1", "G"): make_perf("m1", max_num_seqs=4)}
    insts = (InstanceState("i0", "G", "m1", True, 1.0),)
    snap = QueueSnapshot(1.0, tuple(make_requests(6, gap_s=0.1)), insts, SLO_CLASSES, perf)
    ctx = prepare(snap, LengthModel(), np.random.default_rng(1), max_group_size=6)
    pb, scen = ctx.problem, ctx.scen
    decode = np.repeat(scen.decode_s[0, 0][:, None], 6, axis=1)
    urgent = np.zeros(scen.count)
    got = first_tokens(pb, scen.engines[0].copy(), 0, 0, decode, Ahead(urgent, scen.horizon_s))
    starts, prefilled, free = scen.engines[0].copy().serve(decode, pb.req_prefill_s[:6, 0], 0.0)
    tokens = np.maximum(prefilled + pb.overhead_s[0, 0], starts + pb.req_ttft_s[:6, 0])
    delay = np.maximum(free - pb.now_s, 0.0) * (urgent / (1.0 - urgent))[:, None]
    want = (starts + delay, prefilled + delay, tokens + delay, free + delay)
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)


def random_engine(rng: np.random.Generator, scenarios: int, batch: int) -> EngineState:
    return EngineState(
        np.sort(rng.random((scenarios, batch)) * 10, axis=1), rng.random(scenarios) * 10
    )


@pytest.mark.parametrize("n", [1, 4, 7])
def test_pass_through_is_serving_requests_that_take_no_time(n: int) -> None:
    """Zero-length requests, one round (n <= B) or more: the same starts and engine as
    :meth:`EngineState.serve` gives, and the pipeline as it was."""
    rng = np.random.default_rng(n)
    for release in (-np.inf, 5.0):
        engine = random_engine(rng, 3, 4)
        general, pipeline = engine.copy(), engine.pipeline_s.copy()
        zeros = np.zeros((3, n))
        starts, prefilled, _ = general.serve(zeros, zeros, release)
        got = engine.pass_through(n, release)
        assert np.array_equal(got, starts) and np.array_equal(got, prefilled)
        assert np.array_equal(engine.slots, general.slots)
        assert np.array_equal(engine.pipeline_s, pipeline)


def serve_kept_per_row(
    engine: EngineState, decode: np.ndarray, prefill: np.ndarray, release: float, skip: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The general computation: each scenario's kept requests first (in queue order), the
    skipped ones behind at no cost, rows reordered one by one; the pipeline then free
    once the last kept prompt is in."""
    order = np.argsort(skip, axis=1, kind="stable")
    kept = ~np.take_along_axis(skip, order, axis=1)
    pipeline = engine.pipeline_s.copy()
    full = np.broadcast_to(prefill, decode.shape)
    starts, prefilled, _ = engine.serve(
        np.take_along_axis(decode, order, axis=1) * kept,
        np.take_along_axis(full, order, axis=1) * kept,
        release,
    )
    engine.pipeline_s[:] = np.maximum(pipeline, np.where(kept, prefilled, -np.inf).max(axis=1))
    back = np.argsort(order, axis=1)
    return np.take_along_axis(starts, back, axis=1), np.take_along_axis(prefilled, back, axis=1)


@pytest.mark.parametrize("skipped", ["all", "same columns", "per scenario"])
def test_a_group_without_its_deferred_requests_is_served_as_row_by_row(skipped: str) -> None:
    """The deferred requests of a group skipped in every scenario, or the same ones in
    every scenario: the same floats as reordering each scenario's row on its own."""
    perf = {("m1", "G"): make_perf("m1", max_num_seqs=8)}
    insts = (InstanceState("i0", "G", "m1", True, 1.0),)
    snap = QueueSnapshot(1.0, tuple(make_requests(6, gap_s=0.1)), insts, SLO_CLASSES, perf)
    ctx = prepare(snap, LengthModel(), np.random.default_rng(1), max_group_size=6)
    pb, scen = ctx.problem, ctx.scen
    rng = np.random.default_rng(3)
    decode = rng.random((scen.count, 6))
    skip = {
        "all": np.ones((scen.count, 6), bool),
        "same columns": np.repeat(rng.random((1, 6)) < 0.5, scen.count, axis=0),
        "per scenario": rng.random((scen.count, 6)) < 0.5,
    }[skipped]
    engine = random_engine(rng, scen.count, 8)
    general = engine.copy()
    want = serve_kept_per_row(general, decode, pb.req_prefill_s[:6, 0], pb.release_s[0], skip)
    got = engine.serve_kept(decode, pb.req_prefill_s[:6, 0], skip, pb.release_s[0])
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(engine.slots, general.slots)
    assert np.array_equal(engine.pipeline_s, general.pipeline_s)


def test_scaled_profile_is_the_profile_with_its_step_times_multiplied() -> None:
    """The calibration's field-by-field copy equals a validated replace."""
    perf = make_perf("m1", sleep_s=2.0, wake_s=1.0)
    step = {name: getattr(perf, name) * 1.25 for name in _STEP_COEFFICIENTS}
    assert scaled(perf, 1.25) == dataclasses.replace(perf, **step)


def test_recent_window_keeps_what_a_summary_of_its_requests_gives() -> None:
    """Streams kept as requests come and go (buffers grown and compacted on the way) are
    the summaries of the window's requests, and plan alike."""
    arrivals = sorted(
        make_requests(150, gap_s=0.4, prefix="a-")
        + make_requests(90, model="m2", slo_class="batch", gap_s=0.7, output_tokens=80),
        key=lambda r: (r.arrival_s, r.id),
    )
    arrivals = [  # lengths that differ, so that their order counts
        r.model_copy(update={"max_output_tokens": 40 + 7 * k % 90, "output_tokens": 1 + 5 * k % 40})
        for k, r in enumerate(arrivals)
    ]
    window = RecentWindow(20.0)
    perf = {(m, "G"): make_perf(m) for m in ("m1", "m2")}
    insts = tuple(InstanceState(f"i{k}", "G", m, True, 0.0) for k, m in enumerate(("m1", "m2")))
    for k, request in enumerate(arrivals):
        window.add(request)
        if k % 37 != 36:
            continue
        now = request.arrival_s
        kept = window.arrivals(now, 20.0)
        assert kept.requests == tuple(r for r in arrivals[: k + 1] if r.arrival_s >= now - 20.0)
        summary = RecentArrivals(20.0, kept.requests).by_stream()
        assert kept.streams is not None and kept.streams.keys() == summary.keys()
        for key, stream in kept.streams.items():
            want = summary[key]
            assert (stream.count, stream.prompt_tokens) == (want.count, want.prompt_tokens)
            assert np.array_equal(stream.max_output_tokens, want.max_output_tokens)
            assert np.array_equal(stream.target_output_tokens, want.target_output_tokens)
        waiting = tuple(arrivals[k - 5 : k + 1])
        plans = [
            make_policy("heuristic").plan(
                QueueSnapshot(now, waiting, insts, SLO_CLASSES, perf, recent),
                np.random.default_rng(k),
            )
            for recent in (kept, RecentArrivals(20.0, kept.requests))
        ]
        assert plans[0].instances == plans[1].instances


def test_deferred_requests_are_served_in_their_order_once_work_due_later_comes() -> None:
    """What :meth:`EngineState.serve_deferred` serves is what serving those requests in
    the order they were deferred gives; the rest stay deferred until theirs comes."""
    rng = np.random.default_rng(5)
    engine = random_engine(rng, 6, 4)
    decode, prefill = rng.random((6, 5)), rng.random((6, 5))
    due = np.full((6, 5), np.inf)
    due[:, :3] = [10.0, 30.0, 20.0]  # the last two were not deferred
    engine.defer(decode[:, :2], prefill[:, :2], due[:, :2])
    engine.defer(decode[:, 2:], prefill[:, 2:], due[:, 2:])
    want = engine.copy()
    engine.serve_deferred(10.0)  # due by 10: none comes first
    assert np.array_equal(engine.slots, want.slots) and engine.deferred_due_s == 10.0
    engine.serve_deferred(25.0)  # the first and the third
    want.serve(decode[:, [0, 2]], prefill[:, [0, 2]])
    assert np.array_equal(engine.slots, want.slots)
    assert np.array_equal(engine.pipeline_s, want.pipeline_s)
    assert engine.deferred_due_s == 30.0
    engine.drain(1.0, 4)  # another model: what is left is not timed
    assert engine.deferred == () and engine.deferred_due_s == np.inf
