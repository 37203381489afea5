"""The language server: thin pygls 2 handlers around one completion pipeline.

    editor --LSP--> handlers (event loop) --Job--> inference worker (one thread)
        document text + cursor -> prompt (prompt.py) -> KV cache lease (kvcache.py)
        -> SDSAT decode (engine.py, cancellable between passes) -> completion rules -> item

- The event loop never waits on the model: each request becomes a `Job` run on a single worker
  thread (the model is used by one generation at a time). A newer request for a document cancels
  the older one (cancel-previous: Neovim never cancels superseded requests); `$/cancelRequest`
  cancels the awaiting handler, which sets the job's flag; the engine checks it before every pass.
- torch and transformers are imported, and the model loaded, on the worker after `initialized`
  (so `initialize` is answered at once), reported with `$/progress`, `window/logMessage` and the
  custom `sdsat/status` notification ({state: loading|ready|error, message}). Until the model is
  ready, completion requests get an empty result.
- Settings are a typed dataclass filled from `initializationOptions` and
  `workspace/didChangeConfiguration` (camelCase keys, optionally under "sdsat"); a value of the
  wrong type or out of range is reported with `window/showMessage` and replaced by its default.
- Positions are UTF-16 unless the client offers UTF-8/UTF-32 (pygls negotiates
  `general.positionEncodings`); offsets inside the server are code points.
- `sdsat/stats` answers per-request stats (prompt tokens, tokens reused, prefill/decode ms,
  drafts accepted), the KV cache's contents and the current settings.

This module and `document.py` (the document store) are the only ones that import lsprotocol/pygls.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import unquote

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInternalError, JsonRpcInvalidRequest
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol

from .decoding import DRAFT_LENGTHS, LOOKUP_NGRAM, TREE_NODES
from .decoding import MODES as DECODING_MODES
from .document import Document, DocumentWorkspace
from .errors import SdsatError
from .healing import heal, healed_decoder
from .kvcache import KVCacheStore
from .prompt import LINE_MODES, Completion, Rules, build_prompt, continuation_decoder

log = logging.getLogger(__name__)
_IMPORTED = time.perf_counter()

STATUS = "sdsat/status"
STATS = "sdsat/stats"
CONFIG_SECTION = "sdsat"  # the settings section pulled with workspace/configuration
CONFIG_PULL_TIMEOUT_S = 2.0
RELOAD_KEYS = ("model", "quantize", "device", "dtype", "threads")  # changing these reloads the model


# ----------------------------------------------------------------------------------------------
# Settings.


@dataclass
class Settings:
    """Server settings, camelCase on the wire (`maxTokens`), from initializationOptions and
    workspace/didChangeConfiguration (optionally nested under "sdsat")."""

    model: str = ""  # model folder or hub id; "" = the default model
    quantize: str = "auto"  # auto | none | nf4 | int8 | dynamic-int8 (see model.load_model)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    threads: int = 0  # torch CPU threads; 0 = torch's default
    k: int = 0  # adaptive tokens per draft block; 0 = the model card's
    mode: str = "fused"  # SDSAT decoding: fused | two-pass | ar (plain greedy)
    draft_length: str = "adaptive"  # adaptive | fixed (always k drafts; see engine.generate)
    lookup_ngram: int = LOOKUP_NGRAM  # draft from the context when the last n tokens occurred before; 0 = off
    draft_store: str = "auto"  # retrieve drafts from: auto (the model card's choice) | off | stdlib | a folder
    tree_nodes: int = TREE_NODES  # retrieved drafts verified per pass as a tree (greedy only); 0 = one continuation
    max_tokens: int = 64  # new tokens per completion
    time_budget_ms: int = 400  # past this, stop at the next newline; 0 = no budget
    line_mode: str = "auto"  # auto | single | multi
    fim: bool = True  # fill-in-the-middle (suffix first) when the model card has FIM ids
    token_healing: bool = True  # a prompt ending inside a token is continued from the token before (healing.py)
    max_prompt_tokens: int = 1024
    max_suffix_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = -1  # sampling seed; -1 = random
    kv_cache: bool = True  # per-document KV cache reuse (off: re-prefill every prompt)
    # The compiled forward (compiled.py), compiled in the background once the model is ready (eager
    # until then; cached on disk). The environment's SDSAT_LSP_COMPILE=0 changes this default.
    compile: bool = os.environ.get("SDSAT_LSP_COMPILE", "1") != "0"
    cache_budget_mb: int = 512  # KV cache memory across documents (LRU eviction)
    enabled: bool = True


_CHOICES = {"mode": DECODING_MODES, "line_mode": LINE_MODES, "draft_length": DRAFT_LENGTHS}
_RANGES = {
    "threads": (0, 1024), "k": (0, 64), "lookup_ngram": (0, 16), "tree_nodes": (0, 64), "max_tokens": (1, 4096), "time_budget_ms": (0, 600_000),
    "max_prompt_tokens": (16, 1 << 20), "max_suffix_tokens": (0, 1 << 16), "temperature": (0.0, 100.0),
    "top_k": (0, 1 << 20), "top_p": (1e-6, 1.0), "seed": (-1, 2**62), "cache_budget_mb": (0, 1 << 24),
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def parse_settings(raw: Any, base: Settings) -> tuple[Settings, list[str]]:
    """`base` updated with the values in `raw` (a dict, camelCase or snake_case keys, possibly under
    "sdsat"); every value that is unknown, of the wrong type or out of range is listed in the
    returned problems and replaced by its default."""
    problems: list[str] = []
    if raw is None:
        return base, problems
    if isinstance(raw, dict) and isinstance(raw.get("sdsat"), dict):
        raw = raw["sdsat"]
    if not isinstance(raw, dict):
        return base, [f"settings must be an object, got {type(raw).__name__}"]
    defaults = Settings()
    by_wire = {_camel(f.name): f.name for f in dataclasses.fields(Settings)}
    values = {}
    for key, value in raw.items():
        name = by_wire.get(key) or (key if key in by_wire.values() else None)
        if name is None:
            problems.append(f"unknown setting {key!r}")
            continue
        default = getattr(defaults, name)
        ok = _check_value(name, value, default)
        if ok is None:
            values[name] = float(value) if isinstance(default, float) else value
            if name == "model" and value is None:
                values[name] = ""
        else:
            problems.append(f"{_camel(name)}: {ok}; using {default!r}")
            values[name] = default
    return dataclasses.replace(base, **values), problems


def _check_value(name: str, value: Any, default: Any) -> str | None:
    """None when `value` fits the setting, else what is wrong with it."""
    if name == "model" and value is None:
        return None
    kind = type(default)
    if kind is bool:
        if not isinstance(value, bool):
            return f"expected true or false, got {value!r}"
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an integer, got {value!r}"
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return f"expected a number, got {value!r}"
    elif kind is str and not isinstance(value, str):
        return f"expected a string, got {value!r}"
    if name in _CHOICES and value not in _CHOICES[name]:
        return f"expected one of {', '.join(_CHOICES[name])}, got {value!r}"
    if name in _RANGES:
        lo, hi = _RANGES[name]
        if not lo <= value <= hi:
            return f"expected {lo}..{hi}, got {value!r}"
    return None


def settings_to_wire(settings: Settings) -> dict:
    return {_camel(k): v for k, v in dataclasses.asdict(settings).items()}


# ----------------------------------------------------------------------------------------------
# One completion request, as the worker sees it.


@dataclass
class Job:
    seq: int
    request_id: Any  # the JSON-RPC id, for logs
    uri: str
    text: str  # the document when the request came in
    offset: int  # the cursor, in code points
    settings: Settings
    created: float = field(default_factory=time.perf_counter)
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class Outcome:
    completion: Completion | None
    stats: dict


class _Protocol(LanguageServerProtocol):
    """pygls' protocol, but every request it would drop without a word gets a JSON-RPC error (the
    client would wait forever): params that do not fit the LSP types (InvalidParams); a message
    that is not an object, has no "jsonrpc" or another version (InvalidRequest); a request after
    `shutdown` (InvalidRequest, as the spec says)."""

    exit_requested = False

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

    def _refuse(self, msg_id, reason: str) -> None:
        log.warning("invalid request (id %r): %s", msg_id, reason)
        # An id of null must be written out, and pygls' response type would leave it out.
        self._send_data({"jsonrpc": self.VERSION, "id": msg_id,
                         "error": {"code": JsonRpcInvalidRequest.CODE, "message": f"Invalid Request: {reason}"}})


class SdsatServer(LanguageServer):
    """pygls server plus the model, the KV cache store and the worker."""

    def __init__(self, cli_settings: Settings | None = None):
        super().__init__("sdsat-lsp", _version(), text_document_sync_kind=types.TextDocumentSyncKind.Incremental,
                         protocol_cls=_Protocol)
        self.settings = cli_settings or Settings()
        self.state = "starting"  # starting | loading | ready | error
        self.state_message = ""
        self.loaded = None  # model.LoadedModel once ready
        self.store: KVCacheStore | None = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdsat-infer")
        self.store_builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdsat-draftstore")
        self.jobs: dict[str, Job] = {}  # the newest job per document
        self.window_heads: dict[str, str] = {}  # per document: where its prompt window starts
        self.recent: deque[dict] = deque(maxlen=256)
        self.seq = itertools.count(1)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.load_task: asyncio.Task | None = None
        self.startup: dict[str, Any] = {}  # when initialize was answered, whether torch was in yet
        self.draft_store = None  # draftstore.DraftStore once built for the loaded model
        self.draft_store_info: dict[str, Any] = {"state": "off"}
        self.draft_store_builds = itertools.count(1)
        self.draft_store_build = 0  # the build whose result is wanted; older ones are dropped
        self.compile_info: dict = {"state": "off"}

    # -- notifications to the client (always from the event loop thread) --------------------------

    def set_state(self, state: str, message: str) -> None:
        self.state, self.state_message = state, message
        log.info("status %s: %s", state, message)
        self.protocol.notify(STATUS, {"state": state, "message": message})

    def log_to_client(self, message: str, kind: types.MessageType = types.MessageType.Info) -> None:
        self.window_log_message(types.LogMessageParams(type=kind, message=message))

    def warn_user(self, message: str, kind: types.MessageType = types.MessageType.Warning) -> None:
        log.warning("%s", message)
        self.window_show_message(types.ShowMessageParams(type=kind, message=f"sdsat-lsp: {message}"))

    def from_worker(self, fn, *args) -> None:
        """Run `fn(*args)` on the event loop (pygls writes are not thread-safe)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(fn, *args)

    # -- settings ---------------------------------------------------------------------------------

    def apply_settings(self, raw: Any, source: str) -> None:
        new, problems = parse_settings(raw, self.settings)
        if problems:
            self.warn_user(f"invalid {source} settings ({'; '.join(problems)})")
        old, self.settings = self.settings, new
        if self.store is not None:
            self.store.set_budget(new.cache_budget_mb * 2**20)
            if new.kv_cache != self.store.enabled:
                self.store.enabled = new.kv_cache
                if not new.kv_cache:
                    self.store.clear()
        if self.state != "starting" and any(getattr(old, k) != getattr(new, k) for k in RELOAD_KEYS):
            self.start_loading()
        elif self.loaded is not None and old.draft_store != new.draft_store:
            self.start_draft_store()
        if self.state != "starting" and self.loaded is not None and old.compile != new.compile and not any(
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
            self.apply_settings(_plain(value), "workspace/configuration")

    def report_server_error(self, error: Exception, source) -> None:
        """A message body that is not JSON gets the JSON-RPC parse error (id null), as the spec asks,
        instead of silence; the connection goes on with the next message."""
        if isinstance(error, json.JSONDecodeError):
            log.warning("a message that is not JSON: %s", error)
            self.protocol._send_data({"jsonrpc": "2.0", "id": None,
                                      "error": {"code": -32700, "message": f"Parse error: {error}"}})
            return
        super().report_server_error(error, source)

    # -- model loading ----------------------------------------------------------------------------

    def start_loading(self) -> None:
        if self.load_task is not None and not self.load_task.done():
            self.load_task.cancel()  # the worker finishes that load, then loads again
        self.load_task = asyncio.ensure_future(self._load())

    async def _load(self) -> None:
        settings = self.settings
        what = settings.model or "the default model"
        self.loaded, self.store = None, None
        self.draft_store, self.draft_store_info, self.draft_store_build = None, {"state": "off"}, 0
        self.set_state("loading", f"loading {what}")
        self.log_to_client(f"sdsat-lsp: loading {what} (torch and transformers import first)")
        token = None
        caps = self.client_capabilities
        if caps.window is not None and caps.window.work_done_progress:
            token = f"sdsat-load-{uuid.uuid4().hex[:8]}"
            try:
                await self.work_done_progress.create_async(token)
                self.work_done_progress.begin(token, types.WorkDoneProgressBegin(
                    title="sdsat-lsp", message=f"loading {what}", percentage=0))
            except Exception:  # the client refused: no progress bar, the rest works
                log.info("client refused window/workDoneProgress/create", exc_info=True)
                token = None

        def report(message: str, percentage: int) -> None:
            if token is not None:
                self.work_done_progress.report(token, types.WorkDoneProgressReport(message=message, percentage=percentage))

        loop = asyncio.get_running_loop()
        try:
            loaded, store = await loop.run_in_executor(self.worker, load_blocking, settings,
                                                       lambda m, p: self.from_worker(report, m, p))
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
            if token is not None:
                self.work_done_progress.end(token, types.WorkDoneProgressEnd(message="done"))
        if self.settings is not settings and any(getattr(self.settings, k) != getattr(settings, k) for k in RELOAD_KEYS):
            return  # superseded by a newer configuration; its own load is under way
        self.loaded, self.store = loaded, store
        message = (f"{loaded.ref} ready: {loaded.quantize}, {loaded.dtype} on {loaded.device}, "
                   f"k={loaded.card.k}, loaded in {loaded.load_ms:.0f} ms")
        self.log_to_client(f"sdsat-lsp: {message}")
        self.set_state("ready", message)
        self.start_draft_store()
        self.start_compile()

    def start_compile(self) -> None:
        """Compile the forward pass beside the worker (compiled.py); the engine decodes eagerly until
        it is done, and again when the setting is turned off."""
        from .compiled import CompiledForward, attach, supported

        loaded = self.loaded
        attach(loaded.model, None)
        if not self.settings.compile:
            self.compile_info = {"state": "off"}
            return
        why = supported(loaded.model)
        if why is not None:
            self.compile_info = {"state": "unsupported", "message": why}
            return
        compiled = CompiledForward.for_device(loaded.model)
        self.compile_info = {"state": "compiling"}
        attach(loaded.model, compiled)  # not ready yet: the engine passes it by

        def done(error: str | None) -> None:
            if self.loaded is not loaded or not self.settings.compile:
                return
            if error is None:
                self.compile_info = {"state": "ready", "seconds": round(compiled.compile_s, 1)}
                self.log_to_client(f"sdsat-lsp: compiled forward ready ({compiled.compile_s:.1f} s)")
            else:
                attach(loaded.model, None)
                self.compile_info = {"state": "error", "message": error}
                self.log_to_client(f"sdsat-lsp: compiled forward unavailable, staying eager: {error}")

        compiled.start_background(lambda error: self.from_worker(done, error))

    def start_draft_store(self) -> None:
        """Open the draft store the settings (or the model card) ask for, beside the worker: the
        first build tokenizes its corpus (the standard library: about half a minute, then cached),
        and completions go on without retrieval drafts meanwhile."""
        from .draftstore import open_store, store_choice

        loaded = self.loaded
        choice = store_choice(self.settings.draft_store, loaded.card)
        build = self.draft_store_build = next(self.draft_store_builds)
        self.draft_store = None
        if choice is None or not loaded.card.adaptive_ids:  # a model without SDSAT decodes plainly
            self.draft_store_info = {"state": "off"}
            return
        self.draft_store_info = {"state": "building", "source": choice}
        # A copy: one fast tokenizer used from two threads at once can fail ("Already borrowed").
        tokenizer = copy.deepcopy(loaded.tokenizer)
        vocab = loaded.model.get_input_embeddings().weight.shape[0]

        def done(future: Future) -> None:
            if build != self.draft_store_build:
                return  # superseded by a newer setting or model
            try:
                store = future.result()
            except SdsatError as exc:
                self.draft_store_info = {"state": "error", "source": choice, "message": str(exc)}
                self.warn_user(str(exc))
                return
            except Exception as exc:  # a bug: completions still work without the store
                log.exception("building the draft store failed")
                self.draft_store_info = {"state": "error", "source": choice, "message": f"{type(exc).__name__}: {exc}"}
                self.warn_user(f"building the draft store failed: {type(exc).__name__}: {exc}")
                return
            self.draft_store = store
            self.draft_store_info = {"state": "ready", "source": store.source, "tokens": len(store)}
            self.log_to_client(f"sdsat-lsp: draft store {store.source} ready ({len(store)} tokens)")

        future = self.store_builder.submit(open_store, choice, tokenizer, vocab,
                                           lambda message: self.from_worker(self.log_to_client, f"sdsat-lsp: {message}"),
                                           loaded.folder)
        future.add_done_callback(lambda f: self.from_worker(done, f))

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
        text = doc.source
        offset = doc.offset_at_position(position)
        cursor, line_start, line_end = doc.position_at_offset(offset)
        job = Job(next(self.seq), self.protocol.msg_id, uri, _model_text(text), offset, self.settings)
        previous = self.jobs.get(uri)
        if previous is not None:
            previous.cancel.set()  # cancel-previous: the newest request for a document wins
        self.jobs[uri] = job
        loop = asyncio.get_running_loop()
        try:
            outcome = await loop.run_in_executor(self.worker, self.run_job, job)
        except asyncio.CancelledError:
            job.cancel.set()  # $/cancelRequest: stop decoding at the next forward pass
            raise
        finally:
            if self.jobs.get(uri) is job:
                del self.jobs[uri]
        if outcome.stats.get("finishReason") == "error":
            # An answer, not silence: the client sees the failure; the next request starts afresh.
            raise JsonRpcInternalError(f"sdsat-lsp: completion failed: {outcome.stats.get('error')}")
        return outcome, cursor, text[line_start:offset], text[offset:line_end]

    def run_job(self, job: Job) -> Outcome:
        """On the worker thread: prompt, cache lease, decode, rules. Never raises."""
        stats: dict[str, Any] = {"seq": job.seq, "requestId": job.request_id, "uri": job.uri,
                                 "queueMs": round((time.perf_counter() - job.created) * 1e3, 2)}
        try:
            completion = self._run_job(job, stats)
        except Exception as exc:
            log.exception("[req %s] completion failed", job.request_id)
            stats.update(finishReason="error", error=f"{type(exc).__name__}: {exc}")
            completion = None
        stats["totalMs"] = round((time.perf_counter() - job.created) * 1e3, 2)
        stats["items"] = int(completion is not None)
        self.recent.append(stats)
        log.info("[req %s] %s", job.request_id, " ".join(f"{k}={v}" for k, v in stats.items() if k not in ("uri", "requestId")))
        return Outcome(completion, stats)

    def _run_job(self, job: Job, stats: dict) -> Completion | None:
        from .engine import Sampling, generate

        loaded, store, s = self.loaded, self.store, job.settings
        if job.cancel.is_set() or loaded is None or store is None:
            stats["finishReason"] = "cancelled" if job.cancel.is_set() else "not-ready"
            return None
        model, tokenizer, card = loaded.model, loaded.tokenizer, loaded.card
        prompt, k, mode = request_prompt(loaded, s, job.text, job.offset, keep=self.window_heads.get(job.uri))
        self.window_heads[job.uri] = prompt.window_head
        rules = Rules(prompt.context)
        healing = heal(tokenizer, prompt.ids) if s.token_healing else None
        ids = healing.ids if healing is not None else prompt.ids
        decode = healed_decoder(continuation_decoder(tokenizer, ids), healing)
        sampling = Sampling(s.temperature, s.top_k, s.top_p, None if s.seed < 0 else s.seed)
        lease = store.acquire(job.uri, ids)
        try:
            gen = generate(
                model, ids, mode=mode, k=k, adaptive_ids=card.adaptive_ids, max_new_tokens=s.max_tokens,
                decode=decode, should_stop=lambda tokens: rules.should_stop(decode(tokens)), sampling=sampling,
                cache=lease.cache, cancel=job.cancel.is_set,
                deadline=job.created + s.time_budget_ms / 1e3 if s.time_budget_ms else None,
                first_token_ids=healing.first_token_ids if healing is not None else None,
                draft_length=s.draft_length, lookup_ngram=s.lookup_ngram, draft_store=self.draft_store,
                tree_nodes=s.tree_nodes,
            )
        except BaseException:
            store.discard(lease)  # its state is unknown
            raise
        store.release(lease, gen.cache_ids)
        st = gen.stats
        stats.update(
            promptTokens=len(ids), healed=healing is not None, reusedTokens=st.reused_tokens, prefillTokens=st.prefill_tokens,
            cachedBefore=lease.cached_before, prefillMs=round(st.prefill_ms, 2),
            decodeMs=round(st.wall_ms - st.prefill_ms, 2), newTokens=st.new_tokens, forwardPasses=st.forward_passes,
            draftsAccepted=st.drafts_accepted, draftsVerified=st.drafts_verified, lookupAccepted=st.lookup_accepted,
            storeAccepted=st.store_accepted, storePasses=st.store_passes,
            finishReason=gen.finish_reason,
            multiline=prompt.context.multiline, fim=prompt.fim, windowStart=prompt.prefix_start, mode=mode, k=k,
        )
        if gen.finish_reason == "cancelled":
            return None
        return rules.finish(decode(gen.tokens))

    def stats_report(self, params: Any) -> dict:
        last = 50
        uri = None
        if params is not None:
            data = _plain(params)
            if isinstance(data, dict):
                last = data.get("last", last) if isinstance(data.get("last"), int) else last
                uri = data.get("uri") if isinstance(data.get("uri"), str) else None
        requests = [r for r in self.recent if uri is None or r["uri"] == uri][-max(0, last):] if last else []
        cache = self.store.summary() if self.store is not None else {"documents": 0, "bytes": 0, "per_document": {}}
        per_doc = cache.pop("per_document", {})
        cache["perDocument"] = [{"uri": u, **v} for u, v in per_doc.items()]
        cache = {_camel(k): v for k, v in cache.items()}
        model = None
        if self.loaded is not None:
            lm = self.loaded
            model = {"ref": lm.ref, "device": lm.device, "quantize": lm.quantize, "dtype": lm.dtype,
                     "k": lm.card.k, "fim": bool(lm.card.fim), "loadMs": round(lm.load_ms, 1)}
        return {"state": self.state, "message": self.state_message, "model": model, "cache": cache,
                "draftStore": self.draft_store_info, "compiled": self.compile_info,
                "settings": settings_to_wire(self.settings), "requests": requests, "startup": self.startup,
                "positionEncoding": str(self.workspace.position_encoding) if self.protocol._workspace else None}


def request_prompt(loaded, s: Settings, text: str, offset: int, keep: str | None = None):
    """(prompt, k, decoding mode) for a completion at `offset` in `text`: the one place that turns
    settings and the model card into a prompt (the stress tool's reference decodes the same)."""
    from .engine import context_length

    model, card = loaded.model, loaded.card
    k = s.k or card.k
    mode = s.mode if card.adaptive_ids else "ar"
    ctx = min(card.context_length or context_length(model), context_length(model))
    budget = max(16, min(s.max_prompt_tokens, ctx - s.max_tokens - 2 * (k + 1) - 8))
    prompt = build_prompt(text, offset, loaded.tokenizer, max_tokens=budget, max_suffix_tokens=s.max_suffix_tokens,
                          fim_ids=card.fim if s.fim else None, line_mode=s.line_mode, keep=keep)
    return prompt, k, mode


def load_blocking(settings: Settings, report) -> tuple[Any, KVCacheStore]:
    """On the worker: import torch/transformers, load the model, build its cache store, warm up."""
    report("importing torch", 5)
    if os.environ.get("SDSAT_LSP_TEST_LOAD_DELAY_S"):  # tests that must meet a server still loading
        time.sleep(float(os.environ["SDSAT_LSP_TEST_LOAD_DELAY_S"]))
    started = time.perf_counter()
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    from .embedded import resolve_model
    from .growable_cache import GrowableCache

    log.info("torch and transformers imported in %.1f s", time.perf_counter() - started)
    report("loading weights", 50)
    loaded = resolve_model(settings.model or None, quantize=settings.quantize, device=settings.device,
                           dtype=settings.dtype)
    model = loaded.model
    store = KVCacheStore(lambda: GrowableCache(config=model.config), settings.cache_budget_mb * 2**20,
                         enabled=settings.kv_cache)
    report("warming up", 90)
    from .engine import generate

    ids = loaded.tokenizer("def f(x):\n    return", add_special_tokens=False)["input_ids"] or [0]
    from .healing import token_texts

    token_texts(loaded.tokenizer)  # the vocabulary's texts, for token healing (once, not on the first request)
    generate(model, ids, mode="ar", max_new_tokens=2)  # the first pass of a process is slow
    if os.environ.get("SDSAT_LSP_TEST_FAIL_PASS"):
        _fail_at_pass(model, int(os.environ["SDSAT_LSP_TEST_FAIL_PASS"]))
    return loaded, store


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _model_text(text: str) -> str:
    """The document as the tokenizer can take it: JSON can carry lone surrogates ("\\ud800"), which
    no tokenizer encodes; each becomes U+FFFD, so offsets stay the same."""
    return _LONE_SURROGATE.sub("\ufffd", text) if _LONE_SURROGATE.search(text) else text


def _fail_at_pass(model, n: int) -> None:
    """Test-only (SDSAT_LSP_TEST_FAIL_PASS=n): the n-th forward pass after loading raises, once, so
    that tests can see a model failing in the middle of a decode."""
    calls = 0

    def hook(module, args):
        nonlocal calls
        calls += 1
        if calls == n:
            handle.remove()
            raise RuntimeError(f"injected fault at forward pass {n} (SDSAT_LSP_TEST_FAIL_PASS)")

    # On the decoder: the engine runs it directly when it applies the output head itself.
    handle = getattr(model, "model", model).register_forward_pre_hook(hook)


def _plain(value: Any) -> Any:
    """pygls hands custom-method params over as namedtuples: back to dicts and lists."""
    if hasattr(value, "_asdict"):
        return {k: _plain(v) for k, v in value._asdict().items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("sdsat-lsp")
    except Exception:
        return "0"


# ----------------------------------------------------------------------------------------------
# Conversions to LSP types (pure).


def inline_items(outcome: Outcome | None, cursor: types.Position, rest: str, encoding_units) -> types.InlineCompletionList:
    if outcome is None or outcome.completion is None:
        return types.InlineCompletionList(items=[])
    c = outcome.completion
    end = types.Position(line=cursor.line, character=cursor.character + encoding_units(rest[: c.replace_chars]))
    return types.InlineCompletionList(items=[
        types.InlineCompletionItem(insert_text=c.text, range=types.Range(start=cursor, end=end))
    ])


def completion_items(outcome: Outcome | None, cursor: types.Position, rest: str, word: str,
                     encoding_units) -> types.CompletionList:
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
    )])


# ----------------------------------------------------------------------------------------------
# Handlers: get the document, call the pipeline, convert, return.


def build_server(cli_settings: Settings | None = None) -> SdsatServer:
    server = SdsatServer(cli_settings)

    @server.feature(types.INITIALIZE)
    def on_initialize(ls: SdsatServer, params: types.InitializeParams) -> None:
        """Read initializationOptions; offer textDocument/completion to clients without inline completion."""
        ls.loop = asyncio.get_running_loop()
        # pygls' documents break lines where LSP does not (form feeds, U+2028...): use ours.
        ls.protocol._workspace = DocumentWorkspace.like(ls.workspace, types.TextDocumentSyncKind.Incremental)
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
        return inline_items(outcome, cursor, rest, ls.workspace.position_codec.client_num_units)

    async def on_completion(ls: SdsatServer, params: types.CompletionParams) -> types.CompletionList:
        """The same completion as a popup item (registered only for clients without inline completion)."""
        done = await ls.complete(params.text_document.uri, params.position)
        if done is None:
            return types.CompletionList(is_incomplete=True, items=[])
        outcome, cursor, before, rest = done
        word = re.search(r"\w*$", before).group(0)
        return completion_items(outcome, cursor, rest, word, ls.workspace.position_codec.client_num_units)

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

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def on_close(ls: SdsatServer, params: types.DidCloseTextDocumentParams) -> None:
        """Cancel the document's work and free its KV cache."""
        uri = params.text_document.uri
        job = ls.jobs.pop(uri, None)
        if job is not None:
            job.cancel.set()
        ls.window_heads.pop(uri, None)
        if ls.store is not None:
            freed = ls.store.drop(uri)
            log.info("closed %s: freed %d bytes of KV cache", uri, freed)

    @server.feature(STATS)
    def on_stats(ls: SdsatServer, params: Any = None) -> dict:
        """Per-request stats, the KV cache's contents, settings and state."""
        return ls.stats_report(params)

    @server.feature(types.SHUTDOWN)
    def on_shutdown(ls: SdsatServer, params: Any = None) -> None:
        """Stop pending work."""
        for job in list(ls.jobs.values()):
            job.cancel.set()
        ls.worker.shutdown(wait=False, cancel_futures=True)
        ls.store_builder.shutdown(wait=False, cancel_futures=True)

    return server


_CONTENT_LENGTH = re.compile(rb"content-length[ \t]*:[ \t]*(\d+)", re.IGNORECASE)
MAX_MESSAGE_BYTES = 256 * 2**20  # 50x a 5 MB document; a bigger Content-Length is a broken header


class _LenientStdin:
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


def serve(args) -> int:
    """Run the server over stdio (default) or TCP (`--tcp HOST:PORT`)."""
    cli = Settings()
    for name in ("model", "quantize", "device", "dtype"):
        value = getattr(args, name, None)
        if value:
            cli = dataclasses.replace(cli, **{name: value})
    server = build_server(cli)
    if getattr(args, "verbose", 0) < 2:
        logging.getLogger("pygls").setLevel(logging.WARNING)  # it logs every message at INFO
    if getattr(args, "tcp", None):
        host, _, port = args.tcp.rpartition(":")
        if not port.isdigit():
            raise SdsatError(f"--tcp wants HOST:PORT, got {args.tcp!r}")
        server.start_tcp(host or "127.0.0.1", int(port))  # `exit` ends the process from inside
        return 0
    server.start_io(_LenientStdin(sys.stdin.buffer), sys.stdout.buffer)
    return _exit_now(server)


def _exit_now(server: SdsatServer) -> NoReturn:
    """After `exit` or the end of stdin (the client is gone): stop decoding and leave at once.
    Python would wait at exit for the worker thread, which may be importing torch or loading a
    model (seconds, not interruptible), and for pygls' stdin reader thread; nothing else needs to
    run. Exit code as the spec says: 1 for an `exit` without `shutdown` first."""
    for job in list(server.jobs.values()):
        job.cancel.set()
    protocol = server.protocol
    code = 1 if protocol.exit_requested and not protocol._shutdown else 0
    log.info("exiting (code %d)", code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe: nothing to flush into
            pass
    os._exit(code)
