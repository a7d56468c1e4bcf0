"""``/metrics``: the gateway's Prometheus page, named like vLLM's with a ``qlmctl:`` prefix.

How it works: counters and histograms are fed from the run log's rows as the driver
writes them (:meth:`GatewayMetrics.attempt`, :meth:`GatewayMetrics.operation`), so the
page and the Parquet log count the same things; admission refusals are counted by the
route. Gauges (queue length per model and class, virtual queue and in-flight requests
per instance) are read from the core when the page is scraped. Each gateway has its own
registry (never prometheus_client's global one), so tests and runs do not mix.

Labels: ``model_name`` (as vLLM), ``slo_class``, ``instance``, ``outcome``, ``source``.
"""

from __future__ import annotations

import json
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from qlmctl.serve.core import ServeCore
from qlmctl.serve.runlog import Outcome

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# vLLM's TTFT buckets, and queue-time buckets reaching the batch classes' hours
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_QUEUE_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                  600.0, 1800.0, 3600.0, 7200.0, 14400.0)  # fmt: skip
_SOLVER_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# operation kind (run log) -> counter name
_OPERATIONS = {
    "swap": "num_swaps",
    "wake": "num_wakes",
    "sleep": "num_sleeps",
    "evict": "num_evictions",
    "instance_down": "num_instance_down",
    "instance_up": "num_instance_up",
}
_REQ = ["model_name", "slo_class"]


class GatewayMetrics:
    """The gateway's metrics (see the module docstring)."""

    def __init__(self, core: Callable[[], ServeCore | None]) -> None:
        """Args:
        core: the serving core once it exists (None before the instances are up).
        """
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "qlmctl:requests", "Requests ended, by final outcome.", [*_REQ, "outcome"], registry=r
        )
        self._met = Counter(
            "qlmctl:slo_met", "Requests finished within their SLO.", _REQ, registry=r
        )
        self._missed = Counter(
            "qlmctl:slo_missed", "Requests that ended outside their SLO.", _REQ, registry=r
        )
        self._failed_attempts = Counter(
            "qlmctl:failed_attempts", "Attempts failed by an engine (retried or not).",
            ["instance"], registry=r,
        )  # fmt: skip
        self._refused = Counter(
            "qlmctl:admission_rejections", "Requests refused by admission control.",
            ["slo_class", "cause"], registry=r,
        )  # fmt: skip
        self._ttft = Histogram(
            "qlmctl:time_to_first_token_seconds", "Time from arrival to first token.",
            _REQ, buckets=_TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self._queue = Histogram(
            "qlmctl:request_queue_time_seconds",
            "Time from arrival to the dispatch of the attempt that finished.",
            _REQ, buckets=_QUEUE_BUCKETS, registry=r,
        )  # fmt: skip
        self._plans = Counter("qlmctl:plans", "Plans made, by source.", ["source"], registry=r)
        self._solver = Histogram(
            "qlmctl:plan_solver_time_seconds", "Build plus solve time of each plan.",
            ["source"], buckets=_SOLVER_BUCKETS, registry=r,
        )  # fmt: skip
        self._ops = {
            kind: Counter(
                f"qlmctl:{name}", f"Serving operations: {kind}.", ["instance"], registry=r
            )
            for kind, name in _OPERATIONS.items()
        }
        r.register(_CoreGauges(core))

    def attempt(self, row: dict[str, Any], final: bool) -> None:
        """One request-attempt row of the run log; ``final`` if it ended the request."""
        labels = (row["model"], row["slo_class"])
        outcome = row["outcome"]
        if outcome == Outcome.FAILED and row["instance_id"] is not None:
            self._failed_attempts.labels(row["instance_id"]).inc()
        if not final:
            return
        self._requests.labels(*labels, outcome).inc()
        (self._met if row["slo_met"] else self._missed).labels(*labels).inc()
        if outcome == Outcome.FINISHED:
            self._ttft.labels(*labels).observe(row["first_token_s"] - row["arrival_s"])
            self._queue.labels(*labels).observe(row["dispatch_s"] - row["arrival_s"])

    def operation(self, row: dict[str, Any]) -> None:
        """One operation row of the run log."""
        kind = row["kind"]
        if kind == "replan":
            source = _source(row.get("detail"))
            self._plans.labels(source).inc()
            if row["duration_s"] is not None:
                self._solver.labels(source).observe(row["duration_s"])
        elif kind in self._ops:
            self._ops[kind].labels(row["instance_id"] or "").inc()

    def refused(self, slo_class: str, status: int) -> None:
        """Admission control refused a request (429 or 503)."""
        self._refused.labels(slo_class, "overload" if status == 429 else "no_instance").inc()

    def render(self) -> bytes:
        """The Prometheus text page."""
        return generate_latest(self.registry)


class _CoreGauges(Collector):
    """Gauges read from the core at scrape time."""

    def __init__(self, core: Callable[[], ServeCore | None]) -> None:
        self._core = core

    def collect(self) -> Iterator[GaugeMetricFamily]:
        waiting = GaugeMetricFamily(
            "qlmctl:num_requests_waiting", "Requests in qlmctl's queue.", labels=_REQ
        )
        queued = GaugeMetricFamily(
            "qlmctl:num_requests_planned",
            "Waiting requests placed in an instance's virtual queue.",
            labels=["instance"],
        )
        running = GaugeMetricFamily(
            "qlmctl:num_requests_running", "Requests in flight on an instance.", labels=["instance"]
        )
        core = self._core()
        if core is not None:
            by = Tally((r.model, r.slo_class) for r in core.snapshot(0.0).waiting)
            for (model, cls), n in sorted(by.items()):
                waiting.add_metric([model, cls], n)
            stats = core.stats()
            for iid, n in stats.queued_by_instance.items():
                queued.add_metric([iid], n)
            for iid, n in stats.in_flight_by_instance.items():
                running.add_metric([iid], n)
        yield from (waiting, queued, running)


def _source(detail: str | None) -> str:
    try:
        return str(json.loads(detail or "{}").get("source", "policy"))
    except ValueError:
        return "policy"
