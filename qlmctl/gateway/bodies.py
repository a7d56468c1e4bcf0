"""Generation bodies (``/v1/completions``, ``/v1/chat/completions``): checks and the core's view.

Rules: a body is checked before anything is queued (:func:`check_body` names the first
problem and its HTTP status); the core plans with an estimated prompt length (token ids
as given, text at about four characters a token: vLLM counts the real one) and the
client's token cap, or the gateway's default cap when it sets none.
"""

from __future__ import annotations

import uuid
from typing import Any

from qlmctl.domain import Request
from qlmctl.gateway.exchange import CHAT
from qlmctl.serve.real_driver import RealDriver

CHARS_PER_TOKEN = 4


def new_request(
    driver: RealDriver, body: dict[str, Any], route: str, slo_class: str, default_max_tokens: int
) -> Request:
    """The core's view of a checked generation body arriving now."""
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    return Request(
        id=f"gw-{uuid.uuid4().hex[:16]}",
        arrival_s=max(0.0, driver.clock.now()),
        model=body["model"],
        slo_class=slo_class,
        prompt_tokens=estimate_prompt_tokens(body, route),
        max_output_tokens=cap or default_max_tokens,
    )


def check_body(body: Any, route: str, served: list[str]) -> tuple[int, str] | None:
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
