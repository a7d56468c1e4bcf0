"""The real driver against fake vLLM servers (httpx.MockTransport): no vLLM needed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx

from qlmctl.domain import Request
from qlmctl.engine.events import Aborted, Dispatch, Evict
from qlmctl.plan.policies import make_policy
from qlmctl.plan.types import Policy
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.real_driver import RealDriver, RealOptions, run_real
from qlmctl.serve.run import RunSummary
from qlmctl.serve.runlog import read_run
from qlmctl.workload import Workload
from tests.helpers import SLO_CLASSES, LosingQlm, make_cluster, make_perf


def fake_vllm(
    token_delay_s: float = 0.0,
    bodies: list[dict] | None = None,
    refuses: Callable[[httpx.Request], bool] = lambda _r: False,
) -> httpx.MockTransport:
    """Serves m1 and m2; prompt 'REJECT' gets HTTP 400, 'FAIL' HTTP 500, others stream.
    Completion request bodies go to ``bodies`` if given; a request ``refuses`` picks gets
    its connection refused."""

    async def stream(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            await asyncio.sleep(token_delay_s)
            chunk = {"choices": [{"text": "x", "token_ids": [7], "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': n}})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    async def handler(request: httpx.Request) -> httpx.Response:
        if refuses(request):
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m1"}, {"id": "m2"}]})
        if path == "/metrics":
            return httpx.Response(200, text="vllm:num_requests_waiting 0\n")
        body = json.loads(request.content)
        if bodies is not None:
            bodies.append(body)
        if body["prompt"] == "REJECT":
            return httpx.Response(400, json={"error": {"message": "prompt too long"}})
        if body["prompt"] == "FAIL":
            return httpx.Response(500, text="boom")
        return httpx.Response(200, content=stream(body["max_tokens"]))

    return httpx.MockTransport(handler)


def requests(n: int, gap_s: float, prompts: dict[int, str] | None = None) -> list[Request]:
    prompts = prompts or {}
    return [
        Request(id=f"r{k}", arrival_s=k * gap_s, model=f"m{k % 2 + 1}", slo_class="interactive",
                prompt=prompts.get(k, "hello"), prompt_tokens=5, max_output_tokens=8,
                output_tokens=8)
        for k in range(n)
    ]  # fmt: skip


def run(
    tmp: Path,
    reqs: list[Request],
    policy: Policy | None = None,
    delay: float = 0.0,
    bodies: list[dict] | None = None,
) -> RunSummary:
    perf = {(m, "G"): make_perf(m) for m in ("m1", "m2")}
    options = RealOptions(transport=fake_vllm(delay, bodies), metrics_interval_s=0.05)
    return run_real(
        Workload.from_requests(reqs, SLO_CLASSES, "fake"), make_cluster(2), perf,
        policy or make_policy("heuristic"), CoreConfig(improve_min_interval_s=0.0),
        tmp / "run", options=options,
    )  # fmt: skip


def test_requests_stream_concurrently_and_faults_end_properly(tmp_path: Path) -> None:
    reqs = requests(20, 0.05, {3: "REJECT", 4: "FAIL"})
    bodies: list[dict] = []
    run(tmp_path, reqs, policy=LosingQlm(time_limit_s=0.2), bodies=bodies)
    log = read_run(tmp_path / "run")
    # replayed requests stream several tokens a chunk (RealOptions.stream_interval)
    assert bodies and {b.get("stream_interval") for b in bodies} == {RealOptions().stream_interval}
    df = log.requests
    assert log.complete and set(df.request_id) == {r.id for r in reqs}
    rejected = df[df.request_id == "r3"]
    assert list(rejected.outcome) == ["rejected"] and "prompt too long" in rejected.reason.iloc[0]
    failed = df[df.request_id == "r4"].sort_values("attempt")
    assert list(failed.outcome) == ["failed"] * 3 and "gave up" in failed.reason.iloc[-1]
    done = df[df.outcome == "finished"]
    assert len(done) == 18 and (done.output_tokens == 8).all() and done.itl_max_s.notna().all()
    sources = [json.loads(d).get("source") for d in log.operations.detail.dropna()]
    assert "improver" in sources  # the MILP ran in a worker thread beside the loop


def test_an_endpoint_that_refuses_connections_is_down_until_it_serves_again(
    tmp_path: Path,
) -> None:
    # i1 refuses every connection for 0.6 s of the run, as a restarting server does
    start: list[float] = []  # the first request of the run (the endpoints' check)

    def restarting(request: httpx.Request) -> bool:
        start[:] = start or [time.monotonic()]
        return request.url.port == 8101 and 0.3 < time.monotonic() - start[0] < 0.9

    reqs = [
        Request(id=f"r{k}", arrival_s=0.02 * k, model="m1", slo_class="interactive",
                prompt="hello", prompt_tokens=5, max_output_tokens=8, output_tokens=8)
        for k in range(80)
    ]  # fmt: skip
    options = RealOptions(transport=fake_vllm(0.01, refuses=restarting), metrics_interval_s=0.2)
    run_real(
        Workload.from_requests(reqs, SLO_CLASSES, "fake"), make_cluster(2, ("m1",)),
        {("m1", "G"): make_perf("m1")}, make_policy("heuristic"), CoreConfig(),
        tmp_path / "run", options=options,
    )  # fmt: skip
    log = read_run(tmp_path / "run")
    assert (log.final_attempts.outcome == "finished").all() and len(log.final_attempts) == 80
    ops = log.operations[log.operations.instance_id == "i1"]
    assert list(ops.kind[ops.kind.str.startswith("instance")]) == ["instance_down", "instance_up"]
    down_s, up_s = (ops.time_s[ops.kind == k].iloc[0] for k in ("instance_down", "instance_up"))
    assert "refused a connection" in ops.detail[ops.kind == "instance_down"].iloc[0]
    # down at the first refusal (not after three missed polls), up once it serves again
    on_i1 = log.requests[log.requests.instance_id == "i1"]
    refused = on_i1.reason.fillna("").str.contains("Connection refused")
    assert refused.sum() <= 2  # then no more dispatches there until it is back
    assert (on_i1[on_i1.dispatch_s > up_s].outcome == "finished").sum() > 0
    assert up_s - down_s >= 0.3


def test_ctrl_c_cancels_in_flight_work_and_closes_the_log(tmp_path: Path) -> None:
    timer = threading.Timer(0.8, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        summary = run(tmp_path, requests(40, 0.1), delay=0.2)
    finally:
        timer.cancel()
    assert summary.interrupted
    log = read_run(tmp_path / "run")
    assert log.complete and log.meta["interrupted"]
    final = log.final_attempts
    assert set(final.outcome) == {"cancelled"}  # 8 tokens at 0.2 s each: nothing finished
    assert final.request_id.nunique() == len(final) > 0


def test_a_request_evicted_before_its_task_ran_is_reported_aborted() -> None:
    """Dispatched and evicted in one decision: the task is cancelled before it starts, so
    the driver itself reports the eviction (the request would be in flight forever)."""
    reqs = requests(1, 0.0)
    perf = {(m, "G"): make_perf(m) for m in ("m1", "m2")}
    workload = Workload.from_requests(reqs, SLO_CLASSES, "fake")
    driver = RealDriver(workload, make_cluster(2), perf, make_policy("fcfs"), CoreConfig(), 0, None)

    async def dispatch_and_evict() -> Aborted:
        driver._apply([Dispatch("r0", "i0", 0, 0), Evict("r0", "i0", "gave its place")])
        event = await asyncio.wait_for(driver.queue.get(), timeout=5.0)
        assert isinstance(event, Aborted)
        return event

    event = asyncio.run(dispatch_and_evict())
    assert (event.request_id, event.output_tokens, event.reason) == ("r0", 0, "evicted")
