"""The gateway's options (what ``serve --listen`` was asked for)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qlmctl.errors import BadInput


def api_key_from_env(env: str | None) -> str | None:
    """The key held by environment variable ``env`` (None for no key); never on a command line.

    Raises:
        BadInput: ``env`` is given but unset or empty.
    """
    if env is None:
        return None
    key = os.environ.get(env, "")
    if not key:
        raise BadInput(f"--api-key-env {env}: the environment variable is unset or empty")
    return key


def bearer(env: str | None) -> dict[str, str]:
    """The ``Authorization`` header for the key in ``env`` ({} without one)."""
    key = api_key_from_env(env)
    return {"Authorization": f"Bearer {key}"} if key else {}


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
