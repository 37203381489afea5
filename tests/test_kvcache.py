"""The per-document KV cache store on a tiny real model: reuse is exact (cached == uncached),
edits invalidate from the first changed token only, the memory budget holds, drop frees."""

from __future__ import annotations

import gc
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdsat_lsp.kvcache import KVCacheStore, cache_nbytes, common_prefix_len

CODE = '''import os
import sys


def read_config(path):
    """Read a configuration file and return its sections."""
    with open(path) as handle:
        lines = handle.read().splitlines()
    sections = {}
    for line in lines:
        if line.startswith("["):
'''


@pytest.fixture(scope="module")
def lm(tiny_lm):
    import torch
    from transformers import DynamicCache

    # One thread: a model this small gains nothing from two, and OpenMP threads spinning against
    # other processes on a 2-core machine made passes 50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer, adaptive_id = tiny_lm
    yield model, tokenizer, adaptive_id, (lambda: DynamicCache(config=model.config))
    torch.set_num_threads(threads)


def _generate(lm, prompt, cache=None, mode="fused", n=12):
    from sdsat_lsp.engine import generate

    model, _, adaptive_id, _ = lm
    return generate(model, prompt, mode=mode, k=4, adaptive_ids=[adaptive_id], max_new_tokens=n, eos_ids=[],
                    cache=cache)


def _run(store, lm, key, prompt, mode="fused", n=12):
    lease = store.acquire(key, prompt)
    gen = _generate(lm, prompt, lease.cache, mode, n)
    store.release(lease, gen.cache_ids)
    return lease, gen


@given(st.lists(st.integers(0, 3), max_size=600), st.lists(st.integers(0, 3), max_size=600))
def test_common_prefix_len(a, b):
    n = common_prefix_len(a, b)
    assert a[:n] == b[:n]
    assert n == min(len(a), len(b)) or a[n] != b[n]


@pytest.mark.parametrize("mode", ["ar", "fused"])
def test_cached_generation_equals_fresh_after_an_edit(lm, mode):
    _, tokenizer, _, make = lm
    store = KVCacheStore(make)
    old = tokenizer(CODE)["input_ids"]
    _run(store, lm, "doc", old, mode)
    # Edit inside the function body: the new prompt shares a prefix with the cached ids, then differs.
    edited = CODE.replace("sections = {}", "sections = dict()")
    new = tokenizer(edited)["input_ids"]
    lcp = common_prefix_len(old, new)
    assert 10 < lcp < len(new) - 5
    lease, cached = _run(store, lm, "doc", new, mode)
    assert lease.reused == lcp  # invalidated from the first changed token, and only from there
    assert cached.stats.reused_tokens == lcp and cached.stats.prefill_tokens == len(new) - lcp
    fresh = _generate(lm, new, None, mode)
    assert cached.tokens == fresh.tokens and fresh.stats.reused_tokens == 0


def test_cached_logits_match_uncached(lm):
    import torch

    from sdsat_lsp.passes import forward

    model, tokenizer, _, make = lm
    ids = tokenizer(CODE)["input_ids"]
    store = KVCacheStore(make)
    _run(store, lm, "doc", ids[:40])
    lease = store.acquire("doc", ids)
    assert lease.reused == 40
    cached = forward(model, lease.cache, ids[40:], range(40, len(ids)))
    fresh = forward(model, make(), ids, range(len(ids)))[40:]
    assert torch.allclose(cached, fresh, atol=1e-4)


def test_typing_at_the_cursor_and_accepting_reuse_everything_before(lm):
    _, tokenizer, _, make = lm
    store = KVCacheStore(make)
    prompt = tokenizer(CODE)["input_ids"]
    _, first = _run(store, lm, "doc", prompt)
    # The cache kept the generated continuation: accepting part of it is a cache hit.
    assert store.cached_ids("doc")[: len(prompt)] == prompt and len(store.cached_ids("doc")) > len(prompt)
    accepted = prompt + first.tokens[:5]
    lease, second = _run(store, lm, "doc", accepted)
    assert lease.reused == len(accepted) - 1 or lease.reused == len(accepted)
    assert second.stats.prefill_tokens == 1  # the engine always feeds the last prompt token
    # Typing a new character: only the tokens from the changed one on are prefilled.
    typed = tokenizer(CODE + "        ")["input_ids"]
    before = store.cached_ids("doc")
    lease, third = _run(store, lm, "doc", typed)
    assert lease.reused == common_prefix_len(before, typed) >= len(prompt) - 2
    assert third.stats.prefill_tokens == len(typed) - lease.reused <= 3


def test_documents_are_independent(lm):
    _, tokenizer, _, make = lm
    store = KVCacheStore(make)
    a = tokenizer(CODE)["input_ids"]
    b = tokenizer("def other():\n    pass\n")["input_ids"]
    _run(store, lm, "a", a)
    lease, _ = _run(store, lm, "b", b)
    assert lease.reused == 0
    lease, _ = _run(store, lm, "a", a)
    assert lease.reused == len(a)
    assert store.summary()["documents"] == 2


def test_lru_eviction_keeps_total_under_budget(lm):
    _, tokenizer, _, make = lm
    prompts = {name: tokenizer(CODE.replace("read_config", f"read_{name}"))["input_ids"] for name in "abcd"}
    probe = KVCacheStore(make)
    _run(probe, lm, "probe", prompts["a"])
    one = probe.total_bytes
    assert one > 0
    store = KVCacheStore(make, budget_bytes=int(2.5 * one))
    for name in "abc":
        _run(store, lm, name, prompts[name])
        assert store.total_bytes <= store.budget_bytes
    held = store.summary()["per_document"]
    assert set(held) == {"b", "c"} and store.evictions == 1  # a was least recently used
    _run(store, lm, "b", prompts["b"])  # touch b: c becomes least recently used
    _run(store, lm, "d", prompts["d"])
    assert set(store.summary()["per_document"]) == {"b", "d"}
    assert store.total_bytes <= store.budget_bytes
    # A budget smaller than one document's cache keeps nothing, and says so in bytes.
    store.set_budget(one // 2)
    assert store.total_bytes == 0


def test_drop_frees_the_cache(lm):
    _, tokenizer, _, make = lm
    store = KVCacheStore(make)
    lease, _ = _run(store, lm, "doc", tokenizer(CODE)["input_ids"])
    ref = weakref.ref(lease.cache)
    nbytes = cache_nbytes(lease.cache)
    del lease
    assert store.drop("doc") == nbytes > 0
    gc.collect()
    assert ref() is None  # nothing else holds the tensors
    assert store.total_bytes == 0 and store.cached_ids("doc") == [] and store.drop("doc") == 0


def test_drop_while_lent_discards_on_release(lm):
    _, tokenizer, _, make = lm
    store = KVCacheStore(make)
    prompt = tokenizer(CODE)["input_ids"]
    _run(store, lm, "doc", prompt)
    lease = store.acquire("doc", prompt)
    assert store.drop("doc") == 0  # in use by a generation: marked, not freed under its feet
    gen = _generate(lm, prompt, lease.cache)
    store.release(lease, gen.cache_ids)
    assert store.total_bytes == 0 and store.acquire("doc", prompt).reused == 0


def test_disabled_store_never_reuses(lm):
    _, tokenizer, _, make = lm
    store = KVCacheStore(make, enabled=False)
    prompt = tokenizer(CODE)["input_ids"]
    _run(store, lm, "doc", prompt)
    lease, gen = _run(store, lm, "doc", prompt)
    assert lease.reused == 0 and gen.stats.prefill_tokens == len(prompt) and store.total_bytes == 0


# ---- properties (hypothesis), on real DynamicCaches whose entries record their token ids ---------

SNIPPETS = ["x", "self.", "(", ")", "\n", "\n    ", "    return ", "é", "😋", "e\u0301", "# note\n", ""]


def _fill(cache, ids) -> None:
    """Append KV entries whose values are the token ids, so that a test can read back what it holds."""
    import torch

    if ids:
        t = torch.tensor(ids, dtype=torch.float32).view(1, 1, -1, 1)
        for layer in range(2):
            cache.update(t, t.clone(), layer)


def _held(cache) -> list[int]:
    from sdsat_lsp.kvcache import cache_len

    return [int(x) for x in cache.layers[0].keys.flatten().tolist()] if cache_len(cache) else []


def _decode_like_the_engine(lease, prompt: list[int], generated: list[int]) -> list[int]:
    """What engine.generate does to a lent cache: keep at most all but the last prompt token, feed
    the rest and the generated tokens, and hold the KV of everything but the newest token."""
    from sdsat_lsp.kvcache import cache_len

    reused = min(cache_len(lease.cache), len(prompt) - 1)
    if cache_len(lease.cache) > reused:
        lease.cache.crop(reused - cache_len(lease.cache))
    seq = (prompt + generated)[: len(prompt) + max(0, len(generated) - 1)]
    _fill(lease.cache, seq[reused:])
    return seq


def _check_entries(store) -> None:
    from sdsat_lsp.kvcache import cache_len

    for entry in store._entries.values():
        assert cache_len(entry.cache) == len(entry.ids) and _held(entry.cache) == entry.ids
        assert entry.nbytes == cache_nbytes(entry.cache)
    assert store.total_bytes <= store.budget_bytes


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 8), st.sampled_from(SNIPPETS)), min_size=1, max_size=12),
       st.integers(16, 160), st.lists(st.integers(8, 500), max_size=6))
def test_cached_prefix_is_a_prefix_of_the_current_prompt(lm, edits, budget, generated):
    """While a document is edited anywhere, the cache a request gets holds exactly the longest
    common prefix of what it held and the new prompt's tokens, and after the request exactly
    the prompt and its continuation."""
    from transformers import DynamicCache

    from sdsat_lsp.prompt import build_prompt

    tokenizer = lm[1]
    store = KVCacheStore(DynamicCache)
    text, keep, before = CODE, None, []
    for where, delete, insert in edits:
        cursor = int(where * len(text))
        start = max(0, cursor - delete)
        text = text[:start] + insert + text[cursor:]
        prompt = build_prompt(text, start + len(insert), tokenizer, max_tokens=budget, keep=keep)
        keep, ids = prompt.window_head, list(prompt.ids)
        lease = store.acquire("doc", ids)
        assert lease.reused == common_prefix_len(before, ids)
        assert _held(lease.cache) == ids[: lease.reused] == store.cached_ids("doc")
        before = _decode_like_the_engine(lease, ids, generated)
        store.release(lease, before)
        assert store.cached_ids("doc") == before == _held(lease.cache)
        _check_entries(store)


KEYS = "abcde"
OPS = st.lists(st.one_of(
    st.tuples(st.just("run"), st.sampled_from(KEYS), st.integers(1, 300), st.integers(0, 40)),
    st.tuples(st.just("fail"), st.sampled_from(KEYS), st.integers(1, 300), st.just(0)),
    st.tuples(st.just("drop"), st.sampled_from(KEYS), st.just(0), st.just(0)),
    st.tuples(st.just("budget"), st.just(""), st.integers(0, 20_000), st.just(0)),
), max_size=40)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_eviction_keeps_memory_under_budget(ops):
    """Any sequence of requests (some failing), closes and budget changes: the bytes held never
    exceed the budget and every entry's ids are what its cache holds. (16 bytes per token here.)"""
    from transformers import DynamicCache

    store = KVCacheStore(DynamicCache, budget_bytes=6_000)
    for op, key, n, extra in ops:
        if op == "budget":
            store.set_budget(n)
        elif op == "drop":
            store.drop(key)
        else:
            # Prompts of one key share their start, as a document's prompts do.
            prompt = [1000 * (KEYS.index(key) + 1) + i for i in range(n)]
            lease = store.acquire(key, prompt)
            if op == "fail":
                store.discard(lease)
                assert store.cached_ids(key) == []
            else:
                store.release(lease, _decode_like_the_engine(lease, prompt, list(range(7, 7 + extra))))
        _check_entries(store)
