"""Fuzz: random workload specs, traces, profiles and cluster specs fed to the CLI.

Every outcome must be exit 0, or exactly one line on stderr with exit 2; never a
traceback, a hang or another code. Inputs are a valid file with a few fields replaced by
values drawn from the bad kinds users write (inf, NaN, huge, negative, wrong type) and
from sane ones, so both the refusals and the accepted paths run. Derandomized and
bounded (a few dozen examples per kind), so it runs in well under a minute.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlmctl import cli

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "qlmctl" / "profile" / "defaults" / "llama-3.1-8b@A100.json"
SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
INF = float("inf")
BAD = [INF, -INF, float("nan"), 0, -1, -(2**70), 1e300, 1e-300, 2**31, 2**63, 2**64, "x", None,
       True, [], {}]  # fmt: skip
GOOD = [1, 2, 5, 0.5, 3.0, 10, 100]
VALUES = st.sampled_from(BAD + GOOD)

WORKLOAD: dict[str, Any] = {
    "seed": 0,
    "models": ["llama-3.1-8b"],
    "sources": [
        {
            "name": "s",
            "arrivals": {"process": "gamma", "rate_per_s": 2.0, "cv": 2.0, "count": 20},
            "lengths": {
                "prompt_tokens": {"dist": "lognormal", "median": 50, "sigma": 1.0},
                "output_tokens": {"dist": "uniform", "low": 1, "high": 20},
            },
            "model": {"by": "fraction", "weights": {"llama-3.1-8b": 1.0}},
            "slo_class": "interactive",
        }
    ],
}
WORKLOAD_FIELDS = [
    ("seed",), ("target_rate_per_s",), ("time_scale",), ("window", "start_s"), ("window", "end_s"),
    ("limits", "max_output_tokens"), ("limits", "max_total_tokens"),
    ("slo_classes", 0, "ttft_s"), ("slo_classes", 0, "priority"), ("slo_classes", 0, "weight"),
    ("sources", 0, "start_s"), ("sources", 0, "sample_fraction"),
    ("sources", 0, "arrivals", "rate_per_s"), ("sources", 0, "arrivals", "cv"),
    ("sources", 0, "arrivals", "count"), ("sources", 0, "arrivals", "duration_s"),
    ("sources", 0, "lengths", "prompt_tokens", "median"),
    ("sources", 0, "lengths", "prompt_tokens", "sigma"),
    ("sources", 0, "lengths", "prompt_tokens", "max"),
    ("sources", 0, "lengths", "output_tokens", "high"),
    ("sources", 0, "model", "weights", "llama-3.1-8b"),
]  # fmt: skip
CLUSTER: dict[str, Any] = {
    "gpu_types": [{"name": "A100", "memory_gib": 80}],
    "models": [{"name": "llama-3.1-8b", "path": "x", "params_b": 8, "max_model_len": 4096}],
    "instances": [{"id": "a", "gpu": "A100", "launch": {"port": 8001}, "model": "llama-3.1-8b"}],
}
CLUSTER_FIELDS = [
    ("gpu_types", 0, "memory_gib"), ("models", 0, "params_b"), ("models", 0, "max_model_len"),
    ("instances", 0, "launch", "port"), ("instances", 0, "api_key_env"),
]  # fmt: skip


def mutate(base: dict[str, Any], fields: list[tuple[Any, ...]], data: st.DataObject) -> Any:
    """``base`` with 1-3 of ``fields`` set to drawn values (missing lists extended)."""
    doc = copy.deepcopy(base)
    doc.setdefault("slo_classes", [{"name": "interactive", "ttft_s": 20}])
    for path in data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3)):
        node = doc
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
        node[path[-1]] = data.draw(VALUES)
    return doc


def run_cli(*argv: str) -> tuple[int, list[str]]:
    """The console entry point in-process: (exit code, non-empty stderr lines)."""
    err, old = io.StringIO(), sys.argv
    sys.argv = ["qlmctl", *argv]
    code: int = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv = old
    return code, [line for line in err.getvalue().splitlines() if line.strip()]


def check(code: int, lines: list[str], what: Any) -> None:
    assert code == 0 or (code == 2 and len(lines) == 1), f"exit {code}, {lines} for {what}"


def write_yaml(folder: Path, name: str, doc: Any) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(doc))
    return path


@SETTINGS
@given(st.data())
def test_random_workload_specs(data: st.DataObject) -> None:
    doc = mutate(WORKLOAD, WORKLOAD_FIELDS, data)
    with tempfile.TemporaryDirectory() as tmp:
        check(*run_cli("workload", "show", str(write_yaml(Path(tmp), "w.yaml", doc))), doc)


TRACE_VALUES = st.one_of(VALUES, st.integers(-(2**65), 2**65), st.floats())


@SETTINGS
@given(st.lists(st.tuples(TRACE_VALUES, TRACE_VALUES, TRACE_VALUES), min_size=1, max_size=4))
def test_random_mooncake_traces(rows: list[tuple[Any, Any, Any]]) -> None:
    keys = ("timestamp", "input_length", "output_length")
    lines = [json.dumps(dict(zip(keys, row, strict=True))) for row in rows]
    doc = {"models": ["m"], "sources": [{"name": "s", "model": "m", "slo_class": "interactive",
           "trace": {"format": "mooncake", "path": "t.jsonl"}}]}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "t.jsonl").write_text("\n".join(lines) + "\n")
        check(*run_cli("workload", "show", str(write_yaml(Path(tmp), "w.yaml", doc))), lines)


@SETTINGS
@given(st.lists(st.tuples(TRACE_VALUES, TRACE_VALUES), min_size=1, max_size=4))
def test_random_length_csvs(rows: list[tuple[Any, Any]]) -> None:
    text = "num_prefill_tokens,num_decode_tokens\n" + "".join(f"{a},{b}\n" for a, b in rows)
    doc = copy.deepcopy(WORKLOAD)
    doc["sources"][0]["lengths"] = {"format": "csv", "path": "l.csv"}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "l.csv").write_text(text)
        check(*run_cli("workload", "show", str(write_yaml(Path(tmp), "w.yaml", doc))), text)


@SETTINGS
@given(st.data())
def test_random_profiles(data: st.DataObject) -> None:
    doc = json.loads(PROFILE.read_text())
    for key in data.draw(st.lists(st.sampled_from(sorted(doc)), min_size=1, max_size=3)):
        doc[key] = data.draw(st.one_of(VALUES, st.lists(VALUES, max_size=3)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.json"
        path.write_text(json.dumps(doc))
        check(*run_cli("profile", "show", str(path)), doc)


@SETTINGS
@given(st.data())
def test_random_cluster_specs(data: st.DataObject) -> None:
    doc = mutate(CLUSTER, CLUSTER_FIELDS, data)
    doc.pop("slo_classes")
    with tempfile.TemporaryDirectory() as tmp:
        check(*run_cli("cluster", "show", str(write_yaml(Path(tmp), "c.yaml", doc))), doc)
