"""Turn a workload spec into a :class:`Workload`; load a spec, a Parquet file or a raw trace.

Pipeline (columnar, numpy; Request objects are built once at the end):

1. each source yields rows: id ``<source>-<row>`` (row = record index in the file or
   the synthetic sequence number), arrival, prompt/output lengths, optional text;
   randomness comes from ``default_rng([seed, crc32(source name)])``, so adding a
   source does not change the others;
2. one clock: absolute traces (Azure) are shifted by the earliest first arrival over
   all absolute sources, relative ones start at 0; each source then adds ``start_s``;
3. the window keeps ``start_s <= t < end_s`` and re-zeros at ``start_s``;
4. limits clip, drop or reject requests over ``max_output_tokens``/``max_total_tokens``;
5. model and class assignment per source (fractions are exact over the kept rows);
6. time scaling: ``time_scale`` multiplies times; ``target_rate_per_s`` rescales so that
   count / duration equals it (duration: the window's length, else the last arrival).

A raw trace file (``workload show trace.csv``) becomes one request per record, all of
model and class ``unassigned``, at its own arrival times (lengths-only files: all at 0).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from qlmctl.domain import Request, SLOClass
from qlmctl.errors import BadInput
from qlmctl.specs import load_spec
from qlmctl.workload.arrivals import synthesize
from qlmctl.workload.assign import assign
from qlmctl.workload.datasets import installed_path
from qlmctl.workload.lengths import draw, resample
from qlmctl.workload.model import Workload
from qlmctl.workload.parquet import read_workload
from qlmctl.workload.prompts import generate_prompt
from qlmctl.workload.spec import FileLengths, FileRef, Limits, Source, WorkloadSpec
from qlmctl.workload.traces import UNKNOWN, TraceData, read_trace, sniff_format

TRACE_SUFFIXES = (".csv", ".jsonl", ".json")
UNASSIGNED = "unassigned"  # model and class of a raw trace's requests


@dataclass(frozen=True)
class _Rows:
    """One source's rows, aligned arrays."""

    row: np.ndarray  # int64 record index (the id suffix)
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray  # UNKNOWN where the source does not know
    prompts: np.ndarray | None  # object array of str, or None
    absolute: bool
    first_s: float  # first arrival before sampling: the clock origin of absolute traces

    def take(self, keep: np.ndarray) -> _Rows:
        return replace(
            self,
            row=self.row[keep],
            arrival_s=self.arrival_s[keep],
            prompt_tokens=self.prompt_tokens[keep],
            output_tokens=self.output_tokens[keep],
            prompts=self.prompts[keep] if self.prompts is not None else None,
        )


def load_workload(path: Path, trace_format: str | None = None) -> Workload:
    """Read a workload spec (``.yaml``/``.yml``), a materialised workload (``.parquet``)
    or, with ``trace_format`` or a trace suffix, a raw trace file (format sniffed)."""
    path = Path(path)
    if trace_format is None and path.suffix == ".jsonl":
        from qlmctl.gateway.batchplan import batch_workload, is_batch_file

        if is_batch_file(path):  # an OpenAI Batch input file, planned ahead of submission
            return batch_workload(path)
    if trace_format is not None or path.suffix in TRACE_SUFFIXES:
        return trace_workload(path, trace_format)
    if path.suffix in (".parquet", ".pq"):
        return read_workload(path)
    if path.suffix in (".yaml", ".yml"):
        return build_workload(load_spec(WorkloadSpec, path), path)
    raise BadInput(
        f"{path}: expected a workload spec (.yaml), a materialised one (.parquet) or a trace "
        f"({', '.join(TRACE_SUFFIXES)}; else give --format)"
    )


def trace_workload(path: Path, fmt: str | None = None) -> Workload:
    """A raw trace file as a workload: one ``unassigned`` request per record."""
    data = read_trace(fmt or sniff_format(path), path)
    cap = Limits().max_output_tokens  # the replay target where the file has no output length
    arrival = np.zeros(len(data)) if data.arrival_s is None else data.arrival_s - data.arrival_s[0]
    requests = [
        Request(
            id=f"{path.stem}-{k}",
            arrival_s=t,
            model=UNASSIGNED,
            slo_class=UNASSIGNED,
            prompt_tokens=p,
            max_output_tokens=o if o != UNKNOWN else cap,
            output_tokens=o if o != UNKNOWN else None,
        )
        for k, (t, p, o) in enumerate(
            zip(
                arrival.tolist(),
                data.prompt_tokens.tolist(),
                data.output_tokens.tolist(),
                strict=True,
            )
        )
    ]
    label = SLOClass(name=UNASSIGNED, ttft_s=3600.0)  # a label only: a trace has no SLO
    return Workload.from_requests(requests, {UNASSIGNED: label}, str(path))


def build_workload(spec: WorkloadSpec, spec_path: Path) -> Workload:
    """Materialise ``spec`` (paths inside it are relative to ``spec_path``'s directory)."""
    base = Path(spec_path).parent
    tokenizer = base / spec.prompts.tokenizer if spec.prompts.tokenizer else None
    rngs = [np.random.default_rng([spec.seed, zlib.crc32(s.name.encode())]) for s in spec.sources]
    rows = []
    for i, (src, rng) in enumerate(zip(spec.sources, rngs, strict=True)):
        try:
            rows.append(_source_rows(src, base, tokenizer, rng))
        except BadInput as exc:
            raise BadInput(f"{spec_path}: sources[{i}] ({src.name}): {exc}") from None
    rows = _one_clock(spec, rows)
    rows = _window(spec, spec_path, rows)
    rows = [
        _apply_limits(spec.limits, src, r, spec_path)
        for src, r in zip(spec.sources, rows, strict=True)
    ]
    requests: list[Request] = []
    scale = _time_factor(spec, spec_path, rows)
    for src, r, rng in zip(spec.sources, rows, rngs, strict=True):
        requests.extend(_requests(spec, src, r, rng, scale, tokenizer))
    if not requests:
        raise BadInput(f"{spec_path}: no requests left after the window and limits")
    return Workload.from_requests(requests, {c.name: c for c in spec.slo_classes}, str(spec_path))


def _source_rows(src: Source, base: Path, tok: Path | None, rng: np.random.Generator) -> _Rows:
    if src.trace is not None:
        data = read_trace(src.trace.file_format, locate(src.trace, base), tok)
        assert data.arrival_s is not None
        arrival, absolute = data.arrival_s, data.absolute
    else:
        assert src.arrivals is not None and src.lengths is not None
        arrival, absolute = synthesize(src.arrivals, rng), False
        n = len(arrival)
        if isinstance(src.lengths, FileLengths):
            lengths = read_trace(src.lengths.file_format, locate(src.lengths, base), tok)
            data = resample(lengths, n, rng)
        else:
            prompt = draw(src.lengths.prompt_tokens, n, rng)
            data = TraceData(prompt, draw(src.lengths.output_tokens, n, rng))
    rows = _Rows(
        row=np.arange(len(arrival)),
        arrival_s=arrival,
        prompt_tokens=data.prompt_tokens,
        output_tokens=data.output_tokens,
        prompts=np.array(data.prompts, dtype=object) if data.prompts is not None else None,
        absolute=absolute,
        first_s=float(arrival[0]) if len(arrival) else 0.0,
    )
    if src.sample_fraction < 1.0:
        rows = rows.take(rng.random(len(rows.row)) < src.sample_fraction)
    return rows


def locate(ref: FileRef, base: Path) -> Path:
    """The file a spec names: an installed dataset, or a path relative to ``base``."""
    if ref.dataset is not None:
        return installed_path(ref.dataset)
    return base / str(ref.path)


def _one_clock(spec: WorkloadSpec, rows: list[_Rows]) -> list[_Rows]:
    starts = [r.first_s for r in rows if r.absolute]
    origin = min(starts) if starts else 0.0
    return [
        replace(r, arrival_s=r.arrival_s - (origin if r.absolute else 0.0) + src.start_s)
        for src, r in zip(spec.sources, rows, strict=True)
    ]


def _window(spec: WorkloadSpec, spec_path: Path, rows: list[_Rows]) -> list[_Rows]:
    start = spec.window.start_s
    end = spec.window.end_s if spec.window.end_s is not None else np.inf
    kept = [r.take((r.arrival_s >= start) & (r.arrival_s < end)) for r in rows]
    if not any(len(r.row) for r in kept):
        last = max((float(r.arrival_s.max()) for r in rows if len(r.row)), default=0.0)
        raise BadInput(
            f"{spec_path}: field 'window': [{start:g}, {end:g}) s holds no requests "
            f"(the sources span 0 to {last:.1f} s)"
        )
    return [replace(r, arrival_s=r.arrival_s - start) for r in kept]


def _apply_limits(limits: Limits, src: Source, r: _Rows, spec_path: Path) -> _Rows:
    """Clip, drop or reject rows over the limits; output_tokens end up <= the cap.

    Clipping keeps the output the spec asks for (the row's length, at most
    ``max_output_tokens``; ``max_output_tokens`` when the source has none) and shortens
    the prompt so prompt + output fit ``max_total_tokens``. A row whose output alone
    leaves no room for a 1-token prompt cannot be clipped: that is an error (exit 2)
    rather than a silent drop, since dropping changes the workload's count and rate;
    ``over: drop`` says so explicitly.
    """
    cap = np.full(len(r.row), limits.max_output_tokens, dtype=np.int64)
    if limits.max_total_tokens is not None:
        cap = np.minimum(cap, limits.max_total_tokens - r.prompt_tokens)
    over = (cap < 1) | ((r.output_tokens != UNKNOWN) & (r.output_tokens > cap))
    if not over.any():
        return r
    if limits.over == "error":
        i = int(np.argmax(over))
        raise BadInput(
            f"{spec_path}: request {src.name}-{r.row[i]}: prompt_tokens "
            f"{r.prompt_tokens[i]} + output_tokens {r.output_tokens[i]} exceed the limits "
            f"(field 'limits'; set over: clip or drop)"
        )
    if limits.over == "drop":
        return r.take(~over)
    if limits.max_total_tokens is None:
        return r  # only the output is over: _requests caps it at max_output_tokens
    known = r.output_tokens != UNKNOWN
    wanted = np.minimum(np.where(known, r.output_tokens, limits.max_output_tokens),
                        limits.max_output_tokens)  # fmt: skip
    room = limits.max_total_tokens - wanted  # the longest prompt that leaves it room
    impossible = over & (room < 1)
    if impossible.any():
        i = int(np.argmax(impossible))
        raise BadInput(
            f"{spec_path}: request {src.name}-{r.row[i]}: its {wanted[i]} output tokens "
            f"alone reach max_total_tokens {limits.max_total_tokens}, so clipping the "
            f"prompt cannot make it fit (field 'limits'; raise max_total_tokens, lower "
            f"max_output_tokens, or set over: drop)"
        )
    prompt = np.where(over, np.minimum(r.prompt_tokens, room), r.prompt_tokens)
    prompts = r.prompts
    if prompts is not None:  # clipped texts no longer match: generate them instead
        prompts = prompts.copy()
        prompts[prompt < r.prompt_tokens] = None
    return replace(r, prompt_tokens=prompt, prompts=prompts)


def _time_factor(spec: WorkloadSpec, spec_path: Path, rows: list[_Rows]) -> float:
    if spec.time_scale is not None:
        return spec.time_scale
    if spec.target_rate_per_s is None:
        return 1.0
    count = sum(len(r.row) for r in rows)
    if spec.window.end_s is not None:
        duration = spec.window.end_s - spec.window.start_s
    else:
        duration = max(float(r.arrival_s.max()) for r in rows if len(r.row))
    if duration <= 0:
        raise BadInput(f"{spec_path}: field 'target_rate_per_s': the workload has no duration")
    return (count / duration) / spec.target_rate_per_s


def _requests(
    spec: WorkloadSpec,
    src: Source,
    r: _Rows,
    rng: np.random.Generator,
    scale: float,
    tokenizer: Path | None,
) -> list[Request]:
    ids = [f"{src.name}-{k}" for k in r.row.tolist()]
    models = assign(src.model, ids, rng, "model")
    classes = assign(src.slo_class, ids, rng, "slo_class")
    cap = np.full(len(ids), spec.limits.max_output_tokens, dtype=np.int64)
    if spec.limits.max_total_tokens is not None:
        cap = np.minimum(cap, spec.limits.max_total_tokens - r.prompt_tokens)
    output = np.minimum(r.output_tokens, cap).tolist()
    texts = r.prompts.tolist() if r.prompts is not None else [None] * len(ids)
    prompt_tokens = r.prompt_tokens.tolist()
    if spec.prompts.store:
        texts = [
            t if t is not None else generate_prompt(i, p, tokenizer)
            for i, t, p in zip(ids, texts, prompt_tokens, strict=True)
        ]
    return [
        Request(
            id=i,
            arrival_s=t,
            model=m,
            slo_class=c,
            prompt=text,
            prompt_tokens=p,
            max_output_tokens=mx,
            output_tokens=o if o != UNKNOWN else None,
        )
        for i, t, m, c, text, p, mx, o in zip(
            ids,
            (r.arrival_s * scale).tolist(),
            models.tolist(),
            classes.tolist(),
            texts,
            prompt_tokens,
            cap.tolist(),
            output,
            strict=True,
        )
    ]
