"""Run the sweep: every (scenario, cluster size, load, policy) point through the real stack.

How it works: each point builds its workload (:func:`scenarios.build_point`), replays it
with :func:`qlmctl.serve.sim_driver.run_simulated` (the serving core, the policy, the
simulated vLLM engine) into a temporary run directory, and reads the metrics back with
:func:`qlmctl.report.metrics.run_metrics`, the same code ``qlmctl report`` uses. So a
row is exactly what a user would see for that run. Points run in a process pool.

The ``qlm`` policy runs with its MILP improver on (``CoreConfig.improve``), each answer
reaching the core its whole budget (2 s) after its snapshot, however long the solve took
(``answer_at_budget``): the latest a real run's could. Its runs then nearly repeat for
the seed, like every other policy's: only a solve its time limit cuts elsewhere (a busier
or slower machine) changes one (two sweeps with two workers on two cores matched 68 of
their 70 ``qlm`` and ``clairvoyant`` runs, one with three 53).
``clairvoyant`` is the ``qlm`` planner told every request's true output length: the
bound on what better length estimates could buy. ``hindsight`` and ``ceiling`` are no
policies but bounds, one row each per point: the program's given the whole run
(:mod:`.bound`), and the simulated engine's prefill capacity (:mod:`.ceiling`).
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.policies.bound import hindsight_bound
from benchmarks.policies.ceiling import prefill_ceiling
from benchmarks.policies.report import CEILING, HINDSIGHT
from benchmarks.policies.scenarios import SCENARIOS, build_point, slo_classes
from qlmctl.plan.policies import make_policy
from qlmctl.profile.store import ProfileStore
from qlmctl.report.metrics import run_metrics, time_forecast
from qlmctl.report.runs import load_run
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.sim_driver import run_simulated
from qlmctl.workload import Workload

# label -> (registry name, options, run the MILP improver)
POLICY_RUNS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "fcfs": ("fcfs", {}, False),
    "edf": ("edf", {}, False),
    "priority": ("priority", {}, False),
    "heuristic": ("heuristic", {}, False),
    "qlm": ("qlm", {"answer_at_budget": True}, True),
    "clairvoyant": ("qlm", {"answer_at_budget": True, "clairvoyant": True}, True),
}
CLASSES = ("interactive", "batch-1", "batch-2")
BOUNDS = {HINDSIGHT: hindsight_bound, CEILING: prefill_ceiling}  # (workload, cluster, perf)


@dataclass(frozen=True)
class Point:
    """One run of the sweep."""

    scenario: str
    instances: int
    load: float  # offered load / estimated capacity
    policy: str  # a key of POLICY_RUNS
    span_s: float  # virtual seconds of arrivals
    slo_s: tuple[float, float, float]  # interactive, batch-1, batch-2 TTFT targets
    seed: int = 0


def run_point(point: Point) -> dict[str, Any]:
    """Replay one point and return its row of results (for a bound, the bound)."""
    scenario = SCENARIOS[point.scenario]
    cluster = scenario.cluster(point.instances)
    perf = ProfileStore.load().for_cluster(cluster)
    workload, scale, offered = _workload(
        point.scenario, point.instances, point.load, point.span_s, point.slo_s
    )
    key = {
        "scenario": point.scenario,
        "instances": point.instances,
        "load": point.load,
        "offered_load": offered,
        "time_scale": scale,
        "policy": point.policy,
        "seed": point.seed,
        "requests": len(workload.requests),
    }
    if point.policy in BOUNDS:
        t0 = time.perf_counter()
        bound = BOUNDS[point.policy](workload, cluster, perf)
        return {**key, "attainment": bound, "wall_s": time.perf_counter() - t0}
    name, options, improve = POLICY_RUNS[point.policy]
    policy = make_policy(name, **options)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qlmctl-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        config = CoreConfig.for_policy(policy, improve=improve)
        run_simulated(workload, cluster, perf, policy, config, run_dir, point.seed)
        log = load_run(run_dir)
        m = run_metrics(log)
        forecasts = forecast_errors(log.requests)
        milp = milp_counts(log.operations)
    o = m.overall
    row: dict[str, Any] = {
        **key,
        "ended": o.requests,
        "finished": o.finished,
        "met": o.met,
        "failed": o.failed,
        "rejected": o.rejected,
        "cancelled": o.cancelled,
        "attainment": o.attainment,
        "weighted_attainment": o.weighted_attainment,
        "goodput_rps": o.goodput_rps,
        "throughput_rps": o.request_throughput_rps,
        "throughput_tps": o.total_token_throughput_tps,
        "output_tps": o.output_throughput_tps,
        "ttft_p50_s": o.ttft.p50_s,
        "swaps": m.operations.swaps + m.operations.wakes,
        "evictions": m.operations.evictions,
        "replans": m.operations.replans,
        "solver_s": m.operations.solver_time_s,
        "duration_s": m.duration_s,
        "wall_s": time.perf_counter() - t0,
        **milp,
    }
    for c in CLASSES:
        g = m.by_class.get(c)
        row[f"att_{c}"] = g.attainment if g is not None and g.requests else None
        row[f"n_{c}"] = g.requests if g is not None else 0
        for key, value in forecasts.get(c, {}).items():
            row[f"{key}_{c}"] = value
    return row


@functools.lru_cache(maxsize=2)
def _workload(
    scenario: str, instances: int, load: float, span_s: float, slo_s: tuple[float, float, float]
) -> tuple[Workload, float, float]:
    """:func:`build_point` once per cell and load in a worker process: the policies of one
    cell run one after another and replay the same workload (it took 1-3 s to build)."""
    cluster = SCENARIOS[scenario].cluster(instances)
    perf = ProfileStore.load().for_cluster(cluster)
    return build_point(SCENARIOS[scenario], cluster, perf, load, span_s, slo_classes(*slo_s))


def forecast_errors(requests: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per class, the first forecast of each request against what happened.

    ``start_mae_s`` / ``start_bias_s``: median absolute / signed error of the predicted
    dispatch (dispatch - forecast: > 0 is later than forecast) over first attempts,
    ``wait_s`` their median wait; ``miss_pred`` the mean forecast miss probability,
    ``miss_obs`` the share that missed, ``brier`` the forecasts' Brier score;
    ``first_token_mae_s`` / ``finish_mae_s`` the median absolute error of the forecast
    first token and finish (median over the scoring scenarios), ``first_token_p90_cover``
    / ``finish_p90_cover`` the share that came by the forecast's 90th percentile
    (:func:`~qlmctl.report.metrics.time_forecast`).
    """
    first = requests.sort_values(["request_id", "attempt"]).groupby("request_id").first()
    final = requests.sort_values(["request_id", "attempt"]).groupby("request_id").last()
    out: dict[str, dict[str, float]] = {}
    for c, rows in first.groupby("slo_class"):
        started = rows.dropna(subset=["predicted_start_s", "dispatch_s"])
        err = started["dispatch_s"] - started["predicted_start_s"]
        forecast = rows["predicted_miss_prob"].dropna()
        missed = (~final.loc[forecast.index, "slo_met"].astype(bool)).astype(float)
        out[str(c)] = {
            "start_mae_s": float(err.abs().median()) if len(err) else float("nan"),
            "start_bias_s": float(err.median()) if len(err) else float("nan"),
            "wait_s": float((started["dispatch_s"] - started["arrival_s"]).median())
            if len(err)
            else float("nan"),
            "miss_pred": float(forecast.mean()) if len(forecast) else float("nan"),
            "miss_obs": float(missed.mean()) if len(forecast) else float("nan"),
            "brier": float(((forecast - missed) ** 2).mean()) if len(forecast) else float("nan"),
        }
        for what in ("first_token", "finish"):
            t = time_forecast(rows, what)
            out[str(c)][f"{what}_mae_s"] = _nan(t.mae_s)
            out[str(c)][f"{what}_p90_cover"] = _nan(t.p90_cover)
    return out


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x


def milp_counts(operations: pd.DataFrame) -> dict[str, int]:
    """How often the MILP improver's plan was offered and adopted (``replan`` rows)."""
    improver = [
        d for d in operations.loc[operations["kind"] == "replan", "detail"].dropna().map(json.loads)
        if d.get("source") == "improver"
    ]  # fmt: skip
    adopted = sum(1 for d in improver if d.get("adopted", True) and "error" not in d)
    return {"milp_offered": len(improver), "milp_adopted": adopted}


def sweep(
    points: Sequence[Point], jobs: int, on_row: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Run ``points`` on ``jobs`` processes; rows in the order of ``points``."""
    if jobs <= 1:
        rows = []
        for p in points:
            rows.append(run_point(p))
            if on_row is not None:
                on_row(rows[-1])
        return rows
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_point, p) for p in points]
        out = []
        for f in futures:
            out.append(f.result())
            if on_row is not None:
                on_row(out[-1])
        return out
