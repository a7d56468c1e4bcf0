"""OpenAI Batch files through the gateway (fake vLLM), driven by ``qlmctl batch``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
from typer.testing import CliRunner

from qlmctl.cli import app
from qlmctl.errors import BadInput
from qlmctl.gateway.client import batch_status, submit_batch
from qlmctl.serve.runlog import read_run
from tests.gateway_helpers import fake_job, fake_vllm, running_gateway


def write_batch(path: Path, n: int, url: str = "/v1/chat/completions", **extra: object) -> Path:
    lines = [
        {"custom_id": f"job-{k}", "method": "POST", "url": url,
         "body": {"model": "m1", "messages": [{"role": "user", "content": f"q{k}"}],
                  "max_tokens": 4, **extra}}
        for k in range(n)
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def wait_done(url: str, batch_id: str, timeout_s: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = batch_status(url, batch_id)
        if batch["status"] in ("completed", "cancelled"):
            return batch
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} did not end")


def test_batch_cli_submits_and_collects_one_line_per_custom_id(tmp_path: Path) -> None:
    runner = CliRunner()
    with running_gateway(fake_job(tmp_path, fake_vllm())) as gw:
        batch_file = write_batch(tmp_path / "in.jsonl", 12, stream=True)
        submitted = runner.invoke(app, ["batch", "submit", str(batch_file), "--url", gw.base_url])
        assert submitted.exit_code == 0, submitted.output
        batch_id = submitted.output.strip()
        batch = wait_done(gw.base_url, batch_id)
        assert batch["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
        out = tmp_path / "out.jsonl"
        got = runner.invoke(
            app, ["batch", "results", batch_id, "--url", gw.base_url, "-o", str(out)]
        )
        assert got.exit_code == 0, got.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"job-{k}" for k in range(12))
    first = lines[0]["response"]
    assert first["status_code"] == 200 and first["body"]["object"] == "chat.completion"
    assert first["body"]["choices"][0]["message"]["content"] == "t0 t1 t2 t3 "
    df = read_run(tmp_path / "run").requests
    assert len(df) == 12 and set(df.slo_class) == {"window-24h"} and df.slo_met.all()
    assert (df.ttft_slo_s == 86400).all() and (df.e2e_slo_s == 86400).all()


def test_a_bad_line_refuses_the_whole_batch_naming_it(tmp_path: Path) -> None:
    with running_gateway(fake_job(tmp_path, fake_vllm())) as gw:
        path = write_batch(tmp_path / "in.jsonl", 3)
        lines = path.read_text().splitlines()
        bad = json.loads(lines[1]) | {"custom_id": "job-0"}
        path.write_text("\n".join([lines[0], json.dumps(bad), lines[2]]))
        try:
            submit_batch(gw.base_url, path)
        except BadInput as exc:
            assert "line 2: duplicate custom_id 'job-0'" in str(exc) and "HTTP 400" in str(exc)
        else:
            raise AssertionError("the batch was accepted")
        window = write_batch(tmp_path / "w.jsonl", 1)
        refused = CliRunner().invoke(
            app,
            ["batch", "submit", str(window), "--url", gw.base_url, "--completion-window", "soon"],
        )
        assert isinstance(refused.exception, BadInput)  # main() maps it to one line, exit 2
        assert "completion_window 'soon'" in str(refused.exception)
        missing = httpx.get(f"{gw.base_url}/v1/batches/batch_nope")
        assert missing.status_code == 404
    assert len(read_run(tmp_path / "run").requests) == 0  # nothing was queued
