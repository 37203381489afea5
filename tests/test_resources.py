"""Issue 17, resources and reach: what a client can make the server hold or walk is bounded, and what
it held is returned. Each case is driven over stdio as a client would send it, except the race
between the worker and the stats request, which only threads in one process can time."""

from __future__ import annotations

import sys
import threading


def test_stats_never_iterate_the_requests_while_the_worker_appends():
    """`sdsat/stats` listed the recent requests by iterating the deque on the event loop while the
    worker appended to it: "deque mutated during iteration" (5 of 3,000 stats requests failed so
    here, with a worker finishing jobs as fast as it can)."""
    from sdsat_lsp.server import build_server
    from sdsat_lsp.session import DocumentState, Job
    from sdsat_lsp.settings import Settings

    server = build_server()
    stop = threading.Event()

    def worker():  # the worker's own path: run_job records each job's stats (here: not ready)
        seq = 0
        while not stop.is_set():
            seq += 1
            server.run_job(Job(seq, seq, "file:///a.py", "", 0, Settings(), DocumentState()))

    thread = threading.Thread(target=worker)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows in seconds
    thread.start()
    try:
        for _ in range(3000):
            report = server.stats_report({"last": 256, "uri": "file:///a.py"})
            assert len(report["requests"]) <= 256
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert server.stats_report({"last": 5})["requests"][-1]["finishReason"] == "not-ready"


# ---- over stdio -------------------------------------------------------------------------------

import asyncio
import json
import time

import pytest

from lsp_client import BASE_OPTIONS, Session, capabilities  # tests/lsp_client.py: the stdio client

from documents import WALK_MODULE as DOC  # tests/documents.py

LIMITS = {"session.MAX_DOCUMENTS": 3, "session.MAX_COMPLETION_CHARS": 5000}


def limits_env(limits: dict) -> dict:
    return {"SDSAT_LSP_TEST_LIMITS": json.dumps(limits)}


@pytest.mark.asyncio(loop_scope="module")
async def test_documents_and_cache_are_bounded_and_returned(tiny_model_dir):
    """A 16 TiB cache budget is refused; past MAX_DOCUMENTS (3 here) the least recently used
    documents forget their state and KV cache; a document over MAX_COMPLETION_CHARS (5,000 here) is
    answered empty, logged once and never popped up; and after every document closes, the KV store
    holds nothing (also for a document closed while its first completion was decoding: its cache was
    stored after the close and kept)."""
    session = await Session.start({"model": str(tiny_model_dir), **BASE_OPTIONS, "cacheBudgetMb": 16 * 2**20},
                                  capabilities(), env=limits_env(LIMITS))
    client = session.client
    try:
        stats = await session.stats()
        assert stats["settings"]["cacheBudgetMb"] == 512  # the default, not 16 TiB
        assert "cacheBudgetMb" in client.messages[-1].message and "0..65536" in client.messages[-1].message
        uris = [f"file:///doc{i}.py" for i in range(5)]
        for uri in uris:
            session.open(uri, DOC)
            assert (await session.inline(uri, 15, 12)).items
        stats = await session.stats()
        assert stats["documents"]["withState"] == 3 and stats["documents"]["forgotten"] == 2
        assert stats["documents"]["open"] == 5
        assert {d["uri"] for d in stats["cache"]["perDocument"]} <= set(uris[2:])
        assert (await session.inline(uris[0], 15, 12)).items  # a forgotten document still completes

        big = "file:///big.py"
        session.open(big, DOC * (5000 // len(DOC) + 1))
        popups = len(client.messages)
        for _ in range(2):
            assert not (await session.inline(big, 15, 12)).items
        logged = [m.message for m in client.log_messages if big in m.message]
        assert len(logged) == 1 and "5,000" in logged[0]
        assert len(client.messages) == popups

        # Closed while its first completion decodes (600 tokens: the tiny model never stops by itself).
        slow = "file:///slow.py"
        session.open(slow, DOC + "\n")
        session.configure({"maxTokens": 600, "lineMode": "multi", "mode": "ar"})
        request = asyncio.ensure_future(session.inline(slow, 19, 0))
        await asyncio.sleep(0.5)  # decoding 600 tokens takes seconds
        session.close(slow)
        await request
        for uri in uris + [big]:
            session.close(uri)
        stats = await session.stats()
        assert stats["cache"]["documents"] == 0 and stats["cache"]["bytes"] == 0, stats["cache"]
        assert stats["documents"]["withState"] == 0 and stats["documents"]["open"] == 0
        assert [r["finishReason"] for r in stats["requests"] if r["uri"] == slow] == ["cancelled"]
    finally:
        await session.stop()
