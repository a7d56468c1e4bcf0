"""Failing safe without a real engine: the run log under crashes, Ctrl-C in the simulator,
paths and exit codes of ``serve``, a port conflict, and the live view's last line."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from qlmctl.domain import LaunchSpec, ModelSpec
from qlmctl.engine.launcher import VllmLauncher
from qlmctl.errors import BadInput
from qlmctl.plan.policies import make_policy
from qlmctl.serve.config import CoreConfig, CoreStats
from qlmctl.serve.live import live_view
from qlmctl.serve.run import INTERRUPTED
from qlmctl.serve.runlog import RunLogWriter, read_run
from qlmctl.serve.sim_driver import run_simulated
from qlmctl.workload import Workload
from tests.helpers import SLO_CLASSES, make_cluster, make_perf, make_requests, run_cli
from tests.test_runlog import attempt

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "workloads" / "cluster-sim.yaml"


def strict_json(path: Path) -> Any:
    """Parse as standard JSON: Infinity and NaN are errors."""

    def refuse(name: str) -> None:
        raise ValueError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_rows_are_flushed_by_time_not_only_by_count(tmp_path: Path) -> None:
    eager = RunLogWriter(tmp_path / "eager", {}, flush_interval_s=0.0)
    lazy = RunLogWriter(tmp_path / "lazy", {}, flush_interval_s=3600.0)
    for log in (eager, lazy):
        log.add_attempt(attempt("r0"))
        log.maybe_flush()
    # no close(): as after kill -9
    crashed = read_run(tmp_path / "eager")
    assert not crashed.complete and list(crashed.requests.request_id) == ["r0"]
    assert strict_json(tmp_path / "eager" / "run.json")["parts"] == "parts"
    assert read_run(tmp_path / "lazy").requests.empty


def test_run_json_is_standard_json_with_null_for_non_finite(tmp_path: Path) -> None:
    meta = {"config": {"kv_budget": float("inf"), "x": [float("nan"), 1.5]}}
    with RunLogWriter(tmp_path / "run", meta) as log:
        log.add_attempt(attempt("r0"))
    data = strict_json(tmp_path / "run" / "run.json")
    assert data["config"] == {"kv_budget": None, "x": [None, 1.5]}
    assert data["complete"] is True and "parts" not in data
    # a router policy really has infinite knobs (kv_budget): its run.json stays standard
    work = Workload.from_requests(make_requests(5, gap_s=0.1), SLO_CLASSES, "w")
    perf = {(m, "G"): make_perf(m) for m in ("m1", "m2")}
    fcfs = make_policy("fcfs")
    run_simulated(work, make_cluster(2), perf, fcfs,
                  CoreConfig.for_policy(fcfs, improve=False), tmp_path / "fcfs")  # fmt: skip
    assert strict_json(tmp_path / "fcfs" / "run.json")["config"]["kv_budget"] is None


def test_ctrl_c_in_the_simulator_cancels_every_arrived_request_and_closes_the_log(
    tmp_path: Path,
) -> None:
    work = Workload.from_requests(make_requests(4000, gap_s=0.01), SLO_CLASSES, "w")
    perf = {(m, "G"): make_perf(m) for m in ("m1", "m2")}
    sent: list[float] = []
    before = signal.getsignal(signal.SIGINT)  # default, or ignored in a background job

    def progress(stats: CoreStats, t: float) -> None:
        if not sent:  # Ctrl-C, once, in the middle of the run
            sent.append(t)
            os.kill(os.getpid(), signal.SIGINT)

    summary = run_simulated(
        work, make_cluster(2), perf, make_policy("edf"), None, tmp_path / "run",
        on_progress=progress,
    )  # fmt: skip
    assert summary.interrupted and sent
    log = read_run(tmp_path / "run")
    assert log.complete and log.meta["interrupted"] is True
    final = log.final_attempts
    assert 0 < len(final) < len(work.requests) and final.request_id.is_unique
    arrived = {r.id for r in work.requests if r.arrival_s <= log.meta["duration_s"]}
    assert set(final.request_id) == arrived
    cancelled = final[final.outcome == "cancelled"]
    assert len(cancelled) > 0 and set(cancelled.reason) == {INTERRUPTED}
    assert signal.getsignal(signal.SIGINT) is before  # restored


def spec(tmp_path: Path, prompt_tokens: int = 100) -> Path:
    path = tmp_path / "w.yaml"
    path.write_text(
        "models: [llama-3.1-8b]\nsources:\n  - name: s\n"
        "    arrivals: {process: poisson, rate_per_s: 5, count: 10}\n"
        f"    lengths: {{prompt_tokens: {{dist: constant, value: {prompt_tokens}}}, "
        "output_tokens: {dist: constant, value: 10}}\n"
        "    model: llama-3.1-8b\n    slo_class: interactive\n"
    )
    return path


def serve_sim(tmp_path: Path, *args: str, prompt_tokens: int = 100) -> tuple[int, list[str]]:
    work = spec(tmp_path, prompt_tokens)
    return run_cli_lines("serve", str(work), "-c", str(CLUSTER), "--engine", "sim", *args)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("../../escaped", "a run name is one folder name"),
        ("/abs", "a run name is one folder name"),
        (".hidden", "a run name is one folder name"),
        ("afile", "a file stands where the run directory would go"),
        ("afile/x", "a run name is one folder name"),
    ],
)
def test_run_names_never_leave_runs_and_never_overwrite(
    tmp_path: Path, where: str, message: str
) -> None:
    runs = tmp_path / "a" / "b" / "runs"
    runs.mkdir(parents=True)
    (runs / "afile").write_text("keep me")
    code, lines = serve_sim(tmp_path, "--runs", str(runs), "--name", where)
    assert code == 2 and len(lines) == 1 and message in lines[0]
    assert sorted(p.name for p in (tmp_path / "a").rglob("*")) == ["afile", "b", "runs"]
    assert (runs / "afile").read_text() == "keep me"


@pytest.mark.parametrize("runs", ["afile/runs", "/proc/qlmctl-runs"])
def test_run_folder_that_cannot_be_created_is_one_line_and_exit_2(
    tmp_path: Path, runs: str
) -> None:
    (tmp_path / "afile").write_text("")
    target = runs if runs.startswith("/") else str(tmp_path / runs)
    code, lines = serve_sim(tmp_path, "--runs", target, "--name", "r")
    assert code == 2 and len(lines) == 1 and "cannot create the run directory" in lines[0]


def test_a_run_with_rejected_requests_exits_3_with_one_line(tmp_path: Path) -> None:
    # 2 million prompt tokens fit no KV cache: the (simulated) server rejects every one
    runs = str(tmp_path / "runs")
    code, lines = serve_sim(tmp_path, "--runs", runs, "--name", "a", prompt_tokens=2_000_000)
    assert code == 3
    assert "10 were rejected of 10" in lines[-1]
    code, _ = serve_sim(tmp_path, "--runs", runs, "--name", "b")
    assert code == 0


def test_a_port_in_use_is_refused_before_launch(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        launcher = VllmLauncher(
            ModelSpec(name="tiny", path=str(tmp_path)), LaunchSpec(port=port), tmp_path / "log"
        )
        with pytest.raises(BadInput, match=f"port {port} on 127.0.0.1 is already in use"):
            launcher.start()
    assert not launcher.is_alive() and not (tmp_path / "log").exists()


def test_an_error_after_the_live_view_starts_on_its_own_line() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=80)
    with pytest.raises(RuntimeError), live_view("vllm", 3, console):
        raise RuntimeError("boom")
    console.print("error: boom")
    assert "\nerror: boom" in out.getvalue()


def test_a_value_that_fits_no_union_member_names_the_member_it_was_meant_as(
    tmp_path: Path,
) -> None:
    path = spec(tmp_path)
    path.write_text(
        path.read_text().replace(
            "model: llama-3.1-8b", "model: {by: fraction, weights: {llama-3.1-8b: .inf}}"
        )
    )
    code, lines = run_cli_lines("workload", "show", str(path))
    assert code == 2 and len(lines) == 1
    assert "weights.llama-3.1-8b': Input should be a finite number" in lines[0]


def test_a_launched_server_that_wants_an_api_key_fails_at_once(tmp_path: Path) -> None:
    launcher = VllmLauncher(
        ModelSpec(name="tiny", path=str(tmp_path)), LaunchSpec(port=1), tmp_path / "log"
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        return httpx.Response(401, json={"error": "Unauthorized"})

    with (
        httpx.Client(transport=httpx.MockTransport(handler)) as client,
        pytest.raises(BadInput, match="needs an API key"),
    ):
        launcher._model_listed(client)


def run_cli_lines(*args: str) -> tuple[int, list[str]]:
    done = run_cli(*args)
    return done.returncode, [line for line in done.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "option", ["--connect-timeout", "--first-token-timeout", "--token-timeout"]
)
def test_timeouts_that_are_not_positive_and_finite_are_refused(tmp_path: Path, option: str) -> None:
    for value in ("0", "inf"):
        code, lines = serve_sim(tmp_path, "--runs", str(tmp_path / "runs"), option, value)
        assert code == 2 and len(lines) == 1 and "must be a positive number" in lines[0]
    assert not (tmp_path / "runs").exists()  # refused before the run folder is made
