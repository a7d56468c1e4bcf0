"""Shared by the plan-then-run tests: a demo-like batch, its cluster, the order checks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from qlmctl.demo import DEMO_WORKLOAD, demo_cluster, demo_profile
from qlmctl.plan.types import Plan
from qlmctl.specs import dump_spec
from qlmctl.workload import Workload, load_workload
from qlmctl.workload.parquet import write_workload


def demo_batch(tmp_path: Path, n: int, at_zero: bool = True, name: str = "batch") -> Path:
    """The first ``n`` requests of the demo workload as Parquet (all queued at t=0 by
    default: a Batch file), and the demo's ``tiny@cpu`` profile in ``tmp_path/profiles``."""
    wl = load_workload(DEMO_WORKLOAD)
    reqs = wl.requests[:n]
    if at_zero:
        reqs = tuple(r.model_copy(update={"arrival_s": 0.0}) for r in reqs)
    path = tmp_path / f"{name}.parquet"
    write_workload(Workload.from_requests(reqs, wl.slo_classes, str(path)), path)
    demo_profile(tmp_path / "profiles")
    return path


def sim_cluster(tmp_path: Path, ports: Sequence[int] = (18001, 18002, 18003)) -> Path:
    """The demo's two instances as a cluster spec (launched; the simulator never starts them)."""
    path = tmp_path / "cluster.yaml"
    dump_spec(demo_cluster(tmp_path / "models", ports), path)
    return path


def first_dispatches(requests: pd.DataFrame) -> pd.DataFrame:
    """Attempt 0 of every request that was dispatched: id, instance, dispatch time."""
    first = requests[(requests["attempt"] == 0) & requests["dispatch_s"].notna()]
    return first.set_index("request_id")[["instance_id", "dispatch_s"]]


def order_violations(plan: Plan, requests: pd.DataFrame) -> list[str]:
    """Requests not first dispatched on their planned instance, or dispatched before a
    request planned ahead of them on it (for a batch queued at t=0: plan order)."""
    first = first_dispatches(requests)
    bad = []
    for ip in plan.instances:
        last = -1.0
        for g in ip.groups:
            for r in g.request_ids:
                if r not in first.index:
                    bad.append(f"{r}: never dispatched")
                    continue
                inst, t = first.at[r, "instance_id"], float(first.at[r, "dispatch_s"])
                if inst != ip.instance_id:
                    bad.append(f"{r}: planned on {ip.instance_id}, ran on {inst}")
                elif t < last:
                    bad.append(f"{r}: dispatched at {t:.3f} before one planned ahead ({last:.3f})")
                last = max(last, t)
    return bad
