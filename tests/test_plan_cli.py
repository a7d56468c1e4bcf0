"""`qlmctl plan` through typer's CliRunner: tables, JSON, compare, plan files, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qlmctl.cli import app
from qlmctl.plan import heuristics as H
from qlmctl.plan.policies import POLICIES, BasePolicy, to_plan
from qlmctl.plan.simulate import simulate
from qlmctl.plan.types import Plan, QueueSnapshot, ServingStyle, SolverStats

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


def test_plan_forecasts_dispatch_as_the_core_sends(tmp_path: Path) -> None:
    """`qlmctl plan` plans each policy with the caps the core serves it with: a queue
    policy's request is sent once fewer than two wait in the engine (never before the
    prompt two places ahead enters the pipeline); a router sends every request as soon
    as a slot is free, ahead of the pipeline."""
    args = ["plan", str(WORKLOAD), "--cluster", str(CLUSTER), "--profiles", str(tmp_path)]
    result = runner.invoke(
        app, [*args, "--compare", "edf,fcfs", "--at", "20", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output

    def sent_ahead(policy: str) -> int:
        """Requests forecast to be sent before the prompt two places ahead enters."""
        path = tmp_path / f"synthetic-bursty-{policy}.json"
        plan = Plan.from_dict(json.loads(path.read_text()))
        count = 0
        for ip in plan.instances:
            sent = [t for g in ip.groups for t in g.request_dispatch_s]
            start = [t for g in ip.groups for t in g.request_start_s]
            count += sum(d < s - 1e-9 for d, s in zip(sent[2:], start, strict=False))
        return count

    assert sent_ahead("edf") == 0
    assert sent_ahead("fcfs") > 0


def test_plan_bad_policy_is_one_line(tmp_path: Path) -> None:
    args = ["plan", str(WORKLOAD), "--cluster", str(CLUSTER), "--profiles", str(tmp_path)]
    result = runner.invoke(app, [*args, "--policy", "sjf", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "unknown policy 'sjf'" in str(result.exception)


class NewestFirst(BasePolicy):
    """A policy added the way the README says: one class (here, newest group first)."""

    name = "newest-first"
    serving = ServingStyle(evicts=False)

    def plan(self, snapshot: QueueSnapshot, rng: np.random.Generator) -> Plan:
        ctx = self.prepare(snapshot, rng)
        order = sorted(range(ctx.problem.num_groups), key=lambda g: -ctx.problem.release_s[g])
        queues = H.greedy_place(ctx.problem, ctx.mean, order)
        score = simulate(ctx.problem, ctx.scen, queues)
        return to_plan(ctx, self.name, queues, score, SolverStats(chosen=self.name))


def test_a_new_policy_is_one_class_and_one_registry_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(POLICIES, "newest-first", NewestFirst)  # the registry line
    profiles, plans, runs = tmp_path / "profiles", tmp_path / "plans", tmp_path / "runs"
    profiles.mkdir()
    common = [str(WORKLOAD), "-c", str(CLUSTER), "--profiles", str(profiles)]
    result = runner.invoke(app, ["plan", *common, "--policy", "newest-first", "--out", str(plans)])
    assert result.exit_code == 0, result.output
    plan = Plan.from_dict(json.loads((plans / "synthetic-bursty-newest-first.json").read_text()))
    assert plan.policy == "newest-first" and plan.request_ids()
    serve = [*common, "--engine", "sim", "--policy", "newest-first", "--runs", str(runs)]
    result = runner.invoke(app, ["serve", *serve])
    assert result.exit_code == 0, result.output
    (run,) = runs.iterdir()
    data = json.loads((run / "run.json").read_text())
    assert data["policy"] == "newest-first" and data["config"]["evict_batch"] == 0
