import json
import math
from pathlib import Path

import pytest

from qlmctl.errors import BadInput
from qlmctl.perfmodel import PerfModel
from tests.helpers import make_perf


def test_save_load_round_trip(tmp_path: Path) -> None:
    perf = make_perf(output_len_sample=(3, 4, 5), sleep_s=1.0, wake_s=2.0)
    perf.save(tmp_path / "p.json")
    assert PerfModel.load(tmp_path / "p.json") == perf
    assert not list(tmp_path.glob("*.tmp"))


def test_older_version_is_refused(tmp_path: Path) -> None:
    data = make_perf().to_dict() | {"version": 0}
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(BadInput, match="version 0 is not supported"):
        PerfModel.load(tmp_path / "p.json")


@pytest.mark.parametrize("bad", [-1.0, math.nan])
def test_negative_or_nan_coefficients_are_refused(bad: float) -> None:
    with pytest.raises(BadInput, match="decode_s_per_seq"):
        make_perf(decode_s_per_seq=bad)


def test_step_and_prefill_times() -> None:
    perf = make_perf(max_num_batched_tokens=100)
    assert perf.step_time_s(0, 1, 0) == pytest.approx(0.0101)
    # 250 tokens in chunks of 100, 100, 50: three steps
    assert perf.prefill_time_s(250) == pytest.approx(3 * 0.01 + 250 * 1e-4)
    assert perf.decode_throughput_tps(10, 0) == pytest.approx(10 / 0.011)
