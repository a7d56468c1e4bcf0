"""One client request through the gateway: its trip to vLLM and the relay back.

How it works: the client's body goes to vLLM as it came, except what the core decides:
``stream`` is always on upstream (so the core sees the first token and an eviction is
a closed stream), usage and token ids are asked for (to count tokens), and ``priority``
is the plan's or absent. Each attempt (:meth:`Exchange.attempt`, run by the real
driver per dispatch) reads the server-sent events:

* a streaming client gets every chunk at once (token ids and usage removed unless it
  asked for them); ``[DONE]`` or an error event follows when the core ends the request;
* a non-streaming client gets one response assembled from the chunks (text, finish
  reason, logprobs, usage) when the request finishes, or an OpenAI error object.

Rules: once a streaming client has seen tokens, a new attempt (after an eviction or a
failed server) *continues* the answer rather than restarting it: the completion prompt,
or the chat's final assistant message (``continue_final_message``), carries the text
already sent, and the token cap shrinks by the tokens already sent. Where that is not
possible (several choices, ``echo``, a token-id prompt) the attempt is refused (HTTP
409, not retried) and the client gets a clean error. A stream that ends without a
finish reason, or with vLLM's ``abort`` (it shuts down), is a failed attempt. Only the
driver's loop and the route touch an exchange, both in one event loop, so there is no
locking.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx

from qlmctl.domain import Request
from qlmctl.engine.vllm import (
    CompletionResult,
    Headers,
    RequestRejected,
    StreamTimeouts,
    stream_chunks,
)
from qlmctl.errors import EngineError
from qlmctl.serve.runlog import Outcome

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
_STATUS_BY_OUTCOME = {Outcome.FAILED: 502, Outcome.CANCELLED: 503, Outcome.REJECTED: 400}
_CONTINUATION_REFUSED = 409


class Exchange:
    """A live request (the real driver's :class:`~qlmctl.serve.real_driver.LiveRequest`)."""

    def __init__(self, request: Request, route: str, body: dict[str, Any]) -> None:
        """Args:
        request: what the core plans with (id, model, class, estimated lengths).
        route: :data:`COMPLETIONS` or :data:`CHAT`.
        body: the client's JSON body.
        """
        self.request = request
        self.route = route
        self.body = body
        self.stream = bool(body.get("stream"))
        self._client_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self._client_ids = bool(body.get("return_token_ids"))
        self.chunks: asyncio.Queue[str | None] = asyncio.Queue()  # SSE to a streaming client
        self.response: asyncio.Future[tuple[int, dict[str, Any]]] = (
            asyncio.get_running_loop().create_future()
        )  # (status, JSON body) for a non-streaming client
        prompt = body.get("prompt")
        # an attempt cut mid-stream can be continued: one answer, no echo, a text prompt
        self.resumable = not (
            (body.get("n") or 1) > 1
            or body.get("echo")
            or (route == COMPLETIONS and not isinstance(prompt, str))
        )
        self._sent_text = ""  # choice 0's text a streaming client has seen
        self._sent_tokens = 0
        self._answer: _Assembly | None = None  # the finished attempt's assembled response
        self._error: tuple[int, str] | None = None  # the last HTTP error from vLLM

    # ---- the driver's side --------------------------------------------------------------

    async def attempt(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        priority: int | None,
        on_first_token: Callable[[], None],
        *,
        timeouts: StreamTimeouts,
        headers: Headers,
    ) -> CompletionResult:
        """Stream one attempt from ``base_url``, relaying or assembling it.

        Raises:
            RequestRejected: HTTP 4xx from vLLM, or a started stream that cannot continue.
            EngineError: connection problems, HTTP 5xx, an error event, a truncated stream.
        """
        url = f"{base_url.rstrip('/')}{self.route}"
        body = self._upstream_body(priority)
        assembly = _Assembly(self.route)
        times: list[float] = []
        usage_tokens: int | None = None
        start = time.perf_counter()
        try:
            async for chunk in stream_chunks(client, url, body, timeouts=timeouts, headers=headers):
                count = sum(_tokens_in(c) for c in chunk.get("choices") or ())
                if count and not times:
                    on_first_token()
                times.extend([time.perf_counter() - start] * count)
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                assembly.add(chunk)
                if self.stream:
                    self._relay(chunk, count)
        except RequestRejected as exc:
            self._error = (exc.status_code, exc.detail)
            raise
        if not assembly.finished:
            raise EngineError(f"{url}: the stream ended before the answer did")
        self._answer = assembly
        return CompletionResult(
            ttft_s=times[0] if times else time.perf_counter() - start,
            token_times_s=tuple(times),
            output_tokens=usage_tokens if usage_tokens is not None else len(times),
            finish_reason=assembly.finish_reason,
            e2e_s=time.perf_counter() - start,
        )

    def ended(self, outcome: Outcome, reason: str | None) -> None:
        """The core ended the request: close the client's stream or answer it."""
        status = _STATUS_BY_OUTCOME.get(outcome, 500)
        if outcome == Outcome.REJECTED and self._error is not None:
            status, reason = self._error
        if self.stream:
            if outcome != Outcome.FINISHED:
                self.chunks.put_nowait(f"data: {json.dumps(error_body(status, reason))}\n\n")
            self.chunks.put_nowait("data: [DONE]\n\n")
            self.chunks.put_nowait(None)
        elif not self.response.done():
            if outcome == Outcome.FINISHED and self._answer is not None:
                self.response.set_result((200, self._answer.response(self._client_ids)))
            else:
                self.response.set_result((status, error_body(status, reason)))

    # ---- helpers ------------------------------------------------------------------------

    def _upstream_body(self, priority: int | None) -> dict[str, Any]:
        body = {k: v for k, v in self.body.items() if k != "priority"}
        body |= {
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        if priority is not None:
            body["priority"] = priority
        if self._sent_tokens or self._sent_text:
            self._continue(body)
        return body

    def _continue(self, body: dict[str, Any]) -> None:
        """Make ``body`` continue the answer the client has partly seen."""
        prompt = body.get("prompt")
        if not self.resumable:  # never evicted mid-stream; failed there, it cannot go on
            self._error = (_CONTINUATION_REFUSED, "the stream started and cannot be resumed")
            raise RequestRejected(_CONTINUATION_REFUSED, self._error[1])
        if self.route == COMPLETIONS:
            body["prompt"] = f"{prompt}{self._sent_text}"
        else:
            sent = {"role": "assistant", "content": self._sent_text}
            body["messages"] = [*body["messages"], sent]
            body |= {"continue_final_message": True, "add_generation_prompt": False}
        for cap in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(cap), int):
                body[cap] = max(1, body[cap] - self._sent_tokens)

    def _relay(self, chunk: dict[str, Any], count: int) -> None:
        """Pass one chunk to the streaming client (minus what it did not ask for)."""
        if chunk.get("usage") and not chunk.get("choices"):
            if self._client_usage:
                self.chunks.put_nowait(f"data: {json.dumps(chunk)}\n\n")
            return
        if not self._client_usage:
            chunk.pop("usage", None)
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) == 0:
                self._sent_text += _text_of(choice)
            if not self._client_ids:
                choice.pop("token_ids", None)
        if not self._client_ids:
            chunk.pop("prompt_token_ids", None)
        self._sent_tokens += count
        self.chunks.put_nowait(f"data: {json.dumps(chunk)}\n\n")


class _Assembly:
    """A non-streamed response built from the chunks of one attempt."""

    def __init__(self, route: str) -> None:
        self.chat = route == CHAT
        self.head: dict[str, Any] = {}  # id, created, model of the first chunk
        self.choices: dict[int, dict[str, Any]] = {}  # index -> choice being built
        self.usage: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        if not self.head:
            self.head = {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for c in chunk.get("choices") or ():
            out = self.choices.setdefault(
                c.get("index", 0), {"text": "", "finish_reason": None, "token_ids": []}
            )
            out["text"] += _text_of(c)
            out["token_ids"] += c.get("token_ids") or []
            for key in ("finish_reason", "stop_reason"):
                if c.get(key) is not None:
                    out[key] = c[key]
            _merge_logprobs(out, c.get("logprobs"))

    @property
    def finished(self) -> bool:
        return bool(self.choices) and all(c["finish_reason"] for c in self.choices.values())

    @property
    def finish_reason(self) -> str | None:
        return self.choices[min(self.choices)]["finish_reason"] if self.choices else None

    def response(self, token_ids: bool) -> dict[str, Any]:
        """The OpenAI response object (``chat.completion`` or ``text_completion``)."""
        choices = []
        for index in sorted(self.choices):
            c = self.choices[index]
            choice: dict[str, Any] = {"index": index}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": c["text"]}
            else:
                choice["text"] = c["text"]
            choice |= {
                "logprobs": c.get("logprobs"),
                "finish_reason": c["finish_reason"],
                "stop_reason": c.get("stop_reason"),
            }
            if token_ids:
                choice["token_ids"] = c["token_ids"]
            choices.append(choice)
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.head, "object": kind, "choices": choices, "usage": self.usage}


def error_body(status: int, message: str | None) -> dict[str, Any]:
    """An OpenAI-style error object (what vLLM itself answers)."""
    return {"error": {"message": message or "error", "type": _error_type(status), "code": status}}


def _error_type(status: int) -> str:
    return {
        400: "BadRequestError",
        401: "AuthenticationError",
        404: "NotFoundError",
        409: "ConflictError",
        429: "RateLimitError",
    }.get(status, "InternalServerError" if status >= 500 else "BadRequestError")


def _text_of(choice: dict[str, Any]) -> str:
    if "delta" in choice:
        return str((choice.get("delta") or {}).get("content") or "")
    return str(choice.get("text") or "")


def _tokens_in(choice: dict[str, Any]) -> int:
    """Tokens one streamed choice carries (its token ids; else 1 if it has text)."""
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    return 1 if _text_of(choice) else 0


def _merge_logprobs(out: dict[str, Any], logprobs: Any) -> None:
    """Concatenate streamed logprobs (every list-valued field, completion or chat style)."""
    if not isinstance(logprobs, dict):
        return
    merged = out.setdefault("logprobs", {})
    for key, value in logprobs.items():
        if isinstance(value, list):
            merged.setdefault(key, []).extend(value)
        else:
            merged[key] = value
