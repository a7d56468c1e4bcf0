"""Planner scaling and quality: groups G x instances I x MILP scenarios S.

For each cell it prints the Pyomo build, LP translate and HiGHS solve times, the MIP gap,
the fast-path time (heuristic plan + scoring), and the held-out attainment of qlm,
heuristic and edf (all plans scored on the same 300 held-out scenarios). It then reports
the value of the stochastic solution (qlm with S scenarios against the mean-value MILP,
S=1) and the clairvoyant bound (the planner given the true output lengths).

Synthetic, seeded instances: 3 models of different cost, 3 GPU speeds, a backlog of
requests that arrived over the last 0.3 H seconds (H = fluid makespan of the backlog),
interactive TTFT 0.5 H, batch 1.2 H, log-normal output lengths matching the prior.

Run: ``.venv/bin/python benchmarks/planner_scaling.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from qlmctl.domain import Request, SLOClass
from qlmctl.plan.estimator import LengthModel, known_scenario, sample_scenarios
from qlmctl.plan.policies import QlmPolicy, heuristic_candidates, make_policy, prepare
from qlmctl.plan.simulate import Queues, simulate
from qlmctl.plan.types import InstanceState, Plan, QueueSnapshot
from qlmctl.profile.perfmodel import PerfModel

MODELS = {"m0": 0.7, "m1": 1.0, "m2": 1.5}  # model -> cost factor
GPUS = {"slow": 1.0, "mid": 1.5, "fast": 2.5}  # gpu -> speed
GROUP_SIZE = 16


def perf_for(model: str, gpu: str, rng: np.random.Generator) -> PerfModel:
    """A profile whose decode cost scales with model cost / GPU speed."""
    k = MODELS[model] / GPUS[gpu]
    return PerfModel(
        model=model, gpu=gpu, step_base_s=0.01 * k, prefill_s_per_token=2e-5 * k,
        prefill_s_per_token2=0.0, decode_s_per_seq=4e-4 * k, decode_s_per_ctx_token=0.0,
        kv_capacity_tokens=200_000, max_num_seqs=32, max_num_batched_tokens=2048,
        cold_start_s=float(rng.uniform(3, 10)) * MODELS[model], stop_s=1.0,
    )  # fmt: skip


def make_snapshot(n_groups: int, n_inst: int, seed: int) -> QueueSnapshot:
    """A backlog of about ``n_groups`` groups on ``n_inst`` heterogeneous instances."""
    rng = np.random.default_rng(seed)
    perf = {(m, g): perf_for(m, g, rng) for m in MODELS for g in GPUS}
    gpus = list(GPUS)
    models = list(MODELS) if n_inst > 1 else ["m0", "m1"]
    insts = tuple(
        InstanceState(f"i{k}", gpus[k % 3], models[k % len(models)], True, 0.0)
        for k in range(n_inst)
    )
    n_req = n_groups * GROUP_SIZE * 3 // 4
    req_model = rng.choice(models, n_req)
    cls = rng.choice(["interactive", "batch"], n_req)
    out = np.clip(np.exp(np.log(200) + rng.standard_normal(n_req)), 1, 2048).astype(int)
    prompts = rng.integers(50, 400, n_req)
    probe = {m: perf[(m, "mid")] for m in models}
    work = sum((out[k] * probe[req_model[k]].decode_s_per_seq * 1.3) for k in range(n_req)) / sum(
        GPUS[i.gpu] / 1.5 for i in insts
    )
    horizon = float(work)
    arrivals = np.sort(rng.uniform(0, 0.3 * horizon, n_req))
    reqs = tuple(
        Request(
            id=f"r{k}",
            arrival_s=float(arrivals[k]),
            model=str(req_model[k]),
            slo_class=str(cls[k]),
            prompt_tokens=int(prompts[k]),
            max_output_tokens=2048,
            output_tokens=int(out[k]),
        )
        for k in range(n_req)
    )
    classes = {
        "interactive": SLOClass(name="interactive", ttft_s=0.5 * horizon, priority=0),
        "batch": SLOClass(name="batch", ttft_s=1.2 * horizon, priority=1),
    }
    return QueueSnapshot(float(arrivals[-1]), reqs, insts, classes, perf)


def held_out(plan: Plan, snap: QueueSnapshot, seed: int, count: int = 300) -> float:
    """Attainment of ``plan`` on ``count`` scenarios independent of the planner's."""
    ctx = prepare(snap, LengthModel(), np.random.default_rng(10_000 + seed), 1, GROUP_SIZE)
    scen = sample_scenarios(ctx.problem, LengthModel(), np.random.default_rng(20_000 + seed), count)
    return simulate(ctx.problem, scen, plan_queues(plan, ctx.problem)).attainment


def on_truth(plan: Plan, snap: QueueSnapshot) -> float:
    """Attainment of ``plan`` when the true output lengths play out."""
    ctx = prepare(snap, LengthModel(), np.random.default_rng(0), 1, GROUP_SIZE)
    return simulate(
        ctx.problem, known_scenario(ctx.problem), plan_queues(plan, ctx.problem)
    ).attainment


def plan_queues(plan: Plan, problem: object) -> Queues:
    """A plan's queues as group indices of ``problem``."""
    index = {g.group_id: k for k, g in enumerate(problem.groups)}  # type: ignore[attr-defined]
    return tuple(tuple(index[g.group_id] for g in ip.groups) for ip in plan.instances)


def clairvoyant(snap: QueueSnapshot, seed: int) -> float:
    """Best heuristic plan made knowing the true lengths, scored on the truth."""
    ctx = prepare(snap, LengthModel(), np.random.default_rng(seed), 1, GROUP_SIZE)
    truth = known_scenario(ctx.problem)
    ctx = type(ctx)(ctx.problem, truth, truth)
    return max(s.attainment for _q, s, _o, _b in heuristic_candidates(ctx).values())


def run_cell(g: int, i: int, s: int, seed: int, time_limit: float) -> dict[str, float]:
    """One grid cell: timings and held-out attainments."""
    snap = make_snapshot(g, i, seed)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    heur = make_policy("heuristic", scenarios=50, max_group_size=GROUP_SIZE).plan(snap, rng)
    fast_ms = (time.perf_counter() - t0) * 1000
    edf = make_policy("edf", scenarios=50, max_group_size=GROUP_SIZE).plan(snap, rng)
    qlm = QlmPolicy(time_limit_s=time_limit, milp_scenarios=s, max_group_size=GROUP_SIZE)
    q = qlm.plan(snap, np.random.default_rng(seed))
    st = q.solver
    return {
        "G": float(len({gr.group_id for ip in q.instances for gr in ip.groups})),
        "fast_ms": fast_ms,
        "build_s": st.build_s,
        "solve_s": st.solve_s,
        "gap": st.mip_gap if st.mip_gap is not None else float("nan"),
        "status": st.status,  # type: ignore[dict-item]
        "milp_won": float(st.chosen == "milp"),
        "edf": held_out(edf, snap, seed),
        "heuristic": held_out(heur, snap, seed),
        "qlm": held_out(q, snap, seed),
    }


def main() -> None:
    """Print the grid, then VSS and the clairvoyant gap on the multi-model cells."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few cells only")
    ap.add_argument("--time-limit", type=float, default=1.5)
    args = ap.parse_args()
    grid = [(g, i, s) for g in (10, 50, 200) for i in (1, 4, 8, 16) for s in (1, 10, 50)]
    if args.quick:
        grid = [(10, 4, 10), (50, 8, 10), (200, 16, 10)]
    print(f"{'G':>4} {'I':>3} {'S':>3} {'fast ms':>8} {'build+tr s':>10} {'solve s':>8} "
          f"{'gap':>6} {'status':>10} {'edf':>6} {'heur':>6} {'qlm':>6}")  # fmt: skip
    for g, i, s in grid:
        if g * i * s > 200 * 16 * 10:
            print(f"{g:>4} {i:>3} {s:>3}  skipped: extensive form too large for a ~10 min run")
            continue
        r = run_cell(g, i, s, seed=g + i, time_limit=args.time_limit)
        print(f"{r['G']:>4.0f} {i:>3} {s:>3} {r['fast_ms']:>8.1f} {r['build_s']:>10.2f} "
              f"{r['solve_s']:>8.2f} {r['gap']:>6.2f} {r['status']:>10.10} {r['edf']:>6.3f} "
              f"{r['heuristic']:>6.3f} {r['qlm']:>6.3f}")  # fmt: skip
        sys.stdout.flush()
    print("\nvalue of the stochastic solution and clairvoyant gap (held-out attainment)")
    print("(held-out: 300 sampled scenarios; truth: the true output lengths)")
    print(f"{'G':>4} {'I':>3} {'mean-value S=1':>15} {'stochastic S=10':>16} "
          f"{'qlm on truth':>13} {'clairvoyant':>12}")  # fmt: skip
    for g, i in [(10, 4), (50, 4), (50, 8)]:
        snap = make_snapshot(g, i, seed=7 * g + i)
        mv = QlmPolicy(time_limit_s=args.time_limit, milp_scenarios=1, max_group_size=GROUP_SIZE)
        st = QlmPolicy(time_limit_s=args.time_limit, milp_scenarios=10, max_group_size=GROUP_SIZE)
        rng = np.random.default_rng(g)
        a_mv = held_out(mv.plan(snap, rng), snap, g)
        p_st = st.plan(snap, np.random.default_rng(g))
        a_st = held_out(p_st, snap, g)
        print(f"{g:>4} {i:>3} {a_mv:>15.3f} {a_st:>16.3f} {on_truth(p_st, snap):>13.3f} "
              f"{clairvoyant(snap, g):>12.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
