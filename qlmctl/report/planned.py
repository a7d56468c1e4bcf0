"""A plan set beside what happened: ``report RUN --plan`` (automatic when the run used one).

How it works: every request's *first* dispatch (attempt 0) is its observed start, the
end of its last attempt its observed finish, and its final outcome decides whether it
met its SLO. Per planned group: predicted start and finish against the first dispatch
and the last finish of its requests. Per class: expected misses (the sum of the plan's
per-request miss probabilities) against observed misses. Per instance: swaps the plan's
model segments imply against swaps and wakes done. Departures, with a reason each:

- ``replan``: a re-plan left the committed plan (its logged note says by how much);
- ``instance``: a request first dispatched on another instance than planned;
- ``order``: a request first dispatched ahead of one planned before it on the same
  instance that had already arrived and was still waiting;
- ``evict``: a running request evicted (the core's eviction rule, which acts on the
  plan's forecasts) and re-queued, with the logged reason.

A moved or reordered request is explained by the last ``replan`` departure or
``instance_down`` before its dispatch; a request that passed only ones that arrived
within the core's re-plan interval (they were not yet queued) says so; otherwise it is
``unexplained``. A run that follows its plan has no departures.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from qlmctl.errors import BadInput
from qlmctl.plan.types import Plan
from qlmctl.serve.config import arrival_replan_s
from qlmctl.serve.runlog import Outcome, RunLog

DEPARTURE_COLUMNS = ["time_s", "kind", "instance_id", "request_id", "what", "why"]
GROUP_COLUMNS = [
    "instance_id", "order", "group_id", "model", "slo_class", "size",
    "predicted_start_s", "observed_start_s", "predicted_finish_s", "observed_finish_s",
    "predicted_miss", "observed_miss",
]  # fmt: skip


@dataclass(frozen=True)
class PlanComparison:
    """One run against one plan (frames are rows for tables, JSON and plots)."""

    plan_path: str
    groups: pd.DataFrame  # GROUP_COLUMNS, plan order per instance
    misses: pd.DataFrame  # slo_class, requests, predicted_misses, observed_misses
    swaps: pd.DataFrame  # instance_id, planned_swaps, done_swaps
    departures: pd.DataFrame  # DEPARTURE_COLUMNS; ``why``: the logged reason (or unexplained)
    requests_planned: int
    dispatched_as_planned: int  # first dispatch on the planned instance, in planned order
    # (evictions do not count against it: the re-run follows the plan again)

    @property
    def followed(self) -> float | None:
        """Share of planned (and dispatched) requests run where and when the plan said."""
        return self.dispatched_as_planned / self.requests_planned if self.requests_planned else None

    def to_dict(self) -> dict[str, Any]:
        """JSON form: records per frame, NaN as null."""

        def rows(df: pd.DataFrame) -> list[dict[str, Any]]:
            return json.loads(df.to_json(orient="records"))

        return {
            "plan": self.plan_path,
            "requests_planned": self.requests_planned,
            "dispatched_as_planned": self.dispatched_as_planned,
            "followed": self.followed,
            "groups": rows(self.groups),
            "misses_by_class": rows(self.misses),
            "swaps": rows(self.swaps),
            "departures": rows(self.departures),
        }


def check_same_workload(plan: Plan, run: RunLog, source: str) -> None:
    """BadInput unless ``plan`` was made for the workload the run served."""
    planned, served = plan.meta.get("workload_fingerprint"), run.meta.get("workload_fingerprint")
    if planned is None or planned != served:
        raise BadInput(
            f"{source}: planned for workload {str(planned)[:12]}, but run {run.path} served "
            f"{str(served)[:12]} ({run.meta.get('workload')})"
        )


def compare_plan(plan: Plan, run: RunLog, plan_path: str) -> PlanComparison:
    """Set ``plan`` beside ``run`` (see the module docstring)."""
    att = run.requests
    first = att[att["attempt"] == 0].set_index("request_id")
    final = run.final_attempts.set_index("request_id")
    rows: list[list[Any]] = []
    req: list[tuple[str, str, int, str, float]] = []
    for ip in plan.instances:
        for k, g in enumerate(ip.groups):
            ids = [r for r in g.request_ids if r in final.index]
            dispatch = first["dispatch_s"].reindex(ids)
            fin = final.reindex(ids)
            missed = ~(fin["slo_met"].fillna(False).astype(bool)) if ids else pd.Series([])
            miss_p = g.request_miss_probability or (g.miss_probability,) * len(g.request_ids)
            rows.append(
                [
                    ip.instance_id, k + 1, g.group_id, g.model, g.slo_class, len(g.request_ids),
                    g.predicted_start_s, _min(dispatch), g.predicted_finish_s,
                    _max(fin["finish_s"]) if ids else None,
                    float(sum(miss_p)), int(missed.sum()),
                ]
            )  # fmt: skip
            for j, r in enumerate(g.request_ids):
                req.append((r, ip.instance_id, len(req), g.slo_class, miss_p[j]))
    groups = pd.DataFrame(rows, columns=GROUP_COLUMNS)
    planned = pd.DataFrame(req, columns=["request_id", "planned_instance", "rank", "slo_class",
                                         "miss_p"]).drop_duplicates("request_id")  # fmt: skip
    planned = planned.set_index("request_id")
    misses = _misses(planned, final)
    swaps = _swaps(plan, run)
    departures, as_planned, n = _departures(planned, first, run)
    return PlanComparison(plan_path, groups, misses, swaps, departures, n, as_planned)


def _min(s: pd.Series) -> float | None:
    s = s.dropna()
    return float(s.min()) if len(s) else None


def _max(s: pd.Series) -> float | None:
    s = s.dropna()
    return float(s.max()) if len(s) else None


def _misses(planned: pd.DataFrame, final: pd.DataFrame) -> pd.DataFrame:
    fin = final.reindex(planned.index)
    ended = fin["outcome"].notna()
    met = (fin["outcome"] == Outcome.FINISHED) & fin["slo_met"].fillna(False).astype(bool)
    frame = pd.DataFrame(
        {
            "slo_class": planned["slo_class"],
            "requests": 1,
            "predicted_misses": planned["miss_p"],
            "observed_misses": (ended & ~met).astype(int),
        }
    )
    out = frame.groupby("slo_class", sort=True).sum().reset_index()
    return out


def _swaps(plan: Plan, run: RunLog) -> pd.DataFrame:
    resident = {i["id"]: i.get("model") for i in plan.meta.get("instances") or []}
    ops = run.operations
    done = ops[ops["kind"].isin(["swap", "wake"])]["instance_id"].value_counts()
    rows = []
    for ip in plan.instances:
        models = ip.models_in_order
        loaded = resident.get(ip.instance_id)
        n = sum(1 for k, m in enumerate(models) if (models[k - 1] if k else loaded) != m)
        rows.append([ip.instance_id, n, int(done.get(ip.instance_id, 0))])
    return pd.DataFrame(rows, columns=["instance_id", "planned_swaps", "done_swaps"])


def _departures(
    planned: pd.DataFrame, first: pd.DataFrame, run: RunLog
) -> tuple[pd.DataFrame, int, int]:
    """(departure rows, requests dispatched as planned, planned requests dispatched)."""
    ops = run.operations
    rows: list[list[Any]] = []
    causes: list[tuple[float, str]] = []  # (time, reason) of logged departures
    for _, op in ops.iterrows():
        detail = json.loads(op["detail"]) if isinstance(op["detail"], str) else {}
        if op["kind"] == "replan" and detail.get("chosen") == "replanned":
            why = str(detail.get("note") or "re-plan left the plan")
            rows.append([op["time_s"], "replan", None, None, "re-plan adopted", why])
            causes.append((float(op["time_s"]), why))
        elif op["kind"] == "instance_down":
            causes.append((float(op["time_s"]), f"instance {op['instance_id']} down"))
        elif op["kind"] == "evict" and op["request_id"] in planned.index:
            # the plan's own eviction rule (or a swap) stopped it; it runs again later
            why = re.sub(r" for \S+ \(", " for a more urgent request (", str(detail.get("reason")))
            rows.append([op["time_s"], "evict", op["instance_id"], op["request_id"],
                         "evicted and re-queued", why])  # fmt: skip
    causes.sort()
    times = np.array([t for t, _ in causes])

    def cause(at: float) -> str:
        k = int(np.searchsorted(times, at, side="right")) - 1
        return causes[k][1] if k >= 0 else "unexplained"

    starts = first["dispatch_s"].dropna()
    ran_on = {str(k): str(v) for k, v in first["instance_id"].items()}
    arrival = {str(k): float(v) for k, v in first["arrival_s"].items()}
    disp = {str(k): float(v) for k, v in starts.items()}
    plan_inst = {str(k): str(v) for k, v in planned["planned_instance"].items()}
    plan_rank = {str(k): int(v) for k, v in planned["rank"].items()}
    ids = [r for r in plan_inst if r in disp]
    bad: set[str] = set()
    for r in ids:
        if ran_on[r] != plan_inst[r]:
            rows.append([disp[r], "instance", ran_on[r], r, f"planned on {plan_inst[r]}",
                         cause(disp[r])])  # fmt: skip
            bad.add(r)
    config = run.meta.get("config") or {}
    interval = arrival_replan_s(
        float(config.get("replan_min_interval_s") or 0.0),
        float(config.get("arrival_replan_share") or 0.0),
        (float(c["ttft_s"]) for c in (run.meta.get("slo_classes") or {}).values()),
    )
    for inst in sorted(set(plan_inst.values())):
        peers = [r for r in plan_inst if plan_inst[r] == inst]
        rank = np.array([plan_rank[r] for r in peers])
        arr = np.array([arrival.get(r, np.inf) for r in peers])
        dsp = np.array([disp.get(r, np.inf) for r in peers])
        for r in peers:
            if r not in disp or ran_on[r] != inst:
                continue
            t = disp[r]
            ahead = (rank < plan_rank[r]) & (arr <= t) & (dsp > t)
            if not ahead.any():
                continue
            why = cause(t)
            if why == "unexplained" and (arr[ahead] > t - interval).all():
                why = f"arrived within a re-plan interval ({interval:g} s): not yet queued"
            rows.append([t, "order", inst, r, f"passed {int(ahead.sum())} planned before it", why])
            bad.add(r)
    frame = pd.DataFrame(rows, columns=DEPARTURE_COLUMNS)
    return (
        frame.sort_values("time_s", kind="stable").reset_index(drop=True),
        len(ids) - len(bad),
        len(ids),
    )
