"""Solve a Pyomo model with HiGHS: LP-file translation, then the plain ``highspy`` binding.

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

HIGHS_SHARE = 0.9  # of the budget left after translation that HiGHS's own limit gets


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
class Solution:
    """What one HiGHS run produced; ``value`` reads a variable of the model (None: no
    incumbent, or the variable was not in the written model)."""

    status: str
    has_solution: bool
    objective: float | None
    bound: float | None  # the best bound HiGHS proved on the objective (minimising)
    mip_gap: float | None
    translate_s: float
    solve_s: float
    num_vars: int
    num_constraints: int
    _values: dict[int, float]

    def value(self, var: Any) -> float | None:
        """The incumbent's value of ``var``."""
        return self._values.get(id(var))


def run(
    model: pe.ConcreteModel,
    time_limit_s: float,
    mip_gap: float,
    start: Sequence[tuple[Any, float]] = (),
    interior: bool = False,
) -> Solution:
    """Translate ``model`` and solve it to ``mip_gap`` within ``time_limit_s`` (the
    translation included: HiGHS gets what is left), starting
    from ``start`` ((variable, value) pairs; HiGHS completes the others) if given.

    ``interior``: an LP by the interior-point method without crossover, for its optimal
    value; the solution is then an interior point, not a vertex. On the hindsight
    bound's LPs it took 11 s for A-mixed (8) at 2.5x and 22 s for B-multimodel (8) at
    2.5x, against 34 and 122 s by HiGHS's default (the dual simplex), the same value to
    eight digits. Without crossover it may stop short of a proven optimum (the prefill
    ceiling's LP of B-multimodel at 2.5x ends "Unknown"): the simplex then solves it in
    the time left."""
    t0 = time.perf_counter()
    h = new_highs()
    with tempfile.TemporaryDirectory(prefix="qlmctl-milp-") as tmp:
        path = os.path.join(tmp, "model.lp")
        with open(path, "w", encoding="ascii") as fh:
            info = LPWriter().write(model, fh, symbolic_solver_labels=False)
        h.readModel(path)
    t1 = time.perf_counter()

    def time_left_s(now_s: float) -> float:
        """HiGHS's share of the budget left at ``now_s``.

        NOTE: HiGHS checks its clock between nodes and cleans up after: it overruns its
        limit by a few percent, so it gets :data:`HIGHS_SHARE` of what is left."""
        return max(0.0, HIGHS_SHARE * (float(time_limit_s) - (now_s - t0)))

    variables = [info.symbol_map.bySymbol.get(n) for n in h.getLp().col_names_]
    col_of = {id(v): k for k, v in enumerate(variables) if v is not None}
    h.setOptionValue("time_limit", time_left_s(t1))
    h.setOptionValue("mip_rel_gap", float(mip_gap))
    if interior:
        h.setOptionValue("solver", "ipm")
        h.setOptionValue("run_crossover", "off")
    if start:
        given = {col_of[id(v)]: float(x) for v, x in start if id(v) in col_of}
        idx = np.array(sorted(given), dtype=np.int32)
        h.setSolution(len(idx), idx, np.array([given[k] for k in idx], dtype=np.float64))
    h.run()
    if interior and h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        h.setOptionValue("solver", "simplex")
        h.setOptionValue("time_limit", time_left_s(time.perf_counter()))
        h.run()
    t2 = time.perf_counter()
    info_h = h.getInfo()
    status = h.modelStatusToString(h.getModelStatus())
    has_solution = info_h.primal_solution_status == 2  # kSolutionStatusFeasible
    values: dict[int, float] = {}
    if has_solution:
        col_value = h.getSolution().col_value
        values = {id(v): float(col_value[k]) for k, v in enumerate(variables) if v is not None}
    gap = info_h.mip_gap
    if not len(h.getLp().integrality_):  # an LP: its optimum is its bound
        bound = info_h.objective_function_value if status == "Optimal" else None
    else:
        bound = info_h.mip_dual_bound if np.isfinite(info_h.mip_dual_bound) else None
    return Solution(
        status=status,
        has_solution=has_solution,
        objective=float(info_h.objective_function_value) if has_solution else None,
        bound=float(bound) if bound is not None else None,
        mip_gap=float(gap) if has_solution and np.isfinite(gap) else None,
        translate_s=t1 - t0,
        solve_s=t2 - t1,
        num_vars=h.getNumCol(),
        num_constraints=h.getNumRow(),
        _values=values,
    )
