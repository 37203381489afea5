"""From a document and a cursor to a prompt, and from generated text to a completion.

Prompt layout (what keeps the per-document KV cache valid while the user types):
- prefix-only: `[specials] + tokens(text[start:cursor])`. Typing at the cursor only appends to the
  end, so everything before the cursor stays in the cache.
- fill-in-the-middle in suffix-first (SPM) order when the model card has FIM ids:
  `[specials, <prefix>, <suffix>] + tokens(suffix) + [<middle>] + tokens(text[start:cursor])`. The
  text after the cursor does not change while typing at the cursor, so the suffix part, which comes
  first, stays cached too. The suffix is bounded (a few hundred tokens) so it cannot crowd out the
  prefix, and ends at a line end.

The window start must not move on every keystroke (a moved start is a different prompt from its
first token: a full re-prefill). It is a line start; the caller passes back the previous window's
head (`Prompt.window_head`, the first characters of its first line), and the window stays at the
line that begins with it as long as it fits: by content, not by line number, so edits elsewhere do
not move it. A new window fills at most 3/4 of the budget, leaving room to type before it jumps.

Completion rules (`CursorContext`, `Rules`):
- single line when there is text after the cursor on its line; multi-line on an empty line after a
  block opener (`:`, `{`, `(`, `[`); single line otherwise; a setting can force either;
- stop at a line indented below the cursor's block (multi-line), at the end of the first line
  (single line), and where the generated text starts repeating the lines after the cursor;
- never repeat the text after the cursor: a completion that ends with (a start of) the rest of the
  line replaces it instead of doubling it;
- trim trailing whitespace; an empty result is no completion at all.

Nothing here knows of LSP or torch: text, offsets (in code points) and a tokenizer go in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

WINDOW_FILL = 0.75  # a new window fills at most this much of the budget: room to type before it moves
WINDOW_HEAD_CHARS = 160  # text that identifies a window's start line in the next request
MAX_CHARS_PER_TOKEN = 16  # for bounding how much text a token budget can cover (a search bound)
BLOCK_OPENERS = (":", "{", "(", "[")
LINE_MODES = ("auto", "single", "multi")


# ----------------------------------------------------------------------------------------------
# The cursor's surroundings and the completion rules.


def indent_width(line: str) -> int:
    """Columns of leading whitespace (tabs count 4)."""
    stripped = line.lstrip(" \t")
    return len(line[: len(line) - len(stripped)].expandtabs(4))


@dataclass
class CursorContext:
    prefix_line: str  # the cursor's line before the cursor
    suffix_line: str  # the cursor's line after the cursor (no newline)
    next_lines: list[str]  # up to a few non-blank lines after the cursor's line
    multiline: bool
    min_indent: int  # a generated line indented less than this ends a multi-line completion


def cursor_context(text: str, offset: int, line_mode: str = "auto", lookahead: int = 3) -> CursorContext:
    """What the completion rules need to know about `offset` (a code-point index into `text`)."""
    offset = max(0, min(offset, len(text)))
    line_start = text.rfind("\n", 0, offset) + 1
    line_end = text.find("\n", offset)
    line_end = len(text) if line_end < 0 else line_end
    prefix_line = text[line_start:offset]
    suffix_line = text[offset:line_end].rstrip("\r")
    previous = _previous_nonblank_line(text, line_start)
    next_lines = _next_nonblank_lines(text, line_end, lookahead)

    after_opener = previous is not None and previous.rstrip().endswith(BLOCK_OPENERS)
    if line_mode == "single":
        multiline = False
    elif line_mode == "multi":
        multiline = True
    else:
        # Text after the cursor: finish this line only. An empty line after a block opener: write
        # the block. Anything else: one line.
        multiline = not suffix_line.strip() and not prefix_line.strip() and after_opener
    if not prefix_line.strip():
        # On a blank line: inside the opener's block (deeper than the opener), else at the cursor's column.
        min_indent = indent_width(previous) + 1 if after_opener else indent_width(prefix_line)
    else:
        min_indent = indent_width(prefix_line)
    return CursorContext(prefix_line, suffix_line, next_lines, multiline, min_indent)


def _previous_nonblank_line(text: str, line_start: int, max_lines: int = 50) -> str | None:
    end = line_start - 1  # the newline ending the previous line
    for _ in range(max_lines):
        if end < 0:
            return None
        start = text.rfind("\n", 0, end) + 1
        line = text[start:end]
        if line.strip():
            return line
        end = start - 1
    return None


def _next_nonblank_lines(text: str, line_end: int, count: int, max_lines: int = 50) -> list[str]:
    lines: list[str] = []
    pos = line_end + 1
    for _ in range(max_lines):
        if len(lines) >= count or pos > len(text):
            break
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        line = text[pos:end].rstrip("\r")
        if line.strip():
            lines.append(line)
        pos = end + 1
    return lines


@dataclass
class Completion:
    text: str  # inserted at the cursor
    replace_chars: int = 0  # characters after the cursor, on its line, that `text` replaces


class Rules:
    """Where a completion ends and how it is cleaned up, for one cursor context."""

    def __init__(self, ctx: CursorContext):
        self.ctx = ctx

    def cut(self, text: str, final: bool = True) -> int | None:
        """Index in `text` where the completion ends, or None if it may go on. With final=False
        (during generation) a line is only compared with the text below once it is complete."""
        ctx = self.ctx
        rest_of_line = bool(ctx.suffix_line.strip())
        has_content = False
        pos = 0  # start of lines[i] in text
        lines = text.split("\n")
        for i, line in enumerate(lines):
            complete = i < len(lines) - 1 or final
            if i > 0:  # line i starts after a newline the model wrote
                if not ctx.multiline:
                    if has_content or rest_of_line:
                        return pos - 1  # single line: end at the first newline after some content
                elif line.strip():
                    # Its first non-blank character fixes its indentation: a dedent below the
                    # cursor's block ends the completion before that line's newline.
                    if indent_width(line) < ctx.min_indent:
                        return pos - 1
                    if complete and ctx.next_lines and line.strip() == ctx.next_lines[0].strip():
                        return pos - 1  # the model is re-typing the text below the cursor
            has_content = has_content or bool(line.strip())
            pos += len(line) + 1
        return None

    def should_stop(self, text: str) -> bool:
        """For the engine: True once the completion can no longer change (a cut point exists)."""
        return self.cut(text, final=False) is not None

    def finish(self, text: str) -> Completion | None:
        """The completion to show for generated `text`, or None when nothing is worth showing."""
        text = text.rstrip("\ufffd")  # an unfinished UTF-8 sequence at the end
        end = self.cut(text)
        if end is not None:
            text = text[:end]
        text = "\n".join(line.rstrip() for line in text.split("\n")).rstrip()
        if not text.strip():
            return None
        rest = self.ctx.suffix_line.rstrip()
        # Never repeat what follows the cursor: if the completion ends with the start of the rest of
        # the line (all of it, or e.g. the ")" of "):"), it replaces that text rather than doubling it.
        replace = 0
        # Only a start of `rest` no longer than `text` can end it: bounding k by len(text) keeps this
        # linear on a line of megabytes (over len(rest) it was quadratic: minutes on a 2 MB line).
        for k in range(min(len(rest), len(text)), 0, -1):
            if text.endswith(rest[:k]):
                replace = k
                break
        if replace == len(text):
            return None  # the completion is only the text that is already there
        return Completion(text, replace)


# ----------------------------------------------------------------------------------------------
# Prompt building within a token budget.


@dataclass
class Prompt:
    ids: list[int]
    prefix_start: int  # code-point offset where the prefix window starts
    suffix_end: int  # code-point offset where the suffix part ends (== cursor without FIM)
    fim: bool
    context: CursorContext
    prefix_tokens: int = 0
    suffix_tokens: int = 0
    window_head: str = ""  # pass back as `keep` next time


def leading_special_ids(tokenizer) -> list[int]:
    """The ids a tokenizer puts before text on its own (BOS for Llama-family tokenizers)."""
    cached = getattr(tokenizer, "_sdsat_leading_ids", None)
    if cached is not None:
        return cached
    with_specials = tokenizer("x")["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    lead = list(with_specials[: len(with_specials) - len(plain)]) if with_specials[-len(plain):] == plain else []
    try:
        tokenizer._sdsat_leading_ids = lead
    except AttributeError:
        pass
    return lead


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _line_starts(text: str, lo: int, hi: int) -> list[int]:
    """Offsets in [lo, hi) that begin a line."""
    starts = [lo] if lo == 0 else []
    pos = text.find("\n", lo, hi)
    while 0 <= pos < hi - 1:
        starts.append(pos + 1)
        pos = text.find("\n", pos + 1, hi)
    return starts


def prefix_window(text: str, offset: int, tokenizer, budget: int, keep: str | None = None) -> tuple[int, list[int]]:
    """(start, ids): a window start whose `text[start:offset]` fits in `budget` tokens.

    Preference: the document start; else the line that begins with `keep` (the previous window's
    head: the window stays put while it fits); else the earliest line start whose window fills at
    most WINDOW_FILL of the budget (the room left is typing before the next jump); else any line
    start that fits; else the last `budget` tokens (one line longer than the budget)."""
    if budget <= 0 or offset <= 0:
        return offset, []
    lo = max(0, offset - budget * MAX_CHARS_PER_TOKEN)
    if lo == 0:
        ids = encode(tokenizer, text[:offset])
        if len(ids) <= budget:
            return 0, ids
    starts = _line_starts(text, lo, offset)
    if keep:
        found = _earliest_fitting(text, offset, tokenizer, budget, [s for s in starts if text.startswith(keep, s)])
        if found is not None:
            return found
    for limit in (int(budget * WINDOW_FILL), budget):
        found = _earliest_fitting(text, offset, tokenizer, limit, starts)
        if found is not None:
            return found
    line_start = max(lo, text.rfind("\n", 0, offset) + 1)
    ids = encode(tokenizer, text[line_start:offset])[-budget:]
    return offset - len(tokenizer.decode(ids)), ids  # approximate start, for reporting only


def window_head(text: str, start: int, offset: int) -> str:
    """What identifies a window start in the next request (see `prefix_window`'s `keep`)."""
    return text[start : min(offset, start + WINDOW_HEAD_CHARS)]


def _earliest_fitting(text, offset, tokenizer, budget, candidates: Sequence[int]):
    """Binary search over ascending `candidates` (token count falls as the start moves right)."""
    best = None
    lo, hi = 0, len(candidates) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        ids = encode(tokenizer, text[candidates[mid]:offset])
        if len(ids) <= budget:
            best = (candidates[mid], ids)
            hi = mid - 1
        else:
            lo = mid + 1
    return best


def suffix_part(text: str, offset: int, tokenizer, budget: int) -> tuple[int, list[int]]:
    """(end, ids): the text after the cursor up to a line end, within `budget` tokens."""
    if budget <= 0:
        return offset, []
    window = text[offset : offset + budget * MAX_CHARS_PER_TOKEN]
    ids = encode(tokenizer, window)
    if len(ids) <= budget:
        return offset + len(window), ids
    # Too long: end at the last line end that fits (stable while typing at the cursor).
    cut = len(window)
    while True:
        cut = window.rfind("\n", 0, cut)
        if cut < 0:
            return offset, []
        ids = encode(tokenizer, window[: cut + 1])
        if len(ids) <= budget:
            return offset + cut + 1, ids
        # Skip ahead roughly in proportion instead of one line at a time.
        cut = min(cut, int((cut + 1) * budget / len(ids)) + 1)


def build_prompt(
    text: str,
    offset: int,
    tokenizer,
    *,
    max_tokens: int = 1024,
    max_suffix_tokens: int = 128,
    fim_ids: dict[str, int] | None = None,
    line_mode: str = "auto",
    keep: str | None = None,
) -> Prompt:
    """The prompt for a completion at `offset` (code points) in `text`: FIM (SPM order) when
    `fim_ids` has prefix/suffix/middle, else prefix-only; at most `max_tokens` ids in all.
    `keep`: the previous prompt's `window_head` for this document, if any."""
    offset = max(0, min(offset, len(text)))
    ctx = cursor_context(text, offset, line_mode)
    lead = leading_special_ids(tokenizer)
    use_fim = bool(fim_ids) and all(role in fim_ids for role in ("prefix", "suffix", "middle"))
    if use_fim:
        suffix_budget = max(0, min(max_suffix_tokens, (max_tokens - len(lead) - 3) // 2))
        suffix_end, suffix_ids = suffix_part(text, offset, tokenizer, suffix_budget)
        head = lead + [fim_ids["prefix"], fim_ids["suffix"]] + suffix_ids + [fim_ids["middle"]]
    else:
        suffix_end, suffix_ids, head = offset, [], list(lead)
    start, prefix_ids = prefix_window(text, offset, tokenizer, max_tokens - len(head), keep)
    ids = head + prefix_ids
    if not ids:
        # An empty document without a BOS token: the engine needs at least one token.
        ids = encode(tokenizer, "\n")
    return Prompt(ids, start, suffix_end, use_fim, ctx, len(prefix_ids), len(suffix_ids),
                  window_head(text, start, offset))


# ----------------------------------------------------------------------------------------------
# Generated tokens -> text.


def continuation_decoder(tokenizer, prompt_ids: Sequence[int], context: int = 6) -> Callable[[list[int]], str]:
    """A function from generated ids to their text, decoded after the last few prompt ids so that
    tokenizers that drop a leading space at the start of a decode (SentencePiece) get it right."""
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    tail = [t for t in prompt_ids[-context:] if t not in specials]
    head_text = tokenizer.decode(tail, skip_special_tokens=True) if tail else ""

    def decode(tokens: list[int]) -> str:
        full = tokenizer.decode(tail + list(tokens), skip_special_tokens=True)
        return full[len(head_text):] if full.startswith(head_text) else tokenizer.decode(tokens, skip_special_tokens=True)

    return decode
