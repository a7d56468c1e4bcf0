"""What the core offers live traffic: cancel one request, refuse one, add a class."""

from __future__ import annotations

import pytest

from qlmctl.domain import SLOClass
from qlmctl.engine.events import Aborted, Evict
from qlmctl.errors import BadInput
from qlmctl.serve.state import ReqState
from tests.helpers import make_requests
from tests.test_serve_core import arrive, make_core


def test_cancel_ends_one_request_and_aborts_it_only_if_in_flight() -> None:
    core = make_core(max_inflight=1)
    arrive(core, make_requests(3))
    assert core.cancel("r1", 1.0, "client disconnected") == []  # still waiting
    assert core.cancel("r0", 1.0, "client disconnected") == [
        Evict("r0", "i0", "client disconnected")
    ]
    assert core.cancel("r0", 2.0, "again") == []  # already ended: nothing to do
    core.on_event(Aborted("r0", "i0", 1.1, 0, "evicted"), 1.1)  # the abort's echo is ignored
    assert core.state_of("r0") is core.state_of("r1") is ReqState.CANCELLED
    rows, _ = core.take_log()
    assert [(r["request_id"], r["outcome"]) for r in rows] == [
        ("r1", "cancelled"),
        ("r0", "cancelled"),
    ]
    assert core.state_of("r2") is ReqState.WAITING and core.stats().cancelled == 2


def test_refuse_logs_one_final_rejected_row_and_never_queues() -> None:
    core = make_core()
    req = make_requests(1)[0]
    core.refuse(req, 0.5, "admission: queue full")
    assert core.state_of("r0") is ReqState.REJECTED and core.done
    assert core.decide(1.0) == []  # nothing to dispatch
    rows, _ = core.take_log()
    assert len(rows) == 1 and rows[0]["outcome"] == "rejected"
    assert rows[0]["reason"] == "admission: queue full" and rows[0]["instance_id"] is None
    assert core.stats().rejected == 1 and core.stats().waiting == 0


def test_a_class_added_while_serving_is_planned_and_counted() -> None:
    core = make_core()
    window = SLOClass(name="window-1h", ttft_s=3600, e2e_s=3600, priority=11)
    core.add_slo_class(window)
    core.add_slo_class(window)  # the same class again: no-op
    with pytest.raises(BadInput, match="already exists"):
        core.add_slo_class(window.model_copy(update={"ttft_s": 60}))
    req = make_requests(1)[0].model_copy(update={"slo_class": "window-1h"})
    assert arrive(core, [req])  # dispatched
    assert core.stats().met_by_class["window-1h"] == (0, 0)
