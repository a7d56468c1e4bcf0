"""Builders shared by the tests: small clusters, requests and profiles."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from typing import Any

from qlmctl.domain import ClusterSpec, Request, SLOClass
from qlmctl.perfmodel import PerfModel
from qlmctl.plan.policies import QlmPolicy
from qlmctl.plan.types import Plan, QueueSnapshot

SLO_CLASSES = {
    "interactive": SLOClass(name="interactive", ttft_s=20, weight=1.0, priority=0),
    "batch": SLOClass(name="batch", ttft_s=600, weight=1.0, priority=10),
}


class LosingQlm(QlmPolicy):
    """``qlm`` whose fast plans all expect to lose some request, so the serving core
    offers its MILP improver a snapshot at every re-plan due."""

    def quick(self, snapshot: QueueSnapshot, rng: Any) -> Plan:
        return replace(super().quick(snapshot, rng), predicted_attainment=0.5)


def make_cluster(num_instances: int = 2, models: tuple[str, ...] = ("m1", "m2")) -> ClusterSpec:
    """``num_instances`` attached instances on one GPU type, resident models round-robin."""
    return ClusterSpec.model_validate(
        {
            "gpu_types": [{"name": "G"}],
            "models": [{"name": m, "path": f"/models/{m}"} for m in models],
            "instances": [
                {
                    "id": f"i{k}",
                    "gpu": "G",
                    "endpoint": f"http://127.0.0.1:{8100 + k}",
                    "model": models[k % len(models)],
                }
                for k in range(num_instances)
            ],
        }
    )


def make_requests(
    n: int,
    model: str = "m1",
    slo_class: str = "interactive",
    gap_s: float = 1.0,
    prompt_tokens: int = 100,
    output_tokens: int = 50,
    start_s: float = 0.0,
    prefix: str = "r",
) -> list[Request]:
    """``n`` requests arriving every ``gap_s`` seconds."""
    return [
        Request(
            id=f"{prefix}{k}",
            arrival_s=start_s + k * gap_s,
            model=model,
            slo_class=slo_class,
            prompt_tokens=prompt_tokens,
            max_output_tokens=max(output_tokens, 1),
            output_tokens=output_tokens,
        )
        for k in range(n)
    ]


def make_perf(model: str = "m1", gpu: str = "G", **overrides: object) -> PerfModel:
    """A simple performance model: 10 ms decode steps, 0.1 ms per prefill token."""
    fields: dict[str, object] = {
        "model": model,
        "gpu": gpu,
        "step_base_s": 0.01,
        "prefill_s_per_token": 1e-4,
        "prefill_s_per_token2": 0.0,
        "decode_s_per_seq": 1e-4,
        "decode_s_per_ctx_token": 0.0,
        "kv_capacity_tokens": 100_000,
        "max_num_seqs": 64,
        "max_num_batched_tokens": 2048,
        "cold_start_s": 20.0,
        "stop_s": 2.0,
    }
    fields.update(overrides)
    return PerfModel(**fields)  # type: ignore[arg-type]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the real console entry point, so errors map to one line and an exit code."""
    return subprocess.run(
        [sys.executable, "-c", "from qlmctl.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
    )
