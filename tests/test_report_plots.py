"""Plots: the time series behind them (known answers) and the files written."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from qlmctl.report.plots import _forecasts, _save, write_plots
from qlmctl.report.runs import build_report, load_run
from qlmctl.report.timeline import attainment_over_time, in_flight, waiting
from tests.test_report_metrics import write_run


def test_in_flight_per_instance(tmp_path: Path) -> None:
    flight = in_flight(load_run(write_run(tmp_path / "run")))
    i0 = flight[flight.instance_id == "i0"]
    assert i0["time_s"].tolist() == [0.5, 1.0, 2.0, 3.0, 3.5, 7.0]
    assert i0["depth"].tolist() == [1, 2, 1, 0, 1, 0]
    assert flight[flight.instance_id == "i1"]["depth"].tolist() == [1, 0, 1, 0]


def test_waiting_queue_includes_requeued_attempts(tmp_path: Path) -> None:
    wait = waiting(load_run(write_run(tmp_path / "run")))
    # a waits [0, 0.5], d [3, 3.5], c re-queued after its eviction [4, 6]
    assert wait["time_s"].tolist() == [0.0, 0.5, 3.0, 3.5, 4.0, 6.0]
    assert wait["depth"].tolist() == [1, 0, 1, 0, 1, 0]


def test_attainment_over_time_rolls_over_arrivals(tmp_path: Path) -> None:
    series = attainment_over_time(load_run(write_run(tmp_path / "run")), window_s=2.0)
    overall = series[series.slo_class == "all"]
    assert overall["time_s"].tolist() == [0.0, 1.0, 2.0, 3.0, 9.0]
    # window (t − 2, t]: at 3 s requests c (met) and d (missed); b at 1 s is just outside
    assert overall["attainment"].tolist() == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.0])
    inter = series[series.slo_class == "interactive"]
    assert inter["attainment"].tolist() == pytest.approx([1.0, 1.0, 0.0])  # a, b, then d alone


def test_write_plots_and_html(tmp_path: Path) -> None:
    runs = [
        write_run(tmp_path / "f", "fcfs"),
        write_run(tmp_path / "q", "qlm", d_first_token_s=3.9),
    ]
    out = tmp_path / "out"
    written = write_plots(build_report(runs), out)
    pngs = [p for p in written if p.suffix == ".png"]
    # per run: attainment, queues, gantt and forecasts (its attempts have some); CDF; bars
    assert len(pngs) == 2 * 4 + 2
    assert [p.name for p in pngs].count("1-fcfs-forecasts.png") == 1
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 8_000, png.name
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(pngs)
    assert base64.b64encode(pngs[0].read_bytes()).decode()[:200] in page
    assert "<table" in page and "Comparison (baseline fcfs)" in page
    assert not list(out.glob(".*tmp"))  # no temporary files left behind


def test_a_run_without_forecasts_has_no_forecast_plot(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path / "f", "fcfs"))
    run.requests[[c for c in run.requests if c.startswith("predicted_")]] = None
    assert _forecasts(run, "fcfs") is None


def test_a_run_with_first_token_forecasts_only_draws_one_panel(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path / "f", "fcfs"))
    run.requests[["predicted_finish_s", "predicted_finish_p90_s"]] = None
    draw = _forecasts(run, "fcfs")
    assert draw is not None
    png = _save(draw, tmp_path / "forecasts.png")
    assert png.read_bytes().startswith(b"\x89PNG")
