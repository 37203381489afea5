"""Completions over LSP on the tiny random model equal the completion core's plain greedy
decoding of the same document (the reference), in every context: mid-line, at a line start, after
a block opener, with a time budget, with sampling, UTF-8 positions and the completion fallback,
lone surrogates, and lines broken only where LSP breaks them."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from lsprotocol import types


from documents import WALK_MODULE as DOC  # tests/documents.py
from lsp_client import BASE_OPTIONS, Session, capabilities, offset_of

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.mark.parametrize("line,column", [(15, 12), (6, 4), (10, 0)])
async def test_completion_equals_engine_greedy(main_server, reference, line, column):
    """Single line mid-statement, a line start inside a block, and an empty line: the server's
    SDSAT (fused) answer equals plain greedy decoding of the same prompt."""
    uri = f"file:///greedy_{line}_{column}.py"
    text = DOC if (line, column) != (10, 0) else DOC.replace("        yield path\n", "        yield path\n\n", 1)
    main_server.open(uri, text)
    prompt, expected, gen = reference(text, offset_of(text, line, column))
    result = await main_server.inline(uri, line, column)
    stats = await main_server.last_request(uri)
    assert stats["promptTokens"] == len(prompt.ids) and stats["fim"] is True and stats["mode"] == "fused"
    if expected is None:
        assert not result.items
    else:
        (item,) = result.items
        assert item.insert_text == expected.text
        assert item.range.start == types.Position(line, column)
        assert item.range.end.character == column + expected.replace_chars
    assert stats["newTokens"] == len(gen.tokens)
    main_server.close(uri)


async def test_load_utf8_and_completion_fallback(tiny_model_dir, reference):
    session = await Session.start({"model": str(tiny_model_dir), **BASE_OPTIONS},
                                  capabilities(inline=False, encodings=["utf-8", "utf-16"], pull=True), wait=False,
                                  configuration={"maxSuffixTokens": 33},
                                  # torch can import in a second from a warm page cache: hold the load
                                  # long enough that the first request surely meets a loading server.
                                  env={"SDSAT_LSP_TEST_LOAD_DELAY_S": "3"})
    try:
        caps = session.init_result.capabilities
        assert caps.position_encoding == types.PositionEncodingKind.Utf8
        assert caps.completion_provider is not None  # no inline completion on this client
        text = 'face = "😋"; name = "é"; total = count\nnext_line = 1\n'
        uri = "file:///utf8.py"
        session.open(uri, text)
        column_cp = text.index("count") + 2  # inside "count", after "co"
        column_utf8 = len(text[:column_cp].encode("utf-8"))
        params = types.CompletionParams(text_document=types.TextDocumentIdentifier(uri=uri),
                                        position=types.Position(0, column_utf8))
        # The model is still loading (torch takes seconds to import): an empty result at once.
        early = await asyncio.wait_for(session.client.text_document_completion_async(params), 10)
        # (The request can also beat the first status: the server pulls the configuration first.)
        assert all(status["state"] == "loading" for status in session.statuses)
        assert not early.items
        await session.wait_state("ready")
        result = await asyncio.wait_for(session.client.text_document_completion_async(params), 60)
        _, expected, _ = reference(text, column_cp)
        if expected is None:
            assert not result.items
        else:
            (item,) = result.items
            # The item replaces the word before the cursor ("co") so the client's filter keeps it.
            assert item.text_edit.new_text == "co" + expected.text
            assert item.text_edit.range.start == types.Position(0, column_utf8 - 2)
            assert item.text_edit.range.end.character == column_utf8 + len(
                text[column_cp: column_cp + expected.replace_chars].encode("utf-8"))
        stats = await session.last_request(uri)
        assert stats["promptTokens"] == len(reference(text, column_cp)[0].ids)
        # Settings pulled with workspace/configuration at start, over the initializationOptions, and
        # again when a pull-model client says only that something changed (settings: null).
        assert (await session.stats())["settings"]["maxSuffixTokens"] == 33
        session.client.set_configuration({"maxSuffixTokens": 44}, section="sdsat")
        session.configure(None)
        deadline = time.perf_counter() + 10
        while (await session.stats())["settings"]["maxSuffixTokens"] != 44:
            assert time.perf_counter() < deadline, "the changed settings were not pulled"
            await asyncio.sleep(0.05)
    finally:
        await session.stop()


async def test_multiline_after_a_block_opener(main_server, reference):
    """An empty line after a block opener asks for the block (multi-line), equal to greedy decoding
    under the same rules; text after the cursor asks for one line."""
    text = DOC.replace("def main(argv):\n", "def main(argv):\n    \n", 1)
    line = text.splitlines().index("def main(argv):") + 1
    uri = "file:///multiline.py"
    main_server.open(uri, text)
    try:
        result = await main_server.inline(uri, line, 4)
        stats = await main_server.last_request(uri)
        assert stats["multiline"] is True
        _, expected, _ = reference(text, offset_of(text, line, 4))
        assert [i.insert_text for i in result.items] == ([expected.text] if expected else [])
        await main_server.inline(uri, 15, 12)  # inside "count += 1"'s line: text after the cursor
        assert (await main_server.last_request(uri))["multiline"] is False
    finally:
        main_server.close(uri)


async def test_time_budget_ends_at_a_newline(main_server):
    uri = "file:///budget.py"
    main_server.open(uri, DOC + "\n")
    main_server.configure({"maxTokens": 400, "lineMode": "multi", "mode": "ar", "timeBudgetMs": 1})
    try:
        await main_server.inline(uri, 19, 0)
        s = await main_server.last_request(uri)
        assert s["finishReason"] in ("budget", "stop") and s["newTokens"] < 400, s
        main_server.configure({"timeBudgetMs": 0})
        await main_server.inline(uri, 19, 0)
        unbounded = await main_server.last_request(uri)
        assert unbounded["finishReason"] != "budget" and unbounded["newTokens"] >= s["newTokens"]
    finally:
        main_server.configure(BASE_OPTIONS | {"lineMode": "auto", "mode": "fused"})
        main_server.close(uri)


async def test_sampling_settings_apply(main_server):
    uri = "file:///sampling.py"
    main_server.open(uri, DOC)
    try:
        greedy = [i.insert_text for i in (await main_server.inline(uri, 15, 12)).items]

        async def sampled(seed):
            main_server.configure({"temperature": 1.5, "seed": seed})
            items = (await main_server.inline(uri, 15, 12)).items
            return [i.insert_text for i in items]

        first = await sampled(7)
        assert await sampled(7) == first  # a fixed seed repeats (even through the KV cache)
        draws = [first] + [await sampled(seed) for seed in (1, 2, 3, 4)]
        assert any(d != greedy for d in draws)
        assert len({tuple(d) for d in draws}) > 1
    finally:
        # Back to greedy: later tests compare with greedy decoding on this same server.
        main_server.configure(BASE_OPTIONS | {"lineMode": "auto", "mode": "fused", "temperature": 0.0, "seed": -1})
        main_server.close(uri)


async def test_lone_surrogates_in_a_document(main_server, reference):
    """JSON can carry a lone surrogate ("\\ud800"); no tokenizer takes one, so every completion in
    such a document failed. It is read as U+FFFD (same offsets)."""
    uri = "file:///surrogate.py"
    text = "label = '\ud800 and \udfff'\ndef f(x):\n    return x + lab"
    main_server.raw_notify("textDocument/didOpen", json.dumps({"textDocument": {
        "uri": uri, "languageId": "python", "version": 1, "text": text}}).encode())
    try:
        result = await main_server.inline(uri, 2, 18)
        _, expected, _ = reference(text.replace("\ud800", "\ufffd").replace("\udfff", "\ufffd"), len(text))
        assert [i.insert_text for i in result.items] == ([expected.text] if expected else [])
        assert (await main_server.last_request(uri))["finishReason"] != "error"
    finally:
        main_server.close(uri)


@pytest.mark.parametrize("breaks", ["formfeed", "cr"])
async def test_lines_break_only_where_lsp_says(main_server, reference, breaks):
    """pygls split lines at form feeds, U+2028, U+0085 (str.splitlines) and the server found the
    cursor line by "\\n" alone: a position after such a character was off by a line. LSP lines end
    at \\n, \\r\\n and \\r only."""
    if breaks == "formfeed":
        text = "import os\x0c\nx = '\u2028\x85'\n\ndef main():\n    return os.getcwd"
        line, column = 4, 14
    else:
        text = "import os\r\rdef main():\r    return os.getcwd"
        line, column = 3, 14
    uri = f"file:///breaks_{breaks}.py"
    main_server.open(uri, text)
    try:
        offset = text.index("getcwd") + 1
        result = await main_server.inline(uri, line, column + 1)
        _, expected, _ = reference(text, offset)
        assert (await main_server.last_request(uri))["promptTokens"] == len(reference(text, offset)[0].ids)
        if expected is None:
            assert not result.items
        else:
            (item,) = result.items
            assert item.insert_text == expected.text and item.range.start == types.Position(line, column + 1)
    finally:
        main_server.close(uri)
