"""`qlmctl plan` through typer's CliRunner: tables, JSON, compare, plan files, bad input."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from qlmctl.cli import app
from qlmctl.plan.types import Plan

REPO = Path(__file__).resolve().parents[1]
WORKLOAD = REPO / "workloads" / "synthetic-bursty.yaml"
CLUSTER = REPO / "workloads" / "cluster-sim.yaml"
runner = CliRunner()


def test_plan_compare_json_writes_plans(tmp_path: Path) -> None:
    args = ["plan", str(WORKLOAD), "--cluster", str(CLUSTER), "--profiles", str(tmp_path)]
    args += ["--compare", "fcfs,qlm", "--time-limit", "0.5", "--json", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data) == {"fcfs", "qlm"}
    assert 0.0 <= data["qlm"]["held_out_attainment"] <= 1.0
    plan = Plan.from_dict(json.loads((tmp_path / "synthetic-bursty-qlm.json").read_text()))
    assert plan.policy == "qlm" and plan.request_ids()


def test_plan_table_at_time(tmp_path: Path) -> None:
    args = ["plan", str(WORKLOAD), "--cluster", str(CLUSTER), "--profiles", str(tmp_path)]
    result = runner.invoke(app, [*args, "--policy", "edf", "--at", "20", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "instance a100-0" in result.output and "attainment" in result.output


def test_plan_bad_policy_is_one_line(tmp_path: Path) -> None:
    args = ["plan", str(WORKLOAD), "--cluster", str(CLUSTER), "--profiles", str(tmp_path)]
    result = runner.invoke(app, [*args, "--policy", "sjf", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "unknown policy 'sjf'" in str(result.exception)
