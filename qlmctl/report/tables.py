"""Rich tables of a report: per run SLO and latency by class and model, instances,
operations, predicted against observed; for several runs the side-by-side comparison.

Names from run logs (classes, models, run ids) are escaped: rich would read ``[x]`` as
markup. Numbers stay numbers until ``print_table`` formats them (``render.format_number``):
latencies in seconds, TPOT (a per-token time) in milliseconds, units in the titles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape

from qlmctl.render import format_number, print_table
from qlmctl.report.compare import Comparison
from qlmctl.report.metrics import GroupMetrics, RunMetrics
from qlmctl.report.planned import PlanComparison
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
        times = [
            [what, t.count, _s(t.bias_s), _s(t.mae_s), t.p90_count, _pct(t.p90_cover)]
            for what, t in (("first token", p.first_token), ("finish", p.finish))
        ]
        print_table(
            "forecast times · observed − forecast median (seconds, medians), and the share "
            "that came by the forecast's 90th percentile",
            ["time", "n", "bias s", "|error| s", "with p90", "by p90"],
            times,
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


def print_plan(p: PlanComparison, run_id: str, max_rows: int = 20) -> None:
    """A run against its plan: groups (the first ``max_rows`` per instance), misses by
    class, swaps per instance, departures by kind and reason."""
    title = f"{escape(run_id)} against plan {escape(Path(p.plan_path).name)}"
    followed = _pct(p.followed)
    g = p.groups
    top = g[g["order"] <= max_rows]
    cols = ["instance", "#", "group", "model", "class", "size", "start s plan", "start s run",
            "finish s plan", "finish s run", "misses plan", "misses run"]  # fmt: skip
    cells = [[escape(v) if isinstance(v, str) else v for v in r] for r in top.values.tolist()]
    hidden = len(g) - len(top)
    note = (
        f" (first {max_rows} groups per instance; {hidden} more in --format json)" if hidden else ""
    )
    print_table(f"{title}: groups, predicted against observed{note}", cols, cells)
    m = p.misses
    print_table(
        f"{title}: SLO misses by class",
        ["class", "requests", "predicted misses", "observed misses"],
        [[escape(str(r[0])), *r[1:]] for r in m.values.tolist()],
    )
    print_table(
        f"{title}: swaps per instance",
        ["instance", "planned", "done"],
        [[escape(str(r[0])), *r[1:]] for r in p.swaps.values.tolist()],
    )
    d = p.departures
    by_why: dict[str, list[Any]] = {}  # why -> [first time, re-plans, moved, reordered, evicted]
    for t, kind, why in zip(d["time_s"], d["kind"], d["why"], strict=True):
        entry = by_why.setdefault(str(why), [float(t), 0, 0, 0, 0])
        entry[1 + _KINDS.index(str(kind))] += 1
    rows = [[e[0], escape(why), *e[1:]] for why, e in by_why.items()]
    shown = rows[:max_rows]
    more = f"; {len(rows) - len(shown)} more in --format json" if len(rows) > max_rows else ""
    print_table(
        f"{title}: where the run left the plan ({p.dispatched_as_planned:,} of "
        f"{p.requests_planned:,} requests dispatched as planned: {followed}{more})",
        ["from s", "why", "re-plans", "moved", "reordered", "evicted"],
        shown or [["-", "never: the run followed the plan", 0, 0, 0, 0]],
    )


_KINDS = ("replan", "instance", "order", "evict")


def print_report(report: Report) -> None:
    """Every run's tables, then the comparison if there are several runs."""
    for k, m in enumerate(report.metrics):
        print_run(m)
        p = report.plans[k] if k < len(report.plans) else None
        if p is not None:
            print_plan(p, m.run_id)
    if report.comparison is not None:
        print_comparison(report.comparison)
