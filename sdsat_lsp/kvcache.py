"""Per-document KV caches: what makes a completion after a keystroke cost a few tokens of prefill
instead of the whole prompt.

For each document (any hashable key; the server uses the URI) the store keeps the token ids whose
keys/values a transformers `DynamicCache` holds. On a request the prompt is compared with those ids;
the longest common prefix is kept (the cache is cropped to it) and only the rest is prefilled by the
engine. The KV of `ids[:n]` depends on nothing but `ids[:n]` (positions start at 0), so the common
prefix of token ids is exactly what can be reused: an edit invalidates the cache from the first token
it changes, and nothing before it.

After generation the cache keeps the generated continuation too: a user who accepts a suggestion
sends a prompt that extends the old prompt by those tokens, which is then a cache hit.

Optionally (`acquire`'s `shift`, kvshift.py) the cached KV of text after an edit is kept too, its
positions shifted: an approximation, since that KV was computed before the edit (kvshift.py says
exactly what is and is not exact). The lease then counts the shifted tokens and the tokens the shift
fed itself (the edited span).

Memory: caches are counted by the bytes of the tensor storage they hold; after each release the
least recently used documents are evicted until the total is within the budget. A cache that alone
exceeds the budget is not kept.

Thread use: `acquire`/`release` are meant to be called from one inference thread; bookkeeping is
guarded by a lock so that `drop` (on didClose) and `summary` may come from another thread. A cache
that is acquired is lent out: `drop` marks it, and its `release` then discards it.

This module knows nothing of LSP, prompts or the engine; it imports transformers only to build an
empty cache.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    i = 0
    # Compare in chunks first: prompts are thousands of ids and usually share almost all of them.
    step = 256
    while i + step <= n and list(a[i:i + step]) == list(b[i:i + step]):
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


def cache_nbytes(cache) -> int:
    """Bytes of tensor storage a DynamicCache holds (a cropped view still holds its whole storage)."""
    if cache is None:
        return 0
    total = 0
    seen: set[int] = set()
    for layer in getattr(cache, "layers", ()):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is None or not hasattr(t, "untyped_storage"):
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def cache_len(cache) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


@dataclass
class _Entry:
    ids: list[int]
    cache: object  # a transformers DynamicCache
    nbytes: int = 0
    lent: bool = False
    dropped: bool = False  # dropped while lent: discard on release
    used_at: float = field(default_factory=time.monotonic)


@dataclass
class Lease:
    """A cache lent for one generation: it holds the KV of `prompt_ids[:reused]`."""

    key: Hashable
    cache: object
    reused: int  # prompt tokens whose KV the cache already holds
    cached_before: int  # tokens the document's cache held before this request
    shifted: int = 0  # of `reused`, tokens kept by shifting their positions (kvshift.py)
    fed: int = 0  # of `reused`, tokens the shift fed to the model (edited spans), not found in the cache
    shift_ms: float = 0.0


class KVCacheStore:
    """Token ids + DynamicCache per document, longest-common-prefix reuse, LRU eviction by bytes."""

    def __init__(self, make_cache: Callable[[], object], budget_bytes: int = 512 * 2**20, enabled: bool = True):
        self.make_cache = make_cache
        self.budget_bytes = int(budget_bytes)
        self.enabled = enabled
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.evictions = 0

    # -- the request path -------------------------------------------------------------------------

    def acquire(self, key: Hashable, prompt_ids: Sequence[int], shift: Callable | None = None) -> Lease:
        """Lend `key`'s cache cropped to its longest common prefix with `prompt_ids` (a new, empty
        cache when there is none or the store is disabled). Pass the result to the engine, then
        hand it back with `release` (or `discard` if generation failed).

        `shift` (a kvshift.CacheShift): called as `shift(cache, cached_ids, prompt_ids, keep)` when
        the prompt leaves the cache at `keep`; it may rebuild more of the prompt from the cache after
        the change (returning a kvshift.Shifted) or leave the cache alone (None)."""
        with self._lock:
            entry = self._entries.get(key) if self.enabled else None
            if entry is None or entry.lent:
                # A lent cache is in use by another generation; never share one between two.
                return Lease(key, self.make_cache(), 0, 0)
            entry.lent = True
            self._entries.move_to_end(key)
        cached_before = cache_len(entry.cache)
        assert cached_before == len(entry.ids), "cache and ids out of step"
        keep = common_prefix_len(entry.ids, prompt_ids)
        shifted = None
        if shift is not None and keep < min(cached_before, len(prompt_ids) - 1):
            try:
                shifted = shift(entry.cache, entry.ids, prompt_ids, keep)
            except BaseException:
                self.discard(Lease(key, entry.cache, 0, cached_before))  # its state is unknown
                raise
        if shifted is not None:
            entry.ids = list(prompt_ids[:shifted.held])
            return Lease(key, entry.cache, shifted.held, cached_before, shifted.shifted, shifted.fed, shifted.ms)
        entry.cache.crop(keep - cached_before)  # crop takes minus the tokens to remove; 0 is a no-op
        entry.ids = list(prompt_ids[:keep])
        return Lease(key, entry.cache, keep, cached_before)

    def release(self, lease: Lease, cache_ids: Sequence[int]) -> None:
        """Keep `lease.cache`, which now holds the KV of `cache_ids` (prompt + generated tokens),
        as the document's cache, then evict least recently used documents down to the budget."""
        assert cache_len(lease.cache) == len(cache_ids), "the cache must hold exactly cache_ids"
        nbytes = cache_nbytes(lease.cache)
        with self._lock:
            old = self._entries.get(lease.key)
            if old is not None and old.cache is not lease.cache and old.lent:
                return  # another generation owns this document's entry now; keep that one
            if not self.enabled or (old is not None and old.dropped) or nbytes > self.budget_bytes:
                if old is not None and old.cache is lease.cache:
                    del self._entries[lease.key]
                return
            self._entries[lease.key] = _Entry(list(cache_ids), lease.cache, nbytes)
            self._entries.move_to_end(lease.key)
            self._evict_locked(keep=lease.key)

    def discard(self, lease: Lease) -> None:
        """Forget a lent cache whose state is unknown (the generation raised)."""
        with self._lock:
            old = self._entries.get(lease.key)
            if old is not None and old.cache is lease.cache:
                del self._entries[lease.key]

    # -- document life cycle and settings ---------------------------------------------------------

    def drop(self, key: Hashable) -> int:
        """Free `key`'s cache (didClose). Returns the bytes released (0 if none, or if it is lent:
        then it is discarded when released)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return 0
            if entry.lent:
                entry.dropped = True
                return 0
            del self._entries[key]
            return entry.nbytes

    def clear(self) -> None:
        with self._lock:
            for key in [k for k, e in self._entries.items() if not e.lent]:
                del self._entries[key]
            for e in self._entries.values():
                e.dropped = True

    def set_budget(self, budget_bytes: int) -> None:
        with self._lock:
            self.budget_bytes = int(budget_bytes)
            self._evict_locked()

    def _evict_locked(self, keep: Hashable | None = None) -> None:
        total = sum(e.nbytes for e in self._entries.values())
        for key in list(self._entries):
            if total <= self.budget_bytes:
                break
            entry = self._entries[key]
            if key == keep or entry.lent:
                continue
            total -= entry.nbytes
            del self._entries[key]
            self.evictions += 1

    # -- inspection -------------------------------------------------------------------------------

    def cached_ids(self, key: Hashable) -> list[int]:
        with self._lock:
            entry = self._entries.get(key)
            return list(entry.ids) if entry is not None else []

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def summary(self) -> dict:
        """Documents, tokens and bytes held, for logs and the server's stats request. A dropped
        entry still lent out (a closed document's cache in the middle of a pass) is left out: it
        is discarded when that pass ends."""
        with self._lock:
            docs = {str(k): {"tokens": len(e.ids), "bytes": e.nbytes} for k, e in self._entries.items() if not e.dropped}
            return {
                "enabled": self.enabled,
                "documents": len(docs),
                "bytes": sum(d["bytes"] for d in docs.values()),
                "budget_bytes": self.budget_bytes,
                "evictions": self.evictions,
                "per_document": docs,
            }
