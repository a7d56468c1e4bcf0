"""Results of the sweep: the Parquet table, the markdown summary, the plots, the targets.

How it works: rows from :mod:`benchmarks.policies.run` become one DataFrame (one row per
run, schema :data:`COLUMNS`). The markdown shows, per scenario and cluster, the
*reference load*: the lowest swept load where ``fcfs`` attains 50 % or less (the issue's
target point), with every policy's attainment per class, throughput and operations, and
a short sweep table of overall attainment per load. The targets are checked there:
``qlm`` >= 1.9 x ``fcfs``, >= 10 points above ``edf``, within 5 points of the clairvoyant
bound, throughput not below ``fcfs``. A point run with several planner seeds (the
reference loads) is summarised by the seeds' means (:func:`by_point`), its attainment
with their range; the reference load itself comes from the first seed's runs.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from qlmctl.fileio import atomic_path

FORECAST_KEYS = (
    "start_mae_s", "start_bias_s", "wait_s", "miss_pred", "miss_obs", "brier",
    "first_token_mae_s", "first_token_p90_cover", "finish_mae_s", "finish_p90_cover",
)  # fmt: skip
COLUMNS = (
    "scenario", "instances", "load", "offered_load", "time_scale", "policy", "seed", "requests",
    "ended", "finished", "met", "failed", "rejected", "cancelled", "attainment",
    "weighted_attainment", "goodput_rps", "throughput_rps", "throughput_tps", "output_tps",
    "ttft_p50_s", "swaps", "evictions", "replans", "solver_s", "duration_s", "wall_s",
    "att_interactive", "n_interactive", "att_batch-1", "n_batch-1", "att_batch-2", "n_batch-2",
    "milp_offered", "milp_adopted",
    *(f"{k}_{c}" for c in ("interactive", "batch-1", "batch-2") for k in FORECAST_KEYS),
)  # fmt: skip
HINDSIGHT = "hindsight"  # not a policy: the program's bound (bound.py), a row per point
CEILING = "ceiling"  # not a policy: what no policy can beat on the engine (ceiling.py)
BOUND_NAMES = (HINDSIGHT, CEILING)  # rows that are no policy's runs
POLICY_ORDER = ("fcfs", "edf", "priority", "heuristic", "qlm", "clairvoyant", *BOUND_NAMES)
POINT = ["scenario", "instances", "load", "policy"]
SUMMED = ("milp_offered", "milp_adopted")  # over seeds; every other figure is averaged


def to_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The results table, columns in :data:`COLUMNS` order."""
    frame = pd.DataFrame(list(rows)).reindex(columns=list(COLUMNS))
    return frame.sort_values(["scenario", "instances", "load"], kind="stable")


def by_point(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (scenario, cluster, load, policy): the figures averaged over the seeds
    run there (the MILP counts summed), with ``seeds`` and the lowest and highest
    attainment (``attainment_lo``, ``attainment_hi``)."""
    numeric = [c for c in frame.columns if c not in POINT and c != "seed"]
    grouped = frame.groupby(POINT, sort=False)
    out = grouped[numeric].mean()
    for c in SUMMED:
        out[c] = grouped[c].sum(min_count=1)
    out["seeds"] = grouped.size()
    out["attainment_lo"] = grouped["attainment"].min()
    out["attainment_hi"] = grouped["attainment"].max()
    return out.reset_index()


def write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    """Write the results table (atomically)."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return path


def reference_load(cell: pd.DataFrame) -> float | None:
    """Lowest load where fcfs attains 50 % or less in the first seed's runs (None if it
    never does)."""
    first = cell[cell["seed"] == cell["seed"].min()]
    fcfs = first[(first["policy"] == "fcfs") & (first["attainment"] <= 0.5)]
    return float(fcfs["load"].min()) if len(fcfs) else None


def reference_loads(frame: pd.DataFrame) -> dict[tuple[str, int], float | None]:
    """:func:`reference_load` of every (scenario, cluster size) cell."""
    return {
        (str(s), int(str(n))): reference_load(cell)
        for (s, n), cell in frame.groupby(["scenario", "instances"], sort=True)
    }


def targets(point: pd.DataFrame) -> dict[str, bool]:
    """The issue's four targets at one (scenario, cluster, load) point."""
    att = point.set_index("policy")["attainment"]
    tput = point.set_index("policy")["throughput_rps"]
    return {
        "qlm >= 1.9x fcfs": att["qlm"] >= 1.9 * att["fcfs"],
        "qlm >= edf + 10 pt": att["qlm"] >= att["edf"] + 0.10,
        "qlm within 5 pt of clairvoyant": att["qlm"] >= att["clairvoyant"] - 0.05,
        "throughput >= fcfs": tput["qlm"] >= tput["fcfs"] * 0.995,
    }


def _pct(x: Any) -> str:
    return "" if x is None or pd.isna(x) else f"{100 * float(x):.1f}"


def _spread(r: Mapping[Hashable, Any]) -> str:
    """Attainment %, with the range over the seeds where more than one ran."""
    if r["seeds"] < 2:
        return _pct(r["attainment"])
    return f"{_pct(r['attainment'])} ({_pct(r['attainment_lo'])}-{_pct(r['attainment_hi'])})"


def _policy_rows(point: pd.DataFrame) -> list[str]:
    lines = [
        "| policy | attainment % | interactive % | batch-1 % | batch-2 % | goodput req/s "
        "| throughput req/s | tok/s | swaps | evictions |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    by = {rec["policy"]: rec for rec in point.to_dict("records")}
    for p in POLICY_ORDER:
        if p not in by or p in BOUND_NAMES:
            continue
        r = by[p]
        lines.append(
            f"| {p} | {_spread(r)} | {_pct(r['att_interactive'])} "
            f"| {_pct(r['att_batch-1'])} | {_pct(r['att_batch-2'])} | {r['goodput_rps']:.2f} "
            f"| {r['throughput_rps']:.2f} | {r['throughput_tps']:.0f} | {int(r['swaps'])} "
            f"| {int(r['evictions'])} |"
        )
    if HINDSIGHT in by:
        lines += [
            "",
            f"Hindsight bound: {_pct(by[HINDSIGHT]['attainment'])} % (the stochastic program "
            "given the whole run's arrivals and output lengths, as an LP: the ceiling in the "
            "planner's model of the engine).",
        ]
    if CEILING in by:
        ceiling = by[CEILING]["attainment"]
        fcfs = by["fcfs"]["attainment"] if "fcfs" in by else 0.0
        lines += [
            "",
            f"Prefill ceiling: {_pct(ceiling)} % (no policy can do better on the simulated "
            "engine: the prompts that fit into their windows at each instance's best prefill "
            "rate, an LP)" + (f", {ceiling / fcfs:.2f}x fcfs." if fcfs > 0 else "."),
        ]
    return lines


def _forecast_rows(qlm: pd.Series) -> list[str]:
    """``qlm``'s first forecast per request against what happened, and its MILP's plans."""
    lines = [
        f"qlm's MILP plans adopted: {int(qlm['milp_adopted'])} of {int(qlm['milp_offered'])}"
        f" ({int(qlm['seeds'])} run(s)). "
        "Forecasts (the first per request): dispatch error (median |error|, median "
        "signed, > 0 later than forecast) against the median wait; miss probability; "
        "first token and finish (median |error| of the forecast median, and the share "
        "that came by the forecast's 90th percentile).",
        "",
        "| class | start error s | bias s | wait s | predicted miss % | observed miss % "
        "| Brier | first token error s | by its p90 % | finish error s | by its p90 % |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in ("interactive", "batch-1", "batch-2"):
        if qlm[f"n_{c}"]:
            lines.append(
                f"| {c} | {qlm[f'start_mae_s_{c}']:.2f} | {qlm[f'start_bias_s_{c}']:.2f} "
                f"| {qlm[f'wait_s_{c}']:.2f} | {_pct(qlm[f'miss_pred_{c}'])} "
                f"| {_pct(qlm[f'miss_obs_{c}'])} | {qlm[f'brier_{c}']:.3f} "
                + "".join(
                    f"| {qlm[f'{w}_mae_s_{c}']:.2f} | {_pct(qlm[f'{w}_p90_cover_{c}'])} "
                    for w in ("first_token", "finish")
                )
                + "|"
            )
    return lines


def _sweep_rows(cell: pd.DataFrame) -> list[str]:
    pols = [p for p in POLICY_ORDER if p in set(cell["policy"])]
    lines = ["| load | " + " | ".join(pols) + " |", "|--:|" + "--:|" * len(pols)]
    for load, pt in cell.groupby("load"):
        att = pt.set_index("policy")["attainment"]
        lines.append(f"| {load:g} | " + " | ".join(_pct(att.get(p)) for p in pols) + " |")
    return lines


def markdown(frame: pd.DataFrame, command: str, wall_s: float | None = None, note: str = "") -> str:
    """The summary the README quotes (``frame``: every run; seeds are averaged; ``note``
    follows the command that regenerates it)."""
    refs = reference_loads(frame)
    above = above_ceiling(frame)
    frame = by_point(frame)
    out = [
        "# Policy benchmark (simulated vLLM, real traces)",
        "",
        f"Regenerate: `{command}`"
        + (f" (wall time {wall_s / 60:.1f} min)." if wall_s else ".")
        + (f" {note}" if note else ""),
        "Attainment = requests finishing with TTFT inside their class SLO / all requests.",
        "Load = offered request rate / the cluster's estimated capacity (the largest rate of",
        "the request mix the instances can share, each serving only its models: an LP).",
        "Where a point ran with several planner seeds (the reference loads), its figures are",
        "their means, and its attainment shows their range in brackets.",
        f"Runs above their point's prefill ceiling: {len(above)} (any would "
        "mean the ceiling is wrong).",
        "",
    ]
    for (scenario, size), cell in frame.groupby(["scenario", "instances"], sort=True):
        n = int(str(size))
        out += [f"## {scenario}, {n} instances ({n // 2} A100 + {n - n // 2} A10)", ""]
        ref = refs[(str(scenario), n)]
        if ref is None:
            out += ["fcfs never drops to 50 % in this sweep; no target point.", ""]
        else:
            point = cell[cell["load"] == ref]
            met = targets(point)
            out += [f"Reference load {ref:g} (lowest load where fcfs attains <= 50 %):", ""]
            out += [*_policy_rows(point), ""]
            out += ["Targets: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in met.items())]
            out += ["", *_forecast_rows(point[point["policy"] == "qlm"].iloc[0]), ""]
        out += ["Overall attainment % by load:", "", *_sweep_rows(cell), ""]
    return "\n".join(out)


def above_ceiling(frame: pd.DataFrame) -> pd.DataFrame:
    """Every run of ``frame`` (each seed) that attains more than its point's prefill
    ceiling (none where the sweep has no ceiling rows)."""
    point = ["scenario", "instances", "load"]
    ceilings = frame.loc[frame["policy"] == CEILING, [*point, "attainment"]]
    runs = frame[~frame["policy"].isin(BOUND_NAMES)].merge(
        ceilings.rename(columns={"attainment": "ceiling"}), on=point
    )
    return runs[runs["attainment"] > runs["ceiling"] + 1e-9]


def estimator_summary(frame: pd.DataFrame) -> dict[str, Any]:
    """Per cell at its reference load: ``qlm``'s forecasts against what happened, per
    class (the estimator issue's keys), and whether more information ever hurt
    (``clairvoyant`` against ``qlm``, at the reference load and over the sweep); seeds
    averaged."""
    refs = reference_loads(frame)
    frame = by_point(frame)
    out: dict[str, Any] = {}
    for (scenario, size), cell in frame.groupby(["scenario", "instances"], sort=True):
        ref = refs[(str(scenario), int(str(size)))]
        att = cell.pivot_table(index="load", columns="policy", values="attainment")
        gap = 100 * (att["clairvoyant"] - att["qlm"])
        entry: dict[str, Any] = {
            "reference_load": ref,
            "clairvoyant_minus_qlm_pts_min": float(gap.min()),
            "clairvoyant_minus_qlm_pts_by_load": {f"{k:g}": float(v) for k, v in gap.items()},
        }
        if ref is not None:
            qlm = cell[(cell["load"] == ref) & (cell["policy"] == "qlm")].iloc[0]
            entry["clairvoyant_minus_qlm_pts"] = float(gap[ref])
            entry["by_class"] = {
                c: {k: _finite(qlm[f"{k}_{c}"]) for k in FORECAST_KEYS}
                for c in ("interactive", "batch-1", "batch-2")
                if qlm[f"n_{c}"]
            }
        out[f"{scenario} ({int(str(size))})"] = entry
    return out


def _finite(x: Any) -> float | None:
    return None if x is None or pd.isna(x) else float(x)


def plot_attainment(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One figure per scenario: attainment against load, a panel per cluster size (seeds
    averaged)."""
    frame = by_point(frame)
    paths = []
    for scenario, sc in frame.groupby("scenario", sort=True):
        sizes = sorted(sc["instances"].unique())
        fig, axes = plt.subplots(1, len(sizes), figsize=(5.0 * len(sizes), 3.8), squeeze=False)
        for ax, n in zip(axes[0], sizes, strict=True):
            cell = sc[sc["instances"] == n]
            for p in POLICY_ORDER:
                line = cell[cell["policy"] == p].sort_values("load")
                if len(line):
                    style = {"clairvoyant": "--", HINDSIGHT: ":", CEILING: "-."}.get(p, "-")
                    ax.plot(line["load"], 100 * line["attainment"], style, marker="o", label=p)
            ax.set_title(f"{scenario}, {n} instances")
            ax.set_xlabel("offered load / estimated capacity")
            ax.set_ylabel("SLO attainment %")
            ax.set_ylim(0, 102)
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"attainment_vs_load_{scenario}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
        plt.close(fig)
        paths.append(path)
    return paths
