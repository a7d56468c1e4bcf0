"""Admission decisions on hand-made snapshots, and how (whether) a started stream continues."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from qlmctl.domain import Request
from qlmctl.gateway.admission import check_admission
from qlmctl.gateway.exchange import CHAT, COMPLETIONS, Exchange
from qlmctl.plan.types import InstanceState, QueueSnapshot
from qlmctl.serve.real_driver import LiveRequest
from tests.helpers import SLO_CLASSES, make_perf

PERF = {(m, "G"): make_perf(m) for m in ("m1", "m2")}  # cold start 20 s, stop 2 s


def request(model: str = "m1", cls: str = "interactive", k: int = 0) -> Request:
    return Request(id=f"r{k}", arrival_s=10.0, model=model, slo_class=cls, prompt_tokens=100,
                   max_output_tokens=50)  # fmt: skip


def snapshot(resident: str, waiting: int = 0, ready_at_s: float = 10.0) -> QueueSnapshot:
    inst = InstanceState("i0", "G", resident, up=True, ready_at_s=ready_at_s)
    queued = tuple(request(k=k + 1) for k in range(waiting))
    return QueueSnapshot(10.0, queued, (inst,), SLO_CLASSES, PERF)


def test_admits_what_can_make_its_class_and_refuses_past_the_bound() -> None:
    assert check_admission(snapshot("m1"), request(), max_queue=5) is None
    full = check_admission(snapshot("m1", waiting=5), request(), max_queue=5)
    assert full is not None and full.status == 429 and full.retry_after_s >= 1
    assert full.reason == "admission: queue full (5 requests waiting, bound 5)"


def test_refuses_a_class_that_a_model_swap_makes_hopeless() -> None:
    # m2 is not resident: a 2 s stop and a 20 s cold start come first, past a 20 s TTFT
    refused = check_admission(snapshot("m1"), request("m2"), max_queue=5)
    assert refused is not None and refused.status == 429
    assert "cannot be met even if served next" in refused.reason
    assert check_admission(snapshot("m1"), request("m2", "batch"), max_queue=5) is None
    busy = check_admission(snapshot("m1", ready_at_s=35.0), request("m1"), max_queue=5)
    assert busy is not None and busy.retry_after_s == 25  # when the instance can start


def test_no_live_instance_is_503() -> None:
    down = InstanceState("i0", "G", "m1", up=False, ready_at_s=10.0)
    snap = QueueSnapshot(10.0, (), (down,), SLO_CLASSES, PERF)
    refused = check_admission(snap, request(), max_queue=5)
    assert refused is not None and refused.status == 503


def _after_relay(route: str, body: dict[str, Any], text: str, tokens: int) -> dict[str, Any]:
    """The next attempt's body once a streaming client has seen ``text`` (``tokens``)."""

    async def go() -> dict[str, Any]:
        ex = Exchange(request(), route, {**body, "stream": True, "priority": -5})
        live: LiveRequest = ex  # the driver's seam
        assert live.request.id == "r0"
        part = {"delta": {"content": text}} if route == CHAT else {"text": text}
        ex._relay({"choices": [{"index": 0, **part, "token_ids": [1] * tokens}]}, tokens)
        assert ex.chunks.get_nowait().startswith("data: ") and "token_ids" not in str(ex.chunks)
        return ex._upstream_body(priority=3)

    return asyncio.run(go())


def test_a_started_completion_stream_continues_from_the_text_sent() -> None:
    body = _after_relay(
        COMPLETIONS, {"model": "m1", "prompt": "Once", "max_tokens": 10}, " upon", 2
    )
    assert body["prompt"] == "Once upon" and body["max_tokens"] == 8
    assert body["priority"] == 3 and body["stream"] and body["return_token_ids"]


def test_a_started_chat_stream_continues_the_assistant_message() -> None:
    messages = [{"role": "user", "content": "hi"}]
    body = _after_relay(CHAT, {"model": "m1", "messages": messages, "max_tokens": 5}, "Hel", 1)
    assert body["messages"][-1] == {"role": "assistant", "content": "Hel"}
    assert body["continue_final_message"] and not body["add_generation_prompt"]
    assert body["max_tokens"] == 4 and len(messages) == 1  # the client's body is untouched


@pytest.mark.parametrize(
    ("route", "body", "resumable"),
    [
        (COMPLETIONS, {"prompt": "Once"}, True),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}]}, True),
        (COMPLETIONS, {"prompt": "Once", "n": 2}, False),  # two answers: one stream each
        (COMPLETIONS, {"prompt": "Once", "echo": True}, False),
        (COMPLETIONS, {"prompt": [1, 2, 3]}, False),  # token ids: no text to append to
    ],
)
def test_a_stream_that_cannot_be_continued_tells_the_core_so(
    route: str, body: dict[str, Any], resumable: bool
) -> None:
    """The core never cuts such a request mid-stream (evicts or moves it): a next attempt
    could not continue what its client has seen."""

    async def go() -> bool:
        return Exchange(request(), route, {"model": "m1", "stream": True, **body}).resumable

    assert asyncio.run(go()) is resumable
