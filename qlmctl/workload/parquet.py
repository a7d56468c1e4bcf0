"""The materialised workload: one Parquet file with a documented, versioned schema.

Schema version 1 (one row per request, sorted by ``arrival_s`` then ``request_id``):

==================  =======  =========================================================
column              type     meaning
==================  =======  =========================================================
request_id          string   unique id, ``<source>-<row>``
arrival_s           float64  seconds from the workload start
model               string   model name (the cluster spec maps it to weights)
slo_class           string   SLO class name (defined in the metadata)
prompt_tokens       int32    prompt length in tokens
max_output_tokens   int32    cap sent to the engine (``max_tokens``)
output_tokens       int32    true output length when known, else null
prompt              string   prompt text, or null: generate with ``prompt_for``
==================  =======  =========================================================

File metadata key ``qlmctl.workload`` holds JSON: ``version`` (1), ``slo_classes``
(list of SLOClass fields), ``source`` (the spec it was built from) and ``fingerprint``
(see :mod:`qlmctl.workload.model`; recomputed on read). Writes go to a temp file that is
renamed into place, so a failed build leaves nothing half-written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from qlmctl.domain import Request, SLOClass
from qlmctl.errors import BadInput
from qlmctl.fileio import atomic_path
from qlmctl.specs import describe_validation_error
from qlmctl.workload.model import WORKLOAD_VERSION, Workload

META_KEY = b"qlmctl.workload"

SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("arrival_s", pa.float64()),
        ("model", pa.string()),
        ("slo_class", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("max_output_tokens", pa.int32()),
        ("output_tokens", pa.int32()),
        ("prompt", pa.string()),
    ]
)


def write_workload(workload: Workload, path: Path) -> None:
    """Write ``workload`` to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    reqs = workload.requests
    columns = {
        "request_id": [r.id for r in reqs],
        "arrival_s": [r.arrival_s for r in reqs],
        "model": [r.model for r in reqs],
        "slo_class": [r.slo_class for r in reqs],
        "prompt_tokens": [r.prompt_tokens for r in reqs],
        "max_output_tokens": [r.max_output_tokens for r in reqs],
        "output_tokens": [r.output_tokens for r in reqs],
        "prompt": [r.prompt for r in reqs],
    }
    meta = {
        "version": WORKLOAD_VERSION,
        "slo_classes": [c.model_dump(mode="json") for c in workload.slo_classes.values()],
        "source": workload.source,
        "fingerprint": workload.fingerprint,
    }
    table = pa.table(columns, schema=SCHEMA.with_metadata({META_KEY: json.dumps(meta)}))
    try:
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
    except OSError as exc:
        raise BadInput(f"{path}: cannot write ({exc})") from None


def read_workload(path: Path) -> Workload:
    """Read a materialised workload; :class:`BadInput` naming the file, row or field."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: file not found")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise BadInput(f"{path}: not a readable Parquet file ({exc})") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise BadInput(f"{path}: not a qlmctl workload (no {META_KEY.decode()!r} metadata)")
    meta = json.loads(raw)
    if meta.get("version") != WORKLOAD_VERSION:
        raise BadInput(
            f"{path}: workload schema version {meta.get('version')!r} is not supported "
            f"(this qlmctl reads version {WORKLOAD_VERSION})"
        )
    missing = [n for n in SCHEMA.names if n not in table.column_names]
    if missing:
        raise BadInput(f"{path}: missing column {missing[0]!r}")
    try:
        classes = [SLOClass.model_validate(c) for c in meta["slo_classes"]]
    except (KeyError, TypeError, ValidationError) as exc:
        raise BadInput(f"{path}: bad slo_classes metadata ({exc})") from None
    cols = {n: table.column(n).to_pylist() for n in SCHEMA.names}
    requests = []
    for i, values in enumerate(zip(*cols.values(), strict=True)):
        fields = dict(zip(cols, values, strict=True))
        fields["id"] = fields.pop("request_id")
        try:
            requests.append(Request.model_validate(fields))
        except ValidationError as exc:
            raise BadInput(f"{path}: row {i}: {describe_validation_error(exc)}") from None
    return Workload.from_requests(requests, {c.name: c for c in classes}, str(path))
