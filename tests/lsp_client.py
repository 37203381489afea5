"""The LSP test client the server tests share: a server started over stdio with pytest-lsp, and
what it told the client (statuses, progress, log messages). Well-formed traffic only; raw bytes go
through `Session.raw_notify`/`raw_request`, and hostile traffic through sdsat_lsp/tools/lspclient.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import time

from lsprotocol import types
from pytest_lsp import ClientServerConfig

from sdsat_lsp.healing import heal

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

    async def execute(self, command: str, arguments: list | None):
        """workspace/executeCommand, as a client runs an item's command."""
        return plain(await asyncio.wait_for(self.client.workspace_execute_command_async(
            types.ExecuteCommandParams(command=command, arguments=arguments)), 30))

    async def prefetched(self, timeout: float = 30) -> dict:
        """Stats once no prefetch is queued or under way (the server queues one before it answers)."""
        deadline = time.perf_counter() + timeout
        while (stats := await self.stats(last=0))["prefetch"]["pending"]:
            assert time.perf_counter() < deadline, "the prefetch never ended"
            await asyncio.sleep(0.05)
        return stats

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


def healed_ids(tokenizer, ids: list[int]) -> list[int]:
    healing = heal(tokenizer, ids)
    return healing.ids if healing else ids


def offset_of(text: str, line: int, column: int) -> int:
    return sum(len(x) for x in text.splitlines(keepends=True)[:line]) + column
