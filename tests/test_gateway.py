"""The gateway against fake vLLM servers (httpx.MockTransport): routes, keys, metrics, cancels."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qlmctl.gateway.app import SLO_HEADER
from qlmctl.serve.runlog import read_run
from tests.gateway_helpers import fake_job, fake_vllm, running_gateway
from tests.helpers import run_cli

ONE = {"model": "m1", "prompt": "x"}
CHAT = {"model": "m2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_bad_requests_get_one_readable_error_each(tmp_path: Path) -> None:
    with running_gateway(fake_job(tmp_path, fake_vllm())) as gw:
        url = f"{gw.base_url}/v1/completions"
        cases = [
            (httpx.post(url, content=b"{not json"), 400, "not valid JSON"),
            (httpx.post(url, json={"model": "nope", "prompt": "x"}), 404, "does not exist"),
            (httpx.post(url, json={"model": "m1"}), 400, "'prompt' is required"),
            (httpx.post(url, json={**ONE, "max_tokens": 0}), 400, "positive"),
            (httpx.post(url, json=ONE, headers={SLO_HEADER: "gold"}), 400, "class 'gold'"),
            (httpx.post(url, json={"model": "m1", "prompt": "REJECT"}), 400, "prompt too long"),
        ]  # fmt: skip
        for resp, status, text in cases:
            assert resp.status_code == status and text in resp.json()["error"]["message"]
    df = read_run(tmp_path / "run").requests
    assert list(df.outcome) == ["rejected"]  # only the one vLLM refused reached the queue


def test_api_key_is_required_on_v1_and_never_logged(tmp_path: Path) -> None:
    key = "sk-test-0123456789"
    with running_gateway(fake_job(tmp_path, fake_vllm(), api_key=key)) as gw:
        url = f"{gw.base_url}/v1/chat/completions"
        assert httpx.post(url, json=CHAT).status_code == 401
        wrong = {"Authorization": "Bearer sk-wrong"}
        assert httpx.post(url, json=CHAT, headers=wrong).status_code == 401
        ok = httpx.post(url, json=CHAT, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
        assert httpx.get(f"{gw.base_url}/health").status_code == 200  # open, as in vLLM
    run_json = (tmp_path / "run" / "run.json").read_text()
    assert key not in run_json and json.loads(run_json)["gateway"]["api_key_required"]


def test_full_queue_answers_429_with_retry_after_and_logs_it(tmp_path: Path) -> None:
    job = fake_job(tmp_path, fake_vllm(), max_queue=1)
    job = job.__class__(**{**job.__dict__, "config": job.config.__class__(max_inflight=1)})
    with running_gateway(job) as gw, httpx.Client(base_url=gw.base_url, timeout=10) as client:
        body = {"model": "m1", "prompt": "HANG", "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as running:
            assert running.status_code == 200
            _wait_for(lambda: _gauge(client, "qlmctl:num_requests_running") == 1)
            with client.stream("POST", "/v1/completions", json=body) as queued:
                assert queued.status_code == 200
                _wait_for(lambda: _gauge(client, "qlmctl:num_requests_waiting") == 1)
                refused = client.post("/v1/completions", json=body)
                assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
                assert "queue full" in refused.json()["error"]["message"]
        # both clients hung up: the gateway must see it before it is stopped
        _wait_for(
            lambda: (
                _gauge(client, "qlmctl:num_requests_running") == 0
                and _gauge(client, "qlmctl:num_requests_waiting") == 0
            )
        )
    df = read_run(tmp_path / "run").requests
    assert sorted(df.outcome) == ["cancelled", "cancelled", "rejected"]
    assert df[df.outcome == "rejected"].reason.iloc[0].startswith("admission: queue full")
    assert set(df[df.outcome == "cancelled"].reason) == {"client disconnected"}


def test_metrics_parse_and_count_what_the_log_holds(tmp_path: Path) -> None:
    with running_gateway(fake_job(tmp_path, fake_vllm())) as gw:
        for k in range(3):
            body = {"model": "m1", "prompt": f"p{k}", "max_tokens": 4, "stream": k == 1}
            assert httpx.post(f"{gw.base_url}/v1/completions", json=body).status_code == 200
        httpx.post(f"{gw.base_url}/v1/completions", json={"model": "m1", "prompt": "REJECT"})
        _wait_for(lambda: _sample(gw.base_url, "qlmctl:requests_total", outcome="rejected") == 1)
        assert _sample(gw.base_url, "qlmctl:requests_total", outcome="finished") == 3
        assert _sample(gw.base_url, "qlmctl:slo_met_total") == 3
        assert _sample(gw.base_url, "qlmctl:time_to_first_token_seconds_count") == 3
        plans = _sample(gw.base_url, "qlmctl:plans_total")
        queued_s = _sample(gw.base_url, "qlmctl:request_queue_time_seconds_sum")
    log = read_run(tmp_path / "run")
    assert len(log.requests) == 4
    assert plans == (log.operations.kind == "replan").sum()
    assert plans == 0 and queued_s < 0.1  # one at a time to an idle engine: sent at once


def _families(base_url: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    text = httpx.get(f"{base_url}/metrics").text
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.name, s.labels, s.value))
    return out


def _sample(base_url: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    samples = _families(base_url).get(name, [])
    return sum(v for _, lab, v in samples if labels.items() <= lab.items())


def _gauge(client: httpx.Client, name: str) -> float:
    return _sample(str(client.base_url).rstrip("/"), name)


def _wait_for(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    pytest.fail("condition not met in time")


def test_attached_servers_get_their_own_key_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, str | None]] = []  # (url, Authorization) of every upstream call
    inner = fake_vllm()

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization")))
        return await inner.handle_async_request(request)

    job = fake_job(tmp_path, httpx.MockTransport(handler))
    i0 = job.cluster.instances[0].model_copy(update={"api_key_env": "QLMCTL_TEST_UPSTREAM_KEY"})
    cluster = job.cluster.model_copy(update={"instances": [i0, *job.cluster.instances[1:]]})
    job = job.__class__(**{**job.__dict__, "cluster": cluster})
    monkeypatch.setenv("QLMCTL_TEST_UPSTREAM_KEY", "sk-upstream")
    with running_gateway(job) as gw:
        for model in ("m1", "m2"):
            body = {"model": model, "prompt": "x", "max_tokens": 2}
            assert httpx.post(f"{gw.base_url}/v1/completions", json=body).status_code == 200
    keyed = {auth for url, auth in seen if url.startswith(i0.base_url)}
    others = {auth for url, auth in seen if not url.startswith(i0.base_url)}
    assert keyed == {"Bearer sk-upstream"} and others == {None}
    assert "sk-upstream" not in (tmp_path / "run" / "run.json").read_text()


def test_serve_listen_bad_options_are_one_line_and_exit_2(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        "gpu_types: [{name: G}]\nmodels: [{name: m1, path: /m1}]\n"
        "instances: [{id: i0, gpu: G, endpoint: 'http://127.0.0.1:9', model: m1}]\n"
    )
    cases = [
        (["--listen", "localhost"], "expected HOST:PORT"),
        (["--listen", "127.0.0.1:8000", "--api-key-env", "QLMCTL_TEST_UNSET"], "unset or empty"),
        (["--listen", "127.0.0.1:8000", "--default-class", "m1=gold"], "unknown class"),
        (["--listen", "127.0.0.1:8000", "--default-class", "m9=batch-1"], "no instance serves"),
    ]
    for args, message in cases:
        done = run_cli("serve", "-c", str(cluster), *args, "--runs", str(tmp_path / "runs"))
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
