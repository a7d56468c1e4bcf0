"""Trace importers: every format, and one clear BadInput naming file and line per problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qlmctl.errors import BadInput
from qlmctl.workload.datasets import installed_path
from qlmctl.workload.traces import UNKNOWN, read_trace
from tests.trace_data import azure_rows

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_azure_reads_absolute_times(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "a.csv",
        AZURE_HEADER + "2023-11-16 18:17:03.9799600,4808,10\n2023-11-16 18:17:05.4799600,31,8\n",
    )
    data = read_trace("azure", path)
    assert data.absolute
    assert data.arrival_s is not None
    assert data.arrival_s[1] - data.arrival_s[0] == pytest.approx(1.5)
    assert data.prompt_tokens.tolist() == [4808, 31]
    assert data.output_tokens.tolist() == [10, 8]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("TIMESTAMP,ContextTokens\n2023-11-16 18:17:03,5\n", r"missing column 'GeneratedTokens'"),
        (
            AZURE_HEADER + "2023-11-16 18:17:03,5,1\nyesterday,5,1\n",
            r"line 3: cannot parse TIMESTAMP",
        ),
        (
            AZURE_HEADER + "2023-11-16 18:17:03,5,1\n2023-11-16 18:17:04,0,1\n",
            r"line 3: ContextTokens",
        ),
        (
            AZURE_HEADER + "2023-11-16 18:17:03,5,-4\n",
            r"line 2: GeneratedTokens must be a positive",
        ),
        (AZURE_HEADER + "2023-11-16 18:17:03,5.5,4\n", r"line 2: ContextTokens"),
        (AZURE_HEADER + "2023-11-16 18:17:04,5,1\n2023-11-16 18:17:03,5,1\n", r"line 3: .*back in"),
        (AZURE_HEADER, r"no records"),
    ],
)
def test_azure_bad_input(tmp_path: Path, body: str, message: str) -> None:
    path = write(tmp_path, "bad.csv", body)
    with pytest.raises(BadInput, match=r"bad\.csv: " + message):
        read_trace("azure", path)


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="file not found"):
        read_trace("azure", tmp_path / "nope.csv")
    with pytest.raises(BadInput, match=r"unknown trace format 'excel'.*azure"):
        read_trace("excel", tmp_path / "nope.csv")


def test_mooncake_jsonl(tmp_path: Path) -> None:
    lines = [
        {"timestamp": 2500, "input_length": 10, "output_length": 3, "hash_ids": [1]},
        {"timestamp": 0, "input_length": 20, "output_length": 4},
    ]
    path = write(tmp_path, "m.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    data = read_trace("mooncake", path)
    assert data.arrival_s is not None and not data.absolute
    assert data.arrival_s.tolist() == [0.0, 2.5]  # sorted by time
    assert data.prompt_tokens.tolist() == [20, 10]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"timestamp": 1, "input_length": 5}', r"line 2: missing field 'output_length'"),
        ('{"timestamp": "x", "input_length": 5, "output_length": 1}', r"line 2: cannot parse"),
        ('{"timestamp": 1, "input_length": 0, "output_length": 1}', r"line 2: input_length"),
        ("{not json", r"line 2: malformed JSON"),
    ],
)
def test_mooncake_bad_input(tmp_path: Path, line: str, message: str) -> None:
    good = '{"timestamp": 0, "input_length": 5, "output_length": 1}'
    path = write(tmp_path, "m.jsonl", good + "\n" + line + "\n")
    with pytest.raises(BadInput, match=r"m\.jsonl: " + message):
        read_trace("mooncake", path)


def test_length_csv(tmp_path: Path) -> None:
    head = "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"
    path = write(tmp_path, "l.csv", head + "100,20,120,5\n7,3,10,2.3\n")
    data = read_trace("csv", path)
    assert data.arrival_s is None
    assert data.prompt_tokens.tolist() == [100, 7] and data.output_tokens.tolist() == [20, 3]
    bad = write(tmp_path, "bad.csv", head + "100,20,120,5\n7,0,7,0\n")
    with pytest.raises(BadInput, match=r"bad\.csv: line 3: num_decode_tokens"):
        read_trace("csv", bad)


def test_custom_and_sharegpt_carry_text(tmp_path: Path) -> None:
    custom = write(
        tmp_path,
        "c.jsonl",
        '{"prompt": "one two three four five six", "output_tokens": 12}\n{"prompt": "hi"}\n',
    )
    data = read_trace("custom", custom)
    assert data.prompts == ("one two three four five six", "hi")
    assert data.prompt_tokens.tolist() == [8, 1]  # 0.75 words per token, rounded
    assert data.output_tokens.tolist() == [12, UNKNOWN]
    share = [
        {
            "id": "a",
            "conversations": [
                {"from": "human", "value": "w " * 30},
                {"from": "gpt", "value": "x " * 15},
            ],
        },
        {"id": "b", "conversations": [{"from": "human", "value": "lonely"}]},
    ]
    data = read_trace("sharegpt", write(tmp_path, "s.json", json.dumps(share)))
    assert len(data) == 1 and data.prompt_tokens.tolist() == [40]
    assert data.output_tokens.tolist() == [20]
    with pytest.raises(BadInput, match=r"c2\.jsonl: line 1: output_tokens"):
        read_trace("custom", write(tmp_path, "c2.jsonl", '{"prompt": "x", "output_tokens": 0}\n'))


def test_real_conv_trace_is_sorted_and_complete() -> None:
    path = installed_path("azure-2023-conv")
    data = read_trace("azure", path)
    assert len(data) == len(azure_rows(path))
    assert data.arrival_s is not None and np.all(np.diff(data.arrival_s) >= 0)
