"""The recent arrivals a snapshot carries, kept per stream as requests come and go.

How it works: every arrival joins the window (one deque, arrival order) and its
(model, class) stream, which keeps its requests' output caps and true lengths in a
growing array and their prompt tokens summed. A snapshot forgets what left the window
and hands each stream's live slice over as is (read-only views), so taking a snapshot
costs what arrived and left since the last one, not the window's size.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from qlmctl.domain import Request
from qlmctl.plan.types import RecentArrivals, StreamArrivals


class RecentWindow:
    """The arrivals of the last ``window_s`` seconds (see the module docstring)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._requests: deque[Request] = deque()
        self._streams: dict[tuple[str, str], _Stream] = {}

    def add(self, request: Request) -> None:
        """``request`` arrived (arrivals come in time order)."""
        self._requests.append(request)
        self._streams.setdefault((request.model, request.slo_class), _Stream()).add(request)

    def arrivals(self, now_s: float, span_s: float) -> RecentArrivals:
        """The window at ``now_s`` (arrivals before ``now_s - window_s`` are dropped), as
        fitted over ``span_s`` seconds."""
        while self._requests and self._requests[0].arrival_s < now_s - self.window_s:
            gone = self._requests.popleft()
            key = (gone.model, gone.slo_class)
            if not self._streams[key].drop(gone):
                del self._streams[key]
        streams = {key: s.arrivals() for key, s in self._streams.items()}
        return RecentArrivals(span_s, tuple(self._requests), streams)


class _Stream:
    """One stream's requests in the window: caps and true lengths, prompt tokens summed."""

    def __init__(self) -> None:
        self._caps = np.empty(64)
        self._targets = np.empty(64)
        self._start = self._end = 0  # the live slice of both arrays
        self._prompt_tokens = 0

    def add(self, request: Request) -> None:
        if self._end == len(self._caps):
            self._move(max(64, 2 * (self._end - self._start)))
        self._caps[self._end] = request.max_output_tokens
        self._targets[self._end] = request.target_output_tokens
        self._end += 1
        self._prompt_tokens += request.prompt_tokens

    def drop(self, request: Request) -> int:
        """Forget the oldest request (``request``); how many are left."""
        self._start += 1
        self._prompt_tokens -= request.prompt_tokens
        return self._end - self._start

    def _move(self, size: int) -> None:
        """The live slice into new arrays of ``size`` (views handed out stay valid)."""
        live = slice(self._start, self._end)
        n = self._end - self._start
        for name in ("_caps", "_targets"):
            fresh = np.empty(size)
            fresh[:n] = getattr(self, name)[live]
            setattr(self, name, fresh)
        self._start, self._end = 0, n

    def arrivals(self) -> StreamArrivals:
        caps, targets = self._caps[self._start : self._end], self._targets[self._start : self._end]
        caps.flags.writeable = targets.flags.writeable = False
        return StreamArrivals(self._end - self._start, self._prompt_tokens, caps, targets)
