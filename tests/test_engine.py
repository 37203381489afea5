"""SDSAT decoding must be token-for-token identical to plain greedy decoding, in every scheme, for
every k, and wherever generation stops (EOS, length, stop string) relative to an accepted draft."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import DynamicCache

from sdsat_lsp.drafting import NgramIndex
from sdsat_lsp.engine import generate
from sdsat_lsp.errors import SdsatError
from sdsat_lsp.kvcache import common_prefix_len

SDSAT_MODES = ("two-pass", "fused")


def ar(model, prompt, **kw):
    return generate(model, prompt, mode="ar", **kw)


def accepted_draft_indices(stats) -> list[int]:
    """Output indices of tokens that were accepted drafts (emitted without a pass of their own)."""
    indices, position = [], 1  # output[0] comes from the prefill
    for accepted in stats.accepted_per_pass:
        n = max(accepted, 0)
        indices += range(position, position + n)
        position += n + 1
    return indices


# How drafts are sized and sourced: the output must not depend on it.
DRAFT_POLICIES = {
    "adaptive": {"draft_length": "adaptive"},
    "fixed": {"draft_length": "fixed"},
    "lookup": {"lookup_ngram": 2},
}


@pytest.mark.parametrize("policy", DRAFT_POLICIES)
@pytest.mark.parametrize("mode", SDSAT_MODES)
def test_identical_to_greedy_for_every_k(sdsat_micro, code_prompts, mode, policy):
    model, _, adaptive = sdsat_micro
    total_accepted = 0
    for prompt in code_prompts[:3]:
        expected = ar(model, prompt, max_new_tokens=48, eos_ids=[]).tokens
        for k in range(1, 14):
            got = generate(model, prompt, mode=mode, k=k, adaptive_ids=[adaptive], max_new_tokens=48, eos_ids=[],
                           **DRAFT_POLICIES[policy])
            assert got.tokens == expected, (mode, k)
            assert got.finish_reason == "length"
            total_accepted += got.stats.drafts_accepted
    # The identity must have been tested on accepted drafts, not only on rejections.
    assert total_accepted > 100


def test_distinct_adaptive_ids_list(sdsat_micro, code_prompts):
    """A list of k ids (the reference's older default) works as well as one id repeated."""
    model, _, adaptive = sdsat_micro
    prompt = code_prompts[0]
    expected = ar(model, prompt, max_new_tokens=32, eos_ids=[]).tokens
    ids = [adaptive, 5, 6, 7, 8]
    for mode in SDSAT_MODES:
        assert generate(model, prompt, mode=mode, k=5, adaptive_ids=ids, max_new_tokens=32, eos_ids=[]).tokens == expected


def test_prompt_ending_mid_token(sdsat_micro):
    model, tokenizer, adaptive = sdsat_micro
    text = "import os\n\n\ndef read_config(path):\n    with open(path) as handle:\n        return handle.rea"
    prompt = tokenizer(text)["input_ids"]
    expected = ar(model, prompt, max_new_tokens=40, eos_ids=[]).tokens
    for mode in SDSAT_MODES:
        for k in (1, 4, 7):
            got = generate(model, prompt, mode=mode, k=k, adaptive_ids=[adaptive], max_new_tokens=40, eos_ids=[])
            assert got.tokens == expected


def _find_inner_draft(model, prompts, adaptive, mode, k=5, usable=lambda tokens, i: True):
    """A (prompt, sdsat tokens, index) where output[index] was an accepted draft (so the same pass
    emitted more tokens after it, which a stop there must discard) and `usable` holds."""
    for prompt in prompts:
        got = generate(model, prompt, mode=mode, k=k, adaptive_ids=[adaptive], max_new_tokens=64, eos_ids=[])
        for i in accepted_draft_indices(got.stats):
            if i < len(got.tokens) and usable(got.tokens, i):
                return prompt, got.tokens, i
    pytest.fail("no usable accepted draft found; train the micro model longer")


@pytest.mark.parametrize("mode", SDSAT_MODES)
def test_eos_inside_accepted_draft(sdsat_micro, code_prompts, mode):
    model, _, adaptive = sdsat_micro
    # Use as EOS a token whose first appearance is the middle of an accepted draft run.
    prompt, tokens, i = _find_inner_draft(model, code_prompts, adaptive, mode, usable=lambda t, i: t[i] not in t[:i])
    eos = [tokens[i]]
    expected = ar(model, prompt, max_new_tokens=64, eos_ids=eos)
    got = generate(model, prompt, mode=mode, k=5, adaptive_ids=[adaptive], max_new_tokens=64, eos_ids=eos)
    assert expected.tokens == tokens[:i] and expected.finish_reason == "eos"
    assert got.tokens == expected.tokens and got.finish_reason == "eos"
    assert len(got.cache_ids) <= len(prompt) + len(got.tokens)


@pytest.mark.parametrize("mode", SDSAT_MODES)
def test_max_new_tokens_inside_accepted_draft(sdsat_micro, code_prompts, mode):
    model, _, adaptive = sdsat_micro
    prompt, tokens, i = _find_inner_draft(model, code_prompts, adaptive, mode)
    # The limit falls on output[i], an accepted draft: what the pass emitted after it is dropped.
    expected = ar(model, prompt, max_new_tokens=i + 1, eos_ids=[])
    got = generate(model, prompt, mode=mode, k=5, adaptive_ids=[adaptive], max_new_tokens=i + 1, eos_ids=[])
    assert expected.tokens == tokens[: i + 1]
    assert got.tokens == expected.tokens and got.finish_reason == "length"


@pytest.mark.parametrize("mode", SDSAT_MODES)
def test_stop_string_inside_accepted_draft(sdsat_micro, code_prompts, mode):
    model, tokenizer, adaptive = sdsat_micro

    def decode(ids):
        return tokenizer.decode(ids)

    def first_completes_here(tokens, i):
        piece = decode([tokens[i]]).strip()
        return len(piece) >= 1 and piece not in decode(tokens[:i]) and piece in decode(tokens[: i + 1])

    prompt, tokens, i = _find_inner_draft(model, code_prompts, adaptive, mode, usable=first_completes_here)
    stop = [decode([tokens[i]]).strip()]
    expected = ar(model, prompt, max_new_tokens=64, eos_ids=[], stop_strings=stop, decode=decode)
    got = generate(model, prompt, mode=mode, k=5, adaptive_ids=[adaptive], max_new_tokens=64, eos_ids=[],
                   stop_strings=stop, decode=decode)
    assert expected.finish_reason == "stop" and expected.tokens == tokens[: i + 1]
    assert got.tokens == expected.tokens and got.finish_reason == "stop"


def test_adaptive_draft_length_feeds_less_when_drafts_fail(tiny_lm):
    """An untrained model's drafts are always wrong: the adaptive schedule falls to one draft per
    pass (a fused pass of 4 tokens) where the fixed one keeps feeding (k+1) + (k+1)k tokens."""
    model, tokenizer, adaptive = tiny_lm
    prompt = tokenizer("def read_config(path):\n    with open(path) as handle:\n", add_special_tokens=False)["input_ids"]
    runs = {policy: generate(model, prompt, mode="fused", k=5, adaptive_ids=[adaptive], max_new_tokens=40,
                             draft_length=policy) for policy in ("adaptive", "fixed")}
    assert runs["adaptive"].tokens == runs["fixed"].tokens
    fed = {p: (g.stats.tokens_fed - g.stats.prefill_tokens) / g.stats.forward_passes for p, g in runs.items()}
    assert runs["fixed"].stats.drafts_accepted == 0
    assert fed["fixed"] > 30 and fed["adaptive"] < 6, fed


def test_ngram_index_follows_latest_earlier_occurrence():
    index = NgramIndex(2, [1, 2, 3, 9, 1, 2, 4, 5, 1])
    assert index.follow(2, 2) == [4, 5]  # "1 2" last ended at index 6, then came 4 5
    assert index.follow(7, 3) == []  # "1 7" never occurred
    index.extend([2, 4])
    # "4 5" ended at index 8; past the end the copy continues from itself (the period-3 loop 5 1 2 4)
    assert index.follow(5, 7) == [1, 2, 4, 5, 1, 2, 4]
    loop = NgramIndex(3, [8, 8, 8])
    assert loop.follow(8, 4) == [8, 8, 8, 8]


def test_lookup_drafts_come_from_repeated_context(sdsat_micro):
    """A prompt that repeats itself: a model trained on code continues the pattern, so drafts
    copied from the context get accepted; the output is still plain greedy."""
    model, tokenizer, adaptive = sdsat_micro
    line = "    total = total + compute(values[index], weights[index])\n"
    prompt = tokenizer("def f(values, weights):\n" + line * 6, add_special_tokens=False)["input_ids"]
    expected = ar(model, prompt, max_new_tokens=60).tokens
    for mode in SDSAT_MODES:
        got = generate(model, prompt, mode=mode, k=5, adaptive_ids=[adaptive], max_new_tokens=60, lookup_ngram=3)
        assert got.tokens == expected
        assert got.stats.lookup_passes > 0 and got.stats.lookup_accepted > 0, got.stats


def test_fused_saves_passes(sdsat_micro, code_prompts):
    """The fused step yields 1 + accepted tokens per pass; two-pass at most (k + 2) / 2."""
    model, _, adaptive = sdsat_micro
    passes = {}
    for mode in ("ar",) + SDSAT_MODES:
        passes[mode] = sum(
            generate(model, p, mode=mode, k=5, adaptive_ids=[adaptive], max_new_tokens=48, eos_ids=[]).stats.forward_passes
            for p in code_prompts
        )
    assert passes["fused"] < passes["two-pass"] < passes["ar"]


def test_cache_reuse_gives_same_output_and_keeps_continuation(sdsat_micro, code_prompts):
    model, _, adaptive = sdsat_micro
    prompt = code_prompts[1]
    fresh = generate(model, prompt, k=5, adaptive_ids=[adaptive], max_new_tokens=30, eos_ids=[])
    cache = DynamicCache(config=model.config)
    half = generate(model, prompt[: len(prompt) // 2], mode="ar", max_new_tokens=1, eos_ids=[], cache=cache)
    assert cache.get_seq_length() == len(half.cache_ids)
    # The cache holds a prefix of `prompt` (plus one generated token, which may differ: crop it).
    common = common_prefix_len(half.cache_ids, prompt)
    cache.crop(common - cache.get_seq_length())
    reused = generate(model, prompt, k=5, adaptive_ids=[adaptive], max_new_tokens=30, eos_ids=[], cache=cache)
    assert reused.tokens == fresh.tokens
    assert reused.stats.reused_tokens == common and reused.stats.prefill_tokens == len(prompt) - common
    # The cache now holds prompt + continuation; accepting the suggestion is a cache hit.
    assert reused.cache_ids == (prompt + reused.tokens)[: cache.get_seq_length()]
    assert cache.get_seq_length() >= len(prompt) + len(reused.tokens) - 1
    again = generate(model, prompt + reused.tokens, mode="ar", max_new_tokens=5, eos_ids=[], cache=cache)
    assert again.stats.prefill_tokens <= 2
    assert again.tokens == ar(model, prompt + reused.tokens, max_new_tokens=5, eos_ids=[]).tokens


def test_cached_logits_match_uncached(sdsat_micro, code_prompts):
    """What the engine leaves in the cache is the KV of exactly `cache_ids`."""
    model, _, adaptive = sdsat_micro
    cache = DynamicCache(config=model.config)
    out = generate(model, code_prompts[2], k=4, adaptive_ids=[adaptive], max_new_tokens=20, eos_ids=[], cache=cache)
    probe = [out.tokens[-1]]
    with torch.inference_mode():
        cached = model(input_ids=torch.tensor([probe]), cache=cache, use_cache=True).logits[0, -1]
        full = model(input_ids=torch.tensor([out.cache_ids + probe])).logits[0, -1]
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)


def test_cancellation_between_passes(sdsat_micro, code_prompts):
    model, _, adaptive = sdsat_micro
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    out = generate(model, code_prompts[0], k=5, adaptive_ids=[adaptive], max_new_tokens=64, eos_ids=[], cancel=cancel)
    assert out.finish_reason == "cancelled"
    assert out.stats.forward_passes == 3
    full = generate(model, code_prompts[0], k=5, adaptive_ids=[adaptive], max_new_tokens=64, eos_ids=[])
    assert out.tokens == full.tokens[: len(out.tokens)]


def test_deadline_stops_at_newline(sdsat_micro, code_prompts):
    model, tokenizer, adaptive = sdsat_micro
    out = generate(model, code_prompts[0], k=5, adaptive_ids=[adaptive], max_new_tokens=64, eos_ids=[],
                   decode=tokenizer.decode, deadline=0.0)
    text = tokenizer.decode(out.tokens)
    if out.finish_reason == "budget":
        assert "\n" in tokenizer.decode(out.tokens[-1:]) and text.count("\n") == tokenizer.decode(out.tokens[-1:]).count("\n")
    else:  # the whole output holds no newline
        assert out.finish_reason == "length" and "\n" not in text


def test_hard_deadline_ends_after_the_pass_whatever_the_text(sdsat_micro, code_prompts):
    """The budget (`deadline`) waits for a newline; `hard_deadline` does not: past it, generation
    ends with the pass that crossed it (here the prefill), its tokens those of plain decoding."""
    model, tokenizer, adaptive = sdsat_micro
    out = generate(model, code_prompts[0], k=5, adaptive_ids=[adaptive], max_new_tokens=64, eos_ids=[],
                   decode=tokenizer.decode, hard_deadline=time.perf_counter() - 1)
    assert out.finish_reason == "deadline"
    assert out.stats.forward_passes == 1
    full = generate(model, code_prompts[0], k=5, adaptive_ids=[adaptive], max_new_tokens=64, eos_ids=[])
    assert out.tokens == full.tokens[: len(out.tokens)]


@pytest.mark.parametrize("draft_length", ["fixed", "adaptive"])
def test_a_pass_never_feeds_more_than_the_cap(sdsat_micro, code_prompts, draft_length, monkeypatch):
    """k = 64 with fixed drafts prepared a block for every acceptance length: 4,225 tokens a pass.
    Passes now carry at most MAX_FED_PER_PASS tokens, and the output is still plain greedy's."""
    from sdsat_lsp.decoding import MAX_FED_PER_PASS
    from sdsat_lsp.passes import forward_states

    model, _, adaptive = sdsat_micro
    fed = []

    def spy(model_, cache, ids, *args, **kwargs):
        fed.append(len(ids))
        return forward_states(model_, cache, ids, *args, **kwargs)

    import sdsat_lsp.engine as engine_module

    monkeypatch.setattr(engine_module, "forward_states", spy)
    got = generate(model, code_prompts[1], k=64, adaptive_ids=[adaptive], max_new_tokens=40, eos_ids=[],
                   draft_length=draft_length)
    assert fed and max(fed) <= MAX_FED_PER_PASS, fed
    assert got.tokens == ar(model, code_prompts[1], max_new_tokens=40, eos_ids=[]).tokens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_identity_in_half_precision(sdsat_micro, code_prompts, dtype):
    import copy

    model, _, adaptive = sdsat_micro
    half = copy.deepcopy(model).to(dtype)
    for prompt in code_prompts[:3]:
        expected = ar(half, prompt, max_new_tokens=32, eos_ids=[]).tokens
        for mode in SDSAT_MODES:
            assert generate(half, prompt, mode=mode, k=5, adaptive_ids=[adaptive], max_new_tokens=32, eos_ids=[]).tokens == expected


def test_bad_settings_raise_clear_errors(sdsat_micro):
    model, _, adaptive = sdsat_micro
    with pytest.raises(SdsatError, match="k must be at least 1"):
        generate(model, [5, 6, 7], k=0, adaptive_ids=[adaptive])
    with pytest.raises(SdsatError, match="outside the model's vocabulary"):
        generate(model, [5, 6, 7], k=3, adaptive_ids=[10**6])
    with pytest.raises(SdsatError, match="context"):
        generate(model, [5] * (model.config.max_position_embeddings + 1), k=3, adaptive_ids=[adaptive])
    with pytest.raises(SdsatError, match="no adaptive token"):
        generate(model, [5, 6, 7], k=3, adaptive_ids=[])
    with pytest.raises(SdsatError, match="unknown decoding mode"):
        generate(model, [5, 6, 7], mode="beam", k=3, adaptive_ids=[adaptive])
