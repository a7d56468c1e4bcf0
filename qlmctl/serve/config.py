"""The serving core's seams to the outside: its knobs, its counts, and the policy split.

:class:`CoreConfig` is recorded in run.json; :class:`CoreStats` feeds the live view and
the final summary; :func:`split_policy` finds a policy's fast answer and its optional
background improvement (the MILP) so the core can use the first at once and let the
driver run the second beside the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from qlmctl.errors import BadInput
from qlmctl.plan.types import Plan, QueueSnapshot

PlanFn = Callable[[QueueSnapshot, np.random.Generator], Plan]


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """Knobs of the serving core (recorded in run.json)."""

    max_inflight: int = 8  # per instance: requests dispatched and not yet ended
    max_engine_waiting: int | None = None  # pull only while vLLM reports fewer waiting
    max_kv_usage: float = 0.98  # pull only while vLLM's KV usage is below this
    replan_min_interval_s: float = 0.5
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

    def __post_init__(self) -> None:
        if self.max_inflight < 1 or self.max_attempts < 1 or self.evict_batch < 0:
            raise BadInput(
                "core config: max_inflight and max_attempts must be >= 1, evict_batch >= 0"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    @property
    def final(self) -> int:
        """Requests that have ended."""
        return self.finished + self.failed + self.rejected + self.cancelled

    @property
    def attainment(self) -> float | None:
        """Fraction of ended requests that finished within their SLO."""
        return self.slo_met / self.final if self.final else None


def split_policy(policy: Any) -> tuple[PlanFn, PlanFn | None]:
    """(fast plan, background improvement or None) of a policy.

    A policy with an improver (the ``qlm`` policy) exposes ``fast_plan`` and ``improve``;
    any other policy is its own fast plan and has no improvement.
    """
    fast = getattr(policy, "fast_plan", None)
    improve = getattr(policy, "improve", None)
    if callable(fast) and callable(improve):
        return fast, improve
    return policy.plan, None
