"""Workloads: specs, trace importers, synthetic arrivals, the materialised Parquet form.

Entry points: :func:`load_workload` (a YAML spec or a ``.parquet`` file) returns a
:class:`Workload`; :func:`write_workload` materialises one; :func:`prompt_for` gives
the prompt text a real engine is sent; :func:`summarise` the statistics ``show`` prints.
"""

from qlmctl.workload.build import build_workload, load_workload
from qlmctl.workload.model import WORKLOAD_VERSION, Workload
from qlmctl.workload.parquet import read_workload, write_workload
from qlmctl.workload.prompts import count_tokens, generate_prompt, prompt_for
from qlmctl.workload.spec import DEFAULT_SLO_CLASSES, WorkloadSpec
from qlmctl.workload.summary import WorkloadSummary, summarise

__all__ = [
    "DEFAULT_SLO_CLASSES",
    "WORKLOAD_VERSION",
    "Workload",
    "WorkloadSpec",
    "WorkloadSummary",
    "build_workload",
    "count_tokens",
    "generate_prompt",
    "load_workload",
    "prompt_for",
    "read_workload",
    "summarise",
    "write_workload",
]
