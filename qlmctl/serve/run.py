"""What both drivers share: the step they take, run metadata, the log rows, the summary.

The drivers differ only in their clock and engine. Each moment of a run is one
:class:`DriverStep` (arrivals due, decide, improve, apply, write rows, progress), and
everything a run writes besides the rows (run.json keys, the final summary) is built
here, so the two cannot drift apart. Both stop the same way on Ctrl-C: SIGINT only
sets a flag (:func:`sigint_flag`, or the event loop's handler), the driver's loop sees it
between two steps, cancels every request not yet ended (:meth:`DriverStep.stop`, reason
:data:`INTERRUPTED`), closes the log and returns an interrupted summary. A
KeyboardInterrupt never lands in the middle of the core.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import re
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qlmctl.domain import ClusterSpec, Request
from qlmctl.engine.events import Action
from qlmctl.plan.types import QueueSnapshot
from qlmctl.serve.config import CoreConfig, CoreStats, ImproveFn
from qlmctl.serve.core import ServeCore
from qlmctl.serve.runlog import RunLogWriter
from qlmctl.workload import Workload

ProgressFn = Callable[[CoreStats, float], None]  # (counts so far, run time)
RowHook = Callable[[dict[str, Any]], None]  # sees (and may fill) one log row
# (improver, snapshot, now): start it; its answer reaches the core later, through on_plan
ImproveHook = Callable[[ImproveFn, QueueSnapshot, float], None]
INTERRUPTED = "interrupted (Ctrl-C)"  # reason of the requests a Ctrl-C cancels


@dataclass(frozen=True)
class RunSummary:
    """The outcome of one ``serve`` run, as printed at the end."""

    run_dir: Path
    policy: str
    engine: str
    requests: int
    finished: int
    slo_met: int
    failed: int
    rejected: int
    cancelled: int
    duration_s: float
    attainment_by_class: dict[str, float | None] = field(default_factory=dict)
    operations: dict[str, int] = field(default_factory=dict)  # kind -> count
    interrupted: bool = False  # stopped by Ctrl-C before the workload ended

    @property
    def attainment(self) -> float:
        """Fraction of all requests that finished within their SLO."""
        return self.slo_met / self.requests if self.requests else 0.0

    @property
    def goodput_rps(self) -> float:
        """Requests finished within their SLO per second of run time."""
        return self.slo_met / self.duration_s if self.duration_s > 0 else 0.0

    def with_interrupted(self, interrupted: bool) -> RunSummary:
        return replace(self, interrupted=interrupted)

    @classmethod
    def from_stats(
        cls, stats: CoreStats, run_dir: Path, policy: str, engine: str, duration_s: float
    ) -> RunSummary:
        return cls(
            run_dir=run_dir,
            policy=policy,
            engine=engine,
            requests=stats.arrived,
            finished=stats.finished,
            slo_met=stats.slo_met,
            failed=stats.failed,
            rejected=stats.rejected,
            cancelled=stats.cancelled,
            duration_s=duration_s,
            attainment_by_class={
                c: (m / n if n else None) for c, (m, n) in stats.met_by_class.items()
            },
            operations=stats.operations,
        )


def run_meta(
    workload: Workload,
    cluster: ClusterSpec,
    policy: str,
    engine: str,
    config: CoreConfig,
    seed: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """run.json keys written by ``serve`` (``extra`` adds the workload and cluster paths)."""
    return {
        "run_id": None,
        "policy": policy,
        "engine": engine,
        "workload": workload.source,
        "workload_fingerprint": workload.fingerprint,
        "cluster": None,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "instances": [{"id": i.id, "gpu": i.gpu} for i in cluster.instances],
        "slo_classes": {
            c.name: {"ttft_s": c.ttft_s, "e2e_s": c.e2e_s, "weight": c.weight}
            for c in workload.slo_classes.values()
        },
        "config": {**config.to_dict(), "seed": seed},
        **(extra or {}),
    }


def default_run_name(workload: Workload, policy: str, engine: str) -> str:
    """``<workload stem>-<policy>-<engine>-<UTC timestamp>``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(workload.source).stem).lstrip("._-")
    stem = stem or "workload"
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"{stem}-{policy}-{engine}-{stamp}"


@contextlib.contextmanager
def open_log(run_dir: Path, meta: dict[str, Any]) -> Iterator[RunLogWriter]:
    """The run directory's writer (``run_id`` defaults to the directory name).

    The caller closes it (with ``duration_s``) when the run ends; if the run raises
    instead, the rows so far are flushed and the run stays marked incomplete.
    """
    log = RunLogWriter(run_dir, {**meta, "run_id": meta.get("run_id") or Path(run_dir).name})
    try:
        yield log
    except BaseException:
        if not log.closed:
            log.flush()
        raise


def write_rows(
    core: ServeCore,
    log: RunLogWriter,
    enrich: RowHook | None = None,
    on_operation: RowHook | None = None,
) -> None:
    """Move the core's pending rows into the writer.

    ``enrich`` may fill driver-only fields of attempt rows; ``on_operation`` sees each
    operation row (the gateway's metrics).
    """
    attempts, operations = core.take_log()
    for row in attempts:
        if enrich is not None:
            enrich(row)
        log.add_attempt(row)
    for row in operations:
        if on_operation is not None:
            on_operation(row)
        log.add_operation(row)
    log.maybe_flush()


class DriverStep:
    """The step both drivers take at each moment of a run.

    :meth:`__call__` feeds the core the workload's arrivals that are due, asks it to
    decide and applies the actions, hands a snapshot to the background improver, moves
    the log rows to disk and reports progress. The drivers feed engine events themselves
    (before the step) and differ in two hooks: ``apply`` sends actions to their engine,
    ``improve`` starts the improver, whose answer reaches the core later through
    ``on_plan``: the real driver runs it in a worker thread, the simulated one at once
    and hands the answer over when as much virtual time has passed as the solve took.
    """

    def __init__(
        self,
        core: ServeCore,
        requests: Sequence[Request],
        log: RunLogWriter,
        apply: Callable[[list[Action]], None],
        improve: ImproveHook,
        *,
        enrich: RowHook | None = None,
        on_operation: RowHook | None = None,
        on_progress: ProgressFn | None = None,
        progress_every: int = 1,
    ) -> None:
        """Args:
        core: the serving core.
        requests: the workload's requests in arrival order.
        log: the run log the rows go to (see :func:`write_rows` for ``enrich`` and
            ``on_operation``).
        apply: sends actions to the engine, in order.
        improve: runs the improver on a snapshot (see the class docstring).
        on_progress: called with the counts every ``progress_every`` steps.
        """
        self.core, self.log = core, log
        self._requests = requests
        self._next = 0  # index of the next request to arrive
        self._apply, self._improve = apply, improve
        self._enrich, self._on_operation = enrich, on_operation
        self._on_progress, self._progress_every = on_progress, progress_every
        self._steps = 0

    @property
    def next_arrival_s(self) -> float:
        """When the workload's next request arrives (inf: every one has)."""
        k = self._next
        return self._requests[k].arrival_s if k < len(self._requests) else math.inf

    @property
    def all_arrived(self) -> bool:
        """Whether every request of the workload has been fed to the core."""
        return self._next == len(self._requests)

    def __call__(self, now_s: float) -> bool:
        """Take the step at ``now_s``; whether anything arrived or was decided."""
        core = self.core
        arrived = self._arrive(now_s)
        actions = core.decide(now_s)
        self._apply(actions)
        snap = core.wants_improvement()
        if snap is not None and core.improver is not None:
            self._improve(core.improver, snap, now_s)
        self.write()
        self._steps += 1
        if self._on_progress is not None and self._steps % self._progress_every == 0:
            self._on_progress(core.stats(), now_s)
        return bool(arrived or actions)

    def stop(self, now_s: float, reason: str) -> None:
        """End the run early: the arrivals due join, then every request not yet ended is
        cancelled (those in flight aborted) with ``reason``."""
        self._arrive(now_s)
        self._apply(list(self.core.cancel_all(now_s, reason)))
        self.write()

    def write(self) -> None:
        """Move the core's pending rows to the log."""
        write_rows(self.core, self.log, self._enrich, self._on_operation)

    def _arrive(self, now_s: float) -> int:
        """Feed the requests that arrived by ``now_s``; how many."""
        first, requests = self._next, self._requests
        while self._next < len(requests) and requests[self._next].arrival_s <= now_s:
            self.core.on_arrival(requests[self._next], now_s)
            self._next += 1
        return self._next - first


@contextlib.contextmanager
def sigint_flag() -> Iterator[threading.Event]:
    """While the block runs, Ctrl-C sets the yielded event instead of raising.

    Only the main thread may install signal handlers; in another thread the event is
    simply never set (Ctrl-C then reaches whoever handles it there).
    """
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
