"""Deterministic prompt text of a requested token length, and token counting.

How it works: a prompt is a sequence of common English words drawn by a generator seeded
from a stable hash of the request id, so the same request always gets the same text.
Without a tokenizer the word count is ``prompt_tokens * WORDS_PER_TOKEN`` (rough); with a
local Hugging Face tokenizer directory (``tokenizer.json``, read by ``tokenizers``, else
``transformers``, if importable) a binary search over the word count makes the text's
token count the largest not above the target. Tokenizers are loaded once per directory.

Prompts stay out of materialised workloads unless the spec asks (``prompts.store``): the
serving side calls :func:`prompt_for` lazily, passing the served model's tokenizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np

from qlmctl.domain import Request
from qlmctl.errors import BadInput

WORDS_PER_TOKEN = 0.75  # English text, typical BPE tokenizers

_WORDS = np.array(
    """the of and to in is was for that with as on by at from his her they this which
    be are were had have not but all one their an there when who will more if so out
    up into about time than them can only other new some could these two may then do
    first any my now such like our over man me even most made after also did many
    before must through back years where much your way well down should because each
    just those people how too little state good very make world still own see men
    work long get here between both life being under never day same another know while
    last might us great old year off come since against go came right used take three
    system water light river market garden number report city music paper table
    window question answer story morning evening energy simple small large open
    plan model queue server token batch request memory level value order group price""".split()  # noqa: SIM905
)


def _seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _words(key: str, count: int) -> list[str]:
    rng = np.random.default_rng(_seed(key))
    return list(_WORDS[rng.integers(0, len(_WORDS), size=count)])


@lru_cache(maxsize=8)
def _encoder(tokenizer_dir: Path) -> Callable[[str], int] | None:
    """A text -> token count function for the directory, or None if no library is importable."""
    if not tokenizer_dir.is_dir():
        raise BadInput(f"{tokenizer_dir}: tokenizer directory not found")
    tokenizer_json = tokenizer_dir / "tokenizer.json"
    try:
        from tokenizers import Tokenizer

        if tokenizer_json.is_file():
            tok = Tokenizer.from_file(str(tokenizer_json))
            return lambda text: len(tok.encode(text, add_special_tokens=False).ids)
    except ImportError:
        pass
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    try:
        hf = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BadInput(f"{tokenizer_dir}: cannot load tokenizer ({exc})") from None
    return lambda text: len(hf.encode(text, add_special_tokens=False))


def count_tokens(text: str, tokenizer_dir: Path | None = None) -> int:
    """Tokens in ``text``: exact with a tokenizer, else estimated from the word count."""
    encode = _encoder(Path(tokenizer_dir)) if tokenizer_dir is not None else None
    if encode is not None:
        return encode(text)
    return max(1, round(len(text.split()) / WORDS_PER_TOKEN))


def generate_prompt(key: str, prompt_tokens: int, tokenizer_dir: Path | None = None) -> str:
    """Deterministic text of about ``prompt_tokens`` tokens, seeded by ``key``.

    Args:
        key: stable identity of the text (a request id).
        prompt_tokens: target length in tokens (> 0).
        tokenizer_dir: local tokenizer directory to hit the length exactly (at most the
            target; never fewer than one word).
    """
    encode = _encoder(Path(tokenizer_dir)) if tokenizer_dir is not None else None
    if encode is None:
        return " ".join(_words(key, max(1, round(prompt_tokens * WORDS_PER_TOKEN))))
    words = _words(key, 2 * prompt_tokens + 8)
    lo, hi = 1, len(words)  # NOTE: invariant: lo words fit (or lo == 1), hi + 1 words do not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if encode(" ".join(words[:mid])) <= prompt_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def prompt_for(request: Request, tokenizer_dir: Path | None = None) -> str:
    """The prompt to send for ``request``: its stored text, else generated text of its length.

    Called by the serving side when it dispatches a request to a real engine.
    """
    if request.prompt is not None:
        return request.prompt
    return generate_prompt(request.id, request.prompt_tokens, tokenizer_dir)
