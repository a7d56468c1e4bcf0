"""Run the gateway: the real driver's loop and uvicorn, in one asyncio event loop.

How it works: the listening socket is bound first (a taken port fails before any vLLM
server starts); the driver launches or attaches the instances and, once the core
exists, uvicorn starts accepting on that socket. The run ends when the driver stops
(Ctrl-C, SIGTERM, or :meth:`Gateway.request_stop` from another thread): what is still
queued or in flight is cancelled (clients get an error, the log says ``cancelled``),
then uvicorn closes its connections and the run log is closed. Uvicorn's own signal
handling is switched off so the driver's stop is the only way down.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from qlmctl.domain import ClusterSpec, SLOClass
from qlmctl.errors import BadInput
from qlmctl.gateway.app import build_app
from qlmctl.gateway.batches import BatchStore
from qlmctl.gateway.metrics import GatewayMetrics
from qlmctl.gateway.options import GatewayOptions
from qlmctl.perfmodel import PerfModel
from qlmctl.plan.types import Policy
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.real_driver import RealDriver, RealOptions
from qlmctl.serve.run import ProgressFn, RunSummary
from qlmctl.workload import Workload


@dataclass(frozen=True)
class GatewayJob:
    """A checked gateway run, ready to start (see :func:`qlmctl.gateway.command`)."""

    cluster: ClusterSpec
    perf: Mapping[tuple[str, str], PerfModel]
    policy: Policy
    config: CoreConfig
    classes: Mapping[str, SLOClass]
    options: GatewayOptions
    run_dir: Path
    seed: int = 0
    real: RealOptions | None = None
    meta: Mapping[str, Any] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.options.host}:{self.options.port}"


class Gateway:
    """One gateway run; :meth:`run` in an event loop, :meth:`request_stop` from anywhere."""

    def __init__(self, job: GatewayJob) -> None:
        self.job = job
        self.started = threading.Event()  # set once clients are accepted
        self.loop: asyncio.AbstractEventLoop | None = None  # the gateway's, while running
        self.driver: RealDriver | None = None

    def request_stop(self) -> None:
        """Stop the gateway (thread-safe); :meth:`run` then returns the summary."""
        loop, driver = self.loop, self.driver
        if loop is not None and driver is not None:
            loop.call_soon_threadsafe(driver.stop.set)

    async def run(self, on_progress: ProgressFn | None = None) -> RunSummary:
        """Serve until stopped; the summary of every request seen."""
        job = self.job
        workload = Workload.from_requests([], job.classes, "gateway")
        driver = RealDriver(
            workload, job.cluster, job.perf, job.policy, job.config, job.seed, job.real
        )
        driver.listening = True
        metrics = GatewayMetrics(lambda: driver.core if driver.serving.is_set() else None)
        driver.on_attempt, driver.on_operation = metrics.attempt, metrics.operation
        models = served_models(job.cluster)
        batches = BatchStore(job.run_dir / "batches", driver, job.options, job.classes, models)
        app = build_app(driver, job.options, metrics, job.classes, models, batches)
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5
        )
        server = _Server(config)
        self.loop, self.driver = asyncio.get_running_loop(), driver
        meta = {**(job.meta or {}), "gateway": job.options.describe()}
        with _listen(job.options.host, job.options.port) as sock, _on_sigterm(driver.stop):
            run = asyncio.create_task(driver.run(job.run_dir, meta, on_progress))
            ready = asyncio.create_task(driver.serving.wait())
            await asyncio.wait({run, ready}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if run.done():
                return run.result()  # stopped (or failed) before the instances were up
            serving = asyncio.create_task(server.serve(sockets=[sock]))
            while not server.started and not serving.done():
                await asyncio.sleep(0.02)
            self.started.set()
            try:
                return await run
            finally:
                server.should_exit = True
                await serving


class _Server(uvicorn.Server):
    """Uvicorn without its signal handlers: the driver's stop event ends the run."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.contextmanager
def _listen(host: str, port: int) -> Iterator[socket.socket]:
    """The bound listening socket; :class:`BadInput` if the address cannot be used."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BadInput(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    with sock:
        yield sock


@contextlib.contextmanager
def _on_sigterm(stop: asyncio.Event) -> Iterator[None]:
    """SIGTERM stops the gateway as Ctrl-C does (main thread only)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    except (NotImplementedError, RuntimeError):
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def served_models(cluster: ClusterSpec) -> list[str]:
    """Models some instance may serve (an attached instance: only its resident model)."""
    names = [m.name for m in cluster.models]
    return sorted(
        {
            m
            for i in cluster.instances
            for m in names
            if (i.model == m if i.launch is None else i.can_serve(m))
        }
    )


def run_gateway(job: GatewayJob, on_progress: ProgressFn | None = None) -> RunSummary:
    """Serve ``job`` until Ctrl-C or SIGTERM; the summary of the run."""
    return asyncio.run(Gateway(job).run(on_progress))
