"""What ``qlmctl serve`` shows: a live view while it runs and a summary table at the end.

The live view is a rich ``Live`` panel refreshed from the driver's progress callback:
per instance its virtual-queue depth and requests in flight, then attainment so far and
operation counts. Simulated runs, which finish in seconds, show a progress bar instead.
Whatever ends the block (an error included), the cursor is left at the start of a new
line, so a message printed next never lands on the panel's last line (rich only ends
that line itself on a terminal, not in a log file).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qlmctl.render import format_cell, print_table
from qlmctl.serve.config import CoreStats
from qlmctl.serve.run import ProgressFn, RunSummary


@contextlib.contextmanager
def live_view(engine: str, total: int, console: Console | None = None) -> Iterator[ProgressFn]:
    """A progress callback that keeps a live view on the console while the block runs."""
    console = console or Console(stderr=True)
    if engine == "sim":
        bar = Progress(
            TextColumn("simulating"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("t={task.fields[t]:.0f}s"), TimeElapsedColumn(), console=console,
        )  # fmt: skip
        task = bar.add_task("sim", total=total, t=0.0)
        try:
            with bar:
                yield lambda stats, t: bar.update(task, completed=stats.final, t=t)
        finally:
            _end_line(console)
        return
    try:
        with Live(_panel(None, 0.0, total), console=console, refresh_per_second=4) as live:
            yield lambda stats, t: live.update(_panel(stats, t, total))
    finally:
        _end_line(console)


def _end_line(console: Console) -> None:
    if not console.is_terminal:
        console.print()  # a log file gets the last frame without its line end


def _panel(stats: CoreStats | None, t_s: float, total: int) -> Group:
    table = Table(title=f"serving  t={t_s:.0f}s", title_justify="left")
    for col in ("instance", "queued", "in flight"):
        table.add_column(col, justify="left" if col == "instance" else "right")
    if stats is None:
        return Group(table)
    for iid, queued in stats.queued_by_instance.items():
        table.add_row(iid, str(queued), str(stats.in_flight_by_instance[iid]))
    ops = ", ".join(f"{k} {v}" for k, v in sorted(stats.operations.items())) or "none"
    line = (
        f"arrived {stats.arrived}/{total}  ended {stats.final}  "
        f"attainment {format_cell(stats.attainment)}  operations: {ops}"
    )
    return Group(table, line)


def print_summary(summary: RunSummary) -> None:
    """The final table: attainment per class, goodput, operations, failures; the run path."""
    rows: list[list[object]] = [
        [f"attainment {cls}", value] for cls, value in sorted(summary.attainment_by_class.items())
    ]
    ops = summary.operations
    rows += [
        ["attainment (all)", summary.attainment],
        ["goodput (SLO-met req/s)", summary.goodput_rps],
        ["requests", summary.requests],
        ["finished", summary.finished],
        ["failed", summary.failed],
        ["rejected", summary.rejected],
        ["cancelled", summary.cancelled],
        ["swaps", ops.get("swap", 0) + ops.get("wake", 0)],
        ["evictions", ops.get("evict", 0)],
        ["re-plans", ops.get("replan", 0)],
        ["duration s", summary.duration_s],
    ]
    title = f"{summary.policy} on {summary.engine}" + (
        " (interrupted)" if summary.interrupted else ""
    )
    print_table(title, ["metric", "value"], rows)
    Console().print(f"run log: {summary.run_dir}", highlight=False, soft_wrap=True)
