"""The server's state for one open document, in one object per URI: its newest completion job and
where its prompt window starts. (Its KV cache entry lives in the kvcache.KVCacheStore, under the
same URI, because the memory budget is shared across documents; `Documents.close` frees it too.)"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .prompt import Completion
from .settings import Settings


@dataclass
class DocumentState:
    job: Job | None = None  # the newest job; a newer request cancels it
    window_head: str | None = None  # where the last prompt window started (prompt.build_prompt's `keep`)


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


@dataclass
class Outcome:
    completion: Completion | None
    stats: dict


class Documents:
    """DocumentState per URI (touched on the event loop only)."""

    def __init__(self):
        self._states: dict[str, DocumentState] = {}

    def get(self, uri: str) -> DocumentState:
        return self._states.setdefault(uri, DocumentState())

    def close(self, uri: str, kv=None) -> int:
        """Cancel the document's job, forget its state and free its KV cache; the bytes freed."""
        state = self._states.pop(uri, None)
        if state is not None and state.job is not None:
            state.job.cancel.set()
        return kv.drop(uri) if kv is not None else 0

    def cancel_all(self) -> None:
        for state in list(self._states.values()):
            if state.job is not None:
                state.job.cancel.set()
