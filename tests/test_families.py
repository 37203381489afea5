"""Any Llama-family model in transformers: the engine only relies on positions, 4-D masks and
DynamicCache.crop, so Mistral and Qwen2 (biases in attention) decode identically too."""

from __future__ import annotations

import pytest
import torch

from sdsat_lsp.engine import generate
from sdsat_lsp.errors import SdsatError

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3)


def _model(family, **extra):
    import transformers

    config_cls, model_cls = {"mistral": ("MistralConfig", "MistralForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                             "llama": ("LlamaConfig", "LlamaForCausalLM")}[family]
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **extra)).eval()


@pytest.mark.parametrize("family, extra", [("mistral", {"sliding_window": None}), ("qwen2", {}),
                                           ("mistral", {"sliding_window": 256})])
def test_other_families_decode_identically(family, extra):
    model = _model(family, **extra)
    prompt = list(range(10, 60))
    expected = generate(model, prompt, mode="ar", max_new_tokens=30, eos_ids=[]).tokens
    for mode in ("two-pass", "fused"):
        for k in (1, 4):
            assert generate(model, prompt, mode=mode, k=k, adaptive_ids=[299], max_new_tokens=30, eos_ids=[]).tokens == expected


def test_sliding_window_beyond_the_window_is_a_clear_error():
    model = _model("mistral", sliding_window=32)
    with pytest.raises(SdsatError, match="sliding-window"):
        generate(model, list(range(10, 40)), mode="fused", k=4, adaptive_ids=[299], max_new_tokens=30, eos_ids=[])
