"""The embedded demo, on the simulator (the real-vLLM path is the README's `make demo`)."""

from pathlib import Path

from qlmctl.demo import DEMO_MAX_NUM_SEQS, run_demo
from qlmctl.profile.store import ProfileStore
from qlmctl.specs import load_cluster


def test_demo_compares_policies_on_one_workload(tmp_path: Path) -> None:
    summaries, report = run_demo(tmp_path, ("fcfs", "qlm"), engine="sim")
    assert [s.policy for s in summaries] == ["fcfs", "qlm"]
    for s in summaries:
        assert s.requests > 50
        assert s.finished + s.failed + s.rejected + s.cancelled == s.requests
    assert report.comparison is not None
    cluster = load_cluster(tmp_path / "cluster.yaml")
    assert all(i.launch and "--max-num-seqs" in i.launch.extra_args for i in cluster.instances)
    perf = ProfileStore.load(tmp_path / "profiles").for_cluster(cluster)
    assert {p.max_num_seqs for p in perf.values()} == {DEMO_MAX_NUM_SEQS}
