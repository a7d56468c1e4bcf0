"""Clocks. The core never reads time itself: drivers pass ``now`` or inject a Clock.

Only :class:`WallClock` calls ``time.monotonic()``.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A source of the current time in seconds since the run started."""

    def now(self) -> float:
        """Seconds since the start of the run."""
        ...


class WallClock:
    """Real time, measured from construction."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0


class VirtualClock:
    """Simulated time, moved forward only by the simulated driver."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._now = start_s

    def now(self) -> float:
        return self._now

    def advance_to(self, t_s: float) -> None:
        """Move to ``t_s``; time never goes backwards."""
        if t_s < self._now:
            raise ValueError(f"can't move the clock back from {self._now} to {t_s}")
        self._now = t_s
