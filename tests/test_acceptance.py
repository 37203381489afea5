"""The acceptance signal over stdio (issue 16, item 6): items carry the `sdsat.accept` command the
server advertises; running it (whole or in part) moves `accepted` / `partiallyAccepted` in
`sdsat/stats`, per document and overall; a suggestion replaced without an accept counts as shown
only; typing through a suggestion continues it (one suggestion, one count); bad arguments get a
JSON-RPC error."""

from __future__ import annotations

import pytest
from pygls.exceptions import JsonRpcException

from documents import WALK_MODULE as DOC  # tests/documents.py
from lsp_client import Session

pytestmark = pytest.mark.asyncio(loop_scope="module")

ACCEPT = "sdsat.accept"
LINE, COLUMN = 15, 12  # as in test_typethrough.py: a suggestion that can be typed through


async def _item(server: Session, uri: str, line: int, column: int):
    (item,) = (await server.inline(uri, line, column)).items
    return item


async def _acceptance(server: Session, uri: str) -> tuple[dict, dict]:
    report = (await server.stats(uri=uri, last=0))["acceptance"]
    (doc,) = report["perDocument"]
    return report, doc


async def test_the_command_is_advertised_and_carried(main_server):
    caps = main_server.init_result.capabilities
    assert ACCEPT in caps.execute_command_provider.commands
    uri = "file:///carried.py"
    main_server.open(uri, DOC)
    try:
        item = await _item(main_server, uri, LINE, COLUMN)
        assert item.command.command == ACCEPT
        (argument,) = item.command.arguments
        stats = await main_server.last_request(uri)
        assert argument == {"uri": uri, "completionId": stats["completionId"]}
    finally:
        main_server.close(uri)


async def test_accept_partial_accept_and_ignored(main_server):
    uri = "file:///accepting.py"
    main_server.open(uri, DOC)
    try:
        overall_before = (await main_server.stats(last=0))["acceptance"]
        shown = await _item(main_server, uri, 6, 4)  # shown, then replaced by the next one: ignored
        accepted = await _item(main_server, uri, 17, 14)
        assert accepted.command.arguments != shown.command.arguments
        result = await main_server.execute(ACCEPT, accepted.command.arguments)
        assert result == {"recorded": True, "state": "accepted"}
        overall, doc = await _acceptance(main_server, uri)
        assert _counts(doc) == (2, 1, 0, 1)
        assert doc["acceptanceRate"] == 0.5
        assert overall["accepted"] == overall_before["accepted"] + 1
        assert overall["shown"] == overall_before["shown"] + 2
        # Accepting the same item again (a client that reports twice) changes nothing.
        await main_server.execute(ACCEPT, accepted.command.arguments)
        assert (await _acceptance(main_server, uri))[1]["accepted"] == 1
        # A partial accept (one character of the text, as VS Code's accept-word reports it).
        partial = await _item(main_server, uri, 8, 8)
        argument = dict(partial.command.arguments[0], acceptedLength=1, kind="word")
        assert (await main_server.execute(ACCEPT, [argument]))["state"] == "partial"
        overall, doc = await _acceptance(main_server, uri)
        assert (doc["shown"], doc["accepted"], doc["partiallyAccepted"]) == (3, 1, 1)
        assert overall["partiallyAccepted"] == overall_before["partiallyAccepted"] + 1
        # Then the rest of it: accepted, no longer partly.
        argument["acceptedLength"] = len(partial.insert_text)
        assert (await main_server.execute(ACCEPT, [argument]))["state"] == "accepted"
        doc = (await _acceptance(main_server, uri))[1]
        assert _counts(doc) == (3, 2, 0, 1)
    finally:
        main_server.close(uri)


async def test_typing_through_continues_the_suggestion(main_server):
    """Type the first character of a suggestion, then accept what is left: one shown, one accepted."""
    uri = "file:///typed_then_accepted.py"
    main_server.open(uri, DOC)
    try:
        first = await _item(main_server, uri, LINE, COLUMN)
        main_server.change(uri, (LINE, COLUMN), (LINE, COLUMN), first.insert_text[0])
        rest = await _item(main_server, uri, LINE, COLUMN + 1)
        assert (await main_server.last_request(uri))["typedThrough"] is True
        assert rest.command.arguments == first.command.arguments
        await main_server.execute(ACCEPT, rest.command.arguments)
        doc = (await _acceptance(main_server, uri))[1]
        assert (doc["shown"], doc["accepted"], doc["typedThrough"]) == (1, 1, 1)
    finally:
        main_server.close(uri)


@pytest.mark.parametrize("arguments", [None, [], [1], [{"uri": 5, "completionId": 1}], [{"uri": "file:///x.py"}],
                                       [{"uri": "file:///x.py", "completionId": True}],
                                       [{"uri": "file:///x.py", "completionId": 1, "acceptedLength": -1}],
                                       [{"uri": "file:///x.py", "completionId": 1}, {}]])
async def test_bad_arguments_are_invalid_params(main_server, arguments):
    with pytest.raises(JsonRpcException) as info:
        await main_server.execute(ACCEPT, arguments)
    assert info.value.code == -32602
    assert (await main_server.stats(last=0))["state"] == "ready"


async def test_an_unknown_completion_is_not_recorded(main_server):
    before = (await main_server.stats(last=0))["acceptance"]
    result = await main_server.execute(ACCEPT, [{"uri": "file:///never.py", "completionId": 10**9}])
    assert result["recorded"] is False
    after = (await main_server.stats(last=0))["acceptance"]
    assert after["accepted"] == before["accepted"]


def _counts(doc: dict) -> tuple[int, int, int, int]:
    """(shown, accepted, partially accepted, ignored) of an `acceptance` entry."""
    return doc["shown"], doc["accepted"], doc["partiallyAccepted"], doc["ignored"]
