"""Print how long workloads take to build, materialise and load back.

Run: ``.venv/bin/python -m benchmarks.workload_load``. Target: the 19,366-row Azure
conversation trace becomes Request objects in well under a second or two.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from qlmctl.workload import load_workload, summarise, write_workload

REPO = Path(__file__).resolve().parents[1]
SPECS = ["azure-conv", "azure-mixed", "synthetic-bursty", "demo"]


def main() -> None:
    """Time spec build, Parquet write, Parquet load and summary for each shipped spec."""
    print(f"{'spec':18} {'requests':>9} {'build s':>8} {'write s':>8} {'load s':>7} {'show s':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in SPECS:
            t0 = time.perf_counter()
            workload = load_workload(REPO / "workloads" / f"{name}.yaml")
            t1 = time.perf_counter()
            out = Path(tmp) / f"{name}.parquet"
            write_workload(workload, out)
            t2 = time.perf_counter()
            back = load_workload(out)
            t3 = time.perf_counter()
            summarise(back)
            t4 = time.perf_counter()
            assert back.fingerprint == workload.fingerprint
            print(
                f"{name:18} {len(workload.requests):>9} {t1 - t0:>8.3f} {t2 - t1:>8.3f} "
                f"{t3 - t2:>7.3f} {t4 - t3:>7.3f}"
            )


if __name__ == "__main__":
    main()
