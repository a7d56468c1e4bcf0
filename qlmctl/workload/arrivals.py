"""Synthetic arrival processes: Poisson, Gamma (bursty) and on/off bursts.

Each process returns sorted arrival times in seconds from 0, drawn from the given seeded
generator, stopping at ``duration_s`` or after ``count`` arrivals (whichever comes first).
Gamma inter-arrivals have shape ``1/cv**2`` and mean ``1/rate``: ``cv = 1`` is Poisson,
larger is burstier. On/off alternates Poisson periods at two rates, starting "on".
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qlmctl.workload.spec import Arrivals, Gamma, OnOff, Poisson

Gaps = Callable[[np.random.Generator, int], np.ndarray]


def synthesize(process: Arrivals, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (float64, sorted, seconds from 0) of ``process``."""
    if isinstance(process, OnOff):
        return _onoff(process, rng)
    return _renewal(_gaps(process), process.rate_per_s, process.duration_s, process.count, rng)


def _gaps(process: Poisson | Gamma) -> Gaps:
    mean = 1.0 / process.rate_per_s
    if isinstance(process, Poisson):
        return lambda rng, n: rng.exponential(mean, size=n)
    shape = 1.0 / process.cv**2
    return lambda rng, n: rng.gamma(shape, mean / shape, size=n)


def _renewal(
    gaps: Gaps, rate: float, duration_s: float | None, count: int | None, rng: np.random.Generator
) -> np.ndarray:
    """Cumulative sums of i.i.d. gaps, drawn in chunks until a bound is reached."""
    limit = count if count is not None else np.inf
    end = duration_s if duration_s is not None else np.inf
    chunk = int(min(limit, rate * end * 1.1 + 16)) if np.isfinite(min(limit, end)) else 1024
    times = np.empty(0)
    t0 = 0.0
    # NOTE: invariant: ``times`` holds every arrival before t0, none past a bound.
    while len(times) < limit and t0 < end:
        batch = t0 + np.cumsum(gaps(rng, chunk))
        t0 = float(batch[-1])
        times = np.concatenate([times, batch[batch < end]])
    return times[: int(min(limit, len(times)))]


def _onoff(p: OnOff, rng: np.random.Generator) -> np.ndarray:
    limit = p.count if p.count is not None else np.inf
    end = p.duration_s if p.duration_s is not None else np.inf
    parts: list[np.ndarray] = []
    total, t0, on = 0, 0.0, True
    while total < limit and t0 < end:
        length, rate = (p.on_s, p.on_rate_per_s) if on else (p.off_s, p.off_rate_per_s)
        length = min(length, end - t0)
        n = rng.poisson(rate * length)
        part = np.sort(t0 + rng.uniform(0.0, length, size=n))
        parts.append(part)
        total += n
        t0, on = t0 + length, not on
    times = np.concatenate(parts) if parts else np.empty(0)
    return times[: int(min(limit, len(times)))]
