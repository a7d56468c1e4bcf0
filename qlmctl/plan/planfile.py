"""The plan file as an input: what ``qlmctl plan`` records, and the checks before it runs.

Rules: a plan is run only against the inputs it was made from. ``plan`` records in
``Plan.meta`` the workload's content fingerprint, the cluster's instances (id, GPU,
resident and servable models), a SHA-256 of every profile it used, the policy's options
and the seed (:func:`plan_meta`). :func:`load_plan` reads a file and :func:`check_plan`
compares it with what ``serve`` loaded; any difference is one :class:`BadInput` line
naming the first thing that differs, so ``serve --plan`` exits 2 before anything starts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qlmctl.domain import ClusterSpec
from qlmctl.errors import BadInput
from qlmctl.perfmodel import PerfModel
from qlmctl.plan.types import Plan
from qlmctl.workload import Workload

# policy options that are plain values (recorded, and passed back to make_policy)
_RECORDED_OPTIONS = (
    "scenarios",
    "max_group_size",
    "clairvoyant",
    "time_limit_s",
    "mip_gap",
    "milp_scenarios",
    "swap_cost",
    "warm_start",
    "placement",
)


def cluster_instances(cluster: ClusterSpec) -> list[dict[str, Any]]:
    """The cluster as a plan sees it: id, GPU, resident model, servable models per instance."""
    return [
        {
            "id": i.id,
            "gpu": i.gpu,
            "model": i.model,
            "models": sorted(i.models) if i.models is not None else None,
        }
        for i in cluster.instances
    ]


def profile_hashes(perf: Mapping[tuple[str, str], PerfModel]) -> dict[str, str]:
    """``model@gpu`` -> SHA-256 of the profile's JSON form."""
    return {
        f"{m}@{g}": hashlib.sha256(
            json.dumps(p.to_dict(), sort_keys=True, default=str).encode()
        ).hexdigest()
        for (m, g), p in sorted(perf.items())
    }


def plan_meta(
    workload: Workload,
    cluster: ClusterSpec,
    perf: Mapping[tuple[str, str], PerfModel],
    options: Mapping[str, Any],
    seed: int,
    at_s: float | None,
) -> dict[str, Any]:
    """What a plan file records besides its queues, so ``serve --plan`` can run it later."""
    return {
        "workload": workload.source,
        "workload_fingerprint": workload.fingerprint,
        "requests": len(workload.requests),
        "instances": cluster_instances(cluster),
        "profiles": profile_hashes(perf),
        "policy_options": {k: options[k] for k in _RECORDED_OPTIONS if k in options},
        "seed": seed,
        "at_s": at_s,
    }


def load_plan(path: Path) -> Plan:
    """Read a plan file; BadInput with one line if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such plan file (write one with `qlmctl plan`)")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        plan = Plan.from_dict(data, source=str(path))
    except BadInput:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{path}: not a readable plan ({type(exc).__name__}: {exc})") from None
    return plan


def check_plan(
    plan: Plan,
    source: str,
    workload: Workload,
    cluster: ClusterSpec,
    perf: Mapping[tuple[str, str], PerfModel],
) -> None:
    """BadInput (one line) unless ``plan`` was made from this workload, cluster and profiles."""
    meta = plan.meta
    if not meta.get("workload_fingerprint"):
        raise BadInput(f"{source}: the plan records no workload fingerprint; re-run `qlmctl plan`")
    if meta["workload_fingerprint"] != workload.fingerprint:
        raise BadInput(
            f"{source}: planned for another workload ({meta.get('workload')}, fingerprint "
            f"{str(meta['workload_fingerprint'])[:12]}), not {workload.source} "
            f"({workload.fingerprint[:12]}); re-run `qlmctl plan`"
        )
    check_plan_cluster(plan, source, cluster, perf)
    ids = {r.id for r in workload.requests}
    stray = next((r for r in plan.request_ids() if r not in ids), None)
    if stray is not None:
        raise BadInput(f"{source}: planned request {stray!r} is not in {workload.source}")


def check_plan_cluster(
    plan: Plan, source: str, cluster: ClusterSpec, perf: Mapping[tuple[str, str], PerfModel]
) -> None:
    """BadInput (one line) unless ``plan`` was made for this cluster and these profiles."""
    meta = plan.meta
    planned = {i["id"]: i for i in meta.get("instances") or []}
    here = {i["id"]: i for i in cluster_instances(cluster)}
    if set(planned) != set(here):
        raise BadInput(
            f"{source}: planned for instances {', '.join(sorted(planned)) or 'none'}, "
            f"the cluster has {', '.join(sorted(here))}; re-run `qlmctl plan`"
        )
    for iid, inst in here.items():
        for key in ("gpu", "model", "models"):
            if planned[iid].get(key) != inst[key]:
                raise BadInput(
                    f"{source}: instance {iid}: {key} was {planned[iid].get(key)!r} when "
                    f"planned, the cluster says {inst[key]!r}; re-run `qlmctl plan`"
                )
    used, now = meta.get("profiles") or {}, profile_hashes(perf)
    for pair in sorted(set(used) | set(now)):
        if used.get(pair) != now.get(pair):
            raise BadInput(
                f"{source}: profile {pair} differs from the one the plan was made with "
                "(--profiles); re-run `qlmctl plan`"
            )


def policy_options(plan: Plan) -> dict[str, Any]:
    """The options the plan's policy was made with (for re-plans while it runs)."""
    opts = plan.meta.get("policy_options") or {}
    return {k: opts[k] for k in _RECORDED_OPTIONS if k in opts}
