"""Admission control: turn a request away (HTTP 429 + ``Retry-After``) rather than queue forever.

Rules, checked on a queue snapshot when the request arrives (pure: no clock, no I/O):

* **queue bound**: with ``max_queue`` requests already waiting, the request is refused;
  ``Retry-After`` is a rough time for the excess to drain (its own service time times
  the excess, spread over the slots of the instances that serve its model);
* **hopeless SLO**: if even served next (at the head of the queue of the best instance,
  after any model load that instance needs, evicting what runs) its first token would
  come after its class's TTFT deadline, it is refused; ``Retry-After`` is when that
  instance can start work. This is a lower bound, so nothing that could make it is
  refused;
* no live instance may serve the model: 503, retry in a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qlmctl.domain import Request
from qlmctl.perfmodel import swap_time_s
from qlmctl.plan.types import InstanceState, QueueSnapshot


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is not admitted, and what to tell the client."""

    status: int  # 429, or 503 when nothing can serve the model
    reason: str  # logged (run log ``reason``) and returned to the client
    retry_after_s: int


def check_admission(snapshot: QueueSnapshot, request: Request, max_queue: int) -> Refusal | None:
    """None to admit ``request`` (arrived at ``snapshot.now_s``), else the refusal."""
    now = snapshot.now_s
    starts = [
        (t, i)
        for i in snapshot.instances
        if (t := _first_token_s(snapshot, i, request)) is not None
    ]
    if not starts:
        return Refusal(503, f"admission: no live instance may serve {request.model}", 1)
    waiting = len(snapshot.waiting)
    if waiting >= max_queue:
        slots = sum(snapshot.perf[(request.model, i.gpu)].max_num_seqs for _, i in starts)
        service = min(_service_s(snapshot, i, request) for _, i in starts)
        drain = (waiting - max_queue + 1) * service / max(1, slots)
        return Refusal(
            429,
            f"admission: queue full ({waiting} requests waiting, bound {max_queue})",
            max(1, math.ceil(drain)),
        )
    first, inst = min(starts, key=lambda s: s[0])
    ttft = snapshot.slo_classes[request.slo_class].ttft_s
    if first > request.arrival_s + ttft:
        return Refusal(
            429,
            f"admission: class {request.slo_class} (TTFT {ttft:g} s) cannot be met even if "
            f"served next (first token in {first - now:.1f} s at best)",
            max(1, math.ceil(inst.ready_at_s - now)),
        )
    return None


def _first_token_s(snap: QueueSnapshot, inst: InstanceState, request: Request) -> float | None:
    """Earliest first token on ``inst`` if it started ``request`` next (None: it can't)."""
    if not inst.can_serve(request.model):
        return None
    perf = snap.perf[(request.model, inst.gpu)]
    ready = inst.ready_at_s
    if inst.model != request.model:
        resident = snap.perf.get((inst.model, inst.gpu)) if inst.model else None
        ready += swap_time_s(perf, resident, request.model in inst.sleeping_models)
    return ready + perf.prefill_time_s(request.prompt_tokens)


def _service_s(snap: QueueSnapshot, inst: InstanceState, request: Request) -> float:
    """Time ``request`` holds a slot on ``inst`` alone: prefill plus its decode steps."""
    perf = snap.perf[(request.model, inst.gpu)]
    out = request.max_output_tokens
    return perf.prefill_time_s(request.prompt_tokens) + out * perf.decode_step_s(
        1, request.prompt_tokens + out
    )
