"""The language server: thin pygls 2 handlers around the completion core (completion.py).

    editor --LSP--> handlers (event loop) --Job--> inference worker (one thread)
        document text + cursor -> completion.complete: prompt, healing, KV cache lease,
        SDSAT decode (cancellable between passes), completion rules -> item

- The event loop never waits on the model: each request becomes a `session.Job` run on a single
  worker thread (the model is used by one generation at a time). A newer request for a document
  cancels the older one (cancel-previous: Neovim never cancels superseded requests);
  `$/cancelRequest` cancels the awaiting handler, which sets the job's flag; the engine checks it
  before every pass. Per-document state is one `session.DocumentState` per URI.
- torch and transformers are imported, and the model loaded, on the worker after `initialized`
  (loading.py; so `initialize` is answered at once), reported with `$/progress`,
  `window/logMessage` and the custom `sdsat/status` notification ({state: loading|ready|error,
  message}). Until the model is ready, completion requests get an empty result.
- Settings (settings.py) come from `initializationOptions` and `workspace/didChangeConfiguration`
  (camelCase keys, optionally under "sdsat"); a value of the wrong type or out of range is
  reported with `window/showMessage` and replaced by its default.
- Positions are UTF-16 unless the client offers UTF-8/UTF-32 (pygls negotiates
  `general.positionEncodings`); offsets inside the server are code points.
- `sdsat/stats` answers per-request stats (prompt tokens, tokens reused, prefill/decode ms,
  drafts accepted), the KV cache's contents, the current settings, what was shown and accepted
  (items carry the `sdsat.accept` command: acceptance.py) and the prefetch's figures.

In the core only this module, `jsonrpc.py` (the repairs of pygls' protocol), `tcp.py`,
`document.py`, `replies.py` and `progress.py` import lsprotocol/pygls. The data flow of one keystroke: docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn
from urllib.parse import unquote

from lsprotocol import types
from pygls.exceptions import JsonRpcInternalError, JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer

from .acceptance import ACCEPT_COMMAND, SuggestionLog
from .document import Document, DocumentWorkspace
from .draftbuild import DraftStoreBuilder
from .errors import SdsatError
from .jsonrpc import LenientStdin, Protocol, plain
from .kvcache import KVCacheStore
from .loading import load_blocking
from . import faults, jobs, prefetch, session
from .progress import ProgressBar
from .replies import accept_command, completion_items, inline_items, stats_reply
from .session import Documents, Job, Outcome, return_memory
from .settings import RELOAD_KEYS, Settings, from_command_line, parse_settings
from .tcp import new_token, parse_address, serve_tcp

log = logging.getLogger(__name__)
_IMPORTED = time.perf_counter()

STATUS = "sdsat/status"
STATS = "sdsat/stats"
CONFIG_SECTION = "sdsat"  # the settings section pulled with workspace/configuration
CONFIG_PULL_TIMEOUT_S = 2.0
LOOP_TICK_S = 0.05
CLIENT_REQUEST_TIMEOUT_S = 2.0  # any other request to the client (progress creation): never wait longer
MAX_PROBLEMS_SHOWN = 10
MAX_POPUP_CHARS = 900


class SdsatServer(LanguageServer):
    """pygls server plus the model, the KV cache store and the worker."""

    def __init__(self, cli_settings: Settings | None = None):
        super().__init__("sdsat-lsp", _version(), text_document_sync_kind=types.TextDocumentSyncKind.Incremental,
                         protocol_cls=Protocol)
        self.settings = cli_settings or Settings()
        self.state = "starting"  # starting | loading | ready | error
        self.state_message = ""
        self.loaded = None  # model.LoadedModel once ready
        self.kv: KVCacheStore | None = None  # the documents' KV caches, once the model is loaded
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdsat-infer")
        self.docs = Documents()  # per document: its newest job and prompt window
        self.recent: deque[dict] = deque(maxlen=256)  # appended by the worker, read by sdsat/stats
        self.recent_lock = threading.Lock()  # iterating a deque while another thread appends raises
        self.seq = itertools.count(1)
        self.loop: asyncio.AbstractEventLoop | None = None
        # watch_loop's task, from initialize: held, as asyncio keeps only a weak reference to a task.
        self.loop_watch: asyncio.Task | None = None
        self.load_task: asyncio.Task | None = None
        self.startup: dict[str, Any] = {}  # when initialize was answered, whether torch was in yet
        self.drafts = DraftStoreBuilder(self.from_worker)  # the draft store, built beside the worker
        self.compile_info: dict = {"state": "off"}  # the compiled forward's state (start_compile)
        self.loop_block_ms = 0.0  # the longest the event loop was late for its watch (see watch_loop)
        self.trim_pending = False  # a return_memory is queued on the worker
        self.suggestions = SuggestionLog()  # what was shown and accepted (acceptance.py)
        self.activity = prefetch.Activity()  # requests, edits and settings: a prefetch stops when it moves
        self.prefetched = prefetch.PrefetchStats()

    # -- notifications to the client (always from the event loop thread) --------------------------

    def set_state(self, state: str, message: str) -> None:
        self.state, self.state_message = state, message
        log.info("status %s: %s", state, message)
        self.protocol.notify(STATUS, {"state": state, "message": message})

    def log_to_client(self, message: str, kind: types.MessageType = types.MessageType.Info) -> None:
        self.window_log_message(types.LogMessageParams(type=kind, message=message))

    def warn_user(self, message: str, kind: types.MessageType = types.MessageType.Warning) -> None:
        log.warning("%s", message)
        if len(message) > MAX_POPUP_CHARS:  # a popup is for a person to read (values can be huge)
            message = message[: MAX_POPUP_CHARS - 3] + "..."
        self.window_show_message(types.ShowMessageParams(type=kind, message=f"sdsat-lsp: {message}"))

    def from_worker(self, fn, *args) -> None:
        """Run `fn(*args)` on the event loop (pygls writes are not thread-safe)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(fn, *args)

    async def watch_loop(self) -> None:
        """How long the event loop is ever kept from running (a handler doing O(document) work on a
        keystroke, say): a tick every LOOP_TICK_S, late by at most a few ms on a healthy loop."""
        loop = asyncio.get_running_loop()
        session.log_slow_collections()
        while True:
            before = loop.time()
            await asyncio.sleep(LOOP_TICK_S)
            late_ms = (loop.time() - before - LOOP_TICK_S) * 1e3
            self.loop_block_ms = max(self.loop_block_ms, late_ms)
            if late_ms > 100:  # PYTHONASYNCIODEBUG=1 names the callback that took the time
                log.warning("the event loop was blocked for %.0f ms", late_ms)

    # -- settings ---------------------------------------------------------------------------------

    def apply_settings(self, raw: Any, source: str) -> None:
        new, problems = parse_settings(raw, self.settings)
        if problems:
            shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
            more = f"; and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
            self.warn_user(f"invalid {source} settings ({shown}{more})")
        old, self.settings = self.settings, new
        self.activity.bump()
        if self.kv is not None:
            self.kv.set_budget(new.cache_budget_mb * 2**20)
            if new.kv_cache != self.kv.enabled:
                self.kv.enabled = new.kv_cache
                if not new.kv_cache:
                    self.kv.clear()
        if self.state != "starting" and any(getattr(old, k) != getattr(new, k) for k in RELOAD_KEYS):
            self.start_loading()
        elif self.kv is not None and old.draft_store != new.draft_store:
            self.start_draft_store()
        if self.state != "starting" and self.kv is not None and old.compile != new.compile and not any(
                getattr(old, k) != getattr(new, k) for k in RELOAD_KEYS):
            self.start_compile()

    def supports_configuration_pull(self) -> bool:
        workspace = self.client_capabilities.workspace
        return bool(workspace and workspace.configuration)

    async def pull_configuration(self) -> None:
        """Ask the client for its "sdsat" section (workspace/configuration). A client that does not
        answer in time keeps the settings we have: loading must not wait on it forever."""
        if not self.supports_configuration_pull():
            return
        request = types.ConfigurationParams(items=[types.ConfigurationItem(section=CONFIG_SECTION)])
        try:
            values = await asyncio.wait_for(self.workspace_configuration_async(request), CONFIG_PULL_TIMEOUT_S)
        except Exception as exc:  # a timeout or an error reply: not fatal
            log.warning("workspace/configuration failed (%s); keeping the current settings", exc or type(exc).__name__)
            return
        value = values[0] if isinstance(values, (list, tuple)) and values else None
        log.info("workspace/configuration: %r", value)
        if value is not None:
            self.apply_settings(plain(value), "workspace/configuration")

    def report_server_error(self, error: Exception, source) -> None:
        """A message body that is not JSON, or nested too deeply to parse, gets the JSON-RPC parse
        error (id null), as the spec asks, instead of silence; the connection goes on with the next
        message. Anything else is logged here and in the client's log, never as a popup: what a
        client sends wrong (a change to a document it never opened, a malformed message) is not the
        user's to deal with."""
        if isinstance(error, (json.JSONDecodeError, RecursionError)):
            self.protocol.send_parse_error(error)
            return
        log.error("%s: %s: %s", getattr(source, "__name__", source), type(error).__name__, error,
                  exc_info=(type(error), error, error.__traceback__))
        self.log_to_client(f"sdsat-lsp: {type(error).__name__}: {str(error)[:200]}", types.MessageType.Error)

    # -- model loading ----------------------------------------------------------------------------

    def start_loading(self) -> None:
        if self.load_task is not None and not self.load_task.done():
            self.load_task.cancel()  # the worker finishes that load, then loads again
        self.load_task = asyncio.ensure_future(self._load())

    async def _load(self) -> None:
        settings = self.settings
        what = settings.model or "the default model"
        self.retire_model()
        self.drafts.reset()
        self.set_state("loading", f"loading {what}")
        self.log_to_client(f"sdsat-lsp: loading {what} (torch and transformers import first)")
        bar = await ProgressBar.open(self, f"loading {what}", CLIENT_REQUEST_TIMEOUT_S)
        loop = asyncio.get_running_loop()
        # Importing torch and transformers makes ~360,000 long-lived objects; each full collection
        # meanwhile walked them all (200-600 ms, every thread stopped). None runs while loading;
        # after it what exists is frozen (left out of collections; a retired model left no cycles).
        gc.disable()
        try:
            loaded, kv = await loop.run_in_executor(self.worker, load_blocking, settings,
                                                       lambda m, p: self.from_worker(bar.report, m, p))
        except asyncio.CancelledError:
            raise
        except SdsatError as exc:
            self.set_state("error", str(exc))
            self.warn_user(str(exc), types.MessageType.Error)
            return
        except Exception as exc:  # a bug or an unexpected library error: say so, keep serving
            log.exception("loading the model failed")
            self.set_state("error", f"{type(exc).__name__}: {exc}")
            self.warn_user(f"loading the model failed: {type(exc).__name__}: {exc}", types.MessageType.Error)
            return
        finally:
            gc.freeze()
            gc.enable()
            bar.end()
        if self.settings is not settings and any(getattr(self.settings, k) != getattr(settings, k) for k in RELOAD_KEYS):
            return  # superseded by a newer configuration; its own load is under way
        self.loaded, self.kv = loaded, kv
        message = (f"{loaded.ref} ready: {loaded.quantize}, {loaded.dtype} on {loaded.device}, "
                   f"k={loaded.card.k}, loaded in {loaded.load_ms:.0f} ms")
        self.log_to_client(f"sdsat-lsp: {message}")
        self.set_state("ready", message)
        if kv is not None:  # None: a remote backend (backends/remote.py) decodes; no draft store, no compile
            self.start_draft_store()
            self.start_compile()

    def retire_model(self) -> None:
        """Drop the model and its caches. Freeing them takes most of a second on a busy CPU:
        the last references go on the worker (after the job under way), not on the event loop."""
        retired = [self.loaded, self.kv]
        self.loaded, self.kv = None, None
        try:
            self.worker.submit(retired.clear)
        except RuntimeError:  # shut down
            pass

    def start_compile(self) -> None:
        """Compile the forward pass beside the worker (compiled.py); the engine decodes eagerly until
        it is done, and again when the setting is turned off."""
        from .compiled import compile_beside

        loaded = self.loaded

        def done(info: dict, message: str | None) -> None:
            if self.loaded is loaded and self.settings.compile:
                self.compile_info = info
                if message:
                    self.log_to_client(f"sdsat-lsp: {message}")

        self.compile_info = compile_beside(loaded.model, self.settings.compile,
                                           lambda info, message: self.from_worker(done, info, message))

    def start_draft_store(self) -> None:
        self.drafts.start(self.settings.draft_store, self.loaded, self.log_to_client, self.warn_user)

    # -- completion -------------------------------------------------------------------------------

    async def complete(self, uri: str, position: types.Position) -> tuple[Outcome, types.Position, str, str] | None:
        """Run the pipeline for `uri` at `position`: (outcome, cursor position, the line's text
        before and after the cursor), or None when there is nothing to do (not ready, unknown
        document)."""
        if not self.settings.enabled or self.state != "ready":
            return None
        doc = self.workspace.text_documents.get(unquote(uri))
        if doc is None:
            log.info("completion for unknown document %s", uri)
            return None
        assert isinstance(doc, Document), "the workspace holds document.Document"
        state = self.docs.get(uri, self.kv)
        if len(doc) > session.MAX_COMPLETION_CHARS:
            if not state.too_big_logged:
                state.too_big_logged = True
                message = (f"{uri} has {len(doc):,} characters, more than the {session.MAX_COMPLETION_CHARS:,} "
                           "completions are made for: no completions there")
                log.info("%s", message)
                self.log_to_client(f"sdsat-lsp: {message}")
            return None
        text = doc.source
        offset = doc.offset_at_position(position)
        cursor, line_start, line_end = doc.position_at_offset(offset)
        self.activity.bump()
        job = Job(next(self.seq), self.protocol.msg_id, uri, text, offset, self.settings, state, activity=self.activity.count)
        if state.job is not None:
            state.job.cancel.set()  # cancel-previous: the newest request for a document wins
        state.job = job
        loop = asyncio.get_running_loop()
        remote = getattr(self.loaded, "run_remote", None)  # backends/remote.py: an endpoint decodes
        try:
            outcome = await (remote(self, job) if remote else loop.run_in_executor(self.worker, self.run_job, job))
        except asyncio.CancelledError:
            job.cancel.set()  # $/cancelRequest: stop decoding at the next forward pass
            raise
        finally:
            if state.job is job:
                state.job = None
        if outcome.stats.get("finishReason") == "error":
            # An answer, not silence: the client sees the failure; the next request starts afresh.
            raise JsonRpcInternalError(f"sdsat-lsp: completion failed: {outcome.stats.get('error')}")
        return outcome, cursor, text[line_start:offset], text[offset:line_end]

    def run_job(self, job: Job) -> Outcome:
        """On the worker thread: type through or decode, then prefetch (jobs.py). Never raises."""
        return jobs.run_job(self, job)

    def return_memory_soon(self) -> None:
        """`session.return_memory` on the worker (after the job under way), once however many
        documents close at a time."""
        if self.trim_pending:
            return
        self.trim_pending = True

        def run() -> None:
            self.trim_pending = False
            return_memory()

        try:
            self.worker.submit(run)
        except RuntimeError:  # shut down
            pass

    def stats_report(self, params: Any) -> dict:
        return stats_reply(self, params)

def _version() -> str:
    try:
        from importlib.metadata import version

        return version("sdsat-lsp")
    except Exception:
        return "0"


# ----------------------------------------------------------------------------------------------
# Handlers: get the document, call the pipeline, convert, return.


async def on_completion(ls: SdsatServer, params: types.CompletionParams) -> types.CompletionList:
    """The same completion as a popup item (registered by on_initialize, only for clients without
    inline completion)."""
    done = await ls.complete(params.text_document.uri, params.position)
    if done is None:
        return types.CompletionList(is_incomplete=True, items=[])
    outcome, cursor, before, rest = done
    word = re.search(r"\w*$", before).group(0)
    units = ls.workspace.position_codec.client_num_units
    return completion_items(outcome, cursor, rest, word, units,
                            accept_command(ls.suggestions, params.text_document.uri, outcome, units))


def on_accept(ls: SdsatServer, *arguments: Any) -> dict:
    """`sdsat.accept`: an item (or part of it) was accepted, as the client reports (acceptance.py)."""
    try:
        return ls.suggestions.accept(plain(list(arguments)))
    except ValueError as exc:
        raise JsonRpcInvalidParams(str(exc)) from None


def build_server(cli_settings: Settings | None = None) -> SdsatServer:
    server = SdsatServer(cli_settings)

    @server.feature(types.INITIALIZE)
    def on_initialize(ls: SdsatServer, params: types.InitializeParams) -> None:
        """Read initializationOptions; offer textDocument/completion to clients without inline completion."""
        ls.loop = asyncio.get_running_loop()
        ls.loop_watch = asyncio.ensure_future(ls.watch_loop())
        # pygls' documents break lines where LSP does not (form feeds, U+2028...): use ours.
        ls.protocol.use_workspace(DocumentWorkspace.like(ls.workspace, types.TextDocumentSyncKind.Incremental))
        ls.startup = {"initializeMs": round((time.perf_counter() - _IMPORTED) * 1e3, 1),
                      "torchImported": "torch" in sys.modules}
        if params.initialization_options is not None:
            ls.apply_settings(params.initialization_options, "initializationOptions")
        td = params.capabilities.text_document
        if td is None or td.inline_completion is None:
            ls.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions())(on_completion)

    @server.feature(types.INITIALIZED)
    async def on_initialized(ls: SdsatServer, params: types.InitializedParams) -> None:
        """Pull the "sdsat" settings when the client serves them, then import torch and load the
        model in the background (with those settings, so the model is not loaded twice)."""
        await ls.pull_configuration()
        ls.start_loading()

    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def on_inline_completion(ls: SdsatServer, params: types.InlineCompletionParams) -> types.InlineCompletionList:
        """Ghost text at the cursor."""
        done = await ls.complete(params.text_document.uri, params.position)
        if done is None:
            return types.InlineCompletionList(items=[])
        outcome, cursor, _, rest = done
        units = ls.workspace.position_codec.client_num_units
        return inline_items(outcome, cursor, rest, units, accept_command(ls.suggestions, params.text_document.uri, outcome, units))

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    async def on_configuration(ls: SdsatServer, params: types.DidChangeConfigurationParams) -> None:
        """Apply new settings; model settings reload the model. Clients of the pull model (VS Code's
        language client among them) send no settings here, only the news that they changed."""
        if params.settings is None and ls.supports_configuration_pull():
            await ls.pull_configuration()
        else:
            ls.apply_settings(params.settings, "workspace/didChangeConfiguration")

    @server.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def on_open(ls: SdsatServer, params: types.DidOpenTextDocumentParams) -> None:
        """pygls keeps the text; the KV cache fills on the first request."""

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def on_change(ls: SdsatServer, params: types.DidChangeTextDocumentParams) -> None:
        """pygls has applied the edits; the cache keeps its longest common prefix with the next prompt."""
        ls.activity.bump()  # a prefetch under way stops at its next pass

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def on_close(ls: SdsatServer, params: types.DidCloseTextDocumentParams) -> None:
        """Cancel the document's work and free its KV cache."""
        uri = params.text_document.uri
        ls.activity.bump()
        freed = ls.docs.close(uri, ls.kv)
        log.info("closed %s: freed %d bytes of KV cache", uri, freed)
        ls.return_memory_soon()

    @server.feature(STATS)
    def on_stats(ls: SdsatServer, params: Any = None) -> dict:
        """Per-request stats, the KV cache's contents, settings and state."""
        return ls.stats_report(params)

    server.command(ACCEPT_COMMAND)(on_accept)

    @server.feature(types.SHUTDOWN)
    def on_shutdown(ls: SdsatServer, params: Any = None) -> None:
        """Stop pending work."""
        ls.docs.cancel_all()
        ls.worker.shutdown(wait=False, cancel_futures=True)
        ls.drafts.shutdown()

    return server


def serve(args) -> int:
    """Run the server over stdio (default) or TCP (`--tcp HOST:PORT`)."""
    faults.apply_test_limits()
    server = build_server(from_command_line(args))
    if getattr(args, "verbose", 0) < 2:
        logging.getLogger("pygls").setLevel(logging.WARNING)  # it logs every message at INFO
    if getattr(args, "tcp", None):
        host, port = parse_address(args.tcp)
        token = getattr(args, "tcp_token", None) or os.environ.get("SDSAT_LSP_TCP_TOKEN") or new_token()
        serve_tcp(server, host, port, token)  # `exit` ends the process
        return 0
    server.start_io(LenientStdin(sys.stdin.buffer), sys.stdout.buffer)
    return _exit_now(server)


def _exit_now(server: SdsatServer) -> NoReturn:
    """After `exit` or the end of stdin (the client is gone): stop decoding and leave at once.
    Python would wait at exit for the worker thread, which may be importing torch or loading a
    model (seconds, not interruptible), and for pygls' stdin reader thread; nothing else needs to
    run. Exit code as the spec says: 1 for an `exit` without `shutdown` first."""
    server.docs.cancel_all()
    code = server.protocol.exit_code()
    log.info("exiting (code %d)", code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe: nothing to flush into
            pass
    os._exit(code)
