"""The planning problem as arrays: groups x instances, built once per snapshot.

How it works: :func:`build_problem` turns a snapshot and its groups into numpy arrays
that every policy, the scorer and the MILP share: per group its model, size, weight,
absolute deadline and release time; per (group, instance) eligibility and the fluid cost
coefficients of the profile (prefill seconds of the group's prompts, decode seconds per
output token at a full batch); per instance the resident model, when it is free, and the
swap time from any model (or none) to any model.

Fluid service model (one group at a time per instance, the engine at a full batch):
``service = prefill_s + output_tokens * decode_s_per_token``. A group meets its SLO when
its last request can start by the group's deadline: ``start + lag * service <= deadline``
with ``lag = max(0, 1 - full_batch / size)`` (requests beyond one batch wait for slots;
a full batch is ``max_num_seqs`` or what the KV cache holds, :meth:`PerfModel.full_batch`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from qlmctl.domain import Request
from qlmctl.errors import BadInput
from qlmctl.plan.groups import RequestGroup
from qlmctl.plan.types import QueueSnapshot, RunningRequest
from qlmctl.profile.perfmodel import PerfModel
from qlmctl.profile.store import swap_time_s


def decode_s_per_token(perf: PerfModel, context_tokens: float) -> float:
    """Decode seconds per output token at a full batch with this mean context.

    A full batch is ``max_num_seqs`` sequences, or as many as the KV cache holds at this
    context (on a small GPU the cache, not ``max_num_seqs``, bounds the batch).
    """
    batch = perf.full_batch(context_tokens)
    return (
        perf.step_base_s / batch
        + perf.decode_s_per_seq
        + perf.decode_s_per_ctx_token * (context_tokens)
    )


@dataclass(frozen=True)
class Problem:
    """Array view of one planning instance (G groups, I instances, M models)."""

    now_s: float
    groups: tuple[RequestGroup, ...]
    instance_ids: tuple[str, ...]
    models: tuple[str, ...]  # model index -> name; index M means "no model"
    class_names: tuple[str, ...]
    group_model: np.ndarray  # [G] model index
    group_class: np.ndarray  # [G] class index
    size: np.ndarray  # [G] requests
    weight: np.ndarray  # [G] class weight
    deadline_s: np.ndarray  # [G] absolute
    release_s: np.ndarray  # [G] first arrival
    eligible: np.ndarray  # [G, I] bool
    lag: np.ndarray  # [G, I] fraction of service before the group's last request starts
    prefill_s: np.ndarray  # [G, I] seconds (inf where not eligible)
    decode_spt: np.ndarray  # [G, I] seconds per output token (inf where not eligible)
    init_model: np.ndarray  # [I] model index, M for none
    ready_s: np.ndarray  # [I] when the instance can start new work
    swap_s: np.ndarray  # [I, M+1, M] seconds to switch from (model or none) to model
    running: tuple[RunningRequest, ...] = ()  # in flight, they delay their instance
    running_instance: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # [R]
    running_spt: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [R] s per token

    @property
    def num_groups(self) -> int:
        """G."""
        return len(self.groups)

    @property
    def num_instances(self) -> int:
        """I."""
        return len(self.instance_ids)

    def total_weight(self) -> float:
        """Sum of weight * size over all groups (the attainment denominator)."""
        return float(np.sum(self.weight * self.size))


def build_problem(
    snapshot: QueueSnapshot,
    groups: Sequence[RequestGroup],
    expected_output: Callable[[Request], float],
) -> Problem:
    """Arrays for ``groups`` on the snapshot's instances.

    ``expected_output`` (expected output tokens of a request) sets the mean decode context.

    Raises:
        BadInput: no groups, no live instance, or a group no instance can serve.
    """
    if not groups:
        raise BadInput("nothing to plan: there are no waiting requests")
    insts = snapshot.instances
    if not any(inst.up for inst in insts):
        raise BadInput("nothing can be planned: no instance is up")
    models = tuple(sorted({g.model for g in groups} | {i.model for i in insts if i.model}))
    midx = {m: k for k, m in enumerate(models)}
    classes = tuple(sorted({g.slo_class for g in groups}))
    n_g, n_i, n_m = len(groups), len(insts), len(models)

    eligible = np.zeros((n_g, n_i), bool)
    pre = np.full((n_g, n_i), np.inf)
    spt = np.full((n_g, n_i), np.inf)
    lag = np.zeros((n_g, n_i))
    for g, grp in enumerate(groups):
        prompts = np.array([r.prompt_tokens for r in grp.requests], float)
        sum_p, sum_p2 = float(prompts.sum()), float(np.dot(prompts, prompts))
        ctx = (sum_p + sum(expected_output(r) for r in grp.requests) / 2) / grp.size
        for i, inst in enumerate(insts):
            perf = snapshot.perf.get((grp.model, inst.gpu))
            if perf is None or not inst.can_serve(grp.model):
                continue
            eligible[g, i] = True
            pre[g, i] = perf.prefill_work_s(sum_p, sum_p2)
            spt[g, i] = decode_s_per_token(perf, ctx)
            lag[g, i] = max(0.0, 1.0 - perf.full_batch(ctx) / grp.size)
        if not eligible[g].any():
            raise BadInput(
                f"no live instance can serve model {grp.model!r} ({grp.size} waiting requests "
                f"of class {grp.slo_class!r}); check the cluster's models and the profiles "
                f"for pairs ({grp.model}, <gpu>)"
            )

    swap = np.full((n_i, n_m + 1, n_m), np.inf)
    for i, inst in enumerate(insts):
        for t, to in enumerate(models):
            perf_to = snapshot.perf.get((to, inst.gpu))
            if perf_to is None:
                continue
            asleep = to in inst.sleeping_models
            swap[i, n_m, t] = swap_time_s(perf_to, None, asleep)
            for f, frm in enumerate(models):
                perf_from = snapshot.perf.get((frm, inst.gpu))
                swap[i, f, t] = 0.0 if f == t else swap_time_s(perf_to, perf_from, asleep)

    running, run_inst, run_spt = [], [], []
    for i, inst in enumerate(insts):
        for rr in inst.running:
            perf = snapshot.perf.get((rr.request.model, inst.gpu))
            if perf is None:
                continue  # a model without profile here: nothing to predict, no delay
            ctx = rr.request.prompt_tokens + expected_output(rr.request) / 2
            running.append(rr)
            run_inst.append(i)
            run_spt.append(decode_s_per_token(perf, ctx))

    return Problem(
        now_s=snapshot.now_s,
        groups=tuple(groups),
        instance_ids=tuple(i.instance_id for i in insts),
        models=models,
        class_names=classes,
        group_model=np.array([midx[g.model] for g in groups], int),
        group_class=np.array([classes.index(g.slo_class) for g in groups], int),
        size=np.array([g.size for g in groups], float),
        weight=np.array([g.weight for g in groups], float),
        deadline_s=np.array([g.deadline_s for g in groups], float),
        release_s=np.array([g.release_s for g in groups], float),
        eligible=eligible,
        lag=lag,
        prefill_s=pre,
        decode_spt=spt,
        init_model=np.array([midx[i.model] if i.model else n_m for i in insts], int),
        ready_s=np.array([max(snapshot.now_s, i.ready_at_s) for i in insts], float),
        swap_s=swap,
        running=tuple(running),
        running_instance=np.array(run_inst, int),
        running_spt=np.array(run_spt, float),
    )
