"""The workload spec (YAML): SLO classes, models, sources, time handling, limits, seed.

How it reads: every source yields requests on one clock (seconds from the workload
start). A source is either a timestamped ``trace`` (Azure CSV, Mooncake JSONL) or a
synthetic ``arrivals`` process plus ``lengths`` (a length CSV, a ShareGPT or ``vllm
bench`` custom dataset, or parametric distributions). Each source maps its requests to
a model and an SLO class: one name, or ``{by: fraction | hash, weights: {name: w}}``.
A file is either a public ``dataset`` by name (fetched into the cache by ``qlmctl
workload fetch``, see ``datasets.py``; it brings its format) or a ``path`` with its
``format``; paths are relative to the spec file. Example::

    seed: 0
    models: [llama-3.1-8b]
    sources:
      - name: conv
        trace: {dataset: azure-2023-conv}
        model: llama-3.1-8b
        slo_class: batch-1
      - name: jobs
        arrivals: {process: poisson, rate_per_s: 0.5, duration_s: 600}
        lengths: {format: csv, path: my-lengths.csv}
        model: llama-3.1-8b
        slo_class: batch-2

Cross-references (names used by sources must be declared) are checked here, so a
loaded spec is consistent.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from qlmctl.domain import (
    INT32_MAX,
    MAX_RATE_PER_S,
    MAX_REQUESTS,
    MAX_TIME_S,
    Frozen,
    Name,
    Seconds,
    Seed,
    SLOClass,
    Weight,
)
from qlmctl.workload.datasets import DATASETS

# Bounded (see qlmctl.domain): token counts fit int32, other numbers are times or sizes.
PositiveInt = Annotated[int, Field(gt=0, le=INT32_MAX)]
PositiveFloat = Annotated[float, Field(gt=0, le=MAX_TIME_S)]
Rate = Annotated[float, Field(gt=0, le=MAX_RATE_PER_S)]

# QLM paper defaults (arXiv 2407.00047): interactive 20 s, batch-1 60 s, batch-2 1 h TTFT.
DEFAULT_SLO_CLASSES = (
    SLOClass(name="interactive", ttft_s=20, priority=0),
    SLOClass(name="batch-1", ttft_s=60, priority=1),
    SLOClass(name="batch-2", ttft_s=3600, priority=2),
)


# ---- arrivals -----------------------------------------------------------------------
class _Process(Frozen):
    duration_s: PositiveFloat | None = None
    count: Annotated[int, Field(gt=0, le=MAX_REQUESTS)] | None = None

    @model_validator(mode="after")
    def _bounded(self) -> _Process:
        if self.duration_s is None and self.count is None:
            raise ValueError("give 'duration_s', 'count' or both")
        rate = getattr(self, "rate_per_s", 0.0) + getattr(self, "on_rate_per_s", 0.0)
        if self.count is None and rate * (self.duration_s or 0.0) > MAX_REQUESTS:
            raise ValueError(f"rate x duration gives more than {MAX_REQUESTS:,} requests")
        return self


class Poisson(_Process):
    """Exponential inter-arrivals at ``rate_per_s``."""

    process: Literal["poisson"]
    rate_per_s: Rate


class Gamma(_Process):
    """Gamma inter-arrivals: mean ``1/rate_per_s``, coefficient of variation ``cv`` (bursty > 1)."""

    process: Literal["gamma"]
    rate_per_s: Rate
    cv: Annotated[float, Field(ge=0.01, le=100)]


class OnOff(_Process):
    """Poisson at ``on_rate_per_s`` for ``on_s``, then ``off_rate_per_s`` for ``off_s``, repeat."""

    process: Literal["onoff"]
    on_rate_per_s: Rate
    off_rate_per_s: Annotated[float, Field(ge=0, le=MAX_RATE_PER_S)] = 0.0
    on_s: PositiveFloat
    off_s: PositiveFloat


Arrivals = Annotated[Poisson | Gamma | OnOff, Field(discriminator="process")]


# ---- lengths ------------------------------------------------------------------------
class Constant(Frozen):
    dist: Literal["constant"]
    value: PositiveInt


class Uniform(Frozen):
    """Integers uniform in ``[low, high]``."""

    dist: Literal["uniform"]
    low: PositiveInt
    high: PositiveInt

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if self.high < self.low:
            raise ValueError("'high' must be >= 'low'")
        return self


class LogNormal(Frozen):
    """Log-normal with the given median and log-space sigma, clipped to ``[min, max]``."""

    dist: Literal["lognormal"]
    median: PositiveFloat
    sigma: Annotated[float, Field(gt=0, le=10)]
    min: PositiveInt = 1
    max: PositiveInt | None = None


Dist = Annotated[Constant | Uniform | LogNormal, Field(discriminator="dist")]


class ParametricLengths(Frozen):
    """Prompt and output lengths drawn independently from two distributions."""

    prompt_tokens: Dist
    output_tokens: Dist


class FileRef(Frozen):
    """A file: a registered ``dataset`` (its format is known) or a ``path`` and ``format``."""

    FORMATS: ClassVar[tuple[str, ...]]  # the readers this kind of file may use
    format: str | None = None
    path: str | None = None
    dataset: str | None = None

    @model_validator(mode="after")
    def _one_file(self) -> FileRef:
        choices = " or ".join(repr(f) for f in self.FORMATS)
        if (self.path is None) == (self.dataset is None):
            raise ValueError(f"give exactly one of 'dataset' or 'path' (with 'format': {choices})")
        if self.dataset is None:
            if self.format not in self.FORMATS:
                raise ValueError(f"a 'path' needs 'format': {choices}, got {self.format!r}")
            return self
        ds = DATASETS.get(self.dataset)
        if ds is None:
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {', '.join(DATASETS)}")
        if ds.format not in self.FORMATS or self.format not in (None, ds.format):
            raise ValueError(f"dataset {self.dataset!r} is a {ds.format!r} file, not {choices}")
        return self

    @property
    def file_format(self) -> str:
        """The reader to use: the given format or the dataset's."""
        return self.format or DATASETS[str(self.dataset)].format


class FileLengths(FileRef):
    """Lengths (and, for text datasets, prompt text) sampled with replacement from a file.

    ``csv``: ``num_prefill_tokens,num_decode_tokens`` (the ShareGPT/arXiv length datasets);
    ``sharegpt``: ShareGPT JSON (first human turn, first reply); ``custom``: ``vllm bench``
    custom JSONL (``prompt``, optional ``output_tokens``).
    """

    FORMATS = ("csv", "sharegpt", "custom")


class Trace(FileRef):
    """A timestamped trace. ``azure``: absolute timestamps (merged on one wall clock with
    other ``azure`` sources); ``mooncake``: ``timestamp`` in ms from the trace start."""

    FORMATS = ("azure", "mooncake")


# ---- assignment ---------------------------------------------------------------------
class Assign(Frozen):
    """Split a source's requests over names by weight.

    ``fraction``: exact shares (largest remainder), shuffled by the seed; ``hash``: a
    stable hash of the request id, so the split does not depend on the seed or window.
    """

    by: Literal["fraction", "hash"]
    weights: Annotated[dict[Name, Weight], Field(min_length=1)]


Assignment = Name | Assign


def assigned_names(rule: Assignment) -> list[str]:
    """Every name a rule may produce."""
    return [rule] if isinstance(rule, str) else list(rule.weights)


class Source(Frozen):
    """One stream of requests mapped to model(s) and class(es)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    trace: Trace | None = None
    arrivals: Arrivals | None = None
    lengths: ParametricLengths | FileLengths | None = None
    model: Assignment
    slo_class: Assignment
    start_s: Seconds = 0.0
    sample_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0

    @model_validator(mode="after")
    def _one_kind(self) -> Source:
        if (self.trace is None) == (self.arrivals is None):
            raise ValueError("give exactly one of 'trace' or 'arrivals' (+ 'lengths')")
        if self.arrivals is not None and self.lengths is None:
            raise ValueError("a synthetic source needs 'lengths'")
        if self.trace is not None and self.lengths is not None:
            raise ValueError("a trace brings its own lengths; drop 'lengths'")
        return self


# ---- the spec -----------------------------------------------------------------------
class Window(Frozen):
    """Keep requests with ``start_s <= arrival < end_s`` (seconds on the unscaled clock)."""

    start_s: Seconds = 0.0
    end_s: PositiveFloat | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError("'end_s' must be > 'start_s'")
        return self


class Limits(Frozen):
    """Token limits. ``max_output_tokens`` is the cap sent to the engine (and the target
    when a source has no output length); ``over`` says what to do with a request whose
    output (or prompt + output) exceeds a limit: clip it, drop it, or fail."""

    max_output_tokens: PositiveInt = 4096
    max_total_tokens: Annotated[int, Field(gt=1, le=INT32_MAX)] | None = None
    over: Literal["clip", "drop", "error"] = "clip"


class Prompts(Frozen):
    """``store``: write prompt text into the workload (else ``prompt_for`` makes it at serve
    time); ``tokenizer``: a local HF tokenizer directory to size texts with."""

    store: bool = False
    tokenizer: str | None = None


class WorkloadSpec(Frozen):
    """A workload spec file."""

    version: Literal[1] = 1
    seed: Seed = 0
    slo_classes: Annotated[list[SLOClass], Field(min_length=1)] = Field(
        default_factory=lambda: list(DEFAULT_SLO_CLASSES)
    )
    models: Annotated[list[Name], Field(min_length=1)]
    sources: Annotated[list[Source], Field(min_length=1)]
    window: Window = Window()
    # at most one: rescale times so count / duration hits the rate, or multiply them
    target_rate_per_s: Rate | None = None
    time_scale: Annotated[float, Field(ge=1e-6, le=1e6)] | None = None  # 2.0: half the rate
    limits: Limits = Limits()
    prompts: Prompts = Prompts()

    @model_validator(mode="after")
    def _names_resolve(self) -> WorkloadSpec:
        classes = [c.name for c in self.slo_classes]
        for field, names in (
            ("slo_classes", classes),
            ("models", self.models),
            ("sources", [s.name for s in self.sources]),
        ):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{field}: duplicate names {dupes}")
        for i, src in enumerate(self.sources):
            for field, known in (("model", self.models), ("slo_class", classes)):
                for name in assigned_names(getattr(src, field)):
                    if name not in known:
                        raise ValueError(
                            f"sources[{i}].{field}: unknown name {name!r} (known: {known})"
                        )
        if self.target_rate_per_s is not None and self.time_scale is not None:
            raise ValueError("give at most one of 'target_rate_per_s' and 'time_scale'")
        return self
