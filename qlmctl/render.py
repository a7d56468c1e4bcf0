"""Output helpers shared by the commands: rich tables for people, JSON for machines."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

# Piped output (files, CI logs) gets a wide fixed width rather than rich's 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=160)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows as a rich table; numbers are right-aligned."""
    table = Table(title=title, title_justify="left")
    numeric = [
        bool(rows) and all(isinstance(r[i], int | float) for r in rows) for i in range(len(columns))
    ]
    for col, is_num in zip(columns, numeric, strict=True):
        table.add_column(col, justify="right" if is_num else "left", overflow="fold")
    for row in rows:
        table.add_row(*(format_cell(v) for v in row))
    console.print(table)


def format_cell(value: Any) -> str:
    """Floats with 3 significant decimals, None as '-', the rest as str."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def print_json(data: Any) -> None:
    """Print ``data`` as JSON on stdout (no colour, for pipes)."""
    print(json.dumps(data, indent=2, default=str))
