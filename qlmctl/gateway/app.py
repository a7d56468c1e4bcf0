"""The gateway's HTTP routes (Starlette, the ASGI stack under vLLM's own server).

Routes: ``POST /v1/completions`` and ``/v1/chat/completions`` (streamed or not),
``GET /v1/models``, ``/health``, ``/metrics``. A generation request becomes a
:class:`~qlmctl.serve.real_driver.LiveRequest` that joins the core's one queue, with the
SLO class of its ``x-qlmctl-slo-class`` header, else its model's default class, else
the gateway's default. Admission control may refuse it first (429 + ``Retry-After``).

Rules: bad input is answered at once with an OpenAI error object (400 malformed body or
unknown class, 404 unknown model, 401 missing or wrong key on ``/v1/*``); nothing the
route does blocks the loop (the core is read in place, in the loop's own thread). A
client that disconnects cancels its request (logged ``cancelled``). The API key is
compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from qlmctl.domain import Request, SLOClass
from qlmctl.gateway.admission import check_admission
from qlmctl.gateway.exchange import CHAT, COMPLETIONS, Exchange, error_body
from qlmctl.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from qlmctl.serve.real_driver import RealDriver

SLO_HEADER = "x-qlmctl-slo-class"
CHARS_PER_TOKEN = 4  # prompt length estimate for planning; vLLM counts the real one


@dataclass(frozen=True)
class GatewayOptions:
    """How the gateway answers (recorded in run.json, without the key)."""

    host: str = "127.0.0.1"
    port: int = 8000
    default_class: str = "interactive"  # class of a request without header or model default
    class_by_model: Mapping[str, str] = field(default_factory=dict)  # model -> default class
    max_queue: int = 1000  # waiting requests beyond which new ones are refused (429)
    default_max_tokens: int = 256  # the planning cap of a request that sets none
    api_key: str | None = field(default=None, repr=False)  # clients must send it (Bearer)

    def describe(self) -> dict[str, Any]:
        """The options for run.json: everything but the key itself."""
        return {
            "listen": f"{self.host}:{self.port}",
            "default_class": self.default_class,
            "class_by_model": dict(self.class_by_model),
            "max_queue": self.max_queue,
            "default_max_tokens": self.default_max_tokens,
            "api_key_required": self.api_key is not None,
        }


def build_app(
    driver: RealDriver,
    options: GatewayOptions,
    metrics: GatewayMetrics,
    classes: Mapping[str, SLOClass],
    models: list[str],
) -> ASGIApp:
    """The ASGI app in front of ``driver`` (which must be listening)."""
    routes = _Routes(driver, options, metrics, classes, models)
    app = Starlette(
        routes=[
            Route("/health", routes.health),
            Route("/metrics", routes.metrics),
            Route("/v1/models", routes.models),
            Route(COMPLETIONS, routes.completions, methods=["POST"]),
            Route(CHAT, routes.chat, methods=["POST"]),
        ]
    )
    return _RequireKey(app, options.api_key) if options.api_key else app


class _Routes:
    def __init__(
        self,
        driver: RealDriver,
        options: GatewayOptions,
        metrics: GatewayMetrics,
        classes: Mapping[str, SLOClass],
        models: list[str],
    ) -> None:
        self.driver, self.options, self._metrics = driver, options, metrics
        self.classes, self.served = classes, models

    async def health(self, _: HttpRequest) -> Response:
        up = self.driver.serving.is_set() and not self.driver.stop.is_set()
        return Response(status_code=200 if up else 503)

    async def metrics(self, _: HttpRequest) -> Response:
        return Response(self._metrics.render(), media_type=CONTENT_TYPE)

    async def models(self, _: HttpRequest) -> Response:
        data = [{"id": m, "object": "model", "owned_by": "qlmctl"} for m in self.served]
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request: HttpRequest) -> Response:
        return await self._generate(request, COMPLETIONS)

    async def chat(self, request: HttpRequest) -> Response:
        return await self._generate(request, CHAT)

    async def _generate(self, http: HttpRequest, route: str) -> Response:
        if not self.driver.serving.is_set() or self.driver.stop.is_set():
            return _error(503, "the gateway is not serving (starting or stopping)")
        try:
            body = await http.json()
        except ValueError:
            return _error(400, "the body is not valid JSON")
        problem = _check_body(body, route, self.served)
        if problem is not None:
            return _error(*problem)
        model = body["model"]
        slo = http.headers.get(SLO_HEADER) or self.options.class_by_model.get(
            model, self.options.default_class
        )
        if slo not in self.classes:
            return _error(400, f"unknown SLO class {slo!r}; known: {sorted(self.classes)}")
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        request = Request(
            id=f"gw-{uuid.uuid4().hex[:16]}",
            arrival_s=max(0.0, self.driver.clock.now()),
            model=model,
            slo_class=slo,
            prompt_tokens=estimate_prompt_tokens(body, route),
            max_output_tokens=cap or self.options.default_max_tokens,
        )
        core = self.driver.core
        refusal = check_admission(core.snapshot(request.arrival_s), request, self.options.max_queue)
        if refusal is not None:
            self.driver.refuse(request, refusal.reason)
            self._metrics.refused(slo, refusal.status)
            headers = {"Retry-After": str(refusal.retry_after_s)}
            return _error(refusal.status, refusal.reason, headers)
        exchange = Exchange(request, route, body)
        self.driver.submit(exchange)
        if exchange.stream:
            return StreamingResponse(self._relay(exchange), media_type="text/event-stream")
        return await self._answer(http, exchange)

    async def _relay(self, exchange: Exchange) -> AsyncIterator[str]:
        """The client's event stream; leaving it early (a disconnect) cancels the request."""
        ended = False
        try:
            while (line := await exchange.chunks.get()) is not None:
                yield line
            ended = True
        finally:
            if not ended:
                self.driver.cancel(exchange.request.id, "client disconnected")

    async def _answer(self, http: HttpRequest, exchange: Exchange) -> Response:
        """Wait for the whole answer, or for the client to disconnect (which cancels it)."""
        gone: asyncio.Future[None] = asyncio.ensure_future(_disconnected(http.receive))
        answer: asyncio.Future[Any] = exchange.response
        try:
            await asyncio.wait({gone, answer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not exchange.response.done():
            self.driver.cancel(exchange.request.id, "client disconnected")
            return Response(status_code=499)
        status, body = exchange.response.result()
        return JSONResponse(body, status_code=status)


def _check_body(body: Any, route: str, served: list[str]) -> tuple[int, str] | None:
    """(status, message) of what is wrong with a generation body, or None."""
    if not isinstance(body, dict):
        return 400, "the body must be a JSON object"
    model = body.get("model")
    if model not in served:
        return 404, f"the model {model!r} does not exist; served: {served}"
    key = "messages" if route == CHAT else "prompt"
    if key not in body:
        return 400, f"{key!r} is required"
    if route == CHAT and not isinstance(body["messages"], list):
        return 400, "'messages' must be a list"
    for cap in ("max_tokens", "max_completion_tokens"):
        value = body.get(cap)
        if value is not None and (not isinstance(value, int) or value < 1):
            return 400, f"{cap!r} must be a positive integer"
    return None


def estimate_prompt_tokens(body: dict[str, Any], route: str) -> int:
    """The prompt's length for planning: token ids as given, text at ~4 characters a token."""
    if route == CHAT:
        chars = sum(len(str(m.get("content") or "")) + 8 for m in body["messages"])
        return max(1, chars // CHARS_PER_TOKEN)
    prompt = body["prompt"]
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return max(1, len(prompt))
    return max(1, len(str(prompt)) // CHARS_PER_TOKEN)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


class _RequireKey:
    """ASGI middleware: ``/v1/*`` needs ``Authorization: Bearer KEY`` (401 otherwise)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self._key = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._key):
                response = _error(401, "a valid API key is required (Authorization: Bearer)")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
