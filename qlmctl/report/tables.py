"""Rich tables of a report: per run SLO and latency by class and model, instances,
operations, predicted against observed; for several runs the side-by-side comparison.

Names from run logs (classes, models, run ids) are escaped: rich would read ``[x]`` as
markup. Numbers stay numbers until ``print_table`` formats them (``render.format_number``):
latencies in seconds, TPOT (a per-token time) in milliseconds, units in the titles.
"""

from __future__ import annotations

from typing import Any

from rich.markup import escape

from qlmctl.render import format_number, print_table
from qlmctl.report.compare import Comparison
from qlmctl.report.metrics import GroupMetrics, RunMetrics
from qlmctl.report.runs import Report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:,.1f}%"


def _ms(x: float | None) -> float | None:
    return None if x is None else 1000 * x


def _s(x: float | None) -> str:
    return "-" if x is None else format_number(x)


def _slo_rows(groups: dict[str, GroupMetrics]) -> list[list[Any]]:
    return [
        [
            escape(name),
            g.requests,
            _pct(g.attainment),
            _pct(g.weighted_attainment),
            g.goodput_rps,
            g.request_throughput_rps,
            g.output_throughput_tps,
            g.rejected + g.cancelled + g.failed + g.unfinished,
        ]
        for name, g in groups.items()
    ]


def _latency_rows(groups: dict[str, GroupMetrics]) -> list[list[Any]]:
    return [
        [
            escape(name),
            *(getattr(g.ttft, p) for p in ("p50_s", "p90_s", "p99_s")),
            _ms(g.tpot.mean_s),
            *(getattr(g.e2e, p) for p in ("p50_s", "p99_s")),
            *(getattr(g.queue, p) for p in ("mean_s", "p99_s")),
        ]
        for name, g in groups.items()
    ]


def print_run(m: RunMetrics) -> None:
    """Tables of one run: SLO, latency, instances, operations, predictions."""
    state = "" if m.complete else " (INCOMPLETE: recovered after a crash)"
    title = escape(f"{m.run_id} · {m.policy} · {m.engine} · {_s(m.duration_s)} s{state}")
    groups = {"all": m.overall, **m.by_class}
    groups |= {f"model:{k}": g for k, g in m.by_model.items()}
    print_table(
        f"{title} · SLO",
        ["requests", "n", "met", "weighted", "goodput/s", "req/s", "tok/s", "not done"],
        _slo_rows(groups),
    )
    print_table(
        f"{title} · latency s (TTFT, E2E from arrival; TPOT ms)",
        ["requests", "TTFT p50", "p90", "p99", "TPOT ms", "E2E p50", "p99", "queue mean", "p99"],
        _latency_rows(groups),
    )
    inst = [
        [escape(i.instance_id), i.gpu or "-", i.attempts, _pct(i.utilisation)] for i in m.instances
    ]
    print_table("instances", ["instance", "gpu", "attempts", "busy"], inst)
    ops = [
        [o.kind.replace("_", " "), o.count, o.seconds, o.tokens_kept, o.tokens_recomputed,
         o.tokens_lost]
        for o in m.per_operation
    ]  # fmt: skip
    c = m.operations
    ops += [["failed attempt", c.failed_attempts, None, None, None, None]]
    ops += [["rejected attempt", c.rejected_attempts, None, None, None, None]]
    print_table(
        "operations (seconds: load, call or solver time; tokens: what evictions kept, "
        "prefilled again, lost)",
        ["operation", "count", "seconds", "tokens kept", "recomputed", "lost"],
        ops,
    )
    p = m.predictions
    if p is not None:
        calib = {"all": p.overall, **p.by_class}
        rows = [
            [
                escape(k),
                c.requests,
                _pct(c.predicted_miss_rate),
                _pct(c.observed_miss_rate),
                c.brier,
            ]
            for k, c in calib.items()
            if c is not None
        ]
        print_table(
            f"predicted vs observed · dispatch − predicted start over {p.start_count} "
            f"dispatches: bias {_s(p.start_bias_s)} s, MAE {_s(p.start_mae_s)} s",
            ["requests", "n", "predicted miss", "observed miss", "Brier"],
            rows,
        )


def print_comparison(c: Comparison) -> None:
    """A value column per run, then the improvement of every other run over the baseline."""
    labels = [escape(label) for label in c.labels]
    others = [k for k in range(len(labels)) if k != c.baseline]
    columns = ["metric", "class", *labels, *(f"Δ {labels[k]}" for k in others)]
    rows = [
        [escape(row.metric), escape(row.slo_class or "all"), *row.values]
        + [_pct(row.improvement[k]) for k in others]
        for row in c.rows
    ]
    print_table(f"comparison (baseline {labels[c.baseline]}; Δ > 0 is better)", columns, rows)


def print_report(report: Report) -> None:
    """Every run's tables, then the comparison if there are several runs."""
    for m in report.metrics:
        print_run(m)
    if report.comparison is not None:
        print_comparison(report.comparison)
