"""The per-document KV cache over LSP: typing at the cursor reuses it, an edit invalidates it from
the edit on only, didClose frees it."""

from __future__ import annotations

import pytest

from sdsat_lsp.kvcache import common_prefix_len
from sdsat_lsp.prompt import build_prompt

from documents import WALK_MODULE as DOC  # tests/documents.py
from lsp_client import healed_ids, offset_of

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_typing_at_the_cursor_reuses_the_cache(main_server):
    uri = "file:///typing.py"
    main_server.open(uri, DOC)
    await main_server.inline(uri, 16, 8)  # after "        " in the for loop's body
    first = await main_server.last_request(uri)
    assert first["reusedTokens"] == 0 and first["prefillTokens"] == first["promptTokens"]
    typed = "co"
    for i, ch in enumerate("count"):
        main_server.change(uri, (16, 8 + i), (16, 8 + i), ch)
        await main_server.inline(uri, 16, 9 + i)
        s = await main_server.last_request(uri)
        # Everything before the cursor is cached: only the last token or two are prefilled.
        assert s["reusedTokens"] >= s["promptTokens"] - 3, s
        assert s["prefillTokens"] <= 3
        assert s["cachedBefore"] >= s["reusedTokens"]
    del typed
    cache = (await main_server.stats())["cache"]
    assert any(d["uri"] == uri and d["bytes"] > 0 for d in cache["perDocument"])
    main_server.close(uri)


async def _complete_rename_complete(server, tokenizer, uri: str):
    """Complete in "print(count)" (before ")"), rename the parameter on line 4 ("depth=0" ->
    "level=0": tokens before it stay valid), complete again: (prompt ids before, after, the last
    request's stats)."""
    fim = {"prefix": 5, "middle": 6, "suffix": 7}
    line, column = 17, 14

    def ids(text: str) -> list[int]:
        return healed_ids(tokenizer, build_prompt(text, offset_of(text, line, column), tokenizer, max_tokens=256,
                                                  fim_ids=fim).ids)

    await server.inline(uri, line, column)
    server.change(uri, (4, 14), (4, 19), "level")
    await server.inline(uri, line, column)
    return ids(DOC), ids(DOC.replace("depth=0", "level=0", 1)), await server.last_request(uri)


async def test_edit_before_cursor_invalidates_from_there_only(main_server, tiny_lm):
    uri = "file:///edit.py"
    main_server.open(uri, DOC)
    before, after, s = await _complete_rename_complete(main_server, tiny_lm[1], uri)
    lcp = common_prefix_len(before, after)
    assert 10 < lcp < len(after) - 20
    assert s["reusedTokens"] == lcp and s["prefillTokens"] == len(after) - lcp
    assert s["shiftedTokens"] == 0  # cacheShift is off by default
    main_server.close(uri)


async def test_edit_above_the_cursor_shifts_the_cache_when_asked(main_server, tiny_lm):
    """With cacheShift, the same edit re-feeds only the edited span and the prompt's last token: the
    KV of the text between the edit and the cursor is kept, its positions shifted (kvshift.py)."""
    uri = "file:///shift.py"
    main_server.open(uri, DOC)
    main_server.configure({"cacheShift": 8})
    try:
        before, after, s = await _complete_rename_complete(main_server, tiny_lm[1], uri)
        lcp = common_prefix_len(before, after)
        tail = next(n for n in range(len(after)) if before[-1 - n] != after[-1 - n])  # unchanged after the edit
        assert tail > 40
        assert s["shiftedTokens"] == tail - 1 and s["reusedTokens"] == lcp + tail - 1
        assert s["prefillTokens"] == len(after) - lcp - (tail - 1) == s["promptTokens"] - s["reusedTokens"]
    finally:
        main_server.configure({"cacheShift": 0})
        main_server.close(uri)


async def test_did_close_frees_memory(main_server):
    uri = "file:///close.py"
    main_server.open(uri, DOC)
    await main_server.inline(uri, 17, 14)
    cache = (await main_server.stats())["cache"]
    held = [d for d in cache["perDocument"] if d["uri"] == uri]
    assert held and held[0]["bytes"] > 0
    main_server.close(uri)
    after = (await main_server.stats())["cache"]
    assert not [d for d in after["perDocument"] if d["uri"] == uri]
    assert after["bytes"] == cache["bytes"] - held[0]["bytes"]
