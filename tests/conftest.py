"""Shared fixtures: tiny real models the tests build themselves (no hub, no downloads)."""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Servers the tests start do not compile their forward pass in the background (minutes of CPU on
# 2 cores per server); test_compiled.py and the server's compile test ask for it.
os.environ.setdefault("SDSAT_LSP_COMPILE", "0")

import pytest


@pytest.fixture(scope="session")
def micro_bundle():
    """(model, tokenizer, token stream) from `tinymodel.train_micro`: a micro Llama (GQA) trained
    ~15 s with the SDSAT recipe on 10 standard-library files, so that its drafts are often accepted
    and identity tests exercise acceptance, EOS and limits inside accepted drafts."""
    from sdsat_lsp.tinymodel import train_micro

    return train_micro()


@pytest.fixture(scope="session")
def code_tokenizer(micro_bundle):
    """A byte-level BPE tokenizer (vocab 512) trained on standard-library code."""
    return micro_bundle[1]


@pytest.fixture(scope="session")
def code_stream(micro_bundle):
    """Token ids of the micro model's training files, EOS-separated."""
    return micro_bundle[2]


@pytest.fixture(scope="session")
def sdsat_micro(micro_bundle):
    """(model, tokenizer, adaptive_id) of the micro SDSAT model."""
    from sdsat_lsp.tinymodel import ADAPTIVE_TOKEN

    model, tokenizer, _ = micro_bundle
    return model, tokenizer, tokenizer.convert_tokens_to_ids(ADAPTIVE_TOKEN)


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


# ---- a tiny random model for the kvcache / prompt / server tests (fast: no training) ----------


@pytest.fixture(scope="session")
def tiny_lm():
    """(model, tokenizer, adaptive_id): a random 2-layer GQA Llama (init_std 0.2, so that its greedy
    output varies with the prompt) over a 512-token BPE trained on 30 standard-library files; it
    never predicts EOS."""
    from sdsat_lsp.tinymodel import ADAPTIVE_TOKEN, build_tiny_model, train_tokenizer

    import torch

    tokenizer = train_tokenizer(vocab_size=512, max_files=30)
    model = build_tiny_model(tokenizer, seed=0, init_std=0.2)
    with torch.no_grad():
        # EOS gets logit 0 while the largest of the other 511 random logits is far above 0: the
        # model never ends a generation by itself, so tests control length (cancel tests need
        # generations that run for seconds).
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    return model, tokenizer, tokenizer.convert_tokens_to_ids(ADAPTIVE_TOKEN)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_lm, tmp_path_factory):
    """`tiny_lm` saved as a model folder (safetensors, tokenizer, sdsat.json with FIM ids)."""
    from sdsat_lsp.tinymodel import save_tiny

    model, tokenizer, _ = tiny_lm
    return save_tiny(model, tokenizer, tmp_path_factory.mktemp("tiny"), k=4)
