"""Whole runs through the simulated driver: determinism, accounting, policies compared."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from qlmctl.cli import app
from qlmctl.domain import ClusterSpec, SLOClass
from qlmctl.errors import BadInput
from qlmctl.perfmodel import PerfModel
from qlmctl.plan.policies import make_policy
from qlmctl.plan.types import Plan, QueueSnapshot
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.runlog import read_run
from qlmctl.serve.sim_driver import run_simulated
from qlmctl.specs import dump_spec
from qlmctl.workload import Workload, write_workload
from tests.helpers import SLO_CLASSES, LosingQlm, make_cluster, make_perf, make_requests

FINAL = {"finished", "rejected", "cancelled"}


def hol_workload(chat_gap_s: float = 1.0) -> Workload:
    """A burst of long batch jobs, then a stream of short interactive requests behind it."""
    batch = make_requests(80, slo_class="batch", gap_s=0.01, output_tokens=1000, prefix="b")
    chat = make_requests(
        30, slo_class="interactive", gap_s=chat_gap_s, start_s=2.0, output_tokens=20, prefix="c"
    )
    return Workload.from_requests([*batch, *chat], SLO_CLASSES, "hol")


def small_cluster() -> tuple[ClusterSpec, dict[tuple[str, str], PerfModel]]:
    cluster = make_cluster(2, models=("m1",))
    return cluster, {("m1", "G"): make_perf("m1", max_num_seqs=4)}


def run(tmp: Path, policy: str, name: str, **kw: Any) -> pd.DataFrame:
    cluster, perf = small_cluster()
    run_simulated(
        hol_workload(),
        cluster,
        perf,
        make_policy(policy),
        CoreConfig(improve=False),
        tmp / name,
        seed=3,
        **kw,
    )
    return read_run(tmp / name).requests


def final_outcomes(requests: pd.DataFrame) -> pd.Series:
    """Per request: how many attempts ended it for good (must be exactly one)."""
    last = requests.groupby("request_id")["attempt"].transform("max") == requests["attempt"]
    ends = requests["outcome"].isin(FINAL) | (requests["outcome"].eq("failed") & last)
    return requests[ends].groupby("request_id").size()


def test_same_seed_gives_identical_request_tables(tmp_path: Path) -> None:
    a = run(tmp_path, "heuristic", "a")
    b = run(tmp_path, "heuristic", "b")
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize("policy", ["qlm", "heuristic"])
def test_two_identical_serve_runs_write_identical_parquet_bytes(
    tmp_path: Path, policy: str
) -> None:
    cluster, perf = small_cluster()
    dump_spec(cluster, tmp_path / "cluster.yaml")
    (tmp_path / "profiles").mkdir()
    perf[("m1", "G")].save(tmp_path / "profiles" / "m1__G.json")
    write_workload(hol_workload(), tmp_path / "wl.parquet")
    for name in ("a", "b"):
        args = ["serve", str(tmp_path / "wl.parquet"), "-c", str(tmp_path / "cluster.yaml"),
                "--engine", "sim", "--profiles", str(tmp_path / "profiles"), "--policy", policy,
                "--runs", str(tmp_path / "runs"), "--name", name, "--seed", "3"]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    files = sorted(p.name for p in a.glob("*.parquet"))
    assert files == ["operations.parquet", "requests.parquet"]
    assert sorted(p.name for p in b.glob("*.parquet")) == files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    replans = read_run(a).operations.query("kind == 'replan'")
    assert len(replans) and replans["duration_s"].isna().all()  # no wall-clock time
    assert json.loads((a / "run.json").read_text())["solver_wall_s"] >= 0  # the total


def test_every_request_has_exactly_one_final_outcome(tmp_path: Path) -> None:
    reqs = run(tmp_path, "qlm", "q")
    counts = final_outcomes(reqs)
    assert len(counts) == 110 and set(counts) == {1}
    meta = read_run(tmp_path / "q").meta
    assert meta["complete"] and meta["engine"] == "sim" and meta["policy"] == "qlm"


@pytest.mark.parametrize("policy", ["heuristic", "qlm"])
def test_slo_aware_policies_beat_fcfs_on_head_of_line_blocking(tmp_path: Path, policy: str) -> None:
    def interactive_attainment(df: pd.DataFrame) -> float:
        fin = df[(df.outcome == "finished") & (df.slo_class == "interactive")]
        return float(fin.slo_met.sum()) / 30

    fcfs = interactive_attainment(run(tmp_path, "fcfs", "fcfs"))
    smart = interactive_attainment(run(tmp_path, policy, policy))
    assert fcfs < 0.5 and smart > fcfs + 0.3


def test_an_instance_failure_loses_nothing(tmp_path: Path) -> None:
    reqs = run(tmp_path, "heuristic", "f", failures=[(3.0, "i0")])
    assert len(final_outcomes(reqs)) == 110 and set(final_outcomes(reqs)) == {1}
    failed_attempts = reqs[reqs.outcome == "failed"]
    assert len(failed_attempts) > 0 and (failed_attempts.instance_id == "i0").all()
    again = reqs[reqs.request_id.isin(failed_attempts.request_id)]
    assert (again[again.attempt == 1].instance_id == "i1").all()  # retried on the other
    last = again.sort_values("attempt").groupby("request_id").outcome.last()
    assert (last == "finished").all()  # (evicted there for urgent work, maybe, first)
    ops = read_run(tmp_path / "f").operations
    assert "instance_down" in set(ops.kind)


def test_eviction_rescues_tight_interactive_requests(tmp_path: Path) -> None:
    slo = {
        "interactive": SLOClass(name="interactive", ttft_s=3, priority=0),
        "batch": SLOClass(name="batch", ttft_s=600, priority=10),
    }
    # interactive requests 4 s apart: each can become its instance's head before it is
    # lost (with 1 s gaps the plans shed the lost ones to the back and nothing is evicted)
    wl = Workload.from_requests(hol_workload(chat_gap_s=4.0).requests, slo, "hol-tight")
    cluster, perf = small_cluster()
    out = {}
    for evict_batch in (0, 4):
        run_dir = tmp_path / f"e{evict_batch}"
        out[evict_batch] = run_simulated(
            wl, cluster, perf, make_policy("heuristic"),
            CoreConfig(improve=False, evict_batch=evict_batch), run_dir, seed=0,
        )  # fmt: skip
    assert out[0].operations.get("evict", 0) == 0 and out[4].operations["evict"] > 0
    rescued, blocked = (out[k].attainment_by_class["interactive"] or 0.0 for k in (4, 0))
    assert rescued > blocked
    reqs = read_run(tmp_path / "e4").requests
    evicted = reqs[reqs.outcome == "evicted"]
    assert (evicted.slo_class == "batch").all()
    assert set(final_outcomes(reqs)) == {1} and out[4].finished == 110


def test_calibration_reads_an_exact_profile_as_exact(tmp_path: Path) -> None:
    # long prompts keep arriving while others decode, so decode steps carry prefill
    # chunks; the simulator runs the profile exactly, so the calibrated speed is 1
    reqs = make_requests(60, gap_s=0.05, prompt_tokens=3000, output_tokens=50)
    wl = Workload.from_requests(reqs, SLO_CLASSES, "prefill-heavy")
    cluster, perf = small_cluster()
    run_dir = tmp_path / "run"
    run_simulated(wl, cluster, perf, make_policy("heuristic"), CoreConfig(), run_dir, seed=0)
    factor = json.loads((run_dir / "run.json").read_text())["speed_factors"]["m1@G"]
    assert factor == pytest.approx(1.0, abs=0.1)


def test_serve_command_runs_the_simulator_and_reports(tmp_path: Path) -> None:
    cluster, perf = small_cluster()
    dump_spec(cluster, tmp_path / "cluster.yaml")
    (tmp_path / "profiles").mkdir()
    perf[("m1", "G")].save(tmp_path / "profiles" / "m1__G.json")
    write_workload(hol_workload(), tmp_path / "wl.parquet")
    args = ["serve", str(tmp_path / "wl.parquet"), "-c", str(tmp_path / "cluster.yaml"),
            "--engine", "sim", "--profiles", str(tmp_path / "profiles"),
            "--runs", str(tmp_path / "runs"), "--name", "x"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--policy", "edf"])
    assert result.exit_code == 0, result.output
    assert "attainment interactive" in result.output and "runs/x" in result.output
    assert read_run(tmp_path / "runs" / "x").meta["policy"] == "edf"
    again = CliRunner().invoke(app, [*args, "--policy", "edf"])
    assert isinstance(again.exception, BadInput) and "exists" in str(again.exception)
    bad = CliRunner().invoke(app, [*args[:-1], "y", "--policy", "nope"])
    assert isinstance(bad.exception, BadInput) and "unknown policy" in str(bad.exception)


def test_serve_runs_the_improver_in_the_simulator_when_asked(tmp_path: Path) -> None:
    """``--improver`` runs ``qlm``'s MILP in a simulated run, each answer a budget after
    its snapshot; by default the simulator runs without it."""
    cluster, perf = small_cluster()
    dump_spec(cluster, tmp_path / "cluster.yaml")
    (tmp_path / "profiles").mkdir()
    perf[("m1", "G")].save(tmp_path / "profiles" / "m1__G.json")
    # long prompts faster than two instances prefill them: plans lose some, so the
    # improver is offered snapshots
    flood = make_requests(100, gap_s=0.02, prompt_tokens=8000)
    write_workload(Workload.from_requests(flood, SLO_CLASSES, "flood"), tmp_path / "wl.parquet")
    args = ["serve", str(tmp_path / "wl.parquet"), "-c", str(tmp_path / "cluster.yaml"),
            "--engine", "sim", "--profiles", str(tmp_path / "profiles"),
            "--runs", str(tmp_path / "runs"), "--policy", "qlm"]  # fmt: skip
    answers = {}
    for flag in ("--improver", "--no-improver"):
        result = CliRunner().invoke(app, [*args, flag, "--name", flag[2:]])
        assert result.exit_code == 0, result.output
        run = read_run(tmp_path / "runs" / flag[2:])
        replans = run.operations[run.operations["kind"] == "replan"]
        details = [json.loads(d) for d in replans["detail"]]
        answers[flag] = [t for t, d in zip(replans["time_s"], details, strict=True)
                         if d.get("source") == "improver"]  # fmt: skip
        assert run.meta["config"]["improve"] == (flag == "--improver")
    assert len(answers["--improver"]) >= 1 and answers["--no-improver"] == []


def test_the_improvers_answer_arrives_as_long_after_its_snapshot_as_the_solve_took(
    tmp_path: Path,
) -> None:
    solve_s = 0.05
    asked_at: list[float] = []

    class SlowImprover(LosingQlm):
        def improve(self, snapshot: QueueSnapshot, budget_s: float, rng: Any) -> Plan | None:
            asked_at.append(snapshot.now_s)
            time.sleep(solve_s)
            return None

    cluster, perf = small_cluster()
    config = CoreConfig(improve=True, improve_min_interval_s=1.0)
    run_simulated(hol_workload(), cluster, perf, SlowImprover(), config, tmp_path / "r")
    ops = read_run(tmp_path / "r").operations
    answers = [
        t
        for t, d in zip(ops["time_s"], ops["detail"], strict=True)
        if json.loads(d).get("source") == "improver"
    ]
    assert len(answers) == len(asked_at) >= 3
    delays = [a - b for a, b in zip(answers, asked_at, strict=True)]
    assert min(delays) >= solve_s


def test_answers_at_the_budget_come_a_budget_after_their_snapshot_and_runs_repeat(
    tmp_path: Path,
) -> None:
    """With ``answer_at_budget``, every answer of ``qlm``'s improver reaches the core its
    whole budget after its snapshot, however long the solve took, and the run repeats to
    the byte (its answers no longer come when the wall clock says)."""
    asked_at: list[float] = []

    class Recording(LosingQlm):
        def improve(self, snapshot: QueueSnapshot, budget_s: float, rng: Any) -> Plan | None:
            asked_at.append(snapshot.now_s)
            return super().improve(snapshot, budget_s, rng)

    cluster, perf = small_cluster()
    config = CoreConfig(improve=True, improve_min_interval_s=1.0)
    for run_name in ("a", "b"):
        policy = Recording(time_limit_s=0.5, answer_at_budget=True)
        run_simulated(hol_workload(), cluster, perf, policy, config, tmp_path / run_name)
    ops = read_run(tmp_path / "a").operations
    answers = [
        t
        for t, d in zip(ops["time_s"], ops["detail"], strict=True)
        if json.loads(d).get("source") == "improver"
    ]
    assert len(answers) >= 3
    delays = [a - b for a, b in zip(answers, asked_at[: len(answers)], strict=True)]  # run a
    assert delays == pytest.approx([0.5] * len(answers))
    for name in ("requests.parquet", "operations.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
