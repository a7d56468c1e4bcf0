"""Parity: one trace through both drivers (simulated engine; real driver against fake vLLM
servers) gives the same decisions: the same dispatches per instance, in the same order,
and the same loads and evictions."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlmctl.domain import ClusterSpec, Request, SLOClass
from qlmctl.engine.events import Action, Dispatch, Evict, LoadModel
from qlmctl.plan.policies import make_policy
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.core import ServeCore
from qlmctl.serve.real_driver import RealOptions, run_real
from qlmctl.serve.runlog import read_run
from qlmctl.serve.sim_driver import run_simulated
from qlmctl.workload import Workload
from tests.gateway_helpers import fake_vllm
from tests.helpers import make_cluster, make_perf

# deadlines far enough that no plan sheds or evicts on account of the host's speed
SLO = {
    "interactive": SLOClass(name="interactive", ttft_s=60, priority=0),
    "batch": SLOClass(name="batch", ttft_s=600, priority=10),
}


def burst() -> Workload:
    """One burst at t=0: both models, batch and interactive requests interleaved, so the
    plan (EDF: interactive first) and backpressure decide the order, not arrival."""
    reqs = [
        Request(id=f"r{k:02d}", arrival_s=0.0, model=f"m{k % 2 + 1}",
                slo_class="batch" if k % 3 else "interactive", prompt="hello",
                prompt_tokens=5, max_output_tokens=6, output_tokens=6)
        for k in range(24)
    ]  # fmt: skip
    return Workload.from_requests(reqs, SLO, "parity")


def pinned_cluster() -> ClusterSpec:
    """Two instances, each serving only its resident model (as attached ones are driven)."""
    cluster = make_cluster(2)
    pinned = [i.model_copy(update={"models": [i.model]}) for i in cluster.instances]
    return cluster.model_copy(update={"instances": pinned})


def decisions(actions: list[Action]) -> dict[str, list[tuple[str, str]]]:
    """Per instance, in order: (kind, request id or model) of every action."""
    out: dict[str, list[tuple[str, str]]] = {}
    for a in actions:
        if isinstance(a, Dispatch | Evict):
            out.setdefault(a.instance_id, []).append((type(a).__name__, a.request_id))
        elif isinstance(a, LoadModel):
            out.setdefault(a.instance_id, []).append(("LoadModel", a.model))
    return out


def test_one_trace_gives_the_same_decisions_in_both_drivers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Action] = []
    decide = ServeCore.decide

    def recorded(core: ServeCore, now_s: float) -> list[Action]:
        actions = decide(core, now_s)
        seen.extend(actions)
        return actions

    monkeypatch.setattr(ServeCore, "decide", recorded)
    workload, cluster = burst(), pinned_cluster()
    perf = {(m, "G"): make_perf(m) for m in ("m1", "m2")}
    policy = make_policy("edf")
    config = CoreConfig.for_policy(policy, improve=False, max_inflight=2)

    run_simulated(workload, cluster, perf, policy, config, tmp_path / "sim", seed=1)
    sim, seen[:] = decisions(seen), []
    options = RealOptions(transport=fake_vllm(token_delay_s=0.005), metrics_interval_s=0.05)
    run_real(workload, cluster, perf, policy, config, tmp_path / "real", 1, options=options)
    real = decisions(seen)

    assert real == sim
    dispatched = [rid for acts in sim.values() for kind, rid in acts if kind == "Dispatch"]
    assert sorted(dispatched) == [r.id for r in workload.requests]  # each once: no evictions
    first_on_i0 = [rid for _, rid in sim["i0"][:4]]
    assert first_on_i0 == ["r00", "r06", "r12", "r18"]  # m1's interactive requests first
    for run_dir in ("sim", "real"):
        final = read_run(tmp_path / run_dir).final_attempts
        assert (final.outcome == "finished").all() and len(final) == 24
