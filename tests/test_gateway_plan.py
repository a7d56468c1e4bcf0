"""A Batch file planned ahead (`qlmctl plan batch.jsonl`), then run by a gateway with
`--plan` (fake vLLM): its lines keep their custom_ids and run in the plan's order."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from qlmctl.errors import BadInput
from qlmctl.gateway.batchplan import batch_workload
from qlmctl.gateway.client import submit_batch
from qlmctl.plan.planfile import plan_meta
from qlmctl.plan.planner import snapshot_from_workload
from qlmctl.plan.policies import make_policy
from qlmctl.plan.types import InstancePlan, Plan
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.follow import PlanFollower
from qlmctl.serve.runlog import read_run
from qlmctl.workload import load_workload
from tests.gateway_helpers import fake_job, fake_vllm, running_gateway
from tests.helpers import make_cluster, make_perf
from tests.planrun_helpers import order_violations
from tests.test_gateway_batches import wait_done


def write_lines(path: Path, n: int, max_tokens: int = 4) -> Path:
    lines = [
        {"custom_id": f"job-{k}", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m1" if k % 2 else "m2", "prompt": "x" * (40 + 8 * k),
                  "max_tokens": max_tokens}}
        for k in range(n)
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def reversed_plan(path: Path) -> Plan:
    """The edf plan of the batch file, each instance's requests in reverse (an order edf
    would never pick; every line has a day, so it predicts as well)."""
    workload = load_workload(path)  # a Batch input file reads as a workload
    cluster = make_cluster(2)
    perf = {(m, "G"): make_perf(m) for m in ("m1", "m2")}
    plan = make_policy("edf").plan(
        snapshot_from_workload(workload, cluster, perf), np.random.default_rng(0)
    )
    flipped = tuple(
        InstancePlan(
            ip.instance_id,
            tuple(
                dataclasses.replace(
                    g,
                    request_ids=g.request_ids[::-1],
                    request_start_s=g.request_start_s[::-1],
                    request_miss_probability=g.request_miss_probability[::-1],
                )
                for g in reversed(ip.groups)
            ),
        )
        for ip in plan.instances
    )
    meta = plan_meta(workload, cluster, perf, {}, 0, None)
    return dataclasses.replace(plan, instances=flipped, meta=meta)


def test_batch_file_reads_as_a_workload_and_bad_lines_are_one_line(tmp_path: Path) -> None:
    wl = load_workload(write_lines(tmp_path / "b.jsonl", 6))
    assert [r.id for r in wl.requests] == sorted(f"job-{k}" for k in range(6))
    assert {r.slo_class for r in wl.requests} == {"window-24h"}
    assert {r.arrival_s for r in wl.requests} == {0.0}
    assert wl.slo_classes["window-24h"].ttft_s == 86400
    bad = tmp_path / "bad.jsonl"
    good = write_lines(tmp_path / "c.jsonl", 2).read_text().splitlines()
    bad.write_text("\n".join([*good, good[0]]) + "\n")
    with pytest.raises(BadInput, match=r"bad.jsonl line 3: duplicate custom_id 'job-0'"):
        batch_workload(bad)
    # JSON Lines break at LF only: a raw U+2028 inside a prompt is text, not a line break
    odd = tmp_path / "odd.jsonl"
    lines = [json.loads(line) for line in good]
    lines[0]["body"]["prompt"] = "a\u2028b\x85c"
    odd.write_text("\r\n".join(json.dumps(line, ensure_ascii=False) for line in lines))
    assert len(batch_workload(odd).requests) == 2


def test_gateway_runs_the_planned_batch_in_plan_order(tmp_path: Path) -> None:
    batch_file = write_lines(tmp_path / "in.jsonl", 12)
    plan = reversed_plan(batch_file)
    job = dataclasses.replace(
        fake_job(tmp_path, fake_vllm(token_delay_s=0.01)),
        policy=PlanFollower(make_policy("edf"), plan),
        config=CoreConfig(improve=False, max_inflight=1),  # one at a time: order is visible
    )
    with running_gateway(job) as gw:
        batch = submit_batch(gw.base_url, batch_file)
        assert wait_done(gw.base_url, batch["id"])["request_counts"]["completed"] == 12
        with pytest.raises(BadInput, match="already submitted"):
            submit_batch(gw.base_url, batch_file)
        other = submit_batch(gw.base_url, write_lines(tmp_path / "other.jsonl", 4, max_tokens=3))
        assert wait_done(gw.base_url, other["id"])["request_counts"]["completed"] == 4
    log = read_run(tmp_path / "run")
    df = log.requests
    planned = df[df["request_id"].str.startswith("job-")]
    assert sorted(planned["request_id"]) == sorted(f"job-{k}" for k in range(12))
    assert order_violations(plan, planned) == []
    # the plan's times start at the submission, not at the gateway's start
    assert (planned["predicted_start_s"] >= planned["arrival_s"].min() - 0.05).all()
    assert df["request_id"].str.startswith("gw-").sum() == 4  # the unplanned batch
    details = log.operations[log.operations["kind"] == "replan"]["detail"].map(json.loads)
    assert {d["chosen"] for d in details} == {"committed"}


def test_gateway_plan_for_another_cluster_is_refused(tmp_path: Path) -> None:
    from qlmctl.gateway.command import prepare_gateway

    batch_file = write_lines(tmp_path / "in.jsonl", 4)
    plan_path = tmp_path / "p.json"
    reversed_plan(batch_file).save(plan_path)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        "gpu_types: [{name: G}]\nmodels: [{name: m1, path: /m1}, {name: m2, path: /m2}]\n"
        "instances: [{id: i0, gpu: G, endpoint: 'http://127.0.0.1:1', model: m1}]\n"
    )
    for m in ("m1", "m2"):
        make_perf(m).save(tmp_path / "profiles" / f"{m}@G.json")
    with pytest.raises(BadInput, match="planned for instances i0, i1, the cluster has i0"):
        prepare_gateway(
            cluster, plan=plan_path, runs=tmp_path / "runs", profiles=tmp_path / "profiles"
        )
    cluster.write_text(
        cluster.read_text().replace(
            "model: m1}]",
            "model: m1}, {id: i1, gpu: G, endpoint: 'http://127.0.0.1:2', model: m2}]",
        )
    )
    job = prepare_gateway(
        cluster, plan=plan_path, runs=tmp_path / "runs", profiles=tmp_path / "profiles"
    )
    assert isinstance(job.policy, PlanFollower) and job.policy.name == "edf"
    assert job.meta is not None and job.meta["batch_plan"] == str(plan_path.resolve())
