"""API keys of attached vLLM servers: an httpx auth that adds each server's own key.

Rules: a key is read once, from the environment variable the cluster spec names
(``api_key_env``), never from the spec itself; it is sent only to URLs under its own
server's base URL, as ``Authorization: Bearer``, and never logged (httpx does not log
headers; qlmctl records only the variable's name).
"""

from __future__ import annotations

import os
from collections.abc import Generator

import httpx

from qlmctl.domain import ClusterSpec
from qlmctl.errors import BadInput


class ServerKeys(httpx.Auth):
    """Adds the key of the server a request goes to (no header for servers without one)."""

    def __init__(self, cluster: ClusterSpec) -> None:
        self._keys: dict[str, str] = {}  # base URL -> key
        for inst in cluster.instances:
            if inst.api_key_env is not None:
                key = os.environ.get(inst.api_key_env, "")
                if not key:
                    raise BadInput(
                        f"instance {inst.id!r}: api_key_env {inst.api_key_env} is unset or empty"
                    )
                self._keys[inst.base_url] = key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        url = str(request.url)
        for base, key in self._keys.items():
            if url == base or url.startswith(f"{base}/"):
                request.headers["Authorization"] = f"Bearer {key}"
                break
        yield request
