"""Scripts that print figures and write them under ``benchmarks/results``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlmctl.fileio import atomic_write_text


def write_report(out: Path, name: str, text: str, result: dict[str, Any]) -> None:
    """Print ``text`` and write it as ``out/name.md``, ``result`` as ``out/name.json``."""
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.md", text)
    atomic_write_text(out / f"{name}.json", json.dumps(result, indent=1) + "\n")
