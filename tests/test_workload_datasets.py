"""The dataset registry: pinned entries, fetch over HTTP (a local server) and from a mirror,
hash checks that leave nothing behind, specs that name datasets, `workload fetch`."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from typer.testing import CliRunner

from qlmctl.cli import app
from qlmctl.errors import BadInput, FetchError
from qlmctl.workload import datasets, load_workload
from qlmctl.workload.datasets import DATASETS, Dataset, data_dir, fetch, installed_path
from qlmctl.workload.traces import READERS
from tests.helpers import run_cli

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
CONTENT = b"num_prefill_tokens,num_decode_tokens\n10,5\n20,7\n"


def fake(name: str = "tiny-lengths", content: bytes = CONTENT) -> Dataset:
    """A registry entry whose pinned bytes are ``content``."""
    return replace(
        DATASETS["arxiv-lengths"],
        name=name,
        path=f"data/{name}.csv",
        sha256=hashlib.sha256(content).hexdigest(),
        size_bytes=len(content),
    )


class _Files(BaseHTTPRequestHandler):
    files: ClassVar[dict[str, bytes]] = {}  # URL path -> body; anything else is a 404

    def do_GET(self) -> None:
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass  # keep the test output clean


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A file server on 127.0.0.1 in a thread: (base URL, its URL path -> bytes map)."""
    files: dict[str, bytes] = {}
    handler = type("Files", (_Files,), {"files": files})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", files
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def test_every_entry_is_pinned_and_readable() -> None:
    assert {"azure-2023-code", "azure-2023-conv", "sharegpt-lengths", "arxiv-lengths"} <= set(
        DATASETS
    )
    for name, ds in DATASETS.items():
        assert ds.name == name and ds.format in READERS
        assert re.fullmatch(r"[0-9a-f]{40}", ds.commit) and re.fullmatch(r"[0-9a-f]{64}", ds.sha256)
        assert ds.url() == f"https://raw.githubusercontent.com/{ds.repo}/{ds.commit}/{ds.path}"
        assert ds.license and ds.citation and ds.size_bytes > 0
    assert len({ds.filename for ds in DATASETS.values()}) == len(DATASETS)


def test_download_verifies_and_installs(tmp_path: Path, server: tuple[str, dict]) -> None:
    base, files = server
    ds = fake()
    files[f"/{ds.repo}/{ds.commit}/{ds.path}"] = CONTENT
    first = fetch(ds, tmp_path, base_url=base)
    assert first.outcome == "downloaded" and first.path.read_bytes() == CONTENT
    assert fetch(ds, tmp_path, base_url=base).outcome == "present"
    first.path.write_bytes(b"corrupt")  # a damaged cache file is fetched again
    assert fetch(ds, tmp_path, base_url=base).outcome == "downloaded"
    assert first.path.read_bytes() == CONTENT and sorted(tmp_path.iterdir()) == [first.path]


def test_download_with_a_wrong_hash_leaves_nothing(tmp_path: Path, server: tuple) -> None:
    base, files = server
    ds = fake()
    files[f"/{ds.repo}/{ds.commit}/{ds.path}"] = CONTENT + b"30,9\n"
    with pytest.raises(BadInput, match=r"SHA-256 mismatch for dataset 'tiny-lengths'.*nothing"):
        fetch(ds, tmp_path, base_url=base)
    assert list(tmp_path.iterdir()) == []


def test_http_error_and_unreachable_host_are_runtime_failures(
    tmp_path: Path, server: tuple
) -> None:
    base, _files = server
    with pytest.raises(FetchError, match="HTTP 404") as err:
        fetch(fake(), tmp_path, base_url=base)
    assert err.value.exit_code == 1 and list(tmp_path.iterdir()) == []
    with pytest.raises(FetchError, match="download failed"):
        fetch(fake(), tmp_path, base_url="http://127.0.0.1:9")  # discard port: refused
    assert list(tmp_path.iterdir()) == []


def test_mirror_install_is_hash_checked(tmp_path: Path) -> None:
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    ds = fake()
    with pytest.raises(BadInput, match=r"mirror: no tiny-lengths\.csv here"):
        fetch(ds, cache, mirror)
    (mirror / ds.filename).write_bytes(b"something else")
    with pytest.raises(BadInput, match="SHA-256 mismatch"):
        fetch(ds, cache, mirror)
    assert not cache.exists() or list(cache.iterdir()) == []
    (mirror / ds.filename).write_bytes(CONTENT)
    assert fetch(ds, cache, mirror).outcome == "copied"
    assert (cache / ds.filename).read_bytes() == CONTENT


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QLMCTL_DATA", str(tmp_path / "d"))
    assert data_dir() == tmp_path / "d"
    monkeypatch.delenv("QLMCTL_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_dir() == tmp_path / "xdg" / "qlmctl" / "datasets"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_dir() == tmp_path / "home" / ".cache" / "qlmctl" / "datasets"


def test_cli_fetch_from_a_mirror(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    entries = {d.name: d for d in (fake("one"), fake("two", CONTENT + b"1,1\n"))}
    monkeypatch.setattr(datasets, "DATASETS", entries)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "one.csv").write_bytes(CONTENT)
    (mirror / "two.csv").write_bytes(CONTENT + b"1,1\n")
    cache = tmp_path / "cache"
    args = ["workload", "fetch", "--all", "--from", str(mirror), "--data-dir", str(cache)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in cache.iterdir()) == ["one.csv", "two.csv"]
    assert "one: copied" in result.output and "two: copied" in result.output
    again = runner.invoke(app, ["workload", "fetch", "two", "--data-dir", str(cache)])
    assert again.exit_code == 0 and "two: present" in again.output


def test_cli_fetch_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / DATASETS["azure-2023-code"].filename).write_text("TIMESTAMP,x\n")
    cache = tmp_path / "cache"
    for args, words in (
        (["azure-2023-code", "--from", str(mirror)], ["SHA-256 mismatch", "azure-2023-code"]),
        ([], ["--all", "azure-2023-conv"]),
        (["nope"], ["unknown dataset 'nope'", "arxiv-lengths"]),
    ):
        proc = run_cli("workload", "fetch", *args, env={"QLMCTL_DATA": str(cache)})
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert all(w in lines[0] for w in words), lines[0]
    assert not cache.exists() or list(cache.iterdir()) == []


def test_spec_names_a_missing_dataset_in_one_line(tmp_path: Path) -> None:
    proc = run_cli(
        "workload",
        "show",
        str(REPO / "workloads/azure-conv.yaml"),
        env={"QLMCTL_DATA": str(tmp_path)},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "qlmctl workload fetch azure-2023-conv" in lines[0], proc.stderr


@pytest.mark.parametrize(
    ("ref", "error"),
    [
        ({"dataset": "azure-2023-cov"}, "unknown dataset 'azure-2023-cov'; known: azure-2023-code"),
        ({"dataset": "arxiv-lengths"}, "dataset 'arxiv-lengths' is a 'csv' file, not 'azure'"),
        ({"dataset": "azure-2023-conv", "format": "mooncake"}, "is a 'azure' file"),
        ({"dataset": "azure-2023-conv", "path": "x.csv"}, "exactly one of 'dataset' or 'path'"),
        ({"path": "x.csv"}, "a 'path' needs 'format': 'azure' or 'mooncake'"),
    ],
)
def test_spec_file_references_are_checked(tmp_path: Path, ref: dict, error: str) -> None:
    spec = {
        "models": ["m"],
        "sources": [{"name": "s", "trace": ref, "model": "m", "slo_class": "batch-1"}],
    }
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(BadInput, match=re.escape(error)):
        load_workload(path)


def test_lengths_by_dataset(tmp_path: Path) -> None:
    spec = {
        "models": ["m"],
        "sources": [
            {
                "name": "jobs",
                "arrivals": {"process": "poisson", "rate_per_s": 1.0, "count": 200},
                "lengths": {"dataset": "sharegpt-lengths"},
                "model": "m",
                "slo_class": "batch-2",
            }
        ],
    }
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(spec))
    w = load_workload(path)
    sample = installed_path("sharegpt-lengths").read_text().splitlines()[1:]
    pairs = {tuple(int(x) for x in line.split(",")[:2]) for line in sample}
    assert len(w.requests) == 200
    assert all((r.prompt_tokens, r.output_tokens) in pairs for r in w.requests)


def test_datasets_command_lists_the_registry() -> None:
    result = runner.invoke(app, ["workload", "datasets", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == list(DATASETS)
    assert all(r["installed"] for r in rows)  # the session cache holds every dataset
