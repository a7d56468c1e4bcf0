"""Statistics of a workload for ``qlmctl workload show``.

Per (SLO class, model) group, per class (when it spans several models) and overall:
count, mean rate (count / workload duration, so group rates add up), burstiness (the
coefficient of variation of inter-arrival times: 1 for Poisson, above 1 bursty), prompt
and output length percentiles (output: the replay target), and the arrival rate in
equal time bins with a one-line sparkline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from qlmctl.render import format_number
from qlmctl.workload.model import Workload

ALL = "all"
_BARS = " ▁▂▃▄▅▆▇█"


@dataclass(frozen=True, slots=True)
class GroupStats:
    """Statistics of one group of requests."""

    slo_class: str  # or ALL
    model: str  # or ALL
    count: int
    rate_per_s: float | None  # None if the workload has no duration
    cv_interarrival: float | None  # None with fewer than 3 arrivals
    prompt_tokens_p50: float
    prompt_tokens_p90: float
    prompt_tokens_p99: float
    output_tokens_p50: float
    output_tokens_p90: float
    output_tokens_p99: float
    rate_bins_per_s: tuple[float, ...]  # arrival rate in equal bins over the duration
    sparkline: str


@dataclass(frozen=True, slots=True)
class WorkloadSummary:
    """What ``workload show`` prints."""

    source: str
    fingerprint: str
    count: int
    duration_s: float
    bin_s: float  # width of a rate bin
    groups: tuple[GroupStats, ...]

    @property
    def title(self) -> str:
        """One line: source, size, duration, mean rate, fingerprint."""
        if self.duration_s > 0:
            rate = format_number(self.count / self.duration_s)
            span = f"over {format_number(self.duration_s)} s ({rate} req/s)"
        else:
            span = "all at t=0 (no arrival times)"
        return f"{self.source}: {self.count:,} requests {span}, fingerprint {self.fingerprint[:12]}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return asdict(self)


def summarise(workload: Workload, bins: int = 24) -> WorkloadSummary:
    """Statistics of ``workload`` with arrival rates in ``bins`` time bins."""
    reqs = workload.requests
    arrival = np.array([r.arrival_s for r in reqs])
    prompt = np.array([r.prompt_tokens for r in reqs])
    output = np.array([r.target_output_tokens for r in reqs])
    classes = np.array([r.slo_class for r in reqs], dtype=object)
    models = np.array([r.model for r in reqs], dtype=object)
    duration = workload.duration_s
    edges = np.linspace(0.0, duration if duration > 0 else 1.0, bins + 1)

    def stats(cls: str, model: str, mask: np.ndarray) -> GroupStats:
        t = arrival[mask]
        gaps = np.diff(t)
        cv = float(gaps.std() / gaps.mean()) if len(gaps) >= 2 and gaps.mean() > 0 else None
        counts = np.histogram(t, bins=edges)[0]
        rates = counts / (edges[1] - edges[0])
        p, o = np.percentile(prompt[mask], [50, 90, 99]), np.percentile(output[mask], [50, 90, 99])
        return GroupStats(
            slo_class=cls,
            model=model,
            count=int(mask.sum()),
            rate_per_s=float(mask.sum() / duration) if duration > 0 else None,
            cv_interarrival=cv,
            prompt_tokens_p50=float(p[0]),
            prompt_tokens_p90=float(p[1]),
            prompt_tokens_p99=float(p[2]),
            output_tokens_p50=float(o[0]),
            output_tokens_p90=float(o[1]),
            output_tokens_p99=float(o[2]),
            rate_bins_per_s=tuple(float(x) for x in rates),
            sparkline=sparkline(counts),
        )

    groups = []
    for cls in sorted(set(classes)):
        in_class = classes == cls
        class_models = sorted(set(models[in_class]))
        groups += [stats(cls, m, in_class & (models == m)) for m in class_models]
        if len(class_models) > 1:
            groups.append(stats(cls, ALL, in_class))
    groups.append(stats(ALL, ALL, np.ones(len(reqs), dtype=bool)))
    return WorkloadSummary(
        workload.source,
        workload.fingerprint,
        len(reqs),
        duration,
        float(edges[1] - edges[0]),
        tuple(groups),
    )


def sparkline(counts: np.ndarray) -> str:
    """One block character per bin, scaled to the largest bin."""
    top = counts.max() if len(counts) else 0
    if top <= 0:
        return " " * len(counts)
    levels = np.ceil(counts / top * (len(_BARS) - 1)).astype(int)
    return "".join(_BARS[k] for k in levels)


STATS_COLUMNS = ("class", "model", "n", "req/s", "CV", "prompt p50/90/99", "output p50/90/99")


def stats_rows(summary: WorkloadSummary) -> list[list[Any]]:
    """Rows of the statistics table of ``workload show`` (see ``STATS_COLUMNS``)."""
    return [
        [
            g.slo_class,
            g.model,
            g.count,
            g.rate_per_s,
            g.cv_interarrival,
            _triple(g.prompt_tokens_p50, g.prompt_tokens_p90, g.prompt_tokens_p99),
            _triple(g.output_tokens_p50, g.output_tokens_p90, g.output_tokens_p99),
        ]
        for g in summary.groups
    ]


def _triple(*tokens: float) -> str:
    """Percentiles of token counts as whole numbers: ``1,020/2,734/4,142``."""
    return "/".join(f"{t:,.0f}" for t in tokens)


def rate_rows(summary: WorkloadSummary) -> list[list[Any]]:
    """Rows (class, model, peak rate, sparkline) of the arrival-rate table."""
    return [
        [g.slo_class, g.model, max(g.rate_bins_per_s, default=0.0), g.sparkline]
        for g in summary.groups
    ]
