"""Several runs side by side, with the relative improvement against a baseline run.

Rules: runs are compared only if they replayed the same workload (equal run.json
``workload_fingerprint``); otherwise :func:`compare` raises :class:`BadInput` unless
``force``, and then says so in ``warnings``. The baseline is the run named by
``baseline`` (its directory, run id or policy), else the first ``fcfs`` run, else the
first run. Improvement is signed so that positive is better: (x − b) / |b| for metrics
where higher is better (attainment, goodput, throughput), (b − x) / |b| where lower is
better (latencies); None when the baseline value is 0 or missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qlmctl.errors import BadInput
from qlmctl.report.metrics import GroupMetrics, RunMetrics


@dataclass(frozen=True, slots=True)
class MetricRow:
    """One compared metric: its value in every run and the improvement over the baseline."""

    metric: str  # e.g. slo_attainment
    slo_class: str | None  # None: the whole run
    higher_is_better: bool
    values: tuple[float | None, ...]  # one per run, in run order
    improvement: tuple[float | None, ...]  # relative to the baseline; positive = better

    @property
    def name(self) -> str:
        """``metric`` for the whole run, ``metric[class]`` for one SLO class."""
        return self.metric if self.slo_class is None else f"{self.metric}[{self.slo_class}]"


@dataclass(frozen=True, slots=True)
class Comparison:
    """Runs of one workload side by side."""

    labels: tuple[str, ...]  # column heading of every run
    baseline: int  # index of the baseline run
    rows: tuple[MetricRow, ...]
    warnings: tuple[str, ...]


Getter = Callable[[GroupMetrics], float | None]

# name, getter, higher is better: asked of the whole run and of every SLO class.
_GROUP_METRICS: tuple[tuple[str, Getter, bool], ...] = (
    ("slo_attainment", lambda g: g.attainment, True),
    ("request_goodput", lambda g: g.goodput_rps, True),
    ("request_throughput", lambda g: g.request_throughput_rps, True),
    ("output_throughput", lambda g: g.output_throughput_tps, True),
    ("median_ttft_s", lambda g: g.ttft.p50_s, False),
    ("p99_ttft_s", lambda g: g.ttft.p99_s, False),
    ("p99_e2el_s", lambda g: g.e2e.p99_s, False),
    ("mean_queue_s", lambda g: g.queue.mean_s, False),
)
_CLASS_METRICS = ("slo_attainment", "request_goodput", "p99_ttft_s")


def run_labels(runs: Sequence[RunMetrics]) -> tuple[str, ...]:
    """The policy name of every run, with the run id added where policies repeat."""
    policies = [r.policy for r in runs]
    return tuple(
        r.policy if policies.count(r.policy) == 1 else f"{r.policy} ({r.run_id})" for r in runs
    )


def pick_baseline(runs: Sequence[RunMetrics], baseline: str | None = None) -> int:
    """Index of the baseline: the run whose path, run id or policy is ``baseline``.

    Without ``baseline``: the first run with policy ``fcfs``, else the first run.
    """
    if baseline is None:
        return next((k for k, r in enumerate(runs) if r.policy == "fcfs"), 0)
    wanted = Path(baseline).resolve()
    for key in (
        lambda r: Path(r.path).resolve() == wanted,
        lambda r: r.run_id == baseline,
        lambda r: r.policy == baseline,
    ):
        hits = [k for k, r in enumerate(runs) if key(r)]
        if len(hits) == 1:
            return hits[0]
    names = ", ".join(f"{r.path} ({r.run_id}, {r.policy})" for r in runs)
    raise BadInput(f"--baseline {baseline!r} matches no single run; the runs are: {names}")


def check_same_workload(runs: Sequence[RunMetrics], force: bool = False) -> tuple[str, ...]:
    """Refuse runs of different workloads (BadInput), or warn about them under ``force``."""
    prints = {r.workload_fingerprint for r in runs}
    if len(prints) <= 1:
        return ()
    detail = "; ".join(f"{r.path}: {r.workload_fingerprint or 'no fingerprint'}" for r in runs)
    if not force:
        raise BadInput(
            f"runs replayed different workloads ({detail}); compare them anyway with --force"
        )
    return (f"comparing runs of different workloads (--force): {detail}",)


def relative_improvement(value: float | None, base: float | None, higher: bool) -> float | None:
    """Signed relative change of ``value`` over ``base``; positive means better."""
    if value is None or base is None or base == 0:
        return None
    change = (value - base) / abs(base)
    return change if higher else 0.0 - change  # 0.0 - x: no negative zero


def _row(
    name: str, cls: str | None, values: list[float | None], base: int, higher: bool
) -> MetricRow:
    return MetricRow(
        metric=name,
        slo_class=cls,
        higher_is_better=higher,
        values=tuple(values),
        improvement=tuple(relative_improvement(v, values[base], higher) for v in values),
    )


def compare(
    runs: Sequence[RunMetrics], baseline: str | None = None, force: bool = False
) -> Comparison:
    """Compare ``runs`` (at least one) against the baseline run.

    Args:
        runs: metrics of each run, in the order the user gave them.
        baseline: path, run id or policy of the baseline run (see :func:`pick_baseline`).
        force: compare even runs of different workloads.

    Returns:
        The comparison: whole-run rows, weighted attainment, then per-class rows
        named ``metric[class]`` for every class of any run.
    """
    warnings = check_same_workload(runs, force)
    base = pick_baseline(runs, baseline)
    rows = [
        _row(name, None, [get(r.overall) for r in runs], base, higher)
        for name, get, higher in _GROUP_METRICS
    ]
    rows.insert(
        1,
        _row(
            "weighted_slo_attainment",
            None,
            [r.overall.weighted_attainment for r in runs],
            base,
            True,
        ),
    )
    lost = [next((o.tokens_lost for o in r.per_operation if o.kind == "evict"), 0) for r in runs]
    rows.append(_row("tokens_lost_to_evictions", None, [float(x or 0) for x in lost], base, False))
    classes = list(dict.fromkeys(c for r in runs for c in r.by_class))
    for cls in classes:
        for name, get, higher in _GROUP_METRICS:
            if name in _CLASS_METRICS:
                values = [get(r.by_class[cls]) if cls in r.by_class else None for r in runs]
                rows.append(_row(name, cls, values, base, higher))
    return Comparison(run_labels(runs), base, tuple(rows), warnings)
