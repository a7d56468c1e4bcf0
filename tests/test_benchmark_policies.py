"""The policy benchmark end to end on its smallest point: schema and request accounting."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from benchmarks.policies import real, report
from benchmarks.policies.__main__ import main as policies_main
from benchmarks.policies.run import CEILING, HINDSIGHT, POLICY_RUNS, Point, run_point
from benchmarks.policies.scenarios import SCENARIOS, build_point, capacity_rps, slo_classes
from qlmctl.demo import run_demo
from qlmctl.profile.store import ProfileStore

SPAN_S = 10.0


def test_load_scaling_offers_the_target_load_over_the_span() -> None:
    scenario = SCENARIOS["A-mixed"]
    cluster = scenario.cluster(4)
    perf = ProfileStore.load().for_cluster(cluster)
    counts = []
    for load in (0.5, 2.0):
        wl, _scale, offered = build_point(scenario, cluster, perf, load, SPAN_S, slo_classes())
        assert wl.requests[-1].arrival_s <= SPAN_S  # the window is scaled into the span
        assert offered == len(wl.requests) / SPAN_S / capacity_rps(wl, cluster, perf)
        assert abs(offered - load) < 0.25 * load  # a short span: a few requests off
        counts.append(len(wl.requests))
    assert 3 < counts[1] / counts[0] < 5  # 4x the load: about 4x the requests


def test_smallest_point_accounts_for_every_request(tmp_path: Path) -> None:
    rows = [
        run_point(Point("A-mixed", 4, 1.5, policy, SPAN_S, (20, 60, 3600)))
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


def test_seeds_of_a_point_are_averaged_and_their_range_shown() -> None:
    base = {c: 0.0 for c in report.COLUMNS}
    base.update(scenario="A-mixed", instances=4, load=2.0, requests=10, n_interactive=10)
    rows = [
        {**base, "policy": p, "seed": seed, "attainment": att + 0.1 * seed, "milp_offered": 2}
        for p, att in [("fcfs", 0.4), ("edf", 0.5), ("clairvoyant", 0.8), ("qlm", 0.8)]
        for seed in (0, 1)
    ]
    point = report.by_point(report.to_frame(rows)).set_index("policy")
    assert point.loc["qlm", "attainment"] == pytest.approx(0.85)
    assert point.loc["qlm", "seeds"] == 2 and point.loc["qlm", "milp_offered"] == 4
    assert report.reference_loads(report.to_frame(rows)) == {("A-mixed", 4): 2.0}
    assert "| qlm | 85.0 (80.0-90.0) |" in report.markdown(report.to_frame(rows), "cmd")


def test_no_seeds_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.policies.__main__ import main

    assert main(["--seeds", "0", "--no-real"]) == 2
    assert capsys.readouterr().err == "--seeds: expected a positive number, got 0\n"


def test_real_leg_table_has_a_row_per_policy(tmp_path: Path) -> None:
    _, rep = run_demo(tmp_path, ("fcfs", "qlm"), "sim")
    # the simulated runs stand in for both engines: this checks the table, not vLLM
    frame = pd.DataFrame([real.metrics_row(e, m) for e in real.ENGINES for m in rep.metrics])
    assert set(frame["policy"]) == {"fcfs", "qlm"} and (frame["requests"] == 405).all()
    lines = real.markdown(frame)
    rows = [line for line in lines if line.startswith(("| fcfs |", "| qlm |"))]
    assert len(rows) == 2 and all(line.count("|") == 16 for line in rows)
    # qlm's requests are planned: their first tokens have forecasts with a p90
    assert frame.loc[frame["policy"] == "qlm", "first_token_p90_cover"].notna().all()


def test_only_bounds_recomputes_the_bounds_and_keeps_the_runs(tmp_path: Path) -> None:
    base = {c: 0.0 for c in report.COLUMNS}
    base.update(scenario="A-mixed", instances=4, load=0.5, requests=10, n_interactive=10)
    rows = [{**base, "policy": p, "attainment": 0.25} for p in POLICY_RUNS]
    rows.append({**base, "policy": HINDSIGHT, "attainment": 0.125})  # a stale bound
    report.write_parquet(report.to_frame(rows), tmp_path / "policies.parquet")
    assert policies_main(["--only-bounds", "--out", str(tmp_path), "--jobs", "1"]) == 0
    got = pd.read_parquet(tmp_path / "policies.parquet").set_index("policy")["attainment"]
    assert got["fcfs"] == 0.25  # the runs are kept; at half the capacity the bounds keep all
    # the hindsight LP's optimum comes from the interior-point method: within its tolerance
    assert got[HINDSIGHT] == pytest.approx(1.0, abs=1e-8) and got[CEILING] == 1.0
    md = (tmp_path / "policies.md").read_text()
    assert "recomputed later, by `--only-bounds`" in md
    assert "Runs above their point's prefill ceiling: 0" in md


def test_only_bounds_without_a_sweep_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert policies_main(["--only-bounds", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no sweep in" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize(
    ("cells", "message"),
    [("Z-none:4", "unknown scenario 'Z-none'"), ("E-twomodels", "expected SCENARIO:INSTANCES")],
)
def test_a_bad_cell_is_one_line_and_exit_2(
    cells: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert policies_main(["--cells", cells, "--no-real"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_placement_sets_each_instances_first_model() -> None:
    scenario = SCENARIOS["E-twomodels"]
    assert [i.model for i in scenario.cluster(4).instances] == [*scenario.models] * 2
    placement = (scenario.models[1], scenario.models[1], scenario.models[0], scenario.models[0])
    cluster = scenario.cluster(4, placement)
    assert tuple(i.model for i in cluster.instances) == placement
    assert all(i.models is None for i in cluster.instances)  # each may serve either
