"""Run a gateway in a background thread for a test; a fake vLLM for the tests without vLLM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from qlmctl.domain import ClusterSpec
from qlmctl.gateway.options import GatewayOptions
from qlmctl.gateway.server import Gateway, GatewayJob
from qlmctl.plan.policies import make_policy
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.real_driver import RealOptions
from qlmctl.serve.run import RunSummary
from tests.conftest import free_port
from tests.helpers import SLO_CLASSES, make_perf

STARTUP_TIMEOUT_S = 240.0  # launched vLLM servers on a busy 2-core host


@dataclass
class Running:
    """A gateway serving in a thread: its URL and, once stopped, its summary."""

    base_url: str
    job: GatewayJob
    gateway: Gateway
    summary: list[RunSummary] = field(default_factory=list)


@contextlib.contextmanager
def running_gateway(job: GatewayJob) -> Iterator[Running]:
    """Start ``job`` in a thread; stop it (and wait for its summary) on exit."""
    gateway = Gateway(job)
    running = Running(job.base_url, job, gateway)
    errors: list[BaseException] = []

    def main() -> None:
        try:
            running.summary.append(asyncio.run(gateway.run()))
        except BaseException as exc:  # surfaced in the test's thread below
            errors.append(exc)
            gateway.started.set()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert gateway.started.wait(STARTUP_TIMEOUT_S), "the gateway did not start"
    if errors:
        raise errors[0]
    try:
        yield running
    finally:
        gateway.request_stop()
        thread.join(STARTUP_TIMEOUT_S)
        assert not thread.is_alive(), "the gateway did not stop"
        if errors:
            raise errors[0]


def fake_job(tmp: Path, transport: httpx.AsyncBaseTransport, **options: object) -> GatewayJob:
    """A gateway on two fake instances (m1, m2), heuristic policy, class 'interactive'."""
    perf = {(m, "G"): make_perf(m) for m in ("m1", "m2")}
    from tests.helpers import make_cluster

    cluster: ClusterSpec = make_cluster(2)
    return GatewayJob(
        cluster=cluster,
        perf=perf,
        policy=make_policy("heuristic"),
        config=CoreConfig(improve=False),
        classes=SLO_CLASSES,
        options=GatewayOptions(port=free_port(), **options),  # type: ignore[arg-type]
        run_dir=tmp / "run",
        real=RealOptions(transport=transport, metrics_interval_s=0.05),
    )


def fake_vllm(token_delay_s: float = 0.0, tokens: int = 5) -> httpx.MockTransport:
    """Serves m1 and m2: completions and chat, streamed in ``tokens`` chunks of one token.

    A prompt (or last message) ``REJECT`` gets HTTP 400; ``HANG`` streams forever.
    """

    async def stream(body: dict[str, object], chat: bool) -> AsyncIterator[bytes]:
        n = int(body.get("max_tokens") or tokens)  # type: ignore[call-overload]
        hang = _prompt_of(body) == "HANG"
        k = 0
        while hang or k < n:
            await asyncio.sleep(token_delay_s if not hang else 0.05)
            part = {"delta": {"content": f"t{k} "}} if chat else {"text": f"t{k} "}
            last = not hang and k == n - 1
            choice = {
                "index": 0,
                **part,
                "token_ids": [k],
                "finish_reason": "length" if last else None,
            }
            chunk = {"id": "cmpl-1", "created": 1, "model": body["model"], "choices": [choice]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            k += 1
        usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}
        yield f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    async def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m1"}, {"id": "m2"}]})
        if path == "/metrics":
            return httpx.Response(200, text="vllm:num_requests_waiting 0\n")
        body = json.loads(request.content)
        if _prompt_of(body) == "REJECT":
            return httpx.Response(400, json={"error": {"message": "prompt too long"}})
        return httpx.Response(200, content=stream(body, path.endswith("/chat/completions")))

    return httpx.MockTransport(handler)


def _prompt_of(body: dict[str, object]) -> object:
    if "messages" in body:
        messages = body["messages"]
        assert isinstance(messages, list)
        return messages[-1]["content"]
    return body.get("prompt")
