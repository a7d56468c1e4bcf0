"""How much the model each instance holds decides: E-twomodels at its reference load.

How it works: the cell ``E-twomodels (4)`` (two models whose traffic moves independently,
every instance may serve either; :mod:`benchmarks.policies.scenarios`) at the reference
load its sweep found (``--cells E-twomodels:4``, written to ``--sweep``), each seed, with
the ``heuristic`` planner (deterministic per seed, so differences on one seed are exact):

* ``round robin``: as in the sweep (the instances start with the two models in turn);
* every other start (each instance starting with either model, both models held by
  some): what the first-stage decision is worth if it were taken once, at the start;
* ``look-ahead`` and ``foresight`` (:mod:`benchmarks.look_ahead`) from round robin:
  whether planning around the coming arrivals, or knowing them, makes the planner move
  models;
* ``qlm`` from round robin, as in the sweep (its answers a budget after each snapshot),
  without its placement program, and with both programs on the mean-value scenario
  (``milp_scenarios=1``): what the first stage and its scenarios are worth.

Prints attainment, model changes and the run's length per variant and writes
``benchmarks/results/model_placement.{json,md}``.

Usage: .venv/bin/python -m benchmarks.model_placement [--seeds 3] [--jobs 2]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import write_report
from benchmarks.look_ahead import QLM_VARIANTS, reference_cells, run_cell
from benchmarks.policies.scenarios import SCENARIOS

RESULTS = Path(__file__).resolve().parent / "results"
CELL = ("E-twomodels", 4)
ROUND_ROBIN = "round robin"


def starts(models: tuple[str, ...], instances: int) -> list[tuple[str, ...]]:
    """Every start that holds each model on some instance."""
    return [p for p in itertools.product(models, repeat=instances) if set(p) == set(models)]


def label(placement: tuple[str, ...]) -> str:
    """A start as the first letters of its models, instance by instance (``llmm``)."""
    return "".join(m[0] for m in placement)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--sweep", type=Path, default=RESULTS / "e-twomodels")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    scenario, instances = CELL
    estimator = args.sweep / "estimator.json"
    if not estimator.is_file():
        print(
            f"no sweep of {scenario} in {args.sweep}: run `python -m benchmarks.policies "
            f"--no-real --cells {scenario}:{instances} --out {args.sweep}` first",
            file=sys.stderr,
        )
        return 2
    [(_, _, load)] = reference_cells(estimator)
    default = SCENARIOS[scenario].cluster(instances).instances
    round_robin = tuple(str(i.model) for i in default)
    variants: list[tuple[str, str, tuple[str, ...]]] = [
        (ROUND_ROBIN, "heuristic", ()),
        ("look-ahead", "look-ahead", ()),
        ("foresight", "foresight", ()),
        *((name, name, ()) for name in QLM_VARIANTS),
    ] + [
        (label(p), "heuristic", p)
        for p in starts(SCENARIOS[scenario].models, instances)
        if p != round_robin
    ]
    runs = [(name, v, p, s) for name, v, p in variants for s in range(args.seeds)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_cell, scenario, instances, load, s, v, p) for _, v, p, s in runs]
        rows = [{**f.result(), "name": name} for f, (name, *_) in zip(futures, runs, strict=True)]
    wall_s = time.perf_counter() - t0
    table: list[dict[str, Any]] = []
    for name, _, _ in variants:
        mine = [r for r in rows if r["name"] == name]
        table.append(
            {
                "start": name,
                "attainment": 100 * float(np.mean([r["attainment"] for r in mine])),
                **{
                    c: 100 * float(np.mean([r["by_class"][c] for r in mine]))
                    for c in ("interactive", "batch-1")
                },
                "swaps": float(np.mean([r["swaps"] for r in mine])),
                "duration_s": float(np.mean([r["duration_s"] for r in mine])),
            }
        )
    lines = [
        "# How much the model each instance holds decides (`benchmarks/model_placement.py`)",
        "",
        f"{scenario} ({instances}) at its reference load {load:g}x, `heuristic` unless "
        f"named, mean of "
        f"{args.seeds} seeds, SLO attainment in % ({wall_s / 60:.1f} min on {args.jobs} "
        "processes). A start names each instance's first model in order (a100-0, a100-1, "
        f"a10-2, a10-3; {label(round_robin)} is round robin): l = {round_robin[0]}, "
        f"m = {round_robin[1]}.",
        "",
        "| start | attainment | interactive | batch-1 | model changes | run length s |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for t in sorted(table, key=lambda t: -t["attainment"]):
        lines.append(
            f"| {t['start']} | {t['attainment']:.1f} | {t['interactive']:.1f} | "
            f"{t['batch-1']:.1f} | {t['swaps']:.1f} | {t['duration_s']:.0f} |"
        )
    result = {"cell": list(CELL), "load": load, "seeds": args.seeds, "wall_s": wall_s}
    result |= {"variants": table, "runs": rows}
    write_report(args.out, "model_placement", "\n".join(lines) + "\n", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
