"""Small Llama-family models the project builds itself (no hub): for tests, and as the seed of the
embedded default model.

A byte-level BPE tokenizer is trained on real code (the standard library) with the `tokenizers`
library, then wrapped as a transformers fast tokenizer; the model is a randomly initialised
`LlamaForCausalLM` (grouped-query attention by default, so that path is always exercised).
"""

from __future__ import annotations

from pathlib import Path

from ..corpus import python_files, read_text

SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
}
# One reserved id stands for every adaptive slot (as CodeLlama's 32011 does); FIM ids are for infilling.
ADAPTIVE_TOKEN = "<|sdsat_adapt|>"
FIM_TOKENS = {"prefix": "<fim_prefix>", "middle": "<fim_middle>", "suffix": "<fim_suffix>"}


def slot_token_names(count: int) -> list[str]:
    """Distinct adaptive tokens, one per draft slot: slot j can then learn "j tokens ahead" in its
    own embedding instead of reading it from its position alone."""
    return [f"<|sdsat_slot_{j}|>" for j in range(1, count + 1)]


def train_tokenizer(vocab_size: int = 1024, max_files: int = 200, source=None, seed_files: int = 0,
                    texts: list[str] | None = None, slot_tokens: int = 0):
    """A byte-level BPE tokenizer trained on `texts`, or on up to `max_files` standard-library
    files. The special tokens come first, in a fixed order (ids 0..): BOS, EOS, PAD, UNK, the shared
    adaptive token, the FIM tokens, then `slot_tokens` per-slot adaptive tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        files = python_files(source)
        step = max(1, len(files) // max_files)
        texts = [t for t in (read_text(f) for f in files[seed_files::step][:max_files]) if t]
    tok = Tokenizer(models.BPE())
    # Byte-level: any text round-trips, including emoji and invalid-looking input an editor sends.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS.values()) + [ADAPTIVE_TOKEN] + list(FIM_TOKENS.values()) + slot_token_names(slot_tokens)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1 if vocab_size > 1 else None,
        eos_token_id=1,
        pad_token_id=2,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_tiny_model(tokenizer, seed: int = 0, init_std: float = 0.02, **config_overrides):
    """A random `LlamaForCausalLM` sized for `tokenizer`, float32, eval mode."""
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.eval()


def save_tiny(model, tokenizer, folder: str | Path, k: int = 5, fim: bool = True) -> Path:
    """Save weights (safetensors), tokenizer and the SDSAT model card beside them. `fim=False` for a
    model that was not trained to infill, so a server never builds FIM prompts for it."""
    from ..modelcard import ModelCard, write_model_card

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    card = ModelCard(
        adaptive_ids=[tokenizer.convert_tokens_to_ids(ADAPTIVE_TOKEN)],
        k=k,
        fim={name: tokenizer.convert_tokens_to_ids(tok) for name, tok in FIM_TOKENS.items()} if fim else {},
        context_length=model.config.max_position_embeddings,
    )
    write_model_card(folder, card)
    return folder
