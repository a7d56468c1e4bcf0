"""``qlmctl serve WORKLOAD --target URL``: a replay as one client of a running gateway."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from qlmctl.cli import app
from qlmctl.serve.runlog import read_run
from qlmctl.workload import Workload, write_workload
from tests.gateway_helpers import fake_job, fake_vllm, running_gateway
from tests.helpers import SLO_CLASSES, make_requests


def test_replay_through_a_gateway_logs_every_request_there(tmp_path: Path) -> None:
    reqs = [
        *make_requests(6, "m1", "interactive", gap_s=0.05, output_tokens=4, prefix="i"),
        *make_requests(4, "m2", "batch", gap_s=0.1, output_tokens=3, prefix="b"),
    ]
    path = tmp_path / "w.parquet"
    write_workload(Workload.from_requests(reqs, SLO_CLASSES, "test"), path)
    with running_gateway(fake_job(tmp_path, fake_vllm(0.01))) as gw:
        result = CliRunner().invoke(app, ["serve", str(path), "--target", gw.base_url])
        assert result.exit_code == 0, result.output
        assert "outcome ok" in result.output and "10" in result.output
    df = read_run(tmp_path / "run").requests
    assert len(df) == 10 and (df.outcome == "finished").all()
    assert sorted(df.slo_class) == ["batch"] * 4 + ["interactive"] * 6  # from the header
    assert sorted(df[df.slo_class == "batch"].output_tokens) == [3, 3, 3, 3]


def test_target_needs_a_workload_and_a_reachable_gateway(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["serve", "--target", "http://127.0.0.1:9"]).exit_code == 2
    path = tmp_path / "w.parquet"
    write_workload(Workload.from_requests(make_requests(1), SLO_CLASSES, "t"), path)
    down = runner.invoke(app, ["serve", str(path), "--target", "http://127.0.0.1:9"])
    assert "cannot reach the gateway" in str(down.exception)
