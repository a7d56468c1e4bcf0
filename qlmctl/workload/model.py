"""The :class:`Workload`: requests sorted by arrival, their SLO classes, a content fingerprint.

The fingerprint is the SHA-256 of a canonical serialisation of the content (format
version, SLO classes, every request field), so a spec and the Parquet file materialised
from it have the same fingerprint, and any change to a request changes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from qlmctl.domain import Request, SLOClass
from qlmctl.errors import BadInput

WORKLOAD_VERSION = 1  # version of the materialised format (see qlmctl.workload.parquet)


@dataclass(frozen=True)
class Workload:
    """A replayable list of requests (``arrival_s``: seconds from the workload start)."""

    requests: tuple[Request, ...]  # sorted by (arrival_s, id)
    slo_classes: dict[str, SLOClass]  # name -> class
    fingerprint: str  # sha256 hex of the content
    source: str  # where it came from (spec or Parquet path)

    @classmethod
    def from_requests(
        cls, requests: Iterable[Request], slo_classes: Mapping[str, SLOClass], source: str
    ) -> Workload:
        """Sort, check every request's class is known, fingerprint."""
        ordered = tuple(sorted(requests, key=lambda r: (r.arrival_s, r.id)))
        classes = dict(slo_classes)
        for r in ordered:
            if r.slo_class not in classes:
                raise BadInput(
                    f"{source}: request {r.id!r}: unknown slo_class {r.slo_class!r} "
                    f"(known: {sorted(classes)})"
                )
        ids = [r.id for r in ordered]
        if len(set(ids)) != len(ids):
            raise BadInput(f"{source}: duplicate request ids")
        return cls(ordered, classes, fingerprint(ordered, classes), source)

    @property
    def models(self) -> set[str]:
        """Every model some request needs."""
        return {r.model for r in self.requests}

    @property
    def duration_s(self) -> float:
        """Time of the last arrival (the workload starts at 0)."""
        return self.requests[-1].arrival_s if self.requests else 0.0


def fingerprint(requests: tuple[Request, ...], slo_classes: Mapping[str, SLOClass]) -> str:
    """SHA-256 hex digest of the canonical content."""
    h = hashlib.sha256(f"qlmctl-workload-v{WORKLOAD_VERSION}\n".encode())
    classes = [slo_classes[k].model_dump(mode="json") for k in sorted(slo_classes)]
    h.update(json.dumps(classes, sort_keys=True).encode())
    for name in ("id", "model", "slo_class"):
        h.update(json.dumps([getattr(r, name) for r in requests]).encode())
    h.update(json.dumps([r.prompt for r in requests]).encode())
    h.update(np.array([r.arrival_s for r in requests], dtype="<f8").tobytes())
    numbers = [(r.prompt_tokens, r.max_output_tokens, r.output_tokens or 0) for r in requests]
    h.update(np.array(numbers, dtype="<i8").tobytes())
    return h.hexdigest()
