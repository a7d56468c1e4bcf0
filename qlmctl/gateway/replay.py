"""``qlmctl serve WORKLOAD --target URL``: replay a workload as a client of a running gateway.

How it works: every request is sent at its arrival time (seconds from the start of the
replay) as a streamed ``/v1/completions`` call with its SLO class in the
``x-qlmctl-slo-class`` header, its prompt (:func:`~qlmctl.workload.prompt_for`) and
token cap (``ignore_eos`` when the trace knows the true length), so a benchmark takes
the same path as production traffic. The gateway's own run log holds one row per
request; this side only counts what the client saw (HTTP status, first token, errors).

Rules: the gateway must know the workload's SLO classes (start it with ``--slo-classes``
pointing at the same spec); a refused request (4xx, 429) is counted, not retried; a
gateway that cannot be reached at all is :class:`~qlmctl.errors.EngineError`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np

from qlmctl.domain import Request
from qlmctl.engine.vllm import sse_lines
from qlmctl.errors import EngineError
from qlmctl.gateway.app import SLO_HEADER
from qlmctl.gateway.options import bearer
from qlmctl.workload import Workload, prompt_for

TIMEOUT = httpx.Timeout(600.0, connect=10.0)


@dataclass(frozen=True)
class ReplayResult:
    """What the client saw: outcomes per request and client-side TTFTs."""

    target: str
    sent: int
    outcomes: dict[str, int]  # "ok", "HTTP 429", "error: ..." -> requests
    ttft_s: tuple[float, ...] = field(repr=False)  # client-side, requests that got a token
    duration_s: float

    def rows(self) -> list[list[object]]:
        """(field, value) rows for a table."""
        ttft = np.array(self.ttft_s) if self.ttft_s else None
        pct = (lambda q: float(np.percentile(ttft, q))) if ttft is not None else (lambda q: None)
        return [
            ["target", self.target],
            ["requests sent", self.sent],
            *([f"outcome {k}", v] for k, v in sorted(self.outcomes.items())),
            ["client TTFT p50 s", pct(50)],
            ["client TTFT p99 s", pct(99)],
            ["duration s", round(self.duration_s, 1)],
        ]


def replay_through(
    workload: Workload,
    target: str,
    *,
    api_key_env: str | None = None,
    on_sent: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Send every request of ``workload`` to the gateway at ``target`` on its schedule."""
    return asyncio.run(_replay(workload, target.rstrip("/"), bearer(api_key_env), on_sent))


async def _replay(
    workload: Workload,
    target: str,
    headers: dict[str, str],
    on_sent: Callable[[int], None] | None,
) -> ReplayResult:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=target, headers=headers, timeout=TIMEOUT, limits=limits
    ) as client:
        try:
            await client.get("/health")
        except httpx.HTTPError as exc:
            raise EngineError(
                f"{target}: cannot reach the gateway ({type(exc).__name__})"
            ) from None
        start = time.monotonic()
        tasks = []
        for k, request in enumerate(workload.requests):
            await asyncio.sleep(max(0.0, request.arrival_s - (time.monotonic() - start)))
            tasks.append(asyncio.create_task(_send(client, request)))
            if on_sent is not None:
                on_sent(k + 1)
        results = await asyncio.gather(*tasks)
    outcomes = Counter(outcome for outcome, _ in results)
    ttfts = tuple(t for _, t in results if t is not None)
    return ReplayResult(target, len(results), dict(outcomes), ttfts, time.monotonic() - start)


async def _send(client: httpx.AsyncClient, request: Request) -> tuple[str, float | None]:
    """(outcome, client TTFT) of one streamed completion."""
    body = {
        "model": request.model,
        "prompt": prompt_for(request),
        "max_tokens": request.target_output_tokens,
        "ignore_eos": request.output_tokens is not None,
        "stream": True,
    }
    sent, first = time.monotonic(), None
    try:
        async with client.stream(
            "POST", "/v1/completions", json=body, headers={SLO_HEADER: request.slo_class}
        ) as resp:
            if resp.status_code != 200:
                return f"HTTP {resp.status_code}", None
            async for line in sse_lines(resp.aiter_text()):
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    chunk = json.loads(line[5:])
                    if "error" in chunk:
                        return f"error {chunk['error'].get('code')}", first
                    if first is None and chunk.get("choices"):
                        first = time.monotonic() - sent
    except httpx.HTTPError as exc:
        return f"error: {type(exc).__name__}", first
    return "ok", first
