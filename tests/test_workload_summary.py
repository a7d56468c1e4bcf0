"""`workload show` statistics: rates add up, burstiness, percentiles, sparkline."""

from __future__ import annotations

import numpy as np
import pytest

from qlmctl.domain import Request
from qlmctl.workload import Workload, summarise
from qlmctl.workload.summary import ALL, sparkline, stats_rows
from tests.helpers import SLO_CLASSES, make_requests


def test_groups_rates_and_percentiles() -> None:
    even = make_requests(101, model="m1", gap_s=1.0, prompt_tokens=10)
    other = make_requests(11, model="m2", slo_class="batch", gap_s=10.0, prefix="b")
    s = summarise(Workload.from_requests(even + other, SLO_CLASSES, "t"), bins=10)
    by_key = {(g.slo_class, g.model): g for g in s.groups}
    assert set(by_key) == {("batch", "m2"), ("interactive", "m1"), (ALL, ALL)}
    assert s.duration_s == 100.0
    assert by_key["interactive", "m1"].rate_per_s == 1.01
    assert by_key["interactive", "m1"].cv_interarrival == 0.0  # perfectly regular
    assert by_key[ALL, ALL].count == 112
    assert by_key["interactive", "m1"].prompt_tokens_p99 == 10
    assert sum(by_key["batch", "m2"].rate_bins_per_s) * s.bin_s == pytest.approx(11)
    assert len(stats_rows(s)) == 3


def test_bursty_group_has_high_cv() -> None:
    times = [0.0, 0.01, 0.02, 0.03, 50.0, 50.01, 50.02, 100.0]
    reqs = [
        Request(
            id=f"r{i}",
            arrival_s=t,
            model="m",
            slo_class="batch",
            prompt_tokens=5,
            max_output_tokens=5,
        )
        for i, t in enumerate(times)
    ]
    g = summarise(Workload.from_requests(reqs, SLO_CLASSES, "t")).groups[-1]
    assert g.cv_interarrival is not None and g.cv_interarrival > 1.5


def test_sparkline_scales_to_the_peak() -> None:
    assert sparkline(np.array([0, 4, 8])) == " ▄█"
    assert sparkline(np.array([0, 0])) == "  "
