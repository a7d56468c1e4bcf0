"""The serving core driven directly: facts in, actions out, no engine and no clock."""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from qlmctl.domain import Request
from qlmctl.engine.events import (
    Aborted,
    Action,
    Dispatch,
    Evict,
    Finished,
    FirstToken,
    InstanceDown,
    InstanceReady,
    LoadModel,
)
from qlmctl.plan.types import (
    InstancePlan,
    Plan,
    PlannedGroup,
    QueueSnapshot,
    RunningRequest,
    ServingStyle,
)
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.core import ServeCore
from qlmctl.serve.operations import _defer
from qlmctl.serve.state import IllegalTransition, InstStatus, QueuedGroup, ReqState, Tracked
from tests.helpers import SLO_CLASSES, make_cluster, make_perf, make_requests


class TinyPolicy:
    """Consecutive same (model, class) requests form a group; placed by ``route``.

    ``by_priority`` orders by class priority first (urgent work ahead of batch work).
    ``route`` maps a model to an instance; default: the first instance serving it.
    ``wait_s``: every group is predicted to start that long after the plan (a miss if
    that passes its deadline), which is what the core's eviction acts on.
    """

    name = "tiny"
    serving = ServingStyle()
    lengths = None  # plan with each request's max_tokens

    def __init__(
        self, by_priority: bool = False, route: dict[str, str] | None = None, wait_s: float = 0.0
    ) -> None:
        self.by_priority = by_priority
        self.route = route or {}
        self.wait_s = wait_s
        self.calls = 0

    def plan(self, snapshot: QueueSnapshot, rng: np.random.Generator) -> Plan:
        self.calls += 1
        reqs = list(snapshot.waiting)
        if self.by_priority:
            reqs.sort(key=lambda r: snapshot.slo_classes[r.slo_class].priority)
        queues: dict[str, list[PlannedGroup]] = {i.instance_id: [] for i in snapshot.instances}
        for r in reqs:
            iid = self.route.get(r.model) or next(
                i.instance_id for i in snapshot.instances if i.model == r.model and i.up
            )
            groups = queues[iid]
            if groups and (groups[-1].model, groups[-1].slo_class) == (r.model, r.slo_class):
                g = groups[-1]
                groups[-1] = PlannedGroup(
                    g.group_id,
                    g.model,
                    g.slo_class,
                    (*g.request_ids, r.id),
                    g.deadline_s,
                    g.predicted_start_s,
                    g.predicted_finish_s,
                    g.miss_probability,
                    g.priority,
                )
            else:
                groups.append(
                    PlannedGroup(
                        f"g{len(groups)}",
                        r.model,
                        r.slo_class,
                        (r.id,),
                        snapshot.deadline_s(r),
                        snapshot.now_s + self.wait_s,
                        snapshot.now_s + self.wait_s,
                        float(snapshot.now_s + self.wait_s > snapshot.deadline_s(r)),
                        snapshot.slo_classes[r.slo_class].priority,
                    )
                )
        return Plan(
            "tiny",
            snapshot.now_s,
            tuple(InstancePlan(k, tuple(v)) for k, v in queues.items()),
            1.0,
            {},
        )


AT_ONCE = CoreConfig(replan_min_interval_s=0, arrival_replan_share=0)  # every re-plan at once


def make_core(
    num_instances: int = 1,
    policy: Any = None,
    models: tuple[str, ...] = ("m1", "m2"),
    perf_fields: dict[str, Any] | None = None,
    **overrides: Any,
) -> ServeCore:
    cluster = make_cluster(num_instances, models)
    perf = {(m, "G"): make_perf(m, **(perf_fields or {})) for m in models}
    config = replace(AT_ONCE, **overrides)
    return ServeCore(
        cluster, SLO_CLASSES, perf, policy or TinyPolicy(), config, np.random.default_rng(0)
    )


def arrive(core: ServeCore, reqs: list[Request], now_s: float = 0.0) -> list[Action]:
    for r in reqs:
        core.on_arrival(r, now_s)
    return core.decide(now_s)


def dispatched(actions: list[Action]) -> list[str]:
    return [a.request_id for a in actions if isinstance(a, Dispatch)]


def finish(core: ServeCore, rid: str, iid: str, t: float, tokens: int = 50) -> list[Action]:
    core.on_event(FirstToken(rid, iid, t), t)
    core.on_event(Finished(rid, iid, t, tokens), t)
    return core.decide(t)


def test_while_nothing_waits_an_arrival_goes_at_once_to_an_engine_that_starts_it() -> None:
    policy = TinyPolicy()  # would put every m1 request on i0
    core = make_core(2, models=("m1",), policy=policy)
    actions = arrive(core, make_requests(1))
    assert actions == [Dispatch("r0", "i0", 0)] and policy.calls == 0  # no re-plan
    assert core.next_wakeup_s() is None
    # i0 is still prefilling r0: the next arrival goes where it starts at once
    core.on_arrival(make_requests(1, prefix="x", start_s=0.1)[0], 0.1)
    assert core.decide(0.1) == [Dispatch("x0", "i1", 0)] and policy.calls == 0
    finish(core, "r0", "i0", 1.0)
    finish(core, "x0", "i1", 1.0)
    rows = core.take_log()[0]
    assert [(r["predicted_start_s"], r["predicted_miss_prob"]) for r in rows] == [
        (0.0, 0.0),
        (0.1, 0.0),
    ]
    # its first token and finish from the engine's state, with no spread to bound
    for r in rows:
        assert r["predicted_start_s"] < r["predicted_first_token_s"] < r["predicted_finish_s"]
        assert r["predicted_first_token_p90_s"] is None and r["predicted_finish_p90_s"] is None


@pytest.mark.parametrize(("prompt_tokens", "at_once"), [(1000, True), (1949, False)])
def test_an_arrival_goes_at_once_where_its_prompt_fits_in_the_next_step(
    prompt_tokens: int, at_once: bool
) -> None:
    """Beside a prompt still prefilling (100 tokens) and no decodes, the next step's
    2,048 tokens take a second prompt of up to 1,948 at once; a longer one is planned
    (and pulled, as the engine has a free sequence)."""
    policy = TinyPolicy()
    core = make_core(1, models=("m1",), policy=policy)
    arrive(core, make_requests(1))
    second = make_requests(1, prefix="x", start_s=0.1, prompt_tokens=prompt_tokens)
    assert dispatched(arrive(core, second, now_s=0.1)) == ["x0"]
    assert policy.calls == (0 if at_once else 1)


def test_an_arrival_that_could_not_start_goes_once_it_can_without_waiting_for_a_replan() -> None:
    policy = TinyPolicy()
    core = make_core(
        1, models=("m1",), policy=policy, replan_min_interval_s=10.0, max_engine_waiting=1
    )
    core.on_backpressure("i0", waiting=0, kv_usage=0.1)
    assert dispatched(arrive(core, make_requests(1))) == ["r0"]
    # the engine's queue is full (r0 not started): x0 is planned (the first re-plan) ...
    assert dispatched(arrive(core, make_requests(1, prefix="x", start_s=0.1), 0.1)) == []
    core.on_event(FirstToken("r0", "i0", 0.2), 0.2)
    assert dispatched(core.decide(0.2)) == ["x0"] and policy.calls == 1
    # ... y0 cannot start either, and the next re-plan is 10 s away: it goes once it can
    assert dispatched(arrive(core, make_requests(1, prefix="y", start_s=0.3), 0.3)) == []
    core.on_event(FirstToken("x0", "i0", 0.4), 0.4)
    assert dispatched(core.decide(0.4)) == ["y0"] and policy.calls == 1


def test_a_burst_or_a_backlog_is_planned() -> None:
    policy = TinyPolicy()
    core = make_core(2, models=("m1",), policy=policy, max_inflight=2)
    # a burst: one request starts on each idle instance, the rest wait for the plan (two
    # of these prompts do not fit in one step's 2,048 tokens)
    actions = arrive(core, make_requests(4, gap_s=0.0, prompt_tokens=1500))
    assert dispatched(actions) == ["r0", "r1", "r2"] and policy.calls == 1
    assert core.stats().queued_by_instance == {"i0": 1, "i1": 0}
    # a backlog: a new request is planned with it, even where an engine has room
    core.on_event(FirstToken("r1", "i1", 0.5), 0.5)
    core.on_arrival(make_requests(1, prefix="x", start_s=0.6)[0], 0.6)
    assert dispatched(core.decide(0.6)) == [] and policy.calls == 2  # planned behind r3


def test_pulling_respects_inflight_limit_and_engine_backpressure() -> None:
    core = make_core(max_inflight=3, max_engine_waiting=2)
    actions = arrive(core, make_requests(10))
    assert dispatched(actions) == ["r0", "r1", "r2"]
    assert core.stats().queued_by_instance == {"i0": 7}
    assert dispatched(finish(core, "r0", "i0", 1.0)) == ["r3"]
    core.on_backpressure("i0", waiting=5, kv_usage=0.1)
    assert dispatched(finish(core, "r1", "i0", 2.0)) == []
    core.on_backpressure("i0", waiting=0, kv_usage=0.99)
    assert core.decide(2.5) == []
    core.on_backpressure("i0", waiting=0, kv_usage=0.5)
    assert dispatched(core.decide(3.0)) == ["r4"]


@pytest.mark.parametrize(("overhead_s", "wait_s"), [(0.0, 100.0), (0.01, 100.0), (0.01, 0.0)])
def test_a_full_engine_keeps_one_more_waiting_where_requests_have_a_latency(
    overhead_s: float, wait_s: float
) -> None:
    """Where the profile has a per-request latency, a full instance is sent one request
    more, to wait in the engine; a head of a more urgent class takes its place where the
    plan has it late (``wait_s``: every group's predicted wait)."""
    perf_fields = {"max_num_seqs": 2, "ttft_overhead_s": overhead_s}
    core = make_core(policy=TinyPolicy(by_priority=True, wait_s=wait_s), perf_fields=perf_fields)
    batch = make_requests(5, slo_class="batch", gap_s=0.0, output_tokens=500, prefix="b")
    sent = dispatched(arrive(core, batch))
    assert sent == (["b0", "b1", "b2"] if overhead_s else ["b0", "b1"])
    for rid in ("b0", "b1"):
        core.on_event(FirstToken(rid, "i0", 0.1), 0.1)
    urgent = make_requests(1, slo_class="interactive", start_s=1.0, output_tokens=10, prefix="u")
    actions = arrive(core, urgent, now_s=1.0)
    if overhead_s and wait_s:
        assert [a for a in actions if isinstance(a, Evict)] == [
            Evict("b2", "i0", "gave its place to u0 (interactive)")
        ]
        assert dispatched(actions) == ["u0"]
        core.on_event(Aborted("b2", "i0", 1.0, 0, "evicted"), 1.0)
        assert core.state_of("b2") is ReqState.WAITING
    else:  # no place given up (without a latency the usual eviction may still act)
        assert dispatched(actions) == []
        assert not [a for a in actions if isinstance(a, Evict) and "place" in a.reason]


def test_fifo_within_a_group_and_priority_from_the_plan() -> None:
    core = make_core(max_inflight=100)
    reqs = make_requests(5, slo_class="batch", gap_s=0.0)
    actions = arrive(core, reqs)
    assert dispatched(actions) == [r.id for r in reqs]
    assert {a.priority for a in actions if isinstance(a, Dispatch)} == {10}


def test_replans_are_rate_limited() -> None:
    policy = TinyPolicy()
    core = make_core(
        policy=policy, replan_min_interval_s=1.0, max_inflight=1, dispatch_on_arrival=False
    )
    arrive(core, make_requests(1))
    core.on_arrival(make_requests(1, prefix="x", start_s=0.2)[0], 0.2)
    core.decide(0.2)
    assert policy.calls == 1
    assert core.next_wakeup_s() == 1.0
    core.decide(1.0)
    assert policy.calls == 2


@pytest.mark.parametrize(
    ("predicted", "attainable"), [(0.0, 0.0), (0.0, 0.5), (0.6, 1.0), (0.6, 0.6), (1.0, 1.0)]
)
def test_the_improver_is_offered_only_a_plan_it_could_beat(
    predicted: float, attainable: float
) -> None:
    class TinyImprover(TinyPolicy):
        time_limit_s = 1.0
        answer_delay_s = None

        def quick(self, snapshot: QueueSnapshot, rng: np.random.Generator) -> Plan:
            plan = self.plan(snapshot, rng)
            return replace(plan, predicted_attainment=predicted, attainable=attainable)

        def improve(self, snapshot: QueueSnapshot, budget_s: float, rng: Any) -> Plan | None:
            return None

    core = make_core(policy=TinyImprover(), max_inflight=1, dispatch_on_arrival=False)
    arrive(core, make_requests(3))
    # all met, or every miss lost in any plan: none can score strictly higher, so none
    # is asked for
    assert (core.wants_improvement() is not None) == (predicted < attainable)


def test_arrivals_alone_are_planned_every_share_of_the_tightest_target() -> None:
    policy = TinyPolicy()  # SLO_CLASSES: 20 s and 600 s; a tenth of 20 s is 2 s
    core = make_core(
        policy=policy,
        replan_min_interval_s=0.5,
        arrival_replan_share=0.1,
        max_inflight=1,
        dispatch_on_arrival=False,
    )
    assert dispatched(arrive(core, make_requests(2))) == ["r0"] and policy.calls == 1
    core.on_arrival(make_requests(1, prefix="x", start_s=0.6)[0], 0.6)
    core.decide(1.9)
    assert policy.calls == 1
    core.decide(2.0)
    assert policy.calls == 2  # x0 planned beside r1
    core.on_arrival(make_requests(1, prefix="y", start_s=2.1)[0], 2.1)  # due at 4.0
    (second,) = dispatched(finish(core, "r0", "i0", 2.2))
    (third,) = dispatched(finish(core, second, "i0", 2.3))
    assert {second, third} == {"r1", "x0"}
    # the instance's queue ran dry while y0 waits: a re-plan 0.5 s after the last one
    assert dispatched(finish(core, third, "i0", 2.4)) == [] and core.next_wakeup_s() == 2.5
    assert dispatched(core.decide(2.5)) == ["y0"] and policy.calls == 3


def _blocked_by_batch(**overrides: Any) -> tuple[ServeCore, list[Action]]:
    """One instance full of long batch work; an urgent interactive request arrives."""
    policy = TinyPolicy(by_priority=True, wait_s=100.0)
    core = make_core(policy=policy, max_inflight=2, **overrides)
    batch = make_requests(3, slo_class="batch", gap_s=0.0, output_tokens=5000, prefix="b")
    arrive(core, batch)
    urgent = make_requests(1, slo_class="interactive", start_s=1.0, output_tokens=10, prefix="u")
    return core, arrive(core, urgent, now_s=1.0)


def test_urgent_group_blocked_by_batch_work_evicts_the_newest_batch_request() -> None:
    core, actions = _blocked_by_batch()
    assert actions == [Evict("b1", "i0", "evicted for u0 (interactive)")]
    assert core.state_of("b1") is ReqState.EVICTED
    core.on_event(Aborted("b1", "i0", 1.0, 7, "evicted"), 1.0)
    assert core.state_of("b1") is ReqState.WAITING and core.attempt_of("b1") == 1
    assert dispatched(core.decide(1.0)) == ["u0"]
    rows, ops = core.take_log()
    assert [(r["request_id"], r["outcome"], r["output_tokens"]) for r in rows] == [
        ("b1", "evicted", 7)
    ]
    assert [o["kind"] for o in ops if o["kind"] != "replan"] == ["evict"]


def test_eviction_rounds_respect_the_cooldown() -> None:
    core, actions = _blocked_by_batch(evict_cooldown_s=10.0)
    assert [a.request_id for a in actions if isinstance(a, Evict)] == ["b1"]
    core.on_event(Aborted("b1", "i0", 1.0, 7, "evicted"), 1.0)
    core.decide(1.0)  # u0 takes the slot; b0 still runs
    u1 = make_requests(1, slo_class="interactive", start_s=1.5, output_tokens=3000, prefix="v")
    assert arrive(core, u1, now_s=1.5) == []  # u0 ends soon: v0 can wait
    finish(core, "u0", "i0", 2.0)  # v0 (long) now runs beside b0
    u2 = make_requests(1, slo_class="interactive", start_s=3.0, output_tokens=10, prefix="w")
    assert arrive(core, u2, now_s=3.0) == []  # urgent, but within the cool-down
    assert core.decide(10.9) == []
    assert core.decide(11.0) == [Evict("b0", "i0", "evicted for w0 (interactive)")]


@pytest.mark.parametrize("max_evictions", [1, 2])
def test_a_request_is_evicted_at_most_max_evictions_times(max_evictions: int) -> None:
    core = make_core(
        policy=TinyPolicy(by_priority=True, wait_s=100.0),
        max_inflight=1,
        max_evictions=max_evictions,
        evict_cooldown_s=0.0,
    )
    arrive(core, make_requests(1, slo_class="batch", output_tokens=5000, prefix="b"))
    urgent = make_requests(2, slo_class="interactive", start_s=1.0, gap_s=2.0, prefix="u")
    assert arrive(core, urgent[:1], now_s=1.0) == [
        Evict("b0", "i0", "evicted for u0 (interactive)")
    ]
    core.on_event(Aborted("b0", "i0", 1.0, 7, "evicted"), 1.0)
    assert dispatched(core.decide(1.0)) == ["u0"]
    assert dispatched(finish(core, "u0", "i0", 2.0)) == ["b0"]
    actions = arrive(core, urgent[1:], now_s=3.0)
    assert (Evict("b0", "i0", "evicted for u1 (interactive)") in actions) == (max_evictions > 1)


def test_no_eviction_when_the_urgent_request_can_wait() -> None:
    core = make_core(policy=TinyPolicy(by_priority=True), max_inflight=1)
    arrive(core, make_requests(1, slo_class="batch", output_tokens=5, prefix="b"))
    urgent = make_requests(1, slo_class="interactive", start_s=0.1, prefix="u")
    assert arrive(core, urgent, now_s=0.1) == []


def test_swap_waits_for_drain_and_blocks_dispatch_until_ready() -> None:
    core = make_core(policy=TinyPolicy(route={"m1": "i0", "m2": "i0"}), evict_for_swap=False)
    assert dispatched(arrive(core, make_requests(1, model="m1"))) == ["r0"]
    assert arrive(core, make_requests(2, model="m2", prefix="s", start_s=1.0), 1.0) == []
    actions = finish(core, "r0", "i0", 2.0)
    assert actions == [LoadModel("i0", "m2", sleep_current=False)]
    assert core.instance_status("i0") is InstStatus.LOADING
    core.on_event(InstanceDown("i0", 2.0, "swap"), 2.0)
    assert core.decide(10.0) == []
    core.on_event(InstanceReady("i0", 24.0, "m2"), 24.0)
    assert dispatched(core.decide(24.0)) == ["s0", "s1"]
    swaps = [o for o in core.take_log()[1] if o["kind"] == "swap"]
    assert len(swaps) == 1 and swaps[0]["from_model"] == "m1" and swaps[0]["duration_s"] == 22.0


def test_swap_sleeps_the_current_model_where_supported() -> None:
    cluster = make_cluster(1)
    perf = {(m, "G"): make_perf(m, sleep_s=1.0, wake_s=2.0) for m in ("m1", "m2")}
    policy = TinyPolicy(route={"m1": "i0", "m2": "i0"})
    core = ServeCore(cluster, SLO_CLASSES, perf, policy, AT_ONCE)
    actions = arrive(core, make_requests(1, model="m2"))
    assert actions == [LoadModel("i0", "m2", sleep_current=True)]
    core.on_event(InstanceReady("i0", 3.0, "m2"), 3.0)
    assert dispatched(core.decide(3.0)) == ["r0"]
    finish(core, "r0", "i0", 4.0)
    actions = arrive(core, make_requests(1, model="m1", prefix="x", start_s=5.0), 5.0)
    assert actions == [LoadModel("i0", "m1", sleep_current=True)]
    core.on_event(InstanceReady("i0", 7.0, "m1"), 7.0)
    kinds = [o["kind"] for o in core.take_log()[1] if o["kind"] != "replan"]
    assert kinds == ["sleep", "swap", "sleep", "wake"]


def test_instance_failure_requeues_in_flight_work_which_finishes_elsewhere() -> None:
    core = make_core(
        2, models=("m1",), policy=TinyPolicy(), max_inflight=2, dispatch_on_arrival=False
    )
    assert dispatched(arrive(core, make_requests(2))) == ["r0", "r1"]  # both on i0
    core.on_event(InstanceDown("i0", 1.0, "failed"), 1.0)
    core.on_event(Aborted("r0", "i0", 1.0, 0, "connection reset"), 1.0)  # stale: ignored
    actions = core.decide(1.0)
    assert actions == [Dispatch("r0", "i1", 0), Dispatch("r1", "i1", 0)]
    finish(core, "r0", "i1", 2.0)
    finish(core, "r1", "i1", 2.0)
    assert core.done
    rows = core.take_log()[0]
    assert [(r["request_id"], r["attempt"], r["outcome"]) for r in rows] == [
        ("r0", 0, "failed"),
        ("r1", 0, "failed"),
        ("r0", 1, "finished"),
        ("r1", 1, "finished"),
    ]
    assert core.stats().finished == 2


def test_failures_give_up_after_max_attempts_and_unservable_requests_fail() -> None:
    core = make_core(2, models=("m1",), max_attempts=2)
    arrive(core, make_requests(1))
    core.on_event(Aborted("r0", "i0", 1.0, 0, "HTTP 500"), 1.0)
    assert dispatched(core.decide(1.0)) == ["r0"]
    core.on_event(Aborted("r0", "i0", 2.0, 0, "HTTP 500"), 2.0)
    assert core.state_of("r0") is ReqState.FAILED
    core.on_event(InstanceDown("i0", 3.0, "failed"), 3.0)
    core.on_event(InstanceDown("i1", 3.0, "failed"), 3.0)
    arrive(core, make_requests(1, prefix="x", start_s=3.0), 3.0)
    assert core.state_of("x0") is ReqState.FAILED and core.done
    reasons = [r["reason"] for r in core.take_log()[0]]
    assert reasons == [
        "HTTP 500",
        "HTTP 500 (gave up after 2 failed attempts)",
        "no live instance may serve m1",
    ]


def test_rejected_requests_are_not_retried() -> None:
    core = make_core()
    arrive(core, make_requests(1))
    core.on_event(Aborted("r0", "i0", 0.5, 0, "HTTP 400: bad prompt", retryable=False), 0.5)
    assert core.state_of("r0") is ReqState.REJECTED
    assert core.decide(1.0) == [] and core.done
    assert core.stats().rejected == 1


def test_cancel_all_ends_everything_and_aborts_in_flight() -> None:
    core = make_core(max_inflight=1)
    arrive(core, make_requests(3))
    assert core.cancel_all(1.0) == [Evict("r0", "i0", "run stopped")]
    assert core.done and core.stats().cancelled == 3


def test_illegal_transitions_raise_and_leave_state_unchanged() -> None:
    tr = Tracked(make_requests(1)[0], SLO_CLASSES["interactive"], expected_output_tokens=50)
    with pytest.raises(IllegalTransition, match="can't start request 'r0' in state WAITING"):
        tr.move("start")
    assert tr.state is ReqState.WAITING
    tr.move("dispatch")
    tr.move("finish")
    with pytest.raises(IllegalTransition, match=r"can't requeue .* in state FINISHED"):
        tr.move("requeue")
    assert tr.state.is_final


def test_every_request_is_accounted_for_under_random_faults() -> None:
    """A seeded fake engine starts, finishes, fails, rejects and kills instances at random."""
    rng = np.random.default_rng(7)
    policy = TinyPolicy()
    core = make_core(3, models=("m1",), policy=policy, max_inflight=4, max_attempts=3)
    reqs = make_requests(200, gap_s=0.05)
    running: dict[str, str] = {}
    t, k = 0.0, 0
    while not (k == len(reqs) and core.done):
        t += 0.05
        while k < len(reqs) and reqs[k].arrival_s <= t:
            core.on_arrival(reqs[k], t)
            k += 1
        for rid, iid in sorted(running.items()):
            x = rng.random()
            if x < 0.3:
                core.on_event(Finished(rid, iid, t, 5), t)
            elif x < 0.35:
                core.on_event(Aborted(rid, iid, t, 0, "HTTP 500"), t)
            elif x < 0.37:
                core.on_event(Aborted(rid, iid, t, 0, "HTTP 400", retryable=False), t)
            else:
                if x < 0.6:
                    core.on_event(FirstToken(rid, iid, t), t)  # a repeat is stale: ignored
                continue
            del running[rid]
        if rng.random() < 0.02:
            iid = f"i{rng.integers(3)}"
            core.on_event(InstanceDown(iid, t, "failed"), t)
            running = {r: i for r, i in running.items() if i != iid}
            core.on_event(InstanceReady(iid, t, "m1"), t)
        for a in core.decide(t):
            if isinstance(a, Dispatch):
                running[a.request_id] = a.instance_id
        assert t < 1000
    rows = core.take_log()[0]
    final = [r for r in rows if r["outcome"] in ("finished", "rejected", "cancelled")]
    final += [r for r in rows if r["outcome"] == "failed" and "gave up" in (r["reason"] or "")]
    assert sorted(r["request_id"] for r in final) == sorted(r.id for r in reqs)
    s = core.stats()
    assert s.finished + s.failed + s.rejected == len(reqs) and s.failed > 0 and s.rejected > 0
    # nothing left counted as prefilling anywhere: each instance in turn takes a new
    # request at once, without a plan
    calls = policy.calls
    for n, iid in enumerate(["i0", "i1", "i2"]):
        core.on_arrival(make_requests(1, prefix=f"late{n}-", start_s=t + n)[0], t + n)
        assert core.decide(t + n) == [Dispatch(f"late{n}-0", iid, 0)]
    assert policy.calls == calls


def test_an_evicted_request_resumes_after_what_it_generated() -> None:
    core, _ = _blocked_by_batch(evict_cooldown_s=0.0)
    core.on_event(Aborted("b1", "i0", 1.0, 7, "evicted"), 1.0)  # 7 tokens in that attempt
    core.decide(1.0)
    snap = core.snapshot(1.0)  # b1 waits: priced by what is left
    left = next(r for r in snap.waiting if r.id == "b1")
    assert (left.prompt_tokens, left.max_output_tokens, left.output_tokens) == (107, 4993, 4993)
    assert Dispatch("b1", "i0", 10, kept_tokens=7) in finish(core, "u0", "i0", 2.0)
    core.on_event(FirstToken("b1", "i0", 2.1), 2.1)
    urgent = make_requests(1, slo_class="interactive", start_s=3.0, output_tokens=10, prefix="v")
    assert Evict("b1", "i0", "evicted for v0 (interactive)") in arrive(core, urgent, 3.0)
    core.on_event(Aborted("b1", "i0", 3.0, 5, "evicted"), 3.0)  # evicted again: 7 + 5 kept
    core.decide(3.0)
    assert Dispatch("b1", "i0", 10, kept_tokens=12) in finish(core, "v0", "i0", 4.0)
    rows = [r for r in core.take_log()[0] if r["request_id"] == "b1"]
    assert [(r["output_tokens"], r["resumed_tokens"], r.get("kept_tokens")) for r in rows] == [
        (7, 0, 7),
        (12, 7, 12),
    ]


def test_a_finished_resumed_request_counts_its_whole_output() -> None:
    core, _ = _blocked_by_batch()
    core.on_event(Aborted("b1", "i0", 1.0, 7, "evicted"), 1.0)
    core.decide(1.0)
    assert Dispatch("b1", "i0", 10, kept_tokens=7) in finish(core, "u0", "i0", 2.0)
    core.on_event(FirstToken("b1", "i0", 2.5), 2.5)
    core.on_event(Finished("b1", "i0", 3.5, 4993), 3.5)  # the engine saw the rest only
    row = [r for r in core.take_log()[0] if r["request_id"] == "b1"][-1]
    assert row["outcome"] == "finished" and row["output_tokens"] == 5000
    assert row["resumed_tokens"] == 7
    assert row["tpot_s"] == pytest.approx(1.0 / 4992)


def test_without_resume_an_evicted_request_starts_again() -> None:
    core, _ = _blocked_by_batch(resume_evicted=False)
    core.on_event(Aborted("b1", "i0", 1.0, 7, "evicted"), 1.0)
    core.decide(1.0)
    assert Dispatch("b1", "i0", 10, kept_tokens=0) in finish(core, "u0", "i0", 2.0)
    rows = core.take_log()[0]
    assert next(r for r in rows if r["request_id"] == "b1")["kept_tokens"] == 0


def test_models_kept_warm_start_asleep_and_a_change_to_one_is_a_wake() -> None:
    base = make_cluster(1)
    spec = base.instances[0].model_copy(update={"warm": ["m1", "m2"]})
    cluster = base.model_copy(update={"instances": [spec]})
    perf = {(m, "G"): make_perf(m, sleep_s=0.01, wake_s=0.02) for m in ("m1", "m2")}
    policy = TinyPolicy(route={"m1": "i0", "m2": "i0"})
    core = ServeCore(cluster, SLO_CLASSES, perf, policy, AT_ONCE)
    assert core.snapshot(0.0).instances[0].sleeping_models == frozenset({"m2"})
    assert arrive(core, make_requests(1, model="m2")) == [LoadModel("i0", "m2", sleep_current=True)]
    core.on_event(InstanceReady("i0", 0.02, "m2"), 0.02)
    kinds = [(o["kind"], o["model"]) for o in core.take_log()[1] if o["kind"] != "replan"]
    assert kinds == [("sleep", "m1"), ("wake", "m2")]


def test_an_instance_that_keeps_nothing_warm_restarts_even_where_sleep_works() -> None:
    base = make_cluster(1)
    cluster = base.model_copy(
        update={"instances": [base.instances[0].model_copy(update={"warm": []})]}
    )
    perf = {(m, "G"): make_perf(m, sleep_s=0.01, wake_s=0.02) for m in ("m1", "m2")}
    policy = TinyPolicy(route={"m1": "i0", "m2": "i0"})
    core = ServeCore(cluster, SLO_CLASSES, perf, policy, AT_ONCE)
    assert arrive(core, make_requests(1, model="m2")) == [
        LoadModel("i0", "m2", sleep_current=False)
    ]
    core.on_event(InstanceReady("i0", 22.0, "m2"), 22.0)
    assert [o["kind"] for o in core.take_log()[1] if o["kind"] != "replan"] == ["swap"]


def test_a_request_that_started_no_longer_counts_as_waiting_in_the_engine() -> None:
    core = make_core(max_inflight=4, max_engine_waiting=2)
    core.on_backpressure("i0", waiting=0, kv_usage=0.1)
    assert dispatched(arrive(core, make_requests(6, gap_s=0.0))) == ["r0", "r1"]
    assert core.decide(0.1) == []  # two sent, none reported running yet
    core.on_event(FirstToken("r0", "i0", 0.2), 0.2)  # r0 runs: a place in the queue freed
    assert dispatched(core.decide(0.2)) == ["r2"]


@pytest.mark.parametrize("defer_late", [True, False])
def test_a_head_too_late_for_its_deadline_waits_behind_the_queue(defer_late: bool) -> None:
    # x0 holds the only slot until t=30; by then x1 and x2 (deadline 20) are lost, while
    # f0 (arrived at 25, deadline 45) can still make it if it goes first
    core = make_core(max_inflight=1, defer_late=defer_late)
    assert dispatched(arrive(core, make_requests(3, gap_s=0.0, prefix="x"))) == ["x0"]
    arrive(core, make_requests(1, start_s=25.0, prefix="f"), now_s=25.0)
    order = dispatched(finish(core, "x0", "i0", 30.0))
    for t in (31.0, 32.0):
        order += dispatched(finish(core, order[-1], "i0", t))
    assert order == (["f0", "x1", "x2"] if defer_late else ["x1", "x2", "f0"])
    assert core.stats().waiting == 0


@pytest.mark.parametrize(("horizon_s", "expected"), [(60.0, "f0 x1 x2 b0"), (1e3, "f0 b0 x1 x2")])
def test_a_late_head_goes_ahead_of_work_due_beyond_the_defer_horizon(
    horizon_s: float, expected: str
) -> None:
    # as above, with b0 (batch: due at 600 s) queued behind the interactive requests: at
    # t=30 the late x1 and x2 go behind f0 (due at 45) but ahead of b0 when it is due
    # beyond the horizon, behind it otherwise
    core = make_core(policy=TinyPolicy(by_priority=True), max_inflight=1, defer_horizon_s=horizon_s)
    assert dispatched(arrive(core, make_requests(3, gap_s=0.0, prefix="x"))) == ["x0"]
    arrive(core, make_requests(1, slo_class="batch", prefix="b"))
    arrive(core, make_requests(1, start_s=25.0, prefix="f"), now_s=25.0)
    order = dispatched(finish(core, "x0", "i0", 30.0))
    for t in (31.0, 32.0, 33.0):
        order += dispatched(finish(core, order[-1], "i0", t))
    assert order == expected.split()
    assert core.stats().waiting == 0


def test_under_a_flood_a_replan_plans_the_most_urgent_and_the_rest_still_run() -> None:
    class Recording(TinyPolicy):
        seen: list[list[str]]

        def plan(self, snapshot: QueueSnapshot, rng: np.random.Generator) -> Plan:
            self.seen.append([r.id for r in snapshot.waiting])
            return super().plan(snapshot, rng)

    policy = Recording()
    policy.seen = []
    core = make_core(policy=policy, max_inflight=1, max_planned=3)
    batch = make_requests(3, slo_class="batch", gap_s=0.0, prefix="b")  # deadline 600 s
    late = make_requests(2, gap_s=0.0, prefix="l")  # interactive: deadline 20 s, passed at 30
    core.on_arrival(batch[0], 0.0)
    core.decide(0.0)  # b0 dispatched
    for r in [*batch[1:], *late]:
        core.on_arrival(r, 0.0)
    urgent = make_requests(2, start_s=30.0, prefix="u")  # deadlines 50 s and 51 s
    for r in urgent:
        core.on_arrival(r, r.arrival_s)
    core.decide(31.0)
    # the earliest deadlines not yet passed (the passed ones, l0 and l1, come last)
    assert sorted(policy.seen[-1]) == ["b1", "u0", "u1"]
    assert core.stats().waiting == 6
    t, running = 31.0, "b0"
    for _ in range(20):  # one slot: finish what runs, wake until the next starts
        t += 1.0
        actions = finish(core, running, "i0", t)
        for _ in range(10):  # bounded: a request left unplanned for good fails the test
            if dispatched(actions) or not core.stats().waiting:
                break
            t = core.next_wakeup_s() or t + 1.0
            actions = core.decide(t)
        if not dispatched(actions):
            break
        running = dispatched(actions)[0]
    assert core.stats().finished == 7  # the unplanned were planned once room was left


def test_a_running_request_is_credited_with_the_decode_steps_left_by_others_prefill() -> None:
    """vLLM runs other prompts' chunks in the same steps as the decodes: the output a
    running request has generated by now counts the decode steps in the time since its
    first token less the instance's prefill since then (the speed calibration's model),
    not that whole time as decode steps."""
    core = make_core(models=("m1",))
    short = make_requests(1, output_tokens=5000, prefix="s")
    long = make_requests(1, prompt_tokens=20_000, output_tokens=5000, prefix="l")
    assert dispatched(arrive(core, short + long)) == ["s0", "l0"]
    core.on_event(FirstToken("s0", "i0", 0.1), 0.1)
    core.on_event(FirstToken("l0", "i0", 2.1), 2.1)  # 20k tokens prefilled meanwhile
    running = {rr.request.id: rr for rr in core.snapshot(3.0).instances[0].running}
    perf = make_perf()
    step_s = perf.decode_step_s(2, 0)  # two in flight (this profile's step ignores context)
    prefill_s = perf.prefill_work_s(20_000, 20_000**2)
    assert running["s0"].generated_tokens == 1 + int((3.0 - 0.1 - prefill_s) / step_s)
    assert running["s0"].generated_tokens < 1 + int((3.0 - 0.1) / step_s)
    assert running["l0"].generated_tokens == 1 + int((3.0 - 2.1) / step_s)


def test_a_request_waiting_in_the_engine_is_seen_the_same_until_its_first_token() -> None:
    """A snapshot keeps the view of a request sent and not started (a router's thousands
    waiting in vLLM's queues), and sees the one that started make progress."""
    core = make_core(models=("m1",))
    assert dispatched(arrive(core, make_requests(2, output_tokens=5000))) == ["r0", "r1"]

    def seen(now_s: float) -> dict[str, RunningRequest]:
        return {rr.request.id: rr for rr in core.snapshot(now_s).instances[0].running}

    before = seen(1.0)
    core.on_event(FirstToken("r0", "i0", 1.5), 1.5)
    after = seen(3.0)
    assert after["r1"] is before["r1"] and after["r1"].first_token_s is None
    assert after["r0"].first_token_s == 1.5 and after["r0"].generated_tokens > 1
    assert seen(4.0)["r0"].generated_tokens > after["r0"].generated_tokens


# ---- moving a running request ---------------------------------------------------------


def _slow_and_fast(
    fast_step_s: float, resumable: bool = True, **overrides: Any
) -> tuple[ServeCore, list[Action]]:
    """i0 (slow GPU) decodes one long request, started at 0.5 s; i1 holds the same model
    on a GPU whose decode step is ``fast_step_s`` (i0's: 40 ms); nothing waits."""
    cluster = make_cluster(2, ("m1",))
    fast_gpu = cluster.gpu_types[0].model_copy(update={"name": "F"})
    on_fast = cluster.instances[1].model_copy(update={"gpu": "F"})
    gpus, insts = [*cluster.gpu_types, fast_gpu], [cluster.instances[0], on_fast]
    cluster = cluster.model_copy(update={"gpu_types": gpus, "instances": insts})
    perf = {
        ("m1", "G"): make_perf("m1", "G", step_base_s=0.04),
        ("m1", "F"): make_perf("m1", "F", step_base_s=fast_step_s),
    }
    config = replace(AT_ONCE, dispatch_on_arrival=False, calibrate_speed=False, **overrides)
    core = ServeCore(
        cluster, SLO_CLASSES, perf, TinyPolicy(route={"m1": "i0"}), config,
        np.random.default_rng(0),
    )  # fmt: skip
    core.on_arrival(make_requests(1, output_tokens=2000)[0], 0.0, resumable)
    assert dispatched(core.decide(0.0)) == ["r0"]
    core.on_event(FirstToken("r0", "i0", 0.5), 0.5)
    return core, core.decide(10.0)


def test_once_nothing_waits_a_long_answer_moves_where_it_decodes_at_least_twice_as_fast() -> None:
    core, actions = _slow_and_fast(fast_step_s=0.01)
    # about 237 tokens made in 9.5 s; the other 1,763 take 71 s here, 18 s there
    [evict] = actions
    assert isinstance(evict, Evict) and (evict.request_id, evict.instance_id) == ("r0", "i0")
    assert evict.reason.startswith("moved to i1 (5") and evict.reason.endswith(" s sooner)")
    core.on_event(Aborted("r0", "i0", 10.0, 240, "evicted"), 10.0)
    assert core.decide(10.0) == [Dispatch("r0", "i1", 0, kept_tokens=240)]
    core.on_event(FirstToken("r0", "i1", 10.1), 10.1)
    core.on_event(Finished("r0", "i1", 30.0, 1760), 30.0)
    rows = core.take_log()[0]
    assert [(r["instance_id"], r["outcome"]) for r in rows] == [
        ("i0", "evicted"), ("i1", "finished"),
    ]  # fmt: skip
    # its client got its first token at 0.5 s: a TTFT of 0.5 s, met
    assert rows[-1]["slo_met"] and rows[-1]["output_tokens"] == 2000


def test_a_move_whose_destination_went_down_waits_for_the_plan_like_any_other() -> None:
    core, actions = _slow_and_fast(fast_step_s=0.01)
    assert [type(a) for a in actions] == [Evict]
    core.on_event(InstanceDown("i1", 10.0, "failed"), 10.0)
    core.on_event(Aborted("r0", "i0", 10.0, 240, "evicted"), 10.0)
    # the plan routes it back to i0 (TinyPolicy), where it resumes
    assert core.decide(10.0) == [Dispatch("r0", "i0", 0, kept_tokens=240)]


@pytest.mark.parametrize(
    ("fast_step_s", "overrides"),
    [
        (0.025, {}),  # less than twice as fast
        (0.01, {"move_running": False}),
        (0.01, {"evict_batch": 0}),  # never evicts
        (0.01, {"resume_evicted": False}),  # would throw its output away
        (0.01, {"max_evictions": 0}),
        (0.01, {"resumable": False}),  # its stream could not be continued
    ],
)
def test_a_running_request_stays_where_moving_does_not_pay_or_is_not_allowed(
    fast_step_s: float, overrides: dict[str, Any]
) -> None:
    assert _slow_and_fast(fast_step_s, **overrides)[1] == []


@pytest.mark.parametrize("resumable", [True, False])
def test_a_stream_that_cannot_be_continued_is_not_evicted_once_started(resumable: bool) -> None:
    core = make_core(policy=TinyPolicy(by_priority=True, wait_s=100.0), max_inflight=2)
    for r in make_requests(2, slo_class="batch", gap_s=0.0, output_tokens=5000, prefix="b"):
        core.on_arrival(r, 0.0, resumable)
    assert dispatched(core.decide(0.0)) == ["b0", "b1"]
    for rid in ("b0", "b1"):
        core.on_event(FirstToken(rid, "i0", 0.5), 0.5)
    urgent = make_requests(1, slo_class="interactive", start_s=1.0, output_tokens=10, prefix="u")
    evicted = [a.request_id for a in arrive(core, urgent, 1.0) if isinstance(a, Evict)]
    assert evicted == (["b1"] if resumable else [])


def test_a_burst_of_late_heads_is_deferred_as_if_each_walked_the_queue_from_its_head() -> None:
    def plan(k: int, deadline_s: float) -> PlannedGroup:
        return PlannedGroup(f"g{k}", "m1", "interactive", (), deadline_s, 0.0, 0.0, 0.0)

    def queue(rng: np.random.Generator) -> deque[QueuedGroup]:
        plans = [plan(k, float(rng.choice([5.0, 10.0, 20.0]))) for k in range(8)]
        return deque(
            QueuedGroup(plans[k], deque([f"r{k}.{j}" for j in range(3)]), bool(rng.random() < 0.3))
            for k in range(8)
        )

    def shape(vq: deque[QueuedGroup]) -> list[tuple[str, bool, list[str]]]:
        return [(g.plan.group_id, g.deferred, list(g.ids)) for g in vq]

    def defer_heads(vq: deque[QueuedGroup], cursor: bool) -> None:
        """Defer the head group's requests, then the next group's, as ServingOps._head
        does in one look (with the cursor) or each from the head (without)."""
        filled = 0
        for _ in range(2):
            head = vq[0]
            if head.deferred:  # the core serves it: nothing more is deferred
                return
            while head.ids:
                filled = _defer(vq, head, head.ids[0], 10.0, filled if cursor else 0)
                head.ids.popleft()
            vq.popleft()
            filled = max(filled - 1, 0)

    rng = np.random.default_rng(0)
    for _ in range(200):
        walked = queue(rng)
        from_head = deque(QueuedGroup(g.plan, deque(g.ids), g.deferred) for g in walked)
        defer_heads(walked, cursor=True)
        defer_heads(from_head, cursor=False)
        assert shape(walked) == shape(from_head)
