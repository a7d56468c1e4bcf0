"""``qlmctl serve`` as library calls: load and check the inputs, then run a driver.

The CLI only parses options and renders; everything that can go wrong with the inputs
(unknown policy or engine, missing profiles, a model no instance serves) is a
:class:`~qlmctl.errors.BadInput` raised here before anything starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlmctl.domain import ClusterSpec, check_models_served
from qlmctl.errors import BadInput
from qlmctl.plan.policies import make_policy
from qlmctl.profile.perfmodel import PerfModel
from qlmctl.profile.store import ProfileStore
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.real_driver import run_real
from qlmctl.serve.run import ProgressFn, RunSummary, default_run_name
from qlmctl.serve.sim_driver import run_simulated
from qlmctl.specs import load_cluster
from qlmctl.workload import Workload, load_workload

ENGINES = ("vllm", "sim")


@dataclass(frozen=True)
class ServeJob:
    """A checked ``serve`` run, ready to start."""

    workload: Workload
    cluster: ClusterSpec
    perf: Mapping[tuple[str, str], PerfModel]
    policy: Any
    engine: str
    config: CoreConfig
    run_dir: Path
    seed: int
    meta: dict[str, Any]

    @property
    def total(self) -> int:
        """Requests in the workload."""
        return len(self.workload.requests)

    def run(self, on_progress: ProgressFn | None = None) -> RunSummary:
        """Run it with the chosen driver (simulated or real vLLM)."""
        run = run_simulated if self.engine == "sim" else run_real
        return run(
            self.workload, self.cluster, self.perf, self.policy, self.config, self.run_dir,
            self.seed, meta=self.meta, on_progress=on_progress,
        )  # fmt: skip


def prepare_serve(
    workload_path: Path,
    cluster_path: Path,
    *,
    policy: str = "qlm",
    engine: str = "vllm",
    profiles: Path | None = None,
    runs: Path = Path("runs"),
    name: str | None = None,
    seed: int = 0,
) -> ServeJob:
    """Load and check everything for a run of ``workload_path`` on ``cluster_path``.

    The run goes to ``runs/NAME``. vLLM priority scheduling (``--scheduling-policy
    priority`` and the request field) is used when the policy sets priorities
    (``priority``). The simulated engine skips the MILP improver (determinism); the real
    one runs it in a worker thread.
    """
    if engine not in ENGINES:
        raise BadInput(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    chosen = make_policy(policy)
    workload = load_workload(workload_path)
    cluster = load_cluster(cluster_path)
    check_models_served(cluster, workload.models)
    perf = ProfileStore.load(profiles).for_cluster(cluster)
    run_dir = Path(runs) / (name or default_run_name(workload, policy, engine))
    if run_dir.exists() and any(run_dir.iterdir()):
        raise BadInput(f"{run_dir}: run directory exists and is not empty; pick another --name")
    return ServeJob(
        workload=workload,
        cluster=cluster,
        perf=perf,
        policy=chosen,
        engine=engine,
        config=CoreConfig.for_policy(policy, improve=engine == "vllm"),
        run_dir=run_dir,
        seed=seed,
        meta={"workload": str(workload_path), "cluster": str(cluster_path)},
    )
