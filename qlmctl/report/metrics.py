"""Metrics of one run: SLO attainment, goodput, throughput, latencies, utilisation, operations.

Every metric is a pure, vectorised (pandas) function of a :class:`RunLog`. Definitions
(times are seconds since the run started):

* A *request* is one ``request_id``; its *final attempt* is the row
  :attr:`RunLog.final_attempts` picks. It is **met** iff that attempt finished with
  ``slo_met``; rejected, cancelled, failed, and (in a crashed run) still-evicted
  requests count as missed.
* **attainment** = met / requests; **weighted attainment** = Σ w·met / Σ w over
  requests, w the class weight from run.json ``slo_classes`` (1 if absent).
* **duration** = run.json ``duration_s``; for a crashed run, the latest time in the log.
* **goodput** = met / duration; **request throughput** = finished / duration; **output
  throughput** = output tokens of finished requests / duration; **total token
  throughput** adds their prompt tokens.
* **TTFT** = first token − arrival and **E2E** = finish − arrival of finished requests
  (so both include queueing and any evicted attempts; the first token is the earliest of
  any attempt: a later one continues the client's stream); **TPOT** is the final attempt's
  ``tpot_s``; **queueing** = first dispatch − arrival (requests ever dispatched).
  Percentiles interpolate linearly (``numpy.percentile``); std is the population std.
* **utilisation** of an instance = length of the union of its attempts'
  [dispatch, finish] intervals / duration (share of the run with ≥1 request in flight).
* **operations**: swaps, wakes, sleeps, evictions, re-plans, instance downs from
  operations.parquet (solver time = run.json ``solver_wall_s``, else Σ replan
  ``duration_s``: a simulated run logs no wall-clock time per re-plan); failed and rejected
  *attempts* from requests.parquet. **Per operation** (:class:`OperationStat`): its
  count, Σ ``duration_s`` (load time of swaps and wakes, call time of sleeps, solver
  time of re-plans), and for evictions the tokens they cost: **kept** = output tokens
  the evicted attempts handed to their next attempt (``kept_tokens``); **lost** = output
  tokens generated and thrown away (``output_tokens − kept_tokens``; all of them without
  evict-and-resume); **recomputed** = prompt tokens (original prompt plus resumed output)
  the next attempts prefilled again, i.e. not served by the prefix cache (``prompt_tokens
  + resumed_tokens − cached_tokens``; a null ``cached_tokens`` counts as no hit).
* **predictions**: start error = dispatch − ``predicted_start_s`` per attempt; the miss
  forecast of a request is the ``predicted_miss_prob`` of its first attempt that has one,
  scored against its final outcome (Brier score; mean forecast vs observed miss rate).
  First tokens and finishes (:func:`time_forecast`): observed − forecast median per
  attempt (median bias and absolute error), and the share that came by the forecast's
  90th percentile (0.9 when the forecast's spread is honest).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from qlmctl.serve.runlog import Outcome, RunLog


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Summary of one latency (seconds); fields are None when there are no values."""

    count: int
    mean_s: float | None
    std_s: float | None
    p50_s: float | None
    p90_s: float | None
    p99_s: float | None

    @classmethod
    def from_values(cls, values: pd.Series) -> LatencyStats:
        v = values.dropna().to_numpy(dtype=float)
        if len(v) == 0:
            return cls(0, None, None, None, None, None)
        p50, p90, p99 = (float(x) for x in np.percentile(v, [50, 90, 99]))
        return cls(len(v), float(v.mean()), float(v.std()), p50, p90, p99)


@dataclass(frozen=True, slots=True)
class GroupMetrics:
    """Metrics of a set of requests (a run, one SLO class or one model)."""

    requests: int
    met: int
    finished: int  # final attempt finished (in time or not)
    failed: int  # final attempt failed (retries exhausted)
    rejected: int
    cancelled: int
    unfinished: int  # last attempt evicted: only in a crashed run
    attainment: float | None  # met / requests
    weighted_attainment: float | None
    goodput_rps: float  # met / duration
    request_throughput_rps: float  # finished / duration
    output_throughput_tps: float  # output tokens of finished requests / duration
    total_token_throughput_tps: float  # (prompt + output) tokens of finished / duration
    prompt_tokens: int  # of finished requests
    output_tokens: int  # of finished requests
    ttft: LatencyStats
    tpot: LatencyStats
    e2e: LatencyStats
    queue: LatencyStats


@dataclass(frozen=True, slots=True)
class InstanceMetrics:
    """How busy one instance was."""

    instance_id: str
    gpu: str | None
    attempts: int
    busy_s: float  # union of [dispatch, finish] intervals
    utilisation: float  # busy_s / duration


@dataclass(frozen=True, slots=True)
class OperationCounts:
    """Serving operations of a run and the planner's cost."""

    swaps: int
    wakes: int
    sleeps: int
    evictions: int
    replans: int
    instance_downs: int
    failed_attempts: int
    rejected_attempts: int
    swap_time_s: float  # Σ duration_s of swaps and wakes
    solver_time_s: float  # run.json solver_wall_s, else Σ duration_s of replans


@dataclass(frozen=True, slots=True)
class OperationStat:
    """One kind of serving operation in a run: how often, how long, what it cost in tokens."""

    kind: str  # swap | wake | sleep | evict | replan | instance_down | instance_up
    count: int
    seconds: float  # Σ duration_s (0 for kinds that have none)
    tokens_kept: int | None  # evict only: output tokens resumed after, not regenerated
    tokens_lost: int | None  # evict only: output tokens generated and thrown away
    tokens_recomputed: int | None  # evict only: prompt tokens prefilled again (cache misses)


@dataclass(frozen=True, slots=True)
class Calibration:
    """Predicted miss probability against the observed miss rate for a set of requests."""

    requests: int
    predicted_miss_rate: float  # mean forecast
    observed_miss_rate: float
    brier: float  # mean (forecast − missed)²


@dataclass(frozen=True, slots=True)
class TimeForecast:
    """Forecast first tokens (or finishes) against what happened, over the attempts that
    had both (None: none had)."""

    count: int
    bias_s: float | None  # median (observed − forecast median); > 0: later than forecast
    mae_s: float | None  # median |observed − forecast median|
    p90_count: int  # attempts whose forecast has a 90th percentile
    p90_cover: float | None  # share of those that came by it (calibrated: 0.9)


@dataclass(frozen=True, slots=True)
class PredictionMetrics:
    """How good the plan's estimates were (None parts: the log had no such predictions)."""

    start_count: int
    start_bias_s: float | None  # mean (dispatch − predicted start); > 0: later than predicted
    start_mae_s: float | None
    start_p90_abs_s: float | None
    overall: Calibration | None
    by_class: Mapping[str, Calibration]
    first_token: TimeForecast
    finish: TimeForecast


@dataclass(frozen=True, slots=True)
class RunMetrics:
    """Everything the report says about one run."""

    path: str
    run_id: str
    policy: str
    engine: str
    started_at: str | None
    workload_fingerprint: str | None
    complete: bool
    duration_s: float
    overall: GroupMetrics
    by_class: Mapping[str, GroupMetrics]  # slo class -> metrics
    by_model: Mapping[str, GroupMetrics]  # model -> metrics
    instances: tuple[InstanceMetrics, ...]
    operations: OperationCounts
    predictions: PredictionMetrics | None
    per_operation: tuple[OperationStat, ...] = ()


def run_duration_s(run: RunLog) -> float:
    """run.json ``duration_s``, else the latest time in the log (a crashed run)."""
    if run.meta.get("duration_s") is not None:
        return float(run.meta["duration_s"])
    times = [run.requests[c].max() for c in ("arrival_s", "dispatch_s", "first_token_s")]
    times += [run.requests["finish_s"].max(), run.operations["time_s"].max()]
    valid = [float(t) for t in times if pd.notna(t)]
    return max(valid, default=0.0)


def class_weights(run: RunLog) -> dict[str, float]:
    """SLO class -> weight, from run.json ``slo_classes``."""
    classes = run.meta.get("slo_classes") or {}
    return {name: float((spec or {}).get("weight", 1.0)) for name, spec in classes.items()}


def request_table(run: RunLog) -> pd.DataFrame:
    """One row per request (its final attempt) with derived columns.

    Adds ``arrival_s`` (earliest), ``first_dispatch_s``, ``met``, ``weight``, ``ttft_s``,
    ``e2e_s`` (finished only) and ``queue_s``; indexed by ``request_id``.
    """
    att = run.requests
    by_req = att.groupby("request_id")
    out = run.final_attempts.set_index("request_id")
    out["arrival_s"] = by_req["arrival_s"].min()
    out["first_dispatch_s"] = by_req["dispatch_s"].min()
    finished = out["outcome"] == Outcome.FINISHED
    out["met"] = finished & out["slo_met"].eq(True)
    out["weight"] = out["slo_class"].map(class_weights(run)).fillna(1.0).astype(float)
    out["ttft_s"] = (by_req["first_token_s"].min() - out["arrival_s"]).where(finished)
    out["e2e_s"] = (out["finish_s"] - out["arrival_s"]).where(finished)
    out["queue_s"] = out["first_dispatch_s"] - out["arrival_s"]
    return out


def group_metrics(req: pd.DataFrame, duration_s: float) -> GroupMetrics:
    """Metrics of the requests in ``req`` (rows of :func:`request_table`)."""
    outcome = req["outcome"]
    finished = req[outcome == Outcome.FINISHED]
    n, met = len(req), int(req["met"].sum())
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    prompt = int(finished["prompt_tokens"].fillna(0).sum())
    output = int(finished["output_tokens"].fillna(0).sum())
    weight = float(req["weight"].sum())
    return GroupMetrics(
        requests=n,
        met=met,
        finished=len(finished),
        failed=int((outcome == Outcome.FAILED).sum()),
        rejected=int((outcome == Outcome.REJECTED).sum()),
        cancelled=int((outcome == Outcome.CANCELLED).sum()),
        unfinished=int((outcome == Outcome.EVICTED).sum()),
        attainment=met / n if n else None,
        weighted_attainment=float((req["weight"] * req["met"]).sum()) / weight if n else None,
        goodput_rps=met * per_s,
        request_throughput_rps=len(finished) * per_s,
        output_throughput_tps=output * per_s,
        total_token_throughput_tps=(prompt + output) * per_s,
        prompt_tokens=prompt,
        output_tokens=output,
        ttft=LatencyStats.from_values(req["ttft_s"]),
        tpot=LatencyStats.from_values(finished["tpot_s"]),
        e2e=LatencyStats.from_values(req["e2e_s"]),
        queue=LatencyStats.from_values(req["queue_s"]),
    )


def busy_seconds(attempts: pd.DataFrame, duration_s: float) -> pd.Series:
    """instance_id -> length of the union of its attempts' [dispatch, finish] intervals.

    An attempt without ``finish_s`` (crashed run) is taken to run to the end.
    """
    iv = attempts.dropna(subset=["instance_id", "dispatch_s"])
    iv = pd.DataFrame(
        {
            "instance_id": iv["instance_id"],
            "start": iv["dispatch_s"].clip(0.0, duration_s),
            "end": iv["finish_s"].fillna(duration_s).clip(0.0, duration_s),
        }
    ).sort_values(["instance_id", "start"])
    # NOTE: an interval opens a new busy block when it starts after every earlier
    # interval of its instance has ended (the running max of ends, shifted by one).
    reach = iv.groupby("instance_id")["end"].cummax()
    prev_reach = reach.groupby(iv["instance_id"]).shift()
    block = (prev_reach.isna() | (iv["start"] > prev_reach)).cumsum()
    blocks = iv.groupby(block).agg(instance_id=("instance_id", "first"), s=("start", "min"))
    blocks["e"] = iv.groupby(block)["end"].max()
    return (blocks["e"] - blocks["s"]).groupby(blocks["instance_id"]).sum()


def instance_metrics(run: RunLog, duration_s: float) -> tuple[InstanceMetrics, ...]:
    """Utilisation of every instance named in run.json or in the attempts."""
    gpus = {str(i["id"]): i.get("gpu") for i in run.meta.get("instances") or []}
    busy = busy_seconds(run.requests, duration_s)
    attempts = run.requests["instance_id"].dropna().value_counts()
    ids = list(gpus) + sorted(set(attempts.index) - set(gpus))
    return tuple(
        InstanceMetrics(
            instance_id=i,
            gpu=gpus.get(i),
            attempts=int(attempts.get(i, 0)),
            busy_s=float(busy.get(i, 0.0)),
            utilisation=float(busy.get(i, 0.0)) / duration_s if duration_s > 0 else 0.0,
        )
        for i in ids
    )


def operation_counts(run: RunLog) -> OperationCounts:
    """Counts of serving operations and failed/rejected attempts."""
    ops = run.operations
    kinds = ops["kind"].value_counts()
    duration = ops["duration_s"].fillna(0.0)
    outcomes = run.requests["outcome"].value_counts()
    return OperationCounts(
        swaps=int(kinds.get("swap", 0)),
        wakes=int(kinds.get("wake", 0)),
        sleeps=int(kinds.get("sleep", 0)),
        evictions=int(kinds.get("evict", 0)),
        replans=int(kinds.get("replan", 0)),
        instance_downs=int(kinds.get("instance_down", 0)),
        failed_attempts=int(outcomes.get(Outcome.FAILED, 0)),
        rejected_attempts=int(outcomes.get(Outcome.REJECTED, 0)),
        swap_time_s=float(duration[ops["kind"].isin(["swap", "wake"])].sum()),
        solver_time_s=solver_time_s(run),
    )


def solver_time_s(run: RunLog) -> float:
    """The policy's wall-clock solve time: run.json ``solver_wall_s`` (the only record of
    it in a simulated run), else Σ ``duration_s`` of the re-plans (older logs)."""
    if run.meta.get("solver_wall_s") is not None:
        return float(run.meta["solver_wall_s"])
    ops = run.operations
    return float(ops.loc[ops["kind"] == "replan", "duration_s"].fillna(0.0).sum())


_OP_ORDER = ("swap", "wake", "sleep", "evict", "replan", "instance_down", "instance_up")


def eviction_tokens(run: RunLog) -> tuple[int, int, int]:
    """(kept, lost, recomputed) output/prompt tokens of a run's evictions (module docstring)."""
    att = run.requests
    if att.empty:
        return 0, 0, 0
    evicted = att[att["outcome"] == Outcome.EVICTED]
    out = evicted["output_tokens"].fillna(0)
    kept_col = evicted["kept_tokens"] if "kept_tokens" in evicted else pd.Series(dtype=float)
    kept = kept_col.reindex(evicted.index).fillna(0)
    lost = (out - kept).clip(lower=0)
    # the attempt after each evicted one re-prefills its prompt (plus the output resumed)
    key = pd.MultiIndex.from_arrays([evicted["request_id"], evicted["attempt"] + 1])
    nxt = att.set_index(["request_id", "attempt"]).reindex(key).dropna(subset=["prompt_tokens"])
    resumed = nxt["resumed_tokens"].fillna(0) if "resumed_tokens" in nxt else 0
    cached = nxt["cached_tokens"].fillna(0) if "cached_tokens" in nxt else 0
    recomputed = (nxt["prompt_tokens"] + resumed - cached).clip(lower=0)
    return int(kept.sum()), int(lost.sum()), int(recomputed.sum())


def operation_stats(run: RunLog) -> tuple[OperationStat, ...]:
    """Count, seconds and (evictions) tokens of every operation kind in the run."""
    ops = run.operations
    kinds = list(dict.fromkeys([*_OP_ORDER, *sorted(ops["kind"].dropna().unique())]))
    out = []
    for kind in kinds:
        rows = ops[ops["kind"] == kind]
        if rows.empty:
            continue
        tokens: tuple[int | None, int | None, int | None] = (None, None, None)
        if kind == "evict":
            tokens = eviction_tokens(run)
        seconds = (
            solver_time_s(run) if kind == "replan" else float(rows["duration_s"].fillna(0.0).sum())
        )
        out.append(OperationStat(kind, len(rows), seconds, *tokens))
    return tuple(out)


def _calibration(forecast: pd.Series, missed: pd.Series) -> Calibration:
    return Calibration(
        requests=len(forecast),
        predicted_miss_rate=float(forecast.mean()),
        observed_miss_rate=float(missed.mean()),
        brier=float(((forecast - missed) ** 2).mean()),
    )


def forecast_rows(attempts: pd.DataFrame, what: str) -> pd.DataFrame:
    """The ``attempts`` (run-log rows) whose first forecast of ``what`` (``first_token``
    or ``finish``) can be set against what happened: both times known, and for
    ``finish`` the attempt finished."""
    done = attempts.dropna(subset=[f"predicted_{what}_s", f"{what}_s"])
    if what == "finish":
        done = done[done["outcome"] == Outcome.FINISHED]
    return done


def time_forecast(attempts: pd.DataFrame, what: str) -> TimeForecast:
    """How the first forecast of ``what`` of each of ``attempts`` compares with what
    happened, over :func:`forecast_rows`."""
    done = forecast_rows(attempts, what)
    err = done[f"{what}_s"] - done[f"predicted_{what}_s"]
    bounded = done.dropna(subset=[f"predicted_{what}_p90_s"])
    within = bounded[f"{what}_s"] <= bounded[f"predicted_{what}_p90_s"]
    return TimeForecast(
        count=len(err),
        bias_s=float(err.median()) if len(err) else None,
        mae_s=float(err.abs().median()) if len(err) else None,
        p90_count=len(within),
        p90_cover=float(within.mean()) if len(within) else None,
    )


def prediction_metrics(run: RunLog, req: pd.DataFrame) -> PredictionMetrics | None:
    """Predicted against observed, or None if the log holds no predictions."""
    att = run.requests
    started = att.dropna(subset=["predicted_start_s", "dispatch_s"])
    err = started["dispatch_s"] - started["predicted_start_s"]
    forecasts = (
        att.dropna(subset=["predicted_miss_prob"])
        .sort_values(["request_id", "attempt"])
        .groupby("request_id")["predicted_miss_prob"]
        .first()
    )
    if err.empty and forecasts.empty:
        return None
    scored = pd.DataFrame(
        {
            "p": forecasts.astype(float),
            "missed": (~req.loc[forecasts.index, "met"]).astype(float),
            "slo_class": req.loc[forecasts.index, "slo_class"],
        }
    )
    by_class = {
        str(name): _calibration(g["p"], g["missed"]) for name, g in scored.groupby("slo_class")
    }
    return PredictionMetrics(
        start_count=len(err),
        start_bias_s=float(err.mean()) if len(err) else None,
        start_mae_s=float(err.abs().mean()) if len(err) else None,
        start_p90_abs_s=float(np.percentile(err.abs(), 90)) if len(err) else None,
        overall=_calibration(scored["p"], scored["missed"]) if len(scored) else None,
        by_class=by_class,
        first_token=time_forecast(att, "first_token"),
        finish=time_forecast(att, "finish"),
    )


def run_metrics(run: RunLog) -> RunMetrics:
    """All metrics of one run (see the module docstring for the definitions)."""
    duration = run_duration_s(run)
    req = request_table(run)
    classes = list(class_weights(run))
    classes += sorted(set(req["slo_class"].dropna()) - set(classes))
    models = sorted(req["model"].dropna().unique())
    meta = run.meta
    return RunMetrics(
        path=str(run.path),
        run_id=str(meta.get("run_id") or run.path.name),
        policy=str(meta.get("policy") or "?"),
        engine=str(meta.get("engine") or "?"),
        started_at=meta.get("started_at"),
        workload_fingerprint=meta.get("workload_fingerprint"),
        complete=run.complete,
        duration_s=duration,
        overall=group_metrics(req, duration),
        by_class={c: group_metrics(req[req["slo_class"] == c], duration) for c in classes},
        by_model={m: group_metrics(req[req["model"] == m], duration) for m in models},
        instances=instance_metrics(run, duration),
        operations=operation_counts(run),
        predictions=prediction_metrics(run, req),
        per_operation=operation_stats(run),
    )
