"""The planner's engine model against the simulated engine it stands in for.

One instance, a burst of requests of known lengths (the clairvoyant planner): the
dispatch each request's first forecast predicts must match when the simulator's engine
actually took it, over a wait of minutes. The fluid model it replaced missed this by a
wide margin (it waited for the whole batch to drain before the queue moved).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from qlmctl.domain import Request, SLOClass
from qlmctl.plan.policies import make_policy
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.sim_driver import run_simulated
from qlmctl.workload import Workload
from tests.helpers import make_cluster, make_perf

SLO = {"batch": SLOClass(name="batch", ttft_s=3600, priority=1)}


def burst(n: int, seed: int) -> Workload:
    """``n`` requests at t=0 with mixed prompt and output lengths."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(50, 3000, n)
    outputs = np.clip(np.exp(np.log(150) + 0.8 * rng.standard_normal(n)), 2, 1500).astype(int)
    reqs = [
        Request(
            id=f"r{k:03d}",
            arrival_s=0.0,
            model="m1",
            slo_class="batch",
            prompt_tokens=int(p),
            max_output_tokens=int(o),
            output_tokens=int(o),
        )
        for k, (p, o) in enumerate(zip(prompts, outputs, strict=True))
    ]
    return Workload.from_requests(reqs, SLO, "burst")


def dispatch_errors(tmp: Path, workload: Workload, max_num_seqs: int) -> pd.DataFrame:
    cluster = make_cluster(1, models=("m1",))
    perf = {("m1", "G"): make_perf("m1", max_num_seqs=max_num_seqs, prefill_s_per_token2=1e-6)}
    policy = make_policy("heuristic", clairvoyant=True)
    run_simulated(workload, cluster, perf, policy, CoreConfig(improve=False), tmp / "run", 0)
    reqs = pd.read_parquet(tmp / "run" / "requests.parquet")
    reqs = reqs[reqs["attempt"] == 0]
    return pd.DataFrame(
        {"error": reqs["dispatch_s"] - reqs["predicted_start_s"], "wait": reqs["dispatch_s"]}
    )


def test_forecast_dispatch_matches_the_simulated_engine(tmp_path: Path) -> None:
    for max_num_seqs, seed in ((16, 0), (64, 1)):
        frame = dispatch_errors(tmp_path / f"b{max_num_seqs}", burst(300, seed), max_num_seqs)
        wait = frame["wait"].median()
        assert wait > 20.0  # a real queue: most requests wait for a slot or the pipeline
        assert frame["error"].abs().median() <= 0.15 * wait
