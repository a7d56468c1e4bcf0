"""The embedded demo: the README's main job, runnable on a machine without GPU.

It builds two tiny random-weight Llama models locally (same architecture, different
weights, so they share the ``tiny@cpu`` profile), writes a cluster spec of two instances,
``cpu-0`` keeping both models warm (one server each, one asleep: a model change there is
a sleep and a wake) and ``cpu-1`` serving ``tiny-b``, replays the short mixed
interactive/batch workload ``workloads/demo.yaml`` once per policy (real ``vllm serve``
processes on the CPU, or the simulator with ``engine="sim"``), and compares the runs with
``qlmctl report``'s code. Everything it writes goes under one work directory.
"""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from qlmctl.domain import ClusterSpec
from qlmctl.perfmodel import PerfModel
from qlmctl.profile.store import ProfileStore
from qlmctl.report.runs import Report, build_report
from qlmctl.serve.command import ServeJob, prepare_serve
from qlmctl.serve.run import RunSummary
from qlmctl.specs import dump_spec

DEMO_WORKLOAD = Path(__file__).resolve().parents[1] / "workloads" / "demo.yaml"
DEMO_MODELS = {"tiny-a": 0, "tiny-b": 1}  # model name -> weight seed
# A few sequences at a time per server, so a burst of batch work queues up as it would on a
# busy GPU; the demo's profile says the same (see demo_profile).
DEMO_MAX_NUM_SEQS = 4
# What a sleep and a wake cost on these CPU servers (vLLM refuses sleep mode on CPU; the dev
# endpoints pause and resume the scheduler): measured by tests/test_warm_start_real.py on
# the 2-core host (0.006-0.017 s per call). Only the simulated leg uses it, when the
# profile has none: the real driver measures its own servers when the run starts.
DEMO_SLEEP_WAKE_S = 0.015


def demo_cluster(models_dir: Path, ports: Sequence[int]) -> ClusterSpec:
    """Two CPU instances: ``cpu-0`` keeps both tiny models warm, ``cpu-1`` serves tiny-b.

    ``ports``: three free ports (cpu-0's two servers, then cpu-1's). A restart of ``vllm
    serve`` with the other model takes most of a minute on a CPU, as long as the whole demo
    workload, so a model change pays only as a wake (a fraction of a second).
    """
    names = list(DEMO_MODELS)
    extra = ["--max-num-seqs", str(DEMO_MAX_NUM_SEQS)]
    return ClusterSpec.model_validate(
        {
            "gpu_types": [{"name": "cpu"}],
            "models": [
                {"name": n, "path": str(models_dir / n), "profile": "tiny", "max_model_len": 512}
                for n in names
            ],
            "instances": [
                {
                    "id": "cpu-0",
                    "gpu": "cpu",
                    "launch": {
                        "port": ports[0],
                        "ports": {names[1]: ports[1]},
                        "extra_args": extra,
                    },
                    "model": names[0],
                    "models": names,
                    "warm": names,
                },
                {
                    "id": "cpu-1",
                    "gpu": "cpu",
                    "launch": {"port": ports[2], "extra_args": extra},
                    "model": names[1],
                    "models": [names[1]],
                },
            ],
        }
    )


def demo_profile(
    profiles_dir: Path, tiny: PerfModel | None = None, sleep_wake: bool = False
) -> None:
    """Write ``tiny`` (default: the shipped ``tiny@cpu`` profile) as ``tiny@cpu`` with the
    demo servers' sequence limit; ``sleep_wake``: with :data:`DEMO_SLEEP_WAKE_S` as its
    sleep and wake times where it has none (the simulated leg)."""
    tiny = tiny or ProfileStore.load(None).get("tiny", "cpu")
    note = "max_num_seqs set to the demo servers' --max-num-seqs"
    if sleep_wake and not tiny.supports_sleep:
        tiny = replace(tiny, sleep_s=DEMO_SLEEP_WAKE_S, wake_s=DEMO_SLEEP_WAKE_S)
        note += f"; sleep/wake {DEMO_SLEEP_WAKE_S} s (CPU pause/resume, see qlmctl/demo.py)"
    replace(
        tiny,
        model="tiny",
        gpu="cpu",
        max_num_seqs=DEMO_MAX_NUM_SEQS,
        provenance=f"{tiny.provenance}; {note}",
    ).save(profiles_dir / "tiny@cpu.json")


def run_demo(
    workdir: Path,
    policies: Sequence[str] = ("fcfs", "qlm"),
    engine: str = "vllm",
    run_job: Callable[[ServeJob], RunSummary] = ServeJob.run,
    profile: PerfModel | None = None,
) -> tuple[list[RunSummary], Report]:
    """Run the demo workload once per policy and compare the runs.

    Args:
        workdir: where models, the cluster spec and the run logs go.
        policies: policies to compare; the first is the report's baseline.
        engine: ``vllm`` (real servers, started and stopped per run) or ``sim``.
        run_job: runs one prepared ``serve`` job (the CLI wraps it in a live view).
        profile: the models' profile (default: the shipped ``tiny@cpu``).

    Returns:
        The run summaries and the comparison report.
    """
    models_dir = workdir / "models"
    if engine == "vllm":
        from qlmctl.engine.tiny_model import build_tiny_model

        for name, seed in DEMO_MODELS.items():
            build_tiny_model(models_dir / name, seed=seed)
    cluster_path = workdir / "cluster.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    demo_profile(workdir / "profiles", profile, sleep_wake=engine == "sim")
    dump_spec(demo_cluster(models_dir, free_ports(3)), cluster_path)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    summaries = []
    for policy in policies:
        job = prepare_serve(
            DEMO_WORKLOAD, cluster_path, policy=policy, engine=engine,
            profiles=workdir / "profiles", runs=workdir / "runs",
            name=f"{stamp}-{policy}-{engine}",
        )  # fmt: skip
        summaries.append(run_job(job))
        if summaries[-1].interrupted:
            break
    report = build_report([s.run_dir for s in summaries], baseline=policies[0])
    return summaries, report


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports that were free a moment ago on the loopback interface."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
