"""JSON-RPC repairs: where pygls would drop a message without a word (the client would wait
forever) or lose every later message, the client gets an error and the stream goes on.

This is the only module that touches pygls' private fields (`_send_data`, `_send_response`,
`_shutdown`, `_workspace`); a pygls upgrade is checked here. What each repair guards against is
listed in the classes' docstrings; `sdsat-lsp stress` sends all of it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import time
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidRequest
from pygls.protocol import LanguageServerProtocol

from .tcp import token_matches

log = logging.getLogger(__name__)
SLOW_HANDLER_MS = 50  # a message whose handling took longer is logged (the loop stalls meanwhile)


class Protocol(LanguageServerProtocol):
    """pygls' protocol with an envelope check of our own, so that every request gets an answer
    and nothing the client sent is mistaken for something else:

    - pygls parses bodies with `structure_message` as json's object_hook, so every nested object
      with a "jsonrpc" key (inside params or settings) became a message of its own: the request
      around it went unanswered, and a nested fake request was answered. Here the hook keeps
      objects as they are and the top level alone is checked and structured (`_envelope`).
    - A message that is not an object, has no "jsonrpc" or another version, an id that is not a
      number, string or null, a method that is not a string, params that are neither object nor
      array: Invalid Request (-32600), with id null when the id itself is unusable.
    - Params that do not fit the LSP types: Invalid Params (-32602). A request before
      `initialize`: -32002, as LSP says; a second `initialize`: Invalid Request (the first one's
      documents and settings stay). A request after `shutdown`: Invalid Request.
    - Error replies carry a short message, never a traceback (`data` is logged here instead), and
      nothing is written once the client's end of the stream is gone (`_send_data`).
    """

    exit_requested = False
    initialized = False  # an initialize has been let through
    auth_token: str | None = None  # --tcp: what initializationOptions.token must be (tcp.py)
    authenticated: asyncio.Event | None = None  # per TCP connection, set by a valid initialize
    output_closed = False

    def structure_message(self, data: dict[str, Any]):
        return data  # structured once, at the top level, by _envelope

    def handle_message(self, data) -> None:
        message = self._envelope(data)
        if message is None:
            return
        method, msg_id = getattr(message, "method", None), getattr(message, "id", None)
        if self.auth_token is not None and not self._let_in(message, method, msg_id):
            return
        if method == types.INITIALIZE:
            if self.initialized:
                self._refuse(msg_id, "initialize was already sent; the server keeps its first session")
                return
            self.initialized = True
        elif method is not None and not self.initialized and method != types.EXIT:
            if msg_id is not None:
                self._send_error(msg_id, -32002, "Server not initialized: send initialize first")
            else:
                log.info("dropped %s before initialize", method)
            return
        if method is not None and msg_id is not None and self._shutdown and method != types.EXIT:
            self._refuse(msg_id, "the server is shutting down")
            return
        if method == types.EXIT:
            self.exit_requested = True
        started = time.perf_counter()
        super().handle_message(message)  # synchronous handlers run inside this call, on the event loop
        took_ms = (time.perf_counter() - started) * 1e3
        if took_ms > SLOW_HANDLER_MS:
            log.warning("handling %s took %.0f ms on the event loop", method or "a response", took_ms)

    def _envelope(self, data):
        """The typed message for a valid envelope, else None (after answering what can be answered)."""
        if not isinstance(data, dict):
            kind = "a batch (LSP has none)" if isinstance(data, list) else type(data).__name__
            self._refuse(None, f"a message must be a JSON object, got {kind}")
            return None
        has_id = "id" in data
        msg_id = data.get("id")
        if has_id and (isinstance(msg_id, bool) or not isinstance(msg_id, (int, str, type(None)))):
            self._refuse(None, f"an id must be a number, a string or null, got {type(msg_id).__name__}")
            return None
        reply_to = msg_id if has_id and "method" in data else None
        if data.get("jsonrpc") != self.VERSION:
            self._refuse(reply_to, f"not a JSON-RPC 2.0 message (jsonrpc {data.get('jsonrpc')!r})")
            return None
        if "method" in data and not isinstance(data["method"], str):
            self._refuse(reply_to, f"the method must be a string, got {data['method']!r}")
            return None
        if "params" in data and not isinstance(data["params"], (dict, list, type(None))):
            self._refuse(reply_to, f"params must be an object or an array, got {type(data['params']).__name__}")
            return None
        if "method" in data and "params" not in data:
            data = {**data, "params": None}  # optional in JSON-RPC; pygls' message types require it
        try:
            return super().structure_message(data)
        except JsonRpcException as exc:
            if reply_to is not None:
                self._send_error(reply_to, exc.code, exc.message)
            else:
                log.warning("dropped %s: %s", data.get("method", "a message"), exc.message)
            return None

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
        self._send_error(msg_id, JsonRpcInvalidRequest.CODE, f"Invalid Request: {reason}")

    def _send_error(self, msg_id, code: int, message: str) -> None:
        # Written by hand: an id of null must be written out, and pygls' response type leaves it out.
        self._send_data({"jsonrpc": self.VERSION, "id": msg_id, "error": {"code": code, "message": _short(message)}})

    def _send_response(self, msg_id, result=None, error=None):
        """pygls puts a handler's traceback (with the server's paths) into `error.data`: it goes to
        the log, the client gets the code and a short message."""
        if error is not None and (getattr(error, "data", None) is not None or len(error.message or "") > MAX_ERROR_CHARS):
            log.error("request %r failed: %s\n%s", msg_id, error.message, error.data or "")
            error = types.ResponseError(code=error.code, message=_short(error.message or ""))
        super()._send_response(msg_id, result, error)

    def _send_data(self, data: Any):
        """pygls' writer, except that nothing is written once the output is closed (the client is
        gone): pygls re-raised the broken pipe and reported other write errors with a message to
        the client, which failed to write again, and so on to the recursion limit (6-13 MB of
        tracebacks after an `exit` mid-request)."""
        if not data or self.output_closed:
            return
        if self.writer is None:
            log.error("no transport to send a message on")
            return
        try:
            body = json.dumps(data, default=self._serialize_message)
        except Exception:
            log.exception("could not serialize a message; not sent")
            return
        header = (f"Content-Length: {len(body)}\r\nContent-Type: {self.CONTENT_TYPE}; charset={self.CHARSET}\r\n\r\n"
                  if self._include_headers else "")
        try:
            written = self.writer.write((header + body).encode(self.CHARSET))
            if inspect.isawaitable(written):
                asyncio.ensure_future(written)
        except (OSError, ValueError):  # a broken pipe, a closed file
            self.output_closed = True
            log.info("the client's end of the stream is closed: writing nothing more")

    def send_parse_error(self, error: Exception) -> None:
        """A message body that is not JSON (or nested too deeply for the parser) gets the JSON-RPC
        parse error (id null), as the spec asks, instead of silence; the connection goes on with
        the next message."""
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        log.warning("a message that cannot be parsed: %s", reason)
        self._send_error(None, -32700, f"Parse error: {reason}")

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


MAX_ERROR_CHARS = 300  # an error message for a person, not a dump


def _short(message: str) -> str:
    first = (message or "").strip().splitlines()[0] if (message or "").strip() else ""
    return first if len(first) <= MAX_ERROR_CHARS else first[: MAX_ERROR_CHARS - 3] + "..."


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
