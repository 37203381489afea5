"""A JSON-RPC client for the language server that writes raw bytes, so that it can send what no LSP
client library would (negative positions, broken frames, invalid UTF-8), and keeps count of every
request and answer (`Tally`). The stress run and the fault tests drive the server through it."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

_BREAK = re.compile(r"\r\n|\r|\n")


def utf16(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


class Mirror:
    """The client's copy of an open document; positions in UTF-16 code units, as LSP's default."""

    def __init__(self, uri: str, text: str, kind: str = "code"):
        self.uri, self.text, self.kind, self.version = uri, text, kind, 1

    def position(self, offset: int) -> dict:
        text = self.text
        offset = max(0, min(offset, len(text)))
        has_cr = text.find("\r", 0, offset) >= 0
        line = len(_BREAK.findall(text, 0, offset)) if has_cr else text.count("\n", 0, offset)
        start = max(text.rfind("\n", 0, offset), text.rfind("\r", 0, offset)) + 1
        return {"line": line, "character": utf16(text[start:offset])}

    def lines(self) -> int:
        return len(_BREAK.findall(self.text)) + 1

    def valid_offset(self, offset: int) -> int:
        offset = max(0, min(offset, len(self.text)))
        return offset - 1 if 0 < offset < len(self.text) and self.text[offset - 1: offset + 1] == "\r\n" else offset

    def edit(self, start: int, end: int, new: str) -> dict:
        """Apply an edit here and return the LSP content change that makes it on the server."""
        change = {"range": {"start": self.position(start), "end": self.position(end)}, "text": new}
        self.text = self.text[:start] + new + self.text[end:]
        return change


@dataclass
class Tally:
    requests: int = 0
    answered: int = 0
    errors_by_code: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)
    malformed_frames: Counter = field(default_factory=Counter)
    malformed_answered: int = 0  # replies to requests inside broken frames the server could still read
    null_id_errors: Counter = field(default_factory=Counter)  # parse errors and the like (id null)
    unexpected_responses: int = 0
    stdout_garbage: int = 0
    notifications: int = 0
    cancel_sent: int = 0
    crashes: list = field(default_factory=list)
    lost: int = 0  # requests pending when the server died
    lost_by_kind: Counter = field(default_factory=Counter)
    max_rss: int = 0
    max_request_ms: float = 0.0  # the slowest answer to any request (the monitor's polls included)
    max_ms_by_kind: dict = field(default_factory=dict)  # request kind -> its slowest answer
    max_loop_block_ms: float = 0.0  # the server's own figure (sdsat/stats eventLoop), highest seen
    max_kv: int = 0
    kv_over_budget: int = 0
    kv_samples: int = 0
    max_poll_ms: float = 0.0  # the longest round trip of a stats poll (answered on the event loop)
    completion_ms: list = field(default_factory=list)
    with_items: int = 0
    error_samples: dict = field(default_factory=dict)  # code -> {request kind: a message}


class Connection:
    """The server process and its JSON-RPC stream, read and written as bytes."""

    def __init__(self, cmd: list[str], tally: Tally, env: dict | None = None):
        self.cmd, self.tally, self.env = cmd, tally, env
        self.proc: asyncio.subprocess.Process | None = None
        self.pending: dict[str, tuple[str, float]] = {}
        self.waiters: dict[str, asyncio.Future] = {}
        self.malformed_ids: set[str] = set()
        self.statuses: list[dict] = []
        self.config: dict = {}  # what workspace/configuration answers
        self.kv_budget = 0
        self.next_id = 0
        self.stderr = tempfile.TemporaryFile()
        self.room = asyncio.Condition()
        self.in_flight = 16

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and not self.reader.done()

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=self.stderr,
            env=self.env, limit=1 << 26)
        self.reader = asyncio.ensure_future(self._read())

    # -- writing ----------------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        if not self.alive:
            return
        try:
            self.proc.stdin.write(data)
            await self.proc.stdin.drain()
        except (ConnectionError, BrokenPipeError):
            pass  # the reader notices the exit

    @staticmethod
    def frame(body: bytes) -> bytes:
        return b"Content-Length: %d\r\n\r\n" % len(body) + body

    async def send(self, message: dict) -> None:
        await self.write(self.frame(json.dumps(message).encode("utf-8", "surrogatepass")))

    async def notify(self, method: str, params=None) -> None:
        self.tally.notifications += 1
        await self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def new_id(self, rng: random.Random | None = None):
        self.next_id += 1
        if rng is None or rng.random() < 0.8:
            return self.next_id
        return rng.choice([f"s-{self.next_id}", f"ïd-{self.next_id}-😋", -self.next_id, 2**53 + self.next_id])

    async def request(self, method: str, params=None, kind: str = "", msg_id=None, raw: dict | None = None,
                      want: bool = False, wait_for_room: bool = True) -> asyncio.Future | None:
        """Send a request that must be answered; `want`: return a future of its response."""
        if wait_for_room:
            async with self.room:
                await self.room.wait_for(lambda: len(self.pending) < self.in_flight or not self.alive)
        msg_id = self.new_id() if msg_id is None else msg_id
        key = json.dumps(msg_id)
        message = raw if raw is not None else {"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params}
        self.pending[key] = (kind or method, time.perf_counter())
        self.tally.requests += 1
        self.tally.by_kind[kind or method] += 1
        future = None
        if want:
            future = asyncio.get_running_loop().create_future()
            self.waiters[key] = future
        await self.send(message)
        return future

    async def malformed(self, data: bytes, kind: str, msg_id: str | None = None) -> None:
        self.tally.malformed_frames[kind] += 1
        if msg_id is not None:
            self.malformed_ids.add(json.dumps(msg_id))
        await self.write(data)

    # -- reading ----------------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            await self._read_messages()
        finally:
            await self._wake()  # senders waiting for room must see that the server is gone

    async def _read_messages(self) -> None:
        stdout = self.proc.stdout
        while True:
            length = None
            while True:
                line = await stdout.readline()
                if not line:
                    return
                if line in (b"\r\n", b"\n"):
                    break
                name, _, value = line.decode("ascii", "replace").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
                elif name.strip().lower() != "content-type":
                    self.tally.stdout_garbage += 1
            if length is None:
                self.tally.stdout_garbage += 1
                continue
            body = await stdout.readexactly(length)
            try:
                message = json.loads(body)
            except ValueError:
                self.tally.stdout_garbage += 1
                continue
            await self._dispatch(message)

    async def _dispatch(self, message: dict) -> None:
        if "method" in message and "id" in message:
            await self._answer_server_request(message)
        elif "method" in message:
            if message["method"] == "sdsat/status":
                self.statuses.append(message.get("params") or {})
        else:
            self._on_response(message)

    async def _answer_server_request(self, message: dict) -> None:
        method = message["method"]
        if method == "workspace/configuration":
            items = (message.get("params") or {}).get("items") or [{}]
            result = [self.config for _ in items]
            await self.send({"jsonrpc": "2.0", "id": message["id"], "result": result})
        elif method in ("window/workDoneProgress/create", "client/registerCapability"):
            await self.send({"jsonrpc": "2.0", "id": message["id"], "result": None})
        else:
            await self.send({"jsonrpc": "2.0", "id": message["id"],
                             "error": {"code": -32601, "message": f"the stress driver does not serve {method}"}})

    def _on_response(self, message: dict) -> None:
        key = json.dumps(message.get("id"))
        error = message.get("error")
        entry = self.pending.pop(key, None)
        if entry is None:
            if message.get("id") is None:
                self.tally.null_id_errors[str((error or {}).get("code"))] += 1
            elif key in self.malformed_ids:
                self.tally.malformed_answered += 1
            else:
                self.tally.unexpected_responses += 1
            return
        kind, sent = entry
        self.tally.answered += 1
        took_ms = (time.perf_counter() - sent) * 1e3
        self.tally.max_request_ms = max(self.tally.max_request_ms, took_ms)
        self.tally.max_ms_by_kind[kind] = max(self.tally.max_ms_by_kind.get(kind, 0.0), round(took_ms, 1))
        if error is not None:
            code = str(error.get("code"))
            self.tally.errors_by_code[code] += 1
            if len(self.tally.error_samples.setdefault(code, {})) < 6:
                self.tally.error_samples[code].setdefault(kind, str(error.get("message"))[:300])
        elif kind == "stats-poll":
            loop = (message.get("result") or {}).get("eventLoop") or {}
            self.tally.max_loop_block_ms = max(self.tally.max_loop_block_ms, float(loop.get("maxBlockMs") or 0))
            cache = (message.get("result") or {}).get("cache") or {}
            used = int(cache.get("bytes") or 0)
            self.tally.max_kv = max(self.tally.max_kv, used)
            self.tally.kv_samples += 1
            self.tally.max_poll_ms = max(self.tally.max_poll_ms, (time.perf_counter() - sent) * 1e3)
            if used > self.kv_budget:
                self.tally.kv_over_budget += 1
        elif kind.startswith("complete"):
            self.tally.completion_ms.append((time.perf_counter() - sent) * 1e3)
            self.tally.with_items += bool(((message.get("result") or {}).get("items")))
        waiter = self.waiters.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)
        asyncio.ensure_future(self._wake())

    async def _wake(self) -> None:
        async with self.room:
            self.room.notify_all()

    def stderr_tail(self, n: int = 3000) -> str:
        self.stderr.flush()
        self.stderr.seek(0, os.SEEK_END)
        size = self.stderr.tell()
        self.stderr.seek(max(0, size - n))
        return self.stderr.read().decode("utf-8", "replace")


async def wait_state(conn: Connection, states: tuple[str, ...], timeout: float) -> str:
    """The server's `sdsat/status` state once it is one of `states`; "dead" or "timeout" otherwise."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if conn.statuses and conn.statuses[-1].get("state") in states:
            return conn.statuses[-1]["state"]
        if not conn.alive:
            return "dead"
        await asyncio.sleep(0.05)
    return "timeout"
