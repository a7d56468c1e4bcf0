from pathlib import Path

import pytest

from qlmctl.errors import BadInput
from qlmctl.serve.runlog import RunLogWriter, read_run


def attempt(rid: str, attempt: int = 0, outcome: str = "finished") -> dict[str, object]:
    return {
        "request_id": rid,
        "attempt": attempt,
        "model": "m",
        "slo_class": "c",
        "arrival_s": 0.0,
        "finish_s": 1.0,
        "outcome": outcome,
        "slo_met": outcome == "finished",
    }


def test_close_merges_parts(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunLogWriter(run, {"policy": "fcfs"}, flush_every=2) as log:
        for k in range(5):
            log.add_attempt(attempt(f"r{k}"))
        log.add_operation({"time_s": 1.0, "kind": "swap", "instance_id": "i0"})
    assert not (run / "parts").exists()
    back = read_run(run)
    assert back.complete and back.meta["policy"] == "fcfs"
    assert list(back.requests["request_id"]) == [f"r{k}" for k in range(5)]
    assert back.operations["kind"].tolist() == ["swap"]


def test_crash_leaves_flushed_rows_readable(tmp_path: Path) -> None:
    run = tmp_path / "run"
    log = RunLogWriter(run, {"policy": "qlm"}, flush_every=2, flush_interval_s=3600)
    for k in range(3):
        log.add_attempt(attempt(f"r{k}"))
    # no close(): as if the process died; the third row was never flushed
    back = read_run(run)
    assert not back.complete
    assert len(back.requests) == 2


def test_final_attempts_pick_last(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunLogWriter(run, {}) as log:
        log.add_attempt(attempt("a", 0, "evicted"))
        log.add_attempt(attempt("a", 1, "finished"))
    final = read_run(run).final_attempts
    assert final["outcome"].tolist() == ["finished"]


def test_refuses_non_empty_dir_and_bad_version(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("")
    with pytest.raises(BadInput, match="not empty"):
        RunLogWriter(tmp_path, {})
    run = tmp_path / "old"
    run.mkdir()
    (run / "run.json").write_text('{"version": 0}')
    with pytest.raises(BadInput, match="version 0"):
        read_run(run)
