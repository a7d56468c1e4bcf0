"""The coming arrivals as requests, for plans that look ahead.

How it works: :func:`repeat_window` expects the next window of arrivals to repeat the
last one: every request of the snapshot's recent window (``QueueSnapshot.recent``, the
last ``window_s`` seconds) comes again ``window_s`` later, with its prompt, class and
limits. That keeps each stream's rate, its burstiness and its length mix as seen, draws
nothing, and needs no horizon of its own. A policy that looks ahead plans these requests
beside the waiting ones, in groups of their own (:data:`EXPECTED_PREFIX` on their ids):
its plan leaves room for them (their class's deadlines, their place in EDF order) but
never queues them, and the next re-plan places the requests that really came.

Where it stops: a repeated window cannot foresee a burst larger than the last one,
right after a lull it expects nothing, and right after a burst it expects the burst
again (at moderate loads that put waiting work behind arrivals that did not come:
README, Results). Off by default.
"""

from __future__ import annotations

from qlmctl.domain import Request
from qlmctl.plan.types import RecentArrivals

EXPECTED_PREFIX = "~expected/"  # request and group ids of expected (not yet real) arrivals


def repeat_window(recent: RecentArrivals, now_s: float) -> tuple[Request, ...]:
    """The requests of ``recent`` again, each ``recent.window_s`` later (those due after
    ``now_s``), ids prefixed with :data:`EXPECTED_PREFIX`."""
    shift = recent.window_s
    if shift <= 0:
        return ()
    return tuple(
        r.model_copy(update={"id": f"{EXPECTED_PREFIX}{r.id}", "arrival_s": r.arrival_s + shift})
        for r in recent.requests
        if r.arrival_s + shift > now_s
    )


def is_expected(group_id: str) -> bool:
    """Whether a group (or request) id is one of the expected arrivals'."""
    return group_id.startswith(EXPECTED_PREFIX)
