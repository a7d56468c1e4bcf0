"""One self-contained HTML page: warnings, tables inline, every PNG embedded as base64.

The page needs no other file (no scripts, no links), so it can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from qlmctl.fileio import atomic_write_text
from qlmctl.render import format_number
from qlmctl.report.compare import Comparison
from qlmctl.report.export import report_csv
from qlmctl.report.runs import Report

_CLASS_COLUMNS = [
    "run_id", "policy", "slo_class", "num_prompts", "completed", "slo_attainment",
    "request_goodput", "request_throughput", "output_throughput", "median_ttft_ms",
    "p99_ttft_ms", "mean_tpot_ms", "p99_e2el_ms", "mean_queue_ms",
]  # fmt: skip

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; }
.warn { color: #8a4b00; background: #fff4e0; padding: 0.5em; }
img { max-width: 100%; display: block; margin: 1em 0; }
"""


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, na_rep="-", float_format=format_number)


def _comparison_table(c: Comparison) -> str:
    others = [k for k in range(len(c.labels)) if k != c.baseline]
    rows = [
        {
            "metric": row.metric,
            "class": row.slo_class or "all",
            **dict(zip(c.labels, row.values, strict=True)),
            **{f"Δ {c.labels[k]} (%)": _percent(row.improvement[k]) for k in others},
        }
        for row in c.rows
    ]
    return _table(pd.DataFrame(rows))


def _percent(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def write_html(report: Report, pngs: list[Path], path: Path) -> Path:
    """Write the page to ``path`` (temp file + rename) and return it."""
    parts = [f"<h1>qlmctl report: {len(report.runs)} run(s)</h1>"]
    parts += [f'<p class="warn">{html.escape(w)}</p>' for w in report.warnings]
    parts.append("<h2>SLO attainment and latency per run and class</h2>")
    parts.append(_table(report_csv(report)[_CLASS_COLUMNS]))
    if report.comparison is not None:
        c = report.comparison
        parts.append(f"<h2>Comparison (baseline {html.escape(c.labels[c.baseline])})</h2>")
        parts.append("<p>Δ: relative improvement over the baseline; positive is better.</p>")
        parts.append(_comparison_table(c))
    for m in report.metrics:
        parts.append(f"<h2>Run {html.escape(m.run_id)} ({html.escape(m.policy)})</h2>")
        parts.append(_table(pd.DataFrame([asdict(i) for i in m.instances])))
        parts.append(_table(pd.DataFrame([asdict(m.operations)])))
    for m, p in zip(report.metrics, report.plans, strict=False):
        if p is not None:
            parts.append(f"<h2>Run {html.escape(m.run_id)} against {html.escape(p.plan_path)}</h2>")
            parts.append(f"<p>dispatched as planned: {p.dispatched_as_planned} of "
                         f"{p.requests_planned}</p>")  # fmt: skip
            parts += [_table(p.misses), _table(p.swaps), _table(p.groups.head(200))]
            if len(p.departures):
                parts.append(_table(p.departures.head(200)))
    parts.append("<h2>Figures</h2>")
    parts += [_image(p) for p in pngs]
    page = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>qlmctl report</title>'
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    atomic_write_text(path, page)
    return path
