"""OpenAI Batch files: ``/v1/files`` and ``/v1/batches`` for the batch classes.

How it works: an uploaded file is kept under ``RUN/batches/`` (its id is its name). A
batch checks every line of its input file first (``{custom_id, method: POST, url,
body}``, unique ids, a known model, the batch's endpoint) and refuses the whole batch
with the first bad line's number. Then every line joins the core's one queue as a live,
non-streamed request in the batch's own SLO class ``window-<completion_window>``: its
TTFT and end-to-end targets are the completion window (the deadline), and it is less
urgent than every other class. When all lines have ended, the output file holds one
line per ``custom_id``, ``{id, custom_id, response: {status_code, request_id, body},
error}`` (``error`` set when the status is not 200), written atomically.

Rules: lines bypass admission control (the batch was accepted as a whole); cancelling
a batch cancels its lines still queued or running (they end ``cancelled``); batch
state lives in memory for the gateway's lifetime, files on disk in the run directory.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlmctl.domain import SLOClass
from qlmctl.fileio import atomic_write_text
from qlmctl.gateway.batchplan import line_id_problem, matches_plan
from qlmctl.gateway.bodies import check_body, new_request
from qlmctl.gateway.exchange import CHAT, COMPLETIONS, Exchange
from qlmctl.gateway.options import GatewayOptions
from qlmctl.serve.follow import PlanFollower
from qlmctl.serve.real_driver import RealDriver

ENDPOINTS = (COMPLETIONS, CHAT)
_WINDOW = re.compile(r"^(\d+)([smh])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600}


class BatchError(Exception):
    """A request the batch API refuses: HTTP ``status`` and an OpenAI-style message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Batch:
    info: dict[str, Any]  # the OpenAI batch object, kept current
    exchanges: list[tuple[str, Exchange]] = field(default_factory=list)  # (custom_id, ...)


class BatchStore:
    """Files and batches of one gateway run."""

    def __init__(
        self,
        root: Path,
        driver: RealDriver,
        options: GatewayOptions,
        classes: Mapping[str, SLOClass],
        served: list[str],
    ) -> None:
        self.root, self.driver, self.options, self.served = root, driver, options, served
        self.classes = dict(classes)  # name -> class, the batches' own included
        self.files: dict[str, dict[str, Any]] = {}  # file id -> OpenAI file object
        self.batches: dict[str, _Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- files --------------------------------------------------------------------------

    def add_file(self, filename: str, content: bytes, purpose: str) -> dict[str, Any]:
        """Store an uploaded file; the OpenAI file object."""
        if purpose not in ("batch", "batch_output"):
            raise BatchError(400, f"purpose {purpose!r} is not supported; use 'batch'")
        return self._store(f"file-{uuid.uuid4().hex[:24]}", filename, content, purpose)

    def file_content(self, file_id: str) -> bytes:
        self.file(file_id)
        return (self.root / file_id).read_bytes()

    def file(self, file_id: str) -> dict[str, Any]:
        """The OpenAI file object of ``file_id``."""
        if file_id not in self.files:
            raise BatchError(404, f"no file {file_id!r}")
        return self.files[file_id]

    def _store(self, file_id: str, name: str, content: bytes, purpose: str) -> dict[str, Any]:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / file_id, content.decode("utf-8"))
        self.files[file_id] = {
            "id": file_id, "object": "file", "bytes": len(content),
            "created_at": int(time.time()), "filename": name, "purpose": purpose,
        }  # fmt: skip
        return self.files[file_id]

    # ---- batches ------------------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """Check and start a batch (``POST /v1/batches``); the OpenAI batch object."""
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise BatchError(400, f"endpoint {endpoint!r} is not supported; use one of {ENDPOINTS}")
        window = str(body.get("completion_window", "24h"))
        input_id = str(body.get("input_file_id"))
        lines = self._lines(input_id, endpoint)
        slo = self._window_class(window)
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        batch = _Batch(
            {
                "id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None,
                "input_file_id": input_id, "completion_window": window, "status": "in_progress",
                "output_file_id": None, "error_file_id": None, "created_at": now,
                "in_progress_at": now, "completed_at": None, "cancelled_at": None,
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                "metadata": body.get("metadata"),
            }
        )  # fmt: skip
        planned = self._planned(lines, endpoint, window)
        for custom_id, line_body in lines:
            request = new_request(
                self.driver, line_body, endpoint, slo.name, self.options.default_max_tokens
            )
            if planned:  # the plan knows the line by its custom_id
                request = request.model_copy(update={"id": custom_id})
            exchange = Exchange(request, endpoint, line_body)
            batch.exchanges.append((custom_id, exchange))
            self.driver.submit(exchange)
        self.batches[batch_id] = batch
        task = asyncio.create_task(self._finish(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return batch.info

    def _planned(self, lines: list[tuple[str, dict[str, Any]]], endpoint: str, window: str) -> bool:
        """Whether this batch is the one the gateway's plan was made for; if so the plan's
        times start now. 409 if it was submitted already (its ids are taken)."""
        follower = self.driver.policy
        if not isinstance(follower, PlanFollower):
            return False
        plan = follower.committed
        if not matches_plan(plan, lines, endpoint, window, self.options.default_max_tokens):
            return False
        try:
            self.driver.core.state_of(lines[0][0])
        except KeyError:
            pass
        else:
            raise BatchError(409, "the planned batch was already submitted to this gateway")
        follower.start_at(max(0.0, self.driver.clock.now()))
        return True

    def get(self, batch_id: str) -> dict[str, Any]:
        if batch_id not in self.batches:
            raise BatchError(404, f"no batch {batch_id!r}")
        return self.batches[batch_id].info

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Cancel what of the batch has not ended; the output holds what had."""
        info = self.get(batch_id)
        if info["status"] == "in_progress":
            info["status"] = "cancelling"
            for _, exchange in self.batches[batch_id].exchanges:
                if not exchange.response.done():
                    self.driver.cancel(exchange.request.id, f"batch {batch_id} cancelled")
        return info

    def _lines(self, file_id: str, endpoint: str) -> list[tuple[str, dict[str, Any]]]:
        """(custom_id, body) of every line of the input file; BatchError at the first bad one."""
        out: list[tuple[str, dict[str, Any]]] = []
        seen: set[str] = set()
        text = self.file_content(file_id).decode("utf-8")
        for number, raw in enumerate(text.split("\n"), start=1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                raise BatchError(400, f"{file_id} line {number}: not valid JSON") from None
            problem = _check_line(line, endpoint, seen, self.served)
            if problem is not None:
                raise BatchError(400, f"{file_id} line {number}: {problem}")
            seen.add(line["custom_id"])
            out.append((line["custom_id"], {**line["body"], "stream": False}))
        if not out:
            raise BatchError(400, f"{file_id}: no requests in the file")
        return out

    def _window_class(self, window: str) -> SLOClass:
        """The batch's SLO class: its completion window as TTFT and end-to-end target."""
        m = _WINDOW.match(window)
        if m is None or int(m[1]) == 0:
            raise BatchError(400, f"completion_window {window!r}: expected e.g. 24h, 90m, 600s")
        seconds = int(m[1]) * _UNIT_S[m[2]]
        name = f"window-{window}"
        lowest = max(c.priority for c in self.classes.values())
        slo = self.classes.get(name) or SLOClass(
            name=name, ttft_s=seconds, e2e_s=seconds, priority=lowest + 1
        )
        self.driver.core.add_slo_class(slo)
        self.classes[name] = slo
        return slo

    async def _finish(self, batch: _Batch) -> None:
        """Wait for every line, then write the output file and complete the batch."""
        await asyncio.gather(*(ex.response for _, ex in batch.exchanges))
        out, counts = [], batch.info["request_counts"]
        for custom_id, ex in batch.exchanges:
            status, body = ex.response.result()
            ok = status == 200
            counts["completed" if ok else "failed"] += 1
            response = {"status_code": status, "request_id": ex.request.id, "body": body}
            line = {
                "id": f"batch_req_{ex.request.id}",
                "custom_id": custom_id,
                "response": response,
                "error": None if ok else body.get("error"),
            }
            out.append(json.dumps(line))
        info = batch.info
        name = f"{info['id']}_output.jsonl"
        content = "\n".join(out).encode()
        output = self._store(f"file-{uuid.uuid4().hex[:24]}", name, content, "batch_output")
        done = "cancelled" if info["status"] == "cancelling" else "completed"
        info |= {"status": done, "output_file_id": output["id"], f"{done}_at": int(time.time())}


def _check_line(line: Any, endpoint: str, seen: set[str], served: list[str]) -> str | None:
    if (problem := line_id_problem(line, seen)) is not None:
        return problem
    if line.get("method", "POST") != "POST":
        return "'method' must be POST"
    if line.get("url") != endpoint:
        return f"'url' {line.get('url')!r} is not the batch's endpoint {endpoint}"
    body_problem = check_body(line.get("body"), endpoint, served)
    return None if body_problem is None else body_problem[1]
