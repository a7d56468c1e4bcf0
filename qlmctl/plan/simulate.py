"""Scoring: simulate a candidate plan on S scenarios with the fluid model.

How it works: a candidate is one ordered queue of group indices per instance. Each
instance starts when its running work is done (per scenario); for each group in order it
pays the swap time if the group's model is not the loaded one (exact pair cost from the
problem's swap matrix), waits for the group's release time, then serves it. The group
meets its SLO in a scenario when ``start + lag * service <= deadline``. Everything is
vectorised over scenarios; the loop is over groups only.

The same semantics are what the MILP optimises, so its objective equals this score on its
own scenarios (the brute-force tests check that).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qlmctl.errors import BadInput
from qlmctl.plan.estimator import Scenarios
from qlmctl.plan.problem import Problem

Queues = tuple[tuple[int, ...], ...]  # per instance: group indices in execution order


@dataclass(frozen=True)
class Score:
    """A candidate's predicted outcome on a scenario set."""

    attainment: float  # expected weighted fraction of waiting requests meeting SLO
    by_class: dict[str, float]  # class -> expected fraction meeting SLO
    miss_prob: np.ndarray  # [G]
    start_s: np.ndarray  # [G] mean predicted start
    finish_s: np.ndarray  # [G] mean predicted finish
    swap_s: float  # total swap seconds the plan implies
    expected_misses: float  # expected weighted requests missing SLO
    miss: np.ndarray  # [G, S] bool: group misses its SLO in scenario s


def check_queues(problem: Problem, queues: Queues) -> None:
    """Every group exactly once, on an instance that may serve it; else BadInput."""
    seen = np.zeros(problem.num_groups, int)
    for i, queue in enumerate(queues):
        for g in queue:
            seen[g] += 1
            if not problem.eligible[g, i]:
                raise BadInput(
                    f"group {problem.groups[g].group_id} placed on instance "
                    f"{problem.instance_ids[i]}, which cannot serve {problem.groups[g].model}"
                )
    if len(queues) != problem.num_instances or not (seen == 1).all():
        raise BadInput("a plan must place every group exactly once")


def simulate(problem: Problem, scen: Scenarios, queues: Queues) -> Score:
    """Score ``queues`` on ``scen``."""
    n_g = problem.num_groups
    start = np.zeros((n_g, scen.count))
    finish = np.zeros((n_g, scen.count))
    miss = np.zeros((n_g, scen.count), bool)
    swap_total = 0.0
    for i, queue in enumerate(queues):
        t = scen.free_s[i]
        loaded = int(problem.init_model[i])
        for g in queue:
            m = int(problem.group_model[g])
            if m != loaded:
                swap = float(problem.swap_s[i, loaded, m])
                t = t + swap
                swap_total += swap
                loaded = m
            s = np.maximum(t, problem.release_s[g])
            service = scen.service_s[g, i]
            t = s + service
            start[g], finish[g] = s, t
            miss[g] = s + problem.lag[g, i] * service > problem.deadline_s[g]
    return _summarise(problem, start, finish, miss, swap_total)


def _summarise(
    problem: Problem, start: np.ndarray, finish: np.ndarray, miss: np.ndarray, swap_s: float
) -> Score:
    miss_prob = miss.mean(axis=1)
    wn = problem.weight * problem.size
    misses = float(np.sum(wn * miss_prob))
    met = problem.size * (1 - miss_prob)
    by_class = {}
    for c, name in enumerate(problem.class_names):
        sel = problem.group_class == c
        by_class[name] = float(met[sel].sum() / problem.size[sel].sum())
    return Score(
        attainment=1.0 - misses / problem.total_weight(),
        by_class=by_class,
        miss_prob=miss_prob,
        start_s=start.mean(axis=1),
        finish_s=finish.mean(axis=1),
        swap_s=swap_s,
        expected_misses=misses,
        miss=miss,
    )


def queues_from_assignment(
    problem: Problem, instance_of: Sequence[int], sequence: Sequence[int]
) -> Queues:
    """Queues that run groups in ``sequence`` order, each on ``instance_of[g]``."""
    out: list[list[int]] = [[] for _ in range(problem.num_instances)]
    for g in sequence:
        out[instance_of[g]].append(int(g))
    return tuple(tuple(q) for q in out)
