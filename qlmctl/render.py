"""Output helpers shared by the commands: rich tables for people, JSON for machines.

Rules: every number a table shows goes through :func:`format_number`: fixed-point, never
scientific notation, thousands separators, about three significant digits (whole numbers
from 100 up). Tables say their units in column titles; JSON carries the same quantities
unrounded.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

# Piped output (files, CI logs) gets a wide fixed width rather than rich's 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=160)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows as a rich table; columns of numbers (None allowed) are right-aligned."""
    table = Table(title=title, title_justify="left")
    numeric = [
        any(_is_number(r[i]) for r in rows) and all(_is_number(r[i]) or r[i] is None for r in rows)
        for i in range(len(columns))
    ]
    for col, is_num in zip(columns, numeric, strict=True):
        table.add_column(col, justify="right" if is_num else "left", overflow="fold")
    for row in rows:
        table.add_row(*(format_cell(v) for v in row))
    console.print(table)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def format_cell(value: Any) -> str:
    """Numbers through :func:`format_number`, None as '-', the rest as str."""
    if value is None:
        return "-"
    if _is_number(value):
        return format_number(value)
    return str(value)


def format_number(value: float, digits: int = 3) -> str:
    """``value`` for people: ``digits`` significant digits in fixed point, whole numbers
    from ``10 ** (digits - 1)`` up, thousands separators, never an exponent.

    >>> [format_number(x) for x in (15850.0, 861.8, 99.15, 2.254, 0.000314, 28185)]
    ['15,850', '862', '99.2', '2.25', '0.000314', '28,185']
    """
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return f"{value:g}"
    if abs(value) >= 10 ** (digits - 1) - 0.5:
        return f"{value:,.0f}"
    value = float(f"{value:.{digits}g}")  # round first, so 9.996 becomes 10.0, not 10.00
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = min(max(digits - 1 - magnitude, 0), _MAX_DECIMALS)
    return f"{value:,.{decimals}f}"


_MAX_DECIMALS = 9  # below 1e-9 a value prints as 0.000000000


def print_json(data: Any) -> None:
    """Print ``data`` as JSON on stdout (no colour, for pipes)."""
    print(json.dumps(data, indent=2, default=str))
