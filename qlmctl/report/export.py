"""Render a report: rich tables (default; tables.py), JSON like ``vllm bench serve``, CSV.

JSON: one run gives one object whose keys follow ``vllm bench serve`` result files where
they mean the same thing (``completed``, ``failed``, ``duration``, ``request_throughput``,
``request_goodput``, ``output_throughput``, ``total_token_throughput``,
``{mean,median,std,p99}_{ttft,tpot,e2el}_ms``, ``total_input_tokens``,
``total_output_tokens``); ``failed`` counts every request that did not finish. TTFT and
E2E are measured from the request's arrival in qlmctl's queue. qlmctl's own keys:
``slo_attainment``, ``weighted_slo_attainment``, ``p90_*_ms``, ``*_queue_ms``,
``per_class``, ``per_model``, ``instances``, ``operations``, ``predictions``. Several runs
give ``{"runs": [...], "baseline": ..., "comparison": {...}}``.

CSV: one row per run × SLO class plus a row per run for class ``all``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

import pandas as pd

from qlmctl.errors import BadInput
from qlmctl.render import print_json
from qlmctl.report.compare import Comparison
from qlmctl.report.metrics import GroupMetrics, LatencyStats, RunMetrics
from qlmctl.report.runs import Report
from qlmctl.report.tables import print_report

FORMATS = ("table", "json", "csv")

_LATENCIES = {"ttft": "ttft", "tpot": "tpot", "e2el": "e2e", "queue": "queue"}


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


def latency_keys(name: str, stats: LatencyStats) -> dict[str, float | None]:
    """``mean_/median_/std_/p90_/p99_{name}_ms`` as in vllm bench serve."""
    return {
        f"mean_{name}_ms": _ms(stats.mean_s),
        f"median_{name}_ms": _ms(stats.p50_s),
        f"std_{name}_ms": _ms(stats.std_s),
        f"p90_{name}_ms": _ms(stats.p90_s),
        f"p99_{name}_ms": _ms(stats.p99_s),
    }


def group_json(g: GroupMetrics, duration_s: float) -> dict[str, Any]:
    """Bench-serve style keys of one group of requests."""
    out: dict[str, Any] = {
        "num_prompts": g.requests,
        "completed": g.finished,
        "failed": g.requests - g.finished,
        "duration": duration_s,
        "total_input_tokens": g.prompt_tokens,
        "total_output_tokens": g.output_tokens,
        "request_throughput": g.request_throughput_rps,
        "request_goodput": g.goodput_rps,
        "output_throughput": g.output_throughput_tps,
        "total_token_throughput": g.total_token_throughput_tps,
        "slo_attainment": g.attainment,
        "weighted_slo_attainment": g.weighted_attainment,
        "num_slo_met": g.met,
        "num_rejected": g.rejected,
        "num_cancelled": g.cancelled,
        "num_failed": g.failed,
        "num_unfinished": g.unfinished,
    }
    for key, field in _LATENCIES.items():
        out.update(latency_keys(key, getattr(g, field)))
    return out


def run_json(m: RunMetrics) -> dict[str, Any]:
    """One run as a ``vllm bench serve``-like result object."""
    return {
        "date": m.started_at,
        "backend": f"qlmctl-{m.engine}",
        "label": m.policy,
        "run_id": m.run_id,
        "run_dir": m.path,
        "policy": m.policy,
        "engine": m.engine,
        "workload_fingerprint": m.workload_fingerprint,
        "complete": m.complete,
        **group_json(m.overall, m.duration_s),
        "per_class": {c: group_json(g, m.duration_s) for c, g in m.by_class.items()},
        "per_model": {k: group_json(g, m.duration_s) for k, g in m.by_model.items()},
        "instances": [asdict(i) for i in m.instances],
        "operations": asdict(m.operations),
        "per_operation": [asdict(o) for o in m.per_operation],
        "predictions": None if m.predictions is None else asdict(m.predictions),
    }


def comparison_json(c: Comparison) -> dict[str, Any]:
    """Metric name -> {label -> value} and the relative improvement per label."""
    return {
        row.name: {
            "higher_is_better": row.higher_is_better,
            "values": dict(zip(c.labels, row.values, strict=True)),
            "improvement": dict(zip(c.labels, row.improvement, strict=True)),
        }
        for row in c.rows
    }


def report_json(report: Report) -> dict[str, Any]:
    """The JSON document of a report (one run: a bench-serve-like object)."""
    runs = [run_json(m) for m in report.metrics]
    for k, p in enumerate(report.plans):
        if p is not None:
            runs[k]["plan"] = p.to_dict()
    if report.comparison is None:
        return runs[0]
    return {
        "runs": runs,
        "baseline": report.comparison.labels[report.comparison.baseline],
        "comparison": comparison_json(report.comparison),
    }


def report_csv(report: Report) -> pd.DataFrame:
    """One row per run × SLO class (and class ``all``), bench-serve key names as columns."""
    rows = []
    for m in report.metrics:
        groups = {"all": m.overall, **m.by_class}
        for cls, g in groups.items():
            head = {"run_id": m.run_id, "policy": m.policy, "slo_class": cls}
            rows.append(head | group_json(g, m.duration_s))
    return pd.DataFrame(rows)


def render(report: Report, fmt: str) -> None:
    """Print ``report`` on stdout in ``fmt`` (table, json or csv)."""
    if fmt == "json":
        print_json(report_json(report))
    elif fmt == "csv":
        report_csv(report).to_csv(sys.stdout, index=False)
    else:
        print_report(report)


def check_format(fmt: str) -> str:
    """``fmt`` if it is a known format, else BadInput listing them."""
    if fmt not in FORMATS:
        raise BadInput(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt
