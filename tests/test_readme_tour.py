"""The README's tour runs as written, so the README cannot rot.

It reads the ```bash block under "## A tour", joins continued lines, and runs every
``$Q ...`` command in-process through the CLI, in a scratch directory that links the
repository's ``workloads/`` (runs, plans and ``/tmp/...`` outputs land in the scratch
directory), with the session's dataset cache (``tests/conftest.py``).
"""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qlmctl.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

# Commands the test does not run, each with its reason:
NOT_RUN = {
    # downloads from GitHub; tests never reach the internet, and the session cache holds
    # every dataset already (tests/test_workload_datasets.py tests fetching)
    "workload fetch": "network",
    # measures a model on a real vLLM server (about a minute, with the models `make demo`
    # builds); the `vllm` tests (tests/test_profiler_real.py) run the profiler instead
    "profile run": "real vLLM",
}


def tour_commands(readme: str) -> list[list[str]]:
    """The ``$Q`` commands of the tour block, as argument lists (comments dropped)."""
    section = readme.split("\n## A tour", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "no ```bash block under '## A tour'"
    text = block.group(1).replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "$Q":
            commands.append(words[1:])
    return commands


def test_the_tour_block_is_found_and_complete() -> None:
    commands = tour_commands((REPO / "README.md").read_text(encoding="utf-8"))
    firsts = {" ".join(c[:2]) for c in commands}
    assert {"workload show", "workload build", "serve workloads/azure-mixed.yaml"} <= firsts
    assert any(c[0] == "report" for c in commands) and any(c[0] == "plan" for c in commands)


def test_every_tour_command_exits_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "workloads").symlink_to(REPO / "workloads")
    monkeypatch.chdir(tmp_path)
    ran = []
    for words in tour_commands((REPO / "README.md").read_text(encoding="utf-8")):
        if " ".join(words[:2]) in NOT_RUN:
            continue
        args = []
        for word in words:
            word = word.replace("/tmp/", f"{tmp_path}/out/")
            args += sorted(glob.glob(word)) if "*" in word else [word]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"$Q {' '.join(words)}\n{result.output}{result.exception!r}"
        ran.append(args[:2])
    assert len(ran) >= 5
    assert (tmp_path / "out" / "mixed.parquet").is_file()
    assert (tmp_path / "out" / "report" / "report.html").is_file()
