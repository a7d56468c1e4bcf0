"""The simulated driver: the serving core against :class:`SimEngine` in virtual time.

A discrete-event loop: the next moment is the earliest of the next arrival, the engine's
next event, the core's next timer and the improver's next answer; the clock jumps there,
the engine's events up to it are fed to the core, then the improver's answer if due,
then the step both drivers share (:class:`~qlmctl.serve.run.DriverStep`) feeds the
arrivals at it, asks the core to decide and applies the actions to the engine. Ties are
broken in that fixed order, so the same inputs and seed give byte-identical Parquet
files: the policy's wall-clock solve times stay out of them (run.json's
``solver_wall_s`` has their total).

The background improver (the ``qlm`` policy's MILP) runs at the re-plan that offers a
snapshot, only when ``improve=True`` (``CoreConfig.improve``), and its answer reaches the
core as much virtual time later as the solve took (wall clock): when the real driver's
worker thread would have it. Applied at once instead, its plans were served fresher than
any real run could serve them, which flattered them (``qlm`` offered the MILP every 2 s
rather than 10: C-longprompt 1.5x 72.1 % against 69.1 % with the solve's latency, D
1.5x 80.3 against 76.6). It is off by default here: when the answer arrives depends on
the machine's speed, which would break determinism. An improver whose answers come a
fixed delay after their snapshots (``Improver.answer_delay_s``; ``qlm``'s
``answer_at_budget``, as the benchmarks run it) gets them then: such runs repeat but
for a solve that its time limit cuts elsewhere (on a busier or slower machine).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qlmctl.clock import VirtualClock
from qlmctl.domain import ClusterSpec, Request, check_models_served
from qlmctl.engine.events import Action, Dispatch, Evict, LoadModel
from qlmctl.engine.sim import SimEngine
from qlmctl.perfmodel import PerfModel
from qlmctl.plan.types import Improver, Plan, Policy, QueueSnapshot, answer_after_s
from qlmctl.serve.config import CoreConfig, ImproveFn
from qlmctl.serve.core import ServeCore
from qlmctl.serve.run import (
    INTERRUPTED,
    DriverStep,
    ProgressFn,
    RunSummary,
    open_log,
    run_meta,
    sigint_flag,
)
from qlmctl.serve.runlog import Outcome
from qlmctl.workload import Workload

# core timers firing this many times in a row with nothing else happening: stalled
_MAX_IDLE_WAKEUPS = 10_000


def run_simulated(
    workload: Workload,
    cluster: ClusterSpec,
    perf: Mapping[tuple[str, str], PerfModel],
    policy: Policy,
    config: CoreConfig | None,
    run_dir: Path,
    seed: int = 0,
    *,
    meta: dict[str, Any] | None = None,
    failures: Sequence[tuple[float, str]] = (),
    on_progress: ProgressFn | None = None,
) -> RunSummary:
    """Replay ``workload`` on a simulated ``cluster`` and write the run log to ``run_dir``.

    Args:
        workload: the requests (arrival times are virtual seconds from 0).
        cluster: instances, each starting with its resident model ready.
        perf: (model, gpu) -> performance model for every pair the cluster may use.
        policy: the scheduling policy (see :func:`qlmctl.plan.policies.make_policy`).
        config: the core's knobs; ``improve`` defaults to False here (see the module doc).
        run_dir: the run directory to create (must not exist or be empty).
        seed: seeds the policy's randomness.
        meta: extra run.json keys (workload and cluster paths).
        failures: (virtual time, instance id) pairs: the instance fails then (fault tests).
        on_progress: called now and then with the core's counts and the virtual time.

    Returns:
        The run's summary; the run directory holds the complete log.
    """
    config = config if config is not None else CoreConfig(improve=False)
    check_models_served(cluster, workload.models)
    scheduling = "priority" if config.vllm_priority else "fcfs"
    engine = SimEngine(cluster, perf, scheduling=scheduling)
    rng = np.random.default_rng(seed)
    core = ServeCore(cluster, workload.slo_classes, perf, policy, config, rng, log_wall_times=False)
    improve_rng = np.random.default_rng([seed, 1])
    clock = VirtualClock()
    by_id = {r.id: r for r in workload.requests}
    pending_failures = sorted(failures)
    meta = run_meta(workload, cluster, policy.name, "sim", config, seed, meta)
    idle = 0

    def enrich(row: dict[str, Any]) -> None:  # what the engine's prefix cache served
        if row["outcome"] == Outcome.FINISHED:
            row["cached_tokens"] = engine.cached_tokens(row["request_id"])

    def apply(actions: list[Action]) -> None:
        _apply(engine, actions, by_id, clock.now())

    answers: list[tuple[float, Plan | None]] = []  # (when the core gets it, the plan)

    delay_s = policy.answer_delay_s if isinstance(policy, Improver) else None

    def improve(improver: ImproveFn, snap: QueueSnapshot, now_s: float) -> None:
        started = time.perf_counter()
        plan = improver(snap, improve_rng)
        answers.append((now_s + answer_after_s(delay_s, started), plan))  # when it is ready

    with sigint_flag() as interrupted, open_log(run_dir, meta) as log:
        step = DriverStep(
            core, workload.requests, log, apply, improve,
            enrich=enrich, on_progress=on_progress, progress_every=500,
        )  # fmt: skip
        while True:
            if interrupted.is_set():  # Ctrl-C: as the real driver does (see serve/run.py)
                step.stop(clock.now(), INTERRUPTED)
                break
            t = min(
                step.next_arrival_s,
                _or_inf(engine.next_event_time()),
                _or_inf(core.next_wakeup_s()),
                pending_failures[0][0] if pending_failures else math.inf,
                answers[0][0] if answers else math.inf,
            )
            if t == math.inf or idle > _MAX_IDLE_WAKEUPS:
                break
            t = max(t, clock.now())
            clock.advance_to(t)
            events = engine.advance(t)
            for ev in events:
                core.on_event(ev, t)
            for inst in cluster.instances:  # what vLLM's /metrics would say
                core.on_backpressure(inst.id, engine.num_waiting(inst.id), None)
            while pending_failures and pending_failures[0][0] <= t:
                engine.fail(pending_failures.pop(0)[1], t)
            while answers and answers[0][0] <= t:
                core.on_plan(answers.pop(0)[1], t)
            busy = step(t)
            idle = 0 if (events or busy) else idle + 1
        if not core.done:
            core.cancel_all(clock.now(), "simulation stalled")  # the engine is dropped anyway
            step.write()
        stats = core.stats()
        if on_progress is not None:
            on_progress(stats, clock.now())
        stopped = interrupted.is_set()
        log.close(
            duration_s=clock.now(),
            interrupted=stopped,
            speed_factors=core.speed_factors(),
            solver_wall_s=stats.solver_wall_s,
        )
    summary = RunSummary.from_stats(stats, Path(run_dir), policy.name, "sim", clock.now())
    return summary.with_interrupted(stopped)


def _apply(
    engine: SimEngine, actions: list[Action], by_id: Mapping[str, Request], now_s: float
) -> None:
    for a in actions:
        if isinstance(a, Dispatch):
            engine.submit(by_id[a.request_id], a.instance_id, a.priority, now_s, a.kept_tokens)
        elif isinstance(a, Evict):
            engine.abort(a.request_id, now_s)
        elif isinstance(a, LoadModel):
            engine.load_model(a.instance_id, a.model, now_s, sleep_current=a.sleep_current)


def _or_inf(t: float | None) -> float:
    return math.inf if t is None else t
