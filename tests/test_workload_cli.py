"""`qlmctl workload build` and `show` through typer's CliRunner, and the shipped specs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qlmctl.cli import app
from qlmctl.workload import load_workload
from qlmctl.workload.datasets import installed_path
from tests.trace_data import azure_rows

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def test_build_then_show_json(tmp_path: Path) -> None:
    out = tmp_path / "demo.parquet"
    result = runner.invoke(
        app, ["workload", "build", str(REPO / "workloads/demo.yaml"), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    spec_w, file_w = load_workload(REPO / "workloads/demo.yaml"), load_workload(out)
    assert spec_w.fingerprint == file_w.fingerprint
    result = runner.invoke(app, ["workload", "show", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["count"] == len(spec_w.requests)
    overall = data["groups"][-1]
    assert (overall["slo_class"], overall["model"]) == ("all", "all")
    assert sum(g["count"] for g in data["groups"] if g["model"] != "all") == data["count"]


def test_show_table(tmp_path: Path) -> None:
    result = runner.invoke(app, ["workload", "show", str(REPO / "workloads/demo.yaml")])
    assert result.exit_code == 0, result.output
    assert "interactive" in result.output and "tiny-a" in result.output
    assert "arrival rate" in result.output


def test_show_azure_conv_prints_its_rate() -> None:
    result = runner.invoke(
        app, ["workload", "show", str(REPO / "workloads/azure-conv.yaml"), "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    rows = azure_rows(installed_path("azure-2023-conv"))
    assert data["count"] == len(rows)
    rate = len(rows) / (rows[-1][0] - rows[0][0]).total_seconds()
    assert data["groups"][-1]["rate_per_s"] == pytest.approx(rate)


def test_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "models: [m]\nsources: [{name: s, trace: {format: azure, path: x.csv}, "
        "model: m, slo_class: interactive}]\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from qlmctl.cli import main; main()",
            "workload",
            "show",
            str(spec),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "x.csv: file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_failed_build_writes_nothing(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("models: [m]\nsources: []\n")
    out = tmp_path / "out.parquet"
    result = runner.invoke(app, ["workload", "build", str(spec), "-o", str(out)])
    assert result.exit_code != 0
    assert not out.exists() and list(tmp_path.iterdir()) == [spec]


@pytest.mark.parametrize("name", ["demo", "azure-conv", "azure-mixed", "synthetic-bursty"])
def test_shipped_specs_load(name: str) -> None:
    w = load_workload(REPO / "workloads" / f"{name}.yaml")
    assert len(w.requests) > 50
    assert [r.arrival_s for r in w.requests] == sorted(r.arrival_s for r in w.requests)


def test_demo_fits_the_tiny_models() -> None:
    w = load_workload(REPO / "workloads/demo.yaml")
    assert 300 <= len(w.requests) <= 500  # two bursts of batch jobs, a stream of chat
    assert w.models == {"tiny-a", "tiny-b"}
    assert {r.slo_class for r in w.requests} == {"interactive", "batch"}
    assert all(r.prompt_tokens + r.max_output_tokens <= 480 for r in w.requests)
    assert all(
        50 <= r.prompt_tokens <= 200 and 16 <= r.target_output_tokens <= 400 for r in w.requests
    )
    assert w.duration_s <= 60
