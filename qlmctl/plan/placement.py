"""Which model each instance holds: the first stage of ``qlm``'s stochastic program.

Why: a change of model costs a load (a minute for a cold start) and a drain, and pays
only over the minutes after it, so a plan of one snapshot never sees its worth (the
heuristic's swaps and the group program's never paid in E-twomodels, where the best
fixed placement beats round robin by 6.5 points). So the placement is decided on its
own, over a horizon, against the arrivals to come, and held.

The program (Pyomo, HiGHS), all chosen before any run of it:

- Time buckets end :data:`EDGES_S` seconds from now (the horizon is 5 minutes, several
  cold starts; fine where TTFT deadlines fall, coarse after).
- First stage: ``x[i, m]`` = instance i holds model m over the horizon (binary, at most
  one model each). Holding m, i works from ``avail[i, m]``: its running requests' mean
  slot time if m is its model, else their longest (the drain) plus the load. Capacity in
  bucket b is the part of b after ``avail``.
- Second stage, per scenario s of the arrival rates (drawn from their posterior given
  the recent window, each holding for that scenario's horizon, as the scorer's
  scenarios do): work items are the waiting requests per (model, class, release bucket,
  due bucket) and each stream's arrivals per arrival bucket (due a TTFT later).
  ``y[j, t, b, s]`` requests of item j served in bucket b (between release and due) on
  instances of type t (alike instances, same work per request: in a full batch, the
  time at the busy engine's rate). Per (model, type, bucket, scenario), their work fits
  the capacity of the type's instances holding the model (a fluid EDF schedule per
  model: Horn's condition per bucket, with releases).
- Objective: expected weighted requests served by their due; those due after the
  horizon count :data:`BEYOND_VALUE` of theirs (served late in it they are not lost),
  and a change costs :data:`CHANGE_TIE` (ties keep the placement).

The decision: the program's placement replaces the standing one only where it gains at
least :data:`MIN_GAIN` weighted requests in expectation over keeping it (the same
program with the placement fixed) and loses in no more than ``1 - MIN_SHARE`` of the
scenarios; an instance that changed keeps its model :data:`HOLD_S` seconds. Holding is
how the plan sees it: groups of other models may not go there
(:func:`restrict`), so the core swaps the instance when a group of its model heads its
queue.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyomo.environ as pe

from qlmctl.plan import highs
from qlmctl.plan.estimator import ARRIVAL_HORIZON_S, Scenarios, arrival_rates, horizons
from qlmctl.plan.problem import Problem

EDGES_S = np.array([0.0, 10, 20, 30, 45, 60, 90, 120, 180, 240, 300])
BEYOND_VALUE = 0.01  # of a request due after the horizon, served within it
CHANGE_TIE = 1e-3  # weighted requests a change of model costs in the objective
MIN_GAIN = 1.0  # weighted requests a new placement must gain in expectation
MIN_SHARE = 0.8  # of the scenarios where it may not lose
HOLD_S = ARRIVAL_HORIZON_S  # a changed instance keeps its model this long


@dataclass(frozen=True)
class Targets:
    """A placement: instance -> model, and when each instance last changed model."""

    models: Mapping[str, str]
    changed_s: Mapping[str, float]


@dataclass(frozen=True)
class Decision:
    """One run of the program: the placement it leaves standing and why."""

    models: dict[str, str]  # instance -> model
    changed: tuple[str, ...]  # instances whose model it changed
    gain: float  # expected weighted requests over keeping the standing placement
    share: float  # of the scenarios where it does not lose
    build_s: float
    solve_s: float


def has_choice(problem: Problem) -> bool:
    """Whether some instance may hold more than one of the problem's models."""
    return bool(((problem.batch > 0).sum(axis=0) > 1).any())


def standing(problem: Problem, targets: Targets | None) -> np.ndarray:
    """[I] the model index each instance holds under ``targets`` (else its own; M: none)."""
    out = problem.init_model.copy()
    if targets is not None:
        index = {m: k for k, m in enumerate(problem.models)}
        for i, iid in enumerate(problem.instance_ids):
            name = targets.models.get(iid)
            if name in index:
                out[i] = index[name]
    return out


def restrict(problem: Problem, held: np.ndarray) -> Problem:
    """``problem`` with each instance taking only groups of the model it holds (``held``,
    M: any); a group no instance would then take keeps its instances."""
    m_count = len(problem.models)
    keep = (held[None, :] >= m_count) | (problem.group_model[:, None] == held[None, :])
    eligible = problem.eligible & keep
    orphans = ~eligible.any(axis=1)
    eligible[orphans] = problem.eligible[orphans]
    return replace(problem, eligible=eligible)


def decide(
    problem: Problem,
    mean: Scenarios,
    targets: Targets | None,
    rng: np.random.Generator,
    scenarios: int,
    time_limit_s: float,
) -> Decision:
    """Run the program for ``problem`` (``mean``: its mean scenario) and decide."""
    t0 = time.perf_counter()
    pb = problem
    held = standing(pb, targets)
    fixed = {}  # instances still holding a change: i -> model
    if targets is not None:
        for i, iid in enumerate(pb.instance_ids):
            since = targets.changed_s.get(iid)
            if since is not None and pb.now_s - since < HOLD_S and held[i] < len(pb.models):
                fixed[i] = int(held[i])
    data = _data(pb, mean, rng, scenarios, held, fixed)
    model = _model(data)
    keep = [(model.x[i, m], float(held[i] == m)) for i, m in data["pairs"]]
    built = time.perf_counter()
    best = highs.run(model, max(time_limit_s - (built - t0), 0.0) / 2, 1e-4, start=keep)
    names = dict(zip(pb.instance_ids, _names(pb, held), strict=True))
    chosen = {i: m for i, m in data["pairs"] if (best.value(model.x[i, m]) or 0.0) > 0.5}
    moved = [i for i, m in chosen.items() if m != held[i]]
    if not moved:
        return Decision(names, (), 0.0, 1.0, built - t0, best.solve_s)
    ours = _served(model, best, data)
    for var, value in keep:
        var.fix(value)
    base = highs.run(model, max(time_limit_s - (time.perf_counter() - t0), 0.0), 1e-4)
    solve_s = time.perf_counter() - built
    if not base.has_solution:
        return Decision(names, (), 0.0, 0.0, built - t0, solve_s)
    gains = ours - _served(model, base, data)
    gain, share = float(gains.mean()), float((gains >= -1e-6).mean())
    if gain < MIN_GAIN or share < MIN_SHARE:
        return Decision(names, (), gain, share, built - t0, solve_s)
    for i in moved:
        names[pb.instance_ids[i]] = pb.models[chosen[i]]
    changed = tuple(pb.instance_ids[i] for i in moved)
    return Decision(names, changed, gain, share, built - t0, solve_s)


def _names(pb: Problem, held: np.ndarray) -> list[str]:
    """Each instance's model name under ``held`` ("" for none)."""
    return [pb.models[m] if m < len(pb.models) else "" for m in held]


def _bucket(t_s: float) -> int:
    """The bucket holding ``t_s`` seconds from now (the last one after the horizon)."""
    return int(np.clip(np.searchsorted(EDGES_S, t_s, side="right") - 1, 0, len(EDGES_S) - 2))


def _data(
    pb: Problem,
    mean: Scenarios,
    rng: np.random.Generator,
    count: int,
    held: np.ndarray,
    fixed: Mapping[int, int],
) -> dict:
    """The program's data: placements, work items, instance types, capacities."""
    now, horizon = pb.now_s, float(EDGES_S[-1])
    n_m, n_b = len(pb.models), len(EDGES_S) - 1
    # items: (model, release bucket, due bucket) -> requests [S], work [I], value
    items: dict[tuple[int, int, int, float], list] = {}

    def add(
        m: int, release: float, due: float, value: float, n: np.ndarray, work: np.ndarray
    ) -> None:
        beyond = due >= horizon
        key = (m, _bucket(release), _bucket(due), value * (BEYOND_VALUE if beyond else 1.0))
        entry = items.setdefault(key, [np.zeros(count), np.zeros(pb.num_instances), 0.0])
        entry[0] += n
        entry[1] += work * float(n.mean())
        entry[2] += float(n.mean())

    due = np.where(pb.eligible, pb.dispatch_deadline_s(), -np.inf).max(axis=1) - now
    service = mean.service_s[:, :, 0] / pb.size[:, None]  # [G, I] per request
    for g in np.flatnonzero(due >= 0):
        n = np.full(count, pb.size[g])
        add(int(pb.group_model[g]), pb.release_s[g] - now, due[g], pb.weight[g], n, service[g])
    rates = arrival_rates(pb, rng, count)  # [K, S]
    lasts = horizons(count)  # [S]
    for k in range(len(pb.stream_seen)):
        for b in range(n_b):
            lo, hi = EDGES_S[b], EDGES_S[b + 1]
            n = rates[k] * np.clip(np.minimum(hi, lasts) - lo, 0.0, None)
            if n.any():
                mid = (lo + hi) / 2
                work = pb.stream_work_s[k]
                add(int(pb.stream_model[k]), lo, mid + pb.stream_ttft_s[k],
                    pb.stream_weight[k], n, work)  # fmt: skip
    keys = sorted(items)
    work = np.array([items[k][1] / max(items[k][2], 1e-12) for k in keys]).reshape(
        len(keys), pb.num_instances
    )
    # instance types: alike work columns (inf where one may not serve an item)
    cols = np.nan_to_num(work.T, posinf=-1.0).round(9) if keys else np.zeros((pb.num_instances, 0))
    _, type_of = np.unique(cols, axis=0, return_inverse=True)
    type_of = np.asarray(type_of).reshape(-1)
    rep = {int(t): int(np.flatnonzero(type_of == t)[0]) for t in np.unique(type_of)}

    pairs = [
        (i, m) for i in range(pb.num_instances) for m in range(n_m)
        if pb.batch[m, i] > 0 and np.isfinite(pb.swap_s[i, pb.init_model[i], m])
        and fixed.get(i, m) == m
    ]  # fmt: skip
    free = [(e.slots[0] - now).clip(0.0) for e in mean.engines]
    cap = {}
    for i, m in pairs:
        ready = pb.ready_s[i] - now
        if m == pb.init_model[i]:
            avail = ready + float(free[i].mean())
        else:
            avail = ready + float(free[i].max()) + float(pb.swap_s[i, pb.init_model[i], m])
        for b in range(n_b):
            cap[(i, m, b)] = float(np.clip(EDGES_S[b + 1] - max(EDGES_S[b], avail), 0.0, None))
    flows = [
        (j, t, b, s)
        for j, (m, rel, dl, _v) in enumerate(keys)
        for t, i in rep.items() if np.isfinite(work[j, i])
        for b in range(rel, dl + 1)
        for s in range(count)
        if items[keys[j]][0][s] > 0
    ]  # fmt: skip
    return {
        "pairs": pairs,
        "held": [int(h) for h in held],
        "items": [(m, float(v)) for m, _r, _d, v in keys],
        "demand": {
            (j, s): float(items[key][0][s]) for j, key in enumerate(keys) for s in range(count)
        },
        "work": {(j, t): float(work[j, i]) for j in range(len(keys)) for t, i in rep.items()},
        "types": {t: [i for i in range(pb.num_instances) if type_of[i] == t] for t in rep},
        "cap": cap,
        "flows": flows,
        "S": list(range(count)),
    }


def _model(data: dict) -> pe.ConcreteModel:
    """The extensive form for ``data``."""
    m = pe.ConcreteModel(name="qlm_placement")
    pairs, flows, items = data["pairs"], data["flows"], data["items"]
    m.P = pe.Set(dimen=2, initialize=pairs)
    m.F = pe.Set(dimen=4, initialize=flows)
    m.x = pe.Var(m.P, domain=pe.Binary)  # first stage: i holds model k
    m.y = pe.Var(m.F, bounds=(0, None))  # second stage: requests of j served in b on type t
    by_inst: dict[int, list[int]] = {}
    for i, k in pairs:
        by_inst.setdefault(i, []).append(k)
    m.one_model = pe.Constraint(
        list(by_inst), rule=lambda m, i: sum(m.x[i, k] for k in by_inst[i]) <= 1
    )
    served: dict[tuple[int, int], list] = {}
    capacity_use: dict[tuple[int, int, int, int], list] = {}
    for j, t, b, s in flows:
        served.setdefault((j, s), []).append(m.y[j, t, b, s])
        capacity_use.setdefault((items[j][0], t, b, s), []).append((j, m.y[j, t, b, s]))
    demand = data["demand"]
    m.demand = pe.Constraint(
        list(served), rule=lambda m, j, s: sum(served[(j, s)]) <= demand[(j, s)]
    )
    work, cap, types = data["work"], data["cap"], data["types"]

    def fits(m: pe.ConcreteModel, k: int, t: int, b: int, s: int) -> Any:
        supply = sum(cap[(i, k, b)] * m.x[i, k] for i in types[t] if (i, k, b) in cap)
        use = sum(work[(j, t)] * y for j, y in capacity_use[(k, t, b, s)])
        return use <= supply

    m.capacity = pe.Constraint(list(capacity_use), rule=fits)
    prob = 1.0 / len(data["S"])
    held = data["held"]
    changes = sum(1 - m.x[i, k] for i, k in pairs if held[i] == k)
    m.value = pe.Objective(
        expr=prob * sum(items[j][1] * m.y[j, t, b, s] for j, t, b, s in flows)
        - CHANGE_TIE * changes,
        sense=pe.maximize,
    )
    return m


def _served(model: pe.ConcreteModel, solution: highs.Solution, data: dict) -> np.ndarray:
    """[S] weighted requests served by their due in each scenario of ``solution``."""
    out = np.zeros(len(data["S"]))
    items = data["items"]
    for j, t, b, s in data["flows"]:
        out[s] += items[j][1] * (solution.value(model.y[j, t, b, s]) or 0.0)
    return out
