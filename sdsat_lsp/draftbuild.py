"""The server's draft store, built beside the inference worker: the first build of a store
tokenizes its corpus (the standard library: about half a minute, then cached on disk), and
completions go on without retrieval drafts meanwhile. A newer setting (`off` included) or model
supersedes a build under way: it is cancelled (it stops between files, its result never stored)."""

from __future__ import annotations

import copy
import itertools
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from .errors import SdsatError

log = logging.getLogger(__name__)


class DraftStoreBuilder:
    """`store` (a draftstore.DraftStore, or None) and `info` (its state for `sdsat/stats`) are read
    and written on the event loop only; `post(fn, *args)` runs `fn` there from another thread."""

    def __init__(self, post: Callable[..., None]):
        self.post = post
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdsat-draftstore")
        self.store = None
        self.info: dict[str, Any] = {"state": "off"}
        self._builds = itertools.count(1)
        self._wanted = 0  # the build whose result is wanted; older ones are dropped
        self._cancel = threading.Event()  # set: the build under way stops
        self.cancelled = 0  # builds cancelled, for tests and stats

    def _cancel_build(self) -> None:
        self._cancel.set()
        self._cancel = threading.Event()

    def reset(self) -> None:
        self._cancel_build()
        self.store, self.info, self._wanted = None, {"state": "off"}, 0

    def start(self, setting: str, loaded, log_to_client: Callable[[str], None], warn_user: Callable[[str], None]) -> None:
        """Open the store `setting` (the `draftStore` setting) asks for with `loaded`'s tokenizer."""
        from .corpus import Cancelled
        from .draftstore import open_store, store_choice

        self._cancel_build()
        cancel = self._cancel
        choice = store_choice(setting, loaded.card)
        build = self._wanted = next(self._builds)
        self.store = None
        if choice is None or not loaded.card.adaptive_ids:  # a model without SDSAT decodes plainly
            self.info = {"state": "off"}
            return
        self.info = {"state": "building", "source": choice}
        # A copy: one fast tokenizer used from two threads at once can fail ("Already borrowed").
        tokenizer = copy.deepcopy(loaded.tokenizer)
        vocab = loaded.model.get_input_embeddings().weight.shape[0]

        def done(future: Future) -> None:
            try:
                store = future.result()
            except Cancelled:
                self.cancelled += 1
                log_to_client(f"sdsat-lsp: draft store {choice} cancelled (the setting or the model changed)")
                return
            except SdsatError as exc:
                if build == self._wanted:
                    self.info = {"state": "error", "source": choice, "message": str(exc)}
                    warn_user(str(exc))
                return
            except Exception as exc:  # a bug: completions still work without the store
                if build == self._wanted:
                    log.exception("building the draft store failed")
                    self.info = {"state": "error", "source": choice, "message": f"{type(exc).__name__}: {exc}"}
                    warn_user(f"building the draft store failed: {type(exc).__name__}: {exc}")
                return
            if build != self._wanted:
                return  # superseded by a newer setting or model
            self.store = store
            self.info = {"state": "ready", "source": store.source, "tokens": len(store)}
            log_to_client(f"sdsat-lsp: draft store {store.source} ready ({len(store)} tokens)")

        future = self.executor.submit(open_store, choice, tokenizer, vocab,
                                      lambda message: self.post(log_to_client, f"sdsat-lsp: {message}"), loaded.folder,
                                      cancel.is_set)
        future.add_done_callback(lambda f: self.post(done, f))

    def shutdown(self) -> None:
        self._cancel_build()
        self.executor.shutdown(wait=False, cancel_futures=True)
