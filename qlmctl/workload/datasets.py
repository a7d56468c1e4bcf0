"""Public traces by name: a pinned source, a SHA-256, a license and a citation each.

How it works: a :class:`Dataset` is one file of a public GitHub repository, pinned to a
full commit id, so its URL (``raw.githubusercontent.com/OWNER/REPO/COMMIT/PATH``) always
serves the same bytes. ``qlmctl workload fetch`` downloads it, or copies it from a local
mirror (``--from DIR``: a directory holding the original file names), into the cache.
Specs name datasets (``trace: {dataset: azure-2023-conv}``) and :func:`installed_path`
finds them there.

Rules:
- The cache is one flat directory of the original file names (``QLMCTL_DATA``, default
  ``$XDG_CACHE_HOME/qlmctl/datasets``, else ``~/.cache/qlmctl/datasets``), so a cache
  doubles as a mirror for another machine.
- A file enters the cache only after its SHA-256 matched: it is written to a hidden
  temporary file beside its place and renamed (``qlmctl/fileio.py``), so whatever sits
  in the cache was verified and a failed fetch leaves nothing behind.
- A hash mismatch or a missing mirror file is bad input (exit 2); a failed download
  (network, HTTP status) is a run-time failure (exit 1).

Provenance: the four files are the ones in the team's trace mirror (its README names
source repository, commit, license and SHA-256). For the Azure and Vidur files the mirror
names abbreviated commits (b469a11, 7d47513); the full ids below are commits at which a
public source index holds the same path with the same size and the same final bytes.
The SHA-256 is what makes a fetch trustworthy either way. Mooncake and BurstGPT are not
registered: their files could not be pinned to a commit and a hash here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from qlmctl.errors import BadInput, FetchError
from qlmctl.fileio import atomic_path

RAW_BASE_URL = "https://raw.githubusercontent.com"
DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 16


@dataclass(frozen=True, slots=True)
class Dataset:
    """One public file, pinned: where it comes from, what it must hash to, its terms."""

    name: str
    description: str
    format: str  # a reader of qlmctl.workload.traces.READERS
    repo: str  # GitHub owner/name
    commit: str  # full commit id the file is pinned to
    path: str  # path inside the repository
    sha256: str
    size_bytes: int
    license: str
    citation: str

    @property
    def filename(self) -> str:
        """The file's original name: its name in the cache and in a mirror."""
        return Path(self.path).name

    def url(self, base_url: str = RAW_BASE_URL) -> str:
        """The pinned download URL (``base_url`` replaces GitHub's raw host, e.g. in tests)."""
        return f"{base_url.rstrip('/')}/{self.repo}/{self.commit}/{self.path}"


def _azure(kind: str, description: str, sha256: str, size_bytes: int) -> Dataset:
    """One of the two Azure LLM inference traces 2023 (same repository, commit, terms)."""
    return Dataset(
        name=f"azure-2023-{kind}",
        description=f"Azure LLM inference trace 2023, {description}",
        format="azure",
        repo="Azure/AzurePublicDataset",
        commit="790921015d50dd6aae7f7e47f39ba0e235ad6b08",
        path=f"data/AzureLLMInferenceTrace_{kind}.csv",
        sha256=sha256,
        size_bytes=size_bytes,
        license="CC-BY-4.0 (credit Microsoft Azure Public Dataset, indicate changes)",
        citation=(
            "P. Patel, E. Choukse, C. Zhang, A. Shah, Í. Goiri, S. Maleki, R. Bianchini, "
            '"Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024'
        ),
    )


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        _azure(
            "code",
            "code completion: 8,819 requests, 1 h",
            "54e9a6d2a4bd06ba1e060304b900abbc74cbea53de96506e60fe5bb4f2277fb6",
            320_117,
        ),
        _azure(
            "conv",
            "conversation: 19,366 requests, 1 h",
            "2f1e5b666d4e3055fdbba98598ce2ec307767b9064e03e2fa46676dbcc7d0bf8",
            719_188,
        ),
        Dataset(
            name="sharegpt-lengths",
            description="ShareGPT prompt/output lengths (Llama-2 tokens, <= 8k): 30,731 rows",
            format="csv",
            repo="microsoft/sarathi-serve",
            commit="72339db5b120614033b317880ad3a05a5e4c9415",
            path="data/processed_traces/sharegpt_8k_filtered_stats_llama2_tokenizer.csv",
            sha256="6d6c296302a853e2669a674a96f269283e60c57e60363bd450588a1066919f9f",
            size_bytes=949_600,
            license="Apache-2.0 (keep the license and notices, mark changes)",
            citation=(
                'A. Agrawal et al., "Taming Throughput-Latency Tradeoff in LLM Inference with '
                'Sarathi-Serve", OSDI 2024 (branch niyama_asplos2026; token counts only)'
            ),
        ),
        Dataset(
            name="arxiv-lengths",
            description="arXiv-summarisation prompt/output lengths (<= 4k): 28,257 rows",
            format="csv",
            repo="microsoft/vidur",
            commit="6d98aa8f71696520acc603d87439e77cc78160a7",
            path="data/processed_traces/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv",
            sha256="9d3580538d915ca75e4aaaa54590b42dbb17abc6d74c8913310cf07c232adcdc",
            size_bytes=884_932,
            license="MIT (Copyright (c) Microsoft Corporation; keep the notice)",
            citation=(
                'A. Agrawal et al., "Vidur: A Large-Scale Simulation Framework for LLM '
                'Inference", MLSys 2024 (microsoft/vidur)'
            ),
        ),
    )
}


def data_dir() -> Path:
    """The dataset cache: ``QLMCTL_DATA``, else the user's cache directory."""
    if env := os.environ.get("QLMCTL_DATA"):
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "qlmctl" / "datasets"


def get_dataset(name: str) -> Dataset:
    """The dataset called ``name``; :class:`BadInput` listing the known names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise BadInput(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None


def installed_path(name: str, root: Path | None = None) -> Path:
    """Where dataset ``name`` sits in the cache; :class:`BadInput` naming the fetch command."""
    ds = get_dataset(name)
    path = (root or data_dir()) / ds.filename
    if not path.is_file():
        raise BadInput(
            f"dataset {name!r} is not installed in {path.parent}: run "
            f"`qlmctl workload fetch {name}` (or `--all`; `--from DIR` for a local mirror)"
        )
    return path


Outcome = Literal["present", "copied", "downloaded"]


@dataclass(frozen=True, slots=True)
class Fetched:
    """What :func:`fetch` did for one dataset."""

    name: str
    path: Path
    outcome: Outcome  # present: already installed and verified


def fetch(
    ds: Dataset,
    root: Path | None = None,
    mirror: Path | None = None,
    base_url: str = RAW_BASE_URL,
) -> Fetched:
    """Install ``ds`` into the cache (from ``mirror`` if given, else by download), verified.

    A file already in the cache with the right hash is kept as is; one with a wrong hash
    is replaced.

    Raises:
        BadInput: the mirror lacks the file, or the bytes do not hash to ``ds.sha256``.
        FetchError: the download failed (network, HTTP status).
    """
    target = (root or data_dir()) / ds.filename
    if target.is_file() and file_sha256(target) == ds.sha256:
        return Fetched(ds.name, target, "present")
    if mirror is not None:
        source = mirror / ds.filename
        if not source.is_file():
            raise BadInput(f"{mirror}: no {ds.filename} here (dataset {ds.name!r})")
        with source.open("rb") as f:
            _install(ds, target, _read_chunks(f), str(source))
        return Fetched(ds.name, target, "copied")
    url = ds.url(base_url)
    _install(ds, target, _download(url), url)
    return Fetched(ds.name, target, "downloaded")


def _install(ds: Dataset, target: Path, chunks: Iterator[bytes], origin: str) -> None:
    """Write ``chunks`` beside ``target`` while hashing; rename only if the hash matches."""
    digest = hashlib.sha256()
    with atomic_path(target) as tmp:
        with tmp.open("wb") as out:
            for chunk in chunks:
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != ds.sha256:
            raise BadInput(
                f"{origin}: SHA-256 mismatch for dataset {ds.name!r}: expected {ds.sha256}, "
                f"got {digest.hexdigest()}; nothing installed"
            )


def _read_chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(_CHUNK):
        yield chunk


def _download(url: str) -> Iterator[bytes]:
    import httpx  # only fetching needs it; keeps the CLI's start-up light

    try:
        with (
            httpx.Client(timeout=DOWNLOAD_TIMEOUT_S, follow_redirects=True) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise FetchError(f"{url}: download failed: HTTP {response.status_code}")
            yield from response.iter_bytes(_CHUNK)
    except httpx.HTTPError as exc:
        raise FetchError(f"{url}: download failed: {exc}") from None


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in _read_chunks(f):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_many(
    names: list[str], every: bool, root: Path | None = None, mirror: Path | None = None
) -> Iterator[Fetched]:
    """Fetch ``names`` (or every dataset), one after the other; stops at the first error.

    Raises:
        BadInput: no name given (or names and ``every`` both), an unknown name, or what
            :func:`fetch` raises.
    """
    if every == bool(names):
        raise BadInput(f"name datasets to fetch or give --all (known: {', '.join(DATASETS)})")
    chosen = [get_dataset(n) for n in names] if names else list(DATASETS.values())
    for ds in chosen:
        yield fetch(ds, root, mirror)


def dataset_rows(root: Path | None = None) -> list[dict[str, str | bool | int]]:
    """One JSON-ready row per dataset: name, format, installed, terms, pinned source."""
    root = root or data_dir()
    return [
        {
            "name": ds.name,
            "format": ds.format,
            "installed": (root / ds.filename).is_file(),
            "license": ds.license,
            "description": ds.description,
            "source": ds.url(),
            "size_bytes": ds.size_bytes,
            "sha256": ds.sha256,
            "citation": ds.citation,
        }
        for ds in DATASETS.values()
    ]
