"""The compiled forward (compiled.py): the decoder step computes what transformers' forward
computes, and greedy decoding through it, compiled or not, padded or not, equals plain greedy AR
decoding in every mode. Compilation is slow on 2 cores, so one fixture compiles once per session
(the disk cache makes later sessions faster)."""

from __future__ import annotations

import copy

import pytest
import torch

from sdsat_lsp import compiled as compiled_mod
from sdsat_lsp.compiled import CompiledForward, attach
from sdsat_lsp.drafttree import DraftTree
from sdsat_lsp.draftstore import DraftStore
from sdsat_lsp.engine import generate
from sdsat_lsp.passes import block_mask, forward, forward_states, tree_mask
from sdsat_lsp.growable_cache import GrowableCache


def eager_generate(model, prompt, **kw):
    attach(model, None)
    return generate(model, prompt, **kw)


@pytest.fixture
def detach_after(sdsat_micro, tiny_lm):
    yield
    attach(sdsat_micro[0], None)
    attach(tiny_lm[0], None)


def passes_through(model, step, prompt):
    """(eager, step) last hidden states for: a prefill, one token, a block-masked pass and a tree."""
    results = []
    for impl in (None, step):
        attach(model, impl)
        cache = GrowableCache(config=model.config)
        out = [forward_states(model, cache, prompt, range(len(prompt)))[0]]
        base = len(prompt)
        out.append(forward_states(model, cache, [5], [base])[0])
        base += 1
        blocks = block_mask(base, 3, [0, 1, 2], 2, model.dtype, model.device)
        out.append(forward_states(model, cache, [7, 8, 9, 3, 3, 3, 3, 3, 3],
                                  [base, base + 1, base + 2, base + 1, base + 2, base + 2, base + 3, base + 3, base + 4],
                                  blocks)[0])
        cache.crop(-9)
        tree = DraftTree.chain([11, 12, 13])
        tree.add_path([11, 14])
        tree.add_path([15])
        out.append(forward_states(model, cache, [4] + tree.tokens, [base] + [base + d for d in tree.depths()],
                                  tree_mask(base, tree.parents, model.dtype, model.device))[0])
        results.append(out)
    attach(model, None)
    return results


@pytest.mark.parametrize("buckets", [None, (1, 4, 16)])
def test_step_computes_what_transformers_computes(tiny_lm, code_prompts, buckets, detach_after):
    model = tiny_lm[0]
    prompt = code_prompts[0][:30]
    step = CompiledForward(model, compile=False, buckets=buckets, kv_block=64 if buckets else None)
    eager, ours = passes_through(model, step, prompt)
    for a, b in zip(eager, ours):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_step_takes_fbgemm_fp16_weights(tiny_lm, code_prompts, detach_after):
    """The CPU default (dynamic-fp16): weights repacked q|k|v and gate|up, through the custom op."""
    from sdsat_lsp.quantize import quantize_fp16_weights

    model = quantize_fp16_weights(copy.deepcopy(tiny_lm[0]))
    step = CompiledForward(model, compile=False)
    assert step.layers[0][1].kind == "fp16"
    eager, ours = passes_through(model, step, code_prompts[1][:30])
    for a, b in zip(eager, ours):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


def test_long_passes_and_other_caches_stay_eager(tiny_lm, detach_after):
    from transformers import DynamicCache

    model = tiny_lm[0]
    step = CompiledForward(model, compile=False, max_tokens=8)
    cache = GrowableCache(config=model.config)
    assert step.accepts(cache, 8) and not step.accepts(cache, 9) and not step.accepts(cache, 0)
    assert not step.accepts(DynamicCache(config=model.config), 1)
    waiting = CompiledForward(model, compile=False)
    waiting.ready = False  # as while compiling in the background
    assert not waiting.accepts(cache, 1)


def test_unsupported_models_are_refused(tiny_lm):
    model = copy.deepcopy(tiny_lm[0])
    model.config.model_type = "gpt2"
    assert compiled_mod.supported(model) is not None
    with pytest.raises(ValueError):
        CompiledForward(model)


def _modes(adaptive, store):
    return {
        "two-pass": dict(mode="two-pass", k=4),
        "fused": dict(mode="fused", k=4),
        "fused-fixed": dict(mode="fused", k=4, draft_length="fixed"),
        "fused+lookup": dict(mode="fused", k=4, lookup_ngram=2),
        "fused+store": dict(mode="fused", k=4, lookup_ngram=3, draft_store=store, tree_nodes=16),
        "fused+store-chain": dict(mode="fused", k=4, lookup_ngram=3, draft_store=store),
    }


def check_identity(model, adaptive, prompts, step, code_stream, tokens=32):
    """Every mode through `step` equals eager AR; returns the drafts accepted."""
    vocab = model.get_input_embeddings().weight.shape[0]
    store = DraftStore.build(list(code_stream[:20000]), vocab)
    accepted = 0
    for prompt in prompts:
        expected = eager_generate(model, prompt, mode="ar", max_new_tokens=tokens, eos_ids=[]).tokens
        attach(model, step)
        assert generate(model, prompt, mode="ar", max_new_tokens=tokens, eos_ids=[]).tokens == expected
        for name, kw in _modes(adaptive, store).items():
            got = generate(model, prompt, adaptive_ids=[adaptive], max_new_tokens=tokens, eos_ids=[], **kw)
            assert got.tokens == expected, name
            accepted += got.stats.drafts_accepted
        attach(model, None)
    return accepted


def test_padded_step_is_identical_in_every_mode(sdsat_micro, code_prompts, code_stream, detach_after):
    """The CUDA layout (tokens padded to buckets, the cache to blocks) run eagerly on CPU."""
    model, _, adaptive = sdsat_micro
    step = CompiledForward(model, compile=False, buckets=(1, 4, 16, 32), kv_block=64, max_tokens=32)
    assert check_identity(model, adaptive, code_prompts[:3], step, code_stream) > 30


@pytest.fixture(scope="session")
def compiled_micro(sdsat_micro, tmp_path_factory):
    """The micro model's compiled forward (inductor, dynamic shapes), compiled once per session."""
    model = sdsat_micro[0]
    step = CompiledForward(model, compile=True)
    step.warm_up()
    return step


def test_compiled_is_identical_in_every_mode(sdsat_micro, compiled_micro, code_prompts, code_stream, detach_after):
    model, _, adaptive = sdsat_micro
    assert check_identity(model, adaptive, code_prompts[:3], compiled_micro, code_stream) > 30


def test_background_compile_switches_over(sdsat_micro, code_prompts, detach_after):
    """Until the warm-up is done the engine takes the eager path; then the step; an error leaves
    the eager path and says why."""
    model = sdsat_micro[0]
    step = CompiledForward(model, compile=False)
    step.ready = False
    calls = []
    real = step.warm_up

    def slow_warm_up():
        calls.append(step.ready)
        return real()

    step.warm_up = slow_warm_up
    attach(model, step)
    cache = GrowableCache(config=model.config)
    assert compiled_mod.attached(model) is step and not step.accepts(cache, 1)
    done = []
    step.start_background(done.append).join(60)
    assert done == [None] and calls == [False] and step.ready and step.compile_s is not None
    assert step.accepts(cache, 1)

    broken = CompiledForward(model, compile=False)
    broken.ready = False

    def fail():
        raise RuntimeError("no compiler")

    broken.warm_up = fail
    errors = []
    broken.start_background(errors.append).join(60)
    assert errors == ["RuntimeError: no compiler"] and not broken.ready


def _join_compile_threads():
    import threading

    # A build thread starts the warm-up thread: join until none is left, not one snapshot's worth.
    while threads := [t for t in threading.enumerate() if t.name.startswith("sdsat-compile")]:
        threads[0].join(60)


def test_compile_beside_builds_off_the_callers_thread_and_a_later_call_supersedes(tiny_lm, monkeypatch):
    """The server calls compile_beside from its event loop: building the step (seconds: static
    buffers) happens on a thread of its own; a call made while an earlier build is under way
    (the setting turned off, another model) wins: the earlier build neither attaches nor reports."""
    import threading

    model = copy.deepcopy(tiny_lm[0])  # the shared fixture's model stays unattached
    callers, release = [], threading.Event()

    def for_device(m, compile=True):
        callers.append(threading.current_thread().name)
        release.wait(30)
        return CompiledForward(m, compile=False)

    monkeypatch.setattr(CompiledForward, "for_device", classmethod(lambda cls, m, compile=True: for_device(m)))
    reports = []
    assert compiled_mod.compile_beside(model, True, lambda info, message: reports.append(info)) == {"state": "compiling"}
    assert compiled_mod.compile_beside(model, False, lambda info, message: reports.append(info)) == {"state": "off"}
    release.set()
    _join_compile_threads()
    assert callers == ["sdsat-compile-build"]
    assert reports == [] and compiled_mod.attached(model) is None

    assert compiled_mod.compile_beside(model, True, lambda info, message: reports.append(info)) == {"state": "compiling"}
    _join_compile_threads()
    assert [r["state"] for r in reports] == ["ready"] and compiled_mod.attached(model).ready


def test_logits_through_the_step(tiny_lm, code_prompts, detach_after):
    """`forward` (the prefill's entry) gives the same logits through the step."""
    model = tiny_lm[0]
    prompt = code_prompts[2][:20]
    expected = forward(model, GrowableCache(config=model.config), prompt, range(len(prompt)), logits_to_keep=2)
    attach(model, CompiledForward(model, compile=False))
    got = forward(model, GrowableCache(config=model.config), prompt, range(len(prompt)), logits_to_keep=2)
    assert got.shape == expected.shape == (2, model.config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_cuda_settings_can_be_built_on_cpu(tiny_lm):
    """for_device's CUDA choice (CUDA graphs over padded buckets) compiles lazily: building it with
    its mode must not fail (torch.compile refuses a mode and options together)."""
    step = CompiledForward(tiny_lm[0], buckets=compiled_mod.CUDA_BUCKETS, kv_block=compiled_mod.CUDA_KV_BLOCK,
                           mode="reduce-overhead")
    assert step.max_tokens == compiled_mod.CUDA_BUCKETS[-1] and not step.ready
    assert step._bucket(5) == 8 and step._bucket(64) == 64
