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
import pytest_asyncio
from hypothesis import settings as hypothesis_settings

# Property tests draw the same examples on every run (a fixed seed per test, no example database),
# so a run fails or passes on the code alone. `--hypothesis-seed N` (or SDSAT_HYPOTHESIS_SEED=N,
# for a command line one cannot change, such as scripts/test's) draws other examples, the same
# ones for the same N: under it the "seeded" profile is loaded instead, because a derandomized
# test ignores the forced seed.
hypothesis_settings.register_profile("derandomized", derandomize=True, database=None)
hypothesis_settings.register_profile("seeded", derandomize=False, database=None)
hypothesis_settings.load_profile("derandomized")
SEED_VARIABLE = "SDSAT_HYPOTHESIS_SEED"


@pytest.hookimpl(tryfirst=True)  # before hypothesis' plugin, which reads --hypothesis-seed in its own
def pytest_configure(config):
    if os.environ.get(SEED_VARIABLE) and config.getoption("--hypothesis-seed", None) is None:
        config.option.hypothesis_seed = os.environ[SEED_VARIABLE]
    if config.getoption("--hypothesis-seed", None) is not None and not config.getoption("--hypothesis-profile", None):
        hypothesis_settings.load_profile("seeded")


@pytest.fixture(scope="session")
def micro_bundle():
    """(model, tokenizer, token stream) from `tinymodel.train_micro`: a micro Llama (GQA) trained
    ~15 s with the SDSAT recipe on 10 standard-library files, so that its drafts are often accepted
    and identity tests exercise acceptance, EOS and limits inside accepted drafts."""
    from sdsat_lsp.training.micro import train_micro

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
    from sdsat_lsp.training.tinymodel import ADAPTIVE_TOKEN

    model, tokenizer, _ = micro_bundle
    return model, tokenizer, tokenizer.convert_tokens_to_ids(ADAPTIVE_TOKEN)


@pytest.fixture(scope="session")
def sdsat_micro_dir(sdsat_micro, tmp_path_factory):
    """The micro model saved as a model folder (safetensors, tokenizer, sdsat.json)."""
    from sdsat_lsp.training.tinymodel import save_tiny

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
    from sdsat_lsp.training.tinymodel import ADAPTIVE_TOKEN, build_tiny_model, train_tokenizer

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
    from sdsat_lsp.training.tinymodel import save_tiny

    model, tokenizer, _ = tiny_lm
    return save_tiny(model, tokenizer, tmp_path_factory.mktemp("tiny"), k=4)


# ---- the server tests' shared server and reference (tests/lsp_client.py) -------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def main_server(tiny_model_dir):
    """One server per test module on the tiny random model, started with BASE_OPTIONS."""
    from lsp_client import BASE_OPTIONS, Session, capabilities

    session = await Session.start({"model": str(tiny_model_dir), **BASE_OPTIONS}, capabilities())
    yield session
    await session.stop()


@pytest.fixture(scope="module")
def reference(tiny_lm, tiny_model_dir):
    """What the server should answer: the completion core (the server's own pipeline) decoding with
    plain greedy decoding (AR, not SDSAT) by the in-process copy of the same model; returns (the
    prompt the model was given, the completion, the generation)."""
    import dataclasses
    from types import SimpleNamespace

    import torch

    from lsp_client import BASE_OPTIONS, MAX_TOKENS
    from sdsat_lsp.completion import complete as complete_at
    from sdsat_lsp.modelcard import read_model_card
    from sdsat_lsp.settings import Settings, parse_settings

    model, tokenizer, _ = tiny_lm
    loaded = SimpleNamespace(model=model, tokenizer=tokenizer, card=read_model_card(tiny_model_dir))
    base, problems = parse_settings(BASE_OPTIONS, Settings())
    assert not problems

    def complete(text: str, offset: int, max_tokens: int = MAX_TOKENS, line_mode: str = "auto"):
        settings = dataclasses.replace(base, max_tokens=max_tokens, line_mode=line_mode)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = complete_at(loaded, settings, text, offset, mode="ar")
        finally:
            torch.set_num_threads(threads)
        return result.model_prompt, result.completion, result.generation

    return complete
