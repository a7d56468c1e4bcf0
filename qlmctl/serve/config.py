"""The serving core's seams to the outside: its knobs, its counts, and the policy split.

:class:`CoreConfig` is recorded in run.json (:meth:`CoreConfig.for_policy` reads the
policy's :class:`~qlmctl.plan.types.ServingStyle`); :class:`CoreStats` feeds the live
view and the final summary; :func:`split_policy` finds a policy's fast answer and its
optional background improvement (an :class:`~qlmctl.plan.types.Improver`, the MILP) so
the core can use the first at once and let the driver run the second beside the event
loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from qlmctl.domain import Request
from qlmctl.errors import BadInput
from qlmctl.plan.types import DEFER_HORIZON_S, Improver, Plan, Policy, QueueSnapshot

PlanFn = Callable[[QueueSnapshot, np.random.Generator], Plan]
ImproveFn = Callable[[QueueSnapshot, np.random.Generator], Plan | None]


def arrival_replan_s(min_interval_s: float, share: float, ttft_targets: Iterable[float]) -> float:
    """``share`` of the tightest of ``ttft_targets``, at least ``min_interval_s``.

    NOTE: under load every arrival asks for a re-plan, and a re-plan costs what waits and
    runs, not what arrived. Measured (2026-12-03, ``heuristic``, three seeds at the
    reference loads of ``benchmarks.policies``, whose tightest target is 20 s): arrivals
    planned every 0.5 s (share 0) and every 2 s (share 0.1) gave the same attainment
    within the seeds' spread (84.2 / 85.2 / 77.1 / 67.8 / 76.9 % and 84.1 / 85.5 / 76.8 /
    69.2 / 78.0 %) and throughput (within 1 %) at 146 and 86 s of CPU, and -1.5 to +2.7
    points (mean +0.1) at the sweep's other loads; every re-plan at most every 2 s (an
    instance running dry, a late head too) cost C-longprompt 6 % of its throughput.
    """
    return max(min_interval_s, share * min(ttft_targets, default=0.0))


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """Knobs of the serving core (recorded in run.json)."""

    max_inflight: int | None = None  # per instance; None: the profile's max_num_seqs
    # With max_inflight None, an instance whose sequences are all busy is sent this many
    # more requests, to wait in the engine's own queue: a finishing request's slot is then
    # refilled at the engine's next step, not a round trip (finish report, decision,
    # HTTP, tokenizing) later. None: one where the profile has a per-request latency
    # (ttft_overhead_s or admission_gap_s), none where it has not.
    dispatch_ahead: int | None = None
    kv_budget: float = 1.0  # pull while in-flight prompt+output tokens fit this share of KV
    # Pull only while the engine has fewer requests waiting than this, so the backlog (and
    # its order) stays in qlmctl's queue rather than in vLLM's own FIFO queue.
    max_engine_waiting: int | None = 2
    max_kv_usage: float = 0.98  # pull only while vLLM's KV usage is below this
    replan_min_interval_s: float = 0.5
    # New arrivals alone (nothing ran dry, late or re-queued) are planned at most every
    # this share of the tightest TTFT target: a re-plan under load costs what waits and
    # runs, and a request waits for it a small part of its budget (0: every
    # replan_min_interval_s)
    arrival_replan_share: float = 0.1
    # while nothing waits, a new request goes straight to an engine that would start it at
    # once (no re-plan; ServeCore._admit_fresh)
    dispatch_on_arrival: bool = True
    # A re-plan plans at most this many waiting requests (None: all): the earliest
    # deadlines not yet passed first, then the longest waiting. The rest wait unplanned
    # for a later re-plan, so planning under a flood costs what the cluster can use.
    max_planned: int | None = 4096
    check_interval_s: float = 1.0  # predicted-violation checks while work is queued
    lag_tolerance_s: float = 2.0  # a head group this late against its plan is a violation
    max_attempts: int = 3  # failed attempts before a request is FAILED
    max_evictions: int = 2  # per request
    evict_cooldown_s: float = 2.0  # per instance, between eviction rounds
    evict_batch: int = 4  # most requests evicted per instance per round (0: never evict)
    evict_for_swap: bool = True  # evict (not just drain) when an urgent head needs a swap
    vllm_priority: bool = True  # send the plan's priorities with requests
    improve: bool = True  # offer snapshots to the policy's background improver
    improve_min_interval_s: float = 10.0
    calibrate_speed: bool = True  # scale profiles by the decode speed observed (calibration.py)
    # an evicted (or failed) request keeps what it generated and resumes after it; off:
    # it starts again from nothing
    resume_evicted: bool = True
    # while nothing waits, a request decoding where it would take at least twice as long
    # as on another instance holding its model (its prompt and output so far prefilled
    # again there) moves there: evicted, resumed on that instance (with resume_evicted,
    # never with evict_batch 0)
    move_running: bool = True
    # a request that can no longer make its deadline when it reaches the head of its
    # virtual queue is served after the rest of that queue (requests mid-stream never)
    # due within defer_horizon_s; groups due later still come after it (as the policy's
    # ServingStyle says: plans are scored serving it so)
    defer_late: bool = True
    defer_horizon_s: float = DEFER_HORIZON_S

    def arrival_replan_s(self, ttft_targets: Iterable[float]) -> float:
        """How long after the last re-plan new arrivals alone are planned, the tightest of
        ``ttft_targets`` given (:func:`arrival_replan_s`)."""
        return arrival_replan_s(self.replan_min_interval_s, self.arrival_replan_share, ttft_targets)

    def __post_init__(self) -> None:
        if (
            (self.max_inflight or 1) < 1
            or (self.max_planned or 1) < 1
            or self.max_attempts < 1
            or self.evict_batch < 0
            or (self.dispatch_ahead or 0) < 0
        ):
            raise BadInput(
                "core config: max_inflight, max_planned and max_attempts must be >= 1, "
                "evict_batch and dispatch_ahead >= 0"
            )
        if not self.kv_budget > 0:
            raise BadInput("core config: kv_budget must be > 0")
        if not self.arrival_replan_share >= 0:
            raise BadInput("core config: arrival_replan_share must be >= 0")
        if not self.defer_horizon_s >= 0:
            raise BadInput("core config: defer_horizon_s must be >= 0")

    @classmethod
    def for_policy(cls, policy: Policy, **overrides: Any) -> CoreConfig:
        """The knobs that make the core serve the way ``policy.serving`` says.

        A router pushes every request to vLLM at once, with no backpressure; a policy that
        does not evict never evicts; ``vllm_priority`` sends the class priorities (vLLM is
        then started with ``--scheduling-policy priority``). ``overrides`` win.
        """
        style = policy.serving
        knobs: dict[str, Any] = {
            "vllm_priority": style.vllm_priority,
            "defer_late": style.defers_late,
            "defer_horizon_s": style.defer_horizon_s,
        }
        if style.router:
            knobs |= {
                "max_inflight": 1 << 30,
                "kv_budget": math.inf,
                "max_engine_waiting": None,
                "max_kv_usage": math.inf,
            }
        if not style.evicts:
            knobs["evict_batch"] = 0
        return cls(**{**knobs, **overrides})

    @property
    def instance_caps(self) -> tuple[int | None, int | None]:
        """The caps each instance's snapshot carries for the planner: requests the core
        runs there, requests it leaves waiting in the engine."""
        return self.max_inflight, self.max_engine_waiting

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def instance_caps(policy: Policy) -> tuple[int | None, int | None]:
    """:attr:`CoreConfig.instance_caps` when the core serves ``policy``'s plans (by
    default)."""
    return CoreConfig.for_policy(policy).instance_caps


@dataclass(frozen=True, slots=True)
class CoreStats:
    """Counts for a live view and the final summary."""

    arrived: int
    waiting: int
    in_flight: int
    finished: int
    slo_met: int
    failed: int
    rejected: int
    cancelled: int
    queued_by_instance: dict[str, int]  # instance -> requests in its virtual queue
    in_flight_by_instance: dict[str, int]
    operations: dict[str, int]  # kind -> count
    met_by_class: dict[str, tuple[int, int]]  # class -> (met, ended)
    solver_wall_s: float = 0.0  # wall-clock build + solve time of every plan taken

    @property
    def final(self) -> int:
        """Requests that have ended."""
        return self.finished + self.failed + self.rejected + self.cancelled

    @property
    def attainment(self) -> float | None:
        """Fraction of ended requests that finished within their SLO."""
        return self.slo_met / self.final if self.final else None


def split_policy(policy: Policy) -> tuple[PlanFn, ImproveFn | None]:
    """(fast plan, background improvement or None) of a policy: an
    :class:`~qlmctl.plan.types.Improver` splits into ``quick`` and ``improve`` (with its
    budget ``time_limit_s``); any other policy is its own fast plan."""
    if not isinstance(policy, Improver):
        return policy.plan, None
    budget_s = float(policy.time_limit_s)
    improve = policy.improve

    def improvement(snapshot: QueueSnapshot, rng: np.random.Generator) -> Plan | None:
        return improve(snapshot, budget_s, rng)

    return policy.quick, improvement


def length_estimator(policy: Policy) -> Callable[[Request], int]:
    """Expected output tokens of a request: the policy's length model, else the cap."""
    lengths = policy.lengths
    if lengths is None:
        return lambda request: request.max_output_tokens
    return lambda request: max(1, round(lengths.expected(request)))


def left_estimator(policy: Policy) -> Callable[[Request, int], float]:
    """Output tokens a request is expected to generate after those it has: the policy's
    length model, else up to its cap."""
    lengths = policy.lengths
    if lengths is None:
        return lambda request, generated: max(1.0, request.max_output_tokens - generated)
    return lengths.expected_left


def length_observer(policy: Policy) -> Callable[[str, str, int], None] | None:
    """The policy's ``lengths.observe(model, slo_class, output_tokens)``, if it learns lengths."""
    return policy.lengths.observe if policy.lengths is not None else None
