"""The prefill ceiling: its LP on hand-checked cases, and no simulated run above it."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.policies.ceiling import prefill_ceiling, seconds_per_token
from qlmctl.plan.policies import make_policy
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.sim_driver import run_simulated
from qlmctl.workload import Workload
from tests.helpers import SLO_CLASSES, make_cluster, make_perf, make_requests


def test_a_token_costs_the_best_step_size_share_of_a_step() -> None:
    linear = make_perf(step_base_s=0.01, prefill_s_per_token=1e-4, max_num_batched_tokens=2048)
    assert seconds_per_token(linear) == pytest.approx(0.01 / 2048 + 1e-4)  # the largest step
    # a quadratic term: the best step has sqrt(1000 * base / b) = 1000 tokens
    curved = make_perf(step_base_s=0.01, prefill_s_per_token=1e-4, prefill_s_per_token2=1e-5)
    assert seconds_per_token(curved) == pytest.approx(0.01 / 1000 + 1e-4 + 1e-5)


def _burst(prompts: list[int]) -> Workload:
    base = make_requests(len(prompts), gap_s=0.0)
    reqs = [r.model_copy(update={"prompt_tokens": p}) for r, p in zip(base, prompts, strict=True)]
    return Workload.from_requests(reqs, SLO_CLASSES, "burst")


@pytest.mark.parametrize(
    ("instances", "overhead_s", "on_time"),
    [
        # 10k tokens/s; arriving at 0 with 20 s targets, in 0.5 s buckets the window is
        # [0, 20.5): 205k tokens, the two short prompts (150k) and 55 % of the third
        (1, 0.0, 2.55),
        (2, 0.0, 3.0),  # 410k: all of them
        (1, 5.0, 2.05),  # the first token reaches the client 5 s after the prefill
    ],
)
def test_the_lp_keeps_the_shortest_prompts_that_fit_their_window(
    instances: int, overhead_s: float, on_time: float
) -> None:
    perf = make_perf(step_base_s=0.0, ttft_overhead_s=overhead_s)
    cluster = make_cluster(instances, models=("m1",))
    ceiling = prefill_ceiling(
        _burst([100_000, 50_000, 100_000]), cluster, {("m1", "G"): perf}, bucket_s=0.5
    )
    assert ceiling == pytest.approx(on_time / 3)


@pytest.mark.parametrize("policy", ["fcfs", "edf", "heuristic"])
def test_no_simulated_run_beats_the_ceiling(policy: str, tmp_path: Path) -> None:
    # 60 prompts of 8k tokens in 3 s on one instance: about half can be in time
    reqs = make_requests(60, gap_s=0.05, prompt_tokens=8000, output_tokens=20)
    workload = Workload.from_requests(reqs, SLO_CLASSES, "burst")
    cluster = make_cluster(1, models=("m1",))
    perf = {("m1", "G"): make_perf()}
    ceiling = prefill_ceiling(workload, cluster, perf)
    p = make_policy(policy)
    summary = run_simulated(
        workload, cluster, perf, p, CoreConfig.for_policy(p, improve=False), tmp_path / "run"
    )
    assert 0.3 < ceiling < 0.7  # the burst is over what one instance prefills in time
    assert 0.0 < summary.attainment <= ceiling
