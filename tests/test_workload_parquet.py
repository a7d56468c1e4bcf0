"""The materialised workload: round trip, schema version, and refusing foreign files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qlmctl.errors import BadInput
from qlmctl.workload import WORKLOAD_VERSION, Workload, load_workload, write_workload
from qlmctl.workload.parquet import META_KEY, SCHEMA
from tests.helpers import SLO_CLASSES, make_requests


def small_workload() -> Workload:
    reqs = make_requests(5, model="m1") + make_requests(
        3, model="m2", slo_class="batch", prefix="b"
    )
    with_text = reqs[0].model_copy(update={"prompt": "hello there", "output_tokens": None})
    return Workload.from_requests([with_text, *reqs[1:]], SLO_CLASSES, "test")


def test_round_trip_keeps_requests_classes_and_fingerprint(tmp_path: Path) -> None:
    w = small_workload()
    path = tmp_path / "w.parquet"
    write_workload(w, path)
    back = load_workload(path)
    assert back.requests == w.requests
    assert back.slo_classes == w.slo_classes
    assert back.fingerprint == w.fingerprint
    assert back.models == {"m1", "m2"}
    assert not list(tmp_path.glob(".*tmp"))


def test_schema_and_version_metadata(tmp_path: Path) -> None:
    path = tmp_path / "w.parquet"
    write_workload(small_workload(), path)
    table = pq.read_table(path)
    assert table.schema.remove_metadata() == SCHEMA
    assert b'"version": 1' in table.schema.metadata[META_KEY]
    assert WORKLOAD_VERSION == 1
    assert table.column("output_tokens").null_count == 1


def test_fingerprint_changes_with_content() -> None:
    w = small_workload()
    moved = [r.model_copy(update={"arrival_s": r.arrival_s + 0.5}) for r in w.requests]
    assert Workload.from_requests(moved, SLO_CLASSES, "x").fingerprint != w.fingerprint


def test_foreign_or_future_files_are_bad_input(tmp_path: Path) -> None:
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1]}), plain)
    with pytest.raises(BadInput, match=r"plain\.parquet: not a qlmctl workload"):
        load_workload(plain)
    future = tmp_path / "future.parquet"
    write_workload(small_workload(), future)
    table = pq.read_table(future)
    meta = table.schema.metadata[META_KEY].replace(b'"version": 1', b'"version": 99')
    pq.write_table(table.replace_schema_metadata({META_KEY: meta}), future)
    with pytest.raises(BadInput, match=r"version 99 is not supported"):
        load_workload(future)
    garbage = tmp_path / "g.parquet"
    garbage.write_text("not parquet")
    with pytest.raises(BadInput, match=r"g\.parquet: not a readable Parquet"):
        load_workload(garbage)
    with pytest.raises(BadInput, match=r"expected a workload spec"):
        load_workload(tmp_path / "w.txt")


def test_bad_row_is_named(tmp_path: Path) -> None:
    path = tmp_path / "w.parquet"
    write_workload(small_workload(), path)
    table = pq.read_table(path)
    col = table.schema.get_field_index("prompt_tokens")
    values = table.column("prompt_tokens").to_pylist()
    values[2] = 0
    table = table.set_column(col, SCHEMA.field("prompt_tokens"), pa.array(values, pa.int32()))
    pq.write_table(table, path)
    with pytest.raises(BadInput, match=r"row 2: field 'prompt_tokens'"):
        load_workload(path)


def test_unknown_class_is_bad_input() -> None:
    reqs = make_requests(2, slo_class="gold")
    with pytest.raises(BadInput, match=r"unknown slo_class 'gold'"):
        Workload.from_requests(reqs, SLO_CLASSES, "x")
