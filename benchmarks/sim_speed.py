"""How fast the simulated engine replays a real trace: the one-hour Azure conversation trace.

Builds one Request per trace row (model llama-3.1-8b, one SLO class, the trace's true
output length), then replays them in virtual time on 8 A100 instances with the shipped
default profile and a minimal FCFS dispatcher (each arrival goes to the instance with the
fewest outstanding requests). Prints wall time, simulated span, speed-up over real time,
requests finished, and mean / p90 TTFT. Target: under 5 s (above 700x real time).

Usage: .venv/bin/python benchmarks/sim_speed.py [TRACE_CSV] [--instances N] [--profile]
(default trace: the azure-2023-conv dataset, installed by ``qlmctl workload fetch``)
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import pstats
import statistics
import time
from datetime import datetime
from pathlib import Path

from qlmctl.domain import ClusterSpec, Request
from qlmctl.engine.events import EngineEvent, Finished, FirstToken
from qlmctl.engine.sim import SimEngine
from qlmctl.profile.store import ProfileStore
from qlmctl.workload.datasets import installed_path

MODEL, GPU = "llama-3.1-8b", "A100"


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
                {"id": f"a100-{k}", "gpu": GPU, "endpoint": f"http://sim:{k}", "model": MODEL}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", type=Path)
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="print the cProfile top 15")
    args = parser.parse_args()
    args.trace = args.trace or installed_path("azure-2023-conv")
    load_start = time.perf_counter()
    requests = read_trace(args.trace)
    cluster = make_cluster(args.instances)
    load_s = time.perf_counter() - load_start
    profiler = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    figures = replay(requests, cluster)
    if profiler:
        profiler.disable()
    wall_s = time.perf_counter() - start
    print(f"trace: {args.trace.name}, {len(requests)} requests, {args.instances} x {GPU} {MODEL}")
    print(f"load + build requests: {load_s:.2f} s")
    print(f"simulation wall time: {wall_s:.2f} s (target < 5 s)")
    print(f"simulated span: {figures['span_s']:.0f} s")
    print(f"speed-up over real time: {figures['span_s'] / wall_s:.0f}x (target > 700x)")
    print(f"finished: {figures['finished']:.0f} / {len(requests)}")
    mean_ms, p90_ms = figures["ttft_mean_s"] * 1000, figures["ttft_p90_s"] * 1000
    print(f"TTFT mean {mean_ms:.0f} ms, p90 {p90_ms:.0f} ms")
    print(f"preemptions: {figures['preemptions']:.0f}")
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(15)


if __name__ == "__main__":
    main()
