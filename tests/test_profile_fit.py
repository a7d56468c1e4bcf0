"""Fitting a PerfModel to measurements, and predicting latencies with it (no vLLM)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qlmctl.errors import EngineError
from qlmctl.perfmodel import PerfModel
from qlmctl.profile.fit import (
    DecodeSample,
    Measurements,
    PrefillSample,
    SaturationSample,
    fit_perf_model,
    predict_batch,
)
from tests.helpers import make_perf

TRUE = make_perf(
    "tiny",
    "cpu",
    step_base_s=0.003,
    prefill_s_per_token=2e-5,
    prefill_s_per_token2=1e-6,
    decode_s_per_seq=3e-4,
    decode_s_per_ctx_token=1e-7,
    ttft_overhead_s=0.01,
    admission_gap_s=0.006,
    max_num_batched_tokens=512,
)


def measurements_of(perf: PerfModel, noise: float = 0.0) -> Measurements:
    """What a perfect (or +-noise, alternating) profiler would measure on ``perf``."""
    prefill = tuple(
        PrefillSample(p, perf.prefill_time_s(p) * (1 + noise * (-1) ** k))
        for k, p in enumerate((16, 128, 384, 768, 1500))
    )
    decode = []
    for k, (c, p) in enumerate((c, p) for c in (1, 4, 16) for p in (32, 256)):
        ctx = int(c * (p + 16))
        step = perf.decode_step_s(c, ctx) * (1 + noise * (-1) ** k)
        ttfts = tuple(sorted(t for t, _ in predict_batch(perf, [(p, 32)] * c)))
        decode.append(DecodeSample(c, p, 32, step, ctx, ttfts))
    return Measurements(
        prefill=prefill,
        decode=tuple(decode),
        saturation=(SaturationSample(8, 8, 0, 0.1, 0),),
        kv_capacity_tokens=32768,
        max_num_seqs=64,
        max_num_batched_tokens=perf.max_num_batched_tokens,
        cold_start_s=21.0,
        stop_s=2.0,
        sleep_s=None,
        wake_s=None,
        output_len_sample=(3, 9),
        notes=("sleep refused",),
    )


def test_exact_measurements_give_back_the_model() -> None:
    fitted = fit_perf_model(measurements_of(TRUE), "tiny", "cpu", "test")
    for p in (50, 700, 2000):  # 2000 spans four chunks of 512
        assert fitted.prefill_time_s(p) == pytest.approx(TRUE.prefill_time_s(p), rel=1e-6)
    for c, ctx in ((1, 100), (32, 20_000)):
        assert fitted.decode_step_s(c, ctx) == pytest.approx(TRUE.decode_step_s(c, ctx), rel=1e-6)
    assert fitted.ttft_overhead_s == pytest.approx(0.01, rel=1e-6)
    assert fitted.admission_gap_s == pytest.approx(0.006, rel=1e-6)  # on the grid
    assert (fitted.cold_start_s, fitted.kv_capacity_tokens, fitted.max_num_seqs) == (
        21.0,
        32768,
        64,
    )
    assert fitted.sleep_s is None and fitted.output_len_sample == (3, 9)


def test_noisy_measurements_stay_close_and_coefficients_non_negative() -> None:
    fitted = fit_perf_model(measurements_of(TRUE, noise=0.1), "tiny", "cpu", "test")
    assert min(fitted.step_base_s, fitted.prefill_s_per_token, fitted.decode_s_per_seq) >= 0
    assert fitted.prefill_time_s(400) == pytest.approx(TRUE.prefill_time_s(400), rel=0.15)
    assert fitted.decode_step_s(8, 2000) == pytest.approx(TRUE.decode_step_s(8, 2000), rel=0.15)


def test_a_coefficient_that_would_be_negative_is_pinned_to_zero() -> None:
    flat = make_perf("m", "G", prefill_s_per_token=0.0, step_base_s=0.005, decode_s_per_seq=0.0)
    meas = measurements_of(flat)
    # TTFT that falls slightly with length would need a negative per-token cost.
    shrinking = tuple(
        PrefillSample(s.prompt_tokens, s.ttft_s * (1 - s.prompt_tokens * 1e-5))
        for s in meas.prefill
    )
    fitted = fit_perf_model(replace(meas, prefill=shrinking), "m", "G", "t")
    assert fitted.prefill_s_per_token == 0.0
    assert fitted.step_base_s > 0


def test_too_few_measurements_is_an_engine_error() -> None:
    meas = measurements_of(TRUE)
    empty = replace(meas, decode=())
    with pytest.raises(EngineError, match="too few measurements"):
        fit_perf_model(empty, "tiny", "cpu", "t")


def test_predict_a_lone_request() -> None:
    [(ttft, e2e)] = predict_batch(TRUE, [(300, 10)])
    assert ttft == pytest.approx(TRUE.prefill_time_s(300))
    decode = sum(TRUE.decode_step_s(1, 300 + k) for k in range(1, 10))
    assert e2e == pytest.approx(ttft + decode)


def test_without_bursts_the_admission_gap_is_zero() -> None:
    meas = measurements_of(TRUE)
    lone = tuple(replace(s, ttfts_s=()) for s in meas.decode)
    assert fit_perf_model(replace(meas, decode=lone), "tiny", "cpu", "t").admission_gap_s == 0.0


def test_predict_a_burst_admits_requests_one_gap_apart() -> None:
    perf = make_perf(admission_gap_s=0.05, ttft_overhead_s=0.0)
    first, second = predict_batch(perf, [(10, 2)] * 2)
    assert first[0] == pytest.approx(perf.prefill_time_s(10))  # alone in its first step
    assert second[0] > 0.05  # could not start before it reached the engine
    together = predict_batch(replace(perf, admission_gap_s=0.0), [(10, 2)] * 2)
    assert together[0] == together[1]


def test_predict_queues_beyond_max_num_seqs() -> None:
    perf = make_perf(max_num_seqs=2, ttft_overhead_s=0.0)
    times = predict_batch(perf, [(100, 20)] * 3)
    assert times[0] == times[1]  # admitted and prefilled together
    assert times[2][0] > times[0][1]  # the third starts after one of them finished


def test_a_spurious_quadratic_prefill_term_is_dropped() -> None:
    linear = make_perf("m", "G", prefill_s_per_token=5e-5, prefill_s_per_token2=0.0)
    fitted = fit_perf_model(measurements_of(linear, noise=0.05), "m", "G", "t")
    assert fitted.prefill_s_per_token2 == 0.0
    assert fitted.prefill_s_per_token == pytest.approx(5e-5, rel=0.2)
