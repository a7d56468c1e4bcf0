"""The fidelity benchmark's arithmetic and its results file, on simulated runs only."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.sim_fidelity import compare, merge_results, pooled, real_floor, saved_profile
from qlmctl.demo import run_demo
from qlmctl.profile.profiler import profile_path
from qlmctl.profile.store import ProfileStore


@pytest.fixture
def base_and_slow(tmp_path: Path) -> tuple[Path, Path]:
    """The demo's fcfs run simulated with the shipped profile, and with twice its step base."""
    (base,), _ = run_demo(tmp_path / "a", ("fcfs",), engine="sim")
    tiny = ProfileStore.load(None).get("tiny", "cpu")
    slow_perf = replace(tiny, step_base_s=2 * tiny.step_base_s)
    (slow,), _ = run_demo(tmp_path / "b", ("fcfs",), engine="sim", profile=slow_perf)
    return base.run_dir, slow.run_dir


def test_a_run_against_itself_has_no_error_and_a_slower_one_does(
    base_and_slow: tuple[Path, Path],
) -> None:
    base, slow = base_and_slow
    same = compare(base, base)
    assert same["ttft_median_err"] == same["e2e_median_err"] == 0.0
    assert same["requests"] == 405
    worse = compare(slow, base)  # the base simulation is the faster one
    assert worse["e2e_median_err"] > 0.05 and worse["e2e_median_bias_s"] < 0


def test_results_merge_into_the_file_other_benchmarks_write(tmp_path: Path) -> None:
    path = tmp_path / "estimator.json"
    path.write_text(json.dumps({"A-mixed": {"brier": 0.1}, "sim_fidelity": {"qlm": {"x": 1}}}))
    merge_results(path, {"fcfs": {"ttft_median_err": 0.05}})
    data = json.loads(path.read_text())
    assert data == {
        "A-mixed": {"brier": 0.1},
        "sim_fidelity": {"qlm": {"x": 1}, "fcfs": {"ttft_median_err": 0.05}},
    }
    merge_results(tmp_path / "new.json", {"qlm": {"e2e_median_err": 0.2}})
    assert json.loads((tmp_path / "new.json").read_text()) == {
        "sim_fidelity": {"qlm": {"e2e_median_err": 0.2}}
    }


def test_runs_of_different_workloads_are_refused(tmp_path: Path) -> None:
    (run,), _ = run_demo(tmp_path / "a", ("fcfs",), engine="sim")
    other = tmp_path / "other"
    other.mkdir()
    for f in run.run_dir.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    meta = json.loads((other / "run.json").read_text())
    meta["workload_fingerprint"] = "something else"
    (other / "run.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="different workloads"):
        compare(run.run_dir, other)


def test_servers_profiled_at_once_are_pooled(tmp_path: Path) -> None:
    tiny = ProfileStore.load(None).get("tiny", "cpu")
    slow = replace(tiny, step_base_s=3 * tiny.step_base_s, decode_s_per_seq=1e-4)
    for k, perf in enumerate((tiny, slow)):
        path = profile_path(tmp_path / f"measured-{k}", "tiny", "cpu")
        path.parent.mkdir(parents=True)
        perf.save(path)
    both = saved_profile(tmp_path)
    assert both is not None
    assert both.step_base_s == pytest.approx(2 * tiny.step_base_s)
    assert both.decode_s_per_seq == pytest.approx((tiny.decode_s_per_seq + 1e-4) / 2)
    assert both.max_num_seqs == tiny.max_num_seqs and "mean of 2 servers" in both.provenance
    assert pooled([tiny]) == tiny
    assert saved_profile(tmp_path / "nothing") is None


def test_the_real_floor_compares_consecutive_runs(base_and_slow: tuple[Path, Path]) -> None:
    base, slow = base_and_slow
    assert real_floor([base]) is None
    assert real_floor([base, base]) == {"ttft_median_err": 0.0, "e2e_median_err": 0.0}
    floor = real_floor([base, slow, base])
    assert floor is not None
    both_ways = compare(base, slow)["e2e_median_err"] + compare(slow, base)["e2e_median_err"]
    assert floor["e2e_median_err"] == pytest.approx(both_ways / 2)
    assert floor["e2e_median_err"] > 0.05
