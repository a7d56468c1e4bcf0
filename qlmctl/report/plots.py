"""PNG figures of a report (matplotlib, Agg, no pyplot state) and the HTML page around them.

Per run: SLO attainment over time per class (rolling window over arrivals), queue depth
(requests in flight per instance and the global waiting queue), and a Gantt of work per
instance: every attempt's [dispatch, finish] bar coloured by model (by SLO class when the
run serves one model), overlapping bars drawn translucent so batch depth shows, swaps and
wakes as hatched spans with a ▼, sleeps as a grey ▲, evictions as ×, instances going
down as a red |; where the plans made forecasts, observed first tokens and finishes
against them (log-log, the diagonal where they match). For the whole report: TTFT CDFs
(all requests and one panel per class), one line per run, the class's TTFT target
dashed; with several runs also SLO attainment per class and run as grouped bars.

Every file is written to a temporary name and renamed, so nothing is half-written.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd

matplotlib.use("Agg")
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from qlmctl.fileio import atomic_path
from qlmctl.report.compare import run_labels
from qlmctl.report.html import write_html
from qlmctl.report.metrics import forecast_rows, request_table, run_duration_s, time_forecast
from qlmctl.report.planned import PlanComparison
from qlmctl.report.runs import Report
from qlmctl.report.timeline import attainment_over_time, in_flight, waiting
from qlmctl.serve.runlog import RunLog

Draw = Callable[[Figure], None]


def _save(draw: Draw, path: Path, size: tuple[float, float] = (9.0, 4.0)) -> Path:
    fig = Figure(figsize=size, layout="constrained")
    draw(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _attainment(run: RunLog, label: str) -> Draw:
    window_s = max(run_duration_s(run) / 20.0, 1.0)
    series = attainment_over_time(run, window_s)

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        for cls, g in series.groupby("slo_class", sort=False):
            style = {"color": "black", "lw": 2.0} if cls == "all" else {"lw": 1.2}
            ax.step(g["time_s"], 100 * g["attainment"], where="post", label=str(cls), **style)
        ax.set(xlabel="arrival time (s)", ylabel="SLO attainment (%)", ylim=(-2, 102))
        ax.set_title(f"{label}: SLO attainment, rolling {window_s:.3g} s window over arrivals")
        ax.legend(loc="lower left", fontsize="small")
        ax.grid(alpha=0.3)

    return draw


def _steps(depth: pd.DataFrame, end_s: float) -> tuple[list[float], list[int]]:
    """A depth step function from 0 at time 0 to its last value at ``end_s``."""
    times, values = depth["time_s"].tolist(), depth["depth"].tolist()
    last = values[-1] if values else 0
    return [0.0, *times, max(end_s, *times, 0.0)], [0, *values, last]


def _queues(run: RunLog, label: str) -> Draw:
    flight, wait, end_s = in_flight(run), waiting(run), run_duration_s(run)

    def draw(fig: Figure) -> None:
        top, bottom = fig.subplots(2, 1, sharex=True)
        for inst, g in flight.groupby("instance_id"):
            top.step(*_steps(g, end_s), where="post", label=str(inst))
        top.set(ylabel="in flight")
        top.set_title(f"{label}: requests in flight per instance and waiting in the queue")
        if len(flight):
            top.legend(loc="upper right", fontsize="small", ncols=4)
        bottom.step(*_steps(wait, end_s), where="post", color="tab:red")
        bottom.set(xlabel="time (s)", ylabel="waiting")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)

    return draw


def _gantt(run: RunLog, label: str) -> Draw:
    att = run.requests.dropna(subset=["instance_id", "dispatch_s"])
    end = att["finish_s"].fillna(run_duration_s(run))
    key = "model" if att["model"].nunique() > 1 else "slo_class"
    ops = run.operations.dropna(subset=["instance_id"])
    instances = list(dict.fromkeys([str(i["id"]) for i in run.meta.get("instances") or []]))
    instances += sorted((set(att["instance_id"]) | set(ops["instance_id"])) - set(instances))
    row = {inst: k for k, inst in enumerate(instances)}

    def mark(ax: Axes, kind: str, **style: Any) -> None:
        sel = ops[ops["kind"] == kind]
        if len(sel):
            ax.scatter(sel["time_s"], sel["instance_id"].map(row) + 0.45, zorder=3, **style)

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        colours = matplotlib.colormaps["tab10"]
        for k, (name, g) in enumerate(att.groupby(key)):
            for inst, gi in g.groupby("instance_id"):
                bars = list(zip(gi["dispatch_s"], end[gi.index] - gi["dispatch_s"], strict=True))
                ax.broken_barh(bars, (row[str(inst)] - 0.4, 0.8), color=colours(k % 10), alpha=0.35)
            ax.plot([], [], color=colours(k % 10), lw=6, label=f"{key} {name}")
        swaps = ops[ops["kind"].isin(["swap", "wake"])]
        for _, op in swaps.iterrows():
            width = op["duration_s"] if op["duration_s"] == op["duration_s"] else 0.0
            ax.broken_barh(
                [(op["time_s"], width)], (row[str(op["instance_id"])] - 0.4, 0.8),
                facecolor="none", edgecolor="black", hatch="//",
            )  # fmt: skip
        mark(ax, "swap", marker="v", color="black", label="swap")
        mark(ax, "wake", marker="v", color="tab:green", label="wake")
        mark(ax, "sleep", marker="^", color="grey", label="sleep")
        mark(ax, "evict", marker="x", color="tab:red", label="eviction")
        mark(ax, "instance_down", marker="|", s=200, color="red", label="instance down")
        title = f"{label}: work per instance (attempts), swaps and evictions"
        _instance_axes(ax, instances, title, top=len(instances) - 0.2)

    return draw


def _plan_vs_run(p: PlanComparison, label: str) -> Draw:
    """Per instance: each planned group's predicted [start, finish] (outlined, above) and
    its observed first dispatch to last finish (filled, below), coloured by class."""
    g = p.groups
    instances = list(dict.fromkeys(g["instance_id"]))
    row = {inst: k for k, inst in enumerate(instances)}

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        colours = matplotlib.colormaps["tab10"]
        for k, (cls, gc) in enumerate(g.groupby("slo_class")):
            c = colours(k % 10)
            for _, x in gc.iterrows():
                y = row[x["instance_id"]]
                ps, pf = x["predicted_start_s"], x["predicted_finish_s"]
                ax.broken_barh([(ps, max(pf - ps, 0.0))], (y + 0.05, 0.35),
                               facecolor="none", edgecolor=c, lw=0.8)  # fmt: skip
                os_, of = x["observed_start_s"], x["observed_finish_s"]
                if os_ == os_ and of == of and os_ is not None and of is not None:
                    ax.broken_barh([(os_, max(of - os_, 0.0))], (y - 0.4, 0.35),
                                   color=c, alpha=0.5)  # fmt: skip
            ax.plot([], [], color=c, lw=6, label=f"class {cls}")
        moved = p.departures[p.departures["kind"] != "replan"]
        if len(moved):
            ax.scatter(moved["time_s"], moved["instance_id"].map(row) - 0.22, marker="x",
                       color="tab:red", zorder=3, label="departure")  # fmt: skip
        for t in p.departures[p.departures["kind"] == "replan"]["time_s"]:
            ax.axvline(t, color="grey", lw=0.6, ls=":")
        title = f"{label}: planned (outline, above) against actual (filled, below)"
        _instance_axes(ax, instances, title, top=len(instances) - 0.3)

    return draw


def _forecasts(run: RunLog, label: str) -> Draw | None:
    """Observed time from arrival to first token and to finish against each attempt's
    first forecast (its median), per class, with the share that came by the forecast's
    90th percentile; None when the run has no such forecasts."""
    panels = []
    for what, name in (("first_token", "first token"), ("finish", "finish")):
        rows = forecast_rows(run.requests, what)
        if not rows.empty:
            panels.append((what, name, rows, time_forecast(rows, what)))
    if not panels:
        return None

    def draw(fig: Figure) -> None:
        axes = fig.subplots(1, len(panels), squeeze=False).ravel()
        for ax, (what, name, rows, t) in zip(axes, panels, strict=True):
            floor = 1e-2  # log axes: times under 10 ms drawn at 10 ms
            for cls, g in rows.groupby("slo_class", sort=False):
                x = (g[f"predicted_{what}_s"] - g["arrival_s"]).clip(lower=floor)
                y = (g[f"{what}_s"] - g["arrival_s"]).clip(lower=floor)
                ax.scatter(x, y, s=6, alpha=0.5, label=str(cls))
            times = rows[[f"predicted_{what}_s", f"{what}_s"]].sub(rows["arrival_s"], axis=0)
            low, top = max(floor, float(times.min().min())), float(times.max().max())
            ax.plot([low, top], [low, top], color="black", lw=0.8, label="as forecast")
            ax.set(xscale="log", yscale="log", xlabel=f"forecast {name}, from arrival (s)",
                   ylabel=f"observed {name}, from arrival (s)")  # fmt: skip
            by_p90 = "-" if t.p90_cover is None else f"{100 * t.p90_cover:.0f} %"
            ax.set_title(f"{label}: {name} ({by_p90} by the forecast's p90)")
            ax.grid(alpha=0.3)
            ax.legend(loc="upper left", fontsize="small")

    return draw


def _instance_axes(ax: Any, instances: list[str], title: str, top: float) -> None:
    """Time on x, one row per instance, the legend outside on the right."""
    ax.set_yticks(range(len(instances)), instances)
    ax.set(xlabel="time (s)", ylim=(-0.7, top))
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    ax.grid(alpha=0.3, axis="x")


def _ttft_cdf(report: Report, labels: tuple[str, ...]) -> tuple[Draw, int]:
    """One panel for all requests and one per class; returns the drawing and panel count."""
    tables = [request_table(run)[["slo_class", "ttft_s"]].dropna() for run in report.runs]
    targets: dict[str, float] = {}
    for run in report.runs:
        for cls, spec in (run.meta.get("slo_classes") or {}).items():
            if spec and spec.get("ttft_s") is not None:
                targets.setdefault(cls, float(spec["ttft_s"]))
    classes = list(dict.fromkeys(c for t in tables for c in t["slo_class"]))
    panels = ["all", *classes]

    def draw(fig: Figure) -> None:
        ncols = min(len(panels), 3)
        axes = fig.subplots(-(-len(panels) // ncols), ncols, squeeze=False).ravel()
        for ax, panel in zip(axes, panels, strict=False):
            for label, table in zip(labels, tables, strict=True):
                sel = table if panel == "all" else table[table["slo_class"] == panel]
                ttft = sel["ttft_s"].sort_values().tolist()
                share = [100 * k / len(ttft) for k in range(len(ttft) + 1)] if ttft else []
                if ttft:
                    ax.step([0.0, *ttft], share, where="post", label=label)
            if panel in targets:
                ax.axvline(targets[panel], ls="--", lw=1.0, color="grey", label="TTFT target")
            ax.set(xlabel="TTFT from arrival (s)", ylabel="finished (%)", ylim=(0, 101))
            ax.set_title(f"TTFT CDF: {panel}")
            ax.grid(alpha=0.3)
        axes[0].legend(loc="lower right", fontsize="small")
        for ax in axes[len(panels) :]:
            ax.set_visible(False)

    return draw, len(panels)


def _attainment_bars(report: Report, labels: tuple[str, ...]) -> Draw:
    classes = list(dict.fromkeys(c for m in report.metrics for c in m.by_class))
    groups = ["all", *classes]

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        width = 0.8 / len(labels)
        for k, (label, m) in enumerate(zip(labels, report.metrics, strict=True)):
            values = [m.overall.attainment] + [
                m.by_class[c].attainment if c in m.by_class else None for c in classes
            ]
            xs = [g + k * width for g in range(len(groups))]
            ax.bar(xs, [100 * (v or 0.0) for v in values], width, label=label)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
        ax.set(ylabel="SLO attainment (%)", ylim=(0, 105))
        ax.set_title("SLO attainment per class and run")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3, axis="y")

    return draw


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def write_plots(report: Report, out: Path) -> list[Path]:
    """Write every figure as PNG and ``report.html`` into ``out``; return the paths.

    Returns:
        The PNG paths in page order, then the HTML page.
    """
    out.mkdir(parents=True, exist_ok=True)
    labels = run_labels(report.metrics)
    pngs: list[Path] = []
    for k, (run, label) in enumerate(zip(report.runs, labels, strict=True)):
        stem = f"{k + 1}-{_slug(label)}"
        pngs.append(_save(_attainment(run, label), out / f"{stem}-attainment.png"))
        pngs.append(_save(_queues(run, label), out / f"{stem}-queues.png", (9.0, 5.0)))
        height = 1.5 + 0.6 * max(len(run.meta.get("instances") or []), 2)
        pngs.append(_save(_gantt(run, label), out / f"{stem}-gantt.png", (11.0, height)))
        forecasts = _forecasts(run, label)
        if forecasts is not None:
            pngs.append(_save(forecasts, out / f"{stem}-forecasts.png", (11.0, 4.5)))
        planned = report.plans[k] if k < len(report.plans) else None
        if planned is not None:
            pngs.append(_save(_plan_vs_run(planned, label), out / f"{stem}-plan.png",
                              (11.0, height)))  # fmt: skip
    cdf, panels = _ttft_cdf(report, labels)
    pngs.append(_save(cdf, out / "ttft-cdf.png", (12.0, 3.5 * -(-panels // 3))))
    if len(report.runs) > 1:
        pngs.append(_save(_attainment_bars(report, labels), out / "attainment-by-class.png"))
    return [*pngs, write_html(report, pngs, out / "report.html")]
