"""The client side of the gateway's Batch API: what ``qlmctl batch submit|status|results`` call.

Rules: a missing or malformed input file, or a batch the gateway refuses (HTTP 4xx, its
message quoted), is :class:`~qlmctl.errors.BadInput`; a gateway that cannot be reached
or fails (5xx) is :class:`~qlmctl.errors.EngineError`. The API key comes from an
environment variable and is only ever sent as ``Authorization: Bearer``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from qlmctl.errors import BadInput, EngineError
from qlmctl.gateway.options import bearer

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 60.0


def submit_batch(
    base_url: str,
    path: Path,
    *,
    endpoint: str | None = None,
    completion_window: str = "24h",
    api_key_env: str | None = None,
) -> dict[str, Any]:
    """Upload ``path`` (JSONL) and start a batch on it; the OpenAI batch object.

    ``endpoint`` defaults to the ``url`` of the file's first line.
    """
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror or exc})") from None
    endpoint = endpoint or _first_url(path, content)
    with _client(base_url, api_key_env) as client:
        files = {"file": (Path(path).name, content, "application/jsonl")}
        uploaded = _call(client, "POST", "/v1/files", files=files, data={"purpose": "batch"})
        body = {
            "input_file_id": uploaded["id"],
            "endpoint": endpoint,
            "completion_window": completion_window,
        }
        return _call(client, "POST", "/v1/batches", json=body)


def batch_status(base_url: str, batch_id: str, api_key_env: str | None = None) -> dict[str, Any]:
    """The batch object (status, request counts, output file)."""
    with _client(base_url, api_key_env) as client:
        return _call(client, "GET", f"/v1/batches/{batch_id}")


def batch_results(base_url: str, batch_id: str, api_key_env: str | None = None) -> str:
    """The output file's JSONL; :class:`BadInput` while the batch still runs."""
    with _client(base_url, api_key_env) as client:
        batch = _call(client, "GET", f"/v1/batches/{batch_id}")
        if batch.get("output_file_id") is None:
            raise BadInput(f"batch {batch_id} is {batch.get('status')}: no results yet")
        resp = _send(client, "GET", f"/v1/files/{batch['output_file_id']}/content")
        return resp.text


def _first_url(path: Path, content: bytes) -> str:
    for line in content.decode("utf-8", errors="replace").split("\n"):
        if line.strip():
            try:
                url = json.loads(line).get("url")
            except (ValueError, AttributeError):
                raise BadInput(f"{path} line 1: not a JSON object") from None
            if isinstance(url, str):
                return url
            raise BadInput(f"{path} line 1: no 'url'; pass --endpoint")
    raise BadInput(f"{path}: no requests in the file")


def _client(base_url: str, api_key_env: str | None) -> httpx.Client:
    headers = bearer(api_key_env)
    return httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=TIMEOUT_S)


def _call(client: httpx.Client, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
    data: dict[str, Any] = _send(client, method, url, **kwargs).json()
    return data


def _send(client: httpx.Client, method: str, url: str, **kwargs: Any) -> httpx.Response:
    where = f"{client.base_url}{url}"
    try:
        resp = client.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        raise EngineError(f"{where}: {type(exc).__name__}: {exc}") from None
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text.strip()[:300]
        error = BadInput if resp.status_code < 500 else EngineError
        raise error(f"{where}: HTTP {resp.status_code}: {message}")
    return resp
