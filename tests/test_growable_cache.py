"""GrowableCache behaves exactly like transformers' DynamicCache (same keys/values after any mix of
appends and crops, same logits), while writing in place instead of copying the cache every pass."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

from sdsat_lsp.engine import generate
from sdsat_lsp.passes import forward
from sdsat_lsp.growable_cache import GrowableCache, GrowableLayer


def test_appends_and_crops_match_dynamic_cache(tiny_lm):
    model, _, _ = tiny_lm
    rng = random.Random(3)
    grow, dyn = GrowableCache(config=model.config), DynamicCache(config=model.config)
    assert all(isinstance(layer, GrowableLayer) for layer in grow.layers)
    length = 0
    for step in range(40):
        n = rng.choice([1, 1, 2, 7, 40, 300])  # 300 forces the buffer to grow past its first size
        ids = [rng.randrange(10, 500) for _ in range(n)]
        positions = range(length, length + n)
        out_grow = forward(model, grow, ids, positions)
        out_dyn = forward(model, dyn, ids, positions)
        torch.testing.assert_close(out_grow, out_dyn, rtol=0, atol=1e-5)
        length += n
        if rng.random() < 0.6 and length:
            cut = rng.randrange(0, min(length, 50) + 1)
            grow.crop(-cut)
            dyn.crop(-cut)
            length -= cut
        assert grow.get_seq_length() == dyn.get_seq_length() == length
        for g, d in zip(grow.layers, dyn.layers):
            for a, b in ((g.keys, d.keys), (g.values, d.values)):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert max(layer.capacity for layer in grow.layers) >= length


def test_crop_rejects_positive_counts_like_dynamic_cache(tiny_lm):
    model, _, _ = tiny_lm
    cache = GrowableCache(config=model.config)
    forward(model, cache, [5, 6, 7], range(3))
    with pytest.raises(ValueError):
        cache.crop(2)
    cache.crop(-2)
    assert cache.get_seq_length() == 1


@pytest.mark.parametrize("mode", ["ar", "two-pass", "fused"])
def test_engine_output_identical_with_either_cache(tiny_lm, mode):
    model, tokenizer, adaptive_id = tiny_lm
    prompt = tokenizer("def read_config(path):\n    with open(path) as handle:\n", add_special_tokens=False)["input_ids"]
    kwargs = dict(mode=mode, k=4, adaptive_ids=[adaptive_id], max_new_tokens=40)
    grown = generate(model, prompt, cache=GrowableCache(config=model.config), **kwargs)
    plain = generate(model, prompt, cache=DynamicCache(config=model.config), **kwargs)
    assert grown.tokens == plain.tokens
    assert grown.stats.forward_passes == plain.stats.forward_passes
