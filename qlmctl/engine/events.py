"""Events engines emit and actions the core asks drivers to perform.

Both drivers (real vLLM over HTTP, simulated vLLM) speak exactly these types, so the
core cannot tell them apart. Times are seconds on the run's clock.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---- engine -> core -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FirstToken:
    """The first output token of ``request_id`` reached the client."""

    request_id: str
    instance_id: str
    time_s: float


@dataclass(frozen=True, slots=True)
class Finished:
    """``request_id`` completed normally with ``output_tokens`` tokens."""

    request_id: str
    instance_id: str
    time_s: float
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Aborted:
    """``request_id`` stopped before finishing: evicted by us, or failed (``reason``).

    ``retryable`` is False for a request the server rejected (HTTP 4xx): re-queuing it
    would fail again.
    """

    request_id: str
    instance_id: str
    time_s: float
    output_tokens: int
    reason: str
    retryable: bool = True


@dataclass(frozen=True, slots=True)
class InstanceReady:
    """``instance_id`` serves ``model`` and accepts requests."""

    instance_id: str
    time_s: float
    model: str


@dataclass(frozen=True, slots=True)
class InstanceDown:
    """``instance_id`` stopped serving (crashed, unreachable, or stopped for a swap)."""

    instance_id: str
    time_s: float
    reason: str


EngineEvent = FirstToken | Finished | Aborted | InstanceReady | InstanceDown

# ---- core -> driver -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send ``request_id`` to ``instance_id`` with vLLM ``priority`` (lower is more urgent).

    ``kept_tokens`` > 0 resumes it (evict-and-resume): its prompt is the original prompt
    followed by the first ``kept_tokens`` output tokens of its earlier attempts, and it is
    asked only for the rest of its output. Engines then report the tokens of this attempt
    only (``Finished.output_tokens``, ``Aborted.output_tokens``).
    """

    request_id: str
    instance_id: str
    priority: int = 0
    kept_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Evict:
    """Abort the running ``request_id`` on ``instance_id``; the core re-queues it."""

    request_id: str
    instance_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class LoadModel:
    """Make ``instance_id`` serve ``model``: wake it if asleep, else restart (cold start).

    ``sleep_current`` asks to put the resident model to sleep rather than stop it, where
    the server supports sleep mode (warm start later).
    """

    instance_id: str
    model: str
    sleep_current: bool = False


Action = Dispatch | Evict | LoadModel
