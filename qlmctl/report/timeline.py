"""Time series behind the plots, as plain DataFrames (pure functions of a RunLog).

* SLO attainment over time: for each class, the share of requests that *arrived* in the
  trailing window and met their SLO (a time-based rolling mean over arrival times).
* Queue depth per instance: requests dispatched to it and not finished (in flight),
  a step function built from +1 at dispatch and −1 at finish.
* The global waiting queue: requests arrived (or re-queued after an eviction or failure)
  and not dispatched; attempt k > 0 waits from the end of attempt k − 1.
"""

from __future__ import annotations

import pandas as pd

from qlmctl.report.metrics import request_table, run_duration_s
from qlmctl.serve.runlog import RunLog


def attainment_over_time(run: RunLog, window_s: float) -> pd.DataFrame:
    """Columns ``time_s``, ``slo_class`` (``all`` included) and rolling ``attainment``."""
    req = request_table(run).dropna(subset=["arrival_s"])
    parts = [req.assign(slo_class="all"), req.assign(slo_class=req["slo_class"].fillna("-"))]
    frames = []
    for cls, g in pd.concat(parts).groupby("slo_class", sort=False):
        g = g.sort_values("arrival_s")
        met = pd.Series(
            g["met"].astype(float).to_numpy(), index=pd.to_timedelta(g["arrival_s"], unit="s")
        )
        rolled = met.rolling(pd.Timedelta(seconds=window_s)).mean()
        frames.append(
            pd.DataFrame(
                {
                    "time_s": g["arrival_s"].to_numpy(),
                    "slo_class": cls,
                    "attainment": rolled.to_numpy(),
                }
            )
        )
    columns = ["time_s", "slo_class", "attainment"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _depth(starts: pd.DataFrame, ends: pd.DataFrame, key: str) -> pd.DataFrame:
    """Step function of how many intervals are open, per value of ``key``."""
    events = pd.concat([starts.assign(delta=1), ends.assign(delta=-1)], ignore_index=True)
    # NOTE: at equal times ends sort before starts, so a hand-over is not a spike.
    events = events.sort_values([key, "time_s", "delta"], kind="stable")
    events["depth"] = events.groupby(key)["delta"].cumsum()
    return events[[key, "time_s", "depth"]].reset_index(drop=True)


def in_flight(run: RunLog) -> pd.DataFrame:
    """Columns ``instance_id``, ``time_s``, ``depth``: requests in flight per instance."""
    att = run.requests.dropna(subset=["instance_id", "dispatch_s"])
    end = att["finish_s"].fillna(run_duration_s(run))
    att, end = att[end > att["dispatch_s"]], end[end > att["dispatch_s"]]
    starts = pd.DataFrame({"instance_id": att["instance_id"], "time_s": att["dispatch_s"]})
    ends = pd.DataFrame({"instance_id": att["instance_id"], "time_s": end})
    return _depth(starts, ends, "instance_id")


def waiting(run: RunLog) -> pd.DataFrame:
    """Columns ``queue``, ``time_s``, ``depth``: requests waiting in the global queue."""
    att = run.requests.sort_values(["request_id", "attempt"])
    prev_end = att.groupby("request_id")["finish_s"].shift()
    start = prev_end.where(att["attempt"] > 0).fillna(att["arrival_s"])
    end = att["dispatch_s"].fillna(att["finish_s"]).fillna(run_duration_s(run))
    keep = start.notna() & (end > start)  # a request dispatched on arrival never waits
    starts = pd.DataFrame({"queue": "waiting", "time_s": start[keep]})
    ends = pd.DataFrame({"queue": "waiting", "time_s": end[keep]})
    return _depth(starts, ends, "queue")
