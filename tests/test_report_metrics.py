"""Report metrics on a hand-built run log whose answers are worked out by hand.

The run (10 s, two instances, classes interactive (TTFT 1 s, weight 2) and batch
(TTFT 5 s, weight 1)):

    a  interactive m1 i0  arrive 0  dispatch 0.5  first token 0.6  finish 2   met
    b  interactive m1 i0  arrive 1  dispatch 1.0  first token 1.2  finish 3   met
    c  batch       m2 i1  arrive 2  dispatch 2    first token 2.5  evicted at 4;
                          attempt 1 dispatch 6    first token 6.4  finish 8   met
    d  interactive m1 i0  arrive 3  dispatch 3.5  first token 5.0  finish 7   missed
    e  batch       m2 --  arrive 9  rejected at 9

``write_run(..., d_first_token_s=3.9)`` makes d meet its SLO (TTFT 0.9 s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qlmctl.report.metrics import RunMetrics, busy_seconds, run_metrics
from qlmctl.serve.runlog import RunLogWriter, read_run

CLASSES = {
    "interactive": {"ttft_s": 1.0, "e2e_s": None, "weight": 2.0},
    "batch": {"ttft_s": 5.0, "e2e_s": None, "weight": 1.0},
}


def _attempt(rid: str, cls: str, model: str, arrival: float, **row: Any) -> dict[str, Any]:
    base = {"request_id": rid, "attempt": 0, "slo_class": cls, "model": model}
    return base | {"arrival_s": arrival, "outcome": "finished", "prompt_tokens": 100} | row


def write_run(
    path: Path,
    policy: str = "fcfs",
    fingerprint: str = "w1",
    d_first_token_s: float = 5.0,
    close: bool = True,
) -> Path:
    """Write the run of the module docstring; return its directory."""
    meta = {
        "run_id": f"run-{policy}",
        "policy": policy,
        "engine": "sim",
        "workload_fingerprint": fingerprint,
        "started_at": "2025-01-01T00:00:00+00:00",
        "instances": [{"id": "i0", "gpu": "A10"}, {"id": "i1", "gpu": "A10"}],
        "slo_classes": CLASSES,
    }
    i0 = {"instance_id": "i0", "output_tokens": 20}
    rows = [
        _attempt("a", "interactive", "m1", 0.0, **i0, dispatch_s=0.5, first_token_s=0.6,
                 finish_s=2.0, slo_met=True, tpot_s=0.05,
                 predicted_start_s=0.4, predicted_miss_prob=0.1,
                 predicted_first_token_s=0.5, predicted_first_token_p90_s=0.7,
                 predicted_finish_s=1.8, predicted_finish_p90_s=2.5),
        _attempt("b", "interactive", "m1", 1.0, **i0, dispatch_s=1.0, first_token_s=1.2,
                 finish_s=3.0, slo_met=True, tpot_s=0.1,
                 predicted_start_s=1.0, predicted_miss_prob=0.2,
                 predicted_first_token_s=1.5, predicted_first_token_p90_s=1.6,
                 predicted_finish_s=2.0, predicted_finish_p90_s=2.5),
        _attempt("c", "batch", "m2", 2.0, instance_id="i1", dispatch_s=2.0, first_token_s=2.5,
                 finish_s=4.0, slo_met=False, outcome="evicted", reason="evicted",
                 prompt_tokens=200, output_tokens=5,
                 predicted_start_s=2.5, predicted_miss_prob=0.3,
                 predicted_first_token_s=2.6, predicted_first_token_p90_s=2.4,
                 predicted_finish_s=3.0, predicted_finish_p90_s=3.5),
        _attempt("c", "batch", "m2", 2.0, attempt=1, instance_id="i1", dispatch_s=6.0,
                 first_token_s=6.4, finish_s=8.0, slo_met=True, tpot_s=0.02,
                 prompt_tokens=200, output_tokens=40,
                 predicted_start_s=5.0, predicted_miss_prob=0.9),
        _attempt("d", "interactive", "m1", 3.0, **i0, dispatch_s=3.5,
                 first_token_s=d_first_token_s, finish_s=7.0,
                 slo_met=d_first_token_s - 3.0 <= 1.0, tpot_s=0.2,
                 predicted_start_s=3.0, predicted_miss_prob=0.6,
                 predicted_first_token_s=d_first_token_s - 1.0, predicted_finish_s=6.0),
        _attempt("e", "batch", "m2", 9.0, finish_s=9.0, slo_met=False, outcome="rejected",
                 reason="HTTP 400", output_tokens=0),
    ]  # fmt: skip
    ops = [
        {"time_s": 4.0, "kind": "evict", "instance_id": "i1", "request_id": "c", "model": "m2"},
        {"time_s": 5.0, "kind": "swap", "instance_id": "i1", "model": "m2", "duration_s": 1.0},
        {"time_s": 5.5, "kind": "wake", "instance_id": "i0", "model": "m1", "duration_s": 0.5},
        *({"time_s": t, "kind": "replan", "duration_s": d} for t, d in [(0, 0.1), (3, 0.2)]),
        {"time_s": 6.0, "kind": "replan", "duration_s": 0.3},
    ]
    writer = RunLogWriter(path, meta, flush_every=2)
    for row in rows:
        writer.add_attempt(row)
    for op in ops:
        writer.add_operation(op)
    if close:
        writer.close(duration_s=10.0)
    else:
        writer.flush()
    return path


@pytest.fixture
def metrics(tmp_path: Path) -> RunMetrics:
    return run_metrics(read_run(write_run(tmp_path / "run")))


def test_attainment_goodput_and_throughput(metrics: RunMetrics) -> None:
    m = metrics.overall
    assert (m.requests, m.met, m.finished, m.rejected) == (5, 3, 4, 1)
    assert m.attainment == pytest.approx(0.6)
    assert m.weighted_attainment == pytest.approx(5 / 8)  # a, b (2 each) and c (1) of 8
    assert m.goodput_rps == pytest.approx(0.3)
    assert m.request_throughput_rps == pytest.approx(0.4)
    assert m.output_tokens == 100  # the evicted attempt's 5 tokens are not counted
    assert m.output_throughput_tps == pytest.approx(10.0)
    assert m.total_token_throughput_tps == pytest.approx(60.0)
    assert metrics.by_class["interactive"].attainment == pytest.approx(2 / 3)
    assert metrics.by_class["batch"].attainment == pytest.approx(0.5)
    assert list(metrics.by_class) == ["interactive", "batch"]  # run.json order
    assert metrics.by_model["m2"].rejected == 1


def test_latency_percentiles(metrics: RunMetrics) -> None:
    # 0.6, 0.2, 0.5 (c's first token came in its evicted attempt: the next one continues
    # the client's stream), 2.0
    ttft = metrics.overall.ttft
    assert ttft.count == 4
    assert ttft.mean_s == pytest.approx(3.3 / 4)
    assert ttft.p50_s == pytest.approx(0.55)
    assert ttft.p90_s == pytest.approx(0.6 + 0.7 * 1.4)
    assert ttft.p99_s == pytest.approx(0.6 + 0.97 * 1.4)
    assert metrics.overall.e2e.p50_s == pytest.approx(3.0)  # 2, 2, 6, 4
    assert metrics.overall.tpot.mean_s == pytest.approx((0.05 + 0.1 + 0.02 + 0.2) / 4)
    queue = metrics.overall.queue  # first dispatch − arrival: 0.5, 0, 0, 0.5
    assert (queue.count, queue.mean_s) == (4, pytest.approx(0.25))


def test_utilisation_and_operations(metrics: RunMetrics) -> None:
    busy = {i.instance_id: (i.busy_s, i.utilisation, i.attempts) for i in metrics.instances}
    assert busy["i0"] == (pytest.approx(6.0), pytest.approx(0.6), 3)  # [0.5, 3] ∪ [3.5, 7]
    assert busy["i1"] == (pytest.approx(4.0), pytest.approx(0.4), 2)  # [2, 4] ∪ [6, 8]
    ops = metrics.operations
    assert (ops.swaps, ops.wakes, ops.evictions, ops.replans) == (1, 1, 1, 3)
    assert (ops.failed_attempts, ops.rejected_attempts) == (0, 1)
    assert ops.solver_time_s == pytest.approx(0.6)
    assert ops.swap_time_s == pytest.approx(1.5)


def test_per_operation_count_seconds_and_eviction_tokens(metrics: RunMetrics) -> None:
    stats = {o.kind: o for o in metrics.per_operation}
    assert list(stats) == ["swap", "wake", "evict", "replan"]
    assert (stats["swap"].count, stats["swap"].seconds) == (1, pytest.approx(1.0))
    assert (stats["replan"].count, stats["replan"].seconds) == (3, pytest.approx(0.6))
    assert stats["swap"].tokens_kept is None
    # a log without resume columns: c's 5 tokens were lost, its 200-token prompt recomputed
    evict = stats["evict"]
    assert (evict.count, evict.tokens_kept, evict.tokens_lost, evict.tokens_recomputed) == (
        1, 0, 5, 200,
    )  # fmt: skip


def test_eviction_tokens_of_a_resumed_request(tmp_path: Path) -> None:
    rows = [
        _attempt("c", "batch", "m2", 0.0, instance_id="i1", dispatch_s=0.0, finish_s=1.0,
                 outcome="evicted", output_tokens=150, kept_tokens=150, resumed_tokens=0),
        _attempt("c", "batch", "m2", 0.0, attempt=1, instance_id="i1", dispatch_s=2.0,
                 finish_s=3.0, output_tokens=300, resumed_tokens=150, cached_tokens=240),
    ]  # fmt: skip
    with RunLogWriter(tmp_path / "run", {"slo_classes": CLASSES}) as writer:
        for row in rows:
            writer.add_attempt(row)
        writer.add_operation({"time_s": 1.0, "kind": "evict", "request_id": "c"})
    stats = {o.kind: o for o in run_metrics(read_run(tmp_path / "run")).per_operation}
    evict = stats["evict"]  # kept all 150; re-prefilled 100 + 150 − 240 cached
    assert (evict.tokens_kept, evict.tokens_lost, evict.tokens_recomputed) == (150, 0, 10)


def test_predicted_against_observed(metrics: RunMetrics) -> None:
    p = metrics.predictions
    assert p is not None and p.start_count == 5
    assert p.start_bias_s == pytest.approx((0.1 + 0 - 0.5 + 1.0 + 0.5) / 5)
    assert p.start_mae_s == pytest.approx(2.1 / 5)
    # first forecast per request: a .1, b .2, c .3 (not its re-dispatch .9), d .6 (missed)
    assert p.overall is not None
    assert p.overall.brier == pytest.approx((0.01 + 0.04 + 0.09 + 0.16) / 4)
    assert p.overall.observed_miss_rate == pytest.approx(0.25)
    inter = p.by_class["interactive"]
    assert (inter.predicted_miss_rate, inter.observed_miss_rate) == pytest.approx((0.3, 1 / 3))


def test_forecast_first_tokens_and_finishes_against_observed(metrics: RunMetrics) -> None:
    p = metrics.predictions
    assert p is not None
    # first tokens: a +0.1, b -0.3, c (evicted, its token came) -0.1, d +1.0 (no p90);
    # by the p90: a and b, not c
    t = p.first_token
    assert (t.count, t.p90_count) == (4, 3)
    assert (t.bias_s, t.mae_s, t.p90_cover) == pytest.approx((0.0, 0.2, 2 / 3))
    # finishes of attempts that finished: a +0.2 (by its p90), b +1.0 (not), d +1.0
    f = p.finish
    assert (f.count, f.p90_count) == (3, 2)
    assert (f.bias_s, f.mae_s, f.p90_cover) == pytest.approx((1.0, 1.0, 0.5))


def test_crashed_run_infers_duration_and_counts_unfinished(tmp_path: Path) -> None:
    run = read_run(write_run(tmp_path / "run", close=False))
    assert not run.complete
    m = run_metrics(run)
    assert m.duration_s == pytest.approx(9.0)  # latest time in the log
    assert m.overall.goodput_rps == pytest.approx(3 / 9)


def test_no_predictions_gives_none(tmp_path: Path) -> None:
    with RunLogWriter(tmp_path / "run", {"policy": "fcfs"}) as log:
        log.add_attempt({"request_id": "x", "attempt": 0, "arrival_s": 0.0, "outcome": "evicted"})
    m = run_metrics(read_run(tmp_path / "run"))
    assert m.predictions is None
    assert (m.overall.unfinished, m.overall.attainment, m.overall.ttft.mean_s) == (1, 0.0, None)


def test_busy_seconds_merges_nested_and_chained_intervals() -> None:
    import pandas as pd

    att = pd.DataFrame(
        {
            "instance_id": ["i", "i", "i", "i", "j"],
            "dispatch_s": [0.0, 1.0, 2.0, 5.0, 1.0],
            "finish_s": [4.0, 2.0, 4.5, None, 2.0],  # None: still running at the end
        }
    )
    busy = busy_seconds(att, duration_s=6.0)
    assert busy["i"] == pytest.approx(4.5 + 1.0)
    assert busy["j"] == pytest.approx(1.0)
