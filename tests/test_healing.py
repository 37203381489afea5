"""Token healing: which prompts are healed, the first-token constraint in every decoding mode, and
output text that starts right at the cursor."""

from __future__ import annotations

import pytest

from sdsat_lsp.engine import generate
from sdsat_lsp.healing import heal, healed_decoder, is_line_indent, token_texts
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
        first = texts[out.tokens[0]]
        assert first.startswith(h.text) or (is_line_indent(h.text) and h.text.startswith(first))
        decode = healed_decoder(continuation_decoder(tokenizer, h.ids), h)
        full = continuation_decoder(tokenizer, h.ids)(out.tokens)
        if not is_line_indent(h.text):
            assert full == h.text + decode(out.tokens)
        else:  # the editor's indentation stands: the completion starts at the first visible text
            assert decode(out.tokens).split("\n")[0] == full.lstrip().split("\n")[0]
    assert healed >= 3


def test_auto_indented_line_admits_the_tokens_that_start_the_indentation():
    """`def f(x):\n    |` ends in the token "\n    ", which training text only has before blank
    lines ("\n    return" is "\n   " + " return"). The start of the indentation must be allowed,
    or the model is pushed into a longer run of spaces."""
    from sdsat_lsp.embedded import resolve_model

    loaded = resolve_model(None)
    tokenizer, texts = loaded.tokenizer, token_texts(loaded.tokenizer)
    for prompt in ("def f(x):\n    ", "class A:\n    def f(self, items):\n        "):
        natural = tokenizer(prompt + "return x", add_special_tokens=False)["input_ids"]
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        h = heal(tokenizer, ids)
        assert h is not None and h.text.strip() == "" and h.text.startswith("\n")
        line_start = natural[len(h.ids)]  # how the indentation is cut when code follows it
        assert texts[line_start] != h.text and h.text.startswith(texts[line_start])
        assert line_start in h.first_token_ids
        out = generate(loaded.model, h.ids, mode="fused", k=loaded.card.k, adaptive_ids=loaded.card.adaptive_ids,
                       max_new_tokens=12, eos_ids=[], first_token_ids=h.first_token_ids)
        text = healed_decoder(continuation_decoder(tokenizer, h.ids), h)(out.tokens)
        assert text and not text[0].isspace(), repr(text)


def test_healed_decoder_for_whitespace_keeps_the_editors_indentation():
    h = type("H", (), {"text": "\n    "})()
    pieces = {1: "\n   ", 2: " return", 3: "\n  ", 4: "return", 5: "\n    ", 6: " x", 7: "\n           ", 8: " #",
              9: "\n            ", 10: "\n      "}
    decode = healed_decoder(lambda ids: "".join(pieces[i] for i in ids), h)
    assert decode([1, 2, 6]) == "return x"  # as typed, split differently
    assert decode([5, 4, 6]) == "return x"
    assert decode([1]) == ""  # nothing visible yet
    # Indented deeper than the editor (12 columns, not 4): the block moves left with its first line.
    assert decode([7, 8, 6, 9, 4, 10, 4]) == "# x\n    return\nreturn"
    # Indented less (2 columns): later lines move right by 2.
    assert decode([3, 4, 3, 4]) == "return\n    return"
    # After a bare newline the cursor is at column 0: the output's indentation is part of the completion.
    at_column_0 = healed_decoder(lambda ids: "".join(pieces[i] for i in ids), type("H", (), {"text": "\n"})())
    assert at_column_0([1, 2, 6]) == "    return x"


def test_only_a_newline_and_indentation_counts_as_an_indented_line():
    from transformers import AutoTokenizer

    from sdsat_lsp.embedded import EMBEDDED_DIR

    assert is_line_indent("\n    ") and is_line_indent("\n\n\t")
    assert not is_line_indent("    ") and not is_line_indent("\n") and not is_line_indent(" ")
    # Whitespace inside a line is healed like other text: the first token must extend it.
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_DIR)
    h = heal(tokenizer, tokenizer("result = compute(a, ", add_special_tokens=False)["input_ids"])
    assert h is not None and h.text == " "
    texts = token_texts(tokenizer)
    assert all(texts[i].startswith(" ") for i in h.first_token_ids)
