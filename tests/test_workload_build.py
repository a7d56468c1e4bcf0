"""Building workloads from specs: synthetic sources, real Azure traces, seeds, time handling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from qlmctl.errors import BadInput
from qlmctl.workload import load_workload
from qlmctl.workload.datasets import installed_path
from tests.trace_data import azure_rows

REPO = Path(__file__).resolve().parents[1]


def write_spec(tmp_path: Path, spec: dict[str, Any], name: str = "w.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def synthetic(**overrides: Any) -> dict[str, Any]:
    """A one-source Poisson spec; ``overrides`` replace top-level or source fields."""
    source = {
        "name": "s",
        "arrivals": {"process": "poisson", "rate_per_s": 10.0, "duration_s": 200},
        "lengths": {
            "prompt_tokens": {"dist": "uniform", "low": 10, "high": 100},
            "output_tokens": {"dist": "lognormal", "median": 50, "sigma": 0.5, "max": 400},
        },
        "model": "m1",
        "slo_class": "interactive",
    }
    spec: dict[str, Any] = {"seed": 1, "models": ["m1", "m2"], "sources": [source]}
    for key, value in overrides.items():
        (source if key in source or key in ("start_s", "sample_fraction") else spec)[key] = value
    return spec


def arrivals(path: Path) -> np.ndarray:
    return np.array([r.arrival_s for r in load_workload(path).requests])


def test_poisson_rate_and_cv(tmp_path: Path) -> None:
    t = arrivals(write_spec(tmp_path, synthetic()))
    assert 1800 < len(t) < 2200  # 10/s for 200 s
    gaps = np.diff(t)
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.1
    assert np.all(gaps >= 0) and t.max() < 200


def test_gamma_is_bursty_and_keeps_its_rate(tmp_path: Path) -> None:
    spec = synthetic(arrivals={"process": "gamma", "rate_per_s": 5, "cv": 3, "count": 4000})
    t = arrivals(write_spec(tmp_path, spec))
    gaps = np.diff(t)
    assert len(t) == 4000
    assert 2.4 < gaps.std() / gaps.mean() < 3.6
    assert 4.0 < len(t) / t.max() < 6.0


def test_onoff_arrivals_fall_in_on_periods(tmp_path: Path) -> None:
    proc = {"process": "onoff", "on_rate_per_s": 20, "on_s": 5, "off_s": 15, "duration_s": 100}
    t = arrivals(write_spec(tmp_path, synthetic(arrivals=proc, start_s=3)))
    phase = (t - 3) % 20
    assert np.all(phase < 5)
    assert 400 < len(t) < 600  # 5 on-periods of 5 s at 20/s


def test_same_seed_same_workload_different_seed_different(tmp_path: Path) -> None:
    a = load_workload(write_spec(tmp_path, synthetic(seed=3), "a.yaml"))
    b = load_workload(write_spec(tmp_path, synthetic(seed=3), "b.yaml"))
    c = load_workload(write_spec(tmp_path, synthetic(seed=4), "c.yaml"))
    assert a.requests == b.requests and a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    assert [r.arrival_s for r in a.requests] != [r.arrival_s for r in c.requests]


def test_fraction_assignment_is_exact(tmp_path: Path) -> None:
    spec = synthetic(
        model={"by": "fraction", "weights": {"m1": 0.7, "m2": 0.3}},
        slo_class={"by": "fraction", "weights": {"batch-1": 1, "batch-2": 3}},
        arrivals={"process": "poisson", "rate_per_s": 10, "count": 1000},
    )
    w = load_workload(write_spec(tmp_path, spec))
    models = [r.model for r in w.requests]
    classes = [r.slo_class for r in w.requests]
    assert models.count("m1") == 700 and models.count("m2") == 300
    assert classes.count("batch-1") == 250 and classes.count("batch-2") == 750
    assert w.models == {"m1", "m2"}


def test_hash_assignment_is_stable_across_seeds_and_independent_per_field(tmp_path: Path) -> None:
    rule = {"by": "hash", "weights": {"m1": 1, "m2": 1}}
    cls = {"by": "hash", "weights": {"batch-1": 1, "batch-2": 1}}
    spec_a = synthetic(seed=1, model=rule, slo_class=cls)
    spec_b = synthetic(seed=2, model=rule, slo_class=cls)
    a = {r.id: r for r in load_workload(write_spec(tmp_path, spec_a, "a.yaml")).requests}
    b = {r.id: r for r in load_workload(write_spec(tmp_path, spec_b, "b.yaml")).requests}
    common = set(a) & set(b)
    assert len(common) > 1000
    assert all(a[i].model == b[i].model and a[i].slo_class == b[i].slo_class for i in common)
    pairs = [(a[i].model, a[i].slo_class) for i in common]
    assert len(set(pairs)) == 4  # model and class hashes are not the same draw
    share = sum(m == "m1" for m, _ in pairs) / len(pairs)
    assert 0.45 < share < 0.55


def test_window_and_target_rate(tmp_path: Path) -> None:
    spec = synthetic(window={"start_s": 50, "end_s": 150}, target_rate_per_s=40.0)
    w = load_workload(write_spec(tmp_path, spec))
    n = len(w.requests)
    assert 850 < n < 1150  # 100 s of a 10/s stream
    # 100 s of window squeezed to reach 40/s: the window now lasts n / 40 s
    assert w.duration_s <= n / 40.0
    assert w.requests[0].arrival_s >= 0


def test_time_scale_stretches_arrivals(tmp_path: Path) -> None:
    base = arrivals(write_spec(tmp_path, synthetic(), "a.yaml"))
    slow = arrivals(write_spec(tmp_path, synthetic(time_scale=2.0), "b.yaml"))
    np.testing.assert_allclose(slow, base * 2.0)


def test_limits_clip_and_drop(tmp_path: Path) -> None:
    lengths = {
        "prompt_tokens": {"dist": "uniform", "low": 100, "high": 500},
        "output_tokens": {"dist": "uniform", "low": 1, "high": 300},
    }
    clip = {"max_output_tokens": 200, "max_total_tokens": 480, "over": "clip"}
    w = load_workload(write_spec(tmp_path, synthetic(lengths=lengths, limits=clip), "a.yaml"))
    assert all(r.prompt_tokens + r.max_output_tokens <= 480 for r in w.requests)
    assert all(r.max_output_tokens <= 200 for r in w.requests)
    # the output the spec asks for (at most max_output_tokens) is kept; prompts shrink
    free = {"max_output_tokens": 200}
    raw = load_workload(write_spec(tmp_path, synthetic(lengths=lengths, limits=free), "r.yaml"))
    assert [r.id for r in raw.requests] == [r.id for r in w.requests]
    pairs = list(zip(raw.requests, w.requests, strict=True))
    assert all(c.output_tokens == r.output_tokens for r, c in pairs)
    clipped = [(r, c) for r, c in pairs if c.prompt_tokens < r.prompt_tokens]
    assert len(clipped) > 10
    assert all(c.prompt_tokens + c.output_tokens == 480 for _, c in clipped)
    assert all(c.prompt is None for _, c in clipped)
    drop = {**clip, "over": "drop"}
    d = load_workload(write_spec(tmp_path, synthetic(lengths=lengths, limits=drop), "b.yaml"))
    assert 0 < len(d.requests) < len(w.requests)
    assert all(r.prompt_tokens + r.target_output_tokens <= 480 for r in d.requests)
    with pytest.raises(BadInput, match=r"b\.yaml.*request s-\d+.*limits"):
        load_workload(
            write_spec(
                tmp_path, synthetic(lengths=lengths, limits={**clip, "over": "error"}), "b.yaml"
            )
        )


def test_sample_fraction_thins_deterministically(tmp_path: Path) -> None:
    full = load_workload(write_spec(tmp_path, synthetic(), "a.yaml"))
    half = load_workload(write_spec(tmp_path, synthetic(sample_fraction=0.5), "b.yaml"))
    assert 0.4 < len(half.requests) / len(full.requests) < 0.6


def test_empty_window_is_bad_input(tmp_path: Path) -> None:
    spec = synthetic(window={"start_s": 500, "end_s": 600})
    with pytest.raises(BadInput, match=r"w\.yaml.*window.*holds no requests"):
        load_workload(write_spec(tmp_path, spec))


def test_unknown_names_are_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"sources\[0\]\.model: unknown name 'm9'"):
        load_workload(write_spec(tmp_path, synthetic(model="m9")))
    with pytest.raises(BadInput, match=r"slo_class: unknown name 'gold'"):
        load_workload(
            write_spec(tmp_path, synthetic(slo_class={"by": "hash", "weights": {"gold": 1}}))
        )


def test_default_slo_classes_are_qlm_paper_values(tmp_path: Path) -> None:
    w = load_workload(write_spec(tmp_path, synthetic()))
    assert {k: c.ttft_s for k, c in w.slo_classes.items()} == {
        "interactive": 20,
        "batch-1": 60,
        "batch-2": 3600,
    }


def test_azure_conv_rate_and_lengths() -> None:
    w = load_workload(REPO / "workloads" / "azure-conv.yaml")
    rows = azure_rows(installed_path("azure-2023-conv"))
    assert len(w.requests) == len(rows)
    assert w.duration_s == pytest.approx((rows[-1][0] - rows[0][0]).total_seconds(), abs=1e-5)
    assert w.requests[0].arrival_s == 0.0
    assert (w.requests[0].prompt_tokens, w.requests[0].output_tokens) == rows[0][1:]
    assert all(r.prompt is None for r in w.requests[:100])


def test_azure_traces_share_one_clock(tmp_path: Path) -> None:
    spec = {
        "models": ["m1"],
        "sources": [
            {"name": n, "trace": {"dataset": f"azure-2023-{n}"}, "model": "m1", "slo_class": c}
            for n, c in (("code", "interactive"), ("conv", "batch-1"))
        ],
    }
    w = load_workload(write_spec(tmp_path, spec))
    first_code = min(r.arrival_s for r in w.requests if r.id.startswith("code-"))
    code, conv = (azure_rows(installed_path(f"azure-2023-{n}")) for n in ("code", "conv"))
    # conv starts first (the real files: 18:15:46.68059 and 18:17:03.97996)
    assert first_code == pytest.approx((code[0][0] - conv[0][0]).total_seconds(), abs=1e-5)
    assert first_code > 0
    assert len(w.requests) == len(code) + len(conv)


def test_azure_window_scaled_to_target_rate(tmp_path: Path) -> None:
    spec = {
        "models": ["m1"],
        "window": {"start_s": 600, "end_s": 1200},
        "target_rate_per_s": 2.0,
        "sources": [
            {
                "name": "conv",
                "trace": {"format": "azure", "path": str(installed_path("azure-2023-conv"))},
                "model": "m1",
                "slo_class": "batch-1",
            }
        ],
    }
    w = load_workload(write_spec(tmp_path, spec))
    duration = len(w.requests) / 2.0
    assert w.duration_s == pytest.approx(duration, rel=0.02)


def test_lengths_from_a_dataset_and_stored_prompts(tmp_path: Path) -> None:
    rows = [{"prompt": "alpha beta gamma delta", "output_tokens": 9}, {"prompt": "one two three"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec = synthetic(
        lengths={"format": "custom", "path": "d.jsonl"},
        arrivals={"process": "poisson", "rate_per_s": 1, "count": 50},
        prompts={"store": True},
        limits={"max_output_tokens": 30},
    )
    w = load_workload(write_spec(tmp_path, spec))
    texts = {r.prompt for r in w.requests}
    assert texts == {"alpha beta gamma delta", "one two three"}
    unknown = [r for r in w.requests if r.prompt == "one two three"]
    assert all(r.output_tokens is None and r.target_output_tokens == 30 for r in unknown)


def test_stored_prompts_are_generated_when_lengths_only(tmp_path: Path) -> None:
    spec = synthetic(
        prompts={"store": True}, arrivals={"process": "poisson", "rate_per_s": 1, "count": 20}
    )
    w = load_workload(write_spec(tmp_path, spec))
    assert all(
        r.prompt and len(r.prompt.split()) == round(r.prompt_tokens * 0.75) for r in w.requests
    )


def test_missing_trace_names_spec_source_and_file(tmp_path: Path) -> None:
    spec = synthetic(lengths={"format": "csv", "path": "lengths/nope.csv"})
    with pytest.raises(
        BadInput, match=r"w\.yaml: sources\[0\] \(s\): .*lengths/nope\.csv: file not"
    ):
        load_workload(write_spec(tmp_path, spec))
