"""Fidelity of the simulated engine: the same workload and policy, simulated and real.

Give it two run directories of one workload, one served by real vLLM (``--engine vllm``)
and one simulated (``--engine sim``) with the same profile; it matches requests by id and
prints the median and p90 relative error of the simulated TTFT and end-to-end latency
against the measured ones (target: within 10 %), plus both runs' attainment.

    qlmctl demo --policies fcfs                  # real vLLM-CPU
    qlmctl demo --policies fcfs --engine sim     # the same, simulated
    .venv/bin/python benchmarks/sim_fidelity.py .qlmctl-demo/runs/*-fcfs-vllm \\
        .qlmctl-demo/runs/*-fcfs-sim
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from qlmctl.report.metrics import request_table
from qlmctl.report.runs import load_run


def relative_errors(real: pd.DataFrame, sim: pd.DataFrame, column: str) -> np.ndarray:
    """|sim - real| / real per request, for requests finished in both runs."""
    both = pd.concat({"real": real[column], "sim": sim[column]}, axis=1, join="inner").dropna()
    truth = both["real"].to_numpy()
    return np.abs(both["sim"].to_numpy() - truth) / np.maximum(truth, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("real", type=Path, help="run directory of the real-vLLM run")
    parser.add_argument("sim", type=Path, help="run directory of the simulated run")
    args = parser.parse_args()
    runs = {name: load_run(path) for name, path in (("real", args.real), ("sim", args.sim))}
    if runs["real"].meta.get("workload_fingerprint") != runs["sim"].meta.get(
        "workload_fingerprint"
    ):
        raise SystemExit("the two runs replayed different workloads")
    tables = {name: request_table(run) for name, run in runs.items()}  # indexed by request id
    for name, table in tables.items():
        print(f"{name}: {len(table)} requests, attainment {table['met'].mean():.3f}")
    for column, label in (("ttft_s", "TTFT"), ("e2e_s", "end-to-end")):
        err = relative_errors(tables["real"], tables["sim"], column)
        print(
            f"{label:>10}: median relative error {np.median(err):6.1%}, "
            f"p90 {np.quantile(err, 0.9):6.1%} over {len(err)} requests (target 10 %)"
        )


if __name__ == "__main__":
    main()
