"""``qlmctl serve --listen`` as library calls: check every input, then build the job.

Everything that can be wrong before a server starts is a :class:`~qlmctl.errors.BadInput`
raised here: a malformed ``HOST:PORT``, an unknown policy, class or model, an API-key
variable that is unset or empty. The key is read from the environment (never from the
command line, where process listings would show it) and kept out of run.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qlmctl.domain import SLOClass
from qlmctl.errors import BadInput
from qlmctl.gateway.options import GatewayOptions, api_key_from_env
from qlmctl.gateway.server import GatewayJob, served_models
from qlmctl.plan.planfile import check_plan_cluster, load_plan, policy_options
from qlmctl.plan.policies import make_policy
from qlmctl.plan.types import Policy
from qlmctl.profile.store import ProfileStore
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.follow import PlanFollower
from qlmctl.serve.real_driver import RealOptions
from qlmctl.specs import load_cluster, parse, read_yaml
from qlmctl.workload.spec import DEFAULT_SLO_CLASSES

DEFAULT_LISTEN = "127.0.0.1:8000"
# NOTE: the core dispatches at most ``max_engine_waiting`` requests per instance between
# two /metrics reports (it counts its own dispatches as waiting until the engine says
# otherwise), so the report cadence caps the dispatch rate: 0.5 s gave ~4 requests/s
# under `vllm bench serve`; live traffic polls 10 times a second.
LIVE_METRICS_INTERVAL_S = 0.1


def prepare_gateway(
    cluster_path: Path,
    *,
    listen: str = DEFAULT_LISTEN,
    policy: str = "qlm",
    profiles: Path | None = None,
    runs: Path = Path("runs"),
    name: str | None = None,
    slo_classes: Path | None = None,
    default_class: Sequence[str] = (),
    api_key_env: str | None = None,
    max_queue: int = 1000,
    default_max_tokens: int = 256,
    seed: int = 0,
    plan: Path | None = None,
) -> GatewayJob:
    """Load and check a gateway run on ``cluster_path``.

    Args:
        listen: ``HOST:PORT`` (``[::1]:PORT`` for IPv6).
        slo_classes: a YAML file with ``slo_classes:`` (a workload spec will do); default:
            the QLM paper's interactive / batch-1 / batch-2.
        default_class: ``CLASS`` (for every model) or ``MODEL=CLASS``, repeatable; the
            class of requests without the ``x-qlmctl-slo-class`` header. Default: the
            first class.
        api_key_env: environment variable holding the key clients must send.
        plan: a plan made (``qlmctl plan``) for an OpenAI Batch input file on this cluster
            and these profiles: when that file is submitted as a batch, its lines run by
            the plan (:mod:`qlmctl.gateway.batchplan`); other traffic is planned as usual.
    """
    host, port = parse_listen(listen)
    cluster = load_cluster(cluster_path)
    committed = load_plan(plan) if plan is not None else None
    if committed is not None:
        policy = committed.policy
    inner = make_policy(policy, **(policy_options(committed) if committed else {}))
    chosen: Policy = inner
    classes = _load_classes(slo_classes)
    models = served_models(cluster)
    fallback, by_model = _default_classes(default_class, classes, models)
    if max_queue < 1 or default_max_tokens < 1:
        raise BadInput("--max-queue and --default-max-tokens must be at least 1")
    options = GatewayOptions(
        host=host,
        port=port,
        default_class=fallback,
        class_by_model=by_model,
        max_queue=max_queue,
        default_max_tokens=default_max_tokens,
        api_key=api_key_from_env(api_key_env),
    )
    run_dir = Path(runs) / (name or f"gateway-{policy}-{_stamp()}")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise BadInput(f"{run_dir}: run directory exists and is not empty; pick another --name")
    perf = ProfileStore.load(profiles).for_cluster(cluster)
    meta: dict[str, Any] = {"cluster": str(cluster_path)}
    if committed is not None and plan is not None:
        check_plan_cluster(committed, str(plan), cluster, perf)
        chosen = PlanFollower(inner, committed)
        meta["batch_plan"] = str(Path(plan).resolve())
    return GatewayJob(
        cluster=cluster,
        perf=perf,
        policy=chosen,
        config=CoreConfig.for_policy(chosen),
        classes=classes,
        options=options,
        run_dir=run_dir,
        seed=seed,
        real=RealOptions(metrics_interval_s=LIVE_METRICS_INTERVAL_S),
        meta=meta,
    )


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); :class:`BadInput` if malformed."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(f"--listen {listen!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host, int(port)


def _load_classes(path: Path | None) -> dict[str, SLOClass]:
    if path is None:
        return {c.name: c for c in DEFAULT_SLO_CLASSES}
    data = read_yaml(path)
    raw = data.get("slo_classes") if isinstance(data, dict) else None
    if not isinstance(raw, list) or not raw:
        raise BadInput(f"{path}: expected a non-empty 'slo_classes' list")
    classes = [parse(SLOClass, c, f"{path}: slo_classes[{k}]") for k, c in enumerate(raw)]
    return {c.name: c for c in classes}


def _default_classes(
    given: Sequence[str], classes: dict[str, SLOClass], models: list[str]
) -> tuple[str, dict[str, str]]:
    """(class for any model, model -> class) from ``CLASS`` / ``MODEL=CLASS`` items."""
    fallback, by_model = next(iter(classes)), {}
    for item in given:
        model, _, cls = item.rpartition("=")
        if cls not in classes:
            raise BadInput(f"--default-class {item!r}: unknown class; known: {sorted(classes)}")
        if not model:
            fallback = cls
        elif model not in models:
            raise BadInput(f"--default-class {item!r}: no instance serves {model!r}")
        else:
            by_model[model] = cls
    return fallback, by_model


def _stamp() -> str:
    import datetime as dt

    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
