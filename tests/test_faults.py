"""Faults, over stdio on the tiny random model: the model raising in the middle of a decode (the
request gets a JSON-RPC error, the next one works), the KV budget running out, the client
disappearing (the server exits at once on stdin EOF, leaving no process behind), and shutdown/exit
in the middle of a decode or of the model's loading.

The servers are driven with the stress tool's raw JSON-RPC connection, which can also close the
pipe under the server."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import psutil
import pytest

from sdsat_lsp.tools.lspclient import Connection, Mirror, Tally, wait_state
from sdsat_lsp.tools.stress import reference_completion

from documents import WALK_MODULE as DOC  # tests/documents.py

pytestmark = pytest.mark.asyncio(loop_scope="module")

SERVER = [sys.executable, "-m", "sdsat_lsp.cli", "--stdio", "-v"]
OPTIONS = {"quantize": "none", "threads": 1, "timeBudgetMs": 0, "deadlineMs": 0, "maxPromptTokens": 256, "maxTokens": 12}
LONG = {"maxTokens": 4096, "lineMode": "multi", "mode": "ar"}  # decodes until the context is full: seconds
CAPS = {"window": {"workDoneProgress": True}, "workspace": {"didChangeConfiguration": {}},
        "textDocument": {"synchronization": {}, "inlineCompletion": {}}}


async def start(options: dict, env: dict | None = None, wait: bool = True) -> Connection:
    conn = Connection(SERVER, Tally(), env={**os.environ, **(env or {})})
    await conn.start()
    init = await conn.request("initialize", {"processId": os.getpid(), "rootUri": None, "capabilities": CAPS,
                                             "initializationOptions": options}, want=True)
    await asyncio.wait_for(init, 60)
    await conn.notify("initialized", {})
    if wait:
        assert await wait_state(conn, ("ready",), 600) == "ready", conn.stderr_tail()
    return conn


async def ask(conn: Connection, method: str, params, timeout: float = 120) -> dict:
    return await asyncio.wait_for(await conn.request(method, params, want=True), timeout)


async def open_doc(conn: Connection, uri: str, text: str) -> Mirror:
    await conn.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                                "text": text}})
    return Mirror(uri, text)


async def inline(conn: Connection, mirror: Mirror, offset: int, timeout: float = 120) -> dict:
    return await ask(conn, "textDocument/inlineCompletion", inline_params(mirror, offset), timeout)


def inline_params(mirror: Mirror, offset: int) -> dict:
    return {"textDocument": {"uri": mirror.uri}, "position": mirror.position(offset), "context": {"triggerKind": 2}}


def texts(reply: dict) -> list[str]:
    assert "error" not in reply, reply
    return [item["insertText"] for item in reply["result"]["items"]]


async def last_request(conn: Connection, uri: str) -> dict:
    return (await ask(conn, "sdsat/stats", {"uri": uri, "last": 1}))["result"]["requests"][-1]


async def stop(conn: Connection) -> int | None:
    if conn.alive:
        await conn.request("shutdown", None)
        await conn.notify("exit")
    try:
        return await asyncio.wait_for(conn.proc.wait(), 30)
    except asyncio.TimeoutError:
        conn.proc.kill()
        return None


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """(text, offset, options) -> the items a fresh greedy request must get, from the same model
    folder loaded here and the server's own prompt code."""
    import torch

    from sdsat_lsp.model import load_model
    from sdsat_lsp.settings import Settings, parse_settings

    loaded = load_model(tiny_model_dir, quantize="none")

    def complete(text: str, offset: int, options: dict) -> list[str]:
        settings, problems = parse_settings(options, Settings())
        assert not problems
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return reference_completion(loaded, settings, text, offset)[0]
        finally:
            torch.set_num_threads(threads)

    return complete


def children_of(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


async def exits_within(conn: Connection, seconds: float) -> tuple[int | None, float]:
    started = time.perf_counter()
    try:
        rc = await asyncio.wait_for(conn.proc.wait(), seconds)
    except asyncio.TimeoutError:
        conn.proc.kill()
        await conn.proc.wait()
        rc = None
    return rc, time.perf_counter() - started


# ---- the model raising mid-decode ------------------------------------------------------------


async def test_model_raising_mid_decode_gets_an_error_and_the_next_request_works(tiny_model_dir, reference):
    options = {"model": str(tiny_model_dir), **OPTIONS}
    # Pass 1 of the first request is its prefill; pass 2 is the first decoding pass.
    conn = await start(options, env={"SDSAT_LSP_TEST_FAIL_PASS": "2"})
    try:
        mirror = await open_doc(conn, "file:///fault.py", DOC)
        cursor = DOC.index("count += 1") + len("count")
        expected = reference(DOC, cursor, options)
        assert expected and len(expected[0]) > 1  # more than one token: the failure is mid-decode
        failed = await inline(conn, mirror, cursor)
        assert failed["error"]["code"] == -32603 and "injected fault" in failed["error"]["message"]
        stats = await last_request(conn, mirror.uri)
        assert stats["finishReason"] == "error"
        again = await inline(conn, mirror, cursor)
        assert texts(again) == expected
        stats = await last_request(conn, mirror.uri)
        assert stats["reusedTokens"] == 0  # the failed request's cache was discarded, not reused half-filled
        assert texts(await inline(conn, mirror, cursor)) == expected
        assert (await last_request(conn, mirror.uri))["reusedTokens"] > 0
    finally:
        assert await stop(conn) == 0


# ---- the KV budget running out ---------------------------------------------------------------


async def test_kv_budget_running_out(tiny_model_dir, reference):
    options = {"model": str(tiny_model_dir), **OPTIONS, "cacheBudgetMb": 0}
    conn = await start(options)
    try:
        docs = []
        for i in range(24):
            text = DOC.replace("walk", f"walk_{i}") * 2
            docs.append((await open_doc(conn, f"file:///budget_{i}.py", text), text))
        # No budget at all: nothing is kept, every answer is still right.
        for mirror, text in docs[:3]:
            cursor = text.index("count += 1") + 5
            assert texts(await inline(conn, mirror, cursor)) == reference(text, cursor, options)
        cache = (await ask(conn, "sdsat/stats", {"last": 0}))["result"]["cache"]
        assert cache["bytes"] == 0 and cache["documents"] == 0
        # One MiB: about eight of these documents. LRU eviction keeps the total under it.
        await conn.notify("workspace/didChangeConfiguration", {"settings": {**options, "cacheBudgetMb": 1}})
        for mirror, text in docs:
            await inline(conn, mirror, len(text))
            cache = (await ask(conn, "sdsat/stats", {"last": 0}))["result"]["cache"]
            assert cache["bytes"] <= cache["budgetBytes"] == 2**20
        assert cache["evictions"] > 0 and 0 < cache["documents"] < len(docs)
        mirror, text = docs[0]  # evicted long ago: recomputed, and right
        cursor = text.index("count += 1") + 5
        assert texts(await inline(conn, mirror, cursor)) == reference(text, cursor, {**options, "cacheBudgetMb": 1})
        assert (await last_request(conn, mirror.uri))["reusedTokens"] == 0
    finally:
        assert await stop(conn) == 0


# ---- the client disappearing; shutdown and exit at awkward moments ----------------------------


async def test_client_gone_mid_decode_server_exits_at_once(tiny_model_dir):
    conn = await start({"model": str(tiny_model_dir), **OPTIONS, **LONG})
    mirror = await open_doc(conn, "file:///gone.py", DOC + "\n")
    pending = await conn.request("textDocument/inlineCompletion", inline_params(mirror, len(mirror.text)), want=True)
    await asyncio.sleep(0.5)
    assert not pending.done()  # still decoding
    children = children_of(conn.proc.pid)
    conn.proc.stdin.close()  # the editor is gone: end of input
    rc, took = await exits_within(conn, 10)
    assert rc == 0 and took < 5, conn.stderr_tail()
    assert not [pid for pid in children if psutil.pid_exists(pid)]  # nothing left behind


async def test_client_gone_while_loading_server_exits_at_once(tiny_model_dir):
    conn = await start({"model": str(tiny_model_dir), **OPTIONS}, wait=False)
    await asyncio.sleep(0.3)
    assert not conn.statuses or conn.statuses[-1]["state"] == "loading"  # importing torch: seconds
    conn.proc.stdin.close()
    rc, took = await exits_within(conn, 10)
    assert rc == 0 and took < 3, conn.stderr_tail()


async def test_shutdown_and_exit_mid_decode(tiny_model_dir):
    conn = await start({"model": str(tiny_model_dir), **OPTIONS, **LONG})
    mirror = await open_doc(conn, "file:///shutdown.py", DOC + "\n")
    pending = await conn.request("textDocument/inlineCompletion", inline_params(mirror, len(mirror.text)), want=True)
    await asyncio.sleep(0.5)
    assert not pending.done()
    shutdown = await ask(conn, "shutdown", None, timeout=10)
    assert shutdown.get("result") is None and "error" not in shutdown
    answer = await asyncio.wait_for(pending, 10)  # answered: the decode was stopped or cancelled
    assert "result" in answer or answer["error"]["code"] == -32800
    # After shutdown a request gets InvalidRequest (the spec), not silence.
    late = await ask(conn, "sdsat/stats", {}, timeout=10)
    assert late["error"]["code"] == -32600
    await conn.notify("exit")
    rc, took = await exits_within(conn, 10)
    assert rc == 0 and took < 3, conn.stderr_tail()
    assert not conn.pending


async def test_exit_without_shutdown_while_loading(tiny_model_dir):
    conn = await start({"model": str(tiny_model_dir), **OPTIONS}, wait=False)
    await conn.notify("exit")
    rc, took = await exits_within(conn, 10)
    assert rc == 1 and took < 3, conn.stderr_tail()  # 1: exit without shutdown, as the spec says
