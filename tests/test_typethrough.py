"""Typing through a suggestion costs no model pass, and gives what a fresh greedy completion gives;
typing something else decodes; the prefetch decodes on while idle, yields to any request, and can
be turned off (issue 16, items 1 and 2). Over stdio with tests/lsp_client.py, on the tiny random
model, and in process over many cursors."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from sdsat_lsp.completion import complete
from sdsat_lsp.modelcard import read_model_card
from sdsat_lsp.settings import Settings, parse_settings
from sdsat_lsp.typethrough import complete_typing

from documents import WALK_MODULE as DOC  # tests/documents.py
from lsp_client import BASE_OPTIONS, Session, capabilities, offset_of

over_lsp = pytest.mark.asyncio(loop_scope="module")

# In "    for path in walk(argv[1]):", after "for path": the tiny model's suggestion there ends
# by the completion rules (a stop), so its remainder is known after each character typed.
LINE, COLUMN = 15, 12


async def _ask(server: Session, uri: str, line: int, column: int):
    result = await server.inline(uri, line, column)
    return (result.items[0] if result.items else None), await server.last_request(uri)


def _same(item, expected, column: int) -> bool:
    if expected is None:
        return item is None
    return (item is not None and item.insert_text == expected.text
            and item.range.end.character == column + expected.replace_chars)


@over_lsp
async def test_typing_the_suggestion_gets_the_rest_with_no_pass(main_server, reference):
    uri = "file:///typethrough.py"
    text = DOC
    main_server.open(uri, text)
    try:
        first, stats = await _ask(main_server, uri, LINE, COLUMN)
        assert first is not None and stats["forwardPasses"] >= 1 and stats["typedThrough"] is False
        suggestion = first.insert_text
        assert len(suggestion) >= 3, suggestion
        counted = (await main_server.stats(last=0))["typedThrough"]
        passes = []
        for i, ch in enumerate(suggestion[:-1]):
            main_server.change(uri, (LINE, COLUMN + i), (LINE, COLUMN + i), ch)
            text = text[:offset_of(text, LINE, COLUMN + i)] + ch + text[offset_of(text, LINE, COLUMN + i):]
            column = COLUMN + i + 1
            item, stats = await _ask(main_server, uri, LINE, column)
            _, expected, _ = reference(text, offset_of(text, LINE, column))
            assert _same(item, expected, column), (suggestion[:i + 1], item, expected)
            assert item.insert_text == suggestion[i + 1:]
            assert stats["typedThrough"] is True and stats["completionId"] == (await main_server.stats(
                uri=uri))["requests"][0]["completionId"]
            assert stats["forwardPasses"] == 0 and stats["prefillTokens"] == 0 and stats["decodeMs"] == 0
            passes.append(stats["forwardPasses"])
        assert passes and set(passes) == {0}
        assert (await main_server.stats(last=0))["typedThrough"] == counted + len(passes)
    finally:
        main_server.close(uri)


@over_lsp
async def test_typing_something_else_decodes(main_server, reference):
    uri = "file:///typed_other.py"
    main_server.open(uri, DOC)
    try:
        first, _ = await _ask(main_server, uri, LINE, COLUMN)
        other = "Z" if not first.insert_text.startswith("Z") else "Q"
        main_server.change(uri, (LINE, COLUMN), (LINE, COLUMN), other)
        text = DOC[:offset_of(DOC, LINE, COLUMN)] + other + DOC[offset_of(DOC, LINE, COLUMN):]
        item, stats = await _ask(main_server, uri, LINE, COLUMN + 1)
        assert stats["typedThrough"] is False and stats["forwardPasses"] >= 1 and stats["prefillTokens"] >= 1
        _, expected, _ = reference(text, offset_of(text, LINE, COLUMN + 1))
        assert _same(item, expected, COLUMN + 1)
    finally:
        main_server.close(uri)


@over_lsp
async def test_after_accepting_the_next_line_is_ready(main_server, reference):
    """The prefetch decodes past the suggestion while the server is idle: the user inserts it and
    asks again at its end, and gets the answer with no pass. (At the end of "        if
    os.path.isdir(path):" the tiny model's suggestion stops at its line's end; after most of its
    suggestions the text inserted does not tokenize as the model wrote it, and the request decodes.)"""
    uri = "file:///prefetched.py"
    line, column = 8, 31
    main_server.open(uri, DOC)
    try:
        before = (await main_server.stats(last=0))["prefetch"]
        first, stats = await _ask(main_server, uri, line, column)
        after = (await main_server.prefetched())["prefetch"]
        assert after["runs"] == before["runs"] + 1 and after["tokens"] > before["tokens"]
        cache = (await main_server.stats(uri=uri))["cache"]["perDocument"]
        # The cache holds the prompt, the answer's tokens and the prefetched ones (a decode's last
        # token waits for the next pass to be fed).
        held = stats["promptTokens"] + stats["newTokens"] + after["tokens"] - before["tokens"]
        assert held - 1 <= cache[0]["tokens"] <= held, (cache, stats, after)
        main_server.change(uri, (line, column), (line, column), first.insert_text)
        text = DOC[:offset_of(DOC, line, column)] + first.insert_text + DOC[offset_of(DOC, line, column):]
        column += len(first.insert_text)
        item, stats = await _ask(main_server, uri, line, column)
        _, expected, _ = reference(text, offset_of(text, line, column))
        assert expected is not None and _same(item, expected, column)
        assert stats["typedThrough"] is True and stats["forwardPasses"] == 0, stats
        # Without the prefetch the same request decodes (what the prefetch saved).
        main_server.configure({"prefetchTokens": 0})
        main_server.change(uri, (line, 31), (line, column), "")
        await _ask(main_server, uri, line, 31)
        main_server.change(uri, (line, 31), (line, 31), first.insert_text)
        item, stats = await _ask(main_server, uri, line, column)
        assert _same(item, expected, column) and stats["typedThrough"] is False and stats["forwardPasses"] >= 1
    finally:
        main_server.configure({"prefetchTokens": 32})
        main_server.close(uri)


@over_lsp
async def test_prefetch_yields_to_a_request_and_turns_off(tiny_model_dir):
    """A prefetch with room for seconds of decoding (limits raised for the test) stops at the next
    pass when a request comes: the request waits a pass, not the prefetch. `prefetchTokens: 0`
    runs none."""
    limits = '{"prefetch.PREFETCH_MS": 60000, "prefetch.PREFETCH_LINES": 100000}'
    session = await Session.start({"model": str(tiny_model_dir), **BASE_OPTIONS, "maxTokens": 4,
                                   "prefetchTokens": 700}, capabilities(), env={"SDSAT_LSP_TEST_LIMITS": limits})
    try:
        uri = "file:///preempt.py"
        session.open(uri, DOC)
        await session.inline(uri, LINE, COLUMN)
        await asyncio.sleep(0.5)  # the prefetch is under way (700 tokens: seconds on 2 cores)
        assert (await session.stats(last=0))["prefetch"]["pending"] == 1
        started = time.perf_counter()
        await session.inline(uri, 6, 4)
        waited_ms = (time.perf_counter() - started) * 1e3
        stats = await session.last_request(uri)
        prefetch = (await session.prefetched())["prefetch"]
        # Two runs (one after each request): the first preempted by the second request.
        assert prefetch["runs"] == 2 and prefetch["preempted"] == 1, prefetch
        assert stats["queueMs"] < 250 and waited_ms < 2000, (stats, waited_ms)
        session.configure({"prefetchTokens": 0})
        runs = prefetch["runs"]
        await session.inline(uri, 17, 14)
        assert (await session.prefetched())["prefetch"]["runs"] == runs
    finally:
        await session.stop()


# ---- in process: exact over many cursors ------------------------------------------------------


def test_typed_through_answers_equal_fresh_greedy(tiny_lm, tiny_model_dir):
    """Type each suggestion a character at a time at a dozen cursors: every answer equals a fresh
    greedy completion of the same text (token healing, mid-token typing, the rules of the new
    cursor), and some are typed through."""
    import torch

    model, tokenizer, _ = tiny_lm
    loaded = SimpleNamespace(model=model, tokenizer=tokenizer, card=read_model_card(tiny_model_dir))
    s, problems = parse_settings(BASE_OPTIONS, Settings())
    assert not problems
    torch.set_num_threads(1)
    typed_through = answers = 0
    lines = DOC.splitlines()
    cursors = [(line, column) for line in range(4, 18) for column in (4, len(lines[line]) // 2) if lines[line].strip()]
    for line, column in cursors:
        offset = offset_of(DOC, line, column)
        first, record = complete_typing(loaded, s, DOC, offset, None, 1, keep=None, kv=None, uri="u")
        if first.completion is None:
            continue
        keep = first.prompt.window_head
        for i in range(1, min(len(first.completion.text), 8)):
            text = DOC[:offset] + first.completion.text[:i] + DOC[offset:]
            got, _ = complete_typing(loaded, s, text, offset + i, record, 2, keep=keep, kv=None, uri="u")
            fresh = complete(loaded, s, text, offset + i, keep=keep, mode="ar").completion
            assert got.completion == fresh, (line, column, i)
            answers += 1
            typed_through += got.stats["typedThrough"]
            assert (got.stats["forwardPasses"] == 0) == got.stats["typedThrough"], got.stats
    assert answers > 30 and typed_through >= 3, (answers, typed_through)
