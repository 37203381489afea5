"""`sdsat-lsp --tcp HOST:PORT`: LSP over a loopback socket, for one client that knows the token.

pygls' own `start_tcp` binds any address, serves every connection through one protocol (a second
client receives the first one's responses) and asks nothing of who connects. Any local process can
open a loopback port, so here:

- only a loopback address is accepted (127.0.0.1, ::1, localhost);
- one connection at a time; a connection that has not sent an `initialize` with the token in
  `initializationOptions.token` within AUTH_TIMEOUT_S is closed, and one that sends a wrong token
  is answered with an error and closed (the server keeps listening for the real client);
- every message before that `initialize` is refused (see `_Protocol.handle_message`);
- once the authenticated client leaves, the server ends.

The token is given with `--tcp-token` or made at start and printed on stderr.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import sys
import threading

from .errors import SdsatError

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "::1", "localhost")
AUTH_TIMEOUT_S = 10.0


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit():
        raise SdsatError(f"--tcp wants HOST:PORT, got {text!r}")
    if host not in LOOPBACK:
        raise SdsatError(f"--tcp serves loopback only ({', '.join(LOOPBACK)}), got {host!r}: "
                         "anyone who can reach the port could use the model and read the documents")
    return host, int(port)


def new_token() -> str:
    return secrets.token_urlsafe(24)


def token_matches(given, expected: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


def serve_tcp(server, host: str, port: int, token: str) -> None:
    """Serve `server` (an SdsatServer) on host:port until its authenticated client leaves."""
    from pygls.server import run_async

    protocol = server.protocol
    protocol.auth_token = token
    stop = threading.Event()
    busy = False

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal busy
        if busy:  # one client: a second connection would share the first one's protocol
            log.warning("refused a second TCP connection from %s", writer.get_extra_info("peername"))
            writer.close()
            return
        busy = True
        protocol.authenticated = asyncio.Event()
        protocol.set_writer(writer)
        loop_task = asyncio.ensure_future(run_async(stop_event=stop, reader=reader, protocol=protocol,
                                                    logger=log, error_handler=server.report_server_error))
        authenticated = asyncio.ensure_future(protocol.authenticated.wait())
        await asyncio.wait({authenticated, loop_task}, timeout=AUTH_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if not protocol.authenticated.is_set():  # no token in time, a wrong one, or the client left
            log.warning("closed a TCP connection from %s that sent no valid token", writer.get_extra_info("peername"))
            authenticated.cancel()
            loop_task.cancel()
            writer.close()
            busy = False
            return
        await loop_task
        listener.close()  # the client is gone: so is the server

    async def main() -> None:
        nonlocal listener
        listener = await asyncio.start_server(connection, host, port)
        print(f"sdsat-lsp: serving LSP on {host}:{port}; send initializationOptions "
              f'{{"token": "{token}"}} with initialize', file=sys.stderr, flush=True)
        async with listener:
            try:
                await listener.serve_forever()
            except asyncio.CancelledError:
                pass

    listener = None
    asyncio.run(main())
