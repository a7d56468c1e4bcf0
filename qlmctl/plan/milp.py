"""The two-stage stochastic program (formulation F2) in Pyomo, solved by HiGHS.

How it works (the team notes, research/solver.md, F2): groups run in one fixed
sequence (positions ``j``; blocks ``b`` are its runs of one model). The first
stage chooses the instance of each group (``a[j,i]``) or defers it (``d[j]``: it runs
after all the others, takes none of their capacity and counts as missed; under overload,
which groups to give up is the decision that matters). A loaded-model state machine
(``l[i,b,m]``, the "no model" state included) counts swaps exactly, with the cost of the
actual (from, to) pair (``sw[i,b,f]``). The second stage, per scenario ``s``, chains
finish times ``L[j,i,s]`` along each instance's positions and sets the miss indicator
``z[j,s]`` through a big-M row that is tight per row. The objective minimises expected
weighted missed requests plus ``swap_cost`` per swap second (named Expressions
``first_stage_cost`` and ``second_stage_cost[s]``); service times, free times and the
big-M values are mutable Params. Semantics match :func:`qlmctl.plan.simulate.simulate`
on the groups not deferred.

Data first (:func:`scenario_data`, pure Python), model second (:func:`build_model`).
:func:`solve` translates through Pyomo's LP writer and drives ``highspy`` directly:
Pyomo's contrib HiGHS interface captures the process's stdout/stderr file descriptors
while translating and solving (unsafe beside a serving loop in another thread) and has
no MIP start; the LP-file route is also about 2x cheaper to translate.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highspy
import numpy as np
import pyomo.environ as pe
from pyomo.repn.plugins.lp_writer import LPWriter

from qlmctl.plan.estimator import Scenarios
from qlmctl.plan.problem import Problem
from qlmctl.plan.simulate import Queues

DEFAULT_SWAP_COST = 0.01  # weighted requests per second of swap (breaks ties against swaps)


def scenario_data(
    problem: Problem,
    scen: Scenarios,
    sequence: Sequence[int],
    block_of: Sequence[int],
    swap_cost: float = DEFAULT_SWAP_COST,
) -> dict[str, Any]:
    """Everything the model needs, as plain Python containers.

    Args:
        problem: the planning problem.
        scen: the in-sample scenarios (equally likely).
        sequence: group index at each position j (the fixed order).
        block_of: block index of each position (one model per block).
        swap_cost: objective cost per swap second.
    """
    n_m = len(problem.models)
    pos_group = [int(g) for g in sequence]
    block_model = {
        int(b): int(problem.group_model[g]) for g, b in zip(pos_group, block_of, strict=True)
    }
    insts = range(problem.num_instances)
    pairs = [(j, i) for j, g in enumerate(pos_group) for i in insts if problem.eligible[g, i]]
    chain: dict[int, list[int]] = {i: [] for i in insts}
    for j, i in pairs:
        chain[i].append(j)
    ib: list[tuple[int, int]] = []
    for i in insts:
        for b in sorted({int(block_of[j]) for j in chain[i]}):
            ib.append((i, b))
    prev_block = {}
    for k, (i, b) in enumerate(ib):
        prev_block[(i, b)] = ib[k - 1][1] if k and ib[k - 1][0] == i else None

    due = problem.dispatch_deadline_s()
    svc, free, big_m, prev, first = {}, {}, {}, {}, set()
    n_s = scen.count
    for i in insts:
        js = chain[i]
        if not js:
            continue
        gs = [pos_group[j] for j in js]
        p = scen.service_s[gs, i, :]  # [n, S]
        swaps = problem.swap_s[i][np.isfinite(problem.swap_s[i])]
        max_swap = float(swaps.max()) if swaps.size else 0.0
        new_block = [k == 0 or block_of[js[k]] != block_of[js[k - 1]] for k in range(len(js))]
        blocks_so_far = np.cumsum(new_block)
        rel = np.maximum.accumulate(problem.release_s[gs])
        ub = np.maximum(scen.free_s[i][None, :], rel[:, None]) + np.cumsum(p, axis=0)
        ub += (blocks_so_far * max_swap)[:, None]
        for k, j in enumerate(js):
            prev[(j, i)] = js[k - 1] if k else None
            if k == 0 or block_of[j] != block_of[js[k - 1]]:
                first.add((j, i))
            for s in range(n_s):
                svc[(j, i, s)] = float(p[k, s])
                big_m[(j, i, s)] = max(0.0, float(ub[k, s] - due[pos_group[j], i]))
        for s in range(n_s):
            free[(i, s)] = float(scen.free_s[i, s])
    states = list(range(n_m + 1))  # n_m is "no model"
    return {
        "J": list(range(len(pos_group))),
        "I": [i for i in insts if chain[i]],
        "S": list(range(n_s)),
        "states": states,
        "pairs": pairs,
        "ib": ib,
        "prev_block": prev_block,
        "block_model": block_model,
        "block_of": [int(b) for b in block_of],
        "init": {i: int(problem.init_model[i]) for i in insts},
        "swap": {
            (i, f, t): float(problem.swap_s[i, f, t])
            for i in insts
            for f in states
            for t in range(n_m)
            if np.isfinite(problem.swap_s[i, f, t])
        },
        "prev": prev,
        "first": first,
        "p": svc,
        "free": free,
        "big_m": big_m,
        "release": {j: float(problem.release_s[g]) for j, g in enumerate(pos_group)},
        "due": {(j, i): float(due[pos_group[j], i]) for j, i in pairs},
        "lag": {(j, i): float(problem.lag[pos_group[j], i]) for j, i in pairs},
        "wn": {j: float(problem.weight[g] * problem.size[g]) for j, g in enumerate(pos_group)},
        "prob": 1.0 / n_s,
        "swap_cost": swap_cost,
        "group_of": pos_group,
    }


def build_model(data: dict[str, Any]) -> pe.ConcreteModel:
    """The extensive form of the two-stage program for ``data``."""
    m = pe.ConcreteModel(name="qlm_f2")
    bm, pb, init = data["block_model"], data["prev_block"], data["init"]
    m.J = pe.Set(initialize=data["J"])
    m.S = pe.Set(initialize=data["S"])
    m.A = pe.Set(dimen=2, initialize=data["pairs"])
    m.IB = pe.Set(dimen=2, initialize=data["ib"])
    m.IBM = pe.Set(dimen=3, initialize=[(i, b, k) for i, b in data["ib"] for k in data["states"]])
    m.IBF = pe.Set(
        dimen=3,
        initialize=[(i, b, f) for i, b in data["ib"] for f in data["states"] if f != bm[b]],
    )
    m.AS = pe.Set(dimen=3, initialize=[(j, i, s) for j, i in data["pairs"] for s in data["S"]])
    m.JS = pe.Set(dimen=2, initialize=[(j, s) for j in data["J"] for s in data["S"]])

    # stochastic inputs
    m.p = pe.Param(m.AS, initialize=data["p"], mutable=True)
    m.free = pe.Param(pe.Any, initialize=data["free"], mutable=True, within=pe.Reals)
    m.big_m = pe.Param(m.AS, initialize=data["big_m"], mutable=True)

    # first stage
    m.a = pe.Var(m.A, domain=pe.Binary)
    m.d = pe.Var(m.J, domain=pe.Binary)
    m.y = pe.Var(m.IB, bounds=(0, 1))
    m.l = pe.Var(m.IBM, domain=pe.Binary)
    m.sw = pe.Var(m.IBF, bounds=(0, 1))
    # second stage
    m.L = pe.Var(m.AS, domain=pe.NonNegativeReals)
    m.z = pe.Var(m.JS, domain=pe.Binary)

    on_inst: dict[int, list[int]] = {}
    for j, i in data["pairs"]:
        on_inst.setdefault(j, []).append(i)

    def loaded_before(i: int, b: int, k: int) -> Any:
        """l of the previous block on i, or the initial state (a constant)."""
        q = pb[(i, b)]
        return m.l[i, q, k] if q is not None else float(init[i] == k)

    m.assign = pe.Constraint(
        m.J, rule=lambda m, j: sum(m.a[j, i] for i in on_inst[j]) + m.d[j] == 1
    )
    m.deferred = pe.Constraint(m.JS, rule=lambda m, j, s: m.z[j, s] >= m.d[j])
    m.use = pe.Constraint(m.A, rule=lambda m, j, i: m.a[j, i] <= m.y[i, data["block_of"][j]])
    m.state_on = pe.Constraint(m.IB, rule=lambda m, i, b: m.l[i, b, bm[b]] >= m.y[i, b])
    m.state_keep = pe.Constraint(
        m.IBM, rule=lambda m, i, b, k: m.l[i, b, k] >= loaded_before(i, b, k) - m.y[i, b]
    )
    m.state_one = pe.Constraint(
        m.IB, rule=lambda m, i, b: sum(m.l[i, b, k] for k in data["states"]) == 1
    )
    m.swap_from = pe.Constraint(
        m.IBF, rule=lambda m, i, b, f: m.sw[i, b, f] >= m.y[i, b] + loaded_before(i, b, f) - 1
    )

    def swap_time(i: int, b: int) -> Any:
        return sum(
            data["swap"][(i, f, bm[b])] * m.sw[i, b, f]
            for f in data["states"]
            if f != bm[b] and (i, f, bm[b]) in data["swap"]
        )

    def chain_rule(m: pe.ConcreteModel, j: int, i: int, s: int) -> Any:
        q = data["prev"][(j, i)]
        before = m.L[q, i, s] if q is not None else m.free[i, s]
        expr = before + m.p[j, i, s] * m.a[j, i]
        if (j, i) in data["first"]:
            expr = expr + swap_time(i, data["block_of"][j])
        return m.L[j, i, s] >= expr

    m.chain = pe.Constraint(m.AS, rule=chain_rule)
    late = [(j, i, s) for j, i, s in m.AS if data["release"][j] > data["free"][(i, s)]]
    m.AR = pe.Set(dimen=3, initialize=late)
    m.release = pe.Constraint(
        m.AR,
        rule=lambda m, j, i, s: m.L[j, i, s] >= (data["release"][j] + m.p[j, i, s]) * m.a[j, i],
    )
    rows = [(j, i, s) for j, i, s in m.AS if data["big_m"][(j, i, s)] > 0]
    m.AM = pe.Set(dimen=3, initialize=rows)

    def miss_rule(m: pe.ConcreteModel, j: int, i: int, s: int) -> Any:
        check = m.L[j, i, s] - (1 - data["lag"][(j, i)]) * m.p[j, i, s] * m.a[j, i]
        return check - data["due"][(j, i)] <= m.big_m[j, i, s] * (1 - m.a[j, i] + m.z[j, s])

    m.miss = pe.Constraint(m.AM, rule=miss_rule)

    m.first_stage_cost = pe.Expression(
        expr=data["swap_cost"] * sum(swap_time(i, b) for i, b in data["ib"])
    )
    m.second_stage_cost = pe.Expression(
        m.S, rule=lambda m, s: sum(data["wn"][j] * m.z[j, s] for j in data["J"])
    )
    m.obj = pe.Objective(
        expr=m.first_stage_cost + data["prob"] * sum(m.second_stage_cost[s] for s in m.S),
        sense=pe.minimize,
    )
    return m


def new_highs() -> Any:
    """A quiet HiGHS instance (the plain binding: no banner on stdout), seeded.

    NOTE: HiGHS sizes one global thread pool at its first run in a process; a later
    instance asking for another thread count fails at once (status "Not Set"). So no
    instance sets ``threads``: all share whatever pool the process has.
    """
    h = highspy._core._Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("random_seed", 0)
    return h


@dataclass(frozen=True)
class MilpResult:
    """What one solve produced."""

    instance_of: list[int] | None  # group -> instance index, -1 deferred; None: no incumbent
    objective: float | None  # expected weighted misses + swap cost
    status: str
    mip_gap: float | None
    build_s: float
    translate_s: float
    solve_s: float
    num_vars: int
    num_constraints: int


def solve(
    problem: Problem,
    scen: Scenarios,
    sequence: Sequence[int],
    block_of: Sequence[int],
    warm: Queues | None = None,
    warm_miss: np.ndarray | None = None,
    time_limit_s: float = 2.0,
    mip_gap: float = 0.01,
    swap_cost: float = DEFAULT_SWAP_COST,
) -> MilpResult:
    """Build, translate and solve; warm-start from ``warm`` (queues) if given.

    ``warm_miss`` ([G, S]) are the warm start's miss indicators on ``scen``.
    """
    t0 = time.perf_counter()
    data = scenario_data(problem, scen, sequence, block_of, swap_cost)
    model = build_model(data)
    t1 = time.perf_counter()
    h = new_highs()
    with tempfile.TemporaryDirectory(prefix="qlmctl-milp-") as tmp:
        path = os.path.join(tmp, "model.lp")
        with open(path, "w", encoding="ascii") as fh:
            info = LPWriter().write(model, fh, symbolic_solver_labels=False)
        h.readModel(path)
    t2 = time.perf_counter()
    names = list(h.getLp().col_names_)
    col_of = {
        id(obj): k for k, obj in ((k, info.symbol_map.bySymbol.get(n)) for k, n in enumerate(names))
    }
    h.setOptionValue("time_limit", float(time_limit_s))
    h.setOptionValue("mip_rel_gap", float(mip_gap))
    if warm is not None:
        _warm_start(h, model, data, col_of, warm, warm_miss)
    h.run()
    t3 = time.perf_counter()
    status = h.modelStatusToString(h.getModelStatus())
    info_h = h.getInfo()
    has_solution = info_h.primal_solution_status == 2  # kSolutionStatusFeasible
    instance_of = None
    objective = None
    if has_solution:
        values = h.getSolution().col_value
        instance_of = [-1] * len(data["J"])
        for (j, i), var in model.a.items():
            k = col_of.get(id(var))
            if k is not None and values[k] > 0.5:
                instance_of[data["group_of"][j]] = i
        objective = float(info_h.objective_function_value)
    gap = float(info_h.mip_gap) if has_solution and np.isfinite(info_h.mip_gap) else None
    return MilpResult(
        instance_of=instance_of,
        objective=objective,
        status=status,
        mip_gap=gap,
        build_s=t1 - t0,
        translate_s=t2 - t1,
        solve_s=t3 - t2,
        num_vars=h.getNumCol(),
        num_constraints=h.getNumRow(),
    )


def _warm_start(
    h: Any,
    model: pe.ConcreteModel,
    data: dict[str, Any],
    col_of: dict[int, int],
    warm: Queues,
    warm_miss: np.ndarray | None,
) -> None:
    """Give HiGHS the warm start's integer values (it completes the continuous ones)."""
    pos_of = {g: j for j, g in enumerate(data["group_of"])}
    inst_of = {pos_of[g]: i for i, q in enumerate(warm) for g in q}
    values: dict[int, float] = {}

    def put(var: Any, value: float) -> None:
        k = col_of.get(id(var))
        if k is not None:
            values[k] = value

    for (j, i), var in model.a.items():
        put(var, float(inst_of[j] == i))
    for var in model.d.values():
        put(var, 0.0)
    used = {(inst_of[j], data["block_of"][j]) for j in data["J"]}
    state = dict(data["init"])
    for i, b in data["ib"]:
        if (i, b) in used:
            state[i] = data["block_model"][b]
        for k in data["states"]:
            put(model.l[i, b, k], float(state[i] == k))
    if warm_miss is not None:
        for (j, s), var in model.z.items():
            put(var, float(warm_miss[data["group_of"][j], s]))
    idx = np.array(sorted(values), dtype=np.int32)
    h.setSolution(len(idx), idx, np.array([values[k] for k in idx], dtype=np.float64))
