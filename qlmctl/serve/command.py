"""``qlmctl serve`` as library calls: load and check the inputs, then run a driver.

The CLI only parses options and renders; everything that can go wrong with the inputs
(unknown policy or engine, missing profiles, a model no instance serves, a seed or
timeout out of bounds, a run name that is a path, a run folder that cannot be created)
is a :class:`~qlmctl.errors.BadInput` raised here before anything starts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlmctl.domain import MAX_SEED, ClusterSpec, check_models_served
from qlmctl.engine.vllm import StreamTimeouts
from qlmctl.errors import BadInput
from qlmctl.perfmodel import PerfModel
from qlmctl.plan.planfile import check_plan, load_plan, policy_options
from qlmctl.plan.policies import make_policy
from qlmctl.plan.types import Policy
from qlmctl.profile.store import ProfileStore
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.follow import DEFAULT_MARGIN, PlanFollower
from qlmctl.serve.real_driver import RealOptions, run_real
from qlmctl.serve.run import ProgressFn, RunSummary, default_run_name
from qlmctl.serve.sim_driver import run_simulated
from qlmctl.specs import load_cluster
from qlmctl.workload import Workload, load_workload

ENGINES = ("vllm", "sim")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # one folder name: never escapes --runs


@dataclass(frozen=True)
class ServeJob:
    """A checked ``serve`` run, ready to start."""

    workload: Workload
    cluster: ClusterSpec
    perf: Mapping[tuple[str, str], PerfModel]
    policy: Policy
    engine: str
    config: CoreConfig
    run_dir: Path
    seed: int
    meta: dict[str, Any]
    timeouts: StreamTimeouts = field(default_factory=StreamTimeouts)  # real engine, per attempt

    @property
    def total(self) -> int:
        """Requests in the workload."""
        return len(self.workload.requests)

    def run(self, on_progress: ProgressFn | None = None) -> RunSummary:
        """Run it with the chosen driver (simulated or real vLLM)."""
        args = (self.workload, self.cluster, self.perf, self.policy, self.config, self.run_dir)
        if self.engine == "sim":
            return run_simulated(*args, self.seed, meta=self.meta, on_progress=on_progress)
        options = RealOptions(stream=self.timeouts)
        return run_real(*args, self.seed, options=options, meta=self.meta, on_progress=on_progress)


def prepare_serve(
    workload_path: Path,
    cluster_path: Path,
    *,
    policy: str | None = "qlm",
    engine: str = "vllm",
    profiles: Path | None = None,
    runs: Path = Path("runs"),
    name: str | None = None,
    seed: int = 0,
    timeouts: StreamTimeouts | None = None,
    plan: Path | None = None,
    plan_margin: float = DEFAULT_MARGIN,
    improve: bool | None = None,
) -> ServeJob:
    """Load and check everything for a run of ``workload_path`` on ``cluster_path``.

    The run goes to ``runs/NAME``. vLLM priority scheduling (``--scheduling-policy
    priority`` and the request field) is used when the policy sets priorities
    (``priority``). ``improve`` runs the policy's background improver (``qlm``'s MILP;
    None: on the real engine, in a worker thread, not on the simulated one, where it makes
    runs slower; there each answer comes its whole budget after its snapshot,
    ``answer_at_budget``, so runs do not follow the wall clock). ``timeouts`` bound every
    attempt on the real engine.

    With ``plan`` (a file written by ``qlmctl plan``) the run follows that plan
    (:class:`~qlmctl.serve.follow.PlanFollower`) with the policy and options it was made
    with; it must have been made from this workload, cluster and profiles (BadInput
    otherwise), and ``policy`` must be its policy or None.
    """
    if not 0 <= seed <= MAX_SEED:
        raise BadInput(f"--seed must be an integer in [0, 2**63 - 1], got {seed}")
    if engine not in ENGINES:
        raise BadInput(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if not 0 <= plan_margin <= 1:
        raise BadInput(f"--plan-margin must be in [0, 1], got {plan_margin}")
    committed = load_plan(plan) if plan is not None else None
    if committed is not None and policy is not None and policy != committed.policy:
        raise BadInput(
            f"{plan}: the plan was made with policy {committed.policy!r}, not {policy!r}; "
            "drop --policy to run it"
        )
    policy = committed.policy if committed is not None else (policy or "qlm")
    improve = engine == "vllm" if improve is None else improve
    options = policy_options(committed) if committed else {}
    if improve and engine == "sim":
        options = {**options, "answer_at_budget": True}
    inner = make_policy(policy, **options)
    chosen: Policy = inner
    workload = load_workload(workload_path)
    cluster = load_cluster(cluster_path)
    check_models_served(cluster, workload.models)
    perf = ProfileStore.load(profiles).for_cluster(cluster)
    meta: dict[str, Any] = {"workload": str(workload_path), "cluster": str(cluster_path)}
    if committed is not None and plan is not None:
        check_plan(committed, str(plan), workload, cluster, perf)
        chosen = PlanFollower(inner, committed, plan_margin)
        meta |= {"plan": str(Path(plan).resolve()), "plan_margin": plan_margin}
    run_dir = check_run_dir(Path(runs), name or default_run_name(workload, policy, engine))
    return ServeJob(
        workload=workload,
        cluster=cluster,
        perf=perf,
        policy=chosen,
        engine=engine,
        config=CoreConfig.for_policy(chosen, improve=improve),
        run_dir=run_dir,
        seed=seed,
        meta=meta,
        timeouts=timeouts or StreamTimeouts(),
    )


def stream_timeouts(
    connect_s: float | None, first_token_s: float | None, token_s: float | None
) -> StreamTimeouts:
    """:class:`StreamTimeouts` with the given limits (None keeps the default); BadInput
    for a limit that is not a positive finite number."""
    given = {"connect_s": connect_s, "first_token_s": first_token_s, "token_s": token_s}
    return StreamTimeouts(**{k: v for k, v in given.items() if v is not None})


def check_run_dir(runs: Path, name: str) -> Path:
    """``runs/name``, created empty (the run log fills it).

    Raises:
        BadInput: ``name`` is not one plain folder name (``../x`` would write outside
            ``runs``), the directory is not empty, a file stands in the way, or it cannot
            be created (a read-only file system, a file where a parent should be).
    """
    if not RUN_NAME.fullmatch(name):
        raise BadInput(
            f"--name {name!r}: a run name is one folder name (letters, digits, '.', '_', '-' "
            "and no leading '.'), not a path"
        )
    run_dir = runs / name
    if run_dir.exists() and not run_dir.is_dir():
        raise BadInput(f"{run_dir}: a file stands where the run directory would go")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise BadInput(f"{run_dir}: run directory exists and is not empty; pick another --name")
    try:  # now, so a read-only file system is found before any server starts
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"{run_dir}: cannot create the run directory ({exc.strerror})") from None
    return run_dir
