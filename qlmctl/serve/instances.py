"""The real driver's handle on one vLLM instance: launch or attach, change model, watch, stop.

An instance is one GPU. A launched instance runs one ``vllm serve`` for its resident
model, plus, for every other model it keeps warm (``InstanceSpec.warm``), a server of its
own (``InstanceSpec.port_of``) that is put to sleep as soon as it is ready, so only one
server of the instance is awake at a time. Changing model is then a warm start:
``POST /sleep?level=1`` on the awake server, ``POST /wake_up`` on the target, each checked
with ``GET /is_sleeping`` (the servers' own state, recorded in :attr:`RealInstance.history`).
On a GPU, sleep level 1 moves the weights to host memory and frees the KV cache; on CPU
vLLM refuses ``--enable-sleep-mode`` and the same dev endpoints only pause and resume the
scheduler (the memory stays taken), so the warm start there saves the restart but not
the memory. A model that is not kept warm is a cold start: the server is stopped and
started again with the other model.

An attached instance is only checked (it must serve its resident model) and can never
change model: the driver tells the core it serves that one model. Blocking launcher
calls run in worker threads.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from qlmctl.domain import ClusterSpec, InstanceSpec
from qlmctl.engine.launcher import VllmLauncher
from qlmctl.engine.vllm import check_endpoint, is_sleeping, sleep, wake_up
from qlmctl.errors import BadInput, EngineError


@dataclass(frozen=True, slots=True)
class SleepCheck:
    """One sleep or wake of a warm server and what the server said afterwards."""

    model: str
    verb: str  # "sleep" | "wake_up"
    elapsed_s: float  # the HTTP call
    is_sleeping: bool | None  # GET /is_sleeping right after


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
        self.headers = spec.auth_headers()  # API key of an attached server; never logged
        self.swapping = False  # a load is in progress: not a failure if the process is gone
        self.down = False  # reported down; no work until a load brings it back
        self.history: list[SleepCheck] = []  # every sleep and wake, in order
        self.last_load_kind = "swap"  # "wake" or "swap" (restart) of the last load
        self.cold_starts: list[tuple[str, float]] = []  # (model, launch to ready seconds)
        self._cluster = cluster
        self._log_dir = log_dir
        self._priority = priority_scheduling
        self._cpu = cpu
        self._ready_timeout_s = ready_timeout_s
        self._client: httpx.AsyncClient | None = None
        # model -> its server; warm instances hold one per warm model, others at most one
        self._servers: dict[str, VllmLauncher] = {}

    @property
    def launched(self) -> bool:
        return self.spec.launch is not None

    @property
    def warm(self) -> bool:
        """Whether this instance keeps several models warm (one server each)."""
        return self.launched and bool(self.spec.warm)

    @property
    def base_url(self) -> str:
        """URL of the server that serves the current model."""
        server = self._servers.get(self.model)
        return server.base_url if server is not None else self.spec.base_url

    def alive(self) -> bool:
        """Whether a launched server's process runs (attached ones: assumed, see polling)."""
        server = self._servers.get(self.model)
        return server.is_alive() if server is not None else not self.launched

    async def start(self, client: httpx.AsyncClient) -> None:
        """Launch and wait until ready, or check an attached endpoint serves the model.

        A warm instance starts every warm server at once, then puts all but the resident
        model's to sleep.
        """
        self._client = client
        if not self.launched:
            await check_endpoint(client, self.base_url, self.model, self.headers)
            return
        if not self.warm:
            await self._launch(self.model)
            return
        await asyncio.gather(*(self._launch(m) for m in self.spec.warm_models))
        for m in self.spec.warm_models:
            if m != self.model:
                await self._sleep(m)

    async def load(self, model: str) -> None:
        """Serve ``model`` instead: wake it if it is kept warm here, else restart."""
        if not self.launched:
            raise EngineError(f"instance {self.spec.id}: attached endpoints cannot swap models")
        self.swapping = True
        try:
            if self.warm and model in self._servers and self.model in self._servers:
                await self._sleep(self.model)
                await self._wake(model)
                self.last_load_kind = "wake"
            else:
                await self._stop(self.model)
                await self._launch(model)
                self.last_load_kind = "swap"
            self.model = model
            self.down = False
        finally:
            self.swapping = False

    async def measure_sleep_wake(self, model: str) -> tuple[float, float]:
        """Time one wake and one sleep of ``model``'s (asleep) server: (sleep_s, wake_s)."""
        woke = await self._wake(model)
        slept = await self._sleep(model)
        return slept, woke

    async def stop(self) -> None:
        """Stop every launched server (SIGTERM, then SIGKILL); no-op when attached."""
        servers, self._servers = list(self._servers.values()), {}
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in servers))

    def kill(self) -> None:
        """Tests: make the current server process die as if it crashed."""
        server = self._servers.get(self.model)
        if server is not None:
            server.stop(grace_s=0.0)

    async def _stop(self, model: str) -> None:
        server = self._servers.pop(model, None)
        if server is not None:
            await asyncio.to_thread(server.stop)

    async def _sleep(self, model: str) -> float:
        return await self._sleep_or_wake(model, "sleep", want_sleeping=True)

    async def _wake(self, model: str) -> float:
        return await self._sleep_or_wake(model, "wake_up", want_sleeping=False)

    async def _sleep_or_wake(self, model: str, verb: str, *, want_sleeping: bool) -> float:
        assert self._client is not None
        url = self._servers[model].base_url
        start = time.perf_counter()
        call = sleep(self._client, url, level=1) if want_sleeping else wake_up(self._client, url)
        result = await call
        if not result.supported:
            raise EngineError(f"{url}: {verb} refused ({result.detail})")
        elapsed = time.perf_counter() - start
        state = await is_sleeping(self._client, url)
        self.history.append(SleepCheck(model, verb, elapsed, state))
        if state is not want_sleeping:
            raise EngineError(f"{url}: after {verb} the server says is_sleeping={state}")
        return elapsed

    async def _launch(self, model: str) -> None:
        assert self.spec.launch is not None
        log = self._log_dir / f"{self.spec.id}-{model}.log"
        launch = self.spec.launch
        if self.warm:
            launch = launch.model_copy(update={"port": self.spec.port_of(model)})
        launcher = VllmLauncher(
            self._cluster.model(model),
            launch,
            log,
            cpu=self._cpu,
            priority_scheduling=self._priority,
            die_with_parent=True,
            headers=self.headers,
            sleep_mode=self.warm,
        )
        self._servers[model] = launcher
        launcher.start()
        ready_s = await asyncio.to_thread(launcher.wait_ready, self._ready_timeout_s)
        self.cold_starts.append((model, ready_s))
