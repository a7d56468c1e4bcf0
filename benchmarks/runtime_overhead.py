"""Runtime overhead of the serving core: dispatch throughput and per-decision latency.

The engine here does nothing: every dispatched request gets its first token and finishes
at the same instant, so all wall time is the core's own (events, virtual queues, re-plans
by the policy, run-log rows). Arrivals come faster than any policy re-plans (virtual
time), so re-plans see large queues, as under a burst.

Target: at least 2,000 requests/s through the core on one CPU core.

    .venv/bin/python benchmarks/runtime_overhead.py [--requests N] [--policies fcfs,heuristic]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from qlmctl.domain import ClusterSpec, Request, SLOClass
from qlmctl.engine.events import Dispatch, EngineEvent, Finished, FirstToken
from qlmctl.perfmodel import PerfModel
from qlmctl.plan.policies import make_policy
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.core import ServeCore

SLO = {
    "interactive": SLOClass(name="interactive", ttft_s=20, priority=0),
    "batch": SLOClass(name="batch", ttft_s=600, priority=10),
}


def cluster(instances: int) -> ClusterSpec:
    return ClusterSpec.model_validate(
        {
            "gpu_types": [{"name": "G"}],
            "models": [{"name": "m1", "path": "/m1"}, {"name": "m2", "path": "/m2"}],
            "instances": [
                {
                    "id": f"i{k}",
                    "gpu": "G",
                    "endpoint": f"http://h:{k + 1}",
                    "model": f"m{k % 2 + 1}",
                }
                for k in range(instances)
            ],
        }
    )


def perf(model: str) -> PerfModel:
    return PerfModel(
        model=model, gpu="G", step_base_s=0.01, prefill_s_per_token=1e-4,
        prefill_s_per_token2=0.0, decode_s_per_seq=1e-4, decode_s_per_ctx_token=0.0,
        kv_capacity_tokens=1_000_000, max_num_seqs=64, max_num_batched_tokens=4096,
        cold_start_s=20.0, stop_s=2.0,
    )  # fmt: skip


def requests(n: int, rate_per_s: float, rng: np.random.Generator) -> list[Request]:
    out = []
    for k in range(n):
        out.append(
            Request(
                id=f"r{k}", arrival_s=k / rate_per_s, model=f"m{k % 2 + 1}",
                slo_class="batch" if rng.random() < 0.3 else "interactive",
                prompt_tokens=int(rng.integers(50, 500)), max_output_tokens=200,
                output_tokens=int(rng.integers(10, 200)),
            )
        )  # fmt: skip
    return out


def run(
    policy: str, n: int, instances: int, rate_per_s: float, replan_s: float
) -> dict[str, float]:
    rng = np.random.default_rng(0)
    reqs = requests(n, rate_per_s, rng)
    core = ServeCore(
        cluster(instances), SLO, {(m, "G"): perf(m) for m in ("m1", "m2")},
        make_policy(policy), CoreConfig(improve=False, replan_min_interval_s=replan_s),
        np.random.default_rng(0),
    )  # fmt: skip
    decide_s: list[float] = []
    pending: list[EngineEvent] = []
    t, k, rows = 0.0, 0, 0
    start = time.perf_counter()
    while not (k == n and core.done):
        if not pending:
            nxt = min(reqs[k].arrival_s if k < n else math.inf, core.next_wakeup_s() or math.inf)
            t = max(t, nxt)
        while k < n and reqs[k].arrival_s <= t:
            core.on_arrival(reqs[k], t)
            k += 1
        for ev in pending:
            core.on_event(ev, t)
        pending = []
        t0 = time.perf_counter()
        actions = core.decide(t)
        decide_s.append(time.perf_counter() - t0)
        for a in actions:
            if isinstance(a, Dispatch):
                pending += [
                    FirstToken(a.request_id, a.instance_id, t),
                    Finished(a.request_id, a.instance_id, t, 1),
                ]
        attempts, ops = core.take_log()
        rows += len(attempts) + len(ops)
    wall = time.perf_counter() - start
    lat = np.array(decide_s) * 1e6
    return {
        "requests": n,
        "wall_s": wall,
        "req_per_s": n / wall,
        "decisions": len(lat),
        "decide_p50_us": float(np.percentile(lat, 50)),
        "decide_p99_us": float(np.percentile(lat, 99)),
        "decide_max_ms": float(lat.max() / 1000),
        "replans": core.stats().operations.get("replan", 0),
        "log_rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--rate", type=float, default=2_000.0, help="arrivals per virtual second")
    ap.add_argument("--policies", default="fcfs,heuristic,qlm")
    ap.add_argument("--replan-interval", type=float, default=0.5, help="virtual seconds")
    args = ap.parse_args()
    cols = ["policy", "requests", "wall_s", "req_per_s", "decisions", "decide_p50_us",
            "decide_p99_us", "decide_max_ms", "replans"]  # fmt: skip
    print(" | ".join(cols))
    for policy in args.policies.split(","):
        r = run(policy, args.requests, args.instances, args.rate, args.replan_interval)
        cells = [policy] + [
            f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols[1:]
        ]
        print(" | ".join(cells))
    print("target: >= 2,000 req/s on one core (zero-latency engine; re-plans included)")


if __name__ == "__main__":
    main()
