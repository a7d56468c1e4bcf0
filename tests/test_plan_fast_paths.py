"""Planner fast paths give exactly what the general computation gives (same floats)."""

from __future__ import annotations

import numpy as np
import pytest

from qlmctl.plan.slots import EngineState, started_engines


def sorted_serve(
    engine: EngineState, decode: np.ndarray, prefill: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`EngineState.serve` for one round (n <= B), sorting whole rows: the general
    computation its fast path must match."""
    n = decode.shape[1]
    ready = engine.slots[:, :n]
    total = np.cumsum(prefill, axis=-1)
    start = np.maximum.accumulate(ready - (total - prefill), axis=1)
    end = total + np.maximum(engine.pipeline_s[:, None], start)
    slots = engine.slots.copy()
    slots[:, :n] = end + decode
    slots.sort(axis=1)
    return slots, end[:, -1]


@pytest.mark.parametrize("busy", [0, 3, 8])
@pytest.mark.parametrize("n", [1, 4, 8])
def test_serve_sorts_rows_as_a_full_sort_does(busy: int, n: int) -> None:
    """Slots taken that free after every other slot skip the full sort; others do not."""
    rng = np.random.default_rng(busy * 10 + n)
    engine = EngineState.idle(5.0, 8, 6)
    engine.slots[:, 8 - busy :] = 5.0 + rng.uniform(0, 30, (6, busy))  # still running
    engine.slots.sort(axis=1)
    decode, prefill = rng.uniform(0, 20, (6, n)), rng.uniform(0, 1, n)
    want_slots, want_pipeline = sorted_serve(engine, decode, prefill)
    engine.serve(decode, prefill)
    assert np.array_equal(engine.slots, want_slots)
    assert np.array_equal(engine.pipeline_s, want_pipeline)


def test_started_engines_equal_idle_engines_serving_their_running_requests() -> None:
    """Instances with no running request, a few, more than their slots, another batch
    size, no slots (0): each engine is what an idle engine serving its requests gives."""
    rng = np.random.default_rng(7)
    ready = np.array([1.0, 2.5, 2.5, 4.0, 0.5, 3.0])
    batch = [4, 4, 4, 2, 0, 4]
    running = np.array([1, 1, 1, 3, 3, 3, 4, 5, 5, 5, 5])  # none on 0 and 2
    decode = rng.uniform(0, 50, (len(running), 5))
    prefill = np.where(rng.random(len(running)) < 0.5, 0.0, rng.uniform(0, 2, len(running)))
    got = started_engines(ready, batch, running, decode, prefill)
    for i, engine in enumerate(got):
        want = EngineState.idle(float(ready[i]), batch[i], 5)
        mine = np.flatnonzero(running == i)
        if mine.size > want.slots.shape[1]:  # more than one round: the general path
            want.serve(decode[mine].T, prefill[mine])
        elif mine.size:
            want.slots, want.pipeline_s = sorted_serve(want, decode[mine].T, prefill[mine])
        assert np.array_equal(engine.slots, want.slots), i
        assert np.array_equal(engine.pipeline_s, want.pipeline_s), i
