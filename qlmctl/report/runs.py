"""Load run directories and assemble the report the CLI renders.

Rules: every problem with a run directory becomes one :class:`BadInput` line naming the
directory (missing, not a directory, no or malformed run.json, an older schema version,
an unreadable or truncated Parquet table). A run recovered from part files after a crash
(``complete`` false) is still reported, with a warning in :attr:`Report.warnings`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from qlmctl.errors import BadInput
from qlmctl.report.compare import Comparison, compare
from qlmctl.report.metrics import RunMetrics, run_metrics
from qlmctl.serve.runlog import RunLog, read_run


@dataclass(frozen=True)
class Report:
    """The runs, their metrics, their comparison (if several) and warnings to show."""

    runs: tuple[RunLog, ...]
    metrics: tuple[RunMetrics, ...]
    comparison: Comparison | None  # None for a single run
    warnings: tuple[str, ...]


def load_run(path: Path) -> RunLog:
    """Read one run directory; BadInput with one clear line if it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such run directory")
    if not path.is_dir():
        raise BadInput(f"{path}: not a run directory (a run is a directory with run.json)")
    try:
        run = read_run(path)
    except (pa.ArrowException, ValueError, KeyError, AttributeError) as exc:
        raise BadInput(f"{path}: cannot read the run log ({exc})") from None
    if run.requests.empty and not run.complete:
        raise BadInput(f"{path}: the run log holds no requests (the run wrote nothing yet)")
    return run


def build_report(
    paths: Sequence[Path], *, baseline: str | None = None, force: bool = False
) -> Report:
    """Load runs, compute their metrics and, for several runs, compare them.

    Args:
        paths: run directories, in the order to show them.
        baseline: the run to compare against (directory, run id or policy).
        force: compare runs of different workloads anyway.
    """
    if not paths:
        raise BadInput("give at least one run directory")
    runs = tuple(load_run(p) for p in paths)
    metrics = tuple(run_metrics(r) for r in runs)
    warnings = [
        f"{r.path}: run did not finish cleanly (recovered from parts after a crash); "
        "rows not flushed before the crash are missing"
        for r in runs
        if not r.complete
    ]
    comparison = compare(metrics, baseline, force) if len(runs) > 1 else None
    if comparison is not None:
        warnings += comparison.warnings
    return Report(runs, metrics, comparison, tuple(warnings))
