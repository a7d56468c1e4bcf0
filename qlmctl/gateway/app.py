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
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from qlmctl.domain import SLOClass
from qlmctl.gateway.admission import check_admission
from qlmctl.gateway.batches import BatchError, BatchStore
from qlmctl.gateway.bodies import check_body, new_request
from qlmctl.gateway.exchange import CHAT, COMPLETIONS, Exchange, error_body
from qlmctl.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from qlmctl.gateway.options import GatewayOptions
from qlmctl.serve.real_driver import RealDriver

SLO_HEADER = "x-qlmctl-slo-class"


def build_app(
    driver: RealDriver,
    options: GatewayOptions,
    metrics: GatewayMetrics,
    classes: Mapping[str, SLOClass],
    models: list[str],
    batches: BatchStore,
) -> ASGIApp:
    """The ASGI app in front of ``driver`` (which must be listening)."""
    routes = _Routes(driver, options, metrics, classes, models)
    files = _BatchRoutes(batches)
    app = Starlette(
        routes=[
            Route("/health", routes.health),
            Route("/metrics", routes.metrics),
            Route("/v1/models", routes.models),
            Route(COMPLETIONS, routes.completions, methods=["POST"]),
            Route(CHAT, routes.chat, methods=["POST"]),
            Route("/v1/files", files.upload, methods=["POST"]),
            Route("/v1/files/{file_id}", files.file),
            Route("/v1/files/{file_id}/content", files.content),
            Route("/v1/batches", files.create, methods=["POST"]),
            Route("/v1/batches/{batch_id}", files.batch),
            Route("/v1/batches/{batch_id}/cancel", files.cancel, methods=["POST"]),
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
        problem = check_body(body, route, self.served)
        if problem is not None:
            return _error(*problem)
        model = body["model"]
        slo = http.headers.get(SLO_HEADER) or self.options.class_by_model.get(
            model, self.options.default_class
        )
        if slo not in self.classes:
            return _error(400, f"unknown SLO class {slo!r}; known: {sorted(self.classes)}")
        request = new_request(self.driver, body, route, slo, self.options.default_max_tokens)
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


class _BatchRoutes:
    """``/v1/files`` and ``/v1/batches`` over a :class:`BatchStore`."""

    def __init__(self, store: BatchStore) -> None:
        self.store = store

    async def upload(self, http: HttpRequest) -> Response:
        async with http.form() as form:
            upload, purpose = form.get("file"), form.get("purpose", "batch")
            if upload is None or isinstance(upload, str):
                return _error(400, "a multipart 'file' is required")
            content = await upload.read()
            name = upload.filename or "upload.jsonl"
        return await _answer_json(lambda: self.store.add_file(name, content, str(purpose)))

    async def file(self, http: HttpRequest) -> Response:
        return await _answer_json(lambda: self.store.file(http.path_params["file_id"]))

    async def content(self, http: HttpRequest) -> Response:
        try:
            data = self.store.file_content(http.path_params["file_id"])
        except BatchError as exc:
            return _error(exc.status, str(exc))
        return Response(data, media_type="application/jsonl")

    async def create(self, http: HttpRequest) -> Response:
        try:
            body = await http.json()
        except ValueError:
            return _error(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        return await _answer_json(lambda: self.store.create(body))

    async def batch(self, http: HttpRequest) -> Response:
        return await _answer_json(lambda: self.store.get(http.path_params["batch_id"]))

    async def cancel(self, http: HttpRequest) -> Response:
        return await _answer_json(lambda: self.store.cancel(http.path_params["batch_id"]))


async def _answer_json(make: Callable[[], dict[str, Any]]) -> Response:
    """``make()`` as JSON, or its :class:`BatchError` as an OpenAI error."""
    try:
        return JSONResponse(make())
    except BatchError as exc:
        return _error(exc.status, str(exc))


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
