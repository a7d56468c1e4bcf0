"""The two-stage stochastic program (formulation F3, EDF capacity) in Pyomo, by HiGHS.

How it works: each instance serves the work it keeps in deadline order (EDF). For a
single server whose work is all queued, EDF meets every kept deadline exactly when, at
each due date ``D``, the kept work due by ``D`` fits in the capacity before ``D``
(Horn's condition). So the program needs no sequence and no big-M rows:

- First stage (shared by all scenarios): ``x[g,i]`` puts group g on instance i (binary);
  ``u[i,m,q]`` says model m is needed on i by i's q-th due date (it charges one swap
  into m, from the first due date a group of m has there; the resident model is free).
  A swap costs its load time plus the drain of a busy batch (the slots idle until the
  longest running request ends).
- Second stage, per scenario s: ``z[g,i,s]`` in [0, 1] is the share of g's requests
  that miss (continuous: a group's requests are served in order, so any share of them
  can be late; the core serves a request that can no longer make it after the rest of
  the queue, so the share that misses takes no capacity before the others).
  ``W[i,s,q]`` is the kept work on i due by its q-th due date (in scenario s's EDF
  order); Horn's rows ``W[i,s,q] + swaps <= D[i,s,q]`` are the capacity.
- Objective: expected weighted on-time requests, negated, plus ``swap_cost`` per swap
  second (named Expressions ``first_stage_cost`` and ``second_stage_cost[s]``).

Release windows: Horn's condition holds when all work is queued, as at a re-plan. Groups
released later (the hindsight bound's whole run, the expected arrivals of
``look_ahead``) cannot use the time before they arrive, which an instance's capacity
curve counts (it runs every group it may serve, and is busy long before they come):
for each window start ``r`` (the future releases on a :data:`RELEASE_STEP_S` grid), the
kept work of the groups released from ``r`` on that is due by a due date fits in the
time from ``r`` to it (work is time at the busy engine's rate). In C-longprompt at 1x
the bound without these rows kept every request (100 %), where the engine's prefill
alone allows 91.3 % (``benchmarks/policies/ceiling.py``). Without future releases
there are none, and the program is the one above.

Capacity is read off the slot model (:mod:`qlmctl.plan.slots`), so the program's
engine is the scorer's, not a second guess: all groups an instance may serve run, in
deadline order, through a copy of its engine in each scenario; ``D[i,s,q]`` is the work
(each group's time at the busy engine's rate, shared equally by its requests) that
engine has dispatched by the q-th dispatch deadline, and the last request of a group is
on time when the kept work up to it is dispatched by then. Binaries are only the
assignment; the LP relaxation is a fractional assignment of a fluid EDF schedule, so
HiGHS proves small gaps (``benchmarks/planner_scaling.py``). The objective is the
(negated) weighted on-time requests, so the relative gap is relative to what is
served, not to the few misses.

Data first (:func:`scenario_data`, pure Python; one scenario is one
``scenario_creator`` call's worth, which keeps mpi-sppy open), model second
(:func:`build_model`). :func:`solve` translates through Pyomo's LP writer and drives
``highspy`` directly (:mod:`qlmctl.plan.highs`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyomo.environ as pe

from qlmctl.plan import highs
from qlmctl.plan.estimator import Ahead, Scenarios
from qlmctl.plan.problem import Problem
from qlmctl.plan.simulate import first_tokens

DEFAULT_SWAP_COST = 0.01  # weighted requests per second of swap (breaks ties against swaps)
DEFAULT_MAX_CHOICES = 3  # instances each group may go to, with a warm start (_choices)
RELEASE_STEP_S = 20.0  # release windows start on this grid from now (_release_starts)


def scenario_data(
    problem: Problem,
    scen: Scenarios,
    swap_cost: float = DEFAULT_SWAP_COST,
    warm: Sequence[int] | None = None,
    max_choices: int | None = None,
) -> dict:
    """Everything the model needs, as plain Python containers.

    With ``warm`` (group -> instance) and ``max_choices``, each group may go to at most
    that many instances: ``warm``'s and the eligible others with the most room left by
    its due date where ``warm`` puts the rest (:func:`_choices`)."""
    pb = problem
    n_s = scen.count
    eligible = {i: np.flatnonzero(pb.eligible[:, i]) for i in range(pb.num_instances)}
    eligible = {i: gs for i, gs in eligible.items() if gs.size}
    done: dict[int, np.ndarray] = {}  # i -> [n, S] capacity by each eligible group's due
    reach: dict[int, np.ndarray] = {}  # i -> [n, S] the time that capacity is counted by
    drain_s = {}
    for i, gs in eligible.items():
        done[i], reach[i], drain_s[i] = _dispatch_capacity(pb, scen, i, gs)
    pairs = _choices(pb, scen, eligible, done, warm, max_choices)
    rows: list[tuple[int, int, int]] = []  # (i, s, q)
    row_group: dict[tuple[int, int, int], int] = {}  # the group whose due is the q-th
    cap: dict[tuple[int, int, int], float] = {}
    # (i, s, r) -> [(group, room)]: the groups released from r on, in due order, and the
    # work i can do from r to each one's due (see the module doc: release windows)
    later: dict[tuple[int, int, float], list[tuple[int, float]]] = {}
    due_rank: dict[tuple[int, int], int] = {}  # (g, i) -> q of its due date on i (by mean)
    p = {}
    insts = sorted({i for _g, i in pairs})
    mine = {i: [g for g, j in pairs if j == i] for i in insts}
    for i in insts:
        # NOTE: a group that may not go to i adds no work there, so the capacity row at
        # its due is implied by the row before it: only the choices' rows are kept
        k_of = np.flatnonzero(np.isin(eligible[i], mine[i]))
        gs = eligible[i][k_of]
        done_by = done[i][k_of]
        svc = scen.service_s[gs, i, :]  # [n, S]
        reach_by = reach[i][k_of]
        release = pb.release_s[gs]
        starts = _release_starts(release, pb.now_s)
        for s in range(n_s):
            by_due = np.argsort(done_by[:, s], kind="stable")
            for q, k in enumerate(by_due):
                g = int(gs[k])
                rows.append((i, s, q))
                row_group[(i, s, q)] = g
                cap[(i, s, q)] = float(done_by[k, s])
                p[(g, i, s)] = float(svc[k, s])
            for r in starts:
                chain = _binding(
                    [(int(gs[k]), float(svc[k, s]), float(reach_by[k, s]) - r)
                     for k in by_due if release[k] >= r]
                )  # fmt: skip
                if chain:
                    later[(i, s, r)] = chain
        for q, k in enumerate(np.argsort(done_by.mean(axis=1), kind="stable")):
            due_rank[(int(gs[k]), i)] = q
    models_on = {i: sorted({int(pb.group_model[g]) for g in mine[i]}) for i in insts}
    swap = {}
    for i in insts:
        init = int(pb.init_model[i])
        for m in models_on[i]:
            if m != init:
                froms = [pb.swap_s[i, f, m] for f in [*models_on[i], init] if f != m]
                swap[(i, m)] = float(max(x for x in froms if np.isfinite(x))) + drain_s[i]
    n_q = {i: len(mine[i]) for i in insts}
    return {
        "G": list(range(pb.num_groups)),
        "S": list(range(n_s)),
        "pairs": pairs,
        "rows": rows,
        "row_group": row_group,
        "cap": cap,
        "p": p,
        "swap": swap,  # (i, m) -> seconds (load and drain), for non-resident models only
        "IMQ": [(i, m, q) for (i, m) in swap for q in range(n_q[i])],
        "due_rank": due_rank,
        "later": later,
        "group_model": [int(m) for m in pb.group_model],
        "wn": [float(w * n) for w, n in zip(pb.weight, pb.size, strict=True)],
        "prob": 1.0 / n_s,
        "swap_cost": swap_cost,
    }


def _choices(
    problem: Problem,
    scen: Scenarios,
    eligible: dict[int, np.ndarray],
    done: dict[int, np.ndarray],
    warm: Sequence[int] | None,
    max_choices: int | None,
) -> list[tuple[int, int]]:
    """The (group, instance) pairs the program may choose: every eligible one, or per
    group ``warm``'s instance and the ``max_choices - 1`` other eligible instances with
    the most room by its due date (mean capacity less the work ``warm`` puts there due
    no later), the rest dropped.

    NOTE: the program's size (and Pyomo's time to build and write it) grows with the
    pairs: 266 groups on 8 instances made 1,904 pairs and 19,040 capacity rows per 10
    scenarios, 1.8 s to build and write before HiGHS started (B-multimodel at 2.5x)."""
    pb = problem
    if warm is None or max_choices is None or max_choices >= pb.num_instances:
        return [
            (g, i) for g in range(pb.num_groups) for i in range(pb.num_instances)
            if pb.eligible[g, i]
        ]  # fmt: skip
    room = np.full((pb.num_groups, pb.num_instances), -np.inf)
    for i, gs in eligible.items():  # ``done[i]``'s rows are ``gs``
        capacity = done[i].mean(axis=1)
        by_due = np.argsort(capacity, kind="stable")
        placed = np.array([warm[g] == i for g in gs[by_due]], float)
        work = np.cumsum(placed * scen.service_s[gs[by_due], i, :].mean(axis=1))
        room[gs[by_due], i] = capacity[by_due] - work
    pairs = []
    for g in range(pb.num_groups):
        kept = [warm[g]] if 0 <= warm[g] < pb.num_instances and pb.eligible[g, warm[g]] else []
        others = [int(i) for i in np.argsort(-room[g], kind="stable") if room[g, i] > -np.inf]
        others = [i for i in others if i not in kept][: max_choices - len(kept)]
        pairs += [(g, i) for i in sorted(kept + others)]
    return pairs


def _binding(members: list[tuple[int, float, float]]) -> list[tuple[int, float]]:
    """``(group, room)`` of a release window's ``(group, work, room)`` in due order, up
    to the last one whose room is less than the work up to it: the rows after it cannot
    bind (not even with every group kept), so they are left out."""
    total, last = 0.0, -1
    for n, (_g, work, room) in enumerate(members):
        total += work
        if total > room:
            last = n
    return [(g, max(0.0, room)) for g, _work, room in members[: last + 1]]


def _release_starts(release: np.ndarray, now_s: float) -> list[float]:
    """The starts of the release windows: the future releases in ``release``, each
    rounded down to a :data:`RELEASE_STEP_S` step from ``now_s`` (a window that starts
    earlier only allows more)."""
    ahead = release[release > now_s] - now_s
    return sorted({now_s + RELEASE_STEP_S * math.floor(t / RELEASE_STEP_S) for t in ahead})


def _dispatch_capacity(
    problem: Problem, scen: Scenarios, i: int, gs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """([n, S] work (fluid seconds) instance ``i`` has dispatched by each of the groups
    ``gs``'s dispatch deadlines, [n, S] the times that is counted by, the seconds a
    model change idles it), read off the slot model: the groups' requests, in deadline
    order, run through a copy of the instance's engine; each request counts its share of
    its group's time at its dispatch; past the last, work accrues at 1 per s. A model
    change drains the busy batch: the engine idles, on average, from each slot's end to
    the last one's.

    Arrivals going ahead of a group take ``urgent`` of the instance while it waits: as
    in the scorer (:func:`~qlmctl.plan.estimator.arrivals_delay_s`), its wait from now
    stretches by ``1 / (1 - urgent)`` for the scenario's horizon ``h`` (how long they
    keep coming), so its capacity is what is dispatched by ``deadline - urgent *
    min(deadline - now, h)`` (the inverse), not that share of what is dispatched by its
    deadline (the engine's first seconds, its running requests' slots still taken,
    dispatch little)."""
    due = problem.dispatch_deadline_s()[gs, i]
    now = problem.now_s
    # [n, S] the times the work must be dispatched by (the deadline itself where nothing
    # goes ahead, or where it has passed: before now, nothing is dispatched by then)
    left = np.minimum((due - now)[:, None], scen.horizon_s)
    reach = due[:, None] - scen.urgent_load[gs, i] * left
    engine = scen.engines[i].copy()
    starts, shares = [], []
    for g in gs[np.argsort(due, kind="stable")]:
        n = int(problem.size[g])
        decode = np.broadcast_to(scen.decode_s[g, i][:, None], (scen.count, n))
        # nothing goes ahead here: reach has counted it
        start, _ = first_tokens(problem, engine, int(g), i, decode, Ahead.none(scen.count))[:2]
        starts.append(start)
        shares.append(np.broadcast_to((scen.service_s[g, i] / n)[:, None], start.shape))
    start = np.concatenate(starts, axis=1)  # [S, N]
    share = np.concatenate(shares, axis=1)
    by_time = np.argsort(start, axis=1, kind="stable")
    start = np.take_along_axis(start, by_time, axis=1)
    work = np.cumsum(np.take_along_axis(share, by_time, axis=1), axis=1)
    out = np.empty((len(gs), scen.count))
    for s in range(scen.count):
        by = reach[:, s]
        k = np.searchsorted(start[s], by, side="right")  # requests dispatched by then
        done = np.where(k > 0, work[s, np.maximum(k - 1, 0)], 0.0)
        beyond = k == start.shape[1]
        out[:, s] = done + np.where(beyond, by - start[s, -1], 0.0)
    drain_s = float(np.mean(engine.slots.max(axis=1) - engine.slots.mean(axis=1)))
    return out, reach, drain_s


def build_model(data: dict[str, Any]) -> pe.ConcreteModel:
    """The extensive form of the two-stage program for ``data``."""
    m = pe.ConcreteModel(name="qlm_f3")
    pairs, swap = data["pairs"], data["swap"]
    m.A = pe.Set(dimen=2, initialize=pairs)
    m.AS = pe.Set(dimen=3, initialize=[(g, i, s) for g, i in pairs for s in data["S"]])
    m.R = pe.Set(dimen=3, initialize=data["rows"])
    m.U = pe.Set(dimen=3, initialize=data["IMQ"])
    p, cap, row_group = data["p"], data["cap"], data["row_group"]
    swaps_on: dict[int, list[tuple[int, float]]] = {}
    for (i, k), sec in swap.items():
        swaps_on.setdefault(i, []).append((k, sec))

    def kept_bounds(m: pe.ConcreteModel, i: int, s: int, q: int) -> tuple[float, float | None]:
        """Capacity as a bound where no swap shares it."""
        return (0.0, None if i in swaps_on else cap[(i, s, q)])

    m.x = pe.Var(m.A, domain=pe.Binary)  # first stage: where each group runs
    m.u = pe.Var(m.U, bounds=(0, 1))  # first stage: model needed on i by its q-th due
    m.z = pe.Var(m.AS, bounds=(0, 1))  # second stage: share of g's requests that miss
    m.W = pe.Var(m.R, bounds=kept_bounds)  # second stage: kept work due by q

    on: dict[int, list[int]] = {}
    for g, i in pairs:
        on.setdefault(g, []).append(i)
    m.assign = pe.Constraint(data["G"], rule=lambda m, g: sum(m.x[g, i] for i in on[g]) == 1)
    m.miss_only_there = pe.Constraint(m.AS, rule=lambda m, g, i, s: m.z[g, i, s] <= m.x[g, i])

    rank, gm = data["due_rank"], data["group_model"]
    m.needed = pe.Constraint(
        [(g, i) for g, i in pairs if (i, gm[g]) in swap],
        rule=lambda m, g, i: m.u[i, gm[g], rank[(g, i)]] >= m.x[g, i],
    )
    m.needed_later = pe.Constraint(
        [(i, k, q) for i, k, q in data["IMQ"] if q > 0],
        rule=lambda m, i, k, q: m.u[i, k, q] >= m.u[i, k, q - 1],
    )

    # NOTE: the rows are written as sums of monomials (share * x - share * z): Pyomo's LP
    # writer takes its fast path for those, and walks share * (x - z) node by node (the
    # same LP file, byte for byte)
    def kept(m: pe.ConcreteModel, i: int, s: int, q: int) -> Any:
        g = row_group[(i, s, q)]
        before = m.W[i, s, q - 1] if q else 0.0
        share = p[(g, i, s)]
        return m.W[i, s, q] == before + share * m.x[g, i] - share * m.z[g, i, s]

    m.kept = pe.Constraint(m.R, rule=kept)
    # with swaps: the q-th row of scenario s is charged the swaps the mean order's q needs
    m.capacity = pe.Constraint(
        [r for r in data["rows"] if r[0] in swaps_on],
        rule=lambda m, i, s, q: (
            m.W[i, s, q] + sum(sec * m.u[i, k, q] for k, sec in swaps_on[i]) <= cap[(i, s, q)]
        ),
    )
    # release windows: the work of the groups released from r on that is due by a due
    # date fits in the time from r to it (a chain of partial sums, bounded like W)
    chain = [
        (i, s, r, n) for (i, s, r), members in data["later"].items() for n in range(len(members))
    ]
    m.L = pe.Set(dimen=4, initialize=chain)
    m.V = pe.Var(m.L, bounds=lambda m, i, s, r, n: (0.0, data["later"][(i, s, r)][n][1]))

    def released(m: pe.ConcreteModel, i: int, s: int, r: float, n: int) -> Any:
        g = data["later"][(i, s, r)][n][0]
        before = m.V[i, s, r, n - 1] if n else 0.0
        share = p[(g, i, s)]
        return m.V[i, s, r, n] == before + share * m.x[g, i] - share * m.z[g, i, s]

    m.released = pe.Constraint(m.L, rule=released)
    last: dict[int, int] = {}
    for i, _s, q in data["rows"]:
        last[i] = max(last.get(i, 0), q)
    m.first_stage_cost = pe.Expression(
        expr=data["swap_cost"] * sum(sec * m.u[i, k, last[i]] for (i, k), sec in swap.items())
    )
    m.second_stage_cost = pe.Expression(
        data["S"],
        rule=lambda m, s: sum(
            data["wn"][g] * m.z[g, i, s] - data["wn"][g] * m.x[g, i] for g, i in pairs
        ),
    )
    m.obj = pe.Objective(
        expr=m.first_stage_cost + data["prob"] * sum(m.second_stage_cost[s] for s in data["S"]),
        sense=pe.minimize,
    )
    return m


def extract(
    data: dict[str, Any], x: dict[tuple[int, int], float], z: dict
) -> tuple[list[int], list[float]]:
    """(instance of each group, its mean miss share) from a solution's values."""
    inst = [-1] * len(data["G"])
    for (g, i), v in x.items():
        if v > 0.5:
            inst[g] = i
    miss = [0.0] * len(data["G"])
    for (g, i, _s), v in z.items():
        if inst[g] == i:
            miss[g] += v * data["prob"]
    return inst, miss


def queues_of(
    problem: Problem, instance_of: Sequence[int], miss: Sequence[float], sequence: Sequence[int]
) -> tuple[tuple[int, ...], ...]:
    """Each instance's queue: kept groups in model blocks (a block where its first group
    comes in ``sequence``, the resident model's first on a tie), in ``sequence`` inside;
    then the groups the program gives up, in ``sequence``.

    NOTE: ``sequence`` is the heuristic's order, not the program's dispatch deadlines:
    those put a group of long prompts first where its last request's deadline is
    nearest, and its prefill then holds up every group behind it (at one re-plan in
    A-mixed at 2x the heuristic's own assignment scored 73.2 % in that order, 92.2 % in
    its own)."""
    rank = {g: k for k, g in enumerate(sequence)}
    out = []
    for i in range(problem.num_instances):
        gs = sorted((g for g, j in enumerate(instance_of) if j == i), key=rank.__getitem__)
        kept = [g for g in gs if miss[g] < 0.5]
        lost = [g for g in gs if miss[g] >= 0.5]
        first: dict[int, int] = {}
        for g in kept:
            first.setdefault(int(problem.group_model[g]), rank[g])
        resident = int(problem.init_model[i])
        kept.sort(
            key=lambda g: (
                first[int(problem.group_model[g])],
                int(problem.group_model[g]) != resident,
                rank[g],
            )
        )
        out.append(tuple(kept + lost))
    return tuple(out)


@dataclass(frozen=True)
class ProgramResult:
    """What one solve produced."""

    instance_of: list[int] | None  # group -> instance; None: no incumbent
    miss: list[float] | None  # group -> expected share of its requests that miss
    objective: float | None  # swap cost - expected weighted on-time requests
    bound: float | None  # HiGHS's proven bound on the objective (no plan does better)
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
    warm: Sequence[int] | None = None,
    time_limit_s: float = 2.0,
    mip_gap: float = 0.01,
    swap_cost: float = DEFAULT_SWAP_COST,
    relaxed: bool = False,
    max_choices: int | None = DEFAULT_MAX_CHOICES,
) -> ProgramResult:
    """Build and solve within ``time_limit_s`` in all (build, translation and solve);
    ``warm`` (group -> instance) is the MIP start if given, and then each group may go
    to at most ``max_choices`` instances (None: any eligible; :func:`_choices`).
    ``relaxed`` solves the LP relaxation (a group may be split over instances) by the
    interior-point method (:func:`~qlmctl.plan.highs.run`'s ``interior``): its optimum
    bounds the program's, and it solves in a fraction of the time."""
    t0 = time.perf_counter()
    data = scenario_data(problem, scen, swap_cost, warm, max_choices)
    model = build_model(data)
    if relaxed:
        pe.TransformationFactory("core.relax_integer_vars").apply_to(model)
    t1 = time.perf_counter()
    start = []
    if warm is not None:
        start = [(var, float(warm[g] == i)) for (g, i), var in model.x.items()]
    left_s = time_limit_s - (time.perf_counter() - t0)
    sol = highs.run(model, left_s, mip_gap, start, interior=relaxed)
    instance_of = miss = None
    if sol.has_solution:
        x = {k: sol.value(v) or 0.0 for k, v in model.x.items()}
        z = {k: sol.value(v) or 0.0 for k, v in model.z.items()}
        instance_of, miss = extract(data, x, z)
    return ProgramResult(
        instance_of=instance_of,
        miss=miss,
        objective=sol.objective,
        bound=sol.bound,
        status=sol.status,
        mip_gap=sol.mip_gap,
        build_s=t1 - t0,
        translate_s=sol.translate_s,
        solve_s=sol.solve_s,
        num_vars=sol.num_vars,
        num_constraints=sol.num_constraints,
    )
