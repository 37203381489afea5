"""The language server over stdio with pytest-lsp, on the tiny random model: capabilities, a
completion equal to the engine's greedy output, KV cache reuse while typing, invalidation from an
edit, cancel-previous and $/cancelRequest, requests during load, didClose, configuration, and bad
input that must never crash or hang the server."""

from __future__ import annotations

import asyncio
import dataclasses
import concurrent.futures
import json
import os
import sys
import time

import pytest
import pytest_asyncio
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pytest_lsp import ClientServerConfig

from sdsat_lsp.decoding import TREE_NODES
from sdsat_lsp.healing import heal
from sdsat_lsp.kvcache import common_prefix_len
from sdsat_lsp.prompt import build_prompt

from documents import WALK_MODULE as DOC  # tests/documents.py

pytestmark = pytest.mark.asyncio(loop_scope="module")

SERVER = [sys.executable, "-m", "sdsat_lsp.cli", "--stdio", "-v"]
READY_TIMEOUT = 120
MAX_TOKENS = 24
BASE_OPTIONS = {"quantize": "none", "threads": 1, "timeBudgetMs": 0, "deadlineMs": 0, "maxPromptTokens": 256, "maxTokens": MAX_TOKENS}


def capabilities(inline: bool = True, encodings: list[str] | None = None, pull: bool = False) -> types.ClientCapabilities:
    """Client capabilities by hand: pytest-lsp's bundled snapshots have no inlineCompletion."""
    return types.ClientCapabilities(
        general=types.GeneralClientCapabilities(position_encodings=encodings) if encodings else None,
        window=types.WindowClientCapabilities(work_done_progress=True),
        workspace=types.WorkspaceClientCapabilities(
            did_change_configuration=types.DidChangeConfigurationClientCapabilities(), configuration=pull or None),
        text_document=types.TextDocumentClientCapabilities(
            synchronization=types.TextDocumentSyncClientCapabilities(),
            completion=types.CompletionClientCapabilities(),
            inline_completion=types.InlineCompletionClientCapabilities() if inline else None,
        ),
    )


def plain(value):
    """pygls hands custom results over as namedtuples: back to dicts and lists."""
    if hasattr(value, "_asdict"):
        return {k: plain(v) for k, v in value._asdict().items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class Session:
    """A started server, its client, and what the server told the client."""

    def __init__(self, client, result):
        self.client = client
        self.init_result = result
        self.statuses: list[dict] = []
        self.versions: dict[str, int] = {}

    @classmethod
    async def start(cls, options: dict, caps: types.ClientCapabilities, wait: bool = True,
                    configuration: dict | None = None, env: dict | None = None) -> Session:
        """`configuration`: the "sdsat" section this client serves to workspace/configuration;
        `env`: added to the server's environment."""
        client = await ClientServerConfig(server_command=SERVER, server_env={**os.environ, **(env or {})}).start()
        statuses: list[dict] = []
        if configuration is not None:
            client.set_configuration(configuration, section="sdsat")

        @client.feature("sdsat/status")
        def on_status(params):
            statuses.append(plain(params))

        started = time.perf_counter()
        result = await client.initialize_session(
            types.InitializeParams(capabilities=caps, initialization_options=options))
        session = cls(client, result)
        session.initialize_s = time.perf_counter() - started
        session.statuses = statuses
        if wait:
            await session.wait_state("ready")
        return session

    async def wait_state(self, state: str, timeout: float = READY_TIMEOUT) -> dict:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.statuses and self.statuses[-1]["state"] == state:
                return self.statuses[-1]
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {state!r} status within {timeout} s: {self.statuses}")

    def open(self, uri: str, text: str) -> None:
        self.versions[uri] = 1
        self.client.text_document_did_open(types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))

    def change(self, uri: str, start: tuple[int, int], end: tuple[int, int], text: str) -> None:
        self.versions[uri] = self.versions.get(uri, 1) + 1
        self.client.text_document_did_change(types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=self.versions[uri]),
            content_changes=[types.TextDocumentContentChangePartial(
                range=types.Range(start=types.Position(*start), end=types.Position(*end)), text=text)]))

    def close(self, uri: str) -> None:
        self.client.text_document_did_close(types.DidCloseTextDocumentParams(
            text_document=types.TextDocumentIdentifier(uri=uri)))

    def configure(self, settings) -> None:
        self.client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=settings))

    def inline_params(self, uri: str, line: int, character: int) -> types.InlineCompletionParams:
        return types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line, character),
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic))

    async def inline(self, uri: str, line: int, character: int, timeout: float = 60):
        return await asyncio.wait_for(
            self.client.text_document_inline_completion_async(self.inline_params(uri, line, character)), timeout)

    async def stats(self, **params) -> dict:
        return plain(await asyncio.wait_for(self.client.protocol.send_request_async("sdsat/stats", params), 30))

    async def last_request(self, uri: str) -> dict:
        return (await self.stats(uri=uri, last=1))["requests"][-1]

    def raw_notify(self, method: str, params: bytes) -> None:
        """Write a message as raw bytes, past the client's type checks and JSON encoder."""
        body = b'{"jsonrpc": "2.0", "method": "%s", "params": %s}' % (method.encode(), params)
        self.client._server.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def raw_request(self, msg_id: str, method: str, params: bytes):
        """Like raw_notify, for a request: returns an awaitable of its response."""
        future = concurrent.futures.Future()
        self.client.protocol._request_futures[msg_id] = future  # pygls matches the response by id
        body = b'{"jsonrpc": "2.0", "id": "%s", "method": "%s", "params": %s}' % (msg_id.encode(), method.encode(), params)
        self.client._server.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return asyncio.wrap_future(future)

    async def stop(self) -> None:
        await asyncio.wait_for(self.client.shutdown_session(), 30)
        await self.client.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def main_server(tiny_model_dir):
    session = await Session.start({"model": str(tiny_model_dir), **BASE_OPTIONS}, capabilities())
    yield session
    await session.stop()


@pytest.fixture(scope="module")
def reference(tiny_lm, tiny_model_dir):
    """What the server should answer: the completion core (the server's own pipeline) decoding with
    plain greedy decoding (AR, not SDSAT) by the in-process copy of the same model; returns (the
    prompt the model was given, the completion, the generation)."""
    from types import SimpleNamespace

    import torch

    from sdsat_lsp.completion import complete as complete_at
    from sdsat_lsp.modelcard import read_model_card
    from sdsat_lsp.settings import Settings, parse_settings

    model, tokenizer, _ = tiny_lm
    loaded = SimpleNamespace(model=model, tokenizer=tokenizer, card=read_model_card(tiny_model_dir))
    base, problems = parse_settings(BASE_OPTIONS, Settings())
    assert not problems

    def complete(text: str, offset: int, max_tokens: int = MAX_TOKENS, line_mode: str = "auto"):
        settings = dataclasses.replace(base, max_tokens=max_tokens, line_mode=line_mode)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = complete_at(loaded, settings, text, offset, mode="ar")
        finally:
            torch.set_num_threads(threads)
        return result.model_prompt, result.completion, result.generation

    return complete


def healed_ids(tokenizer, ids: list[int]) -> list[int]:
    healing = heal(tokenizer, ids)
    return healing.ids if healing else ids


def offset_of(text: str, line: int, column: int) -> int:
    return sum(len(x) for x in text.splitlines(keepends=True)[:line]) + column


# ---- protocol ---------------------------------------------------------------------------------


async def test_capabilities_advertised(main_server):
    caps = main_server.init_result.capabilities
    assert caps.inline_completion_provider is not None
    assert caps.completion_provider is None  # the fallback is only for clients without inline completion
    sync = caps.text_document_sync
    assert sync.change == types.TextDocumentSyncKind.Incremental and sync.open_close
    assert caps.position_encoding == types.PositionEncodingKind.Utf16
    startup = (await main_server.stats())["startup"]
    # initialize is answered before torch is imported (that happens after `initialized`).
    assert startup["torchImported"] is False and startup["initializeMs"] < 1000
    states = [s["state"] for s in main_server.statuses]
    assert states[0] == "loading" and states[-1] == "ready"
    progress = [p for reports in main_server.client.progress_reports.values() for p in reports]
    assert isinstance(progress[0], types.WorkDoneProgressBegin) and isinstance(progress[-1], types.WorkDoneProgressEnd)
    assert any("ready" in m.message for m in main_server.client.log_messages)


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


# ---- the KV cache -----------------------------------------------------------------------------


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


async def test_edit_before_cursor_invalidates_from_there_only(main_server, tiny_lm):
    tokenizer = tiny_lm[1]
    fim = {"prefix": 5, "middle": 6, "suffix": 7}
    uri = "file:///edit.py"
    main_server.open(uri, DOC)
    line, column = 17, 14  # in "print(count)", before ")"
    await main_server.inline(uri, line, column)
    before = healed_ids(tokenizer, build_prompt(DOC, offset_of(DOC, line, column), tokenizer, max_tokens=256, fim_ids=fim).ids)
    # Rename the parameter on line 4 ("depth=0" -> "level=0"): tokens before it are still valid.
    main_server.change(uri, (4, 14), (4, 19), "level")
    edited = DOC.replace("depth=0", "level=0", 1)
    await main_server.inline(uri, line, column)
    after = healed_ids(tokenizer, build_prompt(edited, offset_of(edited, line, column), tokenizer, max_tokens=256, fim_ids=fim).ids)
    s = await main_server.last_request(uri)
    lcp = common_prefix_len(before, after)
    assert 10 < lcp < len(after) - 20
    assert s["reusedTokens"] == lcp and s["prefillTokens"] == len(after) - lcp
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


# ---- scheduling -------------------------------------------------------------------------------

LONG = {"maxTokens": 600, "lineMode": "multi", "mode": "ar"}


async def test_cancel_previous(main_server):
    uri = "file:///previous.py"
    main_server.open(uri, DOC + "\n")
    main_server.configure(LONG)
    try:
        older = asyncio.ensure_future(
            main_server.client.text_document_inline_completion_async(main_server.inline_params(uri, 19, 0)))
        await asyncio.sleep(0.4)  # the older one is decoding now
        main_server.configure({"maxTokens": 8})
        newer = main_server.client.text_document_inline_completion_async(main_server.inline_params(uri, 19, 0))
        old_result, new_result = await asyncio.wait_for(asyncio.gather(older, newer), 60)
        assert not old_result.items and new_result.items
        old_stats, new_stats = (await main_server.stats(uri=uri))["requests"][-2:]
        # The older request stopped between two forward passes, well before its 600 tokens.
        assert old_stats["finishReason"] == "cancelled" and 0 < old_stats["newTokens"] < 600
        assert new_stats["finishReason"] != "cancelled"
    finally:
        main_server.configure(BASE_OPTIONS | {"lineMode": "auto", "mode": "fused"})
        main_server.close(uri)


async def test_cancel_request_stops_decoding(main_server):
    uri = "file:///cancel.py"
    main_server.open(uri, DOC + "\n")
    main_server.configure(LONG)
    try:
        future = asyncio.ensure_future(main_server.client.protocol.send_request_async(
            types.TEXT_DOCUMENT_INLINE_COMPLETION, main_server.inline_params(uri, 19, 0), msg_id="cancel-me"))
        await asyncio.sleep(0.5)
        main_server.client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="cancel-me"))
        with pytest.raises(JsonRpcException) as info:
            await asyncio.wait_for(future, 30)
        assert info.value.code == -32800  # RequestCancelled
        # The worker stopped between forward passes, long before 600 tokens.
        for _ in range(100):
            reqs = (await main_server.stats(uri=uri))["requests"]
            if reqs:
                break
            await asyncio.sleep(0.05)
        assert reqs[-1]["finishReason"] == "cancelled" and reqs[-1]["newTokens"] < 600
        # And the server goes on serving.
        main_server.configure(BASE_OPTIONS | {"lineMode": "auto", "mode": "fused"})
        await main_server.inline(uri, 17, 14)
        assert (await main_server.last_request(uri))["finishReason"] != "cancelled"
    finally:
        main_server.configure(BASE_OPTIONS | {"lineMode": "auto", "mode": "fused"})
        main_server.close(uri)


# ---- settings ---------------------------------------------------------------------------------


async def test_configuration_changes_apply(main_server):
    uri = "file:///config.py"
    main_server.open(uri, DOC)
    try:
        main_server.configure({"sdsat": {"maxTokens": 3, "mode": "ar"}})
        await main_server.inline(uri, 15, 12)
        s = await main_server.last_request(uri)
        assert s["newTokens"] <= 3 and s["mode"] == "ar" and s["draftsVerified"] == 0
        # Wrong types: a warning, the defaults for those values, and the server keeps serving.
        shown = len(main_server.client.messages)
        main_server.configure({"maxTokens": "many", "temperature": "hot", "lineMode": 7, "kvCache": "yes",
                               "nonsense": 1, "mode": "fused", "draftLength": "huge", "lookupNgram": -1,
                               "treeNodes": 65})
        await main_server.inline(uri, 15, 12)
        settings = (await main_server.stats())["settings"]
        assert settings["maxTokens"] == 64 and settings["temperature"] == 0.0 and settings["lineMode"] == "auto"
        assert settings["mode"] == "fused" and settings["kvCache"] is True
        assert settings["draftLength"] == "adaptive" and settings["lookupNgram"] == 3 and settings["treeNodes"] == TREE_NODES
        warning = main_server.client.messages[shown].message
        assert "maxTokens" in warning and "temperature" in warning and "nonsense" in warning
        assert "draftLength" in warning and "lookupNgram" in warning and "treeNodes" in warning
        main_server.configure({"lookupNgram": 0, "draftLength": "fixed", "treeNodes": 0})
        await main_server.inline(uri, 15, 12)
        s = await main_server.last_request(uri)
        assert s["lookupAccepted"] == 0
        assert (await main_server.stats())["settings"]["draftLength"] == "fixed"
        assert (await main_server.stats())["settings"]["treeNodes"] == 0
        main_server.configure(["not", "an", "object"])
        main_server.configure(None)
        await main_server.inline(uri, 15, 12)
        # Turning the cache off: nothing reused.
        main_server.configure({"kvCache": False})
        await main_server.inline(uri, 15, 12)
        await main_server.inline(uri, 15, 12)
        s = await main_server.last_request(uri)
        assert s["reusedTokens"] == 0 and (await main_server.stats())["cache"]["bytes"] == 0
    finally:
        main_server.configure(BASE_OPTIONS | {"kvCache": True, "mode": "fused", "lookupNgram": 3, "draftLength": "adaptive"})
        main_server.close(uri)


async def test_model_error_then_recovery(main_server, tiny_model_dir):
    uri = "file:///model.py"
    main_server.open(uri, DOC)
    try:
        main_server.configure({"model": "/no/such/model/folder"})
        status = await main_server.wait_state("error", 60)
        assert "does not exist" in status["message"]
        assert not (await main_server.inline(uri, 15, 12)).items
        main_server.configure({"model": str(tiny_model_dir)})
        await main_server.wait_state("ready", 60)
        await main_server.inline(uri, 15, 12)
        assert (await main_server.last_request(uri))["finishReason"] in ("length", "stop", "eos")
    finally:
        main_server.close(uri)


# ---- bad input --------------------------------------------------------------------------------


async def test_bad_input_never_crashes_or_hangs(main_server):
    s = main_server
    # Unknown document: an empty result, not an error.
    assert not (await s.inline("file:///never/opened.py", 0, 0)).items
    uri = "file:///bad.py"
    s.open(uri, DOC)
    # A position past the end of the document, and past the end of a line.
    await s.inline(uri, 10_000, 10_000)
    await s.inline(uri, 3, 500)
    # Edits with invalid ranges: past the end, reversed, beyond a line's end; for unknown documents.
    s.change(uri, (9_999, 0), (10_000, 5), "x")
    s.change(uri, (5, 10), (2, 0), "reversed")
    s.change(uri, (1, 900), (1, 1000), "y")
    s.change("file:///not/open.py", (0, 0), (0, 0), "z")
    await s.inline(uri, 5, 0)
    # Params that do not fit the protocol's types: a JSON-RPC error, not silence.
    with pytest.raises(JsonRpcException) as info:
        await asyncio.wait_for(s.raw_request("bad-params", types.TEXT_DOCUMENT_INLINE_COMPLETION,
                                             b'{"textDocument": {"uri": 5}, "position": "here"}'), 10)
    assert info.value.code == -32602  # InvalidParams
    # A body that is not JSON: the JSON-RPC parse error (id null), and the connection goes on.
    parse_error = concurrent.futures.Future()
    s.client.protocol._request_futures[None] = parse_error  # pygls matches responses by id
    s.client._server.stdin.write(b"Content-Length: 9\r\n\r\nnot json{")
    with pytest.raises(JsonRpcException) as info:
        await asyncio.wait_for(asyncio.wrap_future(parse_error), 10)
    assert info.value.code == -32700
    # Custom request with garbage params.
    assert (await s.stats(last="many", uri=7))["state"] == "ready"
    # A 5 MB document: opened, completed at its end and in its middle, changed, closed.
    big_uri = "file:///big.py"
    big = DOC * (5_000_000 // len(DOC) + 1)
    lines = big.count("\n")
    started = time.perf_counter()
    s.open(big_uri, big)
    await s.inline(big_uri, lines, 0)
    await s.inline(big_uri, lines // 2, 8)
    s.change(big_uri, (lines // 2, 0), (lines // 2, 0), "# edit\n")
    await s.inline(big_uri, lines // 2 + 1, 0)
    assert time.perf_counter() - started < 60
    big_stats = await s.last_request(big_uri)
    assert big_stats["promptTokens"] <= 256
    s.close(big_uri)
    # Invalid UTF-8 on the wire (written raw): the message is read with replacement characters.
    params = json.dumps({"textDocument": {"uri": "file:///latin1.py", "languageId": "python", "version": 1,
                                          "text": "x = 'PLACEHOLDER'\n"}})
    s.raw_notify("textDocument/didOpen", params.encode().replace(b"PLACEHOLDER", b"caf\xe9 \xff"))
    await s.inline("file:///latin1.py", 1, 0)
    opened = (await s.stats(uri="file:///latin1.py"))["requests"]
    assert opened and opened[-1]["promptTokens"] > 0  # the document was opened, not dropped
    # Still alive and answering.
    await s.inline(uri, 0, 0)
    assert s.client.error is None
    s.close(uri)


# ---- a second server: requests during load, UTF-8 positions, the completion fallback ----------


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
        assert session.statuses and session.statuses[-1]["state"] == "loading"
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


async def test_editor_session_replay_rebuilds_the_file():
    """The bench's typing session, applied to a buffer, yields the file plus its inserted edits,
    with every request inside the buffer."""
    import sysconfig
    from pathlib import Path

    from sdsat_lsp.tools.session_bench import session_steps

    text = (Path(sysconfig.get_paths()["stdlib"]) / "bisect.py").read_text()
    doc: list[str] = []
    requests = edits = 0
    for kind, payload in session_steps(text):
        if kind == "open":
            doc = payload.splitlines(keepends=True)
        elif kind == "type":
            row, col, chunk = payload
            while len(doc) <= row:
                doc.append("")
            line = doc[row]
            assert col <= len(line.rstrip("\n"))
            new = line[:col] + chunk + line[col:]
            doc[row: row + 1] = new.splitlines(keepends=True) or [""]
            edits += chunk.strip() == "# edited while typing"
        else:
            row, col = payload
            assert row <= len(doc) and col <= len(doc[row].rstrip("\n") if row < len(doc) else "")
            requests += 1
    assert "".join(line for line in doc if line.strip() != "# edited while typing") == text
    assert requests > text.count("\n") and edits >= 1


# ---- policies end to end: multi-line, time budget, sampling -----------------------------------


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


# ---- TCP --------------------------------------------------------------------------------------


def _frame(message: dict) -> bytes:
    body = json.dumps(message).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def _read_message(sock) -> dict:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "connection closed"
        data += chunk
    header, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line for line in header.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[1])
    while len(body) < length:
        body += sock.recv(4096)
    return json.loads(body[:length])


async def test_tcp_transport():
    """`sdsat-lsp --tcp HOST:PORT` serves the same protocol over a socket to the client that sends
    the token, and exits on exit."""
    await asyncio.to_thread(_tcp_round_trip)


TCP_TOKEN = "s3cret-token-for-the-test"


def _tcp_server(*extra: str):
    """A `--tcp` server on a free loopback port (token from the environment); (process, port)."""
    import socket
    import subprocess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sdsat_lsp.cli", "--tcp", f"127.0.0.1:{port}", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, SDSAT_LSP_TCP_TOKEN=TCP_TOKEN))
    return proc, port


def _tcp_connect(port: int):
    import socket

    deadline = time.perf_counter() + 30
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=30)
        except OSError:
            assert time.perf_counter() < deadline, "the TCP server did not start listening"
            time.sleep(0.1)


def _tcp_initialize(sock, msg_id, token) -> dict:
    options = {} if token is None else {"token": token}
    sock.sendall(_frame({"jsonrpc": "2.0", "id": msg_id, "method": "initialize",
                         "params": {"processId": None, "rootUri": None, "capabilities": {},
                                    "initializationOptions": options}}))
    return _read_message(sock)


def _ended(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _tcp_round_trip():
    proc, port = _tcp_server()
    try:
        with _tcp_connect(port) as sock:
            reply = _tcp_initialize(sock, 1, TCP_TOKEN)
            assert reply["id"] == 1 and "inlineCompletionProvider" in reply["result"]["capabilities"]
            sock.sendall(_frame({"jsonrpc": "2.0", "id": 2, "method": "shutdown"}))
            while _read_message(sock).get("id") != 2:
                pass
            sock.sendall(_frame({"jsonrpc": "2.0", "method": "exit"}))
        assert proc.wait(timeout=30) == 0
    finally:
        _ended(proc)


async def test_tcp_serves_only_the_client_with_the_token():
    await asyncio.to_thread(_tcp_gatekeeping)


def _tcp_gatekeeping():
    """Any local process can open a loopback port: before an initialize with the token every
    request is refused (-32002), a wrong token is refused and the connection closed, and the
    server still waits for the real client; while that one is connected a second connection is
    closed at once and receives nothing of the first one's traffic."""
    proc, port = _tcp_server()
    try:
        with _tcp_connect(port) as intruder:
            intruder.sendall(_frame({"jsonrpc": "2.0", "id": 1, "method": "sdsat/stats", "params": {}}))
            reply = _read_message(intruder)
            assert reply["id"] == 1 and reply["error"]["code"] == -32002, reply
            reply = _tcp_initialize(intruder, 2, "guessed")
            assert reply["id"] == 2 and reply["error"]["code"] == -32600 and "token" in reply["error"]["message"]
            assert intruder.recv(4096) == b""  # closed by the server
        with _tcp_connect(port) as sock:
            reply = _tcp_initialize(sock, 3, TCP_TOKEN)
            assert "inlineCompletionProvider" in reply["result"]["capabilities"], reply
            with _tcp_connect(port) as second:
                second.settimeout(10)
                assert second.recv(4096) == b""
            sock.sendall(_frame({"jsonrpc": "2.0", "id": 4, "method": "sdsat/stats", "params": {}}))
            while (reply := _read_message(sock)).get("id") != 4:
                pass
            assert "result" in reply, reply
            sock.sendall(_frame({"jsonrpc": "2.0", "id": 5, "method": "shutdown"}))
            while _read_message(sock).get("id") != 5:
                pass
            sock.sendall(_frame({"jsonrpc": "2.0", "method": "exit"}))
        assert proc.wait(timeout=30) == 0
    finally:
        _ended(proc)


async def test_tcp_refuses_an_address_beyond_loopback():
    import subprocess

    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "sdsat_lsp.cli", "--tcp", "0.0.0.0:2087"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "loopback only" in done.stderr, done.stderr


# ---- what the stress storm found (sdsat-lsp stress): each a regression test --------------------


def _stats_request(msg_id: str) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": "sdsat/stats", "params": {"last": 0}}).encode()


def _expect(session, msg_id):
    future = concurrent.futures.Future()
    session.client.protocol._request_futures[msg_id] = future  # pygls matches the response by id
    return asyncio.wait_for(asyncio.wrap_future(future), 15)


@pytest.mark.parametrize("variant", ["short-length", "lowercase", "lf-only", "junk", "no-length", "huge-length"])
async def test_a_broken_frame_does_not_lose_the_messages_after_it(main_server, variant):
    """pygls wants exactly `Content-Length: N\\r\\n` at a line start: after one broken frame it never
    found a header again and every later request went unanswered; a huge length crashed it
    (MemoryError). Now the stream is back in step at the next header."""
    s = main_server
    body = _stats_request(f"broken-{variant}")
    broken = {
        "short-length": b"Content-Length: %d\r\n\r\n" % (len(body) - 7) + body,  # leaves '"last": 0}}' behind
        "lowercase": b"content-length: %d\r\n\r\n" % len(body) + body,  # HTTP-style headers ignore case
        "lf-only": b"Content-Length: %d\n\n" % len(body) + body,
        "junk": b"\x00\xff garbage without a newline ",
        "no-length": b"Content-Type: application/vscode-jsonrpc\r\n\r\n" + body,
        "huge-length": b"Content-Length: 1000000000000\r\n\r\n" + body,
    }[variant]
    parse_error = concurrent.futures.Future()
    s.client.protocol._request_futures[None] = parse_error
    if variant in ("lowercase", "lf-only"):
        answered = _expect(s, f"broken-{variant}")  # a valid frame after all: answered
    s.client._server.stdin.write(broken)
    after = f"after-{variant}"
    reply = _expect(s, after)
    s.client._server.stdin.write(b"Content-Length: %d\r\n\r\n" % len(_stats_request(after)) + _stats_request(after))
    assert plain(await reply)["state"] == "ready"
    if variant in ("lowercase", "lf-only"):
        assert plain(await answered)["state"] == "ready"
    if variant in ("short-length", "huge-length"):
        with pytest.raises(JsonRpcException) as info:
            await asyncio.wait_for(asyncio.wrap_future(parse_error), 10)
        assert info.value.code == -32700
    s.client.protocol._request_futures.pop(None, None)
    assert s.client.error is None


@pytest.mark.parametrize("body, msg_id", [
    (b'{"id": "no-version", "method": "sdsat/stats", "params": {}}', "no-version"),
    (b'{"jsonrpc": "1.0", "id": "old-version", "method": "sdsat/stats", "params": {}}', "old-version"),
    (b'{"jsonrpc": "2.0", "id": "number-method", "method": 5, "params": {}}', "number-method"),
    (b"[1, 2, 3]", None),
    (b"42", None),
])
async def test_requests_pygls_would_drop_get_invalid_request(main_server, body, msg_id):
    """A message without "jsonrpc", of another version, or not an object: pygls logged it and never
    answered; a method that is not a string was an internal error. Now: InvalidRequest, with the
    request's id when it has one."""
    future = concurrent.futures.Future()
    main_server.client.protocol._request_futures[msg_id] = future
    main_server.client._server.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
    with pytest.raises(JsonRpcException) as info:
        await asyncio.wait_for(asyncio.wrap_future(future), 15)
    assert info.value.code == -32600
    main_server.client.protocol._request_futures.pop(msg_id, None)
    assert (await main_server.stats())["state"] == "ready"


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


async def test_draft_store_builds_beside_the_worker_and_never_changes_answers(tiny_model_dir, reference, tmp_path):
    """A folder as the draft store: built in the background, its drafts verified like any others
    (answers equal plain greedy decoding); turned off, or pointed at nothing, the server goes on."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "walk.py").write_text(DOC)
    session = await Session.start({"model": str(tiny_model_dir), **BASE_OPTIONS, "draftStore": str(folder)}, capabilities(),
                                  env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    uri = "file:///store.py"

    async def store_state(state: str) -> dict:
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline:
            info = (await session.stats())["draftStore"]
            if info["state"] == state:
                return info
            await asyncio.sleep(0.1)
        raise AssertionError(f"draft store never {state!r}: {info}")

    try:
        info = await store_state("ready")
        assert info["source"] == str(folder) and info["tokens"] > 50
        assert list((tmp_path / "cache" / "sdsat-lsp" / "draftstores").glob("*.npz"))  # cached for the next start
        session.open(uri, DOC)
        store_passes = 0
        for line, column in ((15, 12), (6, 4), (3, 0)):
            _, expected, _ = reference(DOC, offset_of(DOC, line, column))
            result = await session.inline(uri, line, column)
            assert [item.insert_text for item in result.items] == ([expected.text] if expected else [])
            store_passes += (await session.last_request(uri))["storePasses"]
        assert store_passes > 0
        session.configure({"draftStore": "off"})
        assert (await store_state("off")) == {"state": "off"}
        await session.inline(uri, 15, 12)
        assert (await session.last_request(uri))["storePasses"] == 0
        shown = len(session.client.messages)
        session.configure({"draftStore": str(tmp_path / "no-such-folder")})
        assert "no such folder" in (await store_state("error"))["message"]
        assert "no such folder" in session.client.messages[shown].message
        _, expected, _ = reference(DOC, offset_of(DOC, 15, 12))
        assert [item.insert_text for item in (await session.inline(uri, 15, 12)).items] == [expected.text]
    finally:
        await session.stop()
