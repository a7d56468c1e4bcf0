"""Benchmark scenarios: the QLM paper's three workload shapes on the public real traces.

How it works: a :class:`Scenario` is a workload spec (built in code, naming the public
datasets ``qlmctl workload fetch --all`` installs) plus a cluster of simulated instances
mixing A100 and A10 GPUs with the shipped default profiles. The shapes follow the paper (arXiv
2407.00047, W_A, W_B, W_C); they were chosen before any result was seen:

* ``A-mixed``: one model; the Azure code trace is the interactive class (TTFT 20 s), the
  Azure conversation trace is batch-1 (60 s), arXiv-summarisation lengths arriving as a
  Poisson stream are batch-2 (1 h).
* ``B-multimodel``: batch work only (conversation trace as batch-1, arXiv jobs as
  batch-2) over three models mapped by a stable hash of the request id; the 70B model
  (a 4-GPU tensor-parallel instance in its profile) runs on A100 instances only, so
  which model an instance holds, and swaps, matter.
* ``C-longprompt``: one model; interactive code-trace traffic beside arXiv-length jobs
  (prompts of about 2,600 tokens) with the batch-1 SLO.

Load: every point offers ``SPAN_S`` seconds of arrivals (virtual time) at a target
multiple of the cluster's *estimated* capacity (:func:`capacity_rps`, a fluid estimate
from the profiles: per request, prefill and decode seconds inside a full batch; per
instance, the inverse of the mean over the requests it may serve). The traces are read
from ``START_S`` on; the window is as long as needed for that span at that load, and
its times are scaled to fit the span, so overload lasts as long at every load and
cluster size. Load 1.0 is the estimate of saturation; the sweep runs to 2.5 times that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qlmctl.domain import ClusterSpec, SLOClass
from qlmctl.profile.perfmodel import PerfModel
from qlmctl.workload import Workload, WorkloadSpec, build_workload

REPO = Path(__file__).resolve().parents[2]
CODE = "azure-2023-code"  # datasets (qlmctl/workload/datasets.py)
CONV = "azure-2023-conv"
ARXIV = "arxiv-lengths"
START_S = 300.0  # seconds into the Azure clock (both traces active)
SPAN_S = 120.0  # virtual seconds of arrivals at every load
QUICK_SPAN_S = 45.0
_REF_WINDOW_S = 600.0  # trace seconds used for a first estimate of the natural load
ARXIV_RATE_PER_S = 0.25  # batch-2 / long-prompt jobs, Poisson, on the unscaled clock
SMALL, SMALL2, BIG = "llama-3.1-8b", "mistral-7b", "llama-3.1-70b"
MODEL_PATHS = {
    SMALL: "meta-llama/Llama-3.1-8B-Instruct",
    SMALL2: "mistralai/Mistral-7B-Instruct-v0.3",
    BIG: "meta-llama/Llama-3.1-70B-Instruct",
}


def slo_classes(
    interactive_s: float = 20, batch1_s: float = 60, batch2_s: float = 3600
) -> list[SLOClass]:
    """The paper's classes (TTFT seconds configurable); vLLM priority follows urgency."""
    return [
        SLOClass(name="interactive", ttft_s=interactive_s, priority=0),
        SLOClass(name="batch-1", ttft_s=batch1_s, priority=1),
        SLOClass(name="batch-2", ttft_s=batch2_s, priority=2),
    ]


@dataclass(frozen=True)
class Scenario:
    """One workload shape and its model placement rules."""

    name: str
    description: str
    models: tuple[str, ...]
    sources: tuple[dict[str, Any], ...]  # workload-spec sources (traces by dataset name)
    a10_models: tuple[str, ...]  # models an A10 instance may serve
    resident: tuple[str, ...] = field(default=())  # round-robin initial models

    def spec(
        self, window_s: tuple[float, float], time_scale: float, slos: list[SLOClass]
    ) -> WorkloadSpec:
        """The workload spec of this scenario for one window and time scale."""
        return WorkloadSpec.model_validate(
            {
                "seed": 0,
                "slo_classes": [c.model_dump() for c in slos],
                "models": list(self.models),
                "sources": list(self.sources),
                "window": {"start_s": window_s[0], "end_s": window_s[1]},
                "time_scale": time_scale,
                "limits": {"max_output_tokens": 4096},
            }
        )

    def cluster(self, num_instances: int) -> ClusterSpec:
        """Half A100, half A10; resident models round-robin over what each GPU may serve."""
        resident = self.resident or self.models
        instances = []
        for k in range(num_instances):
            gpu = "A100" if k < num_instances // 2 else "A10"
            allowed = self.models if gpu == "A100" else self.a10_models
            choices = [m for m in resident if m in allowed]
            instances.append(
                {
                    "id": f"{gpu.lower()}-{k}",
                    "gpu": gpu,
                    "endpoint": f"http://sim/{k}",
                    "model": choices[k % len(choices)],
                    "models": list(allowed) if allowed != self.models else None,
                }
            )
        return ClusterSpec.model_validate(
            {
                "gpu_types": [
                    {"name": "A100", "memory_gib": 80},
                    {"name": "A10", "memory_gib": 24},
                ],
                "models": [{"name": m, "path": MODEL_PATHS[m]} for m in self.models],
                "instances": instances,
            }
        )


def _trace(name: str, dataset: str, model: Any, slo_class: Any) -> dict[str, Any]:
    return {
        "name": name,
        "trace": {"dataset": dataset},
        "model": model,
        "slo_class": slo_class,
    }


def _arxiv_jobs(name: str, model: Any, slo_class: str) -> dict[str, Any]:
    return {
        "name": name,
        "arrivals": {"process": "poisson", "rate_per_s": ARXIV_RATE_PER_S, "duration_s": 3600},
        "lengths": {"dataset": ARXIV},
        "model": model,
        "slo_class": slo_class,
    }


_BY_HASH = {"by": "hash", "weights": {SMALL: 0.4, SMALL2: 0.4, BIG: 0.2}}

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "A-mixed",
            "one model; code trace interactive (20 s), conversation batch-1 (60 s), "
            "arXiv jobs batch-2 (1 h)",
            (SMALL,),
            (
                _trace("code", CODE, SMALL, "interactive"),
                _trace("conv", CONV, SMALL, "batch-1"),
                _arxiv_jobs("arxiv", SMALL, "batch-2"),
            ),
            (SMALL,),
        ),
        Scenario(
            "B-multimodel",
            "three models by hash (8B, 7B, 70B on A100 only); conversation batch-1 (60 s), "
            "arXiv jobs batch-2 (1 h)",
            (SMALL, SMALL2, BIG),
            (_trace("conv", CONV, _BY_HASH, "batch-1"), _arxiv_jobs("arxiv", _BY_HASH, "batch-2")),
            (SMALL, SMALL2),
            resident=(BIG, SMALL, SMALL2),
        ),
        Scenario(
            "C-longprompt",
            "one model; code trace interactive (20 s), arXiv-length jobs batch-1 (60 s)",
            (SMALL,),
            (_trace("code", CODE, SMALL, "interactive"), _arxiv_jobs("arxiv", SMALL, "batch-1")),
            (SMALL,),
        ),
    )
}


def _request_seconds(perf: PerfModel, prompt: np.ndarray, output: np.ndarray) -> np.ndarray:
    """Engine seconds one request costs inside a full batch (fluid estimate)."""
    chunk = np.minimum(prompt, perf.max_num_batched_tokens)
    batch = perf.full_batch(float(np.mean(prompt + output)))
    steps = output + np.ceil(prompt / perf.max_num_batched_tokens)
    return (
        perf.prefill_s_per_token * prompt
        + perf.prefill_s_per_token2 * prompt * chunk / 1000.0
        + output * (perf.decode_s_per_seq + perf.decode_s_per_ctx_token * (prompt + output / 2))
        + perf.step_base_s * steps / batch
    )


def capacity_rps(
    workload: Workload, cluster: ClusterSpec, perf: Mapping[tuple[str, str], PerfModel]
) -> float:
    """Estimated requests per second the cluster sustains on this request mix."""
    reqs = workload.requests
    prompt = np.array([r.prompt_tokens for r in reqs], float)
    output = np.array([r.target_output_tokens for r in reqs], float)
    model = np.array([r.model for r in reqs])
    total = 0.0
    for inst in cluster.instances:
        cost = np.full(len(reqs), np.nan)
        for m in workload.models:
            if inst.can_serve(m):
                sel = model == m
                cost[sel] = _request_seconds(perf[(m, inst.gpu)], prompt[sel], output[sel])
        total += 1.0 / float(np.nanmean(cost))
    return total


def build_point(
    scenario: Scenario,
    cluster: ClusterSpec,
    perf: Mapping[tuple[str, str], PerfModel],
    load: float,
    span_s: float,
    slos: list[SLOClass],
) -> tuple[Workload, float, float]:
    """The workload offering about ``load`` x estimated capacity over ``span_s``.

    The window length is found by a few fixed-point steps (window length = span x load /
    natural load of the window); its times are then scaled to fill the span exactly.

    Returns:
        The workload, its time scale, and the load it actually offers.
    """
    where = REPO / "benchmarks" / "policies" / f"{scenario.name}.yaml"  # a label only
    length = _REF_WINDOW_S
    for _ in range(3):
        window = (START_S, START_S + length)
        base = build_workload(scenario.spec(window, 1.0, slos), where)
        cap = capacity_rps(base, cluster, perf)
        length = span_s * load * cap * length / len(base.requests)
    window = (START_S, START_S + length)
    base = build_workload(scenario.spec(window, 1.0, slos), where)
    scale = span_s / length
    offered = len(base.requests) / span_s / capacity_rps(base, cluster, perf)
    return build_workload(scenario.spec(window, scale, slos), where), scale, offered
