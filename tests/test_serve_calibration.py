import pytest

from qlmctl.serve.calibration import SpeedCalibration, scaled
from tests.helpers import make_perf

PAIR = ("m1", "G")


def test_factor_follows_observed_slowdown() -> None:
    perf = make_perf()
    cal = SpeedCalibration({PAIR: perf}, weight=0.5)
    assert cal.factor(PAIR) == 1.0 and cal.current[PAIR] == perf
    predicted = 10 * perf.decode_step_s(4, 1000)  # ten steps
    cal.observe(PAIR, 3 * predicted, 10, 4, 1000)
    assert cal.factor(PAIR) == pytest.approx(3.0)  # first observation taken as is
    cal.observe(PAIR, 1 * predicted, 10, 4, 1000)
    assert cal.factor(PAIR) == pytest.approx(2.0)  # running mean
    assert 10 * cal.current[PAIR].decode_step_s(4, 1000) == pytest.approx(2 * predicted)
    # capacities and start-up costs are not speeds: unchanged
    assert cal.current[PAIR].max_num_seqs == perf.max_num_seqs
    assert cal.current[PAIR].cold_start_s == perf.cold_start_s


def test_outliers_are_bounded_and_unknown_pairs_ignored() -> None:
    perf = make_perf()
    cal = SpeedCalibration({PAIR: perf}, bounds=(0.5, 4.0))
    cal.observe(PAIR, 1e6, 1, 1, 0)
    assert cal.factor(PAIR) == 4.0
    cal.observe(("other", "G"), 1.0, 1, 1, 0)
    cal.observe(PAIR, 0.0, 1, 1, 0)  # no time: ignored
    cal.observe(PAIR, 1.0, 0, 1, 0)  # no steps: ignored
    assert cal.factor(("other", "G")) == 1.0 and cal.factor(PAIR) == 4.0


def test_prefill_done_beside_the_decode_is_not_read_as_slowness() -> None:
    # a busy engine runs others' prefill chunks in the decode's steps: at profiled speed
    # the decode took its steps' time plus that prefill's, and the factor stays 1
    perf = make_perf(prefill_s_per_token2=1e-6)
    cal = SpeedCalibration({PAIR: perf})
    prompts = [2000, 500, 1500]
    tokens, squares = sum(prompts), sum(p * p for p in prompts)
    took = 50 * perf.decode_step_s(8, 4000) + perf.prefill_work_s(tokens, squares)
    cal.observe(PAIR, took, 50, 8, 4000, tokens, squares)
    assert cal.factor(PAIR) == pytest.approx(1.0)
    cal.observe(PAIR, took, 50, 8, 4000)  # the same time without the prefill: slower
    assert cal.factor(PAIR) > 1.05


def test_scaled_multiplies_every_step_coefficient() -> None:
    perf = make_perf(prefill_s_per_token2=1e-6, decode_s_per_ctx_token=1e-7)
    twice = scaled(perf, 2.0)
    assert twice.step_time_s(300, 5, 2000) == pytest.approx(2 * perf.step_time_s(300, 5, 2000))
