"""Load run directories and assemble the report the CLI renders.

Rules: every problem with a run directory becomes one :class:`BadInput` line naming the
directory (missing, not a directory, no or malformed run.json, an older schema version,
an unreadable or truncated Parquet table, rows lacking a required field or with an
unknown outcome). A run recovered from part files after a crash
(``complete`` false) is still reported, with a warning in :attr:`Report.warnings`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from qlmctl.errors import BadInput
from qlmctl.plan.planfile import load_plan
from qlmctl.report.compare import Comparison, compare
from qlmctl.report.metrics import RunMetrics, run_metrics
from qlmctl.report.planned import PlanComparison, check_same_workload, compare_plan
from qlmctl.serve.runlog import Outcome, RunLog, read_run

OUTCOMES = tuple(Outcome)
_REQUIRED_ATTEMPT = ("request_id", "attempt", "arrival_s", "outcome")
_REQUIRED_OPERATION = ("time_s", "kind")


@dataclass(frozen=True)
class Report:
    """The runs, their metrics, their comparison (if several) and warnings to show."""

    runs: tuple[RunLog, ...]
    metrics: tuple[RunMetrics, ...]
    comparison: Comparison | None  # None for a single run
    warnings: tuple[str, ...]
    plans: tuple[PlanComparison | None, ...] = ()  # per run: against its plan, if any


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
    _check_required(path / "requests.parquet", run.requests, _REQUIRED_ATTEMPT)
    _check_required(path / "operations.parquet", run.operations, _REQUIRED_OPERATION)
    unknown = ~run.requests["outcome"].isin(OUTCOMES)
    if unknown.any():
        row = int(unknown.to_numpy().argmax())
        raise BadInput(
            f"{path / 'requests.parquet'}: row {row}: unknown outcome "
            f"{run.requests['outcome'].iloc[row]!r} (expected one of {', '.join(OUTCOMES)})"
        )
    return run


def _check_required(table: Path, frame: pd.DataFrame, columns: tuple[str, ...]) -> None:
    """BadInput naming the first row lacking a required field (e.g. another schema's file)."""
    for col in columns:
        missing = frame[col].isna().to_numpy()
        if missing.any():
            raise BadInput(f"{table}: row {int(missing.argmax())}: {col} is missing")


def build_report(
    paths: Sequence[Path],
    *,
    baseline: str | None = None,
    force: bool = False,
    plan: Path | None = None,
) -> Report:
    """Load runs, compute their metrics and, for several runs, compare them.

    Args:
        paths: run directories, in the order to show them.
        baseline: the run to compare against (directory, run id or policy).
        force: compare runs of different workloads anyway.
        plan: a plan file to set beside every run (default: the plan a run followed,
            recorded in its run.json as ``plan``).
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
    plans = tuple(_plan_comparison(r, plan, warnings) for r in runs)
    return Report(runs, metrics, comparison, tuple(warnings), plans)


def _plan_comparison(run: RunLog, given: Path | None, warnings: list[str]) -> PlanComparison | None:
    """``run`` against ``given`` or the plan it recorded (a warning if that is gone)."""
    path = given
    if path is None:
        recorded = run.meta.get("plan")
        if not recorded:
            return None
        path = Path(recorded)
        if not path.is_file():
            warnings.append(f"{run.path}: ran plan {recorded}, which is gone; --plan to give it")
            return None
    plan = load_plan(path)
    check_same_workload(plan, run, str(path))
    return compare_plan(plan, run, str(path))
