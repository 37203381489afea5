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

Indentation needs one more rule. After an editor auto-indents (`def f(x):\n    |`), the prompt ends
in a token `\n    ` that in training text only ever preceded a blank line: there `\n    return`
is `\n   ` + ` return`, the last space belonging to the word. Requiring a first token that
starts with `\n    ` would force a longer run of spaces (`\n       ` then ` return`: four spaces
too many). So a removed text that is a newline and indentation also admits the tokens that are a
start of it, and the output may indent its first line differently from the editor: the completion
then begins at the output's first visible character, where the cursor already is.
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
    indent = is_line_indent(tail)
    allowed = [i for i, t in enumerate(texts)
               if i not in specials and t and (t.startswith(tail) or (indent and tail.startswith(t)))]
    if allowed == [last]:
        return None
    return Healing(list(prompt_ids[:-1]), tail, allowed)


def healed_decoder(decode: Callable[[list[int]], str], healing: Healing | None) -> Callable[[list[int]], str]:
    """`decode` for generated ids, minus the healed text they start with (the text after the cursor)."""
    if healing is None:
        return decode
    typed = healing.text
    indented = is_line_indent(typed)

    def after_cursor(tokens: list[int]) -> str:
        text = decode(tokens)
        if not indented:
            return text[len(typed):]
        return reindent_after_blank(typed, text)

    return after_cursor


def is_line_indent(text: str) -> bool:
    """A newline and the next line's indentation: the cursor sits where the editor indented a line.
    (After a bare newline the cursor is at column 0 and the output's indentation is the completion's;
    other whitespace is inside a line and healed like any other text.)"""
    return "\n" in text and not text.strip() and not text.endswith("\n")


def _indent_before(s: str, end: int) -> int | None:
    """Characters between the last newline before `end` and `end`; None when there is none."""
    newline = s.rfind("\n", 0, end)
    return None if newline < 0 else end - newline - 1


def reindent_after_blank(typed: str, text: str) -> str:
    """`text` (generated in place of the whitespace `typed` before the cursor) as inserted at the cursor.

    The editor put the cursor where it wants the line to start; the model may indent that line
    differently. The completion starts at the output's first visible character ("" while there is
    none yet), and later lines move by as much as the first line was indented off the cursor, so
    the block keeps its shape."""
    visible = len(text) - len(text.lstrip())
    if visible == len(text):
        return ""
    body = text[visible:]
    model_indent = _indent_before(text, visible)
    if model_indent is None:  # still on the cursor's line
        extra = visible - len(typed)
    else:
        typed_indent = _indent_before(typed, len(typed))
        extra = model_indent - (len(typed) if typed_indent is None else typed_indent)
    if extra == 0 or "\n" not in body:
        return body
    first, *rest = body.split("\n")
    if extra < 0:
        return "\n".join([first] + [" " * -extra + line if line.strip() else line for line in rest])
    return "\n".join([first] + [line[min(extra, len(line) - len(line.lstrip(" "))):] for line in rest])
