"""Prefetch while idle: after a completion is answered, the worker goes on decoding its
continuation (to the end of the next line, at most `prefetchTokens` tokens and PREFETCH_MS) into
the document's KV cache, and the document's typethrough.Continuation grows by those tokens. So a
user who accepts a suggestion (or types it) and asks again at the next line finds the next one
ready: typethrough.py answers it with no pass.

Any new request or edit preempts it: `preempted()` is asked before every pass (the engine's cancel
check), so a request waits at most one pass behind it. The tokens decoded until then are kept.

Exact as the rest of the continuation is: greedy decoding after the prompt plus the tokens already
generated (only the first token after a prompt is constrained, by healing), and typethrough.py
decides where a later request would stop with its own rules.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .prompt import continuation_decoder
from .settings import Settings
from .typethrough import Continuation

log = logging.getLogger(__name__)

# The longest one prefetch keeps the worker busy when nothing preempts it: a line of a few dozen
# tokens at 10-30 ms a pass (the embedded model on 2 cores), and a bound on the CPU an idle editor burns.
PREFETCH_MS = 400
# Lines with something on them the prefetch completes past the continuation's own end (the line it
# ends on counts): the next suggestion of a single-line completion is the next line.
PREFETCH_LINES = 1
# A prefetch starts only after this long with no request or edit: an editor typing sends the next
# keystroke's edit a few ms after an answer, and a prefetch pass begun then delays that request by
# a pass. Measured, `bench --editor-session` (bisect.py, embedded model, eager, one run each on 2
# cores shared with other work, load 4-5), which sends the next edit at once: a prefetch starting
# at once gave p50 67.5 / p95 601 ms, none 57.3 / 312 ms (typed through: 57 and 55 of 292).
PREFETCH_IDLE_MS = 50


def wanted(s: Settings, record: Continuation | None, loaded, kv, uri: str) -> bool:
    """Whether a prefetch after `record` can help: prefetch on, greedy, a continuation whose next
    token is unknown and that was not prefetched yet (or whose prefetch was preempted: it goes on),
    room in the model's context, and the document's KV cache holding the continuation (else the
    first pass would be a prefill of the prompt, which cannot be preempted)."""
    from .engine import context_length

    if s.prefetch_tokens <= 0 or s.temperature > 0 or record is None or record.loaded is not loaded:
        return False
    if record.finish_reason == "eos" or (record.prefetched and record.finish_reason != "cancelled"):
        return False
    ids = record.prompt_ids + record.tokens
    room = context_length(loaded.model) - len(ids) - s.prefetch_tokens - 2 * (s.k or loaded.card.k) - 2
    if record.prefetched >= s.prefetch_tokens or room < 0 or getattr(loaded.model.config, "sliding_window", None):
        return False
    if kv is None or not kv.enabled:
        return False
    # A decode leaves its last token out of the cache (its KV is computed by the next pass).
    cached = kv.cached_ids(uri)
    return len(ids) - 1 <= len(cached) <= len(ids) and ids[:len(cached)] == cached


def prefetch(loaded, s: Settings, kv, uri: str, record: Continuation, preempted: Callable[[], bool]) -> dict:
    """Decode after `record` into `uri`'s cache and extend `record`; the figures of the run."""
    from .engine import generate

    card = loaded.card
    ids = record.prompt_ids + record.tokens
    tail = continuation_decoder(loaded.tokenizer, record.prompt_ids)(record.tokens).rsplit("\n", 1)[-1]
    decode = continuation_decoder(loaded.tokenizer, ids)

    def line_done(tokens: list[int]) -> bool:
        # Newlines that end lines with something on them (the line the continuation was on, or later).
        return sum(1 for line in (tail + decode(tokens)).split("\n")[:-1] if line.strip()) >= PREFETCH_LINES

    lease = kv.acquire(uri, ids)
    try:
        # The request's decoding mode (greedy either way: the same tokens, in fewer passes).
        gen = generate(loaded.model, ids, mode=s.mode if card.adaptive_ids else "ar", k=s.k or card.k,
                       adaptive_ids=card.adaptive_ids, draft_length=s.draft_length, lookup_ngram=s.lookup_ngram,
                       max_new_tokens=s.prefetch_tokens - record.prefetched, should_stop=line_done, decode=decode,
                       cache=lease.cache, cancel=preempted, hard_deadline=time.perf_counter() + PREFETCH_MS / 1e3)
    except Exception:
        kv.discard(lease)  # its state is unknown; the next request prefills again
        log.exception("prefetch for %s failed", uri)
        return {"tokens": 0, "passes": 0, "preempted": False, "finishReason": "error"}
    kv.release(lease, gen.cache_ids)
    record.extend(gen.tokens, gen.finish_reason)
    return {"tokens": len(gen.tokens), "passes": gen.stats.forward_passes,
            "preempted": gen.finish_reason == "cancelled", "finishReason": gen.finish_reason}


class Activity:
    """Requests, edits, closes and settings changes so far (bumped on the event loop): a prefetch
    queued after a request runs only while the count is the one that request saw."""

    def __init__(self):
        self.count = 0
        self._moved = threading.Event()

    def bump(self) -> None:
        self.count += 1
        self._moved.set()

    def idle_since(self, count: int, seconds: float) -> bool:
        """Wait up to `seconds` for the count to move from `count` (on the worker); True when it
        has not: the editor is idle."""
        self._moved.clear()
        if self.count != count:
            return False
        self._moved.wait(seconds)  # a bump after the check above sets it: no wake-up is lost
        return self.count == count


class PrefetchStats:
    """Totals over the prefetch runs, for `sdsat/stats` under `prefetch` (written on the worker)."""

    def __init__(self):
        self.runs = self.tokens = self.passes = self.preempted = 0
        self.pending = 0  # queued or under way
        self.ms = 0.0

    def add(self, run: dict, ms: float) -> None:
        self.runs += 1
        self.tokens += run["tokens"]
        self.passes += run["passes"]
        self.preempted += int(run["preempted"])
        self.ms += ms

    def wire(self) -> dict:
        return {"runs": self.runs, "tokens": self.tokens, "passes": self.passes, "preempted": self.preempted,
                "ms": round(self.ms, 1), "pending": self.pending}
