"""The command line through typer's CliRunner: help, version, errors and exit codes."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from qlmctl import __version__
from qlmctl.cli import app
from tests.helpers import run_cli

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


@pytest.mark.parametrize("command", ["profile", "plan", "serve", "report", "cluster"])
def test_every_command_has_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output and len(result.output) > 200


def test_missing_argument_is_a_usage_error() -> None:
    result = run_cli("plan")
    assert result.returncode == 2
    assert "Missing" in result.stderr


def test_malformed_yaml_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "cluster.yaml"
    bad.write_text("instances: [\n  {id: x\n")
    result = run_cli("cluster", "show", str(bad))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cluster.yaml" in lines[0] and "malformed YAML" in lines[0]
    assert "Traceback" not in result.stderr


def test_cluster_show_json() -> None:
    import json

    result = runner.invoke(
        app, ["cluster", "show", str(REPO / "workloads/cluster-sim.yaml"), "--json"]
    )
    assert result.exit_code == 0
    assert len(json.loads(result.output)["instances"]) == 4


@pytest.mark.parametrize(
    ("command", "registry"),
    [
        (["plan"], "qlmctl.plan.policies:POLICIES"),
        (["serve"], "qlmctl.plan.policies:POLICIES"),
        (["workload", "fetch"], "qlmctl.workload.datasets:DATASETS"),
        (["workload", "show"], "qlmctl.workload.traces:READERS"),
    ],
)
def test_help_lists_every_registered_name(command: list[str], registry: str) -> None:
    import importlib

    module, name = registry.split(":")
    names = list(getattr(importlib.import_module(module), name))
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())  # undo rich's wrapping
    assert ", ".join(names) in text
