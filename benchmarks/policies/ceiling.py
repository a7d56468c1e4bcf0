"""The prefill ceiling: at most this share of a workload's requests can meet their TTFT
target on the simulated engine, whatever the policy.

How it works: a request's first token comes only after its whole prompt is prefilled,
inside its window ``[arrival, arrival + TTFT target - the instance's ttft_overhead_s]``.
An engine step that prefills ``c`` tokens (``c <= max_num_batched_tokens``) takes at
least ``step_base_s + prefill_s_per_token * c + prefill_s_per_token2 * c**2 / 1000``
(decodes only add to it), so each (model, GPU) pair prefills at most one token per
:func:`seconds_per_token`. The LP relaxes everything else: prefill work is fluid,
preemptible and may be split over instances and moved between them; no decode, no KV
limit, no admission gap, no prefix cache (the simulator caches only an evicted request's
own tokens, prefilled earlier in its window). It maximises the requests whose prompts
fit into their windows under each instance's capacity, in time buckets of ``bucket_s``:

- ``x[j]`` in [0, 1]: request j on time;
- ``y[g, i, k]`` >= 0: prompt tokens of group g (the requests of one model and class
  arriving in the same bucket) instance i prefills in bucket k, for every bucket that
  meets the window of one of g's requests there (a wider window: still a relaxation);
- per group, ``sum_ik y[g, i, k] >= sum_j prompt_j x[j]``; per instance and bucket,
  ``sum_g y[g, i, k] * seconds_per_token(model_g, i) <= bucket_s``.

Buckets run to the last short window's end; one tail bucket holds everything after it
(for windows of an hour). Every policy's attainment on the simulated engine is at most
the optimum / the number of requests.

Where it binds: a burst of long prompts (C-longprompt, D-longdoc), whose first tokens
wait for the prefill. Where decode and the batch slots decide (B-multimodel's batch
work), it says little: it knows nothing of them.

Run ``.venv/bin/python -m benchmarks.policies.ceiling`` after the policy sweep: the
ceiling at every point of ``policies.parquet``, beside the policies' attainment and
the hindsight bound, and any run above it (none, or the ceiling is wrong), into
``ceiling.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highspy
import numpy as np
import pandas as pd

from benchmarks.policies import report
from benchmarks.policies.run import HINDSIGHT, _workload
from benchmarks.policies.scenarios import REPO, SCENARIOS, SPAN_S, slo_classes
from qlmctl.domain import ClusterSpec
from qlmctl.fileio import atomic_write_text
from qlmctl.perfmodel import PerfModel
from qlmctl.plan.highs import new_highs
from qlmctl.profile.store import ProfileStore
from qlmctl.workload import Workload

BUCKET_S = 1.0
LONG_TTFT_S = 600.0  # windows longer than this end in the tail bucket


def seconds_per_token(perf: PerfModel) -> float:
    """The least engine time one prefilled token can cost: the best step size's
    ``step_time_s(c, 0, 0) / c`` over ``1 <= c <= max_num_batched_tokens``."""
    c = np.arange(1, perf.max_num_batched_tokens + 1, dtype=float)
    none = np.zeros_like(c)
    return float(np.min(perf.step_time_s(c, none, none) / c))


@dataclass(frozen=True)
class Ceiling:
    """The LP's answer."""

    attainment: float  # the ceiling: requests that can be on time / all requests
    columns: int  # the LP's size


def prefill_ceiling(
    workload: Workload,
    cluster: ClusterSpec,
    perf: Mapping[tuple[str, str], PerfModel],
    bucket_s: float = BUCKET_S,
) -> Ceiling:
    """The share of ``workload``'s requests that can meet their TTFT target at best on
    ``cluster`` (see the module docstring)."""
    reqs = workload.requests
    insts = cluster.instances
    ttft = {name: c.ttft_s for name, c in workload.slo_classes.items()}
    short = [r.arrival_s + ttft[r.slo_class] for r in reqs if ttft[r.slo_class] <= LONG_TTFT_S]
    end_s = max(short, default=max((r.arrival_s for r in reqs), default=0.0))
    n_fine = math.ceil(end_s / bucket_s) + 1  # buckets [k b, (k+1) b); then the tail
    tail_s = max(
        [r.arrival_s + ttft[r.slo_class] for r in reqs if ttft[r.slo_class] > LONG_TTFT_S],
        default=end_s,
    )
    width = np.full(n_fine + 1, bucket_s)
    width[-1] = max(0.0, tail_s - n_fine * bucket_s)
    groups: dict[tuple[str, str, int], int] = {}  # (model, class, arrival bucket) -> row
    row_of = [
        groups.setdefault((r.model, r.slo_class, int(r.arrival_s // bucket_s)), len(groups))
        for r in reqs
    ]

    # columns: x[j] (0 .. n-1), then y[g, i, k]; rows: groups, then (instance, bucket)
    n = len(reqs)
    starts: list[int] = []
    index: list[int] = []
    value: list[float] = []
    for j, r in enumerate(reqs):  # x[j]: in its group's row, -prompt
        starts.append(len(index))
        index.append(row_of[j])
        value.append(-float(r.prompt_tokens))
    cap_row0 = len(groups)
    for (model, cls, b), row in groups.items():
        for i, inst in enumerate(insts):
            if not inst.can_serve(model):
                continue
            p = perf[(model, inst.gpu)]
            last_s = (b + 1) * bucket_s + ttft[cls] - p.ttft_overhead_s  # the widest window
            if last_s <= b * bucket_s:
                continue
            k_end = n_fine + 1 if last_s > n_fine * bucket_s else math.ceil(last_s / bucket_s)
            cost = seconds_per_token(p)
            for k in range(b, k_end):
                starts.append(len(index))
                index += [row, cap_row0 + i * (n_fine + 1) + k]
                value += [1.0, cost]
    num_col = len(starts)
    num_row = cap_row0 + len(insts) * (n_fine + 1)
    starts.append(len(index))

    inf = highspy.kHighsInf
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = num_col, num_row
    lp.col_cost_ = np.concatenate([-np.ones(n), np.zeros(num_col - n)])
    lp.col_lower_ = np.zeros(num_col)
    lp.col_upper_ = np.concatenate([np.ones(n), np.full(num_col - n, inf)])
    lp.row_lower_ = np.concatenate([np.zeros(cap_row0), np.full(num_row - cap_row0, -inf)])
    lp.row_upper_ = np.concatenate([np.full(cap_row0, inf), np.tile(width, len(insts))])
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.array(starts, np.int32)
    lp.a_matrix_.index_ = np.array(index, np.int32)
    lp.a_matrix_.value_ = np.array(value, float)
    h = new_highs()
    h.passModel(lp)
    h.run()
    status = h.modelStatusToString(h.getModelStatus())
    if status != "Optimal":
        raise RuntimeError(f"prefill ceiling: HiGHS ended with {status}")
    on_time = -float(h.getInfo().objective_function_value)
    return Ceiling(min(1.0, on_time / n) if n else 1.0, num_col)


def point_ceilings(frame: pd.DataFrame) -> pd.DataFrame:
    """The ceiling at every (scenario, instances, load) of the sweep's results ``frame``,
    beside each policy's attainment there (the mean over its seeds) and the hindsight
    bound, with the ratio the ceiling allows over ``fcfs``."""
    slo_s = tuple(float(c.ttft_s) for c in slo_classes())  # the sweep's default targets
    att = report.by_point(frame).pivot_table(
        index=["scenario", "instances", "load"], columns="policy", values="attainment"
    )
    rows = []
    for mine in att.reset_index().to_dict("records"):
        scenario, instances, load = str(mine["scenario"]), int(mine["instances"]), mine["load"]
        cluster = SCENARIOS[scenario].cluster(instances)
        perf = ProfileStore.load().for_cluster(cluster)
        workload, _, _ = _workload(scenario, instances, float(load), SPAN_S, slo_s)
        t0 = time.perf_counter()
        ceiling = prefill_ceiling(workload, cluster, perf)
        rows.append(
            {
                "scenario": scenario,
                "instances": instances,
                "load": float(load),
                "ceiling": ceiling.attainment,
                "ceiling_over_fcfs": ceiling.attainment / mine["fcfs"],
                "lp_columns": ceiling.columns,
                "lp_s": time.perf_counter() - t0,
                **{p: float(mine[p]) for p in report.POLICY_ORDER if p in mine},
            }
        )
        print(
            f"{scenario:13} n={instances} load={load:<4g} ceiling={100 * ceiling.attainment:5.1f}%"
            f" ({rows[-1]['lp_s']:.1f} s)",
            flush=True,
        )
    return pd.DataFrame(rows)


def above_ceiling(frame: pd.DataFrame, ceilings: pd.DataFrame) -> pd.DataFrame:
    """Every run of ``frame`` (each seed) that attains more than its point's ceiling."""
    runs = frame[frame["policy"] != HINDSIGHT].merge(
        ceilings[["scenario", "instances", "load", "ceiling"]]
    )
    return runs[runs["attainment"] > runs["ceiling"] + 1e-9]


def markdown(ceilings: pd.DataFrame, above: pd.DataFrame, refs: dict[Any, Any]) -> str:
    """The results table and the checks."""
    policies = [p for p in report.POLICY_ORDER if p in ceilings.columns]
    lines = [
        "# The prefill ceiling (`python -m benchmarks.policies.ceiling`)",
        "",
        "At most this share of each point's requests can meet its TTFT target on the simulated",
        "engine, whatever the policy: their prompts must be prefilled inside their windows,",
        f"at each instance's best tokens per second (an LP in {BUCKET_S:g} s buckets; see",
        "`benchmarks/policies/ceiling.py`). Attainment in % from `policies.parquet` (the mean",
        "over its seeds); `ceiling / fcfs` is the most any policy could attain over `fcfs`.",
        f"Runs above their ceiling: {len(above)} (none, or the ceiling is wrong).",
        "",
        f"| scenario | instances | load | ceiling | {' | '.join(policies)} | ceiling / fcfs |",
        "|---|--:|--:|--:|" + "--:|" * len(policies) + "--:|",
    ]
    for r in ceilings.to_dict("records"):
        ref = refs.get((r["scenario"], r["instances"])) == r["load"]
        load = f"**{r['load']:g}**" if ref else f"{r['load']:g}"
        cells = " | ".join(f"{100 * r[p]:.1f}" for p in policies)
        lines.append(
            f"| {r['scenario']} | {r['instances']} | {load} | {100 * r['ceiling']:.1f} "
            f"| {cells} | {r['ceiling_over_fcfs']:.2f}x |"
        )
    lines += ["", "Bold: the cell's reference load (the lowest where `fcfs` attains <= 50 %)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Compute the ceilings of the sweep in ``--results`` and write them beside it."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.policies.ceiling", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    source = args.results / "policies.parquet"
    if not source.exists():
        print(f"{source}: no sweep results (run python -m benchmarks.policies)", file=sys.stderr)
        return 2
    frame = pd.read_parquet(source)
    ceilings = point_ceilings(frame)
    above = above_ceiling(frame, ceilings)
    refs = report.reference_loads(frame)
    out = args.results / "ceiling.json"
    data = {
        "bucket_s": BUCKET_S,
        "points": ceilings.to_dict("records"),
        "runs_above_ceiling": above[["scenario", "instances", "load", "policy", "seed"]].to_dict(
            "records"
        ),
    }
    atomic_write_text(out, json.dumps(data, indent=1, allow_nan=False) + "\n")
    atomic_write_text(args.results / "ceiling.md", markdown(ceilings, above, refs))
    print(f"wrote {out} and ceiling.md; runs above their ceiling: {len(above)}")
    return 1 if len(above) else 0


if __name__ == "__main__":
    sys.exit(main())
