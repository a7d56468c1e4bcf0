"""VllmLauncher without vLLM: the command it builds, and failures with a fake server."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from qlmctl.domain import LaunchSpec, ModelSpec
from qlmctl.engine.launcher import VllmLauncher, flag_value, serve_command
from qlmctl.errors import EngineError

MODEL = ModelSpec(name="tiny", path="/models/tiny", max_model_len=512)


def fake_vllm(tmp_path: Path, body: str) -> Path:
    """An executable that stands in for `vllm` and runs ``body`` (Python)."""
    exe = tmp_path / "fake-vllm"
    exe.write_text(f"#!{sys.executable}\nimport sys, time\n{body}\n")
    exe.chmod(0o755)
    return exe


def test_cpu_defaults_are_added() -> None:
    args, env = serve_command(MODEL, LaunchSpec(port=8123), cpu=True, vllm_bin="vllm")
    assert args[:3] == ["vllm", "serve", "/models/tiny"]
    assert flag_value(args, "--port") == "8123"
    assert flag_value(args, "--served-model-name") == "tiny"
    assert flag_value(args, "--max-model-len") == "512"
    assert flag_value(args, "--distributed-executor-backend") == "uni"
    assert flag_value(args, "--dtype") == "float32"
    assert "--enforce-eager" in args
    assert flag_value(args, "--kv-cache-memory-bytes") == str(64 * 1024 * 1024)
    assert "--scheduling-policy" not in args
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert env["OMP_NUM_THREADS"] == "1" and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"


def test_user_arguments_override_the_defaults() -> None:
    launch = LaunchSpec(
        port=8123,
        extra_args=[
            "--dtype=bfloat16",
            "--num-gpu-blocks-override",
            "6",
            "--max-model-len",
            "1024",
        ],
        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
    )
    args, env = serve_command(MODEL, launch, cpu=True, priority_scheduling=True, vllm_bin="vllm")
    assert flag_value(args, "--dtype") == "bfloat16"
    assert args.count("--max-model-len") == 1 and flag_value(args, "--max-model-len") == "1024"
    assert "--kv-cache-memory-bytes" in args  # a block count alone trips vLLM's memory check
    assert flag_value(args, "--scheduling-policy") == "priority"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def test_gpu_launch_gets_no_cpu_flags() -> None:
    args, env = serve_command(MODEL, LaunchSpec(port=8123), cpu=False, vllm_bin="vllm")
    assert "--enforce-eager" not in args and "--dtype" not in args
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env


def test_sleep_mode_turns_on_the_dev_endpoints() -> None:
    launch = LaunchSpec(port=8123, extra_args=["--enable-sleep-mode"])
    _, env = serve_command(MODEL, launch, cpu=False, vllm_bin="vllm")
    assert env["VLLM_SERVER_DEV_MODE"] == "1"


def test_a_warm_server_sleeps_by_dev_endpoints_and_reports_cached_tokens() -> None:
    args, env = serve_command(MODEL, LaunchSpec(port=8123), cpu=True, vllm_bin="vllm",
                              sleep_mode=True)  # fmt: skip
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert "--enable-sleep-mode" not in args  # vLLM refuses it on CPU
    assert "--enable-prompt-tokens-details" in args
    args, env = serve_command(MODEL, LaunchSpec(port=8123), cpu=False, vllm_bin="vllm",
                              sleep_mode=True)  # fmt: skip
    assert "--enable-sleep-mode" in args and env["VLLM_SERVER_DEV_MODE"] == "1"
    _, env = serve_command(MODEL, LaunchSpec(port=8123), cpu=True, vllm_bin="vllm")
    assert "VLLM_SERVER_DEV_MODE" not in env


def test_early_exit_raises_with_the_log_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exe = fake_vllm(tmp_path, "print('loading'); print('ValueError: no KV cache'); sys.exit(3)")
    monkeypatch.setenv("QLMCTL_VLLM", str(exe))
    launcher = VllmLauncher(MODEL, LaunchSpec(port=1), tmp_path / "log.txt", cpu=True)
    launcher.start()
    with pytest.raises(EngineError, match=r"exited with code 3(.|\n)*no KV cache"):
        launcher.wait_ready(30)
    assert not launcher.is_alive()


def test_timeout_then_stop_kills_a_server_that_ignores_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True)"
    exe = fake_vllm(tmp_path, body + "\ntime.sleep(600)")
    monkeypatch.setenv("QLMCTL_VLLM", str(exe))
    with VllmLauncher(MODEL, LaunchSpec(port=1), tmp_path / "log.txt", cpu=True) as launcher:
        with pytest.raises(EngineError, match=r"not ready after 1 s(.|\n)*up"):
            launcher.wait_ready(1.0)
        assert launcher.is_alive()
        start = time.monotonic()
        launcher.stop(grace_s=0.5)
        assert time.monotonic() - start < 5
        assert not launcher.is_alive()
