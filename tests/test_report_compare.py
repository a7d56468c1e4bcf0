"""Comparing runs (baseline, relative improvement, refusing other workloads) and loading
run directories (missing, truncated, old schema, crashed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlmctl.errors import BadInput
from qlmctl.report.compare import (
    Comparison,
    MetricRow,
    compare,
    pick_baseline,
    relative_improvement,
)
from qlmctl.report.metrics import run_metrics
from qlmctl.report.runs import build_report, load_run
from tests.test_report_metrics import write_run


def _rows(c: Comparison) -> dict[str, MetricRow]:
    return {row.name: row for row in c.rows}


def test_qlm_against_fcfs_baseline(tmp_path: Path) -> None:
    qlm = write_run(tmp_path / "qlm", policy="qlm", d_first_token_s=3.9)
    fcfs = write_run(tmp_path / "fcfs", policy="fcfs")
    report = build_report([qlm, fcfs])
    c = report.comparison
    assert c is not None and c.labels == ("qlm", "fcfs") and c.baseline == 1  # fcfs by default
    rows = _rows(c)
    att = rows["slo_attainment"]
    assert att.values == pytest.approx((0.8, 0.6))
    assert att.improvement == pytest.approx((1 / 3, 0.0))
    # lower is better: p99 TTFT 0.891 s against 1.958 s is a positive improvement
    ttft = rows["p99_ttft_s"]
    assert ttft.values == pytest.approx((0.6 + 0.97 * 0.3, 0.6 + 0.97 * 1.4))
    assert ttft.improvement[0] == pytest.approx((1.4 - 0.3) * 0.97 / (0.6 + 0.97 * 1.4))
    assert rows["slo_attainment[interactive]"].values == pytest.approx((1.0, 2 / 3))
    assert report.warnings == ()


def test_baseline_by_policy_run_id_or_path(tmp_path: Path) -> None:
    runs = [
        run_metrics(load_run(write_run(tmp_path / p, policy=p))) for p in ("edf", "qlm", "prio")
    ]
    assert pick_baseline(runs) == 0  # no fcfs: the first run
    assert pick_baseline(runs, "qlm") == 1
    assert pick_baseline(runs, "run-prio") == 2
    assert pick_baseline(runs, str(tmp_path / "qlm")) == 1
    with pytest.raises(BadInput, match="matches no single run"):
        pick_baseline(runs, "heuristic")


def test_relative_improvement_signs() -> None:
    assert relative_improvement(0.9, 0.6, higher=True) == pytest.approx(0.5)
    assert relative_improvement(2.0, 4.0, higher=False) == pytest.approx(0.5)
    assert relative_improvement(1.0, 0.0, higher=True) is None
    assert relative_improvement(None, 1.0, higher=True) is None


def test_mismatched_workloads_refused_unless_forced(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", policy="fcfs", fingerprint="w1")
    b = write_run(tmp_path / "b", policy="qlm", fingerprint="w2")
    with pytest.raises(BadInput, match=r"different workloads.*--force"):
        build_report([a, b])
    forced = build_report([a, b], force=True)
    assert forced.comparison is not None
    assert any("different workloads" in w for w in forced.warnings)
    metrics = [run_metrics(load_run(p)) for p in (a, b)]
    assert compare(metrics, force=True).baseline == 0


def test_missing_and_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no such run directory"):
        load_run(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInput, match="not a run directory"):
        load_run(tmp_path / "file")


def test_truncated_parquet(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    table = run / "requests.parquet"
    table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    with pytest.raises(BadInput, match="cannot read the requests table"):
        load_run(run)


def test_older_schema_version(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(meta | {"version": 0}))
    with pytest.raises(BadInput, match="version 0 is not supported"):
        load_run(run)


def test_crashed_run_is_reported_with_a_warning(tmp_path: Path) -> None:
    report = build_report([write_run(tmp_path / "run", close=False)])
    assert report.metrics[0].overall.requests == 5
    assert len(report.warnings) == 1 and "crash" in report.warnings[0]


def test_table_of_another_schema_names_row_and_field(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = write_run(tmp_path / "run")
    pq.write_table(pa.table({"request_id": ["a"], "ttft": [0.1]}), run / "requests.parquet")
    with pytest.raises(BadInput, match=r"requests\.parquet: row 0: attempt is missing"):
        load_run(run)
