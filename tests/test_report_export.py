"""Exports: JSON keys as in `vllm bench serve` result files, CSV shape, rich tables."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest

from qlmctl.errors import BadInput
from qlmctl.report.export import check_format, report_csv, report_json
from qlmctl.report.runs import build_report
from qlmctl.report.tables import print_report
from tests.test_report_metrics import write_run

BENCH_KEYS = {
    "completed", "failed", "duration", "request_throughput", "request_goodput",
    "output_throughput", "total_token_throughput", "total_input_tokens", "total_output_tokens",
    *(f"{s}_{m}_ms" for s in ("mean", "median", "std", "p99") for m in ("ttft", "tpot", "e2el")),
}  # fmt: skip


def test_single_run_json_is_bench_serve_like(tmp_path: Path) -> None:
    doc = report_json(build_report([write_run(tmp_path / "run")]))
    assert set(doc) >= BENCH_KEYS
    assert (doc["completed"], doc["failed"], doc["duration"]) == (4, 1, 10.0)
    assert doc["median_ttft_ms"] == pytest.approx(550.0)
    assert doc["p99_ttft_ms"] == pytest.approx(1000 * (0.6 + 0.97 * 1.4))
    assert doc["request_goodput"] == pytest.approx(0.3)
    assert doc["total_input_tokens"] == 500 and doc["total_output_tokens"] == 100
    assert doc["slo_attainment"] == pytest.approx(0.6)
    assert set(doc["per_class"]) == {"interactive", "batch"}
    assert set(doc["per_class"]["batch"]) >= BENCH_KEYS
    assert doc["operations"]["swaps"] == 1 and doc["predictions"]["start_count"] == 5
    assert [i["instance_id"] for i in doc["instances"]] == ["i0", "i1"]


def test_comparison_json(tmp_path: Path) -> None:
    runs = [
        write_run(tmp_path / "f", "fcfs"),
        write_run(tmp_path / "q", "qlm", d_first_token_s=3.9),
    ]
    doc = report_json(build_report(runs))
    assert [r["policy"] for r in doc["runs"]] == ["fcfs", "qlm"] and doc["baseline"] == "fcfs"
    att = doc["comparison"]["slo_attainment"]
    assert att["values"] == pytest.approx({"fcfs": 0.6, "qlm": 0.8})
    assert att["improvement"]["qlm"] == pytest.approx(1 / 3)


def test_csv_one_row_per_run_and_class(tmp_path: Path) -> None:
    runs = [write_run(tmp_path / "f", "fcfs"), write_run(tmp_path / "q", "qlm")]
    frame = report_csv(build_report(runs))
    assert frame.shape[0] == 2 * 3  # (all, interactive, batch) per run
    assert list(frame.columns[:3]) == ["run_id", "policy", "slo_class"]
    assert set(frame.columns) >= BENCH_KEYS
    back = pd.read_csv(io.StringIO(frame.to_csv(index=False)))
    row = back[(back.policy == "fcfs") & (back.slo_class == "interactive")].iloc[0]
    assert row["slo_attainment"] == pytest.approx(2 / 3) and row["completed"] == 3


def test_tables_render_names_with_brackets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [write_run(tmp_path / "f", "fcfs"), write_run(tmp_path / "q", "qlm")]
    print_report(build_report(runs))
    out = capsys.readouterr().out
    assert "interactive" in out and "[/]" not in out
    assert "comparison (baseline fcfs" in out and "60.0%" in out


def test_unknown_format() -> None:
    assert check_format("csv") == "csv"
    with pytest.raises(BadInput, match="table, json, csv"):
        check_format("xml")
