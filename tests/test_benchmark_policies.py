"""The policy benchmark end to end on its smallest point: schema and request accounting."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmarks.policies import report
from benchmarks.policies.run import Point, run_point
from benchmarks.policies.scenarios import SCENARIOS, build_point, capacity_rps, slo_classes
from qlmctl.profile.store import ProfileStore

WINDOW_S = (300.0, 315.0)


def test_load_scaling_hits_the_target_load() -> None:
    scenario = SCENARIOS["A-mixed"]
    cluster = scenario.cluster(4)
    perf = ProfileStore.load().for_cluster(cluster)
    light, scale_light = build_point(scenario, cluster, perf, 0.5, WINDOW_S, slo_classes())
    heavy, scale_heavy = build_point(scenario, cluster, perf, 2.0, WINDOW_S, slo_classes())
    assert len(light.requests) == len(heavy.requests)
    assert abs(scale_light / scale_heavy - 4.0) < 1e-9  # 4x the load: a quarter of the time
    offered = len(heavy.requests) / ((WINDOW_S[1] - WINDOW_S[0]) * scale_heavy)
    assert abs(offered / capacity_rps(heavy, cluster, perf) - 2.0) < 1e-6


def test_smallest_point_accounts_for_every_request(tmp_path: Path) -> None:
    rows = [
        run_point(Point("A-mixed", 4, 1.5, policy, WINDOW_S, (20, 60, 3600)))
        for policy in ("fcfs", "clairvoyant")
    ]
    frame = report.to_frame(rows)
    assert list(frame.columns) == list(report.COLUMNS)
    for _, r in frame.iterrows():
        assert r["requests"] > 0 and r["ended"] == r["requests"]
        assert r["finished"] + r["failed"] + r["rejected"] + r["cancelled"] == r["requests"]
        assert r["n_interactive"] + r["n_batch-1"] + r["n_batch-2"] == r["requests"]
        assert 0.0 <= r["attainment"] <= 1.0 and r["met"] <= r["finished"]
    path = report.write_parquet(frame, tmp_path / "policies.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(path), frame.reset_index(drop=True))
    assert "## A-mixed, 4 instances" in report.markdown(frame, "cmd")
