"""SDSAT sampling must be lossless: the distribution of what it emits equals plain sampling from the
model. Checked with a chi-square test on the joint distribution of the first two sampled tokens of
a small-vocabulary model, whose exact distribution we compute from the model itself."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from sdsat_lsp.engine import generate
from sdsat_lsp.sampling import Sampling, draw, logits_to_probs

VOCAB = 10
ADAPTIVE = VOCAB - 1
PROMPT = [3, 1, 4, 1, 5]
SAMPLES = 3000


@pytest.fixture(scope="module")
def small_vocab_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         initializer_range=0.25, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(7)
    return LlamaForCausalLM(config).eval()


def exact_joint(model, sampling: Sampling) -> torch.Tensor:
    """P(first = a, second = b) = p(a | prompt) * p(b | prompt, a), from full forward passes."""
    with torch.inference_mode():
        first = logits_to_probs(model(input_ids=torch.tensor([PROMPT])).logits[0, -1], sampling)
        rows = torch.tensor([PROMPT + [a] for a in range(VOCAB)])
        second = logits_to_probs(model(input_ids=rows).logits[:, -1], sampling)
    return first[:, None] * second


def chi_square_p_value(counts: Counter, expected_probs: torch.Tensor, n: int) -> float:
    """Pearson chi-square p-value; cells expected below 5 are pooled into one."""
    expected = (expected_probs.flatten() * n).double()
    observed = torch.zeros_like(expected)
    for (a, b), c in counts.items():
        observed[a * VOCAB + b] = c
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def sample_pairs(model, sampling_for_seed, mode="fused", accept_rule=None) -> Counter:
    kwargs = {} if accept_rule is None else {"accept_rule": accept_rule}
    counts: Counter = Counter()
    accepted = 0
    for seed in range(SAMPLES):
        out = generate(model, PROMPT, mode=mode, k=3, adaptive_ids=[ADAPTIVE], max_new_tokens=2, eos_ids=[],
                       sampling=sampling_for_seed(seed), **kwargs)
        counts[tuple(out.tokens)] += 1
        accepted += out.stats.drafts_accepted
    assert accepted > SAMPLES // 20, "drafts were (almost) never accepted: the test would not test acceptance"
    return counts


def biased_reference_rule(probs, draft, generator):
    """The reference's rule: accept when a fresh sample equals the draft, otherwise emit another,
    independent sample. P(draft) becomes p + (1 - p) p: biased toward drafts."""
    if draw(probs, generator) == draft:
        return None
    return draw(probs, generator)


SETTINGS = {
    "t1": dict(temperature=1.0),
    "t0.7-top_k5-top_p0.9": dict(temperature=0.7, top_k=5, top_p=0.9),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_sdsat_sampling_matches_model_distribution(small_vocab_model, name):
    settings = SETTINGS[name]
    expected = exact_joint(small_vocab_model, Sampling(**settings))
    counts = sample_pairs(small_vocab_model, lambda seed: Sampling(seed=seed, **settings))
    assert chi_square_p_value(counts, expected, SAMPLES) > 1e-3


def test_biased_reference_rule_is_detected(small_vocab_model):
    """The same test rejects the reference's acceptance rule, so it has the power to catch a bias."""
    settings = SETTINGS["t1"]
    expected = exact_joint(small_vocab_model, Sampling(**settings))
    counts = sample_pairs(small_vocab_model, lambda seed: Sampling(seed=seed, **settings), accept_rule=biased_reference_rule)
    assert chi_square_p_value(counts, expected, SAMPLES) < 1e-6


def test_plain_sampling_matches_too(small_vocab_model):
    """The AR sampler and the exact distribution agree (checks the test's own arithmetic)."""
    expected = exact_joint(small_vocab_model, Sampling(temperature=1.0))
    counts: Counter = Counter()
    for seed in range(SAMPLES):
        out = generate(small_vocab_model, PROMPT, mode="ar", max_new_tokens=2, eos_ids=[], sampling=Sampling(1.0, seed=seed))
        counts[tuple(out.tokens)] += 1
    assert chi_square_p_value(counts, expected, SAMPLES) > 1e-3


def test_seeded_sampling_is_reproducible_and_greedy_ignores_seed(small_vocab_model):
    a = generate(small_vocab_model, PROMPT, k=3, adaptive_ids=[ADAPTIVE], max_new_tokens=12, eos_ids=[], sampling=Sampling(1.0, seed=5))
    b = generate(small_vocab_model, PROMPT, k=3, adaptive_ids=[ADAPTIVE], max_new_tokens=12, eos_ids=[], sampling=Sampling(1.0, seed=5))
    assert a.tokens == b.tokens
    g1 = generate(small_vocab_model, PROMPT, k=3, adaptive_ids=[ADAPTIVE], max_new_tokens=12, eos_ids=[], sampling=Sampling(0.0, seed=1))
    g2 = generate(small_vocab_model, PROMPT, k=3, adaptive_ids=[ADAPTIVE], max_new_tokens=12, eos_ids=[], sampling=Sampling(0.0, seed=2))
    assert g1.tokens == g2.tokens


def test_top_k_top_p_filtering():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    probs = logits_to_probs(logits, Sampling(temperature=1.0, top_k=3))
    assert (probs[3:] == 0).all() and abs(float(probs.sum()) - 1) < 1e-6
    full = torch.softmax(logits, -1)
    nucleus = logits_to_probs(logits, Sampling(temperature=1.0, top_p=float(full[0]) + 1e-3))
    assert (nucleus[2:] == 0).all() and nucleus[1] > 0  # the smallest set reaching top_p
