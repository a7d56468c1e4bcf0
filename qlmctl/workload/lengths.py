"""Length distributions for synthetic sources: parametric, or resampled from a dataset.

Parametric: ``constant``, ``uniform`` (integers in ``[low, high]``), ``lognormal`` (median
and log-space sigma, rounded and clipped to ``[min, max]``); prompt and output lengths are
independent. Datasets (length CSV, ShareGPT, ``vllm bench`` custom) are resampled with
replacement as (prompt, output[, text]) rows, keeping their joint distribution.
"""

from __future__ import annotations

import numpy as np

from qlmctl.workload.spec import Constant, Dist, LogNormal, Uniform
from qlmctl.workload.traces import TraceData


def draw(dist: Dist, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` positive integer lengths (int64) from ``dist``."""
    if isinstance(dist, Constant):
        return np.full(n, dist.value, dtype=np.int64)
    if isinstance(dist, Uniform):
        return rng.integers(dist.low, dist.high + 1, size=n, dtype=np.int64)
    assert isinstance(dist, LogNormal)
    values = np.rint(rng.lognormal(np.log(dist.median), dist.sigma, size=n))
    return np.clip(values, dist.min, dist.max).astype(np.int64)


def resample(data: TraceData, n: int, rng: np.random.Generator) -> TraceData:
    """``n`` rows of ``data`` drawn with replacement (arrivals dropped)."""
    rows = rng.integers(0, len(data), size=n)
    return TraceData(
        prompt_tokens=data.prompt_tokens[rows],
        output_tokens=data.output_tokens[rows],
        prompts=tuple(data.prompts[i] for i in rows) if data.prompts is not None else None,
    )
