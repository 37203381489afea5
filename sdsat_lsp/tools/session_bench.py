"""The editor-session benchmark: replay a realistic typing session over a real file against the
language server over stdio, as an editor would drive it, and report latency and cache reuse.

The session: the file's first third is open; the rest is typed line by line in bursts of a few
characters, with an inline completion request after each burst at the cursor (an editor's
debounced request); every `edit_every` lines a line is inserted in the middle of what has been
typed and a completion requested there (an edit elsewhere in the file). Requests are sequential,
so latency is the client-side wall time of each. The same session runs twice: with the
per-document KV cache and without it (`kvCache: false`).

Figures: `p50_ms`, `p95_ms`, `reprefill_fraction` (tokens prefilled / prompt tokens, summed over
requests, from the server's `sdsat/stats`), `requests`, `cancelled`, `typed_through` (requests
answered with no model pass: the text typed was the suggestion's start), and `nocache_p50_ms`,
`nocache_p95_ms`, `nocache_reprefill_fraction`, `nocache_typed_through`.

The bench CLI can call `run_editor_session(path, model=..., json_out=...)`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from ..jsonrpc import plain

log = logging.getLogger(__name__)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def session_steps(text: str, start_fraction: float = 1 / 3, burst: int = 8, edit_every: int = 25):
    """The session as (kind, payload) steps: ("open", text), ("type", (line, col, chars)),
    ("request", (line, col)). Positions count code points (ASCII files: equal to UTF-16)."""
    lines = text.splitlines(keepends=True)
    start = max(1, int(len(lines) * start_fraction))
    doc = lines[:start]
    yield "open", "".join(doc)
    for n, line in enumerate(lines[start:], 1):
        row = len(doc)
        doc.append("")
        for cut in range(0, len(line), burst):
            chunk = line[cut: cut + burst]
            yield "type", (row, len(doc[row]), chunk)
            doc[row] += chunk
            if chunk.endswith("\n"):
                # A newline moves the cursor to the next line: ask there, as an editor would.
                doc.append("")
                yield "request", (row + 1, 0)
                doc.pop()
            else:
                yield "request", (row, len(doc[row]))
        if n % edit_every == 0 and len(doc) > 4:
            middle = len(doc) // 2
            indent = doc[middle][: len(doc[middle]) - len(doc[middle].lstrip(" "))]
            insert = f"{indent}# edited while typing\n"
            yield "type", (middle, 0, insert)
            doc.insert(middle, insert)
            yield "request", (middle, len(insert) - 1)


async def _forward(stream) -> None:
    while stream is not None:
        line = await stream.readline()
        if not line:
            return
        log.debug("server: %s", line.decode("utf-8", "replace").rstrip())


async def _run_once(path: Path, settings: dict, server_cmd: list[str], timeout: float) -> dict:
    """One session on `path` against a fresh server started with `settings`: its figures."""
    from pygls.lsp.client import LanguageClient

    client = LanguageClient("sdsat-session-bench", "1")
    statuses: list[dict] = []

    @client.feature("sdsat/status")
    def on_status(params):
        statuses.append(plain(params))

    await client.start_io(*server_cmd)
    # pygls pipes the server's stderr and never reads it: drain it, or a chatty server blocks.
    drain = asyncio.ensure_future(_forward(client._server.stderr))
    await _initialize(client, settings)
    await _until_ready(statuses, timeout)
    await _until_compiled(client, timeout)
    uri = path.resolve().as_uri()
    latencies = await _replay(client, uri, path.read_text())
    report = plain(await client.protocol.send_request_async("sdsat/stats", {"uri": uri, "last": 100_000}))
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
    drain.cancel()
    return _figures(latencies, report)


async def _initialize(client, settings: dict) -> None:
    from lsprotocol import types

    caps = types.ClientCapabilities(text_document=types.TextDocumentClientCapabilities(
        inline_completion=types.InlineCompletionClientCapabilities()))
    await client.initialize_async(types.InitializeParams(capabilities=caps, initialization_options=settings))
    client.initialized(types.InitializedParams())


async def _until_ready(statuses: list[dict], timeout: float) -> None:
    """Until the server's sdsat/status says the model is ready (or raise on error or time out)."""
    deadline = time.perf_counter() + timeout
    while not statuses or statuses[-1]["state"] not in ("ready", "error"):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"the server did not get ready in {timeout} s")
        await asyncio.sleep(0.05)
    if statuses[-1]["state"] == "error":
        raise RuntimeError(f"the server could not load the model: {statuses[-1]['message']}")


async def _until_compiled(client, timeout: float) -> None:
    """The compiled forward builds in the background once the model is ready: time the session
    after it, so that the figures are those of a server that has been up a while. It runs at low
    priority, so on a busy machine it takes minutes: its own allowance."""
    deadline = time.perf_counter() + max(timeout, 900.0)
    while True:
        stats = plain(await client.protocol.send_request_async("sdsat/stats", {"last": 0}))
        compiled = (stats or {}).get("compiled") or {}
        if compiled.get("state") != "compiling":
            return
        if time.perf_counter() > deadline:
            raise TimeoutError(f"the server's forward did not compile in {timeout} s")
        await asyncio.sleep(0.5)


async def _replay(client, uri: str, text: str) -> list[float]:
    """The session's steps sent as an editor sends them; the wall time of each request, in ms."""
    from lsprotocol import types

    version = 1
    latencies: list[float] = []
    for kind, payload in session_steps(text):
        if kind == "open":
            client.text_document_did_open(types.DidOpenTextDocumentParams(text_document=types.TextDocumentItem(
                uri=uri, language_id="python", version=version, text=payload)))
        elif kind == "type":
            row, col, chunk = payload
            version += 1
            at = types.Position(row, col)
            client.text_document_did_change(types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
                content_changes=[types.TextDocumentContentChangePartial(range=types.Range(at, at), text=chunk)]))
        else:
            row, col = payload
            started = time.perf_counter()
            await client.text_document_inline_completion_async(types.InlineCompletionParams(
                text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(row, col),
                context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic)))
            latencies.append((time.perf_counter() - started) * 1e3)
    return latencies


def _figures(latencies: list[float], report: dict) -> dict:
    """One session's figures from the client's latencies and the server's sdsat/stats."""
    reqs = report["requests"]
    prompt = sum(r.get("promptTokens", 0) for r in reqs)
    prefilled = sum(r.get("prefillTokens", 0) for r in reqs)
    return {
        "p50_ms": round(statistics.median(latencies), 1) if latencies else 0.0,
        "p95_ms": round(_percentile(latencies, 0.95), 1),
        "reprefill_fraction": round(prefilled / prompt, 4) if prompt else 0.0,
        "requests": len(latencies),
        "cancelled": sum(1 for r in reqs if r.get("finishReason") == "cancelled"),
        "typed_through": sum(1 for r in reqs if r.get("typedThrough")),
        "prompt_tokens": prompt,
        "prefill_tokens": prefilled,
        "server_p50_ms": round(statistics.median([r["totalMs"] for r in reqs]), 1) if reqs else 0.0,
        "mean_drafts_accepted": round(statistics.mean([r.get("draftsAccepted", 0) for r in reqs]), 2) if reqs else 0.0,
        "model": report.get("model"),
        "compiled": report.get("compiled"),
        "latencies_ms": [round(v, 1) for v in latencies],
    }


def run_editor_session(file: str | Path, *, model: str | None = None, settings: dict | None = None,
                       json_out: str | Path | None = None, timeout: float = 300.0) -> dict:
    """Replay the session on `file` with and without the KV cache; returns (and writes) the figures."""
    path = Path(file)
    base = {"lineMode": "single", **(settings or {})}
    if model:
        base["model"] = str(model)
    cmd = [sys.executable, "-m", "sdsat_lsp.cli", "--stdio"]
    cached = asyncio.run(_run_once(path, {**base, "kvCache": True}, cmd, timeout))
    uncached = asyncio.run(_run_once(path, {**base, "kvCache": False}, cmd, timeout))
    result = {k: cached[k] for k in ("p50_ms", "p95_ms", "reprefill_fraction", "requests", "cancelled", "typed_through")}
    result.update(
        nocache_p50_ms=uncached["p50_ms"], nocache_p95_ms=uncached["p95_ms"],
        nocache_reprefill_fraction=uncached["reprefill_fraction"], nocache_typed_through=uncached["typed_through"],
        file=str(path), file_tokens_prompted=cached["prompt_tokens"], server_p50_ms=cached["server_p50_ms"],
        mean_drafts_accepted=cached["mean_drafts_accepted"], model=cached["model"], settings=base,
        latencies_ms=cached["latencies_ms"], nocache_latencies_ms=uncached["latencies_ms"], compiled=cached["compiled"],
    )
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":  # python -m sdsat_lsp.tools.session_bench FILE [MODEL] [settings-json]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    out = run_editor_session(sys.argv[1], model=sys.argv[2] if len(sys.argv) > 2 else None,
                             settings=json.loads(sys.argv[3]) if len(sys.argv) > 3 else None)
    print(json.dumps(out, indent=2))
