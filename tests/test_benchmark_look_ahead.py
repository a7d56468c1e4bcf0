"""benchmarks/look_ahead.py: its foresight is the look-ahead told the true window."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from benchmarks.look_ahead import RESULTS, Foresight, reference_cells
from qlmctl.plan.policies import HeuristicPolicy
from qlmctl.plan.types import Plan, RecentArrivals
from tests.helpers import make_requests
from tests.test_plan_arrivals import busy_batch_queue, last_start


def placed(plan: Plan) -> list[list[str]]:
    return [[r for g in ip.groups for r in g.request_ids] for ip in plan.instances]


def test_foresight_plans_the_coming_window_as_look_ahead_plans_a_repeat() -> None:
    quiet = busy_batch_queue(0)  # nothing in the last 60 s
    coming = make_requests(600, gap_s=0.09, start_s=100.5, prefix="next-")  # within 60 s
    told = Foresight([*quiet.waiting, *coming]).plan(quiet, np.random.default_rng(0))
    seen = tuple(r.model_copy(update={"arrival_s": r.arrival_s - 60.0}) for r in coming)
    repeat = replace(quiet, recent=RecentArrivals(60.0, seen))
    same = HeuristicPolicy(look_ahead=True).plan(repeat, np.random.default_rng(0))
    assert placed(told) == placed(same)  # the times agree to rounding (shifted and back)
    assert abs(last_start(told) - last_start(same)) < 1e-6
    blind = HeuristicPolicy(look_ahead=True).plan(quiet, np.random.default_rng(0))
    assert last_start(told) > last_start(blind) + 5.0


def test_reference_cells_come_from_the_policy_sweep() -> None:
    cells = reference_cells(RESULTS / "estimator.json")
    assert len(cells) >= 4
    assert all(n >= 1 and load > 0 for _, n, load in cells)


def test_model_placement_tries_every_start_holding_both_models() -> None:
    from benchmarks.model_placement import label, starts

    models = ("llama-3.1-8b", "mistral-7b")
    every = starts(models, 4)
    assert len(every) == 2**4 - 2 == len(set(every))  # all but the two single-model ones
    assert all(set(p) == set(models) for p in every)
    assert label(("mistral-7b", "llama-3.1-8b")) == "ml"


def test_model_placement_without_its_sweep_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.model_placement import main

    assert main(["--sweep", str(tmp_path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--cells E-twomodels:4" in err
    assert list(tmp_path.iterdir()) == []  # nothing written
