"""What a policy sees (a queue snapshot) and what it returns (a plan).

Rules: a snapshot is an immutable picture taken by the core at ``now_s``; a plan is the
ordered virtual queue of request groups per instance. Every waiting request of the
snapshot appears in exactly one group of exactly one instance; requests inside a group
keep arrival (FIFO) order. Deadlines are absolute: arrival + the class's TTFT target.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from qlmctl.domain import Request, SLOClass
from qlmctl.errors import BadInput
from qlmctl.fileio import atomic_write_text
from qlmctl.perfmodel import PerfModel

PLAN_VERSION = 1


class RunningRequest(NamedTuple):
    """A request in flight on an instance, with what it has done so far.

    NOTE: a named tuple, not a frozen dataclass: a snapshot under overload holds
    thousands, and one is built in half the time."""

    request: Request
    dispatch_s: float
    first_token_s: float | None
    generated_tokens: int


@dataclass(frozen=True, slots=True)
class InstanceState:
    """One instance as the core knows it at snapshot time.

    ``model`` is the resident model (or the one being loaded); ``ready_at_s`` is when it
    can start new work (``now_s`` when up, the end of a load in progress otherwise);
    ``up`` is False for a dead instance, which must get no work.
    """

    instance_id: str
    gpu: str
    model: str | None
    up: bool
    ready_at_s: float
    servable_models: frozenset[str] | None = None  # None: any model
    sleeping_models: frozenset[str] = frozenset()
    running: tuple[RunningRequest, ...] = ()
    max_running: int | None = None  # the core runs no more at once (None: the profile's)
    # the core sends work only while fewer than this wait in the engine (None: no limit)
    max_waiting: int | None = None

    def can_serve(self, model: str) -> bool:
        """Whether the instance is up and allowed to serve ``model``."""
        return self.up and (self.servable_models is None or model in self.servable_models)


@dataclass(frozen=True, slots=True, eq=False)
class StreamArrivals:
    """The recent arrivals of one (model, SLO class) stream, in arrival order."""

    count: int
    prompt_tokens: int  # summed over the stream
    max_output_tokens: np.ndarray  # [count] each request's cap
    target_output_tokens: np.ndarray  # [count] its true output length if known, else its cap

    @classmethod
    def of(cls, requests: Sequence[Request]) -> StreamArrivals:
        """The summary of ``requests`` (one stream, in arrival order)."""
        return cls(
            len(requests),
            sum(r.prompt_tokens for r in requests),
            np.array([r.max_output_tokens for r in requests], float),
            np.array([r.target_output_tokens for r in requests], float),
        )


@dataclass(frozen=True, slots=True)
class RecentArrivals:
    """The requests that arrived in the last ``window_s`` seconds, waiting or not: what
    the planner fits the coming arrivals from (none: it plans as if nothing comes)."""

    window_s: float = 0.0
    requests: tuple[Request, ...] = ()
    # the same requests per (model, class) stream; None: summarised from ``requests``
    # when asked (the serving core keeps them as requests come and go)
    streams: Mapping[tuple[str, str], StreamArrivals] | None = field(default=None, compare=False)

    def by_stream(self) -> Mapping[tuple[str, str], StreamArrivals]:
        """(model, class) -> that stream's arrivals."""
        if self.streams is not None:
            return self.streams
        kinds: dict[tuple[str, str], list[Request]] = {}
        for r in self.requests:
            kinds.setdefault((r.model, r.slo_class), []).append(r)
        return {key: StreamArrivals.of(reqs) for key, reqs in kinds.items()}


@dataclass(frozen=True)
class QueueSnapshot:
    """Everything a policy needs: waiting requests, instances, SLO classes, profiles,
    and the recent arrivals."""

    now_s: float
    waiting: tuple[Request, ...]  # not yet dispatched, in arrival order
    instances: tuple[InstanceState, ...]
    slo_classes: Mapping[str, SLOClass]
    perf: Mapping[tuple[str, str], PerfModel]  # (model, gpu) -> performance model
    recent: RecentArrivals = RecentArrivals()

    def deadline_s(self, request: Request) -> float:
        """Absolute TTFT deadline of ``request``."""
        return request.arrival_s + self.slo_classes[request.slo_class].ttft_s


@dataclass(frozen=True, slots=True)
class PlannedGroup:
    """A group of requests (same model, class, length class) placed on an instance."""

    group_id: str
    model: str
    slo_class: str
    request_ids: tuple[str, ...]  # FIFO order
    deadline_s: float  # earliest absolute deadline in the group
    predicted_start_s: float
    predicted_finish_s: float
    miss_probability: float  # expected fraction of its requests missing their SLO
    priority: int = 0  # vLLM request priority for this group's requests
    # per request, aligned with request_ids: when it takes a batch slot (mean), P(miss),
    # and its first token and finish (median and 90th percentile over the scoring
    # scenarios; inf where it is served after its instance's queue in that many of them,
    # null in the JSON form)
    request_start_s: tuple[float, ...] = ()
    request_miss_probability: tuple[float, ...] = ()
    # per request: when the core sends it (mean; at or before its start, see simulate)
    request_dispatch_s: tuple[float, ...] = ()
    request_first_token_s: tuple[float, ...] = ()
    request_first_token_p90_s: tuple[float, ...] = ()
    request_finish_s: tuple[float, ...] = ()
    request_finish_p90_s: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class InstancePlan:
    """The virtual queue of one instance: groups in execution order."""

    instance_id: str
    groups: tuple[PlannedGroup, ...]

    @property
    def models_in_order(self) -> list[str]:
        """The model of each segment of consecutive same-model groups (swaps between)."""
        out: list[str] = []
        for g in self.groups:
            if not out or out[-1] != g.model:
                out.append(g.model)
        return out


@dataclass(frozen=True, slots=True)
class SolverStats:
    """How the plan was found: timings, MILP status and gap, scores of the candidates."""

    build_s: float = 0.0
    solve_s: float = 0.0
    status: str = "none"
    mip_gap: float | None = None
    num_vars: int = 0
    num_constraints: int = 0
    chosen: str = "heuristic"  # which candidate won on the scoring scenarios
    scores: dict[str, float] = field(default_factory=dict)  # candidate -> expected attainment
    note: str = ""
    objective: float | None = None  # MILP: swap cost - expected weighted on-time requests
    bound: float | None = None  # MILP: HiGHS's proven bound on that objective (no plan beats it)


@dataclass(frozen=True)
class Plan:
    """Virtual queues per instance plus predictions and how they were made."""

    policy: str
    created_s: float
    instances: tuple[InstancePlan, ...]
    predicted_attainment: float  # expected weighted fraction of waiting requests meeting SLO
    predicted_attainment_by_class: dict[str, float]
    solver: SolverStats = field(default_factory=SolverStats)
    # the most any plan of its snapshot could attain: the requests late even if served
    # first miss in every plan (Problem.attainable)
    attainable: float = 1.0
    version: int = PLAN_VERSION
    # what `qlmctl plan` ran it from (workload fingerprint, cluster, profiles, policy
    # options, seed); `serve --plan` refuses a plan whose inputs differ (plan/planfile.py)
    meta: dict[str, Any] = field(default_factory=dict)

    def request_ids(self) -> list[str]:
        """Every planned request id, instance by instance, in planned order."""
        return [r for ip in self.instances for g in ip.groups for r in g.request_ids]

    def to_dict(self) -> dict[str, Any]:
        """The versioned JSON form written to ``plans/`` (an untimed forecast is null)."""
        data = asdict(self)
        for ip in data["instances"]:
            for g in ip["groups"]:
                for k in _UNTIMED_IS_NULL:
                    g[k] = [known_time(t) for t in g[k]]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "plan") -> Plan:
        """Read the JSON form; :class:`BadInput` for another version."""
        if data.get("version") != PLAN_VERSION:
            raise BadInput(f"{source}: plan version {data.get('version')!r} is not {PLAN_VERSION}")
        instances = tuple(
            InstancePlan(
                ip["instance_id"],
                tuple(
                    PlannedGroup(**{**g, **{k: _per_request(g, k) for k in PER_REQUEST}})
                    for g in ip["groups"]
                ),
            )
            for ip in data["instances"]
        )
        return cls(
            policy=data["policy"],
            created_s=data["created_s"],
            instances=instances,
            predicted_attainment=data["predicted_attainment"],
            predicted_attainment_by_class=dict(data["predicted_attainment_by_class"]),
            solver=SolverStats(**data["solver"]),
            attainable=data.get("attainable", 1.0),
            meta=dict(data.get("meta") or {}),
        )

    def save(self, path: Path) -> None:
        """Write atomically as JSON."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")


_UNTIMED_IS_NULL = (
    "request_first_token_s",
    "request_first_token_p90_s",
    "request_finish_s",
    "request_finish_p90_s",
)
# PlannedGroup's per-request columns (aligned with request_ids), and those holding times
PER_REQUEST_TIMES = ("request_start_s", "request_dispatch_s", *_UNTIMED_IS_NULL)
PER_REQUEST = ("request_ids", "request_miss_probability", *PER_REQUEST_TIMES)


def known_time(t: float) -> float | None:
    """``t``, or None where a forecast has none (inf: served after the queue)."""
    return None if t == math.inf else t


def _per_request(group: Mapping[str, Any], key: str) -> tuple[Any, ...]:
    """A per-request column of a group's JSON form (absent in older plans: empty)."""
    values = group.get(key) or ()
    if key in _UNTIMED_IS_NULL:
        return tuple(math.inf if v is None else v for v in values)
    return tuple(values)


# A late head waits behind work due within this many seconds of its turn, ahead of work
# due later (a batch class's hour). The core's test is early on purpose, and deferring
# behind work due in an hour cost what it deferred: 1.0 / 0.3 / 0.3 points of `heuristic`
# in A-mixed (4), (8), B-multimodel (8) at 2.5x.
DEFER_HORIZON_S = 600.0


@dataclass(frozen=True, slots=True)
class ServingStyle:
    """How the serving core runs a policy's plans."""

    # forward every request to vLLM at once, without backpressure (what routers do today)
    router: bool = False
    evicts: bool = True  # evict running work when the plan says a more urgent head misses
    # the core serves a request that can no longer get its first token in time when its
    # turn comes after the rest of its instance's queue (it would only make others late);
    # plans do not count on it: they shed what they foresee will miss
    defers_late: bool = True
    # ...ahead of groups due more than this many seconds after its turn
    defer_horizon_s: float = DEFER_HORIZON_S
    vllm_priority: bool = False  # send each group's class priority to vLLM's scheduler
    # its plans place requests before they arrive (a committed plan): each new request
    # waits for a re-plan, even where an engine would start it at once
    places_ahead: bool = False


class LengthEstimates(Protocol):
    """A policy's model of output lengths: what it expects, and what it learns from."""

    def expected(self, request: Request) -> float:
        """Expected output tokens of ``request``."""
        ...

    def expected_left(self, request: Request, generated: int) -> float:
        """Output tokens ``request`` is expected to generate after the ``generated`` it has."""
        ...

    def observe(self, model: str, slo_class: str, output_tokens: int) -> None:
        """A request of this (model, class) finished with ``output_tokens``."""
        ...


class Policy(Protocol):
    """A way of turning a queue snapshot into a plan, and of having it served.

    ``plan`` is called by the core on every re-plan (arrivals, completions, predicted
    violations; rate-limited) and by ``qlmctl plan``. It must not mutate the snapshot,
    must place every waiting request on an instance that can serve its model (raise
    :class:`~qlmctl.errors.BadInput` if none can), and draws all randomness from ``rng``.
    ``serving`` says how the core serves its plans; ``lengths`` is its length model (the
    core's estimates of running requests; None: each request's ``max_tokens``).
    """

    name: str

    @property
    def serving(self) -> ServingStyle:
        """How the core serves this policy's plans."""
        ...

    @property
    def lengths(self) -> LengthEstimates | None:
        """Its length model (None: each request's ``max_tokens``)."""
        ...

    def plan(self, snapshot: QueueSnapshot, rng: np.random.Generator) -> Plan:
        """Return the virtual queues for ``snapshot``."""
        ...


@runtime_checkable
class Improver(Protocol):
    """A policy with a slow improvement (``qlm``'s MILP): a fast answer for the hot path
    (``quick``), and ``improve``, run beside the event loop within ``time_limit_s``,
    which returns a better plan or None."""

    time_limit_s: float
    # how long after its snapshot each answer comes, however long the solve took (a
    # simulated run then does not depend on the wall clock's timing); None: when it ends
    answer_delay_s: float | None

    def quick(self, snapshot: QueueSnapshot, rng: np.random.Generator) -> Plan:
        """The fast answer."""
        ...

    def improve(
        self, snapshot: QueueSnapshot, budget_s: float, rng: np.random.Generator
    ) -> Plan | None:
        """A better plan than the fast answer within ``budget_s``, or None."""
        ...


def answer_after_s(delay_s: float | None, started: float) -> float:
    """How long after its snapshot an improver's answer comes: ``delay_s`` where the
    improver fixes it (:attr:`Improver.answer_delay_s`), else the wall time since
    ``started`` (``time.perf_counter``)."""
    return delay_s if delay_s is not None else time.perf_counter() - started
