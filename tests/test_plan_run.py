"""Plan, then run that plan: `plan` -> `serve --plan` -> `report --plan` on the simulator."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from qlmctl.plan.planfile import load_plan
from qlmctl.plan.planner import plan_workload, snapshot_from_workload
from qlmctl.plan.policies import make_policy
from qlmctl.plan.types import InstancePlan, Plan
from qlmctl.profile.store import ProfileStore
from qlmctl.report.planned import compare_plan
from qlmctl.serve.command import prepare_serve
from qlmctl.serve.follow import KEPT, REPLANNED, PlanFollower
from qlmctl.serve.runlog import read_run
from qlmctl.serve.sim_driver import run_simulated
from qlmctl.specs import load_cluster
from qlmctl.workload import load_workload
from tests.helpers import run_cli
from tests.planrun_helpers import demo_batch, order_violations, sim_cluster


def _plan(tmp_path: Path, workload: Path, cluster: Path, policy: str, **options: object) -> Path:
    plan_workload(
        workload, cluster, tmp_path / "profiles", [policy],
        {"time_limit_s": 2.0, **options}, 0, None, tmp_path / "plans",
    )  # fmt: skip
    return tmp_path / "plans" / f"{workload.stem}-{policy}.json"


def _batch_last_first(plan: Plan) -> Plan:
    """``plan`` with each instance's batch groups in reverse: a schedule its policy would
    not choose itself, as good on this batch (every batch job has a minute)."""

    def rev(ip: InstancePlan) -> InstancePlan:
        first = [g for g in ip.groups if g.slo_class == "interactive"]
        rest = [g for g in ip.groups if g.slo_class != "interactive"]
        return InstancePlan(ip.instance_id, tuple(first + rest[::-1]))

    return dataclasses.replace(plan, instances=tuple(rev(ip) for ip in plan.instances))


@pytest.mark.parametrize("policy", ["qlm", "edf"])
def test_true_lengths_dispatch_in_plan_order_and_report_no_departure(
    tmp_path: Path, policy: str
) -> None:
    """A Batch-file-like workload (all queued at t=0), planned with the true lengths: the
    simulated run dispatches every request on its planned instance in planned order, for
    the plan as written and for a hand-edited order the policy would not pick itself."""
    workload, cluster = demo_batch(tmp_path, 240), sim_cluster(tmp_path)
    plan_path = _plan(tmp_path, workload, cluster, policy, clairvoyant=True)
    edited_path = tmp_path / "plans" / "edited.json"
    original = load_plan(plan_path)
    _batch_last_first(original).save(edited_path)
    for name, path in (("run", plan_path), ("edited", edited_path)):
        job = prepare_serve(
            workload, cluster, policy=None, engine="sim", profiles=tmp_path / "profiles",
            runs=tmp_path / "runs", name=name, plan=path,
        )  # fmt: skip
        assert job.run().finished == 240
        plan, log = load_plan(path), read_run(tmp_path / "runs" / name)
        assert len(plan.request_ids()) == 240
        assert order_violations(plan, log.requests) == []
        assert log.meta["plan"] == str(path.resolve())
        replans = log.operations[log.operations["kind"] == "replan"]["detail"].map(json.loads)
        assert len(replans) and {d["chosen"] for d in replans} == {KEPT}
        cmp = compare_plan(plan, log, str(path))
        assert cmp.followed == 1.0 and cmp.departures.empty
        assert cmp.swaps["planned_swaps"].tolist() == cmp.swaps["done_swaps"].tolist()
        assert int(cmp.misses["requests"].sum()) == 240
    # the edited run followed the file, not a re-plan: it broke the policy's own order
    assert len(order_violations(original, read_run(tmp_path / "runs" / "edited").requests)) > 20


def test_departures_under_an_instance_failure_all_carry_a_reason(tmp_path: Path) -> None:
    """Requests arriving over time, estimated lengths, and one instance failing: the run
    leaves the plan, and every departure names a logged reason."""
    workload = demo_batch(tmp_path, 200, at_zero=False, name="stream")
    spec = yaml.safe_load(sim_cluster(tmp_path).read_text())
    for inst in spec["instances"]:
        inst.pop("models")  # either instance may serve either model: work can move
    cluster = tmp_path / "shared.yaml"
    cluster.write_text(yaml.safe_dump(spec))
    plan_path = _plan(tmp_path, workload, cluster, "qlm")
    job = prepare_serve(
        workload, cluster, policy="qlm", engine="sim", profiles=tmp_path / "profiles",
        runs=tmp_path / "runs", name="run", plan=plan_path,
    )  # fmt: skip
    run_simulated(
        job.workload, job.cluster, job.perf, job.policy, job.config, job.run_dir, job.seed,
        meta=job.meta, failures=[(12.0, "cpu-1")],
    )  # fmt: skip
    cmp = compare_plan(load_plan(plan_path), read_run(job.run_dir), str(plan_path))
    d = cmp.departures
    assert (d["kind"] == "instance").sum() > 0  # cpu-1's planned work ran on cpu-0
    assert not d["why"].str.contains("unexplained").any(), d[d["why"] == "unexplained"]
    moved = d[d["kind"] == "instance"]
    assert moved["why"].str.contains("cpu-1 down|left the plan").all()
    assert cmp.followed is not None and cmp.followed < 1.0


def test_hysteresis_keeps_the_plan_unless_a_change_gains_the_margin(tmp_path: Path) -> None:
    """A committed plan that puts everything on one instance in reverse order: a fresh
    plan beats it by far, so it is left at margin 0.05 and kept at margin 1."""
    workload, cluster_path = demo_batch(tmp_path, 60), sim_cluster(tmp_path)
    wl, cluster = load_workload(workload), load_cluster(cluster_path)
    perf = ProfileStore.load(tmp_path / "profiles").for_cluster(cluster)
    snap = snapshot_from_workload(wl, cluster, perf)
    inner = make_policy("edf")
    good = inner.plan(snap, np.random.default_rng(0))
    groups = [g for ip in good.instances for g in ip.groups if g.model == "tiny-a"]
    bad = dataclasses.replace(
        good,
        instances=tuple(
            InstancePlan(ip.instance_id, tuple(reversed(groups)) if ip.instance_id == "cpu-0"
                         else tuple(g for g in ip.groups if g.model != "tiny-a"))
            for ip in good.instances
        ),
    )  # fmt: skip
    kept = PlanFollower(make_policy("edf"), bad, margin=1.0).plan(snap, np.random.default_rng(0))
    assert kept.solver.chosen == KEPT
    assert [g.group_id for g in kept.instances[0].groups] == [g.group_id for g in reversed(groups)]
    follower = PlanFollower(make_policy("edf"), bad, margin=0.05)
    left = follower.plan(snap, np.random.default_rng(0))
    assert left.solver.chosen == REPLANNED and "left the plan" in left.solver.note
    assert left.solver.scores["fresh"] > left.solver.scores[KEPT] + 0.05
    assert follower.departures == 1 and follower.committed.request_ids() == left.request_ids()


def test_cli_plan_serve_report_and_mismatches_exit_2(tmp_path: Path) -> None:
    workload, cluster = demo_batch(tmp_path, 80), sim_cluster(tmp_path)
    other = demo_batch(tmp_path, 81, name="other")
    prof = ["--profiles", str(tmp_path / "profiles")]
    out = run_cli("plan", str(workload), "-c", str(cluster), *prof, "--policy", "edf",
                  "--out", str(tmp_path / "plans"), "--clairvoyant", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    plan_path = tmp_path / "plans" / "batch-edf.json"
    meta = json.loads(plan_path.read_text())["meta"]
    assert meta["policy_options"]["clairvoyant"] is True and meta["requests"] == 80
    assert set(meta["profiles"]) == {"tiny-a@cpu", "tiny-b@cpu"}
    serve = ["serve", "-c", str(cluster), *prof, "--engine", "sim", "--runs", str(tmp_path / "r")]

    def refused(*args: str) -> str:
        res = run_cli(*serve, *args)
        assert res.returncode == 2, res.stdout + res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        return lines[0]

    assert "another workload" in refused(str(other), "--plan", str(plan_path))
    assert "policy 'edf', not 'qlm'" in refused(
        str(workload), "--plan", str(plan_path), "-p", "qlm"
    )
    assert "no such plan file" in refused(str(workload), "--plan", str(tmp_path / "nope.json"))
    spec = yaml.safe_load(cluster.read_text())
    spec["instances"][1]["id"] = "cpu-9"
    moved = tmp_path / "moved.yaml"
    moved.write_text(yaml.safe_dump(spec))
    line = run_cli(*serve[:2], str(moved), *serve[3:], str(workload), "--plan", str(plan_path))
    assert line.returncode == 2 and "planned for instances cpu-0, cpu-1" in line.stderr
    tiny = json.loads((tmp_path / "profiles" / "tiny@cpu.json").read_text())
    tiny["max_num_seqs"] = 8
    (tmp_path / "p2").mkdir()
    (tmp_path / "p2" / "tiny@cpu.json").write_text(json.dumps(tiny))
    res = run_cli(*serve[:3], "--profiles", str(tmp_path / "p2"), *serve[5:], str(workload),
                  "--plan", str(plan_path))  # fmt: skip
    assert res.returncode == 2 and "profile tiny-a@cpu differs" in res.stderr, res.stderr
    assert not any((tmp_path / "r").glob("*/requests.parquet"))  # nothing started

    ok = run_cli(*serve, str(workload), "--plan", str(plan_path), "--name", "run")
    assert ok.returncode == 0, ok.stderr
    rep = run_cli("report", str(tmp_path / "r" / "run"), "--format", "json")
    assert rep.returncode == 0, rep.stderr
    planned = json.loads(rep.stdout)["plan"]
    assert planned["followed"] == 1.0 and planned["departures"] == []
    assert len(planned["groups"]) >= 2 and {"predicted_start_s", "observed_start_s"} <= set(
        planned["groups"][0]
    )
    table = run_cli("report", str(tmp_path / "r" / "run"), "--plan", str(plan_path),
                    "--out", str(tmp_path / "html"))  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "never: the run followed the plan" in table.stdout
    assert (tmp_path / "html" / "1-edf-plan.png").stat().st_size > 0
    wrong = _plan(tmp_path, other, cluster, "edf")
    bad = run_cli("report", str(tmp_path / "r" / "run"), "--plan", str(wrong))
    assert bad.returncode == 2 and "planned for workload" in bad.stderr
