"""The load sweeps of ``qlmctl profile``, run over HTTP against one ready vLLM server.

How it works: prompts are exact-length lists of random token ids (random, so vLLM's
prefix cache never shortens a prefill), drawn from one seeded generator:

1. prefill: TTFT of lone requests with ``max_tokens=1`` over prompt lengths (median of a
   few repeats, after one discarded pass that warms every shape up);
2. decode: mean decode step with N concurrent streams (``ignore_eos``), from the server's
   engine-side decode-time histogram (a client-side estimate where the server lacks it),
   median of a few runs, over concurrency levels x prompt lengths;
3. KV saturation: N long requests at once while sampling ``/metrics``; stops at the first
   level where requests wait, the KV cache is (nearly) full or preemptions happen;
4. sleep/wake, where the server has the ``/sleep`` and ``/wake_up`` endpoints (started
   with ``VLLM_SERVER_DEV_MODE=1``, as ``qlmctl profile`` does); a refusal is recorded as
   None with a note, never a made-up time. On CPU vLLM refuses ``--enable-sleep-mode`` and
   the endpoints only pause and resume the scheduler: the times are those of that pause
   and resume (what a warm start costs there), and a note says so;
5. optionally, natural output lengths (no ``ignore_eos``) for the estimator's prior.

Cold start and stop belong to the launcher, so :func:`measure` leaves them at 0.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qlmctl.engine import vllm
from qlmctl.errors import EngineError
from qlmctl.profile.fit import DecodeSample, Measurements, PrefillSample, SaturationSample

_DEFAULT_MAX_NUM_SEQS = {"cpu": 128, "gpu": 256}
_DEFAULT_MAX_BATCHED_TOKENS = 2048
_TOKEN_ID_RANGE = (10, 2000)  # ids every tokenizer of >= 2048 entries has


@dataclass(frozen=True)
class SweepConfig:
    """What to measure; :meth:`quick` is the short sweep used by tests and CI."""

    prompt_lengths: tuple[int, ...] = (16, 64, 128, 256, 512, 1024, 1536)
    prefill_repeats: int = 3
    concurrency_levels: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    decode_prompt_lengths: tuple[int, ...] = (32, 256)
    decode_tokens: int = 64
    decode_repeats: int = 3  # runs per (concurrency, prompt length); the median is kept
    saturation_levels: tuple[int, ...] = (8, 16, 32, 64, 128)
    saturation_prompt_tokens: int = 256
    saturation_output_tokens: int = 128
    output_lengths: int = 0  # natural completions to sample (0: none)
    output_len_cap: int = 256
    seed: int = 0

    @classmethod
    def quick(cls) -> SweepConfig:
        """A sweep of a few dozen requests (about 10-20 s on a tiny CPU model)."""
        return cls(
            prompt_lengths=(16, 128, 384, 768),
            prefill_repeats=3,
            concurrency_levels=(1, 4, 12),
            decode_prompt_lengths=(32, 192),
            decode_tokens=32,
            saturation_levels=(8, 16),
            saturation_prompt_tokens=128,
            saturation_output_tokens=64,
        )


async def measure(
    base_url: str,
    model: str,
    gpu: str,
    sweep: SweepConfig,
    show_progress: bool = False,
    *,
    cpu: bool | None = None,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
) -> Measurements:
    """Run every sweep against a ready server; cold start/stop are left at 0."""
    timeout = httpx.Timeout(120.0, connect=5.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await vllm.check_endpoint(client, base_url, model)
        max_len = await _max_model_len(client, base_url, model)
        sweeper = _Sweeper(client, base_url, model, random.Random(sweep.seed))
        notes: list[str] = []
        lengths = [p for p in sweep.prompt_lengths if p + 1 <= max_len]
        with _progress(show_progress, _total(sweep, len(lengths))) as advance:
            prefill = await sweeper.prefill(lengths, sweep.prefill_repeats, advance)
            decode = await sweeper.decode(sweep, max_len, advance)
            saturation = await sweeper.saturation(sweep, advance)
            outputs = await sweeper.output_lengths(sweep, lengths, max_len, advance)
            sleep_s, wake_s = await _sleep_wake(client, base_url, gpu, cpu, notes)
            advance("sleep/wake", 1)
        cache = await vllm.fetch_cache_info(client, base_url)
        version = await vllm.server_version(client, base_url)
    kv = _kv_capacity(cache, saturation, sweep, notes)
    on_cpu = cpu if cpu is not None else gpu.lower() == "cpu"
    if max_num_seqs is None:
        max_num_seqs = _DEFAULT_MAX_NUM_SEQS["cpu" if on_cpu else "gpu"]
        notes.append(f"max_num_seqs {max_num_seqs} is vLLM's default (not given to qlmctl)")
    return Measurements(
        prefill=tuple(prefill),
        decode=tuple(decode),
        saturation=tuple(saturation),
        kv_capacity_tokens=kv,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens or _DEFAULT_MAX_BATCHED_TOKENS,
        cold_start_s=0.0,
        stop_s=0.0,
        sleep_s=sleep_s,
        wake_s=wake_s,
        output_len_sample=tuple(outputs),
        notes=tuple(notes),
        server_version=version,
    )


def _total(sweep: SweepConfig, n_lengths: int) -> int:
    decode_runs = len(sweep.concurrency_levels) * len(sweep.decode_prompt_lengths)
    return (
        n_lengths * sweep.prefill_repeats
        + decode_runs
        + len(sweep.saturation_levels)
        + sweep.output_lengths
        + 1  # sleep/wake
    )


@contextmanager
def _progress(show: bool, total: int) -> Iterator[Callable[[str, int], None]]:
    """A callback ``advance(stage, n)`` drawing a rich bar (or doing nothing)."""
    if not show:
        yield lambda stage, n: None
        return
    columns = (
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("profiling", total=total)

        def advance(stage: str, n: int) -> None:
            bar.update(task, advance=n, description=stage)

        yield advance


class _Sweeper:
    """The sweeps of :func:`measure`, sharing one client and one seeded prompt source."""

    def __init__(
        self, client: httpx.AsyncClient, base_url: str, model: str, rng: random.Random
    ) -> None:
        self.client, self.base_url, self.model, self.rng = client, base_url, model, rng

    def prompt(self, tokens: int) -> list[int]:
        return [self.rng.randrange(*_TOKEN_ID_RANGE) for _ in range(tokens)]

    def complete(
        self, prompt_tokens: int, max_tokens: int, ignore_eos: bool = True
    ) -> Awaitable[vllm.CompletionResult]:
        return vllm.stream_completion(
            self.client,
            self.base_url,
            self.model,
            self.prompt(prompt_tokens),
            max_tokens,
            ignore_eos=ignore_eos,
        )

    async def prefill(
        self, lengths: list[int], repeats: int, advance: Callable[[str, int], None]
    ) -> list[PrefillSample]:
        """Median TTFT per prompt length; a first, discarded pass warms every shape up."""
        ttfts: dict[int, list[float]] = {p: [] for p in lengths}
        for rep in range(repeats + 1):
            for p in lengths:
                res = await self.complete(p, 1)
                if rep:
                    ttfts[p].append(res.ttft_s)
                    advance("prefill", 1)
        return [PrefillSample(p, statistics.median(t)) for p, t in ttfts.items()]

    async def decode(
        self, sweep: SweepConfig, max_len: int, advance: Callable[[str, int], None]
    ) -> list[DecodeSample]:
        samples, n = [], sweep.decode_tokens
        for c in sweep.concurrency_levels:
            for p in sweep.decode_prompt_lengths:
                if p + n > max_len:
                    advance(f"decode x{c}", 1)
                    continue
                steps, ttfts = [], []
                for _ in range(sweep.decode_repeats):
                    before = await vllm.fetch_metrics(self.client, self.base_url)
                    results = await asyncio.gather(*(self.complete(p, n) for _ in range(c)))
                    after = await vllm.fetch_metrics(self.client, self.base_url)
                    step = _engine_step_s(before, after) or _client_step_s(results)
                    if step is not None:
                        steps.append(step)
                    ttfts.append(sorted(r.ttft_s for r in results))
                if steps:
                    step = statistics.median(steps)
                    by_rank = tuple(statistics.median(rank) for rank in zip(*ttfts, strict=True))
                    samples.append(DecodeSample(c, p, n, step, int(c * (p + n / 2)), by_rank))
                advance(f"decode x{c}", 1)
        return samples

    async def saturation(
        self, sweep: SweepConfig, advance: Callable[[str, int], None]
    ) -> list[SaturationSample]:
        samples = []
        for c in sweep.saturation_levels:
            before = await vllm.fetch_metrics(self.client, self.base_url)
            load = asyncio.gather(
                *(
                    self.complete(sweep.saturation_prompt_tokens, sweep.saturation_output_tokens)
                    for _ in range(c)
                )
            )
            peak = {"num_requests_running": 0.0, "kv_cache_usage_perc": 0.0}
            waiting: list[float] = []
            while not load.done():
                now = await vllm.fetch_metrics(self.client, self.base_url)
                for key in peak:
                    peak[key] = max(peak[key], now.get(key, 0.0))
                waiting.append(now.get("num_requests_waiting", 0.0))
                await asyncio.wait([load], timeout=0.2)
            await load
            after = await vllm.fetch_metrics(self.client, self.base_url)
            preempted = after.get("num_preemptions_total", 0) - before.get(
                "num_preemptions_total", 0
            )
            sample = SaturationSample(
                c,
                int(peak["num_requests_running"]),
                int(_sustained_peak(waiting)),
                peak["kv_cache_usage_perc"],
                int(preempted),
            )
            samples.append(sample)
            advance(f"kv saturation x{c}", 1)
            if sample.saturated:
                advance("kv saturation", len(sweep.saturation_levels) - len(samples))
                break
        return samples

    async def output_lengths(
        self,
        sweep: SweepConfig,
        lengths: list[int],
        max_len: int,
        advance: Callable[[str, int], None],
    ) -> list[int]:
        out: list[int] = []
        sem = asyncio.Semaphore(8)

        async def one(k: int) -> None:
            p = lengths[k % len(lengths)]
            async with sem:
                res = await self.complete(p, min(sweep.output_len_cap, max_len - p), False)
            out.append(res.output_tokens)
            advance("output lengths", 1)

        await asyncio.gather(*(one(k) for k in range(sweep.output_lengths)))
        return sorted(out)


def _sustained_peak(samples: list[float]) -> float:
    """The highest level held over two consecutive samples.

    NOTE: requests that arrive in the middle of an engine step wait for the next one, so a
    single sample with waiting > 0 is normal; a queue that persists means saturation.
    """
    return max((min(a, b) for a, b in itertools.pairwise(samples)), default=0.0)


def _engine_step_s(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Mean decode step from the server's own histograms (engine-core timestamps).

    Decode time summed over requests / the gaps it spans (tokens after each first one);
    None when the server does not export these metrics.
    """
    keys = ("request_decode_time_seconds_sum", "request_decode_time_seconds_count")
    if not all(k in after and k in before for k in (*keys, "generation_tokens_total")):
        return None
    decode_s = after[keys[0]] - before[keys[0]]
    gaps = after["generation_tokens_total"] - before["generation_tokens_total"]
    gaps -= after[keys[1]] - before[keys[1]]
    return decode_s / gaps if gaps > 0 and decode_s > 0 else None


def _client_step_s(results: list[vllm.CompletionResult]) -> float | None:
    """Median over streams of the mean token gap once every stream has its first token.

    NOTE: a mean over the window, not a median of single gaps: a client that falls behind
    reads several events at once, which makes single gaps near zero and the next one long.
    """
    steady_from = max(r.ttft_s for r in results)
    steps = []
    for r in results:
        window = [t for t in r.token_times_s if t >= steady_from]
        if len(window) >= 2:
            steps.append((window[-1] - window[0]) / (len(window) - 1))
    return statistics.median(steps) if steps else None


async def _max_model_len(client: httpx.AsyncClient, base_url: str, model: str) -> int:
    resp = await client.get(f"{base_url}/v1/models")
    for m in resp.json().get("data", []):
        if m.get("id") == model and isinstance(m.get("max_model_len"), int):
            return int(m["max_model_len"])
    return 2048


async def _sleep_wake(
    client: httpx.AsyncClient, base_url: str, gpu: str, cpu: bool | None, notes: list[str]
) -> tuple[float | None, float | None]:
    """Time sleep level 1 and wake-up where the server has the endpoints (see step 4)."""
    slept = await vllm.sleep(client, base_url, level=1)
    if not slept.supported:
        notes.append(f"sleep/wake not measured: server refused /sleep ({slept.detail})")
        return None, None
    woke = await vllm.wake_up(client, base_url)
    if not woke.supported:
        raise EngineError(f"{base_url}: slept but refused /wake_up ({woke.detail})")
    if cpu or gpu.lower() == "cpu":
        notes.append(
            "sleep/wake on CPU: vLLM refuses --enable-sleep-mode, so /sleep and /wake_up only "
            "pause and resume the scheduler (memory stays taken)"
        )
    return slept.elapsed_s, woke.elapsed_s


def _kv_capacity(
    cache: dict[str, str], saturation: list[SaturationSample], sweep: SweepConfig, notes: list[str]
) -> int:
    """KV tokens from vLLM's cache_config_info, else the load at which the cache filled."""
    for key in ("kv_cache_size_tokens",):
        if cache.get(key, "").isdigit():
            return int(cache[key])
    if cache.get("num_gpu_blocks", "").isdigit() and cache.get("block_size", "").isdigit():
        return int(cache["num_gpu_blocks"]) * int(cache["block_size"])
    per_request = sweep.saturation_prompt_tokens + sweep.saturation_output_tokens
    full = [s for s in saturation if s.max_kv_usage > 0]
    if not full:
        raise EngineError("cannot tell the KV capacity: no cache_config_info and no KV usage")
    s = full[-1]
    notes.append("kv capacity estimated from KV usage under load")
    in_cache = min(s.concurrency, s.max_running or s.concurrency) * per_request
    return max(1, int(in_cache / s.max_kv_usage))
