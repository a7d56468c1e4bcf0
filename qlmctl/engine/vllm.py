"""HTTP client of a vLLM OpenAI-compatible server: streamed completions, metrics, health.

How it works: :func:`stream_completion` posts to ``/v1/completions`` with ``stream: true``
and reads the server-sent events line by line, stamping each token's arrival with
``time.perf_counter()`` (this is an I/O driver, so it may read the clock). Chunks carry
``token_ids`` (we ask for ``return_token_ids``), so a chunk that holds several tokens
counts as several arrivals. The final usage chunk gives the authoritative token count
and, on servers started with ``--enable-prompt-tokens-details``, the prompt tokens served
from the prefix cache. The first chunk carries the prompt's token ids; with the output ids
so far (kept in a :class:`StreamProgress` the caller owns, so they survive a cancelled
stream) they make the prompt of a resumed attempt (evict-and-resume, see the real driver).

Rules: cancelling the awaiting task leaves the ``async with`` stream block, which closes
the connection; vLLM aborts a request whose stream is closed and frees its KV blocks (this
is how eviction works from outside). HTTP 4xx is :class:`RequestRejected` carrying the
server's own message (401/403: "needs an API key"); everything else that goes wrong is
an :class:`EngineError` naming the URL, never another exception: connection problems,
the :class:`StreamTimeouts` (connect, first token, between tokens), a line that is not
JSON, a chunk that is not an object, an error event, a request the server gave up
(finish reason ``abort``, as vLLM ends what it runs when it shuts down on SIGTERM, or
``error``), and a stream that ends without ``[DONE]`` or a finish reason (truncated).
The caller retries each. ``priority`` is only sent when given, because servers without
``--scheduling-policy priority`` may refuse it. ``headers`` carry an API key
(``Authorization: Bearer``); they are never logged.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from qlmctl.errors import BadInput, EngineError, EngineUnreachable

# Prometheus sample name -> our key. V0 servers call the KV gauge gpu_cache_usage_perc.
_METRICS = {
    "vllm:num_requests_running": "num_requests_running",
    "vllm:num_requests_waiting": "num_requests_waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage_perc",
    "vllm:num_preemptions_total": "num_preemptions_total",
    # Engine-side timings (engine-core timestamps, immune to a slow client):
    "vllm:generation_tokens_total": "generation_tokens_total",
    "vllm:request_decode_time_seconds_sum": "request_decode_time_seconds_sum",
    "vllm:request_decode_time_seconds_count": "request_decode_time_seconds_count",
}
_UNSUPPORTED_STATUS = (400, 404, 405, 501)
_AUTH_STATUS = (401, 403)
Headers = Mapping[str, str] | None


@dataclass(frozen=True, slots=True)
class StreamTimeouts:
    """Per-attempt limits of one streamed completion, in seconds (recorded in run.json).

    ``first_token_s`` counts from sending the request, so it includes the time vLLM
    queues it; ``token_s`` is the longest silence allowed between two chunks after that.
    """

    connect_s: float = 5.0
    first_token_s: float = 600.0
    token_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("connect_s", "first_token_s", "token_s"):
            value = getattr(self, name)
            if not (0 < value < math.inf):
                raise BadInput(f"timeout {name} must be a positive number of seconds, got {value}")


class RequestRejected(EngineError):
    """The server refused a request with HTTP 4xx; the message is the server's own."""

    def __init__(self, status_code: int, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail or message  # the server's message alone (no URL)


@dataclass(slots=True)
class StreamProgress:
    """What a stream delivered so far; filled while it runs, readable after a cancel."""

    prompt_token_ids: list[int] | None = None  # as the server tokenized the prompt
    output_token_ids: list[int] = field(default_factory=list)
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache


@dataclass(frozen=True, slots=True)
class CompletionResult:
    """Timing of one streamed completion; times are seconds from sending the request."""

    ttft_s: float
    token_times_s: tuple[float, ...]  # arrival of every output token, first = ttft_s
    output_tokens: int
    finish_reason: str | None  # "length", "stop", ... as the server reports it
    e2e_s: float
    cached_tokens: int | None = None  # prompt tokens from the prefix cache (if reported)

    @property
    def inter_token_s(self) -> tuple[float, ...]:
        """Gaps between consecutive token arrivals."""
        t = self.token_times_s
        return tuple(b - a for a, b in itertools.pairwise(t))


@dataclass(frozen=True, slots=True)
class SleepResult:
    """Outcome of a sleep/wake call: ``supported`` False means the server refused it."""

    supported: bool
    elapsed_s: float | None
    detail: str


async def stream_completion(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    prompt: str | list[int],
    max_tokens: int,
    *,
    priority: int | None = None,
    ignore_eos: bool = False,
    on_first_token: Callable[[float], None] | None = None,
    temperature: float = 0.8,
    timeouts: StreamTimeouts | None = None,
    headers: Headers = None,
    progress: StreamProgress | None = None,
    stream_interval: int | None = None,
) -> CompletionResult:
    """Stream one completion and time every token.

    Args:
        client: shared async client (its timeout applies to connect and each read).
        base_url: server URL without a trailing ``/v1``.
        model: served model name.
        prompt: text, or token ids (exact prompt lengths for profiling).
        max_tokens: output cap; with ``ignore_eos`` exactly this many tokens come back.
        priority: vLLM request priority (lower first); omitted when None.
        ignore_eos: keep generating past the end-of-sequence token.
        on_first_token: called with the TTFT as soon as the first token arrives.
        temperature: sampling temperature.
        timeouts: connect, first-token and between-token limits (default: StreamTimeouts()).
        headers: extra request headers (an API key).
        progress: filled with the prompt's and the output's token ids as they arrive
            (and the cached prompt tokens at the end); it keeps them if the stream is
            cancelled.
        stream_interval: tokens per streamed chunk (vLLM's ``stream_interval``; the
            first and the last chunk come at once); omitted when None (one per token).
            Fewer chunks cost the server and this client less CPU; the tokens of a chunk
            then share its arrival time.

    Returns:
        The timings; ``output_tokens`` is the server's usage count when it reports one.

    Raises:
        RequestRejected: HTTP 4xx (unknown model, prompt too long, bad priority, ...).
        EngineError: connection refused or dropped, a timeout, HTTP 5xx, a malformed or
            truncated stream.
    """
    url = f"{base_url.rstrip('/')}/v1/completions"
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
        "temperature": temperature,
        "return_token_ids": True,
    }
    if priority is not None:
        body["priority"] = priority
    if stream_interval is not None:
        body["stream_interval"] = stream_interval
    times: list[float] = []
    finish: str | None = None
    usage_tokens: int | None = None
    got = progress if progress is not None else StreamProgress()
    start = time.perf_counter()
    async for chunk in stream_chunks(client, url, body, timeouts=timeouts, headers=headers):
        now = time.perf_counter() - start
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("completion_tokens"), int):
                usage_tokens = usage["completion_tokens"]
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                got.cached_tokens = details["cached_tokens"]
        for choice in chunk["choices"]:
            _take_ids(choice, got)
            count = _tokens_in(choice)
            if count and not times and on_first_token is not None:
                on_first_token(now)
            times.extend([now] * count)
            finish = str(choice["finish_reason"]) if choice.get("finish_reason") else finish
    if not times:
        raise EngineError(f"{url}: the stream ended without any token (finish={finish!r})")
    return CompletionResult(
        ttft_s=times[0],
        token_times_s=tuple(times),
        output_tokens=usage_tokens if usage_tokens is not None else len(times),
        finish_reason=finish,
        e2e_s=time.perf_counter() - start,
        cached_tokens=got.cached_tokens,
    )


def _take_ids(choice: dict[str, Any], progress: StreamProgress) -> None:
    """Record a streamed choice's prompt ids (first chunk) and output ids."""
    prompt_ids = choice.get("prompt_token_ids")
    if progress.prompt_token_ids is None and isinstance(prompt_ids, list):
        progress.prompt_token_ids = [int(t) for t in prompt_ids]
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        progress.output_token_ids.extend(int(t) for t in ids)


async def stream_chunks(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    *,
    timeouts: StreamTimeouts | None = None,
    headers: Headers = None,
) -> AsyncIterator[dict[str, Any]]:
    """POST ``body`` (a streaming request) to ``url``; yield each server-sent JSON chunk.

    Every chunk yielded is an object whose ``choices`` is a list of objects. Stops at
    ``[DONE]``; leaving the loop early (or cancelling) closes the connection.

    Raises:
        RequestRejected: HTTP 4xx (``detail`` holds the server's own message).
        EngineError: connection problems, a :class:`StreamTimeouts` limit, HTTP 5xx, a
            line that is not JSON, a chunk that is not an object or has malformed
            choices, an error event, a finish reason of a request the server gave up
            (``abort``, ``error``), a stream that ends without ``[DONE]`` or a finish
            reason (truncated).
    """
    limits = timeouts or StreamTimeouts()
    loop = asyncio.get_running_loop()
    # NOTE: one deadline, moved forward at every token: first_token_s from sending (vLLM
    # may queue the request), then token_s of silence at most. It bounds each wait of
    # this generator only, never the caller's work between chunks.
    deadline = loop.time() + limits.first_token_s
    tokens, finished = 0, False
    try:
        async with asyncio.timeout_at(deadline):
            request = client.build_request(
                "POST", url, json=body, headers=headers,
                timeout=httpx.Timeout(None, connect=limits.connect_s),
            )  # fmt: skip
            resp = await client.send(request, stream=True)
        try:
            if resp.status_code >= 400:
                await resp.aread()
                _raise_for_status(resp, url)
            lines = sse_lines(resp.aiter_text())
            while True:
                async with asyncio.timeout_at(deadline):
                    line = await anext(lines, None)
                if line is None:
                    break
                chunk = _chunk(line, url)
                if chunk is _DONE:
                    return
                if chunk is None:
                    continue
                for choice in chunk["choices"]:
                    tokens += _tokens_in(choice)
                    reason = choice.get("finish_reason")
                    if reason in _SERVER_ENDED:
                        raise EngineError(
                            f"{url}: the server aborted it after {tokens} tokens "
                            f"(finish reason {reason!r})"
                        )
                    finished = finished or bool(reason)
                if tokens:
                    deadline = loop.time() + limits.token_s
                yield chunk
        finally:
            await resp.aclose()
    except TimeoutError:
        waited = (
            f"{limits.token_s:g} s after token {tokens}"
            if tokens
            else f"{limits.first_token_s:g} s for the first token"
        )
        raise EngineError(f"{url}: timed out waiting {waited}") from None
    except httpx.TimeoutException as exc:
        raise EngineError(f"{url}: timed out ({type(exc).__name__})") from None
    except httpx.ConnectError as exc:
        raise EngineUnreachable(f"{url}: {type(exc).__name__}: {exc}") from None
    except httpx.HTTPError as exc:
        raise EngineError(f"{url}: {type(exc).__name__}: {exc}") from None
    if not finished:
        raise EngineError(
            f"{url}: the stream ended after {tokens} tokens without [DONE] or a finish "
            "reason (truncated)"
        )


_DONE: dict[str, Any] = {}  # the [DONE] marker
_SERVER_ENDED = frozenset({"abort", "error"})  # finish reasons of a request given up
_SSE_BREAK = re.compile(r"\r\n|\r|\n")


async def sse_lines(texts: AsyncIterator[str]) -> AsyncIterator[str]:
    """The lines of a server-sent-event stream: split at CR, LF or CRLF only, as the
    SSE format says. NOTE: httpx's ``aiter_lines`` also splits at U+2028, U+0085 and the
    other breaks ``str.splitlines`` knows, which vLLM sends raw inside a chunk's JSON
    text (a random-weight model samples them): the line then is not JSON."""
    rest = ""
    async for text in texts:
        *lines, rest = _SSE_BREAK.split(rest + text)
        for line in lines:
            yield line
    if rest:
        yield rest


def _chunk(line: str, url: str) -> dict[str, Any] | None:
    """One server-sent line: a checked chunk, ``_DONE``, or None (not a data line)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    try:
        chunk = json.loads(data)
    except ValueError:
        raise EngineError(f"{url}: a stream line is not JSON: {data[:80]!r}") from None
    if not isinstance(chunk, dict):
        raise EngineError(f"{url}: a stream chunk is not an object: {data[:80]!r}")
    if "error" in chunk or chunk.get("object") == "error":
        error = chunk.get("error", chunk)
        message = error.get("message", error) if isinstance(error, dict) else error
        raise EngineError(f"{url}: the server reported an error: {str(message)[:200]}")
    choices = chunk.setdefault("choices", [])
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise EngineError(f"{url}: a stream chunk has malformed choices: {data[:80]!r}")
    return chunk


def _tokens_in(choice: dict[str, Any]) -> int:
    """Tokens carried by one streamed choice (token ids when the server sends them)."""
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    return 1 if choice.get("text") else 0


def _raise_for_status(resp: httpx.Response, url: str) -> None:
    message = _error_message(resp)
    if resp.status_code in _AUTH_STATUS:
        message = f"needs an API key (set api_key_env on the instance): {message}"
    if 400 <= resp.status_code < 500:
        raise RequestRejected(
            resp.status_code, f"{url}: HTTP {resp.status_code}: {message}", message
        )
    raise EngineError(f"{url}: HTTP {resp.status_code}: {message}")


def _error_message(resp: httpx.Response) -> str:
    """The server's error text: OpenAI-style ``{"error": {"message"}}`` or the raw body."""
    try:
        data = resp.json()
    except ValueError:
        return resp.text.strip()[:300] or resp.reason_phrase
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(data.get("detail"), str):
            return str(data["detail"])
    return json.dumps(data)[:300]


def parse_metrics(text: str) -> dict[str, float]:
    """Sum the vLLM gauges/counters we use over all label sets of a Prometheus text page.

    Returns the keys ``num_requests_running``, ``num_requests_waiting``,
    ``kv_cache_usage_perc`` (0-1), ``num_preemptions_total``, ``generation_tokens_total``
    and ``request_decode_time_seconds_sum``/``_count`` that the page holds.
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0].strip()
        key = _METRICS.get(name)
        if key is None:
            continue
        try:
            out[key] = out.get(key, 0.0) + float(value)
        except ValueError:
            continue
    return out


async def fetch_metrics(
    client: httpx.AsyncClient, base_url: str, headers: Headers = None
) -> dict[str, float]:
    """GET ``/metrics`` and parse it with :func:`parse_metrics`."""
    text = await _get_text(client, f"{base_url.rstrip('/')}/metrics", headers)
    return parse_metrics(text)


async def fetch_cache_info(client: httpx.AsyncClient, base_url: str) -> dict[str, str]:
    """Labels of ``vllm:cache_config_info`` (block_size, num_gpu_blocks, ...); {} if absent."""
    text = await _get_text(client, f"{base_url.rstrip('/')}/metrics")
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            labels = line[line.index("{") + 1 : line.rindex("}")]
            return dict(_split_labels(labels))
    return {}


def _split_labels(labels: str) -> list[tuple[str, str]]:
    pairs = []
    for part in labels.split('",'):
        key, _, value = part.partition("=")
        pairs.append((key.strip(), value.strip().strip('"')))
    return pairs


async def list_models(
    client: httpx.AsyncClient, base_url: str, headers: Headers = None
) -> list[str]:
    """Names served at ``base_url`` (GET ``/v1/models``)."""
    url = f"{base_url.rstrip('/')}/v1/models"
    text = await _get_text(client, url, headers)
    try:
        data = json.loads(text)
        return [str(m["id"]) for m in data["data"]]
    except (ValueError, KeyError, TypeError):
        raise EngineError(f"{url}: unexpected answer {text[:200]!r}") from None


async def server_version(client: httpx.AsyncClient, base_url: str) -> str:
    """``"vllm <version>"`` from GET ``/version`` (``"vllm (version unknown)"`` if absent)."""
    try:
        data = json.loads(await _get_text(client, f"{base_url.rstrip('/')}/version"))
        return f"vllm {data['version']}"
    except (EngineError, ValueError, KeyError, TypeError):
        return "vllm (version unknown)"


async def check_endpoint(
    client: httpx.AsyncClient, base_url: str, model: str, headers: Headers = None
) -> None:
    """Attach-mode check: the server answers and serves ``model``.

    Raises:
        BadInput: the server is unreachable, wants an API key (HTTP 401/403), or does not
            serve ``model`` (the message lists what it serves).
    """
    try:
        served = await list_models(client, base_url, headers)
    except EngineError as exc:
        raise BadInput(f"cannot use endpoint {base_url}: {exc}") from None
    if model not in served:
        raise BadInput(f"endpoint {base_url} does not serve model {model!r}; it serves {served}")


async def _get_text(client: httpx.AsyncClient, url: str, headers: Headers = None) -> str:
    try:
        resp = await client.get(url, headers=headers)
    except httpx.TimeoutException:
        raise EngineError(f"{url}: timed out") from None
    except httpx.HTTPError as exc:
        raise EngineError(f"{url}: {type(exc).__name__}: {exc}") from None
    if resp.status_code >= 400:
        _raise_for_status(resp, url)
    return resp.text


async def sleep(client: httpx.AsyncClient, base_url: str, level: int = 1) -> SleepResult:
    """POST ``/sleep?level=N``; unsupported when the server refuses (404/400/...)."""
    return await _timed_post(client, f"{base_url.rstrip('/')}/sleep", {"level": level})


async def wake_up(client: httpx.AsyncClient, base_url: str) -> SleepResult:
    """POST ``/wake_up``; unsupported when the server refuses."""
    return await _timed_post(client, f"{base_url.rstrip('/')}/wake_up", {})


async def is_sleeping(client: httpx.AsyncClient, base_url: str) -> bool | None:
    """GET ``/is_sleeping``: True/False, or None when the endpoint does not exist."""
    url = f"{base_url.rstrip('/')}/is_sleeping"
    try:
        resp = await client.get(url)
    except httpx.HTTPError as exc:
        raise EngineError(f"{url}: {type(exc).__name__}: {exc}") from None
    if resp.status_code in _UNSUPPORTED_STATUS:
        return None
    if resp.status_code >= 400:
        _raise_for_status(resp, url)
    return bool(resp.json().get("is_sleeping"))


async def _timed_post(client: httpx.AsyncClient, url: str, params: dict[str, Any]) -> SleepResult:
    start = time.perf_counter()
    try:
        resp = await client.post(url, params=params)
    except httpx.HTTPError as exc:
        raise EngineError(f"{url}: {type(exc).__name__}: {exc}") from None
    elapsed = time.perf_counter() - start
    if resp.status_code in _UNSUPPORTED_STATUS:
        return SleepResult(False, None, f"HTTP {resp.status_code}: {_error_message(resp)}")
    if resp.status_code >= 400:
        _raise_for_status(resp, url)
    return SleepResult(True, elapsed, resp.text.strip()[:200])
