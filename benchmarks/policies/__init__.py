"""Policy benchmark on real traces: qlmctl's policies against FCFS, EDF and vLLM priority.

Run ``.venv/bin/python -m benchmarks.policies`` (``--quick`` for a smaller sweep). See
:mod:`benchmarks.policies.scenarios` (workload shapes, clusters, load),
:mod:`benchmarks.policies.run` (one run per point), :mod:`benchmarks.policies.report`
(tables, plots, targets) and :mod:`benchmarks.policies.__main__` (the command).
"""
