"""The draft store finds every occurrence of an n-gram and drafts what most of them continue with;
drafts from it never change the engine's output, and on code like its corpus they are accepted."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdsat_lsp.draftstore import DraftStore, TieredStore
from sdsat_lsp.engine import generate
from sdsat_lsp.errors import SdsatError


def brute_occurrences(tokens: list[int], ngram: list[int]) -> list[int]:
    n = len(ngram)
    return [i for i in range(len(tokens) - n + 1) if tokens[i:i + n] == ngram]


@settings(max_examples=60, deadline=None)
@given(tokens=st.lists(st.integers(0, 5), min_size=0, max_size=80), ngram=st.lists(st.integers(0, 5), min_size=1, max_size=4),
       vocab=st.sampled_from([6, 300, 70000]))
def test_occurrences_match_brute_force(tokens, ngram, vocab):
    store = DraftStore.build(tokens, vocab)
    expected = brute_occurrences(tokens, ngram) if len(ngram) <= store.max_ngram else []  # 70000 ids: 3 per key
    assert sorted(store.occurrences(ngram).tolist()) == expected


def test_follow_takes_longest_suffix_and_majority():
    #         0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15 16 17
    corpus = [1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 0, 7, 2, 8]
    store = DraftStore.build(corpus, 10)
    # "1 2" is followed by "3 4" twice and "5 6" once: the majority wins.
    assert store.follow([9, 1, 2], 2) == [3, 4]
    # "7 2" occurs once, followed by 8: the longer match decides over the frequent "2 3".
    assert store.follow([7, 2], 3) == [8]  # the corpus ends after 8: drafts never run into padding
    # Only "2" is known ("9 2" is not): too short to draft from (min_ngram 2).
    assert store.follow([9, 2], 3) == []
    assert store.follow([9, 1, 2], 0) == []


def test_follow_stops_where_occurrences_disagree():
    # "1 2" -> 3 always; then 4, 5, 6, 7, 8 or 9 once each: no token after 3 has a fifth of the votes.
    corpus = []
    for tail in (4, 5, 6, 7, 8, 9):
        corpus += [1, 2, 3, tail, 0]
    store = DraftStore.build(corpus, 10)
    assert store.follow([1, 2], 4, min_share=0.2) == [3]  # 1/6 of the votes is below 0.2
    assert store.follow([1, 2], 4, min_share=0.1)[:2] == [3, 4]  # a tie goes to the lowest id
    # Only `candidates` occurrences, evenly spread over the continuations, vote.
    assert store.follow([1, 2], 2, candidates=1) == [3, 4]
    assert store.follow([1, 2], 2, candidates=2) == [3, 4]  # 4 and 9 picked, a tie


def test_save_load_roundtrip_and_damage(tmp_path):
    rng = random.Random(0)
    corpus = [rng.randrange(50) for _ in range(3000)]
    store = DraftStore.build(corpus, 50)
    path = tmp_path / "store.npz"
    store.save(path)
    loaded = DraftStore.load(path)
    assert len(loaded) == 3000
    for i in range(0, 2990, 97):
        assert loaded.follow(corpus[i:i + 3], 5) == store.follow(corpus[i:i + 3], 5)
    path.write_bytes(b"not a store")
    with pytest.raises(SdsatError, match="cannot read draft store"):
        DraftStore.load(path)


def test_bad_ids_are_refused():
    with pytest.raises(SdsatError, match="token ids"):
        DraftStore.build([1, 2, 10], 10)
    store = DraftStore.build([1, 2, 3], 10)
    assert store.follow([1, 99], 3) == []  # a query id outside the vocabulary finds nothing


class Garbage:
    """A draft source that proposes random tokens: it may cost speed, never correctness."""

    def __init__(self, vocab: int):
        self.rng = random.Random(7)
        self.vocab = vocab

    def follow(self, context, limit):
        return [self.rng.randrange(self.vocab) for _ in range(limit)]


def greedy_corpus(model, prompts, eos: int) -> tuple[list[list[int]], list[int]]:
    """(greedy outputs, a corpus of every prompt followed by its greedy output): a store of what the
    model itself says, so that the test does not rest on how well a micro model learned code."""
    outputs = [generate(model, prompt, mode="ar", max_new_tokens=48, eos_ids=[]).tokens for prompt in prompts]
    corpus = []
    for prompt, output in zip(prompts, outputs):
        corpus += list(prompt) + output + [eos]
    return outputs, corpus


@pytest.mark.parametrize("mode", ("two-pass", "fused"))
def test_store_drafts_are_accepted_and_output_unchanged(sdsat_micro, code_prompts, mode):
    model, tokenizer, adaptive = sdsat_micro
    vocab = model.get_input_embeddings().weight.shape[0]
    prompts = code_prompts[:3]
    outputs, corpus = greedy_corpus(model, prompts, tokenizer.eos_token_id)
    store = DraftStore.build(corpus, vocab)
    accepted = 0
    for prompt, expected in zip(prompts, outputs):
        for k in (1, 3, 5):
            for source in (store, Garbage(vocab)):
                for ngram in (0, 3):
                    got = generate(model, prompt, mode=mode, k=k, adaptive_ids=[adaptive], max_new_tokens=48, eos_ids=[],
                                   lookup_ngram=ngram, draft_store=source)
                    assert got.tokens == expected, (mode, k, source, ngram)
                    if source is store:
                        assert got.stats.store_passes + got.stats.lookup_passes > 0
                        accepted += got.stats.store_accepted
    assert accepted > 100


def test_store_makes_fewer_passes_than_adaptive_drafts_alone(sdsat_micro, code_prompts):
    model, tokenizer, adaptive = sdsat_micro
    _, corpus = greedy_corpus(model, code_prompts, tokenizer.eos_token_id)
    store = DraftStore.build(corpus, model.get_input_embeddings().weight.shape[0])
    passes = {"adaptive": 0, "store": 0}
    for prompt in code_prompts:
        for name, source in (("adaptive", None), ("store", store)):
            passes[name] += generate(model, prompt, mode="fused", k=5, adaptive_ids=[adaptive], max_new_tokens=48,
                                     eos_ids=[], draft_store=source).stats.forward_passes
    assert passes["store"] < 0.6 * passes["adaptive"], passes


def test_store_keys_pack_large_vocabularies():
    """CodeLlama's 32016 ids take 15 bits: four tokens still fit one key."""
    corpus = np.array([32015, 0, 32015, 1, 32015, 0, 32015, 0], dtype=np.int32)
    store = DraftStore.build(corpus, 32016)
    assert store.max_ngram == 4
    assert sorted(store.occurrences([32015, 0, 32015]).tolist()) == [0, 4]
    assert store.follow([32015, 0], 2) == [32015, 0]


def test_tiered_store_asks_in_order():
    own = DraftStore.build([5, 6, 7, 8, 0], 10)
    code = DraftStore.build([5, 6, 9, 9, 0, 1, 2, 3, 0], 10)
    tiered = TieredStore(own, code)
    assert tiered.follow([5, 6], 2) == [7, 8]  # the first store knows "5 6"
    assert tiered.follow([1, 2], 1) == [3]  # only the second does
    assert tiered.follow([4, 4], 3) == [] and len(tiered) == 14


def test_distill_writes_the_models_own_continuations_and_resumes(sdsat_micro_dir, tmp_path):
    """`draft-store --distill`: greedy continuations (checked against plain greedy decoding), a
    record of how they were made, the same file after an interruption, and a store that uses them."""
    import json
    import shutil

    from sdsat_lsp.cli import main
    from sdsat_lsp.corpus import cut_prompts, split_files
    from sdsat_lsp.draftstore import OWN_DRAFTS_FILE, open_store
    from sdsat_lsp.model import load_model

    model_dir = tmp_path / "model"
    shutil.copytree(sdsat_micro_dir, model_dir)
    args = ["draft-store", "--model", str(model_dir), "--distill", "3", "--max-new-tokens", "8", "--seed", "5"]
    assert main(args) == 0
    out = model_dir / OWN_DRAFTS_FILE
    tokens = np.load(out).tolist()
    recipe = json.loads((model_dir / "drafts.json").read_text())
    assert recipe["prompts"] == 3 and recipe["tokens"] == len(tokens) and recipe["seed"] == 5
    loaded = load_model(model_dir, quantize="none")
    eos = loaded.tokenizer.eos_token_id
    prompt = loaded.tokenizer(cut_prompts(3, seed=5, max_chars=1000, files=split_files()[1])[0].text)["input_ids"]
    greedy = generate(loaded.model, prompt, mode="ar", max_new_tokens=8).tokens
    assert tokens[:len(greedy) + 9] == prompt[-8:] + greedy + [eos]
    # Interrupted after the first prompt: the run picks up there and writes the same file.
    first = tokens[:tokens.index(eos) + 1]
    partial = model_dir / f"{OWN_DRAFTS_FILE}.partial.json"
    partial.write_text(json.dumps({"recipe": {k: v for k, v in recipe.items() if k not in ("tokens", "sha256")},
                                   "segments": [first]}))
    out.unlink()
    assert main(args) == 0
    assert np.load(out).tolist() == tokens and not partial.exists()
    code = tmp_path / "code"
    code.mkdir()
    (code / "a.py").write_text("def f(x):\n    return x + 1\n" * 20)
    store = open_store(str(code), loaded.tokenizer, loaded.model.get_input_embeddings().weight.shape[0],
                       model_dir=model_dir)
    assert isinstance(store, TieredStore) and store.source == f"{OWN_DRAFTS_FILE}+{code}"
    assert store.follow(prompt[-8:], 4) == greedy[:len(store.follow(prompt[-8:], 4))] != []
