"""Shared fixtures: tiny real models the tests build themselves (no hub, no downloads)."""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def code_tokenizer():
    """A byte-level BPE tokenizer (vocab 512) trained on standard-library code."""
    from sdsat_lsp.tinymodel import train_tokenizer

    return train_tokenizer(vocab_size=512, max_files=60)


@pytest.fixture(scope="session")
def code_stream(code_tokenizer):
    """Token ids of 10 standard-library files (~42k tokens), EOS-separated: small enough that a
    micro model learns it well in seconds, which is what makes its drafts get accepted."""
    from sdsat_lsp.corpus import python_files, read_text

    stream: list[int] = []
    for path in python_files()[::40][:10]:
        text = read_text(path)
        if text:
            stream += code_tokenizer(text)["input_ids"] + [code_tokenizer.eos_token_id]
    return stream


@pytest.fixture(scope="session")
def sdsat_micro(code_tokenizer, code_stream):
    """A micro Llama (GQA) trained ~12 s with the SDSAT recipe, so drafts are often accepted:
    identity tests then exercise acceptance, EOS and limits inside accepted drafts.
    Returns (model, tokenizer, adaptive_id)."""
    from sdsat_lsp.tinymodel import ADAPTIVE_TOKEN, build_tiny_model
    from sdsat_lsp.train import train_steps

    model = build_tiny_model(code_tokenizer, seed=0)
    adaptive_id = code_tokenizer.convert_tokens_to_ids(ADAPTIVE_TOKEN)
    train_steps(model, code_stream, [adaptive_id], steps=300, seq_len=128, batch_size=8, max_block=5, blocks_per_row=8, lr=5e-3)
    return model, code_tokenizer, adaptive_id


@pytest.fixture(scope="session")
def sdsat_micro_dir(sdsat_micro, tmp_path_factory):
    """The micro model saved as a model folder (safetensors, tokenizer, sdsat.json)."""
    from sdsat_lsp.tinymodel import save_tiny

    model, tokenizer, _ = sdsat_micro
    return save_tiny(model, tokenizer, tmp_path_factory.mktemp("micro"), k=5)


@pytest.fixture(scope="session")
def code_prompts(code_stream):
    """Token-id prompts of 30-200 tokens cut from the stream at fixed seeds."""
    rng = random.Random(1234)
    prompts = []
    for _ in range(6):
        length = rng.randrange(30, 200)
        start = rng.randrange(0, len(code_stream) - length)
        prompts.append(code_stream[start : start + length])
    return prompts
