"""The run log: what happened to every request attempt and every serving operation.

A run is a directory ``RUN/`` holding

* ``run.json``: schema version, run id, policy, engine, workload fingerprint, config;
  at the end the duration, the speed the profiles were calibrated to
  (``speed_factors``: observed / profiled step time per ``model@gpu``) and the policy's
  wall-clock solve time (``solver_wall_s``);
* ``requests.parquet``: one row per request *attempt* (an evicted request that is
  re-queued and finishes elsewhere has two rows: ``evicted`` then ``finished``). An
  evicted request keeps its output (evict-and-resume): the evicted row's ``kept_tokens``
  is what the next attempt resumes after, that attempt's ``resumed_tokens``; its
  ``output_tokens`` count the whole output so far and ``cached_tokens`` the prompt tokens
  (original prompt plus resumed output) the engine's prefix cache served; and the
  first forecast made for the attempt (``predicted_*``: dispatch, miss probability,
  first token and finish with their 90th percentiles; see
  :class:`~qlmctl.serve.state.Forecast`);
* ``operations.parquet``: swaps, wakes, sleeps, evictions, re-plans (solver stats in
  ``detail`` as JSON), instances going down or up. A simulated run's re-plans carry no
  wall-clock time (``duration_s`` null, no ``build_s``/``solve_s`` in ``detail``), so its
  two Parquet files depend only on its inputs and seed, byte for byte.

Rows are written incrementally: every flush writes a numbered part file under
``RUN/parts/``; :meth:`RunLogWriter.close` merges the parts into the two files above and
removes them. Pending rows are flushed by count and by time (``flush_interval_s``, checked
whenever rows are added or the driver calls :meth:`RunLogWriter.maybe_flush`), so a
``kill -9`` loses about half a second of rows (more if the driver's loop is starved of
CPU, since rows exist only once the core has heard of the event). After a crash
``run.json`` says
``"complete": false`` (and ``"parts": "parts"``, where the rows are) and :func:`read_run`
reads every flushed part. ``run.json`` is standard JSON: infinite or NaN values are
written as null.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from qlmctl.errors import BadInput
from qlmctl.fileio import atomic_path, atomic_write_text

RUNLOG_VERSION = 1


class Outcome(StrEnum):
    """How one attempt ended: the ``outcome`` column (its values are these strings).

    Exactly one attempt per request ends in a final outcome.
    """

    FINISHED = "finished"  # completed; slo_met says whether in time
    EVICTED = "evicted"  # aborted by the planner and re-queued (not final)
    FAILED = "failed"  # the engine failed it; re-queued if retries remain, else final
    REJECTED = "rejected"  # the server refused it (HTTP 4xx): final, never retried
    CANCELLED = "cancelled"  # the run stopped (Ctrl-C) before it finished: final


# always final (FAILED is final only on a request's last attempt)
FINAL_OUTCOMES = frozenset({Outcome.FINISHED, Outcome.REJECTED, Outcome.CANCELLED})

REQUESTS_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("attempt", pa.int32()),  # 0 for the first dispatch, +1 per re-queue
        ("model", pa.string()),
        ("slo_class", pa.string()),
        ("instance_id", pa.string()),  # null if never dispatched
        ("priority", pa.int32()),  # vLLM priority sent with the request
        ("arrival_s", pa.float64()),
        ("dispatch_s", pa.float64()),  # null if never dispatched
        ("first_token_s", pa.float64()),  # null if no token arrived
        ("finish_s", pa.float64()),  # end of the attempt, whatever its outcome
        ("prompt_tokens", pa.int32()),
        ("output_tokens", pa.int32()),  # the request's output at the end of this attempt
        ("target_output_tokens", pa.int32()),
        ("ttft_slo_s", pa.float64()),
        ("e2e_slo_s", pa.float64()),  # null if the class has none
        ("tpot_s", pa.float64()),  # mean time per output token after the first
        ("itl_max_s", pa.float64()),  # longest gap between two streamed chunks (RealOptions)
        ("slo_met", pa.bool_()),  # TTFT (and e2e if set) within target; false unless finished
        ("outcome", pa.string()),  # an Outcome value
        ("reason", pa.string()),  # why it was evicted, failed, rejected or cancelled
        ("predicted_start_s", pa.float64()),  # first forecast of dispatch in this attempt
        ("predicted_miss_prob", pa.float64()),
        # evict-and-resume (columns added in place of a new version: null in older logs)
        (
            "resumed_tokens",
            pa.int32(),
        ),  # output tokens kept from earlier attempts (in output_tokens)
        ("kept_tokens", pa.int32()),  # re-queued attempt: output tokens the next one resumes after
        ("cached_tokens", pa.int32()),  # prompt tokens the prefix cache served (if reported)
        # the first forecast's first token and finish (median, 90th percentile; null where
        # none was made; added in place: null in older logs)
        ("predicted_first_token_s", pa.float64()),
        ("predicted_first_token_p90_s", pa.float64()),
        ("predicted_finish_s", pa.float64()),
        ("predicted_finish_p90_s", pa.float64()),
    ]
)

OPERATIONS_SCHEMA = pa.schema(
    [
        ("time_s", pa.float64()),
        ("kind", pa.string()),  # swap | wake | sleep | evict | replan | instance_down | instance_up
        ("instance_id", pa.string()),
        ("model", pa.string()),  # model loaded (swap, wake) or of the evicted request
        ("from_model", pa.string()),
        ("request_id", pa.string()),
        ("duration_s", pa.float64()),  # swap/wake time; replan: solver wall time (real runs)
        ("detail", pa.string()),  # JSON: solver stats, reasons
    ]
)

_TABLES = {"requests": REQUESTS_SCHEMA, "operations": OPERATIONS_SCHEMA}


class OperationLog:
    """Operation rows (``OPERATIONS_SCHEMA``) made since they were last taken, and a
    count of every kind so far."""

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()  # kind -> operations so far

    def add(
        self,
        now_s: float,
        kind: str,
        instance_id: str | None = None,
        model: str | None = None,
        from_model: str | None = None,
        *,
        request_id: str | None = None,
        duration_s: float | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """One operation at ``now_s`` (``detail`` is stored as JSON with sorted keys)."""
        self.counts[kind] += 1
        self._rows.append(
            {
                "time_s": now_s,
                "kind": kind,
                "instance_id": instance_id,
                "model": model,
                "from_model": from_model,
                "request_id": request_id,
                "duration_s": duration_s,
                "detail": json.dumps(detail, sort_keys=True, default=str) if detail else None,
            }
        )

    def take(self) -> list[dict[str, Any]]:
        """The rows added since the last call."""
        rows, self._rows = self._rows, []
        return rows


@dataclass(frozen=True)
class RunLog:
    """A run read back: its metadata and its two tables."""

    path: Path
    meta: dict[str, Any]
    requests: pd.DataFrame
    operations: pd.DataFrame
    complete: bool  # False if recovered from parts after a crash

    @property
    def final_attempts(self) -> pd.DataFrame:
        """One row per request: the attempt that ended it (or its last one)."""
        return self.requests.sort_values(["request_id", "attempt"]).groupby("request_id").tail(1)


class RunLogWriter:
    """Appends rows and flushes them to part files; ``close`` makes the final files.

    Use as a context manager; rows are dicts keyed by the schema's column names
    (missing columns are null).
    """

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        flush_every: int = 1000,
        flush_interval_s: float = 0.5,
    ) -> None:
        self.path = Path(path)
        self._parts = self.path / "parts"
        if self.path.exists() and any(self.path.iterdir()):
            raise BadInput(f"{self.path}: run directory exists and is not empty")
        try:
            self._parts.mkdir(parents=True, exist_ok=True)
            self._meta = {"version": RUNLOG_VERSION, **meta, "complete": False, "parts": "parts"}
            self._write_meta()
        except OSError as exc:
            raise BadInput(f"{self.path}: cannot create the run log ({exc})") from None
        self._pending: dict[str, list[dict[str, Any]]] = {name: [] for name in _TABLES}
        self._num_parts = 0
        self._flush_every = flush_every
        self._flush_interval_s = flush_interval_s
        self._last_flush = time.monotonic()
        self.closed = False

    def add_attempt(self, row: dict[str, Any]) -> None:
        """Record one request attempt (see ``REQUESTS_SCHEMA``)."""
        self._add("requests", row)

    def add_operation(self, row: dict[str, Any]) -> None:
        """Record one serving operation (see ``OPERATIONS_SCHEMA``)."""
        self._add("operations", row)

    def maybe_flush(self) -> None:
        """Flush if rows have waited ``flush_interval_s`` (drivers call it every loop)."""
        if time.monotonic() - self._last_flush >= self._flush_interval_s:
            self.flush()

    def flush(self) -> None:
        """Write pending rows to new part files."""
        self._last_flush = time.monotonic()
        for name, rows in self._pending.items():
            if rows:
                table = pa.Table.from_pylist(rows, schema=_TABLES[name])
                with atomic_path(self._parts / f"{name}-{self._num_parts:05d}.parquet") as tmp:
                    pq.write_table(table, tmp)
                self._num_parts += 1
                rows.clear()

    def close(self, **extra_meta: Any) -> None:
        """Flush, merge parts into the final files, mark the run complete."""
        if self.closed:
            return
        self.flush()
        for name, schema in _TABLES.items():
            # one chunk per column: the bytes must not depend on when parts were flushed
            table = _read_parts(self._parts, name, schema).combine_chunks()
            with atomic_path(self.path / f"{name}.parquet") as tmp:
                pq.write_table(table, tmp)
        shutil.rmtree(self._parts)
        self._meta.pop("parts", None)
        self._meta.update(extra_meta, complete=True)
        self._write_meta()
        self.closed = True

    def __enter__(self) -> RunLogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add(self, name: str, row: dict[str, Any]) -> None:
        if self.closed:
            raise RuntimeError("can't add rows to a closed run log")
        self._pending[name].append(row)
        if len(self._pending[name]) >= self._flush_every:
            self.flush()
        else:
            self.maybe_flush()

    def _write_meta(self) -> None:
        text = json.dumps(finite_json(self._meta), indent=1, default=str, allow_nan=False)
        atomic_write_text(self.path / "run.json", text)


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (standard JSON has no inf)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def read_run(path: Path) -> RunLog:
    """Read a run directory (complete, or recovered from flushed parts after a crash)."""
    path = Path(path)
    meta_path = path / "run.json"
    if not meta_path.is_file():
        raise BadInput(f"{path}: not a run directory (no run.json)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadInput(f"{meta_path}: malformed ({exc.msg})") from None
    if meta.get("version") != RUNLOG_VERSION:
        raise BadInput(
            f"{path}: run log version {meta.get('version')!r} is not supported "
            f"(this qlmctl reads version {RUNLOG_VERSION})"
        )
    tables = {}
    for name, schema in _TABLES.items():
        final = path / f"{name}.parquet"
        try:
            if final.is_file():
                table = pq.read_table(final, schema=schema)
            else:
                table = _read_parts(path / "parts", name, schema)
        except (pa.ArrowInvalid, OSError) as exc:
            raise BadInput(f"{path}: cannot read the {name} table ({exc})") from None
        tables[name] = table.to_pandas()
    return RunLog(path, meta, tables["requests"], tables["operations"], bool(meta.get("complete")))


def _read_parts(parts: Path, name: str, schema: pa.Schema) -> pa.Table:
    files: Iterable[Path] = sorted(parts.glob(f"{name}-*.parquet")) if parts.is_dir() else []
    tables = [pq.read_table(f, schema=schema) for f in files]
    return pa.concat_tables(tables) if tables else schema.empty_table()
