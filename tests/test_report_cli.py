"""`qlmctl report` end to end: CliRunner for output, a subprocess for exit codes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from typer.testing import CliRunner

from qlmctl.cli import app
from tests.helpers import run_cli
from tests.test_report_metrics import write_run

runner = CliRunner()


def test_json_comparison_and_plots(tmp_path: Path) -> None:
    fcfs, qlm = write_run(tmp_path / "f", "fcfs"), write_run(tmp_path / "q", "qlm")
    out = tmp_path / "plots"
    result = runner.invoke(
        app, ["report", str(qlm), str(fcfs), "--format", "json", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["baseline"] == "fcfs" and len(doc["runs"]) == 2
    assert (out / "report.html").is_file() and len(list(out.glob("*.png"))) == 10


def test_table_and_csv(tmp_path: Path) -> None:
    run = write_run(tmp_path / "f", "fcfs")
    table = runner.invoke(app, ["report", str(run)])
    assert table.exit_code == 0 and "run-fcfs" in table.stdout and "60.0%" in table.stdout
    ops = table.stdout[table.stdout.index("operations") :]  # per operation: count, s, tokens
    assert "tokens kept" in ops and "recomputed" in ops
    evict = next(line for line in ops.splitlines() if "│ evict" in line)
    assert [c.strip() for c in evict.split("│")[2:7]] == ["1", "0", "0", "200", "5"]
    csv = runner.invoke(app, ["report", str(run), "-f", "csv"])
    assert csv.exit_code == 0
    assert len(csv.stdout.strip().splitlines()) == 1 + 3  # header + all, interactive, batch


def test_baseline_option(tmp_path: Path) -> None:
    fcfs, qlm = write_run(tmp_path / "f", "fcfs"), write_run(tmp_path / "q", "qlm")
    result = runner.invoke(app, ["report", str(fcfs), str(qlm), "-f", "json", "--baseline", "qlm"])
    assert result.exit_code == 0 and json.loads(result.stdout)["baseline"] == "qlm"


def _one_error_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_missing_run_dir_exit_2(tmp_path: Path) -> None:
    _one_error_line(run_cli("report", str(tmp_path / "gone")), "no such run directory")


def test_truncated_parquet_exit_2(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    (run / "operations.parquet").write_bytes(b"PAR1 truncated")
    _one_error_line(run_cli("report", str(run)), "operations table")


def test_mismatched_workloads_exit_2_unless_forced(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", "fcfs", fingerprint="w1")
    b = write_run(tmp_path / "b", "qlm", fingerprint="w2")
    _one_error_line(run_cli("report", str(a), str(b)), "different workloads", "--force")
    forced = run_cli("report", str(a), str(b), "--force", "-f", "json")
    assert forced.returncode == 0 and "warning" in forced.stderr
    assert json.loads(forced.stdout)["baseline"] == "fcfs"


def test_crashed_run_warns_but_reports(tmp_path: Path) -> None:
    result = run_cli("report", str(write_run(tmp_path / "run", close=False)), "-f", "json")
    assert result.returncode == 0
    assert "warning" in result.stderr and "crash" in result.stderr
    assert json.loads(result.stdout)["complete"] is False


def test_unknown_format_exit_2(tmp_path: Path) -> None:
    _one_error_line(run_cli("report", str(write_run(tmp_path / "r")), "-f", "xml"), "--format")
