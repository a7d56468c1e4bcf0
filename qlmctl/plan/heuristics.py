"""Fast plans: group orders and swap-aware least-finish-time placement.

How it works: an *order* is a sequence of group indices (arrival, deadline, class
priority, or a model-batched block order; :func:`shed_order` moves the groups that would
make others late to the back). :func:`greedy_place` walks the order and puts each group
on the eligible instance where it would finish earliest in expectation, counting the
swap from that instance's last model and the group's release time; each instance runs
its groups in the order's sequence. All of it is a few numpy operations per group over
the instances, so hundreds of groups take about a millisecond.

Block order (model batching): groups fall into blocks
``(tier, model)``; the tier is the SLO class (most urgent TTFT first) or a deadline
bucket; blocks run by (tier, earliest deadline in the block); EDF inside a block.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from qlmctl.plan.problem import Problem
from qlmctl.plan.simulate import Queues

Order = list[int]


def fcfs_order(problem: Problem) -> Order:
    """Global arrival order (first arrival of each group)."""
    return sorted(range(problem.num_groups), key=lambda g: (problem.release_s[g], g))


def edf_order(problem: Problem) -> Order:
    """Absolute deadline order."""
    return sorted(range(problem.num_groups), key=lambda g: (problem.deadline_s[g], g))


def priority_order(problem: Problem) -> Order:
    """vLLM priority scheduling: class priority (lower first), then arrival."""
    prio = [grp.priority for grp in problem.groups]
    return sorted(range(problem.num_groups), key=lambda g: (prio[g], problem.release_s[g], g))


def shed_order(
    problem: Problem, mean_service: np.ndarray, mean_free: np.ndarray, order: Order
) -> Order:
    """``order`` with the groups that would make others late moved to the back.

    Under overload, serving every group in ``order`` makes many late; serving the
    hopeless ones last keeps the others in time. The walk follows Moore and Hodgson's
    rule (which minimises late jobs on one machine): groups are placed as
    :func:`greedy_place` would; when one would start too late on its instance, the group
    queued there (it, or one before it) with the most service seconds per weighted
    request is shed, until it is on time or shed itself. A group lost even if started
    first is shed at once.
    """
    n_i = problem.num_instances
    rows = np.arange(n_i)
    per_request = mean_service / (problem.weight * problem.size)[:, None]
    queues: list[list[int]] = [[] for _ in range(n_i)]
    avail = mean_free.astype(float).copy()
    loaded = problem.init_model.copy()
    shed: set[int] = set()

    def replay(i: int) -> tuple[float, bool]:
        """Instance ``i``'s free time after its queue, and whether its last group is late."""
        t, model, late = float(mean_free[i]), int(problem.init_model[i]), False
        for h in queues[i]:
            t += problem.swap_s[i, model, problem.group_model[h]]
            model = int(problem.group_model[h])
            start = max(t, problem.release_s[h])
            t = start + mean_service[h, i]
            late = start + problem.lag[h, i] * mean_service[h, i] > problem.deadline_s[h]
        return t, late

    for g in order:
        m = problem.group_model[g]
        start = np.maximum(avail + problem.swap_s[rows, loaded, m], problem.release_s[g])
        ok = problem.eligible[g]
        first = np.maximum(mean_free[ok], problem.release_s[g])
        if np.min(first + problem.lag[g, ok] * mean_service[g, ok]) > problem.deadline_s[g]:
            shed.add(g)  # lost even if it went first
            continue
        i = int(np.argmin(start + mean_service[g]))
        queues[i].append(g)
        avail[i], loaded[i] = start[i] + mean_service[g, i], m
        late = start[i] + problem.lag[g, i] * mean_service[g, i] > problem.deadline_s[g]
        while late and g not in shed:
            victim = max(queues[i], key=lambda h: per_request[h, i])
            queues[i].remove(victim)
            shed.add(victim)
            avail[i], late = replay(i)
            loaded[i] = problem.group_model[queues[i][-1]] if queues[i] else problem.init_model[i]
    return [g for g in order if g not in shed] + [g for g in order if g in shed]


def shed_blocks(
    problem: Problem,
    mean_service: np.ndarray,
    mean_free: np.ndarray,
    order: Order,
    block_of: list[int],
) -> tuple[Order, list[int]]:
    """A block order after :func:`shed_order`, with its blocks renumbered in sequence."""
    block = dict(zip(order, block_of, strict=True))
    shed = shed_order(problem, mean_service, mean_free, order)
    runs = np.cumsum([k == 0 or block[g] != block[shed[k - 1]] for k, g in enumerate(shed)])
    return shed, [int(b) - 1 for b in runs]


def block_order(problem: Problem, bucket_s: float | None = None) -> tuple[Order, list[int]]:
    """Model-batched order and the block index of each position.

    Args:
        problem: the planning problem.
        bucket_s: deadline bucket width for the tier; None: the tier is the SLO class,
            most urgent (smallest TTFT) first.
    """
    if bucket_s is None:
        ttft = {g.slo_class: g.deadline_s - g.release_s for g in problem.groups}
        rank = {c: k for k, c in enumerate(sorted(ttft, key=lambda c: (ttft[c], c)))}
        tier = [rank[g.slo_class] for g in problem.groups]
    else:
        tier = [int((d - problem.now_s) // bucket_s) for d in problem.deadline_s]
    blocks: dict[tuple[int, int], list[int]] = {}
    for g in edf_order(problem):
        blocks.setdefault((tier[g], int(problem.group_model[g])), []).append(g)
    ranked = sorted(blocks.items(), key=lambda kv: (kv[0][0], problem.deadline_s[kv[1][0]]))
    order: Order = []
    block_of: list[int] = []
    for b, (_key, members) in enumerate(ranked):
        order.extend(members)
        block_of.extend([b] * len(members))
    return order, block_of


def greedy_place(
    problem: Problem,
    mean_service: np.ndarray,
    mean_free: np.ndarray,
    order: Order,
    fixed: Mapping[int, int] | None = None,
) -> Queues:
    """Place groups in ``order``, each where it finishes earliest in expectation.

    Args:
        problem: the planning problem.
        mean_service: [G, I] expected service seconds (inf where not eligible).
        mean_free: [I] expected time each instance is free of its running work.
        order: the sequence to place and run groups in.
        fixed: group -> instance for groups whose instance is already chosen.
    """
    fixed = fixed or {}
    n_i = problem.num_instances
    avail = mean_free.astype(float).copy()
    loaded = problem.init_model.copy()
    rows = np.arange(n_i)
    queues: list[list[int]] = [[] for _ in range(n_i)]
    for g in order:
        m = problem.group_model[g]
        start = np.maximum(avail + problem.swap_s[rows, loaded, m], problem.release_s[g])
        finish = start + mean_service[g]
        i = fixed[g] if g in fixed else int(np.argmin(finish))
        avail[i] = finish[i]
        loaded[i] = m
        queues[i].append(g)
    return tuple(tuple(q) for q in queues)
