"""How much of a forecast's error is the planner's model of the engine: forecasts made
with nothing left to arrive.

How it works: at each cell's reference load (``reference_load`` in
``benchmarks/results/estimator.json``), the sweep's workload with its arrivals cut at
``cut_s`` runs through the simulated stack under ``heuristic``, told the true output
lengths (``clairvoyant``) and not. The first plan made after the cut is kept whole
(:class:`FirstPlanAfter`, a policy that wraps the planner): every request waiting then
has a dispatch forecast made when no request is still to come, so what parts it from the
dispatch that came is the planner's model of the engine (and, without the true lengths,
its length estimates), and what later re-plans, evictions and deferrals change. The
forecasts the sweep scores are made mid-burst, so they also miss the arrivals to come.

Per cell, cut and lengths: per class, the median absolute and signed error of the
dispatch forecasts (actual - forecast: negative is early) and the median forecast wait;
the requests dispatched in the next ``DRAIN_S`` seconds, forecast against actual; and
the speed calibration's factor per GPU when the plan was made (the profiles' step times
scaled by it; the simulated engine runs at its profile, so 1 is the truth).
Prints a table and writes ``benchmarks/results/forecast_at_rest.{json,md}``.

Usage: .venv/bin/python -m benchmarks.forecast_at_rest [--jobs 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import write_report
from benchmarks.look_ahead import RESULTS, SLO_S, reference_cells
from benchmarks.policies.run import _workload
from benchmarks.policies.scenarios import SCENARIOS, SPAN_S
from qlmctl.perfmodel import PerfModel
from qlmctl.plan.policies import HeuristicPolicy
from qlmctl.plan.types import LengthEstimates, Plan, Policy, QueueSnapshot, ServingStyle
from qlmctl.profile.store import ProfileStore
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.sim_driver import run_simulated
from qlmctl.workload.model import Workload

CUTS_S = (SPAN_S / 4, SPAN_S / 2)  # a quarter and half way into the arrivals
DRAIN_S = 20.0  # the dispatches counted after the kept plan
CLASSES = ("interactive", "batch-1")  # the table's columns (the JSON has every class)


class FirstPlanAfter:
    """``policy`` as it is, keeping the first plan it makes at or after ``at_s``."""

    def __init__(self, policy: Policy, at_s: float) -> None:
        self._policy = policy
        self.name = policy.name
        self.at_s = at_s
        self.kept_perf: dict[tuple[str, str], PerfModel] = {}  # the profiles it planned with
        self.kept: Plan | None = None

    @property
    def serving(self) -> ServingStyle:
        """The wrapped policy's."""
        return self._policy.serving

    @property
    def lengths(self) -> LengthEstimates | None:
        """The wrapped policy's."""
        return self._policy.lengths

    def plan(self, snapshot: QueueSnapshot, rng: np.random.Generator) -> Plan:
        """The wrapped policy's plan (kept if it is the first at or after ``at_s``)."""
        plan = self._policy.plan(snapshot, rng)
        if self.kept is None and snapshot.now_s >= self.at_s:
            self.kept, self.kept_perf = plan, dict(snapshot.perf)
        return plan


def forecasts(plan: Plan) -> pd.DataFrame:
    """One row per request the plan places: its class and dispatch forecast."""
    rows = [
        (rid, g.slo_class, g.request_dispatch_s[k])
        for ip in plan.instances
        for g in ip.groups
        for k, rid in enumerate(g.request_ids)
    ]
    return pd.DataFrame(rows, columns=["request_id", "slo_class", "forecast_s"])


def errors(plan: Plan, requests: pd.DataFrame) -> dict[str, Any]:
    """The plan's dispatch forecasts against the run log's ``requests``: per class the
    median absolute and signed error and the median forecast wait (s), and the requests
    forecast and seen dispatched within ``DRAIN_S`` of the plan."""
    now = plan.created_s
    fc = forecasts(plan)
    # the first dispatch of each request after the plan (an evicted one is sent again)
    sent = requests[requests["dispatch_s"] >= now].groupby("request_id")["dispatch_s"].min()
    fc = fc.join(sent, on="request_id", how="inner")
    fc["error_s"] = fc["dispatch_s"] - fc["forecast_s"]
    out: dict[str, Any] = {"at_s": now, "waiting": len(fc)}
    for cls, mine in fc.groupby("slo_class"):
        out[str(cls)] = {
            "requests": len(mine),
            "mae_s": float(mine["error_s"].abs().median()),
            "bias_s": float(mine["error_s"].median()),
            "forecast_wait_s": float((mine["forecast_s"] - now).median()),
        }
    out["drained_forecast"] = int((fc["forecast_s"] <= now + DRAIN_S).sum())
    out["drained"] = int((fc["dispatch_s"] <= now + DRAIN_S).sum())
    return out


def run_cell(
    scenario: str, instances: int, load: float, cut_s: float, clairvoyant: bool
) -> dict[str, Any]:
    """One run with the arrivals cut at ``cut_s``: :func:`errors` of its kept plan."""
    cluster = SCENARIOS[scenario].cluster(instances)
    perf = ProfileStore.load().for_cluster(cluster)
    full, _, _ = _workload(scenario, instances, load, SPAN_S, SLO_S)
    kept = [r for r in full.requests if r.arrival_s <= cut_s]
    workload = Workload.from_requests(kept, full.slo_classes, full.source)
    policy = FirstPlanAfter(HeuristicPolicy(clairvoyant=clairvoyant), cut_s)
    with tempfile.TemporaryDirectory(prefix="qlmctl-at-rest-") as tmp:
        run_dir = Path(tmp) / "run"
        config = CoreConfig.for_policy(policy, improve=False)
        run_simulated(workload, cluster, perf, policy, config, run_dir, 0)
        requests = pd.read_parquet(run_dir / "requests.parquet")
    head = {
        "cell": f"{scenario} ({instances})",
        "load": load,
        "cut_s": cut_s,
        "lengths": "true" if clairvoyant else "estimated",
    }
    if policy.kept is None:  # no plan after the cut: nothing was left waiting
        return {**head, "at_s": None, "waiting": 0, "drained_forecast": 0, "drained": 0}
    return {**head, **errors(policy.kept, requests), "speed": speed_factors(policy.kept_perf, perf)}


def speed_factors(
    planned: Mapping[tuple[str, str], PerfModel], profiled: Mapping[tuple[str, str], PerfModel]
) -> dict[str, float]:
    """Per GPU, the mean over its models of the planned step time over the profiled one
    (the calibration scales every step coefficient alike)."""
    by_gpu: dict[str, list[float]] = {}
    for (model, gpu), perf in planned.items():
        ratio = perf.step_time_s(1, 1, 1) / profiled[(model, gpu)].step_time_s(1, 1, 1)
        by_gpu.setdefault(gpu, []).append(ratio)
    return {gpu: float(np.mean(f)) for gpu, f in sorted(by_gpu.items())}


def _class_cells(row: dict[str, Any], cls: str) -> str:
    c = row.get(cls)
    if c is None:
        return "- | - | -"
    return f"{c['mae_s']:.2f} | {c['bias_s']:+.2f} | {c['forecast_wait_s']:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = [
        (scenario, instances, load, cut, clairvoyant)
        for scenario, instances, load in reference_cells(RESULTS / "estimator.json")
        for cut in CUTS_S
        for clairvoyant in (True, False)
    ]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_cell, *zip(*runs, strict=True)))
    wall_s = time.perf_counter() - t0
    lines = [
        "# Forecasts with nothing left to arrive (`benchmarks/forecast_at_rest.py`)",
        "",
        f"`heuristic`, seed 0, arrivals cut at {' and '.join(f'{c:g}' for c in CUTS_S)} s; the"
        " first plan after the cut against the dispatches that came (actual - forecast,"
        f" median; negative: early) and the requests dispatched in the next {DRAIN_S:g} s"
        f" ({wall_s / 60:.1f} min on {args.jobs} processes).",
        "",
        f"| cell | load | cut s | lengths | waiting | {CLASSES[0]}: error s | bias s | wait s "
        f"| {CLASSES[1]}: error s | bias s | wait s | sent in {DRAIN_S:g} s: forecast | actual "
        "| speed factor |",
        "|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['load']:g} | {r['cut_s']:g} | {r['lengths']} | {r['waiting']} "
            f"| {_class_cells(r, CLASSES[0])} | {_class_cells(r, CLASSES[1])} "
            f"| {r['drained_forecast']} | {r['drained']} "
            f"| {', '.join(f'{g} {f:.2f}' for g, f in r.get('speed', {}).items()) or '-'} |"
        )
    write_report(
        args.out, "forecast_at_rest", "\n".join(lines) + "\n", {"wall_s": wall_s, "runs": rows}
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
