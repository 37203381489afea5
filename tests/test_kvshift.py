"""Reusing the KV after an edit by shifting positions (kvshift.py): re-rotated keys equal keys
computed at the new positions, an edit above the cursor re-feeds only the edited span and what
follows the last kept chunk, the engine stays greedy-identical on a shifted cache, and unsupported
rope types are refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdsat_lsp.engine import generate
from sdsat_lsp.growable_cache import GrowableCache
from sdsat_lsp.kvcache import KVCacheStore, common_prefix_len
from sdsat_lsp.kvshift import CacheShift, Chunk, cache_shift, plan, rope_shift
from sdsat_lsp.passes import forward

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

TEXT = '''import os
import sys


def read_config(path, strict=False):
    """Read a configuration file and return its sections."""
    with open(path) as handle:
        lines = handle.read().splitlines()
    sections = {}
    current = None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif "=" in line and current is not None:
            key, value = line.split("=", 1)
            current[key.strip()] = value.strip()
        elif strict:
            raise ValueError(f"line {number}: {line!r}")
    return sec'''


def _model(family="llama", **extra):
    import transformers

    config_cls, model_cls = {"mistral": ("MistralConfig", "MistralForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                             "llama": ("LlamaConfig", "LlamaForCausalLM")}[family]
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **extra)).eval()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the rotation is exact for a pure shift ----------------------------------------------------------


@pytest.mark.parametrize("family, extra", [
    ("llama", {}), ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
    ("llama", {"rope_parameters": LLAMA3}), ("mistral", {"sliding_window": None}), ("qwen2", {}),
])
@pytest.mark.parametrize("old, new", [(0, 37), (150, 90)])
def test_rotated_keys_equal_keys_computed_at_the_new_positions(family, extra, old, new):
    """The same ids prefilled at old.. and rotated to new.. give the keys (every layer), values and
    next logits of a fresh prefill at new.. . Tolerance, float32: 1e-5 for the first layer's keys
    (a rotation of the same numbers), 1e-4 for everything else (a forward at other positions rounds
    its angles differently, which moves every later layer by about 2e-5 at these positions)."""
    model = _model(family, **extra)
    rope, reason = rope_shift(model)
    assert rope is not None, reason
    ids = list(range(10, 90))
    shifted, fresh = GrowableCache(config=model.config), GrowableCache(config=model.config)
    forward(model, shifted, ids, range(old, old + len(ids)))
    forward(model, fresh, ids, range(new, new + len(ids)))
    with torch.inference_mode():
        for i, (a, b) in enumerate(zip(shifted.layers, fresh.layers)):
            rotated = rope.rotate(a.keys, old, new)
            assert not torch.allclose(a.keys, b.keys, atol=1e-2)  # the shift is not a no-op
            assert torch.allclose(rotated, b.keys, atol=1e-5 if i == 0 else 1e-4), (rotated - b.keys).abs().max()
            assert torch.allclose(a.values, b.values, atol=1e-4)
            a.keys[...] = rotated  # a view of the buffer: the cache now holds the shifted keys
    after = new + len(ids)
    assert torch.allclose(forward(model, shifted, [7, 8], [after, after + 1]), forward(model, fresh, [7, 8], [after, after + 1]),
                          atol=1e-4)


def test_a_bfloat16_model_shifts_within_its_rounding():
    """A model cast to bfloat16 holds its rotary frequencies in bfloat16 (not refused for that), and
    the first layer's rotated keys are within 2 bfloat16 steps of keys computed at the new positions
    (they are rounded once more than the fresh ones)."""
    model = _model("llama").to(torch.bfloat16)
    rope, reason = rope_shift(model)
    assert rope is not None, reason
    ids = list(range(10, 90))
    shifted, fresh = GrowableCache(config=model.config), GrowableCache(config=model.config)
    forward(model, shifted, ids, range(len(ids)))
    forward(model, fresh, ids, range(37, 37 + len(ids)))
    with torch.inference_mode():
        rotated = rope.rotate(shifted.layers[0].keys, 0, 37)
        expected = fresh.layers[0].keys.float()
    assert rotated.dtype == torch.bfloat16
    step = torch.finfo(torch.bfloat16).eps * expected.abs().max().item()
    assert (rotated.float() - expected).abs().max().item() <= 2 * step
    assert (shifted.layers[0].keys.float() - expected).abs().max().item() > 20 * step  # not a no-op


@pytest.mark.parametrize("extra, why", [
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}, "rope type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                          "original_max_position_embeddings": 128}}, "rope type 'yarn'"),
])
def test_unsupported_rope_types_are_refused(extra, why):
    model = _model("llama", **extra)
    rope, reason = rope_shift(model)
    assert rope is None and why in reason
    assert cache_shift(model, 16) is None


def test_a_model_whose_rotary_buffer_differs_from_its_config_is_refused():
    model = _model("llama")
    model.model.rotary_emb.inv_freq.mul_(1.5)
    rope, reason = rope_shift(model)
    assert rope is None and "not what its config says" in reason


def test_off_is_off():
    assert cache_shift(_model("llama"), 0) is None and cache_shift(_model("llama"), 8) is not None


# ---- which chunks are kept -------------------------------------------------------------------------


def test_plan_keeps_the_text_after_a_replaced_span():
    a, y, x, b = list(range(100, 120)), [1, 2, 3], [4, 5, 6, 7, 8], list(range(200, 240))
    cached, prompt = a + y + b + [9, 9, 9], a + x + b
    assert plan(cached, prompt, len(a), 16) == [Chunk(len(a) + 3, len(a) + 5, len(b) - 1)]
    assert plan(cached, prompt, len(a), 40) == []  # B minus the last prompt token is 39 tokens
    assert plan(cached, prompt, len(a), 0) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=60), st.lists(st.integers(0, 5), max_size=30),
       st.lists(st.integers(0, 5), max_size=30), st.lists(st.integers(0, 5), max_size=80),
       st.lists(st.integers(0, 5), max_size=10), st.integers(1, 20))
def test_plan_chunks_are_in_order_and_match(a, y, x, b, generated, min_tokens):
    """On any edit of any (repetitive) ids: chunks lie after the common prefix, in order in both,
    before the prompt's last token, at least `min_tokens` long, and match exactly."""
    cached, prompt = a + y + b + generated, a + x + b
    keep = common_prefix_len(cached, prompt)
    chunks = plan(cached, prompt, keep, min_tokens)
    old_end, new_end = keep, keep
    for c in chunks:
        assert c.length >= min_tokens and c.old >= old_end and c.new >= new_end
        assert c.new + c.length <= len(prompt) - 1
        assert cached[c.old:c.old + c.length] == prompt[c.new:c.new + c.length]
        old_end, new_end = c.old + c.length, c.new + c.length


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=20, max_size=60, unique=True), st.integers(0, 19),
       st.integers(0, 5), st.integers(0, 5), st.integers(2, 12))
def test_plan_finds_all_of_the_unchanged_tail(ids, where, removed, inserted, min_tokens):
    """Distinct ids (no spurious matches): after one edit, the whole unchanged tail but the last
    token is one chunk as soon as it is long enough."""
    prompt = ids[:where] + [-1 - i for i in range(inserted)] + ids[where + removed:]
    tail = len(ids) - where - removed
    keep = common_prefix_len(ids, prompt)
    chunks = plan(ids, prompt, keep, min_tokens)
    if inserted == removed == 0:
        assert chunks == []  # nothing changed: the prefix holds it all
    elif tail - 1 >= min_tokens:
        assert chunks == [Chunk(where + removed, len(prompt) - tail, tail - 1)]
    else:
        assert chunks == []


# ---- an edit above the cursor, at the store --------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tiny_lm):
    model, tokenizer, adaptive_id = tiny_lm
    return model, tokenizer, adaptive_id, (lambda: GrowableCache(config=model.config))


def _fed_counter(model):
    """Counts the tokens every forward pass feeds the decoder (the eager path: no compiled forward here)."""
    fed: list[int] = []
    handle = model.model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                                   with_kwargs=True)
    return fed, handle


def _edited(tokenizer):
    """(ids before, ids after): a parameter renamed on line 5, far above the end (the cursor)."""
    old = tokenizer(TEXT)["input_ids"]
    new = tokenizer(TEXT.replace("strict=False", "pedantic_mode=False"))["input_ids"]
    return old, new


def _prime(store, lm, ids):
    model, _, adaptive_id, _ = lm
    lease = store.acquire("doc", ids)
    gen = generate(model, ids, mode="ar", max_new_tokens=6, eos_ids=[], cache=lease.cache)
    store.release(lease, gen.cache_ids)


def _common_suffix(a, b, limit):
    n = 0
    while n < limit and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


@pytest.mark.parametrize("shift_on", [True, False])
def test_an_edit_above_the_cursor_refeeds_only_the_edited_span(lm, shift_on):
    """With shifting: tokens fed = the edited span + the prompt's last token (the tail after the
    edit is one kept chunk); without: everything from the edit on."""
    model, tokenizer, _, make = lm
    old, new = _edited(tokenizer)
    store = KVCacheStore(make)
    _prime(store, lm, old)
    keep = common_prefix_len(store.cached_ids("doc"), new)
    tail = _common_suffix(old, new, min(len(old), len(new)) - keep)
    assert keep > 20 and tail > 150  # the edit is far above the end
    fed, handle = _fed_counter(model)
    try:
        shift = CacheShift(model, rope_shift(model)[0], 16) if shift_on else None
        lease = store.acquire("doc", new, shift=shift)
        gen = generate(model, new, mode="ar", max_new_tokens=1, eos_ids=[], cache=lease.cache)
    finally:
        handle.remove()
    if shift_on:
        span = len(new) - tail - keep
        assert lease.shifted == tail - 1 and lease.fed == span and lease.reused == len(new) - 1
        assert sum(fed) == span + 1 and len(fed) == 2  # one pass for the span, the engine's for the last token
    else:
        assert lease.shifted == lease.fed == 0 and lease.reused == keep
        assert sum(fed) == len(new) - keep and len(fed) == 1
    assert gen.stats.reused_tokens == lease.reused


def test_a_shifted_cache_is_exact_in_the_first_layer_and_approximate_after(lm):
    """What is kept: the first layer's KV of a token depends on nothing but the token and its
    position (exact after the shift); later layers' KV was computed before the edit (approximate)."""
    model, tokenizer, _, make = lm
    old, new = _edited(tokenizer)
    store = KVCacheStore(make)
    _prime(store, lm, old)
    lease = store.acquire("doc", new, shift=CacheShift(model, rope_shift(model)[0], 16))
    fresh = make()
    forward(model, fresh, new[:lease.reused], range(lease.reused))
    a, b = lease.cache.layers, fresh.layers
    assert torch.allclose(a[0].keys, b[0].keys, atol=1e-5) and torch.allclose(a[0].values, b[0].values, atol=1e-5)
    chunk = slice(lease.reused - lease.shifted, lease.reused)
    assert not torch.allclose(a[1].keys[..., chunk, :], b[1].keys[..., chunk, :], atol=1e-3)
    before = slice(0, lease.reused - lease.shifted)  # the common prefix and the span fed here: fresh
    assert torch.allclose(a[1].keys[..., before, :], b[1].keys[..., before, :], atol=1e-4)


@pytest.mark.parametrize("mode", ["fused", "two-pass"])
def test_decoding_from_a_shifted_cache_is_greedy_identical(lm, mode):
    """The engine's guarantee holds for the cache it is given: SDSAT decoding from a shifted cache
    equals plain greedy decoding from the same shifted cache."""
    model, tokenizer, adaptive_id, make = lm
    old, new = _edited(tokenizer)
    outputs = {}
    for run in (mode, "ar"):
        store = KVCacheStore(make)
        _prime(store, lm, old)
        lease = store.acquire("doc", new, shift=CacheShift(model, rope_shift(model)[0], 16))
        assert lease.shifted > 100
        outputs[run] = generate(model, new, mode=run, k=4, adaptive_ids=[adaptive_id], max_new_tokens=24, eos_ids=[],
                                cache=lease.cache).tokens
    assert outputs[mode] == outputs["ar"] and len(outputs["ar"]) == 24


def test_a_shift_that_fails_forgets_the_cache(lm):
    """A shift that raises leaves the cache in an unknown state: the store forgets it, and the
    next request starts from nothing."""
    _, tokenizer, _, make = lm
    old, new = _edited(tokenizer)
    store = KVCacheStore(make)
    _prime(store, lm, old)

    def broken(cache, cached_ids, prompt_ids, keep):
        cache.crop(-3)
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        store.acquire("doc", new, shift=broken)
    assert store.cached_ids("doc") == [] and store.total_bytes == 0
    assert store.acquire("doc", new).reused == 0
