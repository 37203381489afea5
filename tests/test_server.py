"""The server's protocol over stdio with pytest-lsp, on the tiny random model: capabilities, bad
input that must never crash or hang the server, the TCP transport, and what the stress storm found
(broken frames, requests pygls would drop). Completions, the KV cache, cancellation and settings
have their own files; all share tests/lsp_client.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import sys
import time

import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcException

from documents import WALK_MODULE as DOC  # tests/documents.py
from lsp_client import plain

pytestmark = pytest.mark.asyncio(loop_scope="module")


# ---- protocol -------------------------------------------------------------------------------


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


# ---- TCP ------------------------------------------------------------------------------------


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


def _tcp_shutdown(sock, msg_id) -> None:
    """`shutdown`, its reply awaited (past any notifications), then `exit`."""
    sock.sendall(_frame({"jsonrpc": "2.0", "id": msg_id, "method": "shutdown"}))
    while _read_message(sock).get("id") != msg_id:
        pass
    sock.sendall(_frame({"jsonrpc": "2.0", "method": "exit"}))


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
            _tcp_shutdown(sock, 2)
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
            _tcp_shutdown(sock, 5)
        assert proc.wait(timeout=30) == 0
    finally:
        _ended(proc)


async def test_tcp_refuses_an_address_beyond_loopback():
    import subprocess

    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "sdsat_lsp.cli", "--tcp", "0.0.0.0:2087"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "loopback only" in done.stderr, done.stderr


# ---- what the stress storm found (sdsat-lsp stress): each a regression test -----------------


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
