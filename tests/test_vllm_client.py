"""The vLLM HTTP client against httpx.MockTransport: SSE timing, errors, metrics, sleep."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import httpx
import pytest

from qlmctl.engine import vllm
from qlmctl.errors import BadInput, EngineError

URL = "http://vllm.test:8000"
T = TypeVar("T")


def sse(*events: dict[str, Any] | str) -> bytes:
    """A server-sent-event body: one ``data:`` line per event."""
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return "".join(lines).encode()


def chunk(
    token_ids: list[int] | None, text: str = "x", finish: str | None = None
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"choices": [choice]}


def client_for(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_stream_counts_every_token_and_uses_usage() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        body = sse(
            chunk([5]),
            chunk([6, 7]),  # two tokens in one chunk: two arrivals
            chunk([8], finish="length"),
            {"choices": [], "usage": {"completion_tokens": 4}},
            "[DONE]",
        )
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    firsts: list[float] = []

    async def go() -> vllm.CompletionResult:
        async with client_for(handler) as c:
            return await vllm.stream_completion(
                c,
                URL,
                "m",
                [1, 2, 3],
                4,
                ignore_eos=True,
                on_first_token=firsts.append,
                stream_interval=2,
            )

    res = run(go())
    assert res.output_tokens == 4
    assert len(res.token_times_s) == 4
    assert res.finish_reason == "length"
    assert res.ttft_s == res.token_times_s[0] == firsts[0]
    assert len(firsts) == 1
    assert 0 <= res.ttft_s <= res.e2e_s
    assert len(res.inter_token_s) == 3
    body = seen[0]
    assert body["stream"] is True and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["prompt"] == [1, 2, 3] and body["max_tokens"] == 4
    assert "priority" not in body  # only sent when given
    assert body["stream_interval"] == 2


def test_priority_is_sent_when_given_and_text_chunks_count_without_token_ids() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, content=sse(chunk(None, "a"), chunk(None, "b", "stop")))

    async def go() -> vllm.CompletionResult:
        async with client_for(handler) as c:
            return await vllm.stream_completion(c, URL, "m", "hi", 8, priority=-3)

    res = run(go())
    assert seen[0]["priority"] == -3
    assert "stream_interval" not in seen[0]  # one token a chunk unless asked
    assert res.output_tokens == 2 and res.finish_reason == "stop"


def test_text_with_unicode_line_separators_stays_in_its_line() -> None:
    """vLLM writes JSON with raw non-ASCII text: U+2028 or U+0085 in a token is not a line
    break of the event stream (CR, LF and CRLF are), and a CRLF may straddle two reads."""
    body = (
        'data: {"choices": [{"index": 0, "text": "a\u2028b\x85", "token_ids": [5]}]}\r'
        '\ndata: {"choices": [{"index": 0, "text": "c", "token_ids": [6], '
        '"finish_reason": "length"}]}\n\ndata: [DONE]\n\n'
    )
    pieces = [body[: body.index("\r") + 1], body[body.index("\r") + 1 :]]

    async def stream() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece.encode()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=stream())

    async def go() -> vllm.CompletionResult:
        async with client_for(handler) as c:
            return await vllm.stream_completion(c, URL, "m", "hi", 2)

    res = run(go())
    assert res.output_tokens == 2 and res.finish_reason == "length"


def test_http_4xx_is_request_rejected_with_the_server_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        err = {"error": {"message": "The model `nope` does not exist.", "code": 404}}
        return httpx.Response(404, json=err)

    async def go() -> None:
        async with client_for(handler) as c:
            await vllm.stream_completion(c, URL, "nope", "hi", 4)

    with pytest.raises(vllm.RequestRejected, match="does not exist") as info:
        run(go())
    assert info.value.status_code == 404
    assert isinstance(info.value, EngineError)


def test_http_5xx_and_connection_errors_are_engine_errors_naming_the_url() -> None:
    def server_error(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text="boom")

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    for handler, pattern in ((server_error, "HTTP 500: boom"), (refused, "ConnectError")):

        async def go(h: Callable[[httpx.Request], httpx.Response] = handler) -> None:
            async with client_for(h) as c:
                await vllm.stream_completion(c, URL, "m", "hi", 4)

        with pytest.raises(EngineError, match=pattern) as info:
            run(go())
        assert not isinstance(info.value, vllm.RequestRejected)
        assert f"{URL}/v1/completions" in str(info.value)


def test_cancelling_the_task_closes_the_stream() -> None:
    closed = asyncio.Event()

    class Endless(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield sse(chunk([1]))
            await asyncio.sleep(3600)
            yield b""

        async def aclose(self) -> None:
            closed.set()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Endless())

    async def go() -> None:
        first = asyncio.Event()
        async with client_for(handler) as c:
            task = asyncio.create_task(
                vllm.stream_completion(
                    c, URL, "m", "hi", 100, on_first_token=lambda _t: first.set()
                )
            )
            await asyncio.wait_for(first.wait(), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(closed.wait(), 5)

    run(go())


METRICS_V1 = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_waiting{engine="0",model_name="tiny"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.75
vllm:num_preemptions_total{engine="0",model_name="tiny"} 4.0
vllm:num_preemptions_created{engine="0",model_name="tiny"} 1.79e+09
vllm:generation_tokens_total{engine="0",model_name="tiny"} 100.0
vllm:request_decode_time_seconds_sum{engine="0",model_name="tiny"} 1.5
vllm:request_decode_time_seconds_count{engine="0",model_name="tiny"} 10.0
vllm:cache_config_info{block_size="128",kv_cache_size_tokens="32768",num_gpu_blocks="256"} 1.0
"""
METRICS_V0 = """\
vllm:num_requests_running{model_name="a"} 1.0
vllm:num_requests_running{model_name="b"} 2.0
vllm:gpu_cache_usage_perc{model_name="a"} 0.5
"""


def test_parse_metrics_v1_names() -> None:
    m = vllm.parse_metrics(METRICS_V1)
    assert m["num_requests_running"] == 3
    assert m["num_requests_waiting"] == 2
    assert m["kv_cache_usage_perc"] == 0.75
    assert m["num_preemptions_total"] == 4  # the _created sample is not mixed in
    assert m["request_decode_time_seconds_sum"] == 1.5


def test_parse_metrics_v0_names_and_label_sets_are_summed() -> None:
    m = vllm.parse_metrics(METRICS_V0)
    assert m == {"num_requests_running": 3.0, "kv_cache_usage_perc": 0.5}


def test_cache_info_labels() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=METRICS_V1)

    async def go() -> dict[str, str]:
        async with client_for(handler) as c:
            return await vllm.fetch_cache_info(c, URL)

    info = run(go())
    assert info["kv_cache_size_tokens"] == "32768" and info["num_gpu_blocks"] == "256"


def test_check_endpoint_lists_served_models_and_reports_unreachable() -> None:
    def serving(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": [{"id": "tiny-a"}, {"id": "tiny-b"}]})

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async def check(handler: Callable[[httpx.Request], httpx.Response], model: str) -> None:
        async with client_for(handler) as c:
            await vllm.check_endpoint(c, URL, model)

    run(check(serving, "tiny-a"))
    with pytest.raises(BadInput, match=r"does not serve model 'x'.*\['tiny-a', 'tiny-b'\]"):
        run(check(serving, "x"))
    with pytest.raises(BadInput, match=f"cannot use endpoint {URL}"):
        run(check(down, "tiny-a"))


def test_sleep_wake_report_unsupported_honestly() -> None:
    def refuses(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "Not Found"})

    def supports(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/is_sleeping":
            return httpx.Response(200, json={"is_sleeping": True})
        return httpx.Response(200, json={"status": "ok"})

    async def go(handler: Callable[[httpx.Request], httpx.Response]) -> tuple[Any, ...]:
        async with client_for(handler) as c:
            return (
                await vllm.sleep(c, URL, level=1),
                await vllm.wake_up(c, URL),
                await vllm.is_sleeping(c, URL),
            )

    slept, woke, asleep = run(go(refuses))
    assert not slept.supported and slept.elapsed_s is None and "404" in slept.detail
    assert not woke.supported and asleep is None
    slept, woke, asleep = run(go(supports))
    assert slept.supported and slept.elapsed_s is not None and slept.elapsed_s >= 0
    assert woke.supported and asleep is True
