"""How fast the simulator replays a real trace: the engine alone, and the full stack.

Engine leg: builds one Request per row of the one-hour Azure conversation trace (model
llama-3.1-8b, one SLO class, the trace's true output length), then replays them in
virtual time on 8 A100 instances with the shipped default profile and a minimal FCFS
dispatcher (each arrival goes to the instance with the fewest outstanding requests).
Target: under 5 s (above 700x real time).

Full-stack legs: what ``qlmctl serve --engine sim`` runs (the serving core, the policy,
the simulated engine, the Parquet run log; ``CoreConfig.for_policy(p, improve=False)``)
on the same trace and cluster, per policy, each run in a fresh process (so its peak
resident memory is its own):

* ``trace``: the trace as recorded (about 0.12x the cluster's estimated capacity);
  target >= 700x real time.
* ``overload``: the trace's times compressed to ``--overload`` (2.5) times the cluster's
  estimated capacity (:func:`benchmarks.policies.scenarios.capacity_rps`); target >= 200x
  real time and a peak RSS under 1 GiB.
* ``big`` (``--big``): about 100k requests (the trace repeated ``--big-copies`` times
  one hour apart, ids suffixed) at ``--big-overload`` (4) times capacity; it must finish.

It prints wall time, virtual span, their ratio, peak RSS and attainment per run and
writes ``benchmarks/results/sim_speed.{json,md}``. ``--outcomes DIR`` saves each run's
request outcomes; ``--check DIR`` compares against outcomes saved earlier (by an older
checkout: ``PYTHONPATH=OLD python benchmarks/sim_speed.py --outcomes DIR``) and fails on
any difference.

By default (a few minutes) the overload leg replays the trace's first 5,000 requests
and the policies are fcfs, heuristic and qlm; ``--full`` runs what the targets name:
every policy, the whole trace at overload, and the big leg (long: see the results file).

Usage: .venv/bin/python benchmarks/sim_speed.py [TRACE_CSV] [--instances N] [--profile]
       [--legs engine,trace,overload] [--policies fcfs,heuristic,qlm] [--big] [--full]
(default trace: the azure-2023-conv dataset, installed by ``qlmctl workload fetch``)
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import json
import multiprocessing
import pstats
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.policies.scenarios import capacity_rps
from qlmctl.domain import ClusterSpec, Request, SLOClass
from qlmctl.engine.events import EngineEvent, Finished, FirstToken
from qlmctl.engine.sim import SimEngine
from qlmctl.fileio import atomic_write_text
from qlmctl.plan.policies import make_policy
from qlmctl.profile.store import ProfileStore
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.runlog import read_run
from qlmctl.serve.sim_driver import run_simulated
from qlmctl.workload import Workload
from qlmctl.workload.datasets import installed_path

MODEL, GPU = "llama-3.1-8b", "A100"
SLO = SLOClass(name="batch-1", ttft_s=60.0)
RESULTS = Path(__file__).resolve().parent / "results"


def read_trace(path: Path) -> list[Request]:
    """One request per row of an Azure LLM inference trace (TIMESTAMP, Context, Generated)."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    stamps = [datetime.fromisoformat(r["TIMESTAMP"][:26]) for r in rows]
    t0 = min(stamps)
    return [
        Request(
            id=f"r{k}",
            arrival_s=(stamp - t0).total_seconds(),
            model=MODEL,
            slo_class="default",
            prompt_tokens=int(row["ContextTokens"]),
            max_output_tokens=int(row["GeneratedTokens"]),
            output_tokens=int(row["GeneratedTokens"]),
        )
        for k, (row, stamp) in enumerate(zip(rows, stamps, strict=True))
    ]


def make_cluster(num_instances: int) -> ClusterSpec:
    """``num_instances`` A100 instances serving llama-3.1-8b."""
    return ClusterSpec.model_validate(
        {
            "gpu_types": [{"name": GPU}],
            "models": [{"name": MODEL, "path": "meta-llama/Llama-3.1-8B-Instruct"}],
            "instances": [
                {
                    "id": f"a100-{k}",
                    "gpu": GPU,
                    "endpoint": f"http://sim:{k}",
                    "model": MODEL,
                }
                for k in range(num_instances)
            ],
        }
    )


def replay(requests: list[Request], cluster: ClusterSpec) -> dict[str, float]:
    """Drive a SimEngine through ``requests`` with least-outstanding FCFS dispatch."""
    engine = SimEngine(cluster, ProfileStore.load(None).for_cluster(cluster))
    ids = [inst.id for inst in cluster.instances]
    outstanding = dict.fromkeys(ids, 0)
    placed: dict[str, str] = {}
    arrival = {r.id: r.arrival_s for r in requests}
    ttft: list[float] = []
    finished = 0

    def handle(events: list[EngineEvent]) -> None:
        nonlocal finished
        for ev in events:
            if isinstance(ev, FirstToken):
                ttft.append(ev.time_s - arrival[ev.request_id])
            elif isinstance(ev, Finished):
                finished += 1
                outstanding[placed.pop(ev.request_id)] -= 1

    for req in requests:
        handle(engine.advance(req.arrival_s))
        target = min(ids, key=outstanding.__getitem__)
        outstanding[target] += 1
        placed[req.id] = target
        engine.submit(req, target, 0, req.arrival_s)
    end_s = requests[-1].arrival_s
    while (t := engine.next_event_time()) is not None:
        end_s = t
        handle(engine.advance(t))
    ttft.sort()
    return {
        "span_s": end_s,
        "finished": finished,
        "ttft_mean_s": statistics.fmean(ttft),
        "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
        "preemptions": engine.num_preemptions,
    }


def trace_workload(requests: list[Request], time_scale: float = 1.0, copies: int = 1) -> Workload:
    """The trace as a workload of one class (TTFT 60 s), times multiplied by ``time_scale``;
    ``copies`` > 1 repeats it, each copy one trace span later (ids suffixed ``-k``)."""
    span = requests[-1].arrival_s + 1.0
    reqs = [
        r.model_copy(
            update={
                "id": r.id if copies == 1 else f"{r.id}-{k}",
                "arrival_s": (r.arrival_s + k * span) * time_scale,
                "slo_class": SLO.name,
            }
        )
        for k in range(copies)
        for r in requests
    ]
    return Workload.from_requests(reqs, {SLO.name: SLO}, "azure-2023-conv")


def capacity_scale(requests: list[Request], cluster: ClusterSpec, load: float) -> float:
    """The time scale at which the trace offers ``load`` x the cluster's estimated capacity."""
    wl = trace_workload(requests)
    cap = capacity_rps(wl, cluster, ProfileStore.load(None).for_cluster(cluster))
    rate = len(requests) / requests[-1].arrival_s
    return rate / (load * cap)


def run_full(
    workload: Workload,
    cluster: ClusterSpec,
    policy: str,
    outcomes: Path | None,
    profile: bool,
) -> dict[str, Any]:
    """``serve --engine sim`` on ``workload``: wall time, virtual span, peak RSS, outcome.

    Meant to run in a fresh process (see :func:`in_child`): the peak RSS is the process's.
    """
    perf = ProfileStore.load(None).for_cluster(cluster)
    chosen = make_policy(policy)
    config = CoreConfig.for_policy(chosen, improve=False)
    profiler = cProfile.Profile() if profile else None
    with tempfile.TemporaryDirectory(prefix="qlmctl-speed-") as tmp:
        run_dir = Path(tmp) / "run"
        start, cpu_start = time.perf_counter(), time.process_time()
        if profiler:
            profiler.enable()
        summary = run_simulated(workload, cluster, perf, chosen, config, run_dir)
        if profiler:
            profiler.disable()
        wall_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        if outcomes is not None:
            requests = read_run(run_dir).requests
            outcomes.parent.mkdir(parents=True, exist_ok=True)
            requests.sort_values(["request_id", "attempt"]).to_parquet(outcomes, index=False)
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    return {
        "policy": policy,
        "requests": summary.requests,
        "wall_s": wall_s,
        "span_s": summary.duration_s,
        "speedup": summary.duration_s / wall_s,
        "cpu_s": cpu_s,  # CPU time: what a shared, busy machine distorts least
        "cpu_speedup": summary.duration_s / cpu_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "attainment": summary.attainment,
        "finished": summary.finished,
    }


def in_child(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a fresh process (spawned: nothing inherited, its own peak RSS)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def check_outcomes(new: Path, old: Path) -> list[str]:
    """Differences between two saved request tables (empty: identical)."""
    a, b = pd.read_parquet(new), pd.read_parquet(old)
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return [f"shape {a.shape} vs {b.shape}"]
    diffs = []
    for col in a.columns:
        x, y = a[col], b[col]
        same = (x == y) | (x.isna() & y.isna())
        if not same.all():
            k = int((~same).to_numpy().nonzero()[0][0])
            diffs.append(
                f"{col}: {int((~same).sum())} rows differ, first {x.iloc[k]!r} vs {y.iloc[k]!r}"
            )
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", type=Path)
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="print cProfile tops")
    parser.add_argument("--legs", default="engine,trace,overload")
    parser.add_argument("--policies", default="fcfs,heuristic,qlm")
    parser.add_argument(
        "--full",
        action="store_true",
        help="the done-when runs: every policy, the whole trace at overload, the big leg",
    )
    parser.add_argument(
        "--overload-limit",
        type=int,
        default=5000,
        help="the overload leg replays the trace's first N requests (default 5000; --full: all)",
    )
    parser.add_argument("--overload", type=float, default=2.5, help="x estimated capacity")
    parser.add_argument("--big", action="store_true", help="add the ~100k-request leg")
    parser.add_argument("--big-copies", type=int, default=5)
    parser.add_argument("--big-overload", type=float, default=4.0)
    parser.add_argument("--outcomes", type=Path, help="save request outcomes here")
    parser.add_argument("--check", type=Path, help="compare outcomes to those saved here")
    parser.add_argument("--limit", type=int, help="only the trace's first LIMIT requests")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.full:
        args.policies, args.big, args.overload_limit = (
            "fcfs,edf,priority,heuristic,qlm",
            True,
            0,
        )
    args.trace = args.trace or installed_path("azure-2023-conv")
    legs = args.legs.split(",") + (["big"] if args.big else [])
    policies = args.policies.split(",")
    requests = read_trace(args.trace)[: args.limit]
    cluster = make_cluster(args.instances)
    print(f"trace: {args.trace.name}, {len(requests)} requests, {args.instances} x {GPU} {MODEL}")
    results: dict[str, Any] = {"instances": args.instances, "runs": []}
    if "engine" in legs:
        profiler = cProfile.Profile() if args.profile else None
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        figures = replay(requests, cluster)
        if profiler:
            profiler.disable()
        wall_s = time.perf_counter() - start
        speedup = figures["span_s"] / wall_s
        print(f"engine alone: {wall_s:.2f} s wall for {figures['span_s']:.0f} s virtual: "
              f"{speedup:.0f}x (target > 700x); finished {figures['finished']:.0f}; "
              f"TTFT mean {figures['ttft_mean_s'] * 1000:.0f} ms, "
              f"p90 {figures['ttft_p90_s'] * 1000:.0f} ms; "
              f"preemptions {figures['preemptions']:.0f}")  # fmt: skip
        results["engine"] = {"wall_s": wall_s, "speedup": speedup, **figures}
        if profiler:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(15)
    scales = {
        "trace": (1.0, 1, "as recorded", 700.0),
        "overload": (
            capacity_scale(requests, cluster, args.overload),
            1,
            f"{args.overload:g}x capacity",
            200.0,
        ),
        "big": (
            capacity_scale(requests, cluster, args.big_overload),
            args.big_copies,
            f"{args.big_copies} copies at {args.big_overload:g}x capacity",
            0.0,
        ),
    }
    failed: list[str] = []
    for leg in [g for g in legs if g in scales]:
        scale, copies, what, target = scales[leg]
        part = requests[: args.overload_limit or None] if leg == "overload" else requests
        if leg == "overload" and len(part) < len(requests):
            scale = capacity_scale(part, cluster, args.overload)
            what += f", first {len(part)} requests"
        workload = trace_workload(part, scale, copies)
        print(
            f"full stack, {leg} ({what}, time scale {scale:.4g}): {len(workload.requests)} requests"
        )
        for policy in policies:
            name = f"{leg}-{policy}"
            save = None
            if args.outcomes or args.check:
                save = (args.outcomes or Path(tempfile.mkdtemp())) / f"{name}.parquet"
            row = in_child(run_full, workload, cluster, policy, save, args.profile)
            row.update(leg=leg, load=what, target=target)
            results["runs"].append(row)
            ok = row["speedup"] >= target
            print(f"  {policy:10} {row['wall_s']:7.1f} s wall  {row['span_s']:7.0f} s virtual  "
                  f"{row['speedup']:6.0f}x (target {_target(target)}{'' if ok else ', MISSED'}; "
                  f"{row['cpu_speedup']:.0f}x per CPU second)  "
                  f"peak RSS {row['peak_rss_mib']:5.0f} MiB  attainment {row['attainment']:.3f}",
                  flush=True)  # fmt: skip
            if args.check is not None and save is not None:
                diffs = check_outcomes(save, args.check / f"{name}.parquet")
                print(
                    "    outcomes identical" if not diffs else "    DIFFERENT: " + "; ".join(diffs)
                )
                if diffs:
                    failed.append(name)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "sim_speed.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(args.out / "sim_speed.md", markdown(results) + "\n")
    print(f"wrote {args.out / 'sim_speed.json'} and {args.out / 'sim_speed.md'}")
    if failed:
        print(f"outcomes differ from {args.check}: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = [
        "# Simulator speed (virtual seconds per wall second)",
        "",
        "Regenerate: `.venv/bin/python benchmarks/sim_speed.py` (`--full`: every policy, the "
        "whole trace at overload and the ~100k-request leg).",
        "",
    ]
    engine = results.get("engine")
    if engine:
        lines += [
            f"Engine alone, one-hour Azure conversation trace on {results['instances']} A100: "
            f"{engine['wall_s']:.2f} s wall, {engine['speedup']:.0f}x real time.",
            "",
        ]
    lines += [
        "| leg | load | policy | requests | wall s | virtual s | x real time | target "
        "| peak RSS MiB | attainment |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['leg']} | {r['load']} | {r['policy']} | {r['requests']} | {r['wall_s']:.1f} | "
            f"{r['span_s']:.0f} | {r['speedup']:.0f} | {_target(r['target'])} | "
            f"{r['peak_rss_mib']:.0f} | {r['attainment']:.3f} |"
        )
    return "\n".join(lines)


def _target(speedup: float) -> str:
    """A leg's target: a speed-up, or (0) only that it finishes."""
    return f"{speedup:g}x" if speedup else "finish"


if __name__ == "__main__":
    sys.exit(main())
