"""The acceptance signal: which suggestions were shown, and which were accepted, fully or in part.

Every completion item carries the server command `sdsat.accept` (advertised in
`executeCommandProvider`) with `{"uri", "completionId"}` as its one argument. A client runs an
item's command after inserting the whole item (LSP's `InlineCompletionItem.command`, as Copilot's
language server does); for a partial accept (a word, a line) it runs the same command with
`acceptedLength` (how much of the item's text was inserted, in the position encoding's units) and
optionally `kind` ("word", "line", ...). An `acceptedLength` that covers the item is a full accept.

One suggestion, one count: a request answered by typing through a suggestion (typethrough.py)
continues the same suggestion, with the same id, so typing it and then accepting the rest counts
one shown and one accepted. Once a suggestion is accepted, what the server shows next is a new one.
Outcomes per suggestion: accepted (fully, perhaps after partial accepts), partially accepted
(only in part), or ignored (shown, then replaced by another without an accept; the one on screen
now counts as ignored until it is accepted).

In memory only, reported by `sdsat/stats` under `acceptance`; nothing ever leaves the machine.
Touched on the event loop only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .session import MAX_DOCUMENTS

ACCEPT_COMMAND = "sdsat.accept"
# Suggestions whose outcome can still change (a client reports an accept within seconds of the
# item; this many requests later it is long gone). Their counts stay in the totals.
MAX_TRACKED = 1024
FULL, PARTIAL, SHOWN = "accepted", "partial", "shown"


@dataclass
class Counts:
    shown: int = 0
    accepted: int = 0
    partially_accepted: int = 0
    typed_through: int = 0  # answers that continued a suggestion with no model pass

    def wire(self) -> dict:
        return {"shown": self.shown, "accepted": self.accepted, "partiallyAccepted": self.partially_accepted,
                "ignored": self.shown - self.accepted - self.partially_accepted,
                "acceptanceRate": round(self.accepted / self.shown, 4) if self.shown else 0.0,
                "typedThrough": self.typed_through}


@dataclass
class _Suggestion:
    uri: str
    length: int  # the text last shown for it, in the client's position-encoding units
    state: str = SHOWN


def command_arguments(uri: str, completion_id: int) -> list[dict]:
    """What an item's `sdsat.accept` command carries."""
    return [{"uri": uri, "completionId": completion_id}]


class SuggestionLog:
    """Shown suggestions and their outcomes, overall and per document."""

    def __init__(self):
        self.total = Counts()
        self._docs: OrderedDict[str, Counts] = OrderedDict()  # least recently shown first
        self._items: OrderedDict[int, _Suggestion] = OrderedDict()
        self._renamed: OrderedDict[int, int] = OrderedDict()  # a continued suggestion's id -> its newest id

    def _doc(self, uri: str) -> Counts:
        counts = self._docs.pop(uri, None) or Counts()
        self._docs[uri] = counts
        while len(self._docs) > MAX_DOCUMENTS:
            self._docs.popitem(last=False)
        return counts

    def shown(self, uri: str, completion_id: int, request_id: int, length: int, typed_through: bool) -> int:
        """Note an item shown for `completion_id` (the suggestion it continues, or its own request's
        `request_id`); returns the id the item carries (a new one once that suggestion was accepted)."""
        item_id = self._renamed.get(completion_id, completion_id)
        item = self._items.get(item_id)
        if item is not None and item.state == FULL:
            # The continuation of an accepted suggestion (the next line, say) is a new suggestion.
            item_id, item = request_id, None
            self._bounded(self._renamed, completion_id, item_id)
        doc = self._doc(uri)
        if typed_through:
            self.total.typed_through += 1
            doc.typed_through += 1
        if item is None or item.uri != uri:
            self.total.shown += 1
            doc.shown += 1
            item = _Suggestion(uri, length)
        item.length = length
        self._bounded(self._items, item_id, item)
        return item_id

    @staticmethod
    def _bounded(table: OrderedDict, key, value) -> None:
        table.pop(key, None)
        table[key] = value
        while len(table) > MAX_TRACKED:
            table.popitem(last=False)

    def accept(self, arguments: list[Any]) -> dict:
        """`sdsat.accept`'s arguments -> its result. Raises ValueError for arguments that are not
        `[{"uri": str, "completionId": int, "acceptedLength"?: int, "kind"?: str}]`."""
        uri, completion_id, length, kind = _parse(arguments)
        item = self._items.get(completion_id)
        if item is None or item.uri != uri:
            return {"recorded": False, "reason": "unknown or expired completionId"}
        if length == 0:
            return {"recorded": False, "reason": "nothing accepted"}
        full = length >= item.length if length is not None else kind in (None, "full")
        state = FULL if full else PARTIAL
        if item.state == FULL or item.state == state:
            return {"recorded": True, "state": item.state}
        for counts in (self.total, self._doc(uri)):
            if item.state == PARTIAL:
                counts.partially_accepted -= 1  # partly, then all of it: accepted
            if full:
                counts.accepted += 1
            else:
                counts.partially_accepted += 1
        item.state = state
        return {"recorded": True, "state": state}

    def report(self, uri: str | None = None) -> dict:
        """`sdsat/stats`' `acceptance`: the totals and, per document (only `uri`'s if given), the same."""
        per_doc = [{"uri": u, **c.wire()} for u, c in self._docs.items() if uri is None or u == uri]
        return {**self.total.wire(), "perDocument": per_doc}


def _parse(arguments: list[Any]) -> tuple[str, int, int | None, str | None]:
    if not isinstance(arguments, list) or len(arguments) != 1 or not isinstance(arguments[0], dict):
        raise ValueError(f"{ACCEPT_COMMAND} takes one argument, an object")
    arg = arguments[0]
    uri, completion_id = arg.get("uri"), arg.get("completionId")
    length, kind = arg.get("acceptedLength"), arg.get("kind")
    if not isinstance(uri, str) or not _is_int(completion_id):
        raise ValueError(f"{ACCEPT_COMMAND}: expected a string uri and an integer completionId")
    if length is not None and (not _is_int(length) or length < 0):
        raise ValueError(f"{ACCEPT_COMMAND}: acceptedLength must be a non-negative integer")
    if kind is not None and not isinstance(kind, str):
        raise ValueError(f"{ACCEPT_COMMAND}: kind must be a string")
    return uri, completion_id, length, kind


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
