"""Token healing: which prompts are healed, the first-token constraint in every decoding mode, and
output text that starts right at the cursor."""

from __future__ import annotations

import pytest

from sdsat_lsp.engine import generate
from sdsat_lsp.healing import heal, healed_decoder, token_texts
from sdsat_lsp.prompt import continuation_decoder


def test_token_texts_concatenate_to_the_decoded_text(code_tokenizer):
    texts = token_texts(code_tokenizer)
    ids = code_tokenizer("def fail(self):\n        return x", add_special_tokens=False)["input_ids"]
    assert "".join(texts[i] for i in ids) == "def fail(self):\n        return x"


def test_a_prompt_cut_inside_a_word_is_healed(code_tokenizer):
    ids = code_tokenizer("    def __init__(self, na", add_special_tokens=False)["input_ids"]
    h = heal(code_tokenizer, ids)
    assert h is not None and h.ids == ids[:-1]
    texts = token_texts(code_tokenizer)
    assert h.text == texts[ids[-1]] and ids[-1] in h.first_token_ids
    assert all(texts[i].startswith(h.text) for i in h.first_token_ids) and len(h.first_token_ids) > 1
    # A special token at the end is never healed.
    assert heal(code_tokenizer, ids + [code_tokenizer.eos_token_id]) is None


@pytest.mark.parametrize("mode", ["ar", "two-pass", "fused"])
def test_healed_generation_starts_with_the_removed_text_and_modes_agree(sdsat_micro, code_stream, mode):
    model, tokenizer, adaptive = sdsat_micro
    texts = token_texts(tokenizer)
    healed = 0
    for start in range(200, 2200, 250):
        ids = code_stream[start : start + 40]
        h = heal(tokenizer, ids)
        if h is None:
            continue
        healed += 1
        kw = dict(k=4, adaptive_ids=[adaptive], max_new_tokens=12, eos_ids=[], first_token_ids=h.first_token_ids)
        out = generate(model, h.ids, mode=mode, **kw)
        ref = generate(model, h.ids, mode="ar", **kw)
        assert out.tokens == ref.tokens
        assert texts[out.tokens[0]].startswith(h.text)
        decode = healed_decoder(continuation_decoder(tokenizer, h.ids), h)
        full = continuation_decoder(tokenizer, h.ids)(out.tokens)
        assert full == h.text + decode(out.tokens)
    assert healed >= 3
