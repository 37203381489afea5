"""Prompt building (prefix-only, FIM in SPM order, token budget, a window that stays put while
typing) and the completion rules (single/multi-line, dedent, no repeats, trimming)."""

from __future__ import annotations

import sysconfig
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdsat_lsp.kvcache import common_prefix_len
from sdsat_lsp.prompt import Completion, Rules, build_prompt, continuation_decoder, cursor_context

FIM = {"prefix": 5, "middle": 6, "suffix": 7}  # the ids tinymodel's tokenizer gives its FIM tokens

DOC = '''import os


def walk(top):
    for name in os.listdir(top):
        path = os.path.join(top, name)
        if os.path.isdir(path):
            yield from walk(path)
        yield path


print(list(walk(".")))
'''


@pytest.fixture(scope="module")
def tok(tiny_lm):
    return tiny_lm[1]


@pytest.fixture(scope="module")
def long_source():
    """A real standard-library file of a few thousand tokens."""
    return (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()


def test_fim_ids_match_the_tiny_tokenizer(tok):
    from sdsat_lsp.training.tinymodel import FIM_TOKENS

    assert {role: tok.convert_tokens_to_ids(t) for role, t in FIM_TOKENS.items()} == FIM


def test_prefix_only_prompt_is_the_text_before_the_cursor(tok):
    offset = DOC.index("yield path") + len("yield")
    p = build_prompt(DOC, offset, tok)
    assert not p.fim and p.prefix_start == 0 and p.suffix_end == offset
    assert p.ids == tok(DOC[:offset])["input_ids"]


def test_fim_prompt_is_suffix_first(tok):
    offset = DOC.index("yield path") + len("yield")
    p = build_prompt(DOC, offset, tok, fim_ids=FIM, max_suffix_tokens=1000)
    suffix = tok(DOC[offset:], add_special_tokens=False)["input_ids"]
    prefix = tok(DOC[:offset], add_special_tokens=False)["input_ids"]
    assert p.fim and p.ids == [FIM["prefix"], FIM["suffix"]] + suffix + [FIM["middle"]] + prefix


def test_fim_suffix_is_bounded_and_ends_at_a_line_end(tok, long_source):
    offset = len(long_source) // 3
    p = build_prompt(long_source, offset, tok, fim_ids=FIM, max_suffix_tokens=64, max_tokens=512)
    assert 0 < p.suffix_tokens <= 64 and long_source[p.suffix_end - 1] == "\n"
    assert len(p.ids) <= 512
    # Typing at the cursor leaves the suffix part, which comes first, unchanged.
    typed = long_source[:offset] + "x = 1" + long_source[offset:]
    q = build_prompt(typed, offset + 5, tok, fim_ids=FIM, max_suffix_tokens=64, max_tokens=512)
    assert q.ids[: p.suffix_tokens + 3] == p.ids[: p.suffix_tokens + 3]


def test_budget_is_respected_and_the_window_starts_at_a_line(tok, long_source):
    offset = len(long_source) // 2
    p = build_prompt(long_source, offset, tok, max_tokens=300)
    assert 150 < len(p.ids) <= 300
    assert p.prefix_start > 0 and long_source[p.prefix_start - 1] == "\n"
    assert tok.decode(p.ids) == long_source[p.prefix_start:offset]


def test_window_stays_put_while_typing(tok, long_source):
    """Typing line by line at a cursor deep in a file: the window start jumps rarely, so almost
    every prompt extends the previous one (the KV cache stays valid)."""
    cursor = len(long_source) // 2
    lines = long_source[cursor:].splitlines(keepends=True)[:60]
    text = long_source[:cursor]
    previous, starts, reprefill, total, keep = None, set(), 0, 0, None
    for line in lines:
        for cut in range(0, len(line), 4):  # bursts of 4 characters
            typed = text + line[:cut]
            p = build_prompt(typed, len(typed), tok, max_tokens=400, keep=keep)
            keep = p.window_head
            assert len(p.ids) <= 400
            starts.add(p.prefix_start)
            if previous is not None:
                reprefill += len(p.ids) - common_prefix_len(previous, p.ids)
                total += len(p.ids)
            previous = p.ids
        text += line
    typed_tokens = len(tok("".join(lines))["input_ids"])
    # A jump leaves a quarter of the budget to type before the next one.
    assert len(starts) <= typed_tokens / (0.25 * 400) + 2, (len(starts), typed_tokens)
    assert reprefill / total < 0.08, (reprefill, total, len(starts))


def test_an_edit_above_the_window_does_not_move_it(tok, long_source):
    offset = len(long_source) // 2
    p = build_prompt(long_source, offset, tok, max_tokens=300)
    edited = "# a new first line\n" + long_source
    q = build_prompt(edited, offset + 19, tok, max_tokens=300, keep=p.window_head)
    assert q.ids == p.ids and q.prefix_start == p.prefix_start + 19
    # The window stays at its line while it fits, even when a fresh choice would start elsewhere.
    more = edited[: offset + 19] + "y = 2\n" * 4
    r = build_prompt(more, len(more), tok, max_tokens=300, keep=p.window_head)
    assert r.prefix_start == q.prefix_start and r.ids[: len(q.ids) - 1] == q.ids[:-1]
    assert build_prompt(more, len(more), tok, max_tokens=300).prefix_start > r.prefix_start  # fresh: 3/4 full


def test_five_megabyte_document_is_fast(tok, long_source):
    big = long_source * (5_000_000 // len(long_source) + 1)
    started = time.perf_counter()
    for offset in (len(big), len(big) // 2, 10):
        p = build_prompt(big, offset, tok, fim_ids=FIM, max_tokens=1024)
        assert 0 < len(p.ids) <= 1024
    assert time.perf_counter() - started < 2.0


def test_positions_are_code_points(tok):
    text = 'face = "😋"  # é\nnext = 1\n'
    offset = text.index("# é") + 3
    p = build_prompt(text, offset, tok)
    assert tok.decode(p.ids) == text[:offset]


def test_empty_document_still_gives_a_prompt(tok):
    assert build_prompt("", 0, tok).ids
    assert build_prompt("abc", 99, tok).ids == tok("abc")["input_ids"]  # offsets are clamped


# ---- single or multi-line ---------------------------------------------------------------------


def _ctx(marked: str, mode: str = "auto"):
    offset = marked.index("|")
    return cursor_context(marked.replace("|", "", 1), offset, mode)


def test_line_mode_by_context():
    assert not _ctx("x = foo(|)\n").multiline  # text after the cursor: finish the line
    assert _ctx("def f(x):\n    |\n").multiline  # empty line after a block opener
    assert _ctx("def f(x):\n|").multiline
    assert _ctx("if (a) {\n  |\n}\n").multiline
    assert not _ctx("x = 1\n|\n").multiline  # empty line, no opener
    assert not _ctx("def f(x):\n    ret|\n").multiline  # in the middle of a line
    assert not _ctx("def f(x):\n    |\n", "single").multiline
    assert _ctx("x = 1\n|", "multi").multiline


def test_single_line_ends_at_the_first_newline():
    rules = Rules(_ctx("x = |\n"))
    assert rules.finish("compute(a, b)\ny = 2\n") == Completion("compute(a, b)")
    assert rules.should_stop("compute(a)\n") and not rules.should_stop("compute(a")
    # At the end of a line with nothing after the cursor, the next line may be the completion.
    rules = Rules(_ctx("def f(x):|"))
    assert rules.finish("\n    return x\n    y") == Completion("\n    return x")


def test_multi_line_stops_at_a_dedent_below_the_block():
    rules = Rules(_ctx("def f(x):\n    |\n"))
    generated = "if x:\n        return 1\n    return 2\n\ndef g():\n    pass"
    assert rules.finish(generated) == Completion("if x:\n        return 1\n    return 2")
    assert rules.should_stop("if x:\n        return 1\n    return 2\n\nd")
    assert not rules.should_stop("if x:\n        return 1\n    return 2\n\n")


def test_multi_line_stops_before_repeating_the_text_below():
    rules = Rules(_ctx("def f(x):\n    |\n    return total\n"))
    assert rules.finish("total = x * 2\n    return total\n") == Completion("total = x * 2")


def test_never_repeats_the_text_after_the_cursor():
    rules = Rules(_ctx("print(|)\n"))
    # The completion ends with the rest of the line: it replaces it instead of doubling it.
    assert rules.finish("value)") == Completion("value)", replace_chars=1)
    assert rules.finish("value") == Completion("value")
    assert rules.finish(")") is None  # only what is already there
    rules = Rules(_ctx("x = f(a, |)):\n"))
    assert rules.finish("b))") == Completion("b))", replace_chars=2)


def test_one_huge_line_is_fast(tok):
    """Found by the stress storm: finishing a completion in the middle of a 2 MB line compared
    every start of the rest of the line (quadratic: the server hung for minutes)."""
    line = "x = [" + ", ".join(str(i) for i in range(300_000))
    offset = len(line) // 2
    started = time.perf_counter()
    rules = Rules(cursor_context(line, offset))
    assert rules.finish("zz") == Completion("zz")
    assert 0 < len(build_prompt(line, offset, tok, fim_ids=FIM, max_tokens=512).ids) <= 512
    assert time.perf_counter() - started < 2.0


def test_trailing_whitespace_is_trimmed_and_empty_items_dropped():
    rules = Rules(_ctx("def f(x):\n    |\n"))
    assert rules.finish("return x   \n   \n") == Completion("return x")
    assert rules.finish("   \n\n") is None
    assert rules.finish("") is None
    assert Rules(_ctx("x = |")).finish("1\ufffd") == Completion("1")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(codec="utf-8"), max_size=300), where=st.floats(0, 1),
       generated=st.text(max_size=80), mode=st.sampled_from(["auto", "single", "multi"]))
def test_any_input_gives_a_bounded_prompt_and_a_clean_completion(tok, text, where, generated, mode):
    offset = int(where * len(text))
    p = build_prompt(text, offset, tok, max_tokens=64, max_suffix_tokens=16, fim_ids=FIM, line_mode=mode)
    assert 0 < len(p.ids) <= 64
    c = Rules(p.context).finish(generated)
    if c is not None:
        assert c.text.strip() and c.text == c.text.rstrip()
        assert 0 <= c.replace_chars <= len(p.context.suffix_line)


def test_continuation_decoder_roundtrips(tok):
    prompt = tok("def f(x):\n    return")["input_ids"]
    generated = tok(" x + 1\n")["input_ids"]
    assert continuation_decoder(tok, prompt)(generated) == " x + 1\n"
