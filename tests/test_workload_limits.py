"""Workload limits: clipping keeps the output the spec asks for, or fails in one line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from qlmctl.errors import BadInput
from qlmctl.workload import build, load_workload
from qlmctl.workload.spec import Limits
from qlmctl.workload.traces import UNKNOWN
from tests.test_workload_build import synthetic, write_spec


def test_clipping_that_cannot_keep_the_output_is_bad_input(tmp_path: Path) -> None:
    lengths = {
        "prompt_tokens": {"dist": "uniform", "low": 100, "high": 500},
        "output_tokens": {"dist": "uniform", "low": 400, "high": 600},
    }
    clip = {"max_output_tokens": 600, "max_total_tokens": 480, "over": "clip"}
    with pytest.raises(BadInput, match=r"a\.yaml: request s-\d+: its \d+ output tokens alone"):
        load_workload(write_spec(tmp_path, synthetic(lengths=lengths, limits=clip), "a.yaml"))
    # outputs of unknown length ask for max_output_tokens
    rows = build._Rows(
        row=np.arange(3), arrival_s=np.zeros(3), prompt_tokens=np.array([100, 470, 900]),
        output_tokens=np.full(3, UNKNOWN), prompts=None, absolute=False, first_s=0.0,
    )  # fmt: skip
    source = SimpleNamespace(name="s")
    with pytest.raises(BadInput, match=r"s-2: its 600 output tokens alone reach max_total"):
        build._apply_limits(Limits(**clip), source, rows, tmp_path / "b.yaml")  # type: ignore[arg-type]
    fits = Limits(**{**clip, "max_output_tokens": 300})
    kept = build._apply_limits(fits, source, rows, tmp_path / "b.yaml")  # type: ignore[arg-type]
    assert kept.prompt_tokens.tolist() == [100, 470, 180]  # only the one over is cut
