"""`sdsat-lsp stress`: drive the language server over stdio with a seeded storm of valid and hostile
traffic, and check that nothing is lost.

The server runs as a subprocess (`python -m sdsat_lsp.cli --stdio`), as an editor runs it. The
driver speaks JSON-RPC itself, writing raw bytes, so that it can send what no LSP client library
would: negative positions, broken frames, invalid UTF-8. The storm, in a seeded order:

- typing and completing in 100 open documents (real standard-library files), bursts of requests
  on one document (with and without `$/cancelRequest`) and across documents;
- positions past the end and negative, unknown URIs, didChange ranges out of bounds, reversed,
  and several overlapping changes in one notification, for unknown documents, with stale versions;
- a 5 MB document, a document of one huge line, binary content and invalid UTF-8, lone surrogates,
  surrogate pairs and combining characters at the cursor, form feeds and CR line ends;
- requests while the model loads, at start and after configuration changes that reload it (a
  model path that does not exist, then the good one again); valid and invalid settings mid-stream;
- malformed frames: bodies that are not JSON, Content-Length too short, too long, huge, in lower
  case or missing, junk between frames; requests that cannot be served (unknown method, invalid
  params, no "jsonrpc").

Accounting: a request is a message with an id the server can read; every one must be answered (a
result or a JSON-RPC error). Frames broken on purpose are counted apart (`malformed_frames`): the
server cannot know what they asked, but it must answer the ones it can still parse and keep the
stream in step for the messages after them. Meanwhile the server's RSS (psutil) and the KV cache's
bytes (`sdsat/stats`) are sampled. After the storm, greedy completions for a fixed set of prompts
(on fresh documents, then after an edit that hits their cache) must equal plain AR decoding of the
same prompts by the same model in this process (`identical_after`).

JSON: requests, answered, unanswered, crashes, errors_by_code, malformed_frames, max_rss_mb,
kv_budget_mb, max_kv_mb, max_request_ms, max_event_loop_block_ms, identical_after, seconds, and
details (see `run_stress`). `max_event_loop_block_ms` is the server's own figure (`sdsat/stats`
eventLoop.maxBlockMs: how late a 50 ms tick on its event loop ever ran); `max_stats_poll_ms`, the
longest round trip of the monitor's `sdsat/stats` polls (answered on the event loop without the
model), bounds it from the client's side (it includes the pipe and the messages queued ahead).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import sys
import time
from collections import Counter, deque
from pathlib import Path

from ..errors import SdsatError
from .lspclient import Connection, Mirror, Tally, utf16, wait_state

log = logging.getLogger(__name__)

SNIPPETS = ["x", "_", "(", ")", ".", "self.", " = ", "\n", "\n    ", "    return ", "é", "😋", "e\u0301", "ß", ":",
            "# TODO\n", "\t", "'", '"""']
STORM_SETTINGS = {"threads": 1, "maxTokens": 8, "timeBudgetMs": 400, "mode": "fused", "lineMode": "auto",
                  "kvCache": True, "temperature": 0.0, "topK": 0, "topP": 1.0, "seed": -1, "k": 0,
                  "maxPromptTokens": 1024, "maxSuffixTokens": 128, "fim": True, "enabled": True,
                  "quantize": "auto", "device": "auto", "dtype": "auto", "draftStore": "auto"}
FINAL_MAX_TOKENS = 16


# ----------------------------------------------------------------------------------------------
# The storm.


def _code_texts(rng: random.Random, n: int, max_chars: int = 40_000) -> list[str]:
    from ..corpus import python_files, read_text

    files = python_files()
    texts: list[str] = []
    for path in rng.sample(files, min(len(files), 3 * n)):
        text = read_text(path)
        if text:
            texts.append(text[:max_chars])
        if len(texts) == n:
            break
    return texts


def _unicode_text() -> str:
    return ('face = "😋😋"  # e\u0301 and 👨\u200d👩\u200d👧\n'
            "naïve = 'ﬁ' + \"\u0301\u0301\" + '𝒳'\n"
            "def 函数(参数):\n    return 参数 + '😋'\n")


def _special_texts(rng: random.Random) -> dict[str, str]:
    base = "def f(x):\n    return x + 1\n\n"
    return {
        "unicode": _unicode_text() * 3,
        "crlf": (base * 20).replace("\n", "\r\n"),
        "cr": (base * 20).replace("\n", "\r"),
        "formfeed": ("import os\x0c\n\n" + base) * 10 + "x = '\u2028 \x85 \x0b'\n" + base,
        "controls": "".join(chr(rng.randrange(0, 32)) for _ in range(2000)) + "\ndef g():\n    ",
        "surrogates": "s = '\ud800 lone \udfff'\n" + base,  # lone surrogates: JSON can carry them
    }


class Storm:
    """The seeded traffic (see the module doc), against one server at a time."""

    def __init__(self, conn: Connection, rng: random.Random, settings: dict, documents: int = 100):
        self.conn, self.rng, self.settings = conn, rng, settings
        self.docs: dict[str, Mirror] = {}
        self.n_documents = documents
        self.pool: list[str] = []
        self.uri_counter = 0
        self.model_swaps = 0
        self.recent: deque = deque(maxlen=40)  # (requests so far, action): what led to a crash

    # -- helpers ----------------------------------------------------------------------------------

    def new_uri(self, stem: str = "doc") -> str:
        self.uri_counter += 1
        return f"file:///stress/{stem}_{self.uri_counter}.py"

    async def open(self, uri: str, text: str, kind: str = "code") -> Mirror:
        mirror = Mirror(uri, text, kind)
        self.docs[uri] = mirror
        await self.conn.notify("textDocument/didOpen", {"textDocument": {
            "uri": uri, "languageId": "python", "version": 1, "text": text}})
        return mirror

    async def close(self, uri: str) -> None:
        self.docs.pop(uri, None)
        await self.conn.notify("textDocument/didClose", {"textDocument": {"uri": uri}})

    async def change(self, mirror: Mirror, changes: list[dict], version: int | None = None) -> None:
        mirror.version += 1
        await self.conn.notify("textDocument/didChange", {
            "textDocument": {"uri": mirror.uri, "version": mirror.version if version is None else version},
            "contentChanges": changes})

    async def resync(self, mirror: Mirror) -> None:
        """After an edit whose effect is undefined: the whole text (a change without a range)."""
        await self.change(mirror, [{"text": mirror.text}])

    async def complete(self, uri: str, position: dict, kind: str = "complete", want: bool = False):
        return await self.conn.request("textDocument/inlineCompletion", {
            "textDocument": {"uri": uri}, "position": position,
            "context": {"triggerKind": self.rng.choice([1, 2])}}, kind=kind, msg_id=self.conn.new_id(self.rng), want=want)

    def pick(self, kinds=("code",)) -> Mirror:
        choices = [m for m in self.docs.values() if m.kind in kinds]
        return self.rng.choice(choices) if choices else self.rng.choice(list(self.docs.values()))

    def cursor(self, mirror: Mirror) -> int:
        text = mirror.text
        offset = self.rng.randrange(len(text) + 1)
        if self.rng.random() < 0.6:  # at a line end, where completions are mostly asked for
            end = text.find("\n", offset)
            offset = len(text) if end < 0 else end
        return mirror.valid_offset(offset)

    async def configure(self, settings) -> None:
        await self.conn.notify("workspace/didChangeConfiguration", {"settings": settings})

    # -- phases -----------------------------------------------------------------------------------

    async def while_loading(self) -> None:
        """Requests before the model is ready: answered at once (empty)."""
        mirror = await self.open(self.new_uri("early"), "import os\n\ndef main():\n    return os.")
        for _ in range(10):
            await self.complete(mirror.uri, mirror.position(len(mirror.text)), kind="complete-loading")
            await self.conn.request("sdsat/stats", {"last": 1}, kind="stats")

    async def open_documents(self) -> None:
        self.pool = _code_texts(self.rng, self.n_documents + 40)
        for text in self.pool[: self.n_documents]:
            await self.open(self.new_uri(), text)
        for name, text in _special_texts(self.rng).items():
            await self.open(self.new_uri(name), text, kind=name)

    async def step(self) -> None:
        actions = [
            (30, self.type_and_complete), (12, self.complete_anywhere), (6, self.burst), (6, self.burst_cancel),
            (3, self.burst_across), (7, self.hostile_position), (4, self.unknown_uri), (6, self.bad_edit),
            (5, self.unicode_cursor), (2, self.binary), (3, self.config_change), (2, self.invalid_settings),
            (4, self.malformed), (4, self.invalid_request), (3, self.churn), (2, self.big_documents),
            (1, self.stats_garbage),
        ]
        total = sum(w for w, _ in actions)
        r = self.rng.uniform(0, total)
        for weight, action in actions:
            r -= weight
            if r <= 0:
                break
        self.recent.append((self.conn.tally.requests, action.__name__))
        await action()

    # -- valid traffic ----------------------------------------------------------------------------

    async def type_and_complete(self) -> None:
        mirror = self.pick()
        at = self.cursor(mirror)
        for _ in range(self.rng.randint(1, 3)):
            if self.rng.random() < 0.25 and at > 0:
                start = mirror.valid_offset(max(0, at - self.rng.randint(1, 3)))
                await self.change(mirror, [mirror.edit(start, at, "")])
                at = start
            else:
                new = self.rng.choice(SNIPPETS)
                await self.change(mirror, [mirror.edit(at, at, new)])
                at += len(new)
        await self.complete(mirror.uri, mirror.position(at))

    async def complete_anywhere(self) -> None:
        mirror = self.pick(kinds=("code", "unicode", "crlf", "cr", "formfeed", "controls", "surrogates", "binary"))
        await self.complete(mirror.uri, mirror.position(self.cursor(mirror)))

    async def burst(self, cancel: bool = False) -> None:
        """Keystrokes faster than completions: each request supersedes the one before."""
        mirror = self.pick()
        at = self.cursor(mirror)
        sent = []
        for _ in range(self.rng.randint(3, 12)):
            new = self.rng.choice(SNIPPETS[:8])
            await self.change(mirror, [mirror.edit(at, at, new)])
            at += len(new)
            msg_id = self.conn.new_id(self.rng)
            await self.conn.request("textDocument/inlineCompletion", {
                "textDocument": {"uri": mirror.uri}, "position": mirror.position(at), "context": {"triggerKind": 2}},
                kind="complete-burst-cancel" if cancel else "complete-burst", msg_id=msg_id)
            sent.append(msg_id)
            if cancel and len(sent) > 1 and self.rng.random() < 0.8:
                self.conn.tally.cancel_sent += 1
                await self.conn.notify("$/cancelRequest", {"id": sent[-2]})
            if self.rng.random() < 0.3:
                await asyncio.sleep(self.rng.uniform(0, 0.02))
        if cancel and self.rng.random() < 0.3:
            self.conn.tally.cancel_sent += 1
            await self.conn.notify("$/cancelRequest", {"id": sent[-1]})  # even the newest

    async def burst_cancel(self) -> None:
        await self.burst(cancel=True)

    async def burst_across(self) -> None:
        for _ in range(self.rng.randint(5, 15)):
            mirror = self.pick()
            await self.complete(mirror.uri, mirror.position(self.cursor(mirror)), kind="complete-across")

    # -- hostile traffic --------------------------------------------------------------------------

    async def hostile_position(self) -> None:
        mirror = self.pick(kinds=("code", "unicode", "crlf", "formfeed"))
        lines = mirror.lines()
        odd = [-1, -(2**31), lines, lines + 7, 2**31 - 1, 2**31, 2**53, 10**30, 1.5, "3", None, True, [], {}]
        line = self.rng.choice(odd + [self.rng.randrange(lines)] * 4)
        character = self.rng.choice(odd + [0, 10_000, self.rng.randrange(200)] * 3)
        await self.complete(mirror.uri, {"line": line, "character": character}, kind="complete-hostile")

    async def unknown_uri(self) -> None:
        uri = self.rng.choice(["file:///never/opened.py", "untitled:Untitled-1", "", "file:///%ZZ%", "x" * 5000,
                               "file:///stress/doc_1.py#frag", "file:///stress/DOC_1.py", "file://host/share/a.py",
                               "file:///stress/doc_1.py?q=1", "\u0000", "file:///caf%C3%A9.py"])
        await self.complete(uri, {"line": self.rng.randrange(10), "character": self.rng.randrange(10)},
                            kind="complete-unknown-uri")

    async def bad_edit(self) -> None:
        mirror = self.pick(kinds=("code", "unicode", "crlf", "cr"))
        lines, r = mirror.lines(), self.rng.random()
        if r < 0.3:  # several changes in one notification, each on the text the previous one left
            changes = []
            at = self.cursor(mirror)
            for _ in range(self.rng.randint(2, 6)):
                start = mirror.valid_offset(max(0, at - self.rng.randint(0, 20)))
                end = mirror.valid_offset(min(len(mirror.text), start + self.rng.randint(0, 30)))
                changes.append(mirror.edit(start, end, self.rng.choice(SNIPPETS)))
                at = start
            await self.change(mirror, changes)
            await self.complete(mirror.uri, mirror.position(mirror.valid_offset(at)), kind="complete-after-edit")
            return
        if r < 0.4:  # a change for a document that is not open
            await self.conn.notify("textDocument/didChange", {"textDocument": {"uri": self.new_uri("closed"), "version": 2},
                                                              "contentChanges": [{"range": _range(0, 0, 0, 0), "text": "z"}]})
            return
        if r < 0.5:  # a stale version, otherwise valid
            at = self.cursor(mirror)
            await self.change(mirror, [mirror.edit(at, at, "v")], version=1)
            await self.complete(mirror.uri, mirror.position(at + 1), kind="complete-after-edit")
            return
        bad = self.rng.choice([
            _range(lines + 5, 0, lines + 9, 3),  # past the end
            _range(0, 10_000, 1, 20_000),  # past the line ends
            _range(min(5, lines - 1), 8, 0, 2),  # reversed
            _range(-1, 0, 2, 0),  # negative
            _range(2**31, 0, 2**31, 0),
            {"start": {"line": 0}, "end": None},  # not a range at all
        ])
        change = {"range": bad, "text": self.rng.choice(SNIPPETS + [None, 5])}
        if self.rng.random() < 0.5:
            change["rangeLength"] = self.rng.choice([-1, 0, 10**9])
        mirror.version += 1
        await self.conn.notify("textDocument/didChange", {"textDocument": {"uri": mirror.uri, "version": mirror.version},
                                                          "contentChanges": [change]})
        await self.complete(mirror.uri, mirror.position(self.cursor(mirror)), kind="complete-after-bad-edit")
        await self.resync(mirror)  # what the server made of the bad edit is undefined

    async def unicode_cursor(self) -> None:
        """Cursors inside and around surrogate pairs, after combining marks and ZWJ sequences."""
        mirror = self.pick(kinds=("unicode",))
        line_no = self.rng.randrange(mirror.lines())
        start = 0
        for _ in range(line_no):
            start = mirror.text.find("\n", start) + 1
        end = mirror.text.find("\n", start)
        line = mirror.text[start: len(mirror.text) if end < 0 else end]
        for _ in range(self.rng.randint(1, 4)):
            column = self.rng.randrange(utf16(line) + 2)  # includes halves of pairs and one past the end
            await self.complete(mirror.uri, {"line": line_no, "character": column}, kind="complete-unicode")
        # Type a combining mark or an astral character at a real cursor, then complete after it.
        at = start + self.rng.randrange(len(line) + 1)
        new = self.rng.choice(["\u0301", "😋", "👨\u200d👩\u200d👧", "𝒳", "e\u0301"])
        await self.change(mirror, [mirror.edit(at, at, new)])
        await self.complete(mirror.uri, mirror.position(at + len(new)), kind="complete-unicode")

    async def binary(self) -> None:
        uri = self.new_uri("binary")
        raw = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(10, 3000)))
        # The text as JSON carries it except for invalid UTF-8, written raw into the string.
        body_text = json.dumps(raw.decode("latin-1"))[1:-1].encode()
        invalid = b"\xff\xfe\xc3(\xa0\xa1\xe2\x28\xa1\xf0\x90\x28\xbc\xed\xa0\x80"
        text_bytes = body_text + invalid + b"\\n\\ndef f():\\n    "
        params = b'{"textDocument": {"uri": "%s", "languageId": "python", "version": 1, "text": "%s"}}' % (
            uri.encode(), text_bytes)
        body = b'{"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": %s}' % params
        await self.conn.write(self.conn.frame(body))
        self.conn.tally.notifications += 1
        server_text = json.loads(b'"' + text_bytes.decode("utf-8", "replace").encode() + b'"')
        mirror = Mirror(uri, server_text, "binary")
        self.docs[uri] = mirror
        await self.complete(uri, mirror.position(len(server_text)), kind="complete-binary")
        await self.complete(uri, mirror.position(self.rng.randrange(len(server_text) + 1)), kind="complete-binary")
        if self.rng.random() < 0.5:
            await self.close(uri)

    async def config_change(self) -> None:
        """Valid settings mid-stream; always on top of the storm's own, so that they do not drift."""
        changed = dict(self.settings)
        for key, values in [("maxTokens", [1, 2, 4, 8, 12]), ("mode", ["fused", "two-pass", "ar"]), ("k", [0, 1, 3, 6]),
                            ("lineMode", ["auto", "single", "multi"]), ("kvCache", [True, False]),
                            ("temperature", [0.0, 0.8]), ("topK", [0, 5]), ("topP", [1.0, 0.9]), ("seed", [-1, 7]),
                            ("timeBudgetMs", [0, 50, 400]), ("maxPromptTokens", [16, 64, 256, 1024]),
                            ("maxSuffixTokens", [0, 16, 128]), ("fim", [True, False]), ("enabled", [True, True, False])]:
            if self.rng.random() < 0.25:
                changed[key] = self.rng.choice(values)
        style = self.rng.random()
        if style < 0.2:
            # A pull-model client says only that something changed: the server asks for the section.
            self.conn.config = changed
            await self.configure(None)
        else:
            await self.configure({"sdsat": changed} if style < 0.6 else changed)
        for _ in range(self.rng.randint(1, 4)):
            mirror = self.pick()
            await self.complete(mirror.uri, mirror.position(self.cursor(mirror)), kind="complete-after-config")
        await self.restore_settings()

    async def restore_settings(self) -> None:
        self.conn.config = dict(self.settings)
        await self.configure(dict(self.settings))

    async def invalid_settings(self) -> None:
        bad = self.rng.choice([
            {"draftStore": "/", "cacheBudgetMb": 2**24},  # the whole filesystem, 16 TiB: refused
            {"maxTokens": 7, "extra": {"jsonrpc": "2.0", "method": "exit"}},  # a setting, not a message
            {"maxTokens": "many", "temperature": "hot", "mode": "bogus", "k": -3, "topP": 0, "lineMode": 7,
             "kvCache": "yes", "nonsense": 1, "seed": 2**70, "maxPromptTokens": None},
            {"timeBudgetMs": -5, "topK": 1.5, "fim": "no", "enabled": 0},
            ["not", "an", "object"], "a string", 42, {"sdsat": 5}, {"sdsat": {"maxTokens": {"a": 1}}},
        ])
        await self.configure(bad)
        mirror = self.pick()
        await self.complete(mirror.uri, mirror.position(self.cursor(mirror)), kind="complete-after-config")
        await self.restore_settings()
        if self.rng.random() < 0.15 and self.model_swaps < 8:
            await self.model_swap()

    async def model_swap(self) -> None:
        """A model that cannot load (path missing, or no such device), requests meanwhile, then the
        good model again, with requests while it loads."""
        self.model_swaps += 1
        # A hub id must not be downloaded (no --allow-download): an error at once, no network.
        broken = self.rng.choice([{"model": "/no/such/model/folder"}, {"device": "cuda:7"}, {"quantize": "bogus"},
                                  {"model": "gpt2"}, {"model": "someone/a-hub-model"}])
        await self.configure({**self.settings, **broken})
        for _ in range(5):
            mirror = self.pick()
            await self.complete(mirror.uri, mirror.position(self.cursor(mirror)), kind="complete-model-error")
        await asyncio.sleep(0.2)
        await self.restore_settings()
        for _ in range(5):
            mirror = self.pick()
            await self.complete(mirror.uri, mirror.position(self.cursor(mirror)), kind="complete-while-loading")

    async def malformed(self) -> None:
        conn, rng = self.conn, self.rng
        tag = f"m-{conn.next_id}-{rng.randrange(10**6)}"
        good = json.dumps({"jsonrpc": "2.0", "id": tag, "method": "sdsat/stats", "params": {"last": 0}}).encode()
        variant = rng.choice(["not-json", "short-length", "long-length", "lowercase-header", "no-length",
                              "bad-length", "huge-length", "lf-only", "not-an-object", "junk-between", "split-write",
                              "extra-headers", "empty-body"])
        if variant == "not-json":
            body = rng.choice([b"{not json", b"\x00\x01\x02", b"{\"jsonrpc\": \"2.0\", \"id\": 1,", b"[" * 50 + b"1"])
            await conn.malformed(conn.frame(body), variant)
        elif variant == "short-length":
            cut = rng.randint(1, len(good) - 1)
            await conn.malformed(b"Content-Length: %d\r\n\r\n" % cut + good, variant, tag)
        elif variant == "long-length":
            pad = rng.randint(1, 50)
            await conn.malformed(b"Content-Length: %d\r\n\r\n" % (len(good) + pad) + good + b"x" * pad, variant, tag)
        elif variant == "lowercase-header":
            await conn.malformed(b"content-length: %d\r\n\r\n" % len(good) + good, variant, tag)
        elif variant == "no-length":
            await conn.malformed(b"Content-Type: application/vscode-jsonrpc; charset=utf-8\r\n\r\n" + good, variant, tag)
        elif variant == "bad-length":
            value = rng.choice([b"-5", b"abc", b"1e3", b"", b"0x20", b"\xff"])
            await conn.malformed(b"Content-Length: " + value + b"\r\n\r\n" + good, variant, tag)
        elif variant == "huge-length":
            value = rng.choice([10**12, 2**63 - 1, 10**40])
            await conn.malformed(b"Content-Length: %d\r\n\r\n" % value + good, variant, tag)
        elif variant == "lf-only":
            await conn.malformed(b"Content-Length: %d\n\n" % len(good) + good, variant, tag)
        elif variant == "not-an-object":
            body = rng.choice([b"[]", b"42", b'"x"', b"null", b"[" + good + b"]", b"true"])
            await conn.malformed(conn.frame(body), variant, tag if body.startswith(b"[{") else None)
        elif variant == "junk-between":
            junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))).replace(b"\n", b" ")
            await conn.malformed(junk, variant)
        elif variant == "empty-body":
            await conn.malformed(b"Content-Length: 0\r\n\r\n", variant)
        elif variant == "split-write":
            # Not broken: one request written in pieces, as a pipe may deliver it.
            data = conn.frame(good)
            conn.pending[json.dumps(tag)] = ("split-write", time.perf_counter())
            conn.tally.requests += 1
            conn.tally.by_kind["split-write"] += 1
            cuts = sorted(rng.sample(range(1, len(data)), 3))
            for a, b in zip([0] + cuts, cuts + [len(data)]):
                await conn.write(data[a:b])
                await asyncio.sleep(0.001)
        else:  # extra headers: valid, and must be answered
            conn.pending[json.dumps(tag)] = ("extra-headers", time.perf_counter())
            conn.tally.requests += 1
            conn.tally.by_kind["extra-headers"] += 1
            await conn.write(b"Content-Length: %d\r\nContent-Type: application/vscode-jsonrpc; charset=utf-8\r\n"
                             b"X-Unknown: 1\r\n\r\n" % len(good) + good)

    async def invalid_request(self) -> None:
        """Requests with an id the server can read, that it cannot serve: each must get an error."""
        conn, rng = self.conn, self.rng
        msg_id = conn.new_id(rng)
        variant = rng.choice(["unknown-method", "invalid-params", "no-jsonrpc", "wrong-jsonrpc", "null-params",
                              "array-params", "method-number", "stats-array", "nested-jsonrpc", "no-params",
                              "second-initialize", "unusable-id", "deep-nesting"])
        if variant in ("unusable-id", "deep-nesting"):
            # Nobody can match the answer (id null) to these: counted as malformed frames.
            body = (json.dumps({"jsonrpc": "2.0", "id": rng.choice([[msg_id], {"id": msg_id}, 1.5, True]),
                                "method": "shutdown"}).encode() if variant == "unusable-id"
                    else b"[" * 100_000 + b"]" * 100_000)
            await conn.malformed(conn.frame(body), f"invalid-{variant}")
            return
        message = {"jsonrpc": "2.0", "id": msg_id, "method": "textDocument/inlineCompletion"}
        if variant == "unknown-method":
            message.update(method=rng.choice(["sdsat/nope", "textDocument/hover", "", "$/weird"]), params={})
        elif variant == "invalid-params":
            message["params"] = {"textDocument": {"uri": 5}, "position": "here"}
        elif variant == "no-jsonrpc":
            del message["jsonrpc"]
            message.update(method="sdsat/stats", params={})
        elif variant == "wrong-jsonrpc":
            message.update(jsonrpc=rng.choice(["1.0", "3.0", 2]), method="sdsat/stats", params={})
        elif variant == "null-params":
            message["params"] = None
        elif variant == "array-params":
            message["params"] = [1, 2, 3]
        elif variant == "method-number":
            message.update(method=5, params={})
        elif variant == "nested-jsonrpc":  # params, not messages: the stats must still be answered
            message.update(method="sdsat/stats", params={"x": {"jsonrpc": "2.0", "id": f"{msg_id}-inner",
                                                               "method": "shutdown"}})
        elif variant == "no-params":
            message["method"] = "sdsat/stats"
        elif variant == "second-initialize":
            message.update(method="initialize", params={"processId": None, "rootUri": None, "capabilities": {}})
        else:
            message.update(method="sdsat/stats", params=[1, "x"])
        await conn.request("", kind=f"invalid-{variant}", msg_id=msg_id, raw=message)

    async def churn(self) -> None:
        r = self.rng.random()
        codes = [u for u, m in self.docs.items() if m.kind == "code"]
        if r < 0.6 and codes and self.pool:
            await self.close(self.rng.choice(codes))
            await self.open(self.new_uri(), self.rng.choice(self.pool))
        elif r < 0.8 and codes:
            mirror = self.docs[self.rng.choice(codes)]
            await self.open(mirror.uri, mirror.text[: len(mirror.text) // 2])  # opened twice: the new text wins
        else:
            await self.conn.notify("textDocument/didClose", {"textDocument": {"uri": self.new_uri("never")}})

    async def big_documents(self) -> None:
        """A 5 MB document and one of a single huge line: opened once, completed and edited."""
        big = [m for m in self.docs.values() if m.kind in ("big", "hugeline")]
        if len(big) < 2:
            text = "\n".join(self.pool[:40])
            await self.open(self.new_uri("big"), (text * (5_000_000 // max(1, len(text)) + 1))[:5_000_000], kind="big")
            await self.open(self.new_uri("hugeline"), "x = [" + ", ".join(str(i) for i in range(250_000)), kind="hugeline")
            big = [m for m in self.docs.values() if m.kind in ("big", "hugeline")]
        mirror = self.rng.choice(big)
        at = mirror.valid_offset(self.rng.choice([len(mirror.text), len(mirror.text) // 2, self.rng.randrange(len(mirror.text))]))
        if self.rng.random() < 0.5:
            await self.change(mirror, [mirror.edit(at, at, self.rng.choice(SNIPPETS))])
        await self.complete(mirror.uri, mirror.position(at), kind="complete-big")

    async def stats_garbage(self) -> None:
        await self.conn.request("sdsat/stats", self.rng.choice([{"last": "many", "uri": 7}, {"last": -5}, None, [],
                                                                {"last": 10**9}]), kind="stats")


def _range(l1, c1, l2, c2) -> dict:
    return {"start": {"line": l1, "character": c1}, "end": {"line": l2, "character": c2}}


# ----------------------------------------------------------------------------------------------
# Running it.


def final_cases() -> list[tuple[str, int]]:
    """The fixed prompts of the identity check: (text, cursor offset); real code cut at fixed
    places, and the awkward characters of the storm before the cursor."""
    from ..corpus import cut_prompts

    cases = [(p.text, len(p.text)) for p in cut_prompts(5, seed=1234, max_chars=1200)]
    middle = cases[0][0]
    cases.append((middle, middle.find("\n", len(middle) // 2)))  # mid-file: text after the cursor
    unicode = _unicode_text() + "label = '😋 e\u0301' + face"
    cases.append((unicode, unicode.rindex("\u0301") + 1))  # after a combining mark, text after the cursor
    formfeed = "import os\x0c\n\ndef main():\n    \u2028\n    return os.getcwd"
    cases.append((formfeed, formfeed.index("getcwd") + 1))  # lines after a form feed and a U+2028
    crlf = "def f(x):\r\n    return x\r\n\r\ndef g(y):\r\n    "
    cases.append((crlf, len(crlf)))
    return cases


async def _stats(conn: Connection, timeout: float = 60) -> dict:
    future = await conn.request("sdsat/stats", {"last": 0}, kind="stats", want=True)
    reply = await asyncio.wait_for(future, timeout)
    return reply.get("result") or {}


class Run:
    """One stress run: server life cycle, monitor, storm, final check."""

    def __init__(self, opts: argparse.Namespace):
        self.opts = opts
        self.tally = Tally()
        self.rng = random.Random(opts.seed)
        self.settings = {**STORM_SETTINGS, "maxTokens": opts.max_tokens, "cacheBudgetMb": opts.kv_budget_mb,
                         "model": opts.model or ""}
        self.cmd = [sys.executable, "-m", "sdsat_lsp.cli", "--stdio"]
        if opts.server_log:  # the server's own account (one line per completion, loop stalls)
            self.cmd += ["-v", "--log-file", opts.server_log]
        self.conn: Connection | None = None
        self.rss_ready = self.rss_closed = 0
        self.started = time.perf_counter()
        self.hung = False

    async def start_server(self, storm: Storm | None = None) -> Connection:
        conn = Connection(self.cmd, self.tally, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        conn.kv_budget = self.opts.kv_budget_mb * 2**20
        conn.in_flight = self.opts.in_flight
        conn.config = dict(self.settings)
        await conn.start()
        self.conn = conn
        caps = {"window": {"workDoneProgress": True}, "general": {"positionEncodings": ["utf-16"]},
                "workspace": {"configuration": True, "didChangeConfiguration": {}},
                "textDocument": {"synchronization": {}, "inlineCompletion": {}}}
        init = await conn.request("initialize", {"processId": os.getpid(), "rootUri": None, "capabilities": caps,
                                                 "initializationOptions": self.settings}, kind="initialize", want=True)
        await asyncio.wait_for(init, 60)
        await conn.notify("initialized", {})
        if storm is not None:
            storm.conn = conn
        return conn

    async def monitor(self) -> None:
        import psutil

        last_print = 0.0
        while True:
            conn = self.conn
            if conn is not None and conn.alive:
                try:
                    rss = psutil.Process(conn.proc.pid).memory_info().rss
                    self.tally.max_rss = max(self.tally.max_rss, rss)
                except psutil.Error:
                    pass
                if not any(kind == "stats-poll" for kind, _ in conn.pending.values()):
                    # The KV cache's bytes, polled like any request (and counted), past the in-flight
                    # limit: the server answers it on its event loop, without waiting for the model.
                    asyncio.ensure_future(conn.request("sdsat/stats", {"last": 0}, kind="stats-poll",
                                                       wait_for_room=False))
                if conn.pending and time.perf_counter() - min(t for _, t in conn.pending.values()) > self.opts.stall_s:
                    # A request unanswered for that long: the server hangs. End it; the storm records it.
                    self.hung = True
                    conn.proc.kill()
            now = time.perf_counter()
            if now - last_print >= self.opts.progress_s:
                last_print = now
                self.progress()
            await asyncio.sleep(0.5)

    def progress(self) -> None:
        t, conn = self.tally, self.conn
        state = conn.statuses[-1].get("state") if conn and conn.statuses else "starting"
        print(f"stress: {self.storm_requests()}/{self.opts.requests} requests (+{t.by_kind['stats-poll']} polls), "
              f"{t.answered} answered, "
              f"{len(conn.pending) if conn else 0} pending, state {state}, rss {t.max_rss / 2**20:.0f} MB, "
              f"kv max {t.max_kv / 2**20:.2f}/{self.opts.kv_budget_mb} MB, crashes {len(t.crashes)}, "
              f"{time.perf_counter() - self.started:.0f} s", file=sys.stderr, flush=True)

    def storm_requests(self) -> int:
        """Requests sent so far, but the monitor's polls (they run at their own pace)."""
        return self.tally.requests - self.tally.by_kind["stats-poll"]

    async def on_crash(self, storm: Storm) -> bool:
        """The server died: record it, count what it took with it, start another (at most 3)."""
        conn = self.conn
        await asyncio.sleep(0.2)
        rc = conn.proc.returncode if conn.proc.returncode is not None else await conn.proc.wait()
        self.tally.lost += len(conn.pending)
        self.tally.lost_by_kind.update(kind for kind, _ in conn.pending.values())
        what = "hang" if self.hung else "exit"
        self.hung = False
        self.tally.crashes.append({"kind": what, "returncode": rc, "at_request": self.tally.requests,
                                   "recent_actions": list(storm.recent), "stderr_tail": conn.stderr_tail(2000)})
        print(f"stress: the server {'hung' if what == 'hang' else 'died'} (returncode {rc}) after "
              f"{self.tally.requests} requests", file=sys.stderr)
        conn.pending.clear()
        if len(self.tally.crashes) > 3:
            return False
        await self.start_server(storm)
        await wait_state(self.conn, ("ready",), self.opts.ready_timeout)
        for mirror in list(storm.docs.values()):
            await storm.open(mirror.uri, mirror.text, mirror.kind)
        return True

    async def drain(self) -> None:
        """Wait for the last answers (a request unanswered for --stall-s ends this: see `monitor`)."""
        while self.conn.pending and self.conn.alive:
            await asyncio.sleep(0.05)

    async def main(self) -> dict:
        opts = self.opts
        monitor = None
        storm = None
        try:
            storm = Storm(None, self.rng, self.settings, documents=opts.documents)
            await self.start_server(storm)
            monitor = asyncio.ensure_future(self.monitor())
            await storm.while_loading()
            state = await wait_state(self.conn, ("ready", "error"), opts.ready_timeout)
            if state != "ready":
                raise SdsatError(f"the server did not get ready ({state}): {self.conn.stderr_tail(1500)}")
            load_s = time.perf_counter() - self.started
            self.rss_ready = await self.rss_settled()
            await storm.open_documents()
            storm_started = time.perf_counter()
            while self.storm_requests() < opts.requests:
                if not self.conn.alive and not await self.on_crash(storm):
                    break
                await storm.step()
            await self.drain()
            storm_s = time.perf_counter() - storm_started
            final = await self.final_phase(storm) if self.conn.alive else None
            if self.conn.alive:
                self.rss_closed = await self.rss_after_closing(storm)
            monitor.cancel()  # no polls after shutdown: they would only be refused
            self.progress()
            exit_info = await self.stop_server()
        finally:
            if monitor is not None:
                monitor.cancel()
            if self.conn is not None and self.conn.alive:
                self.conn.proc.kill()
        identical = await asyncio.to_thread(check_identity, final) if final else {
            "identical_after": False, "why": "the server was not alive for the final check"}
        return self.report(load_s, storm_s, identical, exit_info)

    def rss(self) -> int:
        import psutil

        try:
            return psutil.Process(self.conn.proc.pid).memory_info().rss
        except (psutil.Error, AttributeError):
            return 0

    async def rss_settled(self, timeout: float = 180.0) -> int:
        """The RSS once the draft store and the compiled forward (built beside the worker after
        the model is ready) are done: the baseline that closing every document should return to."""
        until = time.perf_counter() + timeout
        while time.perf_counter() < until:
            stats = await _stats(self.conn)
            busy = {"building", "compiling"} & {(stats.get("draftStore") or {}).get("state"),
                                                 (stats.get("compiled") or {}).get("state")}
            if not busy:
                break
            await asyncio.sleep(1.0)
        return self.rss()

    async def rss_after_closing(self, storm: Storm) -> int:
        """The server's RSS once every document is closed: what closing gives back (the server
        returns freed memory on its worker after closes; a stats round trip waits for that)."""
        for uri in list(storm.docs):
            await storm.close(uri)
        await _stats(self.conn)
        await asyncio.sleep(2.0)
        return self.rss()

    async def final_phase(self, storm: Storm) -> dict:
        """Fixed prompts on fresh documents, then after an edit that reuses their KV cache, with the
        storm's settings but greedy, unbounded in time and longer."""
        conn = self.conn
        final = {**self.settings, "maxTokens": FINAL_MAX_TOKENS, "timeBudgetMs": 0, "deadlineMs": 0}
        conn.config = final
        await storm.configure(final)
        # Settings apply in order; wait until a reload they caused (if any) is over.
        for _ in range(3):
            await wait_state(conn, ("ready",), self.opts.ready_timeout)
            stats = await _stats(conn)
            if stats.get("state") == "ready" and stats["settings"]["maxTokens"] == FINAL_MAX_TOKENS:
                break
            await asyncio.sleep(0.5)
        answers = []
        for i, (text, offset) in enumerate(final_cases()):
            mirror = await storm.open(f"file:///stress/final/case_{i}.py", text, kind="final")
            first = await storm.complete(mirror.uri, mirror.position(offset), kind="complete-final", want=True)
            first = await asyncio.wait_for(first, 120)
            typed = " " if text[offset - 1: offset] not in (" ", "\n") else "x"
            await storm.change(mirror, [mirror.edit(offset, offset, typed)])
            second = await storm.complete(mirror.uri, mirror.position(offset + 1), kind="complete-final", want=True)
            second = await asyncio.wait_for(second, 120)
            answers.append({"text": text, "offset": offset, "typed": typed,
                            "answers": [_items(first), _items(second)]})
        stats = await _stats(conn)
        return {"answers": answers, "settings": stats.get("settings", final)}

    async def stop_server(self) -> dict:
        import psutil

        conn = self.conn
        children = []
        try:
            children = [p.pid for p in psutil.Process(conn.proc.pid).children(recursive=True)]
        except psutil.Error:
            pass
        shutdown = await conn.request("shutdown", None, kind="shutdown", want=True)
        try:
            await asyncio.wait_for(shutdown, 30)
        except asyncio.TimeoutError:
            pass
        await conn.notify("exit")
        started = time.perf_counter()
        try:
            rc = await asyncio.wait_for(conn.proc.wait(), 30)
        except asyncio.TimeoutError:
            rc = None
            conn.proc.kill()
        exit_s = time.perf_counter() - started
        orphans = [pid for pid in children if psutil.pid_exists(pid)]
        return {"exit_code": rc, "exit_s": round(exit_s, 2), "orphans": orphans}

    def report(self, load_s: float, storm_s: float, identical: dict, exit_info: dict) -> dict:
        t, conn = self.tally, self.conn
        unanswered = len(conn.pending) + t.lost
        ms = sorted(t.completion_ms)
        return {
            "requests": t.requests,
            "answered": t.answered,
            "unanswered": unanswered,
            "unanswered_by_kind": dict(t.lost_by_kind + Counter(kind for kind, _ in conn.pending.values())),
            "crashes": sum(c["kind"] == "exit" for c in t.crashes),
            "hangs": sum(c["kind"] == "hang" for c in t.crashes),
            "errors_by_code": dict(sorted(t.errors_by_code.items())),
            "error_samples": t.error_samples,
            "malformed_frames": sum(t.malformed_frames.values()),
            "malformed_by_kind": dict(sorted(t.malformed_frames.items())),
            "malformed_answered": t.malformed_answered,
            "null_id_errors": dict(t.null_id_errors),
            "unexpected_responses": t.unexpected_responses,
            "stdout_garbage": t.stdout_garbage,
            "max_rss_mb": round(t.max_rss / 2**20, 1),
            "rss_ready_mb": round(self.rss_ready / 2**20, 1),  # model, draft store and compiled step ready, no document
            "rss_after_close_mb": round(self.rss_closed / 2**20, 1),  # after the run, every document closed
            "max_request_ms": round(t.max_request_ms, 1),
            "max_event_loop_block_ms": round(t.max_loop_block_ms, 1),
            "max_request_ms_by_kind": dict(sorted(t.max_ms_by_kind.items(), key=lambda kv: -kv[1])),
            "kv_budget_mb": self.opts.kv_budget_mb,
            "max_kv_mb": round(t.max_kv / 2**20, 3),
            "kv_over_budget": t.kv_over_budget,
            "kv_samples": t.kv_samples,
            "max_stats_poll_ms": round(t.max_poll_ms, 1),
            **identical,
            "seconds": round(time.perf_counter() - self.started, 1),
            "load_s": round(load_s, 1),
            "storm_s": round(storm_s, 1),
            "requests_per_s": round(t.requests / storm_s, 1) if storm_s else 0.0,
            "completion_p50_ms": round(statistics.median(ms), 1) if ms else 0.0,
            "completion_p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 1) if ms else 0.0,
            "completions_with_items": t.with_items,
            "notifications": t.notifications,
            "cancel_requests": t.cancel_sent,
            "by_kind": dict(sorted(t.by_kind.items())),
            "crash_details": t.crashes,
            **exit_info,
            "seed": self.opts.seed,
            "model": self.settings["model"] or "default",
            "settings": self.settings,
        }


def _items(reply: dict) -> list[str] | str:
    if "error" in reply:
        return f"error {reply['error'].get('code')}: {reply['error'].get('message')}"
    return [item.get("insertText") for item in (reply.get("result") or {}).get("items") or []]


def reference_completion(loaded, settings, text: str, offset: int, keep: str | None = None) -> tuple[list[str], str]:
    """What the server should answer for a fresh greedy request: the server's own completion
    pipeline (completion.py), decoded by plain AR decoding with the same model; (items' texts,
    window head)."""
    import dataclasses

    from ..completion import complete

    greedy = dataclasses.replace(settings, temperature=0.0)
    done = complete(loaded, greedy, text, offset, keep=keep, mode="ar")
    return ([done.completion.text] if done.completion is not None else []), done.prompt.window_head


def check_identity(final: dict) -> dict:
    """Decode each final prompt with plain greedy AR decoding in this process, with the model and
    the prompt-building code the server uses, and compare with what the server answered."""
    import torch

    from ..embedded import resolve_model
    from ..settings import Settings, parse_settings

    settings, problems = parse_settings(final["settings"], Settings())
    if problems:
        return {"identical_after": False, "why": f"settings: {problems}"}
    torch.set_num_threads(max(1, settings.threads or 1))
    loaded = resolve_model(settings.model or None, quantize=settings.quantize, device=settings.device,
                           dtype=settings.dtype)
    mismatches = []
    compared = 0
    for case in final["answers"]:
        text, offset, typed = case["text"], case["offset"], case["typed"]
        keep = None
        for n, got in enumerate(case["answers"]):
            if n == 1:  # the same document after typing at the cursor: a KV cache hit on the server
                text, offset = text[:offset] + typed + text[offset:], offset + 1
            expected, keep = reference_completion(loaded, settings, text, offset, keep)
            compared += 1
            if got != expected:
                mismatches.append({"prompt_tail": text[max(0, offset - 60): offset], "request": n,
                                   "server": got, "reference": expected})
    return {"identical_after": not mismatches and compared > 0, "identical_compared": compared,
            "identical_mismatches": mismatches[:5]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=10_000, help="requests to send (default 10000)")
    p.add_argument("--json", dest="json_path", help="write the results here")
    p.add_argument("--model", help="model folder or hub id for the server (default: the default model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-budget-mb", type=int, default=64,
                   help="the server's KV cache budget, cacheBudgetMb (default 64: about ten full prompts of the default model)")
    p.add_argument("--max-tokens", type=int, default=8, help="the server's maxTokens during the storm")
    p.add_argument("--documents", type=int, default=100, help="documents open at once")
    p.add_argument("--in-flight", type=int, default=16, help="at most this many requests unanswered at a time")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the model to load")
    p.add_argument("--stall-s", type=float, default=300.0,
                   help="a request unanswered this long means the server hangs (it is killed and the hang counted)")
    p.add_argument("--progress-s", type=float, default=5.0, help="seconds between progress lines on stderr")
    p.add_argument("--server-log", help="the server logs here (-v --log-file): each completion's stats, event-loop stalls")


def run_stress(opts: argparse.Namespace) -> dict:
    """Run the storm; returns the JSON figures (and writes them to `opts.json_path` when set)."""
    if opts.requests < 1:
        raise SdsatError("--requests must be at least 1")
    result = asyncio.run(Run(opts).main())
    if getattr(opts, "json_path", None):
        Path(opts.json_path).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def passed(result: dict) -> bool:
    return (result["unanswered"] == 0 and result["crashes"] == 0 and result["hangs"] == 0 and result["identical_after"]
            and result["max_kv_mb"] <= result["kv_budget_mb"] and result["unexpected_responses"] == 0)


def main(args) -> int:
    result = run_stress(args)
    summary = {k: result[k] for k in ("requests", "answered", "unanswered", "crashes", "errors_by_code", "malformed_frames",
                                      "max_rss_mb", "kv_budget_mb", "max_kv_mb", "identical_after", "seconds")}
    print(json.dumps(summary, indent=2), file=sys.stderr)
    return 0 if passed(result) else 1
