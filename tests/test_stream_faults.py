"""Stream faults against fake vLLM endpoints (httpx.MockTransport): every one ends the attempt.

The client turns every malformed, truncated or silent stream into one EngineError; the
real driver turns every attempt, whatever it raised, into one engine event, so a run with
faults ends by itself with one final row per request and no stray task exception.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from qlmctl.domain import ClusterSpec, Request
from qlmctl.engine import vllm
from qlmctl.engine.vllm import StreamTimeouts
from qlmctl.errors import BadInput, EngineError
from qlmctl.plan.policies import make_policy
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.real_driver import RealOptions, run_real
from qlmctl.serve.runlog import read_run
from qlmctl.workload import Workload
from tests.helpers import SLO_CLASSES, make_cluster, make_perf

URL = "http://vllm.test:8000"
TOKEN = {"choices": [{"text": "x", "token_ids": [7], "finish_reason": None}]}
LAST = {"choices": [{"text": "x", "token_ids": [7], "finish_reason": "length"}]}
ABORTED = {"choices": [{"text": "", "token_ids": [], "finish_reason": "abort"}]}
FAST = StreamTimeouts(connect_s=1.0, first_token_s=0.3, token_s=0.3)


def data(event: dict[str, Any] | list[Any] | str) -> bytes:
    return f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode()


async def body(*parts: bytes | float) -> AsyncIterator[bytes]:
    """Stream ``parts``; a float is a pause of that many seconds."""
    for part in parts:
        if isinstance(part, float):
            await asyncio.sleep(part)
        else:
            yield part


FAULTS: dict[str, Callable[[], AsyncIterator[bytes]]] = {
    "garbage": lambda: body(data(TOKEN), b"data: {not json\n\n", data("[DONE]")),
    "not-object": lambda: body(data(TOKEN), data([1, 2]), data("[DONE]")),
    "bad-choices": lambda: body(data({"choices": ["x"]}), data("[DONE]")),
    "error-event": lambda: body(data(TOKEN), data({"error": {"message": "engine dead"}})),
    "truncated": lambda: body(data(TOKEN), data(TOKEN)),  # 2 of 5 tokens, then the end
    # vLLM shutting down on SIGTERM (or put to sleep) ends what it runs so
    "aborted": lambda: body(data(TOKEN), data(ABORTED), data("[DONE]")),
    "no-first-token": lambda: body(5.0, data(LAST), data("[DONE]")),
    "stalls": lambda: body(data(TOKEN), 5.0, data(LAST), data("[DONE]")),
}
MESSAGES = {
    "garbage": "not JSON",
    "not-object": "not an object",
    "bad-choices": "malformed choices",
    "error-event": "engine dead",
    "truncated": "truncated",
    "aborted": "server aborted it",
    "no-first-token": "0.3 s for the first token",
    "stalls": "0.3 s after token 1",
}


def stream_of(fault: str) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=FAULTS[fault]())

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_every_stream_fault_is_one_engine_error(fault: str) -> None:
    async def go() -> None:
        async with httpx.AsyncClient(transport=stream_of(fault)) as client:
            await vllm.stream_completion(client, URL, "m", "hi", 5, timeouts=FAST)

    with pytest.raises(EngineError, match=MESSAGES[fault]):
        asyncio.run(go())


def test_a_finish_reason_without_done_is_complete() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(data(TOKEN), data(LAST)))

    async def go() -> vllm.CompletionResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await vllm.stream_completion(client, URL, "m", "hi", 2, timeouts=FAST)

    assert asyncio.run(go()).output_tokens == 2


def test_timeouts_must_be_positive_and_finite() -> None:
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(BadInput, match="first_token_s"):
            StreamTimeouts(first_token_s=bad)


def test_401_says_the_endpoint_needs_an_api_key_and_the_key_is_sent() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(401, json={"error": "Unauthorized"})

    async def go(headers: dict[str, str] | None) -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await vllm.check_endpoint(client, URL, "m", headers)

    with pytest.raises(BadInput, match="needs an API key"):
        asyncio.run(go(None))
    with pytest.raises(BadInput, match="needs an API key"):
        asyncio.run(go({"Authorization": "Bearer k"}))
    assert seen == [None, "Bearer k"]


# ---- the real driver ----------------------------------------------------------------


def faulty_vllm(key: str | None = None) -> tuple[httpx.MockTransport, Counter[str]]:
    """Serves m1 and m2. A prompt ``FAULT`` streams that fault on every attempt,
    ``once:FAULT`` only on the first; others stream 4 tokens. With ``key``, every
    request without ``Authorization: Bearer key`` gets HTTP 401."""
    attempts: Counter[str] = Counter()

    def handler(request: httpx.Request) -> httpx.Response:
        if key is not None and request.headers.get("authorization") != f"Bearer {key}":
            return httpx.Response(401, json={"error": "Unauthorized"})
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m1"}, {"id": "m2"}]})
        if path == "/metrics":
            return httpx.Response(200, text="vllm:num_requests_waiting 0\n")
        prompt = json.loads(request.content)["prompt"]
        attempts[prompt] += 1
        fault = prompt.removeprefix("once:")
        if fault in FAULTS and (prompt == fault or attempts[prompt] == 1):
            return httpx.Response(200, content=FAULTS[fault]())
        return httpx.Response(200, content=body(*[data(TOKEN)] * 3, data(LAST), data("[DONE]")))

    return httpx.MockTransport(handler), attempts


def workload(prompts: list[str]) -> Workload:
    reqs = [
        Request(id=f"r{k}", arrival_s=0.02 * k, model=f"m{k % 2 + 1}", slo_class="interactive",
                prompt=p, prompt_tokens=5, max_output_tokens=4, output_tokens=4)
        for k, p in enumerate(prompts)
    ]  # fmt: skip
    return Workload.from_requests(reqs, SLO_CLASSES, "faults")


def run_faulty(
    tmp: Path,
    prompts: list[str],
    transport: httpx.MockTransport,
    cluster: ClusterSpec | None = None,
) -> None:
    perf = {(m, "G"): make_perf(m) for m in ("m1", "m2")}
    options = RealOptions(stream=FAST, metrics_interval_s=0.05, transport=transport)
    run_real(
        workload(prompts), cluster or make_cluster(2), perf, make_policy("edf"),
        CoreConfig(improve=False), tmp / "run", options=options,
    )  # fmt: skip


def test_faulty_streams_fail_their_attempts_and_the_run_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    faults = sorted(FAULTS)
    prompts = [*faults, *(f"once:{f}" for f in faults), "fine", "fine"]
    transport, attempts = faulty_vllm()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        run_faulty(tmp_path, prompts, transport)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    log = read_run(tmp_path / "run")
    assert log.complete
    final = log.final_attempts.set_index("request_id")
    assert len(final) == len(prompts)
    by_prompt = dict(zip(prompts, (f"r{k}" for k in range(len(prompts))), strict=True))
    for fault in faults:  # every attempt faulty: three failed attempts, then final failure
        rows = log.requests[log.requests.request_id == by_prompt[fault]]
        assert list(rows.outcome) == ["failed"] * 3, fault
        assert MESSAGES[fault] in rows.reason.iloc[0], fault
        assert attempts[fault] == 3
        once = log.requests[log.requests.request_id == by_prompt[f"once:{fault}"]]
        assert list(once.sort_values("attempt").outcome) == ["failed", "finished"], fault
    assert (final.loc[[by_prompt["fine"]], "outcome"] == "finished").all()


def test_api_key_comes_from_the_named_variable_and_is_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = make_cluster(2).model_dump()
    for inst in base["instances"]:
        inst["api_key_env"] = "QLMCTL_TEST_KEY"
    cluster = ClusterSpec.model_validate(base)
    transport, _ = faulty_vllm(key="s3cret-key")
    with pytest.raises(BadInput, match="QLMCTL_TEST_KEY is not set"):
        run_faulty(tmp_path / "a", ["fine"], transport, cluster)
    monkeypatch.setenv("QLMCTL_TEST_KEY", "wrong")
    with pytest.raises(BadInput, match="needs an API key"):
        run_faulty(tmp_path / "b", ["fine"], transport, cluster)
    monkeypatch.setenv("QLMCTL_TEST_KEY", "s3cret-key")
    run_faulty(tmp_path / "c", ["fine", "fine"], transport, cluster)
    log = read_run(tmp_path / "c" / "run")
    assert set(log.final_attempts.outcome) == {"finished"}
    written = [p.read_bytes() for p in (tmp_path / "c" / "run").rglob("*") if p.is_file()]
    assert written and not any(b"s3cret-key" in w for w in written)
