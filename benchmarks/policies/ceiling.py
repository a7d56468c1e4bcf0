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
work), it says little: it knows nothing of them. The sweep computes it at every point
(a ``ceiling`` row beside ``hindsight``) and counts the runs above it: none, or it is
wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import highspy
import numpy as np

from qlmctl.domain import ClusterSpec
from qlmctl.perfmodel import PerfModel
from qlmctl.plan.highs import new_highs
from qlmctl.workload import Workload

BUCKET_S = 1.0  # a twentieth of the sweep's shortest target (20 s)
LONG_TTFT_S = 600.0  # windows longer than this end in the tail bucket


def seconds_per_token(perf: PerfModel) -> float:
    """The least engine time one prefilled token can cost: the best step size's
    ``step_time_s(c, 0, 0) / c`` over ``1 <= c <= max_num_batched_tokens``."""
    c = np.arange(1, perf.max_num_batched_tokens + 1, dtype=float)
    none = np.zeros_like(c)
    return float(np.min(perf.step_time_s(c, none, none) / c))


def prefill_ceiling(
    workload: Workload,
    cluster: ClusterSpec,
    perf: Mapping[tuple[str, str], PerfModel],
    bucket_s: float = BUCKET_S,
) -> float:
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
    cost = {  # (model, instance) -> seconds per prompt token there
        (model, i): seconds_per_token(perf[(model, inst.gpu)])
        for model in {r.model for r in reqs}
        for i, inst in enumerate(insts)
        if inst.can_serve(model)
    }
    for (model, cls, b), row in groups.items():
        for i, inst in enumerate(insts):
            if not inst.can_serve(model):
                continue
            p = perf[(model, inst.gpu)]
            last_s = (b + 1) * bucket_s + ttft[cls] - p.ttft_overhead_s  # the widest window
            if last_s <= b * bucket_s:
                continue
            k_end = n_fine + 1 if last_s > n_fine * bucket_s else math.ceil(last_s / bucket_s)
            for k in range(b, k_end):
                starts.append(len(index))
                index += [row, cap_row0 + i * (n_fine + 1) + k]
                value += [1.0, cost[(model, i)]]
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
    return min(1.0, on_time / n) if n else 1.0
