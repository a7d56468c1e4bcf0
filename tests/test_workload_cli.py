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
from tests.helpers import run_cli
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


def test_show_a_raw_azure_trace() -> None:
    path = installed_path("azure-2023-code")
    result = runner.invoke(app, ["workload", "show", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    rows = azure_rows(path)
    assert data["count"] == len(rows)
    assert data["duration_s"] == pytest.approx((rows[-1][0] - rows[0][0]).total_seconds())
    assert [(g["slo_class"], g["model"]) for g in data["groups"]] == [
        ("unassigned", "unassigned"),
        ("all", "all"),
    ]


def test_show_a_length_sample_has_no_rates() -> None:
    result = runner.invoke(app, ["workload", "show", str(installed_path("arxiv-lengths"))])
    assert result.exit_code == 0, result.output
    assert "no arrival times" in result.output and "arrival rate" not in result.output


@pytest.mark.parametrize(
    ("name", "text", "count"),
    [
        ("m.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 2}\n' * 3, 3),
        ("c.jsonl", '{"prompt": "hello there"}\n{"prompt": "a b c", "output_tokens": 4}\n', 2),
        ("s.json", '[{"conversations": [{"value": "hi"}, {"value": "hello"}]}]', 1),
        ("l.txt", "num_prefill_tokens,num_decode_tokens\n3,4\n", 1),  # given --format
    ],
)
def test_show_sniffs_the_trace_format(tmp_path: Path, name: str, text: str, count: int) -> None:
    path = tmp_path / name
    path.write_text(text)
    extra = ["--format", "csv"] if name.endswith(".txt") else []
    result = runner.invoke(app, ["workload", "show", str(path), "--json", *extra])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["count"] == count


def test_show_an_unknown_trace_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "odd.csv"
    path.write_text("when,tokens\n1,2\n")
    proc = run_cli("workload", "show", str(path))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "odd.csv: cannot tell the trace format" in lines[0] and "--format" in lines[0]
