"""Planner scaling and quality: groups G x instances I x MILP scenarios S.

For each cell it prints the Pyomo build, LP translate and HiGHS solve times, the MIP gap,
the fast-path time (heuristic plan + scoring), and the held-out attainment of qlm,
heuristic and edf (all plans scored on the same 300 held-out scenarios). Then, on three
planner cells (G=10/I=4, G=50/I=4, G=50/I=8, S=10), the stochastic program's own plans:
the value of the stochastic solution (S=10 against the mean-value program, S=1, held
out), the expected value of perfect information (the program given the true output
lengths against the S=10 plan, on the truth), its promise (what the S=10 program
expects of its own plan against that plan's held-out score: how much the program's
model of the engine flatters the plans it picks; split into its model against the slot
model on its own ten scenarios, and those scenarios against the held-out ones), what it
expects to gain over the heuristic's assignment (its objective with that assignment
fixed), what a local search on the slot model finds from the heuristic's plan
(:func:`local_search`, on the program's scenarios, scored held out: how much better a
plan of this snapshot there is to find), the MIP gap and the build and solve times, each
cell over ``PROGRAM_INSTANCES`` backlogs (their means; the gap and times
their medians); these go to ``benchmarks/results/planner.json``.

Synthetic, seeded instances: 3 models of different cost, 3 GPU speeds, a backlog of
requests that arrived over the last 0.3 H seconds (H = fluid makespan of the backlog),
interactive TTFT 0.5 H, batch 1.2 H, log-normal output lengths matching the prior.

Run: ``.venv/bin/python benchmarks/planner_scaling.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qlmctl.domain import Request, SLOClass
from qlmctl.fileio import atomic_write_text
from qlmctl.perfmodel import PerfModel
from qlmctl.plan.edf_program import ProgramResult, solve
from qlmctl.plan.estimator import (
    LengthModel,
    Scenarios,
    known_scenario,
    mean_scenario,
    sample_scenarios,
)
from qlmctl.plan.policies import (
    QlmPolicy,
    best_candidate,
    heuristic_candidates,
    make_policy,
    prepare,
    program_queues,
)
from qlmctl.plan.problem import Problem
from qlmctl.plan.simulate import Queues, instance_of, queue_misses, simulate
from qlmctl.plan.types import InstanceState, Plan, QueueSnapshot

MODELS = {"m0": 0.7, "m1": 1.0, "m2": 1.5}  # model -> cost factor
GPUS = {"slow": 1.0, "mid": 1.5, "fast": 2.5}  # gpu -> speed
GROUP_SIZE = 16
RESULTS = Path(__file__).resolve().parent / "results" / "planner.json"
# backlogs per planner cell: one instance's VSS ranged from -1.0 to +5.4 points in a cell
PROGRAM_INSTANCES = 6
SEARCH_MOVES = 20  # improving moves per phase of the local search (the cells took <= 11)


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


def held_out(
    plan: Plan, snap: QueueSnapshot, seed: int, defer_late: bool, count: int = 300
) -> float:
    """Attainment of ``plan`` on ``count`` scenarios independent of the planner's, served
    deferring hopeless requests or not (as its policy's serving style says)."""
    rng = np.random.default_rng(10_000 + seed)
    ctx = prepare(snap, LengthModel(), rng, 1, GROUP_SIZE, defer_late=defer_late)
    scen = sample_scenarios(ctx.problem, LengthModel(), np.random.default_rng(20_000 + seed), count)
    return simulate(ctx.problem, scen, plan_queues(plan, ctx.problem)).attainment


def plan_queues(plan: Plan, problem: object) -> Queues:
    """A plan's queues as group indices of ``problem``."""
    index = {g.group_id: k for k, g in enumerate(problem.groups)}  # type: ignore[attr-defined]
    return tuple(tuple(index[g.group_id] for g in ip.groups) for ip in plan.instances)


def run_cell(g: int, i: int, s: int, seed: int, time_limit: float) -> dict[str, float]:
    """One grid cell: timings and held-out attainments."""
    snap = make_snapshot(g, i, seed)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    heuristic = make_policy("heuristic", scenarios=50, max_group_size=GROUP_SIZE)
    heur = heuristic.plan(snap, rng)
    fast_ms = (time.perf_counter() - t0) * 1000
    edf_policy = make_policy("edf", scenarios=50, max_group_size=GROUP_SIZE)
    edf = edf_policy.plan(snap, rng)
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
        "edf": held_out(edf, snap, seed, edf_policy.serving.defers_late),
        "heuristic": held_out(heur, snap, seed, heuristic.serving.defers_late),
        "qlm": held_out(q, snap, seed, qlm.serving.defers_late),
    }


def main() -> None:
    """Print the grid, then VSS and the clairvoyant gap on the multi-model cells."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few cells only")
    ap.add_argument(
        "--time-limit", type=float, default=2.0, help="the program's budget: build + solve"
    )
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
    print("\nthe stochastic program on the planner cells (held-out: 300 sampled scenarios;")
    print("truth: the true output lengths); VSS = stochastic S=10 - mean-value S=1 plan,")
    print("EVPI = the program given the truth - the S=10 plan, both on the truth;")
    print("promise = what the S=10 program expects of its plan - its held-out score (model:")
    print("its objective - the slot model's score on its scenarios; sampling: the rest);")
    print("gain = what it expects over the heuristic's assignment; search = a local search")
    print("from the heuristic's plan on the program's scenarios, held out - the heuristic")
    print(f"{'G':>4} {'I':>3} {'run':>4} {'heur':>6} {'mean-value':>10} {'stochastic':>10} "
          f"{'VSS pts':>8} {'EVPI pts':>8} {'promise':>8} {'model':>6} {'sampl':>6} "
          f"{'gain':>6} {'search':>6} {'gap':>6} {'build s':>8} {'solve s':>8}")  # fmt: skip
    cells = {}
    for g, i in [(10, 4), (50, 4), (50, 8)]:
        runs = [
            program_cell(g, i, seed=7 * g + i + 1000 * k, time_limit=args.time_limit)
            for k in range(PROGRAM_INSTANCES)
        ]
        c = cells[f"G{g}-I{i}-S10"] = summarise_cell(runs)
        for name, r in [*((f"#{k}", r) for k, r in enumerate(runs)), ("mean", c)]:
            print(f"{g:>4} {i:>3} {name:>4} {r['heuristic']:>6.3f} {r['mean_value']:>10.3f} "
                  f"{r['stochastic']:>10.3f} {r['vss_pts']:>8.1f} {r['evpi_pts']:>8.1f} "
                  f"{r['promise_pts']:>8.1f} {r['promise_model_pts']:>6.1f} "
                  f"{r['promise_sampling_pts']:>6.1f} {r['program_gain_pts']:>6.1f} "
                  f"{r['search_pts']:>6.1f} {r['mip_gap']:>6.3f} {r['build_s']:>8.2f} "
                  f"{r['solve_s']:>8.2f}")  # fmt: skip
    seeds = range(5)
    runs = [gap_run(50, 8, seed, args.time_limit) for seed in seeds]
    gap50 = {
        "seeds": len(runs),
        "median_mip_gap": float(np.median([r["mip_gap"] for r in runs])),
        "median_build_plus_solve_s": float(np.median([r["build_s"] + r["solve_s"] for r in runs])),
        "runs": runs,
    }
    print(f"\nG=50, I=8, S=10 over {len(runs)} instances: median MIP gap "
          f"{gap50['median_mip_gap']:.3f}, median build + solve "
          f"{gap50['median_build_plus_solve_s']:.2f} s")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    out = {"time_limit_s": args.time_limit, "cells": cells, "G50-I8-S10": gap50}
    atomic_write_text(RESULTS, json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(f"wrote {RESULTS}")


def summarise_cell(runs: list[dict[str, float]]) -> dict[str, Any]:
    """A planner cell over its instances: the mean of each figure (the median of the
    gap and the times), each instance's VSS and EVPI beside them."""
    means = (
        "G", "heuristic", "mean_value", "stochastic", "vss_pts", "evpi_pts", "promise_pts",
        "promise_model_pts", "promise_sampling_pts", "program_gain_pts", "search_pts",
        "search_in_sample_pts",
    )  # fmt: skip
    out: dict[str, Any] = {k: float(np.mean([r[k] for r in runs])) for k in means}
    for k in ("mip_gap", "build_s", "solve_s"):
        out[k] = float(np.median([r[k] for r in runs]))
    out["instances"] = len(runs)
    out["vss_pts_by_instance"] = [r["vss_pts"] for r in runs]
    out["evpi_pts_by_instance"] = [r["evpi_pts"] for r in runs]
    return out


def gap_run(g: int, i: int, seed: int, time_limit: float) -> dict[str, float]:
    """One solve of the program as qlm runs it (S=10, warm-started from the heuristic)."""
    snap = make_snapshot(g, i, 1000 + seed)
    ctx = prepare(snap, LengthModel(), np.random.default_rng(seed), 50, GROUP_SIZE, defer_late=True)
    cands = heuristic_candidates(ctx)
    warm = instance_of(cands[best_candidate(cands)][0], ctx.problem.num_groups)
    scen = sample_scenarios(ctx.problem, LengthModel(), np.random.default_rng(seed + 1), 10)
    res = solve(ctx.problem, scen, warm, time_limit_s=time_limit)
    return {
        "mip_gap": res.mip_gap if res.mip_gap is not None else float("nan"),
        "build_s": res.build_s + res.translate_s,
        "solve_s": res.solve_s,
    }


def program_cell(g: int, i: int, seed: int, time_limit: float) -> dict[str, float]:
    """The program's own plans (the better of its two on its in-sample scenarios) with
    S=1 (mean value), S=10 and the true lengths, scored held-out and on the truth."""
    snap = make_snapshot(g, i, seed)
    # served as qlm serves its plans: hopeless requests deferred
    ctx = prepare(snap, LengthModel(), np.random.default_rng(seed), 50, GROUP_SIZE, defer_late=True)
    pb = ctx.problem
    held = sample_scenarios(pb, LengthModel(), np.random.default_rng(20_000 + seed), 300)
    truth = known_scenario(pb)
    cands = heuristic_candidates(ctx)
    best = best_candidate(cands)
    warm = instance_of(cands[best][0], pb.num_groups)
    order = cands[best][2]

    def program_plan(in_sample: Scenarios) -> tuple[Queues, ProgramResult]:
        res = solve(pb, in_sample, warm, time_limit_s=time_limit)
        assert res.instance_of is not None, res.status
        plans = program_queues(ctx, res, order).values()
        return max(plans, key=lambda q: simulate(pb, in_sample, q).attainment), res

    in_sample = sample_scenarios(pb, LengthModel(), np.random.default_rng(seed + 1), 10)
    mv, _ = program_plan(mean_scenario(pb, LengthModel()))
    st, res = program_plan(in_sample)
    ws, _ = program_plan(truth)
    # the program's objective with the heuristic's assignment fixed (one choice per group)
    fixed = solve(pb, in_sample, warm, time_limit_s=time_limit, max_choices=1)
    heur = cands[best][0]
    searched = local_search(pb, in_sample, heur, order)
    total = pb.total_weight()
    # each plan's attainment on each scenario set, scored once
    plans = {"heur": heur, "mv": mv, "st": st, "searched": searched}
    on_held = {k: simulate(pb, held, q).attainment for k, q in plans.items()}
    on_sample = {
        k: simulate(pb, in_sample, plans[k]).attainment for k in ("heur", "st", "searched")
    }
    expected = -(res.objective or 0.0) / total  # what the S=10 program expects of its plan
    return {
        "G": float(pb.num_groups),
        "heuristic": on_held["heur"],
        "mean_value": on_held["mv"],
        "stochastic": on_held["st"],
        "vss_pts": 100 * (on_held["st"] - on_held["mv"]),
        "evpi_pts": 100 * (simulate(pb, truth, ws).attainment - simulate(pb, truth, st).attainment),
        # what the S=10 program expects of its plan (its objective: on-time weighted
        # requests less the tiny swap cost) over what the plan scores held out
        "promise_pts": 100 * (expected - on_held["st"]),
        # the promise, split: the program's model against the slot model on its own
        # scenarios, then those ten scenarios against the held-out ones
        "promise_model_pts": 100 * (expected - on_sample["st"]),
        "promise_sampling_pts": 100 * (on_sample["st"] - on_held["st"]),
        # what the program expects its plan to gain over the heuristic's assignment
        "program_gain_pts": 100 * ((fixed.objective or 0.0) - (res.objective or 0.0)) / total,
        # what a local search on the slot model finds from the heuristic's plan, held out
        "search_pts": 100 * (on_held["searched"] - on_held["heur"]),
        "search_in_sample_pts": 100 * (on_sample["searched"] - on_sample["heur"]),
        "mip_gap": res.mip_gap if res.mip_gap is not None else float("nan"),
        "build_s": res.build_s + res.translate_s,
        "solve_s": res.solve_s,
    }


def local_search(pb: Problem, scen: Scenarios, queues: Queues, order: Sequence[int]) -> Queues:
    """The plan a best-improvement local search on the slot model reaches from ``queues``
    on ``scen``: single groups moved to another eligible instance (at their place in
    ``order``), then single groups moved to another place in their queue, at most
    :data:`SEARCH_MOVES` improving moves each. A trial scores only the queues it changes."""
    rank = {g: k for k, g in enumerate(order)}
    qs = [list(q) for q in queues]
    misses = [queue_misses(pb, scen, i, q) for i, q in enumerate(qs)]

    def insert(q: list[int], g: int) -> list[int]:
        k = next((j for j, x in enumerate(q) if rank[x] > rank[g]), len(q))
        return [*q[:k], g, *q[k:]]

    def moves() -> Iterator[dict[int, list[int]]]:
        for a, q in enumerate(qs):
            for g in q:
                for b in np.flatnonzero(pb.eligible[g]):
                    if b != a:
                        yield {a: [x for x in q if x != g], int(b): insert(qs[b], g)}

    def reorders() -> Iterator[dict[int, list[int]]]:
        for a, q in enumerate(qs):
            for k, g in enumerate(q):
                rest = q[:k] + q[k + 1 :]
                for j in range(len(q)):
                    if j != k:
                        yield {a: [*rest[:j], g, *rest[j:]]}

    for trials in (moves, reorders):
        for _ in range(SEARCH_MOVES):
            # each trial's changed queues with their misses, scored once
            scored = [
                {i: (q, queue_misses(pb, scen, i, q)) for i, q in t.items()} for t in trials()
            ]
            gains = [(sum(misses[i] - m for i, (_q, m) in t.items()), t) for t in scored]
            gain, best = max(gains, key=lambda x: x[0], default=(0.0, {}))
            if gain <= 1e-9:
                break
            for i, (q, m) in best.items():
                qs[i], misses[i] = q, m
    return tuple(tuple(q) for q in qs)


if __name__ == "__main__":
    main()
