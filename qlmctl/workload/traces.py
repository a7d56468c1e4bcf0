"""Importers for real traces and length datasets, all into one columnar :class:`TraceData`.

Formats (a registry: format name -> reader):

* ``azure``: Azure LLM inference trace 2023 CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``);
  arrivals are absolute (epoch seconds) so several Azure files share one wall clock.
* ``mooncake``: JSONL with ``timestamp`` (ms from the trace start), ``input_length``,
  ``output_length``.
* ``csv``: length-only CSV (``num_prefill_tokens,num_decode_tokens``), no arrivals.
* ``sharegpt``: ShareGPT JSON (``conversations``: first human turn is the prompt, the
  next turn the reference output), no arrivals.
* ``custom``: ``vllm bench`` custom JSONL (``prompt``, optional ``output_tokens``).

:func:`sniff_format` tells the format of a file from its header (CSV), first record
(JSONL) or suffix (``.json``: ShareGPT).

Rules: every problem is one :class:`BadInput` naming the file and the line (1-based,
the CSV header is line 1) or field. Token lengths must be positive; an unknown output
length is stored as 0 (``UNKNOWN``). Texts are sized with :func:`count_tokens`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qlmctl.domain import INT32_MAX
from qlmctl.errors import BadInput
from qlmctl.workload.prompts import count_tokens

UNKNOWN = 0  # output_tokens value meaning "the trace does not know"


@dataclass(frozen=True)
class TraceData:
    """Columns of one imported file; row ``i`` is the file's ``i``-th record."""

    prompt_tokens: np.ndarray  # int64, > 0
    output_tokens: np.ndarray  # int64, > 0 or UNKNOWN
    arrival_s: np.ndarray | None = None  # float64, non-decreasing; None for length data
    absolute: bool = False  # arrival_s are epoch seconds (share a wall clock)
    prompts: tuple[str, ...] | None = None  # real prompt text, when the file has it

    def __len__(self) -> int:
        return len(self.prompt_tokens)


def read_trace(fmt: str, path: Path, tokenizer_dir: Path | None = None) -> TraceData:
    """Read ``path`` in format ``fmt``; :class:`BadInput` on any problem."""
    try:
        reader = READERS[fmt]
    except KeyError:
        raise BadInput(f"{path}: unknown trace format {fmt!r} (known: {sorted(READERS)})") from None
    if not path.is_file():
        raise BadInput(f"{path}: file not found")
    data = reader(path, tokenizer_dir)
    if len(data) == 0:
        raise BadInput(f"{path}: no records")
    return data


def sniff_format(path: Path) -> str:
    """The format of ``path`` from its first line; :class:`BadInput` if it is not clear."""
    if path.suffix == ".json":
        return "sharegpt"
    try:
        with path.open(encoding="utf-8") as f:
            first = next((line.strip() for line in f if line.strip()), "")
    except FileNotFoundError:
        raise BadInput(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: cannot read ({exc})") from None
    try:
        record = json.loads(first) if first.startswith("{") else None
    except json.JSONDecodeError:
        record = None
    keys = set(record) if isinstance(record, dict) else {c.strip() for c in first.split(",")}
    for fmt, needed in SIGNATURES.items():
        if needed <= keys:
            return fmt
    raise BadInput(
        f"{path}: cannot tell the trace format from its first line {first[:80]!r}; "
        f"give --format ({', '.join(READERS)})"
    )


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise BadInput(f"{path}: cannot read CSV ({str(exc).strip()})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise BadInput(f"{path}: missing column {missing[0]!r} (has: {list(frame.columns)})")
    return frame


def _lengths(path: Path, values: Any, field: str, line_of: Callable[[int], int]) -> np.ndarray:
    """Positive integer token counts; ``BadInput`` naming the first bad line."""
    num = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float)
    bad = ~((num > 0) & (num <= INT32_MAX)) | (num != np.round(num))
    if bad.any():
        i = int(np.argmax(bad))
        raise BadInput(
            f"{path}: line {line_of(i)}: {field} must be a positive integer <= {INT32_MAX}, "
            f"got {values[i]!r}"
        )
    return num.astype(np.int64)


def _csv_line(i: int) -> int:
    return i + 2  # the header is line 1


def _column_lengths(path: Path, frame: pd.DataFrame, column: str) -> np.ndarray:
    return _lengths(path, frame[column].to_numpy(), column, _csv_line)


def _azure(path: Path, _tok: Path | None) -> TraceData:
    frame = _read_csv(path, ["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
    stamps = pd.to_datetime(frame["TIMESTAMP"], format="ISO8601", errors="coerce")
    if stamps.isna().any():
        i = int(np.argmax(stamps.isna().to_numpy()))
        raise BadInput(
            f"{path}: line {i + 2}: cannot parse TIMESTAMP {frame['TIMESTAMP'].iloc[i]!r}"
        )
    arrival = stamps.to_numpy(dtype="datetime64[ns]").astype(np.int64) / 1e9
    _check_sorted(path, arrival)
    return TraceData(
        prompt_tokens=_column_lengths(path, frame, "ContextTokens"),
        output_tokens=_column_lengths(path, frame, "GeneratedTokens"),
        arrival_s=arrival,
        absolute=True,
    )


def _length_csv(path: Path, _tok: Path | None) -> TraceData:
    frame = _read_csv(path, ["num_prefill_tokens", "num_decode_tokens"])
    return TraceData(
        prompt_tokens=_column_lengths(path, frame, "num_prefill_tokens"),
        output_tokens=_column_lengths(path, frame, "num_decode_tokens"),
    )


def _jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: cannot read ({exc})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(f"{path}: line {n}: malformed JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise BadInput(f"{path}: line {n}: expected a JSON object")
        records.append({**record, "_line": n})
    return records


def _field(path: Path, records: list[dict[str, Any]], key: str) -> list[Any]:
    for r in records:
        if key not in r:
            raise BadInput(f"{path}: line {r['_line']}: missing field {key!r}")
    return [r[key] for r in records]


def _mooncake(path: Path, _tok: Path | None) -> TraceData:
    records = _jsonl(path)
    lines = [r["_line"] for r in records]
    stamps = _field(path, records, "timestamp")
    arrival = pd.to_numeric(pd.Series(stamps), errors="coerce").to_numpy(dtype=float) / 1000.0
    bad = ~np.isfinite(arrival) | (arrival < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise BadInput(f"{path}: line {lines[i]}: cannot parse timestamp {stamps[i]!r}")
    order = np.argsort(arrival, kind="stable")
    prompt = _record_lengths(path, records, "input_length")
    output = _record_lengths(path, records, "output_length")
    return TraceData(prompt[order], output[order], arrival_s=arrival[order])


def _record_lengths(path: Path, records: list[dict[str, Any]], key: str) -> np.ndarray:
    return _lengths(path, _field(path, records, key), key, lambda i: records[i]["_line"])


def _texts(prompts: list[str], outputs: list[str | int | None], tok: Path | None) -> TraceData:
    """Lengths of texts (an int output is a known length, None an unknown one)."""
    prompt_tokens = np.array([count_tokens(p, tok) for p in prompts], dtype=np.int64)
    output_tokens = np.array(
        [o if isinstance(o, int) else count_tokens(o, tok) if o else UNKNOWN for o in outputs],
        dtype=np.int64,
    )
    return TraceData(
        prompt_tokens=np.maximum(prompt_tokens, 1),
        output_tokens=output_tokens,
        prompts=tuple(prompts),
    )


def _custom(path: Path, tok: Path | None) -> TraceData:
    records = _jsonl(path)
    prompts = _field(path, records, "prompt")
    outputs: list[str | int | None] = []
    for r, p in zip(records, prompts, strict=True):
        out = r.get("output_tokens")
        if not isinstance(p, str) or not p.strip():
            raise BadInput(f"{path}: line {r['_line']}: 'prompt' must be non-empty text")
        if out is not None and (not isinstance(out, int) or isinstance(out, bool) or out <= 0):
            raise BadInput(f"{path}: line {r['_line']}: output_tokens must be a positive integer")
        outputs.append(out)
    return _texts(prompts, outputs, tok)


def _sharegpt(path: Path, tok: Path | None) -> TraceData:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: cannot read ShareGPT JSON ({exc})") from None
    if not isinstance(data, list):
        raise BadInput(f"{path}: expected a JSON list of conversations")
    prompts: list[str] = []
    outputs: list[str | int | None] = []
    for i, entry in enumerate(data):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue  # like vllm bench: skip conversations without a reply
        first, reply = turns[0], turns[1]
        if not (isinstance(first, dict) and isinstance(reply, dict)):
            raise BadInput(f"{path}: entry {i}: turns must be objects with 'value'")
        text = first.get("value")
        if isinstance(text, str) and text.strip():
            prompts.append(text)
            outputs.append(reply.get("value") or None)
    return _texts(prompts, outputs, tok)


def _check_sorted(path: Path, arrival: np.ndarray) -> None:
    back = np.diff(arrival) < 0
    if back.any():
        line = _csv_line(int(np.argmax(back)) + 1)
        raise BadInput(f"{path}: line {line}: TIMESTAMP goes back in time")


# format -> the header columns (CSV) or record keys (JSONL) that identify it
SIGNATURES: dict[str, set[str]] = {
    "azure": {"TIMESTAMP", "ContextTokens", "GeneratedTokens"},
    "mooncake": {"timestamp", "input_length", "output_length"},
    "csv": {"num_prefill_tokens", "num_decode_tokens"},
    "custom": {"prompt"},
}

READERS: dict[str, Callable[[Path, Path | None], TraceData]] = {
    "azure": _azure,
    "mooncake": _mooncake,
    "csv": _length_csv,
    "sharegpt": _sharegpt,
    "custom": _custom,
}
