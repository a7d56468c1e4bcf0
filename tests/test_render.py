"""Numbers in tables: one formatter, fixed point with thousands separators, the same
quantities as ``--json``; checked on the demo's simulated runs, as a user sees them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qlmctl.cli import app
from qlmctl.demo import run_demo
from qlmctl.render import format_cell, format_number

runner = CliRunner()
_EXPONENT = re.compile(r"\d[eE][+-]?\d")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (15850.0, "15,850"),
        (123456789.0, "123,456,789"),
        (861.8, "862"),
        (99.15, "99.2"),
        (99.97, "100"),
        (9.996, "10.0"),
        (2.254, "2.25"),
        (1.0, "1.00"),
        (0.000314, "0.000314"),
        (-3.5e-5, "-0.0000350"),
        (0.0, "0"),
        (28185, "28,185"),
        (float("inf"), "inf"),
        (float("nan"), "-"),
    ],
)
def test_format_number(value: float, text: str) -> None:
    assert format_number(value) == text


def test_cells_keep_booleans_and_text() -> None:
    assert [format_cell(v) for v in (True, None, "x", 1.585e4)] == ["True", "-", "x", "15,850"]


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The demo workload simulated under fcfs (seconds-long TTFT tails) and qlm."""
    summaries, _ = run_demo(tmp_path_factory.mktemp("demo"), ("fcfs", "qlm"), "sim")
    return [s.run_dir for s in summaries]


def test_report_on_the_demo_runs_has_no_exponents(demo_runs: list[Path]) -> None:
    table = runner.invoke(app, ["report", *map(str, demo_runs)])
    assert table.exit_code == 0, table.output
    assert not _EXPONENT.search(table.output), _EXPONENT.search(table.output)
    doc = json.loads(runner.invoke(app, ["report", str(demo_runs[0]), "-f", "json"]).output)
    p99_s = doc["per_class"]["interactive"]["p99_ttft_ms"] / 1000
    assert p99_s > 10  # a tail the old milliseconds column printed as 1.xxxe+04
    one = runner.invoke(app, ["report", str(demo_runs[0])]).output
    row = next(
        line for line in one.splitlines() if line.startswith("│ interactive") and "%" not in line
    )
    cells = [c.strip() for c in row.strip("│").split("│")]
    assert cells[3] == format_number(p99_s)  # TTFT p99, in seconds


def test_profile_tables_have_no_exponents() -> None:
    defaults = Path(__file__).resolve().parents[1] / "qlmctl" / "profile" / "defaults"
    profiles = runner.invoke(app, ["profile", "show", str(defaults)])
    assert profiles.exit_code == 0 and "(µs)" in profiles.output
    assert not _EXPONENT.search(profiles.output), _EXPONENT.search(profiles.output)
