"""What the server answers, as data: inline and popup completion items for a completion, and the
`sdsat/stats` report. Pure conversions over the server's state; the handlers in server.py send them."""

from __future__ import annotations

from typing import Any

from lsprotocol import types

from . import session
from .acceptance import ACCEPT_COMMAND, SuggestionLog, command_arguments
from .jsonrpc import plain
from .session import Outcome
from .settings import camel, settings_to_wire


def accept_command(log: SuggestionLog, uri: str, outcome: Outcome | None, encoding_units) -> types.Command | None:
    """The `sdsat.accept` command an item carries (acceptance.py), the item noted as shown."""
    if outcome is None or outcome.completion is None:
        return None
    st = outcome.stats
    item_id = log.shown(uri, st.get("completionId", st["seq"]), st["seq"], encoding_units(outcome.completion.text),
                        bool(st.get("typedThrough")))
    return types.Command(title="sdsat-lsp: accepted", command=ACCEPT_COMMAND, arguments=command_arguments(uri, item_id))


def inline_items(outcome: Outcome | None, cursor: types.Position, rest: str, encoding_units,
                 command: types.Command | None = None) -> types.InlineCompletionList:
    if outcome is None or outcome.completion is None:
        return types.InlineCompletionList(items=[])
    c = outcome.completion
    end = types.Position(line=cursor.line, character=cursor.character + encoding_units(rest[: c.replace_chars]))
    return types.InlineCompletionList(items=[
        types.InlineCompletionItem(insert_text=c.text, range=types.Range(start=cursor, end=end), command=command)
    ])


def completion_items(outcome: Outcome | None, cursor: types.Position, rest: str, word: str,
                     encoding_units, command: types.Command | None = None) -> types.CompletionList:
    """The fallback for clients without inline completion: one item that replaces the word before
    the cursor (so the client's prefix filter keeps it) and what the completion replaces after it."""
    if outcome is None or outcome.completion is None:
        return types.CompletionList(is_incomplete=True, items=[])
    c = outcome.completion
    start = types.Position(line=cursor.line, character=cursor.character - encoding_units(word))
    end = types.Position(line=cursor.line, character=cursor.character + encoding_units(rest[: c.replace_chars]))
    first_line = c.text.strip().splitlines()[0] if c.text.strip() else c.text
    return types.CompletionList(is_incomplete=True, items=[types.CompletionItem(
        label=(word + first_line)[:80] if not c.text.startswith("\n") else first_line[:80],
        kind=types.CompletionItemKind.Text,
        detail="sdsat-lsp",
        filter_text=word + c.text,
        insert_text_format=types.InsertTextFormat.PlainText,
        text_edit=types.TextEdit(range=types.Range(start=start, end=end), new_text=word + c.text),
        command=command,
    )])


def stats_reply(server, params: Any) -> dict:
    """The `sdsat/stats` answer: recent requests (`last`, optionally for one `uri`), the KV cache,
    the model, documents, draft store, compiled forward, event loop, settings and state."""
    last = 50
    uri = None
    if params is not None:
        data = plain(params)
        if isinstance(data, dict):
            last = data.get("last", last) if isinstance(data.get("last"), int) else last
            uri = data.get("uri") if isinstance(data.get("uri"), str) else None
    with server.recent_lock:
        recent = list(server.recent)
    requests = [r for r in recent if uri is None or r["uri"] == uri][-max(0, last):] if last else []
    cache = server.kv.summary() if server.kv is not None else {"documents": 0, "bytes": 0, "per_document": {}}
    per_doc = cache.pop("per_document", {})
    cache["perDocument"] = [{"uri": u, **v} for u, v in per_doc.items()]
    cache = {camel(k): v for k, v in cache.items()}
    model = None
    if server.loaded is not None:
        lm = server.loaded
        model = {"ref": lm.ref, "device": lm.device, "quantize": lm.quantize, "dtype": lm.dtype,
                 "k": lm.card.k, "fim": bool(lm.card.fim), "loadMs": round(lm.load_ms, 1)}
    documents = {"open": len(server.workspace.text_documents) if server.protocol.has_workspace else 0,
                 "withState": len(server.docs), "maxWithState": session.MAX_DOCUMENTS, "forgotten": server.docs.forgotten,
                 "maxCompletionChars": session.MAX_COMPLETION_CHARS}
    return {"state": server.state, "message": server.state_message, "model": model, "cache": cache,
            "documents": documents, "draftStore": server.drafts.info, "compiled": server.compile_info,
            "eventLoop": {"maxBlockMs": round(server.loop_block_ms, 1)},
            "settings": settings_to_wire(server.settings), "requests": requests, "startup": server.startup,
            "acceptance": server.suggestions.report(uri), "typedThrough": server.suggestions.total.typed_through,
            "prefetch": server.prefetched.wire(),
            "positionEncoding": str(server.workspace.position_encoding) if server.protocol.has_workspace else None}
