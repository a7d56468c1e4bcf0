"""Does the planner's engine model agree with the simulated engine it stands in for?

A backlog of requests waiting at once on one instance (llama-3.1-8b, shipped A100 and A10
profiles), told the true output lengths: the ``edf`` policy's plan predicts each request's
first token with the planner's slot model (:mod:`qlmctl.plan.slots`); the simulated
engine then serves the same requests in the plan's order. Per backlog it prints the
median over requests of (simulated - predicted first token) / simulated (< 0: the slot
model is slow) and the same for the last request, over a grid of GPUs, median prompt and
output lengths, and spreads: ``uniform`` (every request alike) and ``mixed`` (log-normal,
sigma 0.8, prompts clipped to 16k tokens). Writes ``benchmarks/results/engine_agreement.json``.

Usage: ``.venv/bin/python benchmarks/engine_agreement.py`` (a few seconds).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.policies.scenarios import SCENARIOS
from qlmctl.domain import Request, SLOClass
from qlmctl.engine.events import FirstToken
from qlmctl.engine.sim import SimEngine
from qlmctl.fileio import atomic_write_text
from qlmctl.plan.policies import make_policy
from qlmctl.plan.types import InstanceState, QueueSnapshot
from qlmctl.profile.store import ProfileStore

RESULTS = Path(__file__).resolve().parent / "results" / "engine_agreement.json"
GPUS = ("A100", "A10")
LENGTHS = ((300, 30), (300, 300), (2000, 30), (2000, 300), (8000, 30), (8000, 300))
SPREADS = {"uniform": 0.0, "mixed": 0.8}
BACKLOG_TOKENS = 1_000_000  # prompt tokens per backlog (minutes of work on an A100)
SLO = SLOClass(name="c", ttft_s=1e6)


def backlog(model: str, prompt: int, output: int, sigma: float, seed: int) -> list[Request]:
    """About ``BACKLOG_TOKENS`` prompt tokens of requests waiting at t=0, in order."""
    rng = np.random.default_rng(seed)
    n = max(50, BACKLOG_TOKENS // prompt)
    prompts = np.clip(np.exp(np.log(prompt) + sigma * rng.standard_normal(n)), 4, 16_000)
    outputs = np.clip(np.exp(np.log(output) + sigma * rng.standard_normal(n)), 1, 2_000)
    return [
        Request(
            id=f"r{k}",
            arrival_s=k * 1e-4,
            model=model,
            slo_class=SLO.name,
            prompt_tokens=int(p),
            max_output_tokens=int(o),
            output_tokens=int(o),
        )
        for k, (p, o) in enumerate(zip(prompts, outputs, strict=True))
    ]


def agreement(gpu: str, prompt: int, output: int, spread: str) -> dict[str, Any]:
    """Slot model against the simulated engine on one backlog (see the module docstring)."""
    base = SCENARIOS["A-mixed"].cluster(4)
    inst = next(i for i in base.instances if i.gpu == gpu)
    cluster = base.model_copy(update={"instances": [inst]})
    perf = ProfileStore.load(None).for_cluster(cluster)
    assert inst.model is not None
    reqs = backlog(inst.model, prompt, output, SPREADS[spread], seed=prompt + output)
    now = reqs[-1].arrival_s
    snap = QueueSnapshot(
        now,
        tuple(reqs),
        (InstanceState(inst.id, gpu, inst.model, True, 0.0),),
        {SLO.name: SLO},
        perf,
    )
    plan = make_policy("edf", clairvoyant=True).plan(snap, np.random.default_rng(0))
    predicted = {
        rid: ft
        for ip in plan.instances
        for g in ip.groups
        for rid, ft in zip(g.request_ids, g.request_first_token_s, strict=True)
    }
    order = [rid for ip in plan.instances for g in ip.groups for rid in g.request_ids]
    by_id = {r.id: r for r in reqs}
    engine = SimEngine(cluster, perf)
    for rid in order:
        engine.submit(by_id[rid], inst.id, 0, now)
    served: dict[str, float] = {}
    while (t := engine.next_event_time()) is not None:
        served.update(
            (ev.request_id, ev.time_s) for ev in engine.advance(t) if isinstance(ev, FirstToken)
        )
    sim = np.array([served[r] - now for r in order])
    pred = np.array([predicted[r] - now for r in order])
    return {
        "gpu": gpu,
        "prompt": prompt,
        "output": output,
        "spread": spread,
        "requests": len(order),
        "sim_median_s": float(np.median(sim)),
        "sim_last_s": float(sim[-1]),
        "median_rel_err": float(np.median((sim - pred) / np.maximum(sim, 1e-9))),
        "last_rel_err": float((sim[-1] - pred[-1]) / sim[-1]),
    }


def main() -> None:
    rows = [
        agreement(gpu, p, o, spread)
        for gpu, (p, o), spread in itertools.product(GPUS, LENGTHS, SPREADS)
    ]
    print("first token, simulated - predicted, relative to simulated (< 0: the model is slow)")
    print(f"{'gpu':>5} {'prompt':>6} {'output':>6} {'spread':>8} {'requests':>8} "
          f"{'sim median s':>12} {'median err':>10} {'last err':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['gpu']:>5} {r['prompt']:>6} {r['output']:>6} {r['spread']:>8} "
              f"{r['requests']:>8} {r['sim_median_s']:>12.1f} {r['median_rel_err']:>10.1%} "
              f"{r['last_rel_err']:>8.1%}")  # fmt: skip
    summary = {
        spread: float(np.median([abs(r["median_rel_err"]) for r in rows if r["spread"] == spread]))
        for spread in SPREADS
    }
    print("median |error| over the grid: " + ", ".join(f"{k} {v:.1%}" for k, v in summary.items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        RESULTS, json.dumps({"median_abs_rel_err": summary, "backlogs": rows}, indent=2) + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
