"""Class and model assignment: one name, exact fractions by seed, or a stable id hash.

``fraction`` gives each name exactly its share of the source's requests (largest
remainder rounding), placed by a seeded shuffle. ``hash`` maps each request id to a
number in [0, 1) via BLAKE2b and picks the name whose cumulative-weight interval holds
it: the choice depends only on the id (and the field, as a salt), so it survives a
change of seed, window or rate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from qlmctl.workload.spec import Assignment


def assign(rule: Assignment, ids: Sequence[str], rng: np.random.Generator, salt: str) -> np.ndarray:
    """One name per id (an object array aligned with ``ids``).

    ``salt`` (the field being assigned) decorrelates hash rules: the model and the class
    of a request are drawn from independent hashes.
    """
    n = len(ids)
    if isinstance(rule, str):
        return np.full(n, rule, dtype=object)
    names = np.array(list(rule.weights), dtype=object)
    shares = np.array(list(rule.weights.values()), dtype=float)
    shares /= shares.sum()
    if rule.by == "fraction":
        return names[rng.permutation(np.repeat(np.arange(len(names)), exact_counts(shares, n)))]
    cuts = np.cumsum(shares)
    cuts[-1] = np.inf  # guard against rounding: every hash lands somewhere
    return names[np.searchsorted(cuts, stable_unit(ids, salt), side="right")]


def exact_counts(shares: np.ndarray, n: int) -> np.ndarray:
    """Largest-remainder integer counts of ``shares * n`` (they sum to ``n``)."""
    raw = shares * n
    counts = np.floor(raw).astype(np.int64)
    left = n - int(counts.sum())
    counts[np.argsort(-(raw - counts), kind="stable")[:left]] += 1
    return counts


def stable_unit(ids: Sequence[str], salt: str = "") -> np.ndarray:
    """A number in [0, 1) per id, a pure function of the id and the salt."""
    key = salt.encode()
    digests = b"".join(hashlib.blake2b(i.encode(), digest_size=8, key=key).digest() for i in ids)
    return np.frombuffer(digests, dtype="<u8") / 2.0**64
