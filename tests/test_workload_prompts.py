"""Deterministic prompt text, sized by word ratio or by a real local tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlmctl.domain import Request
from qlmctl.errors import BadInput
from qlmctl.workload import count_tokens, generate_prompt, prompt_for
from qlmctl.workload.prompts import WORDS_PER_TOKEN


def test_same_key_same_text_other_key_other_text() -> None:
    assert generate_prompt("r1", 100) == generate_prompt("r1", 100)
    assert generate_prompt("r1", 100) != generate_prompt("r2", 100)


@pytest.mark.parametrize("tokens", [1, 7, 100, 2000])
def test_length_without_tokenizer_follows_the_ratio(tokens: int) -> None:
    words = generate_prompt("k", tokens).split()
    assert len(words) == max(1, round(tokens * WORDS_PER_TOKEN))
    assert abs(count_tokens(" ".join(words)) - tokens) <= 1


def test_prompt_for_prefers_stored_text() -> None:
    base = {"arrival_s": 0, "model": "m", "slo_class": "c", "prompt_tokens": 40}
    stored = Request(id="a", prompt="keep me", max_output_tokens=5, **base)
    assert prompt_for(stored) == "keep me"
    lazy = Request(id="a", max_output_tokens=5, **base)
    assert prompt_for(lazy) == generate_prompt("a", 40)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [generate_prompt(f"c{i}", 200) for i in range(50)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    out = tmp_path_factory.mktemp("tok")
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.mark.parametrize("tokens", [5, 64, 300])
def test_tokenizer_hits_the_length(tokenizer_dir: Path, tokens: int) -> None:
    text = generate_prompt("req-1", tokens, tokenizer_dir)
    n = count_tokens(text, tokenizer_dir)
    assert tokens - 3 <= n <= tokens
    assert text == generate_prompt("req-1", tokens, tokenizer_dir)


def test_missing_tokenizer_dir_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="tokenizer directory not found"):
        count_tokens("x", tmp_path / "nope")
