"""benchmarks/forecast_at_rest.py: the kept plan, and its forecasts set against a log."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from benchmarks.forecast_at_rest import FirstPlanAfter, errors, forecasts, speed_factors
from qlmctl.plan.policies import HeuristicPolicy
from qlmctl.serve.calibration import scaled
from tests.test_plan_arrivals import busy_batch_queue


def test_the_first_plan_at_or_after_the_cut_is_kept_as_made() -> None:
    snap = busy_batch_queue(0)  # a snapshot at t=100
    policy = FirstPlanAfter(HeuristicPolicy(), at_s=100.5)
    before = policy.plan(snap, np.random.default_rng(0))
    assert policy.kept is None
    later = replace(snap, now_s=101.0)
    kept = policy.plan(later, np.random.default_rng(0))
    policy.plan(replace(snap, now_s=102.0), np.random.default_rng(0))
    assert policy.kept is kept and kept.created_s == 101.0
    assert policy.kept_perf == later.perf and policy.kept_perf is not later.perf
    direct = HeuristicPolicy().plan(snap, np.random.default_rng(0))
    assert forecasts(before).equals(forecasts(direct))  # the wrapped plan, unchanged
    assert policy.name == "heuristic" and policy.serving == HeuristicPolicy().serving


def test_errors_are_actual_less_forecast_from_the_first_dispatch_after_the_plan() -> None:
    plan = HeuristicPolicy().plan(busy_batch_queue(0), np.random.default_rng(0))
    fc = forecasts(plan)
    late = pd.DataFrame(  # every request sent 1 s after its forecast...
        {"request_id": fc["request_id"], "dispatch_s": fc["forecast_s"] + 1.0}
    )
    evicted = late.assign(dispatch_s=plan.created_s - 5.0)  # ...after an attempt before it
    out = errors(plan, pd.concat([evicted, late]))
    cls = out["batch"]
    assert out["waiting"] == cls["requests"] == len(fc) == 400
    assert cls["bias_s"] == pytest.approx(1.0) and cls["mae_s"] == pytest.approx(1.0)
    wait = float((fc["forecast_s"] - plan.created_s).median())
    assert cls["forecast_wait_s"] == wait > 1.0
    assert out["drained_forecast"] > out["drained"] > 0  # late: fewer sent in time


def test_speed_factors_are_planned_over_profiled_step_times_per_gpu() -> None:
    profiled = busy_batch_queue(0).perf
    planned = {key: scaled(perf, 1.25) for key, perf in profiled.items()}
    gpus = {gpu for _, gpu in profiled}
    assert speed_factors(planned, profiled) == {g: pytest.approx(1.25) for g in sorted(gpus)}
    assert speed_factors(profiled, profiled) == {g: pytest.approx(1.0) for g in sorted(gpus)}
