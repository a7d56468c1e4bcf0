"""Fit a PerfModel to profiling measurements, and predict latencies with it.

How it works: every measurement is a sum of engine steps, and a step's time is linear in
the PerfModel coefficients ``[step_base_s, prefill_s_per_token, prefill_s_per_token2,
decode_s_per_seq, decode_s_per_ctx_token]`` (see perfmodel.py). So each sample becomes
one row of a design matrix: a prefill sample (TTFT of a lone prompt) is the per-request
``ttft_overhead_s`` plus the rows of its chunks, exactly as
:meth:`PerfModel.prefill_time_s` chunks it; a decode sample (median inter-token gap at a
steady batch) is one decode step, with no overhead. Rows are weighted by
1/measured, so the fit minimises relative error, and coefficients that come out negative
are pinned to zero and the rest refitted (a small active-set NNLS). The quadratic prefill
term is kept only when it clearly improves the fit. Last, ``admission_gap_s`` is the gap
(on a grid) whose :func:`predict_batch` best matches the TTFTs of the decode bursts.

:func:`predict_batch` runs the fitted model forward for requests sent together (arrival
``admission_gap_s`` apart, admission up to ``max_num_seqs``, chunked prefill under the
token budget, then decode steps): how the profiler reports its fit error and how tests
check a fresh mix.

Rules: no I/O, no clock; plain data in, PerfModel out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from qlmctl.errors import EngineError
from qlmctl.perfmodel import PerfModel

QUADRATIC_GAIN = 0.8  # keep the quadratic prefill term only if it cuts the residual by 20 %
GAP_GRID = 41  # candidate admission gaps, 0 to GAP_RANGE_OVERHEADS x the TTFT overhead
GAP_RANGE_OVERHEADS = 4.0
COEFFICIENTS = (
    "step_base_s",
    "prefill_s_per_token",
    "prefill_s_per_token2",
    "decode_s_per_seq",
    "decode_s_per_ctx_token",
    "ttft_overhead_s",
)


@dataclass(frozen=True, slots=True)
class PrefillSample:
    """TTFT of one request alone with ``prompt_tokens`` of prompt and max_tokens=1."""

    prompt_tokens: int
    ttft_s: float


@dataclass(frozen=True, slots=True)
class DecodeSample:
    """Median gap between tokens while ``concurrency`` requests decode together."""

    concurrency: int
    prompt_tokens: int  # of each request
    output_tokens: int  # of each request (ignore_eos)
    step_s: float
    context_tokens: int  # mean KV tokens of the whole batch during the steady window
    ttfts_s: tuple[float, ...] = ()  # the burst's TTFTs, ascending (median per rank)


@dataclass(frozen=True, slots=True)
class SaturationSample:
    """What /metrics showed while ``concurrency`` long requests ran at once."""

    concurrency: int
    max_running: int
    max_waiting: int  # highest queue held over two consecutive /metrics samples
    max_kv_usage: float  # 0-1
    preemptions: int

    @property
    def saturated(self) -> bool:
        """Requests queued, the KV cache was (nearly) full, or requests were preempted."""
        return self.max_waiting > 0 or self.max_kv_usage >= 0.95 or self.preemptions > 0


@dataclass(frozen=True, slots=True)
class Measurements:
    """Everything one profiling run measured; the input of :func:`fit_perf_model`."""

    prefill: tuple[PrefillSample, ...]
    decode: tuple[DecodeSample, ...]
    saturation: tuple[SaturationSample, ...]
    kv_capacity_tokens: int
    max_num_seqs: int
    max_num_batched_tokens: int
    cold_start_s: float
    stop_s: float
    sleep_s: float | None
    wake_s: float | None
    output_len_sample: tuple[int, ...]
    notes: tuple[str, ...]  # what was not measured, and why
    server_version: str = "vllm (version unknown)"

    @property
    def saturation_concurrency(self) -> int | None:
        """The lowest concurrency tried at which the server saturated (None: never)."""
        return next((s.concurrency for s in self.saturation if s.saturated), None)


def _step_row(prefill: int, decode_seqs: int, context: int) -> np.ndarray:
    return np.array([1.0, prefill, prefill * prefill / 1000.0, decode_seqs, context, 0.0])


def prefill_row(prompt_tokens: int, budget: int) -> np.ndarray:
    """Design row of a lone prefill, chunked like :meth:`PerfModel.prefill_time_s`."""
    row, left = np.zeros(len(COEFFICIENTS)), prompt_tokens
    row[-1] = 1.0  # the request overhead, once
    while left > 0:
        chunk = min(left, budget)
        row += _step_row(chunk, 0, prompt_tokens - left)
        left -= chunk
    return row


def fit_coefficients(meas: Measurements) -> dict[str, float]:
    """Least-squares coefficients (relative error, non-negative) for the step-time model."""
    rows = [prefill_row(s.prompt_tokens, meas.max_num_batched_tokens) for s in meas.prefill]
    rows += [_step_row(0, s.concurrency, s.context_tokens) for s in meas.decode]
    y = np.array([s.ttft_s for s in meas.prefill] + [s.step_s for s in meas.decode])
    if len(rows) < len(COEFFICIENTS) or not meas.prefill or not meas.decode:
        raise EngineError(
            f"too few measurements to fit a profile ({len(meas.prefill)} prefill, "
            f"{len(meas.decode)} decode; need prefill and decode samples, "
            f"{len(COEFFICIENTS)} in all)"
        )
    weights = 1.0 / np.maximum(y, 1e-6)
    a = np.vstack(rows) * weights[:, None]
    b = y * weights
    coef = _nnls(a, b)
    # NOTE: the quadratic prefill term is applied to a whole step's prefill tokens, so a
    # spurious one (noise on long prompts) overprices batched prefills badly. Keep it only
    # when it explains the data clearly better than the model without it.
    quad = COEFFICIENTS.index("prefill_s_per_token2")
    if coef[quad] > 0:
        keep = [k for k in range(len(COEFFICIENTS)) if k != quad]
        linear = np.zeros_like(coef)
        linear[keep] = _nnls(a[:, keep], b)
        if _rss(a, b, coef) >= QUADRATIC_GAIN * _rss(a, b, linear):
            coef = linear
    return dict(zip(COEFFICIENTS, (float(c) for c in coef), strict=True))


def _rss(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((a @ x - b) ** 2))


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0: pin the most negative coefficient to 0 until none is."""
    active = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (sol >= 0).all():
            x[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return x


def fit_admission_gap(perf: PerfModel, bursts: Sequence[DecodeSample]) -> float:
    """The admission gap on a grid that best predicts the bursts' TTFTs (relative error)."""
    bursts = [b for b in bursts if len(b.ttfts_s) > 1]
    if not bursts or perf.ttft_overhead_s <= 0:
        return 0.0

    def error(gap: float) -> float:
        trial = replace(perf, admission_gap_s=gap)
        total = 0.0
        for b in bursts:
            shape = [(b.prompt_tokens, b.output_tokens)] * len(b.ttfts_s)
            predicted = sorted(t for t, _ in predict_batch(trial, shape))
            total += sum((p / m - 1.0) ** 2 for p, m in zip(predicted, b.ttfts_s, strict=True))
        return total

    top = GAP_RANGE_OVERHEADS * perf.ttft_overhead_s
    return min((top * k / (GAP_GRID - 1) for k in range(GAP_GRID)), key=error)


def fit_perf_model(meas: Measurements, model: str, gpu: str, provenance: str) -> PerfModel:
    """The PerfModel of ``model`` on ``gpu`` fitted to ``meas``."""
    coef = fit_coefficients(meas)
    perf = PerfModel(
        model=model,
        gpu=gpu,
        step_base_s=coef["step_base_s"],
        prefill_s_per_token=coef["prefill_s_per_token"],
        prefill_s_per_token2=coef["prefill_s_per_token2"],
        decode_s_per_seq=coef["decode_s_per_seq"],
        decode_s_per_ctx_token=coef["decode_s_per_ctx_token"],
        ttft_overhead_s=coef["ttft_overhead_s"],
        kv_capacity_tokens=meas.kv_capacity_tokens,
        max_num_seqs=meas.max_num_seqs,
        max_num_batched_tokens=meas.max_num_batched_tokens,
        cold_start_s=meas.cold_start_s,
        stop_s=meas.stop_s,
        sleep_s=meas.sleep_s,
        wake_s=meas.wake_s,
        provenance=provenance,
        output_len_sample=meas.output_len_sample,
    )
    return replace(perf, admission_gap_s=fit_admission_gap(perf, meas.decode))


def predict_batch(
    perf: PerfModel, requests: Sequence[tuple[int, int]]
) -> list[tuple[float, float]]:
    """Predicted ``(ttft_s, e2e_s)`` of requests ``(prompt_tokens, output_tokens)`` sent at 0.

    Requests are admitted in order up to ``max_num_seqs``; each step first decodes the
    running requests that have their first token, then prefills waiting prompt tokens in
    admission order under the ``max_num_batched_tokens`` budget (vLLM V1's order). Request
    ``k`` reaches the engine at ``k * admission_gap_s``; every request's times include
    ``ttft_overhead_s`` once.
    """
    n = len(requests)
    prefilled = [0] * n  # prompt tokens already computed
    produced = [0] * n  # output tokens so far
    ttft: list[float] = [0.0] * n
    e2e: list[float] = [0.0] * n
    running: list[int] = []
    queue = list(range(n))
    now, gap = 0.0, perf.admission_gap_s
    # NOTE: each loop iteration is one engine step; it always makes progress because a
    # running request either decodes a token or gets prefill budget.
    while queue or running:
        while queue and len(running) < perf.max_num_seqs and queue[0] * gap <= now:
            running.append(queue.pop(0))
        if not running:  # the next request is still on its way to the engine
            now = queue[0] * gap
            continue
        decoders = [i for i in running if prefilled[i] == requests[i][0]]
        budget, prefill_tokens, new_tokens = perf.max_num_batched_tokens - len(decoders), 0, []
        for i in running:
            if prefilled[i] < requests[i][0] and budget > 0:
                chunk = min(budget, requests[i][0] - prefilled[i])
                prefilled[i] += chunk
                budget -= chunk
                prefill_tokens += chunk
                if prefilled[i] == requests[i][0]:
                    new_tokens.append(i)  # the step that completes a prefill samples a token
        context = sum(requests[i][0] + produced[i] for i in decoders)
        now += perf.step_time_s(prefill_tokens, len(decoders), context)
        for i in decoders + new_tokens:
            produced[i] += 1
            if produced[i] == 1:
                ttft[i] = now + perf.ttft_overhead_s
            if produced[i] >= requests[i][1]:
                e2e[i] = now + perf.ttft_overhead_s
                running.remove(i)
    return list(zip(ttft, e2e, strict=True))
