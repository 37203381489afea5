"""Token healing: a prompt that ends inside a token is continued as the model learned it.

An editor asks for completions at any character: after `self.fa` (the file will say `self.fail`),
after the newline of a block opener (the next line will start with spaces). A BPE tokenizer cuts
the prompt into tokens the model almost never saw in that place (`fa` then `il`, a bare `\\n` before
an indented line), so it predicts as if the word or the line were over. Healing removes the last
prompt token and lets the first generated token be any token whose text starts with the removed
text (`fail`, `\\n        `); the caller strips that text from the output again.

Only the first token is constrained, and a constraint on the prefill's logits is applied the same
way by every decoding mode, so SDSAT output stays identical to plain greedy decoding of the same
healed prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass
class Healing:
    ids: list[int]  # the prompt without its last token
    text: str  # the removed token's text: every output starts with it
    first_token_ids: list[int]  # tokens whose text starts with `text`


def token_texts(tokenizer) -> list[str]:
    """Each token id's text as it reads inside running text (cached on the tokenizer).

    Decoded after an anchor token: SentencePiece tokenizers drop a token's leading space when it
    starts a decode, which would make "▁fail" look like "fail"."""
    cached = getattr(tokenizer, "_sdsat_token_texts", None)
    if cached is not None:
        return cached
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1:]
    head = tokenizer.decode(anchor)
    size = len(tokenizer)
    decoded = tokenizer.batch_decode([anchor + [i] for i in range(size)], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
    texts = [d[len(head):] if d.startswith(head) else "" for d in decoded]
    try:
        tokenizer._sdsat_token_texts = texts
    except AttributeError:
        pass
    return texts


def heal(tokenizer, prompt_ids: Sequence[int]) -> Healing | None:
    """How to heal `prompt_ids`, or None when its last token cannot be extended (a special token,
    an incomplete UTF-8 piece, or no other token starts with it: healing would change nothing)."""
    if len(prompt_ids) < 2:
        return None
    last = int(prompt_ids[-1])
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    if last in specials:
        return None
    texts = token_texts(tokenizer)
    if last >= len(texts):
        return None
    tail = texts[last]
    if not tail or "\ufffd" in tail:
        return None
    allowed = [i for i, t in enumerate(texts) if t.startswith(tail) and i not in specials]
    if allowed == [last]:
        return None
    return Healing(list(prompt_ids[:-1]), tail, allowed)


def healed_decoder(decode: Callable[[list[int]], str], healing: Healing | None) -> Callable[[list[int]], str]:
    """`decode` for generated ids, minus the healed text they start with (the text after the cursor)."""
    if healing is None:
        return decode
    n = len(healing.text)

    def after_cursor(tokens: list[int]) -> str:
        return decode(tokens)[n:]

    return after_cursor
