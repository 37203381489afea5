"""The micro SDSAT model the tests and the demo use: tinymodel builds it, train trains it. Its own
module, so that neither of those two imports the other's caller (train uses tinymodel's builder)."""

from __future__ import annotations

from ..corpus import python_files, token_stream
from .tinymodel import ADAPTIVE_TOKEN, build_tiny_model, train_tokenizer
from .train import train_steps


MICRO_FILES_STRIDE, MICRO_FILES = 40, 10  # every 40th standard-library file, the first 10 of them


def train_micro(seed: int = 0, steps: int = 300, files: int = MICRO_FILES):
    """A micro SDSAT model in ~15 s on 2 cores: a 512-token BPE, a 2-layer GQA Llama trained with
    the SDSAT recipe on `files` standard-library files. Small enough to learn its corpus well, so its
    drafts are often accepted; it is a test and demo model, not a useful code model.
    Returns (model, tokenizer, token stream)."""
    tokenizer = train_tokenizer(vocab_size=512, max_files=60)
    stream = token_stream(tokenizer, python_files()[::MICRO_FILES_STRIDE][:files])
    model = build_tiny_model(tokenizer, seed=seed)
    adaptive_id = tokenizer.convert_tokens_to_ids(ADAPTIVE_TOKEN)
    train_steps(model, stream, [adaptive_id], steps=steps, seq_len=128, batch_size=8, max_block=5, blocks_per_row=8,
                lr=5e-3, seed=seed)
    return model, tokenizer, stream
