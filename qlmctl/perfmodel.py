"""The performance model of one model on one GPU type: plain data with a versioned format.

It answers the questions the planner and the simulator ask: how long a prefill of N
tokens takes, how long one decode step of a batch takes, how many KV tokens fit, how long
a cold start, sleep or wake takes (:func:`swap_time_s` prices a model swap from the two
profiles involved). Its coefficients come from a profile (measured by ``qlmctl profile``)
or from a shipped default whose ``provenance`` says where it came from. It sits outside
``profile/`` and ``engine/`` because both use it: the simulator runs on it and the
profiler fits it.

Step time (vLLM V1 runs prefill chunks and decodes in one batch per step)::

    step_s = step_base_s
           + prefill_s_per_token * prefill_tokens
           + prefill_s_per_token2 * prefill_tokens**2 / 1000   # attention, per chunk
           + decode_s_per_seq * decode_seqs
           + decode_s_per_ctx_token * context_tokens           # KV read by decodes

A lone prompt's time to first token is ``ttft_overhead_s`` (per-request latency outside
the engine steps: HTTP, admission, delivering the token; 0 in older profiles) plus its
chunked prefill steps. Requests sent at the same moment reach the engine
``admission_gap_s`` apart (the API server takes them in one at a time; on a small CPU host
it also competes with the engine for cores; 0 in older profiles).
"""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from qlmctl.domain import INT32_MAX, MAX_TIME_S
from qlmctl.errors import BadInput
from qlmctl.fileio import atomic_write_text

PERF_MODEL_VERSION = 1
Num = TypeVar("Num", float, np.ndarray)


@dataclass(frozen=True, slots=True)
class PerfModel:
    """Latency coefficients and capacities of ``model`` served on ``gpu``."""

    model: str
    gpu: str
    step_base_s: float
    prefill_s_per_token: float
    prefill_s_per_token2: float
    decode_s_per_seq: float
    decode_s_per_ctx_token: float
    kv_capacity_tokens: int
    max_num_seqs: int
    max_num_batched_tokens: int
    cold_start_s: float
    stop_s: float
    sleep_s: float | None = None  # None: the server refused sleep mode (e.g. vLLM on CPU)
    wake_s: float | None = None
    provenance: str = "estimate"
    # Output lengths observed when profiling (a prior for the estimator); may be empty.
    output_len_sample: tuple[int, ...] = field(default=())
    # Added once to a request's TTFT (see module docstring); optional, so older files load.
    ttft_overhead_s: float = 0.0
    admission_gap_s: float = 0.0  # likewise optional
    version: int = PERF_MODEL_VERSION

    def __post_init__(self) -> None:
        for name in (
            "step_base_s",
            "prefill_s_per_token",
            "prefill_s_per_token2",
            "decode_s_per_seq",
            "decode_s_per_ctx_token",
            "cold_start_s",
            "stop_s",
            "ttft_overhead_s",
            "admission_gap_s",
        ):
            self._check_seconds(name, getattr(self, name))
        for name in ("kv_capacity_tokens", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not (_is_int(value) and 0 < value <= INT32_MAX):
                raise self._bad(f"{name} must be an integer in [1, {INT32_MAX}], got {value!r}")
        for name in ("sleep_s", "wake_s"):
            value = getattr(self, name)
            if value is not None:
                self._check_seconds(name, value)
        if not (isinstance(self.model, str) and isinstance(self.gpu, str)):
            raise self._bad("model and gpu must be strings")
        if not all(_is_int(n) and 0 < n <= INT32_MAX for n in self.output_len_sample):
            raise self._bad(f"output_len_sample must hold integers in [1, {INT32_MAX}]")

    def _check_seconds(self, name: str, value: object) -> None:
        """A finite, bounded, non-negative number: an infinite coefficient would make every
        predicted time inf and the run log NaN."""
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not (ok and 0 <= value <= MAX_TIME_S):  # type: ignore[operator]  # NaN fails too
            raise self._bad(f"{name} must be >= 0 and <= {MAX_TIME_S:g} s, got {value!r}")

    def _bad(self, what: str) -> BadInput:
        return BadInput(f"profile {self.model}@{self.gpu}: {what}")

    @property
    def key(self) -> tuple[str, str]:
        """``(model, gpu)``: how profiles are looked up."""
        return (self.model, self.gpu)

    @property
    def supports_sleep(self) -> bool:
        """Whether a warm start (sleep, then wake) is possible on this pair."""
        return self.sleep_s is not None and self.wake_s is not None

    def full_batch(self, kv_tokens_per_seq: float) -> float:
        """Sequences that run together at most: ``max_num_seqs``, or fewer if their KV
        (``kv_tokens_per_seq`` each) does not fit the cache."""
        return max(1.0, min(float(self.max_num_seqs), self.kv_capacity_tokens / kv_tokens_per_seq))

    def step_time_s(self, prefill_tokens: Num, decode_seqs: Num, context_tokens: Num) -> Num:
        """Duration of one engine step that prefills and decodes the given amounts
        (numbers, or numpy arrays of one shape)."""
        return (
            self.step_base_s
            + self.prefill_s_per_token * prefill_tokens
            + self.prefill_s_per_token2 * prefill_tokens * prefill_tokens / 1000.0
            + self.decode_s_per_seq * decode_seqs
            + self.decode_s_per_ctx_token * context_tokens
        )

    def prefill_work_s(self, tokens: Num, tokens_sq: Num) -> Num:
        """Prefill seconds of prompts totalling ``tokens`` (squares summing to
        ``tokens_sq``), on top of the steps' base time; numbers or numpy arrays."""
        return self.prefill_s_per_token * tokens + self.prefill_s_per_token2 * tokens_sq / 1000.0

    def prefill_time_s(self, prompt_tokens: int) -> float:
        """TTFT of one prompt alone: the request overhead plus its chunked prefill steps."""
        total, left = self.ttft_overhead_s, prompt_tokens
        while left > 0:
            chunk = min(left, self.max_num_batched_tokens)
            total += self.step_time_s(chunk, 0, prompt_tokens - left)
            left -= chunk
        return total

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        """Time of one decode step for ``batch`` sequences holding ``context_tokens`` in all."""
        return self.step_time_s(0, batch, context_tokens)

    def decode_throughput_tps(self, batch: int, mean_context_tokens: float) -> float:
        """Output tokens per second at a steady batch of ``batch`` sequences."""
        batch = max(1, min(batch, self.max_num_seqs))
        return batch / self.decode_step_s(batch, int(batch * mean_context_tokens))

    def to_dict(self) -> dict[str, Any]:
        """The versioned on-disk form."""
        data = asdict(self)
        data["output_len_sample"] = list(self.output_len_sample)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "profile") -> PerfModel:
        """Read the on-disk form; :class:`BadInput` for another version or a bad field."""
        version = data.get("version")
        if version != PERF_MODEL_VERSION:
            raise BadInput(
                f"{source}: profile format version {version!r} is not supported "
                f"(this qlmctl reads version {PERF_MODEL_VERSION}); re-run `qlmctl profile`"
            )
        sample = data.get("output_len_sample", ())
        if not isinstance(sample, list | tuple):
            raise BadInput(f"{source}: output_len_sample must be a list of integers")
        try:
            return cls(**{**data, "output_len_sample": tuple(sample)})
        except TypeError as exc:  # a missing or unknown field
            raise BadInput(f"{source}: {exc}") from None
        except BadInput as exc:
            raise BadInput(f"{source}: {exc}") from None

    def save(self, path: Path) -> None:
        """Write atomically (temp file, then rename): no partial profile is ever left."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> PerfModel:
        """Read one profile file."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BadInput(f"{path}: profile not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"{path}: cannot read ({exc})") from None
        except json.JSONDecodeError as exc:
            raise BadInput(
                f"{path}: malformed profile JSON ({exc.msg}, line {exc.lineno})"
            ) from None
        if not isinstance(data, dict):
            raise BadInput(f"{path}: a profile must be a JSON object")
        return cls.from_dict(data, str(path))


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def swap_time_s(
    perf_to: PerfModel,
    perf_from: PerfModel | None,
    asleep: bool,
    *,
    sleep_current: bool = False,
) -> float:
    """Seconds from starting a model swap on an instance until the target model serves.

    Args:
        perf_to: profile of the target model on the instance's GPU.
        perf_from: profile of the resident model, None if the instance holds none.
        asleep: whether the target model is asleep on the instance (warm).
        sleep_current: put the resident model to sleep rather than stop it (only where its
            profile supports sleep; otherwise it is stopped).

    Returns:
        The wake time when the target is asleep and its profile supports sleep; otherwise
        the release of the resident model (stop, or sleep when asked) plus a cold start.
    """
    if asleep and perf_to.supports_sleep:
        assert perf_to.wake_s is not None
        return perf_to.wake_s
    release_s = 0.0
    if perf_from is not None:
        if sleep_current and perf_from.supports_sleep and perf_from.sleep_s is not None:
            release_s = perf_from.sleep_s
        else:
            release_s = perf_from.stop_s
    return release_s + perf_to.cold_start_s
