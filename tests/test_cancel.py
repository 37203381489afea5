"""Scheduling: a newer request for a document cancels the older one; $/cancelRequest stops decoding
between forward passes."""

from __future__ import annotations

import asyncio

import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcException


from documents import WALK_MODULE as DOC  # tests/documents.py
from lsp_client import BASE_OPTIONS

pytestmark = pytest.mark.asyncio(loop_scope="module")


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
