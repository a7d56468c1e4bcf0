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
  (a 4-GPU tensor-parallel instance in its profile) runs on A100 instances only. Which
  model an instance holds could matter here, but in the sweep qlmctl's policies never
  swap (the routers at most twice a run): the hash split keeps each model's instances
  busy with its own share, so no cell tests model placement over time.
* ``C-longprompt``: one model; interactive code-trace traffic beside arXiv-length jobs
  (prompts of about 2,600 tokens) with the batch-1 SLO.
* ``D-longdoc``: like C, but the jobs are long documents: prompts uniform in 8k-32k
  tokens, outputs log-normal (median 300, max 2,048), batch-1. No public trace here has
  prompts this long, so the lengths are synthetic (chosen before any result was seen).
* ``E-twomodels``: where the model an instance holds should decide (chosen before any of
  its results was seen, after B showed none): two models whose traffic moves
  independently, the code trace as interactive (20 s) on the 8B model, the conversation
  trace as batch-1 (60 s) and arXiv jobs as batch-2 (1 h) on the 7B model; every
  instance may serve either and starts with one, in turn (its first change of model is
  a cold start, later ones a sleep and a wake). When one trace bursts, instances should
  change model, and a change drains a busy batch first: a decision that is costly to
  undo. Not in the main sweep (``--cells E-twomodels:4``).

Load: every point offers ``SPAN_S`` seconds of arrivals (virtual time) at a target
multiple of the cluster's *estimated* capacity (:func:`capacity_rps`: per request,
prefill and decode seconds inside a full batch; then the largest rate of this request
mix that the instances can share, each serving only the models it may serve: a small
LP solved by HiGHS). The traces are read
from ``START_S`` on; the window is as long as needed for that span at that load, and
its times are scaled to fit the span, so overload lasts as long at every load and
cluster size. Load 1.0 is the estimate of saturation; the sweep runs to 2.5 times that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highspy
import numpy as np

from qlmctl.domain import ClusterSpec, SLOClass
from qlmctl.perfmodel import PerfModel
from qlmctl.plan.highs import new_highs
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

    def cluster(self, num_instances: int, placement: Sequence[str] = ()) -> ClusterSpec:
        """Half A100, half A10; resident models round-robin over what each GPU may serve,
        or instance ``k`` starting with ``placement[k]`` where given."""
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
                    "model": placement[k] if placement else choices[k % len(choices)],
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


def _jobs(name: str, lengths: dict[str, Any], model: Any, slo_class: str) -> dict[str, Any]:
    """Jobs arriving as a Poisson stream, with ``lengths`` (a dataset or distributions)."""
    return {
        "name": name,
        "arrivals": {"process": "poisson", "rate_per_s": ARXIV_RATE_PER_S, "duration_s": 3600},
        "lengths": lengths,
        "model": model,
        "slo_class": slo_class,
    }


ARXIV_LENGTHS = {"dataset": ARXIV}
LONG_DOC_LENGTHS = {
    "prompt_tokens": {"dist": "uniform", "low": 8192, "high": 32768},
    "output_tokens": {"dist": "lognormal", "median": 300, "sigma": 0.8, "max": 2048},
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
                _jobs("arxiv", ARXIV_LENGTHS, SMALL, "batch-2"),
            ),
            (SMALL,),
        ),
        Scenario(
            "B-multimodel",
            "three models by hash (8B, 7B, 70B on A100 only); conversation batch-1 (60 s), "
            "arXiv jobs batch-2 (1 h)",
            (SMALL, SMALL2, BIG),
            (
                _trace("conv", CONV, _BY_HASH, "batch-1"),
                _jobs("arxiv", ARXIV_LENGTHS, _BY_HASH, "batch-2"),
            ),
            (SMALL, SMALL2),
            resident=(BIG, SMALL, SMALL2),
        ),
        Scenario(
            "C-longprompt",
            "one model; code trace interactive (20 s), arXiv-length jobs batch-1 (60 s)",
            (SMALL,),
            (
                _trace("code", CODE, SMALL, "interactive"),
                _jobs("arxiv", ARXIV_LENGTHS, SMALL, "batch-1"),
            ),
            (SMALL,),
        ),
        Scenario(
            "D-longdoc",
            "one model; code trace interactive (20 s), documents of 8k-32k prompt tokens "
            "batch-1 (60 s)",
            (SMALL,),
            (
                _trace("code", CODE, SMALL, "interactive"),
                _jobs("docs", LONG_DOC_LENGTHS, SMALL, "batch-1"),
            ),
            (SMALL,),
        ),
        Scenario(
            "E-twomodels",
            "two models: code trace interactive (20 s) on the 8B; conversation batch-1 "
            "(60 s) and arXiv jobs batch-2 (1 h) on the 7B; every instance may serve either",
            (SMALL, SMALL2),
            (
                _trace("code", CODE, SMALL, "interactive"),
                _trace("conv", CONV, SMALL2, "batch-1"),
                _jobs("arxiv", ARXIV_LENGTHS, SMALL2, "batch-2"),
            ),
            (SMALL, SMALL2),
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
    """Estimated requests per second the cluster sustains on this request mix.

    The LP: maximise ``rate`` over ``x[m, i]`` (model ``m``'s requests per second on
    instance ``i``, 0 where ``i`` may not serve ``m``) with ``sum_i x[m, i] = rate *
    share[m]`` and, per instance, ``sum_m x[m, i] * seconds[m, i] <= 1``.
    """
    reqs = workload.requests
    prompt = np.array([r.prompt_tokens for r in reqs], float)
    output = np.array([r.target_output_tokens for r in reqs], float)
    model = np.array([r.model for r in reqs])
    models = sorted(set(model))
    insts = cluster.instances
    h = new_highs()
    n_x = len(models) * len(insts)
    rate = n_x  # column index of the rate
    upper = np.array(
        [highspy.kHighsInf if i.can_serve(m) else 0.0 for m in models for i in insts] + [np.inf]
    )
    h.addVars(n_x + 1, np.zeros(n_x + 1), np.minimum(upper, highspy.kHighsInf))
    h.changeColsCost(1, np.array([rate], np.int32), np.array([-1.0]))
    for k, m in enumerate(models):
        cols = np.array([*range(k * len(insts), (k + 1) * len(insts)), rate], np.int32)
        share = float(np.mean(model == m))
        h.addRow(0.0, 0.0, len(cols), cols, np.array([1.0] * len(insts) + [-share]))
    for j, inst in enumerate(insts):
        served: list[int] = []  # the instance's columns, and a request's seconds in each
        secs: list[float] = []
        for k, m in enumerate(models):
            if inst.can_serve(m):
                sel = model == m
                served.append(k * len(insts) + j)
                secs.append(
                    float(np.mean(_request_seconds(perf[(m, inst.gpu)], prompt[sel], output[sel])))
                )
        h.addRow(-highspy.kHighsInf, 1.0, len(served), np.array(served, np.int32), np.array(secs))
    h.run()
    return float(h.getSolution().col_value[rate])


def build_point(
    scenario: Scenario,
    cluster: ClusterSpec,
    perf: Mapping[tuple[str, str], PerfModel],
    load: float,
    span_s: float,
    slos: list[SLOClass],
) -> tuple[Workload, float, float]:
    """The workload offering about ``load`` x estimated capacity over ``span_s``.

    The window length is found by damped fixed-point steps (window length = span x load
    / natural load of the window), keeping the one closest to ``load``; its times are then
    scaled to fill the span exactly.

    Returns:
        The workload, its time scale, and the load it actually offers.
    """
    where = REPO / "benchmarks" / "policies" / f"{scenario.name}.yaml"  # a label only
    length, best = _REF_WINDOW_S, (math.inf, _REF_WINDOW_S, 0.0)
    for _ in range(8):
        base = build_workload(scenario.spec((START_S, START_S + length), 1.0, slos), where)
        offered = len(base.requests) / span_s / capacity_rps(base, cluster, perf)
        best = min(best, (abs(offered - load), length, offered))
        step = load / offered  # damped near the target: the request mix moves too
        length *= step if abs(math.log(step)) > 0.5 else math.sqrt(step)
    _, length, offered = best
    window = (START_S, START_S + length)
    scale = span_s / length
    return build_workload(scenario.spec(window, scale, slos), where), scale, offered
