"""Do two checkouts simulate the same runs? Request outcomes of fixed simulated runs.

Replays three cells of the policy benchmark (A-mixed on 4 instances at 2x capacity,
B-multimodel on 8 at 2x, C-longprompt on 4 at 2.5x; 45 s of arrivals each) with every
policy through ``run_simulated`` (improver off, so every run is deterministic) and saves
each run's requests table and its operations (without the solver's wall-clock times).
``--check DIR`` compares against tables saved by another checkout and exits 1 on any
difference: a speed-up must leave them identical.

Usage (from the repository root)::

    PYTHONPATH=OLD python benchmarks/sim_identity.py --outcomes /tmp/before
    python benchmarks/sim_identity.py --outcomes /tmp/after --check /tmp/before
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

from benchmarks.policies.scenarios import SCENARIOS, build_point, slo_classes
from qlmctl.plan.policies import make_policy
from qlmctl.profile.store import ProfileStore
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.runlog import read_run
from qlmctl.serve.sim_driver import run_simulated

CELLS = (("A-mixed", 4, 2.0), ("B-multimodel", 8, 2.0), ("C-longprompt", 4, 2.5))
POLICIES = ("fcfs", "edf", "priority", "heuristic", "qlm")
SPAN_S = 45.0


def save_runs(out: Path) -> list[str]:
    """Run every cell and policy; write ``<cell>-<policy>[-ops].parquet`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for scenario, n, load in CELLS:
        sc = SCENARIOS[scenario]
        cluster = sc.cluster(n)
        perf = ProfileStore.load().for_cluster(cluster)
        workload, _, _ = build_point(sc, cluster, perf, load, SPAN_S, slo_classes())
        for name in POLICIES:
            policy = make_policy(name)
            config = CoreConfig.for_policy(policy, improve=False)
            with tempfile.TemporaryDirectory(prefix="qlmctl-identity-") as tmp:
                run_simulated(workload, cluster, perf, policy, config, Path(tmp) / "r")
                log = read_run(Path(tmp) / "r")
            base = f"{scenario}-{name}"
            requests = log.requests.sort_values(["request_id", "attempt"])
            requests.to_parquet(out / f"{base}.parquet", index=False)
            ops = log.operations.drop(columns=["duration_s"])  # solver wall time (older logs)
            ops["detail"] = ops["detail"].map(_without_wall_times)
            ops.to_parquet(out / f"{base}-ops.parquet", index=False)
            names += [base, f"{base}-ops"]
            print(f"{base}: {len(requests)} attempts, {len(ops)} operations", flush=True)
    return names


def _without_wall_times(detail: str | None) -> str | None:
    """An operation's detail without the solver's wall-clock times (older logs have them)."""
    if detail is None:
        return None
    d = json.loads(detail)
    d.pop("build_s", None)
    d.pop("solve_s", None)
    return json.dumps(d, sort_keys=True)


def differences(new: Path, old: Path) -> str | None:
    """What differs between two saved tables (None: identical). Columns only the new
    table has (a log column added since) are left out; a column it lost is a difference."""
    a, b = pd.read_parquet(new), pd.read_parquet(old)
    lost = [c for c in b.columns if c not in a.columns]
    if lost or len(a) != len(b):
        return f"shape {a.shape} vs {b.shape}" + (f", no columns {lost}" if lost else "")
    cols = [c for c in b.columns if not ((a[c] == b[c]) | (a[c].isna() & b[c].isna())).all()]
    return f"columns {cols} differ" if cols else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outcomes", type=Path, required=True, help="save the tables here")
    ap.add_argument("--check", type=Path, help="compare with tables saved here")
    args = ap.parse_args()
    names = save_runs(args.outcomes)
    if args.check is None:
        return 0
    bad = 0
    for name in names:
        diff = differences(args.outcomes / f"{name}.parquet", args.check / f"{name}.parquet")
        print(f"{name}: {'identical' if diff is None else 'DIFFERENT: ' + diff}")
        bad += diff is not None
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
