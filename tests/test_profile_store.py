import json
from pathlib import Path

import pytest

from qlmctl.domain import ClusterSpec
from qlmctl.errors import BadInput
from qlmctl.perfmodel import swap_time_s
from qlmctl.profile.store import ProfileStore
from qlmctl.specs import load_cluster
from tests.helpers import make_cluster, make_perf

REPO = Path(__file__).resolve().parent.parent
GPU_PAIRS = [
    (m, g)
    for m in ("llama-3.1-8b", "mistral-7b", "llama-3.1-70b")
    for g in ("A10", "A100", "H100")
    if (m, g) != ("llama-3.1-70b", "A10")  # 141 GB of weights: does not fit
]


def test_shipped_defaults_cover_the_documented_pairs_with_provenance() -> None:
    store = ProfileStore.load(None)
    assert sorted(store.pairs) == sorted([*GPU_PAIRS, ("tiny", "cpu")])
    for pair in store.pairs:
        perf = store.get(*pair)
        # tiny@cpu is measured here by `qlmctl profile`; the GPU pairs are estimates.
        expected = "measured by qlmctl profile" if pair == ("tiny", "cpu") else "estimate"
        assert perf.provenance.startswith(expected)
        assert store.sources[pair].startswith("default:")
        assert perf.max_num_seqs <= perf.max_num_batched_tokens
    # bigger GPUs and smaller models are faster per decode step
    assert store.get("llama-3.1-8b", "H100").decode_step_s(1, 1000) < store.get(
        "llama-3.1-8b", "A100"
    ).decode_step_s(1, 1000)
    assert 0.0005 < store.get("tiny", "cpu").decode_step_s(1, 100) < 0.02  # a few ms on CPU


def test_measured_profile_replaces_the_default(tmp_path: Path) -> None:
    make_perf(model="llama-3.1-8b", gpu="A100", provenance="measured").save(tmp_path / "p.json")
    make_perf(model="mine", gpu="A100").save(tmp_path / "q.json")
    store = ProfileStore.load(tmp_path)
    assert store.get("llama-3.1-8b", "A100").provenance == "measured"
    assert store.sources[("llama-3.1-8b", "A100")] == str(tmp_path / "p.json")
    assert store.get("mine", "A100").step_base_s == 0.01
    assert store.get("mistral-7b", "A100").provenance.startswith("estimate")


def test_unknown_pair_lists_the_available_ones() -> None:
    with pytest.raises(BadInput, match=r"'llama-3.1-70b' on gpu 'A10'.*available: .*tiny@cpu"):
        ProfileStore.load(None).get("llama-3.1-70b", "A10")


def test_older_profile_version_is_refused(tmp_path: Path) -> None:
    (tmp_path / "old.json").write_text(json.dumps(make_perf().to_dict() | {"version": 0}))
    with pytest.raises(BadInput, match=r"old.json: profile format version 0 is not supported"):
        ProfileStore.load(tmp_path)


def test_missing_directory_and_duplicate_profiles_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="profile directory not found"):
        ProfileStore.load(tmp_path / "nope")
    make_perf().save(tmp_path / "a.json")
    make_perf().save(tmp_path / "b.json")
    with pytest.raises(BadInput, match=r"b.json: a second profile for m1@G .*a.json"):
        ProfileStore.load(tmp_path)


def test_for_cluster_covers_every_usable_pair() -> None:
    cluster = load_cluster(REPO / "workloads" / "cluster-sim.yaml")
    perf = ProfileStore.load(None).for_cluster(cluster)
    assert sorted(perf) == [
        ("llama-3.1-8b", "A10"),
        ("llama-3.1-8b", "A100"),
        ("mistral-7b", "A10"),
        ("mistral-7b", "A100"),
    ]


def test_for_cluster_names_the_first_missing_pair(tmp_path: Path) -> None:
    make_perf(model="m1").save(tmp_path / "m1.json")
    with pytest.raises(BadInput, match=r"instance 'i0': no profile for model 'm2' on gpu 'G'"):
        ProfileStore.load(tmp_path).for_cluster(make_cluster(2))


def test_swap_time() -> None:
    cur = make_perf(model="a", stop_s=2.0, sleep_s=1.5, wake_s=0.5)
    to = make_perf(model="b", cold_start_s=20.0, sleep_s=1.0, wake_s=0.7)
    assert swap_time_s(to, cur, asleep=False) == 22.0
    assert swap_time_s(to, None, asleep=False) == 20.0
    assert swap_time_s(to, cur, asleep=True) == 0.7
    assert swap_time_s(to, cur, asleep=False, sleep_current=True) == 21.5
    no_sleep = make_perf(model="c", cold_start_s=30.0)
    assert swap_time_s(no_sleep, cur, asleep=True) == 32.0
    assert swap_time_s(to, no_sleep, asleep=False, sleep_current=True) == 22.0


def test_model_can_borrow_another_models_profile() -> None:
    data = make_cluster(1, models=("tiny-a", "tiny-b")).model_dump()
    for m in data["models"]:
        m["profile"] = "tiny"
    for inst in data["instances"]:
        inst["gpu"] = "cpu"
    data["gpu_types"] = [{"name": "cpu"}]
    borrowed = ProfileStore.load(None).for_cluster(ClusterSpec.model_validate(data))
    assert set(borrowed) == {("tiny-a", "cpu"), ("tiny-b", "cpu")}
    tiny = ProfileStore.load(None).get("tiny", "cpu")
    assert borrowed[("tiny-b", "cpu")].model == "tiny-b"
    assert borrowed[("tiny-b", "cpu")].decode_s_per_seq == tiny.decode_s_per_seq
