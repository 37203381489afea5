"""The server's state for one open document, in one object per URI: its newest completion job and
where its prompt window starts. (Its KV cache entry lives in the kvcache.KVCacheStore, under the
same URI, because the memory budget is shared across documents; `Documents.close` frees it too.)

Limits on what documents make the server hold, beside the KV cache's own byte budget:
- `MAX_DOCUMENTS` documents keep state (and a KV cache entry); past that, the least recently used
  one forgets its own (its text stays in the workspace: the client may still edit it, and LSP has
  no way to refuse a didOpen), so 10,000 open files cost what 1,000 do beyond their text.
- `MAX_COMPLETION_CHARS`: a bigger document is answered with no completion (and one log line).
- `return_memory`: after documents close, the freed memory goes back to the system.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .prompt import Completion
from .settings import Settings


log = logging.getLogger(__name__)

# Documents whose state (newest job, prompt window, KV cache entry) is kept: editors open hundreds of
# files in a large project, rarely more at once, and each kept state can pin a KV cache entry (the
# byte budget bounds those, not their number).
MAX_DOCUMENTS = 1000
# Documents longer than this many characters get no completion: the text is joined for the worker
# on the event loop (7-45 ms at this size, as measured on a 2-core VM: ASCII and 4-byte text) and
# scanned once there; the largest real source files (SQLite's amalgamation: 9 MB) still fit.
MAX_COMPLETION_CHARS = 10_000_000


@dataclass
class DocumentState:
    job: Job | None = None  # the newest job; a newer request cancels it
    window_head: str | None = None  # where the last prompt window started (prompt.build_prompt's `keep`)
    closed: bool = False  # closed or forgotten: a job still running for it must not leave a KV entry behind
    too_big_logged: bool = False  # the "too big for completion" line was logged for this document
    continuation: Any = None  # typethrough.Continuation: the last decode, set on the worker


@dataclass
class Job:
    """One completion request, as the worker sees it."""

    seq: int
    request_id: Any  # the JSON-RPC id, for logs
    uri: str
    text: str  # the document when the request came in
    offset: int  # the cursor, in code points
    settings: Settings
    doc: DocumentState = field(default_factory=DocumentState)
    created: float = field(default_factory=time.perf_counter)
    cancel: threading.Event = field(default_factory=threading.Event)
    # The server's count of requests, edits and settings changes when this one came: the prefetch
    # after it stops once that count moves (jobs.prefetch_soon).
    activity: int = 0


@dataclass
class Outcome:
    completion: Completion | None
    stats: dict


class Documents:
    """DocumentState per URI, least recently used first (touched on the event loop only)."""

    def __init__(self):
        self._states: OrderedDict[str, DocumentState] = OrderedDict()
        self.forgotten = 0  # states dropped past MAX_DOCUMENTS

    def __len__(self) -> int:
        return len(self._states)

    def get(self, uri: str, kv=None) -> DocumentState:
        """`uri`'s state, now the most recently used; past MAX_DOCUMENTS, the least recently used
        idle documents forget theirs (and their KV cache entries in `kv`)."""
        state = self._states.get(uri)
        if state is None:
            state = self._states[uri] = DocumentState()
        self._states.move_to_end(uri)
        if len(self._states) > MAX_DOCUMENTS:
            for old in [u for u, st in self._states.items() if st.job is None][:len(self._states) - MAX_DOCUMENTS]:
                self.close(old, kv)
                self.forgotten += 1
                log.info("more than %d documents in use: forgot the state and KV cache of %s (least recently used)",
                         MAX_DOCUMENTS, old)
        return state

    def close(self, uri: str, kv=None) -> int:
        """Cancel the document's job, forget its state and free its KV cache; the bytes freed."""
        state = self._states.pop(uri, None)
        if state is not None:
            state.closed = True
            if state.job is not None:
                state.job.cancel.set()
        return kv.drop(uri) if kv is not None else 0

    def cancel_all(self) -> None:
        for state in list(self._states.values()):
            if state.job is not None:
                state.job.cancel.set()


def return_memory() -> None:
    """Hand freed memory back to the system: glibc keeps freed blocks below its mmap threshold (which
    grows to 32 MB after big frees) in its arenas, so the KV caches of closed documents stayed in the
    process's RSS; CUDA's caching allocator keeps its blocks until asked. Best effort, no-op elsewhere."""
    import ctypes
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def log_slow_collections() -> None:
    """A full garbage collection stops every thread of the process, the event loop included:
    log the slow ones, so that a stall with no slow handler behind it can be told apart."""
    import gc

    if _time_collection not in gc.callbacks:
        gc.callbacks.append(_time_collection)


_collection_started = [0.0]


def _time_collection(phase: str, info: dict) -> None:
    if phase == "start":
        _collection_started[0] = time.perf_counter()
    elif (took_ms := (time.perf_counter() - _collection_started[0]) * 1e3) > 50:
        log.warning("garbage collection (generation %d) took %.0f ms, collected %d", info["generation"],
                    took_ms, info["collected"])
