"""An OpenAI Batch input file planned ahead: read as a workload, matched when submitted.

How it works: :func:`batch_workload` turns the lines of a Batch input file into the
requests the gateway will queue for them (id = ``custom_id``, arrival 0, the body's
model, the prompt length the gateway estimates, the body's token cap or the gateway's
default, the class ``window-<completion_window>``), so ``qlmctl plan batch.jsonl`` plans
exactly what the gateway will hold. When a batch is submitted to a gateway started with
``--plan``, :func:`matches_plan` reads its lines the same way: equal fingerprints mean
the batch is the planned one, and its lines then keep their ``custom_id`` as request id
and run by the plan (its times shifted to the submission).

Rules: the fingerprint covers every line's id, model, lengths and the window's targets
(not the gateway's class priorities), so a batch submitted with another completion
window or default token cap is not the planned one and runs unplanned.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qlmctl.domain import Request, SLOClass
from qlmctl.errors import BadInput
from qlmctl.gateway.bodies import estimate_prompt_tokens
from qlmctl.gateway.exchange import CHAT, COMPLETIONS
from qlmctl.plan.types import Plan
from qlmctl.workload import Workload

DEFAULT_WINDOW = "24h"
DEFAULT_MAX_TOKENS = 256  # the gateway's --default-max-tokens default
_UNIT_S = {"s": 1, "m": 60, "h": 3600}
PLANNED_PRIORITY = 3  # below the QLM paper's three classes, as the gateway places windows


def is_batch_file(path: Path) -> bool:
    """Whether ``path`` is a ``.jsonl`` whose first record has ``custom_id`` and ``body``."""
    if Path(path).suffix != ".jsonl" or not Path(path).is_file():
        return False
    try:
        with Path(path).open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        record = json.loads(first)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(record, dict) and {"custom_id", "body"} <= set(record)


def window_class(window: str) -> SLOClass:
    """The class of a batch's lines: its completion window as TTFT and end-to-end target."""
    unit = window[-1:]
    if unit not in _UNIT_S or not window[:-1].isdigit() or int(window[:-1]) == 0:
        raise BadInput(f"completion window {window!r}: expected e.g. 24h, 90m, 600s")
    seconds = int(window[:-1]) * _UNIT_S[unit]
    return SLOClass(
        name=f"window-{window}", ttft_s=seconds, e2e_s=seconds, priority=PLANNED_PRIORITY
    )


def batch_requests(
    lines: Sequence[tuple[str, dict[str, Any]]],
    endpoint: str,
    window: str = DEFAULT_WINDOW,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    source: str = "batch",
) -> Workload:
    """The requests of checked Batch lines ``(custom_id, body)``, all arriving at 0."""
    slo = window_class(window)
    requests = []
    for custom_id, body in lines:
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        requests.append(
            Request(
                id=custom_id,
                arrival_s=0.0,
                model=body["model"],
                slo_class=slo.name,
                prompt_tokens=estimate_prompt_tokens(body, endpoint),
                max_output_tokens=cap or default_max_tokens,
            )
        )
    return Workload.from_requests(requests, {slo.name: slo}, source)


def batch_workload(path: Path, window: str = DEFAULT_WINDOW) -> Workload:
    """A Batch input file as a workload (for ``qlmctl plan``); BadInput at the first bad line."""
    lines: list[tuple[str, dict[str, Any]]] = []
    endpoints: set[str] = set()
    seen: set[str] = set()
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            raise BadInput(f"{path} line {number}: not valid JSON") from None
        problem = _problem(line, seen)
        if problem is not None:
            raise BadInput(f"{path} line {number}: {problem}")
        seen.add(line["custom_id"])
        endpoints.add(line["url"])
        lines.append((line["custom_id"], line["body"]))
    if not lines:
        raise BadInput(f"{path}: no requests in the file")
    if len(endpoints) > 1:
        raise BadInput(f"{path}: lines name several endpoints ({', '.join(sorted(endpoints))})")
    return batch_requests(lines, endpoints.pop(), window, source=str(path))


def line_id_problem(line: Any, seen: set[str]) -> str | None:
    """What is wrong with a Batch input line as an object with a new ``custom_id``."""
    if not isinstance(line, dict):
        return "expected a JSON object"
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "'custom_id' must be a non-empty string"
    if custom_id in seen:
        return f"duplicate custom_id {custom_id!r}"
    return None


def _problem(line: Any, seen: set[str]) -> str | None:
    if (problem := line_id_problem(line, seen)) is not None:
        return problem
    if line.get("url") not in (COMPLETIONS, CHAT):
        return f"'url' must be {COMPLETIONS} or {CHAT}"
    body = line.get("body")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return "'body' must be an object with a 'model'"
    key = "messages" if line["url"] == CHAT else "prompt"
    if key not in body:
        return f"{key!r} is required"
    return None


def matches_plan(
    plan: Plan,
    lines: Sequence[tuple[str, dict[str, Any]]],
    endpoint: str,
    window: str,
    default_max_tokens: int,
) -> bool:
    """Whether a submitted batch is the one ``plan`` was made for."""
    wanted = plan.meta.get("workload_fingerprint")
    try:
        got = batch_requests(lines, endpoint, window, default_max_tokens).fingerprint
    except BadInput:
        return False
    return wanted is not None and got == wanted
