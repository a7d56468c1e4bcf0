"""Request and instance state for the serving core: ordered enums and a transition table.

Rules: a request's state is one :class:`ReqState`; states at or after ``FINISHED`` are
final (``is_final`` is a comparison). Legal moves live in ``_TRANSITIONS`` keyed by verb;
an illegal one raises ``can't VERB in state STATE`` and changes nothing. ``EVICTED`` is
the short stay between asking the engine to abort a request and hearing that it did;
from there the request goes back to ``WAITING`` (or ends, if it finished meanwhile).

:class:`Tracked` is the core's mutable record of one request: the current attempt's
times and where it runs. :meth:`Tracked.attempt_row` turns an ended attempt into one
row of the run log's requests table. :class:`InstanceRecord` and :class:`QueuedGroup`
are the core's view of an instance and of a group in its virtual queue.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from qlmctl.domain import InstanceSpec, Request, SLOClass
from qlmctl.plan.types import PlannedGroup, RunningRequest, known_time
from qlmctl.serve.runlog import Outcome


class ReqState(IntEnum):
    """Where a request is. Ordered: everything from FINISHED on is final."""

    WAITING = 0  # in the queue (a virtual queue, or not yet planned)
    DISPATCHED = 1  # sent to an instance, no token yet
    RUNNING = 2  # first token received
    EVICTED = 3  # abort asked by the core, engine's answer pending
    FINISHED = 4
    FAILED = 5  # out of attempts, or no live instance may serve it
    REJECTED = 6  # the server refused it (HTTP 4xx); never retried
    CANCELLED = 7  # the run stopped first

    @property
    def is_final(self) -> bool:
        """Whether the request is done for good."""
        return self >= ReqState.FINISHED

    @property
    def in_flight(self) -> bool:
        """Whether an instance is working on it (from the core's point of view)."""
        return self in (ReqState.DISPATCHED, ReqState.RUNNING)


W, D, R, E = ReqState.WAITING, ReqState.DISPATCHED, ReqState.RUNNING, ReqState.EVICTED

# verb -> (allowed from-states, to-state)
_TRANSITIONS: dict[str, tuple[frozenset[ReqState], ReqState]] = {
    "dispatch": (frozenset({W}), D),
    "start": (frozenset({D}), R),
    "evict": (frozenset({D, R}), E),
    "requeue": (frozenset({D, R, E}), W),
    "finish": (frozenset({D, R, E}), ReqState.FINISHED),
    "fail": (frozenset({W, D, R, E}), ReqState.FAILED),
    "reject": (frozenset({D, R, E}), ReqState.REJECTED),
    "cancel": (frozenset({W, D, R, E}), ReqState.CANCELLED),
    "refuse": (frozenset({W}), ReqState.REJECTED),  # admission control: never queued
}


class IllegalTransition(RuntimeError):
    """A request was asked to do something its state does not allow."""


@dataclass(frozen=True, slots=True)
class Forecast:
    """The first forecast made for one attempt of a request (absolute times in s; a
    time is None where none was made: a plan without it, or a request its instance
    serves after its queue in at least that share of the scoring scenarios)."""

    start_s: float  # dispatch (the core sends it), mean
    miss_prob: float
    first_token_s: float | None = None  # median
    first_token_p90_s: float | None = None
    finish_s: float | None = None  # median
    finish_p90_s: float | None = None

    @classmethod
    def of_group(cls, group: PlannedGroup, k: int) -> Forecast:
        """The forecast ``group`` makes for its ``k``-th request (it has per-request ones)."""
        times = [
            known_time(column[k]) if column else None
            for column in (
                group.request_first_token_s,
                group.request_first_token_p90_s,
                group.request_finish_s,
                group.request_finish_p90_s,
            )
        ]
        dispatch = group.request_dispatch_s or group.request_start_s  # older plans: start
        return cls(dispatch[k], group.request_miss_probability[k], *times)

    def row(self) -> dict[str, float | None]:
        """Its run-log columns (``REQUESTS_SCHEMA``)."""
        return {
            "predicted_start_s": self.start_s,
            "predicted_miss_prob": self.miss_prob,
            "predicted_first_token_s": self.first_token_s,
            "predicted_first_token_p90_s": self.first_token_p90_s,
            "predicted_finish_s": self.finish_s,
            "predicted_finish_p90_s": self.finish_p90_s,
        }


_NO_FORECAST = dict.fromkeys(Forecast(0.0, 0.0).row())


@dataclass(slots=True, eq=False)
class Tracked:
    """The core's record of one request across its attempts."""

    request: Request
    slo: SLOClass
    # what the core expects it to generate (a scheduler does not know the true length)
    expected_output_tokens: int
    state: ReqState = ReqState.WAITING
    attempt: int = 0  # index of the current attempt (0 = first dispatch)
    evictions: int = 0
    failures: int = 0
    vq_instance: str | None = None  # virtual queue holding it while WAITING
    instance_id: str | None = None  # where the current attempt runs
    priority: int = 0
    dispatch_s: float | None = None
    first_token_s: float | None = None  # of the current attempt
    # when its client got its first token, in whichever attempt: a later attempt
    # continues the same stream (the gateway sends what the client has seen), so the
    # request's TTFT is this one's
    first_output_s: float | None = None
    prefilled_mark: tuple[int, int] = (0, 0)  # its instance's ``prefilled`` at first token
    forecast: Forecast | None = None  # the first made in this attempt
    evict_reason: str = ""
    # an attempt cut mid-stream can be continued (a live client's n > 1 or echo cannot)
    resumable: bool = True
    # output tokens kept from ended attempts: the next attempt resumes after them
    # (evict-and-resume), so it is sent prompt + these and asked only for the rest
    kept_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # how a snapshot saw it while it waited in the engine in this attempt (queues._running)
    engine_queued_view: RunningRequest | None = None

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def kv_tokens(self) -> int:
        """KV tokens the request is expected to hold at its end: prompt plus output."""
        return self.request.prompt_tokens + self.expected_output_tokens

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens the engine prefills for this attempt (a resumed one's include the
        output it kept)."""
        return self.request.prompt_tokens + self.kept_tokens

    @property
    def remaining_output_tokens(self) -> int:
        """Output tokens the request is still expected to generate (at least 1)."""
        return max(1, self.expected_output_tokens - self.kept_tokens)

    @property
    def deadline_s(self) -> float:
        """Absolute TTFT deadline."""
        return self.request.arrival_s + self.slo.ttft_s

    def move(self, verb: str) -> None:
        """Apply ``verb``; :class:`IllegalTransition` (state unchanged) if not allowed."""
        allowed, to = _TRANSITIONS[verb]
        if self.state not in allowed:
            raise IllegalTransition(f"can't {verb} request {self.id!r} in state {self.state.name}")
        self.state = to

    def attempt_row(
        self, finish_s: float, outcome: Outcome, output_tokens: int | None, reason: str = ""
    ) -> dict[str, Any]:
        """The run-log row of the attempt that just ended (see ``REQUESTS_SCHEMA``)."""
        req = self.request
        ttft = None if self.first_output_s is None else self.first_output_s - req.arrival_s
        met = (
            outcome == Outcome.FINISHED
            and ttft is not None
            and ttft <= self.slo.ttft_s
            and (self.slo.e2e_s is None or finish_s - req.arrival_s <= self.slo.e2e_s)
        )
        tpot = None
        new_tokens = (output_tokens or 0) - self.kept_tokens  # generated in this attempt
        if self.first_token_s is not None and new_tokens > 1:
            tpot = (finish_s - self.first_token_s) / (new_tokens - 1)
        return {
            "request_id": req.id,
            "attempt": self.attempt,
            "model": req.model,
            "slo_class": req.slo_class,
            "instance_id": self.instance_id,
            "priority": self.priority if self.instance_id is not None else None,
            "arrival_s": req.arrival_s,
            "dispatch_s": self.dispatch_s,
            "first_token_s": self.first_token_s,
            "finish_s": finish_s,
            "prompt_tokens": req.prompt_tokens,
            "output_tokens": output_tokens,
            "target_output_tokens": req.target_output_tokens,
            "ttft_slo_s": self.slo.ttft_s,
            "e2e_slo_s": self.slo.e2e_s,
            "tpot_s": tpot,
            "itl_max_s": self.extra.get("itl_max_s"),
            "slo_met": met,
            "outcome": outcome,
            "reason": reason or None,
            **(self.forecast.row() if self.forecast is not None else _NO_FORECAST),
            "resumed_tokens": self.kept_tokens,
        }

    def reset_attempt(self) -> None:
        """Forget the ended attempt's placement and times; the next one gets a new index."""
        self.attempt += 1
        self.instance_id = None
        self.dispatch_s = self.first_token_s = None
        self.engine_queued_view = None
        self.forecast = None
        self.evict_reason = ""
        self.extra.clear()


class InstStatus(IntEnum):
    """What an instance can do now."""

    UP = 0  # serving its resident model
    LOADING = 1  # swapping or waking a model; no dispatch until InstanceReady
    DOWN = 2  # failed or unreachable; no work until InstanceReady


@dataclass(slots=True, eq=False)
class QueuedGroup:
    """A planned group in a virtual queue: the plan's data and the ids still queued."""

    plan: PlannedGroup
    ids: deque[str]  # FIFO; stale ids (no longer waiting here) are dropped at the head
    deferred: bool = False  # requests too late for their deadline, behind the queue


@dataclass(slots=True, eq=False)
class InstanceRecord:
    """The core's view of one instance."""

    spec: InstanceSpec
    model: str | None  # resident model, or the one being loaded
    status: InstStatus = InstStatus.UP
    inflight: dict[str, Tracked] = field(default_factory=dict)  # id -> record, dispatch order
    evicting: dict[str, Tracked] = field(default_factory=dict)  # abort not yet confirmed
    prio_counts: Counter[int] = field(default_factory=Counter)  # class priority -> in flight
    kv_tokens: int = 0  # prompt + target output tokens of the requests in flight
    unstarted: int = 0  # requests in flight without their first token yet (prefilling)
    unstarted_tokens: int = 0  # their prompt tokens (Tracked.prefill_tokens)
    sleeping: set[str] = field(default_factory=set)  # models asleep on it (warm start)
    load_kind: str = "swap"  # swap | wake, while LOADING
    load_from: str | None = None
    load_started_s: float = 0.0
    ready_at_s: float = 0.0  # planned end of the load in progress
    last_evict_s: float = -math.inf
    engine_waiting: int | None = None  # from vLLM /metrics
    kv_usage: float | None = None
    queued: int = 0  # waiting requests in this instance's virtual queue
    prefilled: tuple[int, int] = (0, 0)  # prompt tokens (and their squares) prefilled so far

    @property
    def id(self) -> str:
        return self.spec.id

    def add_inflight(self, tr: Tracked) -> None:
        self.inflight[tr.id] = tr
        self.prio_counts[tr.slo.priority] += 1
        self.kv_tokens += tr.kv_tokens
        if tr.first_token_s is None:
            self.unstarted += 1
            self.unstarted_tokens += tr.prefill_tokens

    def prefilled_since(self, tr: Tracked) -> tuple[int, int]:
        """Prompt tokens (and their squares) the instance prefilled since ``tr``'s first
        token: the prefill that shared its decode steps."""
        (tokens, squares), (tokens0, squares0) = self.prefilled, tr.prefilled_mark
        return tokens - tokens0, squares - squares0

    def decode_load(self, tr: Tracked, joining: bool = False) -> tuple[int, int]:
        """(batch, context tokens) ``tr`` decodes with at the instance's current load (one
        more if it is ``joining``): what the service-time estimates and the speed
        calibration both assume."""
        batch = max(1, len(self.inflight) + joining)
        return batch, batch * (tr.request.prompt_tokens + tr.expected_output_tokens // 2)

    def remove_inflight(self, tr: Tracked) -> None:
        """Forget ``tr`` if it is in flight here (no-op otherwise)."""
        if self.inflight.pop(tr.id, None) is not None:
            self.prio_counts[tr.slo.priority] -= 1
            self.kv_tokens -= tr.kv_tokens
            if tr.first_token_s is None:
                self.started(tr)

    def started(self, tr: Tracked) -> None:
        """``tr``, in flight here without its first token, got it (or left)."""
        self.unstarted -= 1
        self.unstarted_tokens -= tr.prefill_tokens
