"""`vllm bench serve` through the gateway against the same vLLM server directly.

Builds a tiny random Llama, launches one real `vllm serve` (CPU), puts the gateway in
front of it (policy qlm or --policy, default classes, header batch-1), and runs vLLM's own
benchmark twice with the same random prompts: once at the gateway's URL, once at the
server's. Prints completed/failed requests, throughput and TTFT/ITL for both. The
gateway shares the host's cores with vLLM, so on a small machine its own CPU use shows.

    .venv/bin/python -m benchmarks.gateway_bench [--prompts 400] [--rate 40] [--policy qlm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from qlmctl.demo import free_ports
from qlmctl.gateway.command import prepare_gateway
from qlmctl.gateway.server import Gateway

KEYS = ("completed", "failed", "duration", "request_throughput", "output_throughput",
        "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms")  # fmt: skip


def bench(base_url: str, tokenizer: Path, out: Path, prompts: int, rate: float) -> dict[str, float]:
    """One `vllm bench serve` run; its saved result."""
    vllm = Path(sys.executable).with_name("vllm")
    subprocess.run(
        [str(vllm), "bench", "serve", "--backend", "openai", "--base-url", base_url,
         "--model", "tiny", "--tokenizer", str(tokenizer), "--dataset-name", "random",
         "--random-input-len", "64", "--random-output-len", "32", "--num-prompts", str(prompts),
         "--request-rate", str(rate), "--ignore-eos", "--disable-tqdm", "--seed", "0",
         "--header", "x-qlmctl-slo-class=batch-1", "--save-result",
         "--result-dir", str(out.parent), "--result-filename", out.name],
        check=True, capture_output=True, timeout=1200, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    result: dict[str, float] = json.loads(out.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--policy", default="qlm")
    args = parser.parse_args()
    from qlmctl.engine.tiny_model import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="qlmctl-gw-bench-"))
    model = build_tiny_model(root / "tiny", seed=0, hidden=128)
    gw_port, vllm_port = free_ports(2)
    cluster = root / "cluster.yaml"
    cluster.write_text(
        "gpu_types: [{name: cpu}]\n"
        f"models: [{{name: tiny, path: {model}, max_model_len: 2048}}]\n"
        f"instances: [{{id: cpu0, gpu: cpu, model: tiny, launch: {{port: {vllm_port}}}}}]\n"
    )
    job = prepare_gateway(
        cluster, listen=f"127.0.0.1:{gw_port}", policy=args.policy, runs=root / "runs", name="gw"
    )
    gateway = Gateway(job)
    thread = threading.Thread(target=lambda: asyncio.run(gateway.run()), daemon=True)
    thread.start()
    if not gateway.started.wait(300):
        raise SystemExit("the gateway did not start")
    try:
        direct = f"http://127.0.0.1:{vllm_port}"
        results = {
            "gateway": bench(job.base_url, model, root / "gw.json", args.prompts, args.rate),
            "direct": bench(direct, model, root / "direct.json", args.prompts, args.rate),
        }
    finally:
        gateway.request_stop()
        thread.join(60)
    print(f"{'metric':<22}" + "".join(f"{name:>12}" for name in results))
    for key in KEYS:
        print(
            f"{key:<22}" + "".join(f"{r.get(key, float('nan')):>12.2f}" for r in results.values())
        )
    print(f"run log: {job.run_dir}")


if __name__ == "__main__":
    main()
