"""The real driver's handle on one vLLM instance: launch or attach, swap, watch, stop.

A launched instance owns a :class:`~qlmctl.engine.launcher.VllmLauncher`; loading another
model stops it and starts a new ``vllm serve`` with the same launch spec (a cold start;
on CPU vLLM refuses sleep mode, so there is no warm start to use). An attached instance
is only checked (it must serve its resident model) and can never swap: the driver tells
the core it serves that one model. Blocking launcher calls run in worker threads.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from qlmctl.domain import ClusterSpec, InstanceSpec
from qlmctl.engine.launcher import VllmLauncher
from qlmctl.engine.vllm import check_endpoint
from qlmctl.errors import BadInput, EngineError


class RealInstance:
    """One instance of the cluster as the real driver runs it."""

    def __init__(
        self,
        spec: InstanceSpec,
        cluster: ClusterSpec,
        log_dir: Path,
        *,
        priority_scheduling: bool,
        cpu: bool | None = None,
        ready_timeout_s: float = 300.0,
    ) -> None:
        model = spec.model or (spec.models[0] if spec.models else None)
        if model is None:
            raise BadInput(f"instance {spec.id!r}: the real engine needs a resident 'model'")
        self.spec = spec
        self.model = model
        self.base_url = spec.base_url
        self.headers = spec.auth_headers()  # API key of an attached server; never logged
        self.swapping = False  # a load is in progress: not a failure if the process is gone
        self.down = False  # reported down; no work until a load brings it back
        self._cluster = cluster
        self._log_dir = log_dir
        self._priority = priority_scheduling
        self._cpu = cpu
        self._ready_timeout_s = ready_timeout_s
        self._launcher: VllmLauncher | None = None

    @property
    def launched(self) -> bool:
        return self.spec.launch is not None

    def alive(self) -> bool:
        """Whether a launched server's process runs (attached ones: assumed, see polling)."""
        return self._launcher.is_alive() if self._launcher is not None else not self.launched

    async def start(self, client: httpx.AsyncClient) -> None:
        """Launch and wait until ready, or check an attached endpoint serves the model."""
        if not self.launched:
            await check_endpoint(client, self.base_url, self.model, self.headers)
            return
        await self._launch(self.model)

    async def load(self, model: str) -> None:
        """Serve ``model`` instead: stop the server, start it with ``model`` (cold start)."""
        if not self.launched:
            raise EngineError(f"instance {self.spec.id}: attached endpoints cannot swap models")
        self.swapping = True
        try:
            await self.stop()
            await self._launch(model)
            self.model = model
            self.down = False
        finally:
            self.swapping = False

    async def stop(self) -> None:
        """Stop a launched server (SIGTERM, then SIGKILL); no-op when attached or stopped."""
        if self._launcher is not None:
            launcher, self._launcher = self._launcher, None
            await asyncio.to_thread(launcher.stop)

    def kill(self) -> None:
        """Tests: make the server process die as if it crashed."""
        if self._launcher is not None:
            self._launcher.stop(grace_s=0.0)

    async def _launch(self, model: str) -> None:
        assert self.spec.launch is not None
        log = self._log_dir / f"{self.spec.id}-{model}.log"
        launcher = VllmLauncher(
            self._cluster.model(model),
            self.spec.launch,
            log,
            cpu=self._cpu,
            priority_scheduling=self._priority,
            die_with_parent=True,
            headers=self.headers,
        )
        self._launcher = launcher
        launcher.start()
        await asyncio.to_thread(launcher.wait_ready, self._ready_timeout_s)
