"""What planning around the coming arrivals is worth: the policy sweep's reference cells.

How it works: at each cell's reference load (``reference_load`` in
``benchmarks/results/estimator.json``, written by ``python -m benchmarks.policies``) and
each seed, the same workload runs through the simulated stack three ways, all with the
``heuristic`` planner:

* ``heuristic``: as in the sweep: the coming arrivals are a load that stretches waits
  (``Problem.stream_load``);
* ``look-ahead``: ``look_ahead=True``: plans leave room for the last window of arrivals
  repeated (:func:`qlmctl.plan.arrivals.repeat_window`), which a deployment can do;
* ``foresight``: the same planner told the true arrivals of the next window instead of
  the repeat (the snapshot's recent window replaced by them, shifted back one window):
  what perfect knowledge of the next window gives this planner, as ``clairvoyant`` is
  for lengths (not a bound: the planner is greedy, and the truth can mislead it too).

The heuristic is deterministic per seed, so differences between the three on one seed are
exact. Prints attainment per cell and writes ``benchmarks/results/look_ahead.{json,md}``.

Usage: .venv/bin/python -m benchmarks.look_ahead [--seeds 3] [--jobs 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import write_report
from benchmarks.policies.run import _workload
from benchmarks.policies.scenarios import SCENARIOS, SPAN_S, slo_classes
from qlmctl.domain import Request
from qlmctl.plan.policies import BasePolicy, HeuristicPolicy, QlmPolicy
from qlmctl.plan.types import Plan, QueueSnapshot, RecentArrivals
from qlmctl.profile.store import ProfileStore
from qlmctl.report.metrics import run_metrics
from qlmctl.report.runs import load_run
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.sim_driver import run_simulated

RESULTS = Path(__file__).resolve().parent / "results"
SLO_S = tuple(float(c.ttft_s) for c in slo_classes())  # the sweep's default TTFT targets
VARIANTS = ("heuristic", "look-ahead", "foresight")
# qlm with its background improver, as in the sweep (answers a budget after the snapshot)
QLM_VARIANTS: dict[str, Callable[[], BasePolicy]] = {
    "qlm": lambda: QlmPolicy(answer_at_budget=True),
    "qlm without placement": lambda: QlmPolicy(answer_at_budget=True, placement=False),
    "qlm, mean-value programs": lambda: QlmPolicy(answer_at_budget=True, milp_scenarios=1),
}


class Foresight(HeuristicPolicy):
    """The look-ahead heuristic told the true arrivals of the next window."""

    def __init__(self, requests: list[Request]) -> None:
        super().__init__(look_ahead=True)
        self._requests = sorted(requests, key=lambda r: (r.arrival_s, r.id))
        self._times = np.array([r.arrival_s for r in self._requests])

    def plan(self, snapshot: QueueSnapshot, rng: np.random.Generator) -> Plan:
        window = snapshot.recent.window_s
        lo, hi = np.searchsorted(self._times, [snapshot.now_s, snapshot.now_s + window], "right")
        coming = tuple(
            r.model_copy(update={"arrival_s": r.arrival_s - window}) for r in self._requests[lo:hi]
        )  # repeat_window shifts them forward again
        return super().plan(replace(snapshot, recent=RecentArrivals(window, coming)), rng)


def run_cell(
    scenario: str,
    instances: int,
    load: float,
    seed: int,
    variant: str,
    placement: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One run (the instances starting with ``placement``'s models where given):
    attainment overall and per class, model changes, the run's length and wall time."""
    cluster = SCENARIOS[scenario].cluster(instances, placement)
    perf = ProfileStore.load().for_cluster(cluster)
    workload, _, _ = _workload(scenario, instances, load, SPAN_S, SLO_S)
    policy: BasePolicy = {
        "heuristic": HeuristicPolicy,
        "look-ahead": lambda: HeuristicPolicy(look_ahead=True),
        "foresight": lambda: Foresight(list(workload.requests)),
        **QLM_VARIANTS,
    }[variant]()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qlmctl-look-ahead-") as tmp:
        run_dir = Path(tmp) / "run"
        config = CoreConfig.for_policy(policy, improve=variant in QLM_VARIANTS)
        summary = run_simulated(workload, cluster, perf, policy, config, run_dir, seed)
        metrics = run_metrics(load_run(run_dir))
    return {
        "scenario": scenario,
        "instances": instances,
        "load": load,
        "seed": seed,
        "variant": variant,
        "attainment": summary.attainment,
        "by_class": {c: s.attainment for c, s in metrics.by_class.items()},
        "swaps": metrics.operations.swaps + metrics.operations.wakes,
        "duration_s": metrics.duration_s,
        "wall_s": time.perf_counter() - t0,
    }


def reference_cells(estimator: Path) -> list[tuple[str, int, float]]:
    """(scenario, instances, reference load) of each cell the policy sweep reported."""
    cells = json.loads(estimator.read_text())["policies"]
    out = []
    for key, cell in cells.items():
        m = re.fullmatch(r"(\S+) \((\d+)\)", key)
        assert m, f"unexpected cell name {key!r}"
        out.append((m[1], int(m[2]), float(cell["reference_load"])))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cells = reference_cells(RESULTS / "estimator.json")
    runs = [(*c, s, v) for c in cells for s in range(args.seeds) for v in VARIANTS]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_cell, *zip(*runs, strict=True)))
    wall_s = time.perf_counter() - t0
    table: list[dict[str, Any]] = []
    for scenario, instances, load in cells:
        mine = [r for r in rows if (r["scenario"], r["instances"]) == (scenario, instances)]
        mean = {
            v: 100 * float(np.mean([r["attainment"] for r in mine if r["variant"] == v]))
            for v in VARIANTS
        }
        table.append({"cell": f"{scenario} ({instances})", "load": load, **mean})
    lines = [
        "# Planning around the coming arrivals (`benchmarks/look_ahead.py`)",
        "",
        f"`heuristic` at each reference load, mean of {args.seeds} seeds, SLO attainment in %"
        f" ({wall_s / 60:.1f} min on {args.jobs} processes).",
        "",
        "| cell | load | heuristic | look-ahead | foresight | look-ahead - heuristic |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for t in table:
        lines.append(
            f"| {t['cell']} | {t['load']:g} | {t['heuristic']:.1f} | {t['look-ahead']:.1f} | "
            f"{t['foresight']:.1f} | {t['look-ahead'] - t['heuristic']:+.1f} |"
        )
    result = {"seeds": args.seeds, "wall_s": wall_s, "cells": table, "runs": rows}
    write_report(args.out, "look_ahead", "\n".join(lines) + "\n", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
