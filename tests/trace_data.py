"""Trace data for the tests: the public datasets from a mirror, or small look-alikes.

With the team's mirror beside the repository (``../shared/traces``, as in CI) the
session installs the real files through ``fetch --from`` (hash-checked). In a clone
without it, it writes small files in the same formats under the same names, so every
test runs either way; tests read their expectations from the installed files (see
:func:`azure_rows`), never from numbers of one particular file.
"""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import numpy as np

from qlmctl.workload.datasets import DATASETS, fetch_many

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "traces"

# dataset -> (first timestamp, requests per second, median prompt, median output); the real
# traces' starts (both cover 2023-11-16 18:15-19:14), rates a fifth of theirs
_AZURE = {
    "azure-2023-code": ("2023-11-16 18:17:03.9799600", 0.5, 1500, 15),
    "azure-2023-conv": ("2023-11-16 18:15:46.6805900", 1.1, 1000, 130),
}
# dataset -> (rows, median prompt, median output, max total tokens)
_LENGTHS = {"sharegpt-lengths": (2000, 1700, 400, 8192), "arxiv-lengths": (2000, 2800, 160, 4096)}
_SPAN_S = 3500.0


def install_datasets(root: Path) -> str:
    """Fill the dataset cache ``root``: from the mirror if there is one, else look-alikes.

    Returns:
        "mirror" or "generated".
    """
    if MIRROR.is_dir():
        list(fetch_many([], True, root, MIRROR))
        return "mirror"
    rng = np.random.default_rng(17)
    root.mkdir(parents=True, exist_ok=True)
    for name, (start, rate, prompt, output) in _AZURE.items():
        write_azure(root / DATASETS[name].filename, start, rate, prompt, output, rng)
    for name, (rows, prompt, output, total) in _LENGTHS.items():
        write_lengths(root / DATASETS[name].filename, rows, prompt, output, total, rng)
    return "generated"


def write_azure(
    path: Path, start: str, rate: float, prompt: int, output: int, rng: np.random.Generator
) -> None:
    """An Azure 2023 trace CSV: Poisson arrivals over about an hour, log-normal lengths."""
    t0 = dt.datetime.fromisoformat(start)
    times = np.cumsum(rng.exponential(1 / rate, int(rate * _SPAN_S)))
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for t, p, o in zip(
        times, _lognormal(rng, prompt, len(times)), _lognormal(rng, output, len(times)), strict=True
    ):
        stamp = (t0 + dt.timedelta(seconds=float(t))).strftime("%Y-%m-%d %H:%M:%S.%f")
        lines.append(f"{stamp}0,{p},{o}")  # 7 fractional digits, as in the real files
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_lengths(
    path: Path, rows: int, prompt: int, output: int, total: int, rng: np.random.Generator
) -> None:
    """A length CSV like the ShareGPT/arXiv samples (prefill, decode, total, ratio)."""
    p = np.minimum(_lognormal(rng, prompt, rows), total // 2)
    o = np.minimum(_lognormal(rng, output, rows), total - p)
    lines = ["num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio"]
    lines += [f"{a},{b},{a + b},{a / b}" for a, b in zip(p.tolist(), o.tolist(), strict=True)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _lognormal(rng: np.random.Generator, median: int, n: int) -> np.ndarray:
    return np.maximum(np.round(median * rng.lognormal(0.0, 0.8, n)), 1).astype(np.int64)


def azure_rows(path: Path) -> list[tuple[dt.datetime, int, int]]:
    """(timestamp, prompt tokens, output tokens) per row, read independently of qlmctl."""
    with path.open(newline="", encoding="utf-8") as f:
        return [
            (
                dt.datetime.fromisoformat(r["TIMESTAMP"][:26]),
                int(r["ContextTokens"]),
                int(r["GeneratedTokens"]),
            )
            for r in csv.DictReader(f)
        ]
