from collections.abc import Callable
from dataclasses import replace

import pytest

from qlmctl.domain import Request
from qlmctl.engine import sim_instance
from qlmctl.engine.events import (
    Aborted,
    EngineEvent,
    Finished,
    FirstToken,
    InstanceDown,
    InstanceReady,
)
from qlmctl.engine.sim import SimEngine
from qlmctl.errors import BadInput, EngineError
from qlmctl.perfmodel import PerfModel
from qlmctl.profile.fit import predict_batch
from qlmctl.profile.store import ProfileStore
from tests.helpers import make_cluster, make_perf, make_requests


def engine_for(scheduling: str = "fcfs", num_instances: int = 1, **perf: object) -> SimEngine:
    """Instances i0, i1, ... (m1, m2 round-robin) with make_perf profiles for both models."""
    profiles = {(m, "G"): make_perf(m, "G", **perf) for m in ("m1", "m2")}
    return SimEngine(make_cluster(num_instances), profiles, scheduling=scheduling)


def drain(engine: SimEngine) -> list[EngineEvent]:
    """Advance event by event until nothing is left."""
    out: list[EngineEvent] = []
    while (t := engine.next_event_time()) is not None:
        out += engine.advance(t)
    return out


def times(events: list[EngineEvent], kind: type[FirstToken | Finished]) -> dict[str, float]:
    return {e.request_id: e.time_s for e in events if isinstance(e, kind)}


def submit_all(engine: SimEngine, requests: list[Request], instance: str = "i0") -> None:
    for r in requests:
        engine.submit(r, instance, 0, r.arrival_s)


def test_batched_decodes_are_faster_per_token_than_sequential() -> None:
    alone = engine_for()
    submit_all(alone, make_requests(1, output_tokens=50))
    one_s = times(drain(alone), Finished)["r0"]
    together = engine_for()
    submit_all(together, make_requests(8, gap_s=0.0, output_tokens=50))
    finished = times(drain(together), Finished)
    assert len(finished) == 8
    assert one_s < max(finished.values()) < 2 * one_s < 8 * one_s


def test_chunked_prefill_respects_the_token_budget() -> None:
    perf = make_perf(max_num_batched_tokens=100)
    engine = engine_for(max_num_batched_tokens=100)
    submit_all(engine, make_requests(2, gap_s=0.0, prompt_tokens=60, output_tokens=3))
    first = times(drain(engine), FirstToken)
    step1 = perf.step_time_s(100, 0, 0)  # r0's 60 tokens + 40 of r1
    assert first["r0"] == pytest.approx(step1)
    # step 2: r0 decodes (context 61) while r1 computes its last 20 prompt tokens
    assert first["r1"] == pytest.approx(step1 + perf.step_time_s(20, 1, 61))


def test_long_prompt_is_prefilled_in_chunks() -> None:
    perf = make_perf(max_num_batched_tokens=100)
    engine = engine_for(max_num_batched_tokens=100)
    submit_all(engine, make_requests(1, prompt_tokens=250, output_tokens=1))
    events = drain(engine)
    assert times(events, FirstToken)["r0"] == pytest.approx(perf.prefill_time_s(250))
    assert times(events, Finished)["r0"] == times(events, FirstToken)["r0"]


def test_kv_pressure_preempts_and_every_request_still_finishes() -> None:
    roomy = engine_for()
    submit_all(roomy, make_requests(10, gap_s=0.0, prompt_tokens=100, output_tokens=100))
    roomy_finished = times(drain(roomy), Finished)
    assert len(roomy_finished) == 10
    assert roomy.num_preemptions == 0

    tight = engine_for(kv_capacity_tokens=600)
    submit_all(tight, make_requests(10, gap_s=0.0, prompt_tokens=100, output_tokens=100))
    events = drain(tight)
    assert tight.num_preemptions > 0
    done = [e for e in events if isinstance(e, Finished)]
    assert sorted(e.request_id for e in done) == sorted(f"r{k}" for k in range(10))
    assert all(e.output_tokens == 100 for e in done)
    # recomputation costs time: the tight instance finishes later
    assert max(times(events, Finished).values()) > max(roomy_finished.values())


def test_request_longer_than_the_kv_cache_is_refused() -> None:
    engine = engine_for(kv_capacity_tokens=600)
    submit_all(engine, make_requests(1, prompt_tokens=550, output_tokens=100))
    (event,) = engine.advance(0.0)
    assert isinstance(event, Aborted) and event.reason == "too-long" and not event.retryable


def first_token_order(scheduling: str) -> list[str]:
    engine = engine_for(scheduling, max_num_seqs=1)
    for k, prio in enumerate([10, 10, 0, 5, 0]):
        req = make_requests(1, prefix=f"r{k}-p{prio}")[0].model_copy(update={"id": f"r{k}-p{prio}"})
        engine.submit(req, "i0", prio, 0.0)
    return [e.request_id for e in drain(engine) if isinstance(e, FirstToken)]


def test_priority_scheduling_serves_lower_values_first_then_arrival() -> None:
    assert first_token_order("priority") == ["r2-p0", "r4-p0", "r3-p5", "r0-p10", "r1-p10"]
    assert first_token_order("fcfs") == ["r0-p10", "r1-p10", "r2-p0", "r3-p5", "r4-p0"]


def test_abort_waiting_and_running_requests() -> None:
    engine = engine_for(max_num_seqs=1)
    submit_all(engine, make_requests(2, gap_s=0.0, output_tokens=100))
    events = engine.advance(0.5)  # r0 decodes (~10 ms steps); r1 waits
    assert list(times(events, FirstToken)) == ["r0"]
    engine.abort("r0", 0.5)
    engine.abort("r1", 0.5)
    engine.abort("unknown", 0.5)  # already gone: a no-op
    events = drain(engine)
    aborted = {e.request_id: e for e in events if isinstance(e, Aborted)}
    assert set(aborted) == {"r0", "r1"}
    assert all(e.reason == "evicted" and e.time_s == 0.5 for e in aborted.values())
    assert 10 < aborted["r0"].output_tokens < 100
    assert aborted["r1"].output_tokens == 0
    assert not [e for e in events if isinstance(e, Finished | FirstToken)]


def test_abort_frees_the_batch_for_waiting_requests() -> None:
    engine = engine_for(max_num_seqs=1)
    submit_all(engine, make_requests(2, gap_s=0.0, output_tokens=1000))
    engine.advance(0.5)
    engine.abort("r0", 0.5)
    first = times(drain(engine), FirstToken)
    assert 0.5 < first["r1"] < 0.6


def test_swap_is_ready_after_stop_plus_cold_start() -> None:
    engine = engine_for()  # make_perf: stop 2 s, cold start 20 s
    submit_all(engine, make_requests(1, output_tokens=1000))
    engine.advance(1.0)
    engine.load_model("i0", "m2", 1.0)
    late = make_requests(1, model="m2", start_s=5.0, prefix="late")[0]
    engine.submit(late, "i0", 0, 5.0)
    events = drain(engine)
    assert events[0] == InstanceDown("i0", 1.0, "swap")
    assert isinstance(events[1], Aborted) and events[1].reason == "swap" and events[1].retryable
    assert events[2] == Aborted("late0", "i0", 5.0, 0, "unavailable")
    assert events[3] == InstanceReady("i0", pytest.approx(1.0 + 2.0 + 20.0), "m2")  # type: ignore[arg-type]


def test_sleeping_model_wakes_instead_of_cold_starting() -> None:
    engine = engine_for(sleep_s=1.5, wake_s=0.5)
    engine.load_model("i0", "m2", 0.0, sleep_current=True)
    ready = [e for e in drain(engine) if isinstance(e, InstanceReady)]
    assert ready == [InstanceReady("i0", 1.5 + 20.0, "m2")]
    engine.load_model("i0", "m1", 30.0, sleep_current=True)
    ready = [e for e in drain(engine) if isinstance(e, InstanceReady)]
    assert ready == [InstanceReady("i0", 30.0 + 0.5, "m1")]
    # the swapped-in model serves
    engine.submit(make_requests(1, start_s=40.0)[0], "i0", 0, 40.0)
    assert times(drain(engine), Finished)


def test_failure_aborts_every_request_and_restart_cold_starts() -> None:
    engine = engine_for(num_instances=2, max_num_seqs=2)
    submit_all(engine, make_requests(4, gap_s=0.0, output_tokens=500))
    submit_all(engine, make_requests(1, model="m2", prefix="other", output_tokens=500), "i1")
    assert not engine.advance(1.0)[3:]  # first tokens only
    engine.fail("i0", 1.0)
    events = engine.advance(1.0)
    assert events[0] == InstanceDown("i0", 1.0, "failed")
    aborted = [e for e in events if isinstance(e, Aborted)]
    assert sorted(e.request_id for e in aborted) == ["r0", "r1", "r2", "r3"]
    assert all(e.reason == "failed" and e.retryable for e in aborted)
    assert [e.output_tokens > 0 for e in aborted] == [True, True, False, False]
    engine.load_model("i0", "m1", 2.0)
    events = drain(engine)
    assert InstanceReady("i0", 22.0, "m1") in events  # nothing to stop: cold start only
    assert "other0" in times(events, Finished)  # the other instance was unaffected


def test_loading_twice_and_going_back_in_time_are_refused() -> None:
    engine = engine_for()
    engine.load_model("i0", "m2", 0.0)
    with pytest.raises(EngineError, match="while it is loading"):
        engine.load_model("i0", "m1", 1.0)
    with pytest.raises(EngineError, match="backwards"):
        engine.advance(0.5)
    with pytest.raises(BadInput, match="unknown instance"):
        engine.fail("nope", 2.0)


def replay(perf: PerfModel, scheduling: str = "fcfs") -> list[EngineEvent]:
    profiles = {(m, "G"): perf.__class__(**(perf.to_dict() | {"model": m})) for m in ("m1", "m2")}
    engine = SimEngine(make_cluster(2), profiles, scheduling=scheduling)
    requests = [
        r.model_copy(update={"prompt_tokens": 50 + 37 * k % 400, "output_tokens": 5 + 13 * k % 90})
        for k, r in enumerate(make_requests(60, gap_s=0.05, output_tokens=100))
    ]
    out: list[EngineEvent] = []
    for k, r in enumerate(requests):
        out += engine.advance(r.arrival_s)
        on_i1 = k % 3 == 0
        req = r.model_copy(update={"model": "m2"}) if on_i1 else r
        engine.submit(req, "i1" if on_i1 else "i0", k % 4, r.arrival_s)
        if k == 30:
            engine.abort("r29", r.arrival_s)
    return out + drain(engine)


@pytest.mark.parametrize("scheduling", ["fcfs", "priority"])
def test_same_inputs_give_identical_events(scheduling: str) -> None:
    perf = make_perf(kv_capacity_tokens=3000, decode_s_per_ctx_token=1e-6, max_num_seqs=8)
    events = replay(perf, scheduling)
    assert events == replay(perf, scheduling)
    assert sum(isinstance(e, Finished) for e in events) == 59
    assert [e.request_id for e in events if isinstance(e, Aborted)] == ["r29"]
    assert [e.time_s for e in events] == sorted(e.time_s for e in events)


def test_multi_step_jumps_match_step_by_step_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    perf = make_perf(kv_capacity_tokens=3000, decode_s_per_ctx_token=1e-6, max_num_seqs=8)
    fast = replay(perf)
    steps_to_first_finish: Callable[[sim_instance.SimInstance], int] = (
        sim_instance.SimInstance._steps_to_first_finish
    )
    # one decode step per event: the batch is recomputed every step
    monkeypatch.setattr(
        sim_instance.SimInstance,
        "_steps_to_first_finish",
        lambda self: min(1, steps_to_first_finish(self)),
    )
    slow = replay(perf)
    assert [(type(e), getattr(e, "request_id", None)) for e in fast] == [
        (type(e), getattr(e, "request_id", None)) for e in slow
    ]
    assert [e.time_s for e in fast] == pytest.approx([e.time_s for e in slow], abs=1e-9)


# ---- vLLM V1 scheduler rules (see sim_instance.py's docstring) -----------------------


def test_a_waiting_prompt_is_admitted_only_when_its_whole_sequence_fits() -> None:
    # r0 holds 500 + its growing output of a 1000-token cache; r1's 600-token prompt would
    # fit chunk by chunk (budget 100) but not whole: vLLM V1 keeps it waiting
    # (full_sequence_must_fit) instead of prefilling it and preempting it again.
    engine = engine_for(kv_capacity_tokens=1000, max_num_batched_tokens=100)
    first = make_requests(1, prompt_tokens=500, output_tokens=300)
    second = make_requests(1, prompt_tokens=600, output_tokens=50, start_s=1.0, prefix="s")
    submit_all(engine, first)
    engine.advance(1.0)
    submit_all(engine, second)
    events = drain(engine)
    assert engine.num_preemptions == 0
    assert times(events, FirstToken)["s0"] > times(events, Finished)["r0"]


def test_a_prompt_that_fits_whole_is_prefilled_beside_the_decoder() -> None:
    engine = engine_for(kv_capacity_tokens=1000, max_num_batched_tokens=100)
    submit_all(engine, make_requests(1, prompt_tokens=300, output_tokens=300))
    engine.advance(1.0)
    submit_all(
        engine, make_requests(1, prompt_tokens=300, output_tokens=50, start_s=1.0, prefix="s")
    )
    events = drain(engine)
    assert engine.num_preemptions == 0
    assert times(events, FirstToken)["s0"] < 1.1  # 3 prefill steps of ~20 ms
    assert times(events, Finished)["r0"] > 2.0  # beside r0, which decodes ~300 steps of 10 ms


def victim_finishing_last(scheduling: str) -> str:
    """Two requests outgrow the cache together; which one finishes last (the victim)."""
    engine = engine_for(scheduling, kv_capacity_tokens=1000)
    for k, prio in enumerate([5, 0]):  # r0 admitted first but less urgent
        engine.submit(make_requests(2, gap_s=0.0, prompt_tokens=300, output_tokens=300)[k],
                      "i0", prio, 0.0)  # fmt: skip
    events = drain(engine)
    assert engine.num_preemptions == 1
    return max(times(events, Finished).items(), key=lambda kv: kv[1])[0]


def test_preemption_victim_is_the_last_admitted_or_the_least_urgent() -> None:
    assert victim_finishing_last("fcfs") == "r1"  # self.running.pop()
    assert victim_finishing_last("priority") == "r0"  # max (priority, arrival)


def test_one_long_decode_is_not_slowed_by_newer_long_prompts_that_do_not_fit() -> None:
    # The A10 case: a 28k-token request decodes while 16k-token prompts arrive.
    # 28k + 16k exceeds the 42k-token cache, so V1 admits none of them until it finishes;
    # it decodes at the lone-decode speed (~42 ms a token), not ~0.5 s.
    a10 = ProfileStore.load(None).get("llama-3.1-8b", "A10")
    cluster = make_cluster(1, models=("llama-3.1-8b",))
    engine = SimEngine(cluster, {("llama-3.1-8b", "G"): replace(a10, gpu="G")})
    long = make_requests(1, model="llama-3.1-8b", prompt_tokens=28_000, output_tokens=1000)
    newer = make_requests(
        3, model="llama-3.1-8b", prompt_tokens=16_000, output_tokens=100, start_s=30.0,
        gap_s=5.0, prefix="n",
    )  # fmt: skip
    submit_all(engine, long)
    events: list[EngineEvent] = []
    for r in newer:
        events += engine.advance(r.arrival_s)
        engine.submit(r, "i0", 0, r.arrival_s)
    events += drain(engine)
    first, finished = times(events, FirstToken), times(events, Finished)
    per_token_s = (finished["r0"] - first["r0"]) / 999
    assert per_token_s < 1.2 * a10.decode_step_s(1, 28_500)
    assert engine.num_preemptions == 0
    assert min(first[r.id] for r in newer) > finished["r0"]
    assert len(finished) == 4


# ---- the API server in front of the engine (see sim.py's docstring) -----------------


def test_requests_sent_together_reach_the_engine_admission_gap_apart() -> None:
    perf = make_perf(admission_gap_s=0.05)
    engine = engine_for(admission_gap_s=0.05)
    submit_all(engine, make_requests(3, gap_s=0.0, prompt_tokens=100, output_tokens=1))
    assert engine.num_waiting("i0") == 1  # the other two are still in the API server
    first = times(drain(engine), FirstToken)
    lone_s = perf.prefill_time_s(100)  # 20 ms: each is alone in the engine
    assert [first[f"r{k}"] for k in range(3)] == pytest.approx(
        [k * 0.05 + lone_s for k in range(3)]
    )


def test_a_lone_request_after_a_pause_enters_at_once() -> None:
    engine = engine_for(admission_gap_s=0.05)
    submit_all(engine, make_requests(2, gap_s=1.0, prompt_tokens=100, output_tokens=1))
    first = times(drain(engine), FirstToken)
    assert first["r1"] - 1.0 == pytest.approx(first["r0"])


def test_first_token_and_finish_reach_the_client_overhead_late() -> None:
    plain, late = engine_for(max_num_seqs=1), engine_for(max_num_seqs=1, ttft_overhead_s=0.3)
    for engine in (plain, late):
        submit_all(engine, make_requests(2, gap_s=0.0, output_tokens=20))
    base, shifted = drain(plain), drain(late)
    for kind in (FirstToken, Finished):
        assert {k: v + 0.3 for k, v in times(base, kind).items()} == pytest.approx(
            times(shifted, kind)
        )
    # (so r1 started when r0 finished in the engine, not when the client heard of it)
    assert [e.time_s for e in shifted] == sorted(e.time_s for e in shifted)


def test_evicting_before_the_first_token_reaches_the_client_drops_it() -> None:
    engine = engine_for(ttft_overhead_s=0.3)
    submit_all(engine, make_requests(1, output_tokens=100))
    assert not engine.advance(0.1)  # the engine has produced tokens; the client has none
    engine.abort("r0", 0.1)
    events = drain(engine)
    assert [type(e) for e in events] == [Aborted]
    assert events[0].time_s == 0.1


def test_evicting_a_request_whose_finish_is_on_its_way_is_a_no_op() -> None:
    engine = engine_for(ttft_overhead_s=0.3)
    submit_all(engine, make_requests(1, output_tokens=5))
    engine.advance(0.2)  # finished in the engine after ~50 ms
    engine.abort("r0", 0.2)
    events = drain(engine)
    assert [type(e) for e in events] == [FirstToken, Finished]
    assert events[1].time_s == pytest.approx(0.3 + 0.01 + 0.0001 * 100 + 4 * (0.01 + 0.0001))


def test_aborting_or_failing_requests_still_in_the_api_server() -> None:
    engine = engine_for(admission_gap_s=0.5)
    submit_all(engine, make_requests(3, gap_s=0.0, output_tokens=1000))
    engine.abort("r1", 0.1)
    engine.fail("i0", 0.2)
    events = drain(engine)
    aborted = {e.request_id: e.reason for e in events if isinstance(e, Aborted)}
    assert aborted == {"r1": "evicted", "r0": "failed", "r2": "failed"}
    assert list(times(events, FirstToken)) == ["r0"]


def test_sim_engine_agrees_with_the_fitted_burst_model() -> None:
    # predict_batch is what `qlmctl profile` fits the gap and overhead with; the
    # simulator must tell the same story for a burst.
    perf = make_perf(
        admission_gap_s=0.004, ttft_overhead_s=0.02, max_num_seqs=4, max_num_batched_tokens=256,
        decode_s_per_ctx_token=1e-6,
    )  # fmt: skip
    shapes = [(100 + 40 * k, 10 + 7 * k) for k in range(7)]
    predicted = predict_batch(perf, shapes)
    engine = SimEngine(make_cluster(1), {("m1", "G"): perf, ("m2", "G"): perf})
    for k, (prompt, output) in enumerate(shapes):
        req = make_requests(1, prompt_tokens=prompt, output_tokens=output, prefix=f"b{k}-")[0]
        engine.submit(req.model_copy(update={"id": f"b{k}"}), "i0", 0, 0.0)
    events = drain(engine)
    first, finished = times(events, FirstToken), times(events, Finished)
    simulated = [(first[f"b{k}"], finished[f"b{k}"]) for k in range(len(shapes))]
    assert simulated == [pytest.approx(p, rel=1e-9) for p in predicted]


def _evict_then_resume(where: str) -> tuple[SimEngine, float]:
    """r0 (prompt 1000) runs on i0, is evicted after ~100 tokens and resumes on ``where``
    (both instances serve m1); returns the engine and the resumed attempt's TTFT."""
    engine = SimEngine(make_cluster(2, ("m1",)), {("m1", "G"): make_perf("m1")})
    r0 = make_requests(1, prompt_tokens=1000, output_tokens=400)[0]
    engine.submit(r0, "i0", 0, 0.0)
    engine.advance(1.2)  # 0.11 s of prefill, then 10 ms per token
    engine.abort("r0", 1.2)
    kept = next(e for e in engine.advance(1.2) if isinstance(e, Aborted)).output_tokens
    assert 80 < kept < 120
    engine.submit(r0, where, 0, 1.2, kept_tokens=kept)
    events = drain(engine)
    done = [e for e in events if isinstance(e, Finished)]
    assert done == [Finished("r0", where, done[0].time_s, 400 - kept)]  # the rest only
    return engine, times(events, FirstToken)["r0"] - 1.2


def test_a_resumed_request_prefills_only_what_the_cache_lost() -> None:
    cached, hit_s = _evict_then_resume("i0")
    hit = cached.cached_tokens("r0")
    assert hit is not None and hit >= 1000 + 80 - 1
    assert cached.cached_tokens("r0") is None  # read once
    elsewhere, miss_s = _evict_then_resume("i1")
    assert elsewhere.cached_tokens("r0") is None  # another instance: no cache
    # a miss prefills prompt + kept (1080+ tokens at 0.1 ms each); a hit about one token
    assert miss_s > 0.1 > 5 * hit_s


def test_the_cache_of_an_evicted_request_is_overwritten_by_later_work() -> None:
    engine = engine_for(kv_capacity_tokens=2000)
    r0 = make_requests(1, prompt_tokens=1000, output_tokens=50)[0]
    engine.submit(r0, "i0", 0, 0.0)
    engine.advance(0.3)
    engine.abort("r0", 0.3)
    kept = next(e for e in engine.advance(0.3) if isinstance(e, Aborted)).output_tokens
    assert kept > 0
    others = make_requests(1, prompt_tokens=1500, output_tokens=5, prefix="o", start_s=0.5)
    submit_all(engine, others)
    drain(engine)  # 1500 new tokens through a 2000-token cache reuse most of r0's blocks
    engine.submit(r0, "i0", 0, 10.0, kept_tokens=kept)
    drain(engine)
    hit = engine.cached_tokens("r0")
    assert hit is not None and hit < 1000 + kept - 500


def test_models_kept_warm_wake_from_the_start() -> None:
    base = make_cluster(1)
    spec = base.instances[0].model_copy(update={"warm": ["m1", "m2"]})
    cluster = base.model_copy(update={"instances": [spec]})
    profiles = {(m, "G"): make_perf(m, sleep_s=0.01, wake_s=0.02) for m in ("m1", "m2")}
    engine = SimEngine(cluster, profiles)
    engine.load_model("i0", "m2", 1.0, sleep_current=True)
    ready = [e for e in drain(engine) if isinstance(e, InstanceReady)]
    assert ready == [InstanceReady("i0", 1.02, "m2")]  # a wake, not 20 s of cold start
