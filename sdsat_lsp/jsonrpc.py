"""JSON-RPC repairs: where pygls would drop a message without a word (the client would wait
forever) or lose every later message, the client gets an error and the stream goes on.

This is the only module that touches pygls' private fields (`_send_data`, `_send_response`,
`_shutdown`, `_workspace`); a pygls upgrade is checked here. What each repair guards against is
listed in the classes' docstrings; `sdsat-lsp stress` sends all of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidRequest
from pygls.protocol import LanguageServerProtocol

from .tcp import token_matches

log = logging.getLogger(__name__)


class Protocol(LanguageServerProtocol):
    """pygls' protocol, but every request it would drop without a word gets a JSON-RPC error (the
    client would wait forever): params that do not fit the LSP types (InvalidParams); a message
    that is not an object, has no "jsonrpc" or another version (InvalidRequest); a request after
    `shutdown` (InvalidRequest, as the spec says)."""

    exit_requested = False
    auth_token: str | None = None  # --tcp: what initializationOptions.token must be (tcp.py)
    authenticated: asyncio.Event | None = None  # per TCP connection, set by a valid initialize

    def structure_message(self, data: dict[str, Any]):
        try:
            return super().structure_message(data)
        except JsonRpcException as exc:
            if isinstance(data, dict) and "id" in data and "method" in data:
                self._send_response(data["id"], error=exc.to_response_error())
            raise

    def handle_message(self, message) -> None:
        if not hasattr(message, "jsonrpc"):  # pygls hands these over as plain dicts, lists, numbers
            request = isinstance(message, dict) and "method" in message
            self._refuse(message.get("id") if request else None, "not a JSON-RPC 2.0 message")
            return
        method, msg_id = getattr(message, "method", None), getattr(message, "id", None)
        if self.auth_token is not None and not self._let_in(message, method, msg_id):
            return
        if method is not None and msg_id is not None:
            if message.jsonrpc != self.VERSION:
                self._refuse(msg_id, f"unsupported JSON-RPC version {message.jsonrpc!r}")
                return
            if not isinstance(method, str):  # pygls fails on it with an internal TypeError
                self._refuse(msg_id, f"the method must be a string, got {method!r}")
                return
            if self._shutdown and method != types.EXIT:
                self._refuse(msg_id, "the server is shutting down")
                return
        if method == types.EXIT:
            self.exit_requested = True
        super().handle_message(message)

    def _let_in(self, message, method, msg_id) -> bool:
        """Over TCP nothing is served before an `initialize` that carries the token."""
        if self.authenticated is not None and self.authenticated.is_set():
            return True
        if method == types.INITIALIZE:
            options = getattr(message.params, "initialization_options", None)
            given = options.pop("token", None) if isinstance(options, dict) else None
            if token_matches(given, self.auth_token):
                self.authenticated.set()
                return True
            self._refuse(msg_id, "wrong or missing initializationOptions.token (the server printed it at start)")
            self.writer.close()
            return False
        if method is not None and msg_id is not None:
            self._send_data({"jsonrpc": self.VERSION, "id": msg_id, "error": {
                "code": -32002, "message": "Server not initialized: send initialize with the token first"}})
        return False

    def _refuse(self, msg_id, reason: str) -> None:
        log.warning("invalid request (id %r): %s", msg_id, reason)
        # An id of null must be written out, and pygls' response type would leave it out.
        self._send_data({"jsonrpc": self.VERSION, "id": msg_id,
                         "error": {"code": JsonRpcInvalidRequest.CODE, "message": f"Invalid Request: {reason}"}})

    def send_parse_error(self, error: json.JSONDecodeError) -> None:
        """A message body that is not JSON gets the JSON-RPC parse error (id null), as the spec asks,
        instead of silence; the connection goes on with the next message."""
        log.warning("a message that is not JSON: %s", error)
        self._send_data({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": f"Parse error: {error}"}})

    def use_workspace(self, workspace) -> None:
        """Replace pygls' workspace (its documents break lines where LSP does not: document.py)."""
        self._workspace = workspace

    @property
    def has_workspace(self) -> bool:
        return self._workspace is not None

    @property
    def shut_down(self) -> bool:
        return bool(self._shutdown)

    def exit_code(self) -> int:
        """As the spec says: 1 for an `exit` without `shutdown` first, else 0."""
        return 1 if self.exit_requested and not self._shutdown else 0


_CONTENT_LENGTH = re.compile(rb"content-length[ \t]*:[ \t]*(\d+)", re.IGNORECASE)
MAX_MESSAGE_BYTES = 256 * 2**20  # 50x a 5 MB document; a bigger Content-Length is a broken header


class LenientStdin:
    """stdin for pygls' reader, lenient where that reader would lose every later message:

    - pygls takes a header only as exactly `Content-Length: N\\r\\n` at a line start. After one broken
      frame (a Content-Length too short leaves the rest of the body in front of the next header;
      junk between messages; a header in lower case, as HTTP allows) it never matches a header
      again, and the client waits forever. Here a Content-Length header is found anywhere in a
      line, in any case, with LF or CRLF: the stream is back in step at the next message.
    - A Content-Length over MAX_MESSAGE_BYTES is refused: pygls would try to read it at once (a
      MemoryError that ends the server, or a wait for bytes that never come). The client gets a
      parse error and the reader resynchronizes at the next header.
    - Invalid UTF-8 in a body becomes U+FFFD instead of dropping the message.
    """

    def __init__(self, raw):
        self.raw = raw

    def readline(self) -> bytes:
        line = self.raw.readline()
        match = _CONTENT_LENGTH.search(line)
        if match is None:
            return line
        if match.start() > 0:
            log.warning("skipped %d bytes that are not a message before a header", match.start())
        return b"Content-Length: " + match.group(1) + b"\r\n"

    def read(self, n: int) -> bytes:
        if n > MAX_MESSAGE_BYTES:
            log.warning("refused a message of %d bytes (over %d); skipping to the next header", n, MAX_MESSAGE_BYTES)
            return b"\x00"  # not JSON: the client gets a parse error
        data = self.raw.read(n)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            log.warning("invalid UTF-8 in a message: decoded with replacement characters")
            data = data.decode("utf-8", "replace").encode("utf-8")
        return data


def plain(value: Any) -> Any:
    """pygls hands custom-method params over as namedtuples: back to dicts and lists."""
    if hasattr(value, "_asdict"):
        return {k: plain(v) for k, v in value._asdict().items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
