"""Retrieval drafts: what most often followed the last few tokens in a fixed body of code.

REST (He et al., "Retrieval-Based Speculative Decoding", 2023) drafts from a datastore instead of
a draft model. Here the store is a token corpus sorted by its first `max_ngram` tokens at every
position, so the occurrences of an n-gram are one contiguous range found by binary search; the
draft is the continuation most occurrences agree on, cut where they stop agreeing.
Drafts are only proposals: the engine verifies them, so the output is the model's greedy output
whatever the store holds.

Kept free of torch (numpy only; the `draft-store` command that distills is tools/distill.py) so it
can be built, saved and tested on its own. The embedded model's store has two tiers: its own greedy continuations of training code
(`OWN_DRAFTS_FILE`), then the standard-library files it was trained on; never the held-out files,
so that the bench measures retrieval on code neither the model nor the store has seen.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .drafttree import DraftTree
from .errors import SdsatError

log = logging.getLogger(__name__)

_KEY_BITS = 63  # packed n-grams stay non-negative int64
_MAX_LIMIT = 64  # longest continuation one query may ask for (the padding after the corpus)
STORE_VERSION = 1


def _key_layout(vocab_size: int) -> tuple[int, int]:
    """(bits per token, tokens per packed key); the padding id, vocab_size, needs a code too."""
    bits = max(1, int(vocab_size).bit_length())
    max_ngram = min(4, _KEY_BITS // bits)
    if max_ngram < 2:
        raise SdsatError(f"a vocabulary of {vocab_size} ids is too large for the draft store")
    return bits, max_ngram


def _padded(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """The corpus followed by padding that reads as `vocab_size`, an id no query holds and no
    draft continues into, so slices past the end need no bounds checks."""
    return np.concatenate([tokens, np.full(_MAX_LIMIT + 4, vocab_size, np.int32)])


def _packed_keys(padded: np.ndarray, length: int, bits: int, max_ngram: int) -> np.ndarray:
    """Each position's next max_ngram tokens packed into one int64, first token highest."""
    keys = np.zeros(length, dtype=np.int64)
    for j in range(max_ngram):
        keys = (keys << bits) | padded[j:j + length].astype(np.int64)
    return keys


class DraftStore:
    """Continuations of n-grams (2..max_ngram tokens) in a fixed token corpus."""

    def __init__(self, tokens: np.ndarray, order: np.ndarray, vocab_size: int, sorted_keys: np.ndarray | None = None):
        self.vocab_size = int(vocab_size)
        self.source = ""  # what the corpus is, for reports (open_store names it)
        self._bits, self.max_ngram = _key_layout(self.vocab_size)
        if len(order) != len(tokens):
            raise SdsatError("draft store: the order does not match the corpus (a damaged file?)")
        self.tokens = tokens.astype(np.int32, copy=False)
        self.order = order.astype(np.int32 if len(tokens) < 2**31 else np.int64, copy=False)
        self._padded = _padded(self.tokens, self.vocab_size)
        if sorted_keys is None:  # a loaded store: keys are cheaper to recompute than to store
            sorted_keys = _packed_keys(self._padded, len(self.tokens), self._bits, self.max_ngram)[self.order]
        self._sorted_keys = sorted_keys

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, tokens: Sequence[int] | np.ndarray, vocab_size: int) -> DraftStore:
        tokens = np.asarray(tokens, dtype=np.int32)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise SdsatError(f"draft store: token ids must lie in 0..{vocab_size - 1}")
        bits, max_ngram = _key_layout(vocab_size)
        keys = _packed_keys(_padded(tokens, vocab_size), len(tokens), bits, max_ngram)
        order = np.argsort(keys, kind="stable")  # stable: one corpus, one store
        return cls(tokens, order, vocab_size, sorted_keys=keys[order])

    def save(self, path: str | Path) -> None:
        """Written atomically: a killed build leaves no half-written store behind."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.npz")
        np.savez(tmp, version=STORE_VERSION, tokens=self.tokens, order=self.order, vocab_size=self.vocab_size)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> DraftStore:
        try:
            with np.load(path) as data:
                if int(data["version"]) != STORE_VERSION:
                    raise SdsatError(f"draft store {path} has version {int(data['version'])}; expected {STORE_VERSION}")
                return cls(data["tokens"], data["order"], int(data["vocab_size"]))
        except (OSError, KeyError, ValueError) as e:
            raise SdsatError(f"cannot read draft store {path}: {e}") from e

    def occurrences(self, ngram: Sequence[int]) -> np.ndarray:
        """Corpus positions where `ngram` (1..max_ngram tokens) starts, ordered by the tokens after
        it (then by position)."""
        n = len(ngram)
        if not 1 <= n <= self.max_ngram or any(not 0 <= t < self.vocab_size for t in ngram):
            return self.order[:0]
        low = 0
        for t in ngram:
            low = (low << self._bits) | int(t)
        shift = self._bits * (self.max_ngram - n)
        low <<= shift
        lo = int(np.searchsorted(self._sorted_keys, low, side="left"))
        hi = int(np.searchsorted(self._sorted_keys, low + (1 << shift), side="left"))
        return self.order[lo:hi]

    def continuations(self, context: Sequence[int], limit: int, *, min_ngram: int = 2,
                      candidates: int = 256) -> np.ndarray:
        """(rows, limit) token array: what followed, at up to `candidates` occurrences evenly
        spread, the longest suffix of `context` (max_ngram down to min_ngram tokens) that occurs in
        the corpus; `vocab_size` pads a row that runs off the corpus's end."""
        limit = min(limit, _MAX_LIMIT)
        none = np.empty((0, max(limit, 0)), dtype=np.int32)
        if limit < 1:
            return none
        for n in range(min(self.max_ngram, len(context)), min_ngram - 1, -1):
            starts = self.occurrences(context[len(context) - n:])
            if len(starts):
                break
        else:
            return none
        if len(starts) > candidates:
            # The range is sorted by what follows, so evenly spaced picks keep each continuation's share.
            starts = starts[np.linspace(0, len(starts) - 1, candidates).astype(np.int64)]
        starts = starts.astype(np.int64) + n
        return self._padded[starts[:, None] + np.arange(limit)]

    def follow(self, context: Sequence[int], limit: int, *, min_ngram: int = 2, candidates: int = 256,
               min_share: float = 0.2) -> list[int]:
        """Up to `limit` tokens to draft after `context`: of its `continuations`, the token most of
        them continue with, as long as at least `min_share` of them still agree (the first token
        is always taken: one draft costs little)."""
        rows = self.continuations(context, limit, min_ngram=min_ngram, candidates=candidates)
        total = len(rows)
        draft: list[int] = []
        for depth in range(rows.shape[1] if total else 0):
            values, counts = np.unique(rows[:, depth], return_counts=True)
            best = int(counts.argmax())
            token = int(values[best])
            if token == self.vocab_size or (depth and counts[best] < min_share * total):
                break
            draft.append(token)
            rows = rows[rows[:, depth] == token]
        return draft

    def tree(self, context: Sequence[int], limit: int, nodes: int) -> DraftTree:
        """The `nodes` continuation prefixes most occurrences share, as a tree (see `draft_tree`)."""
        return draft_tree([(self.continuations(context, limit), 1.0)], nodes, self.vocab_size)


# Prefixes shared by fewer of the weighted continuations than this are not worth feeding: offline,
# a node shared by under a fifth of them was accepted 1-3% of the time. Timed with the engine on the
# bench's prompts (embedded model, 24 nodes 8 deep, one run): 0.1 fed 14.3 tokens per pass for 2.56
# accepted drafts (1.67x); 0.05 fed 19.6 for 2.75 (1.57x).
TREE_MIN_SHARE = 0.1


def draft_tree(parts: Sequence[tuple[np.ndarray, float]], nodes: int, vocab_size: int,
               min_share: float = TREE_MIN_SHARE) -> DraftTree:
    """The tree of the `nodes` heaviest prefixes of some continuations (each part: rows of tokens,
    and the weight each of its rows carries), leaving out prefixes lighter than `min_share` of all.
    A prefix weighs what the rows starting with it weigh together, never more than its own
    prefixes do, so the heaviest ones form a tree; ties go to the shorter prefix. `vocab_size`
    (padding) ends a row."""
    parts = [(rows, weight) for rows, weight in parts if len(rows) and rows.shape[1]]
    if not parts or nodes < 1:
        return DraftTree()
    depth_limit = min(rows.shape[1] for rows, _ in parts)
    rows = np.concatenate([r[:, :depth_limit] for r, _ in parts])
    weights = np.concatenate([np.full(len(r), float(w)) for r, w in parts])
    # Sorted, the rows sharing a prefix are one run at every depth (a run starts where a row differs
    # from the one before it in any column so far), so each prefix is counted with one reduceat.
    order = np.lexsort(rows.T[::-1])
    rows, weights = rows[order], weights[order]
    # "Lighter than a share" in exact arithmetic: a prefix weighing exactly the share (3 of 30 rows)
    # is kept, although 0.1 * 30 rounds to just above 3 in floats.
    floor = min_share * weights.sum() * (1 - 1e-9)
    starts_run = np.zeros(len(rows), dtype=bool)
    starts_run[0] = True
    prefix_of_row = np.zeros(len(rows), dtype=np.int64)  # id of each row's prefix so far (0: empty)
    ids, parents, tokens, weight, depth = [], [], [], [], []
    next_id = 1
    for d in range(depth_limit):
        starts_run[1:] |= rows[1:, d] != rows[:-1, d]
        heads = np.flatnonzero(starts_run)
        sums = np.add.reduceat(weights, heads)
        keep = (sums >= floor) & (rows[heads, d] != vocab_size)
        if not keep.any():
            break
        run_ids = np.arange(next_id, next_id + len(heads))
        next_id += len(heads)
        ids.append(run_ids[keep])
        parents.append(prefix_of_row[heads[keep]])
        tokens.append(rows[heads[keep], d])
        weight.append(sums[keep])
        depth.append(np.full(int(keep.sum()), d))
        prefix_of_row = np.repeat(run_ids, np.diff(np.append(heads, len(rows))))
    if not ids:
        return DraftTree()
    ids, parents, tokens, weight, depth = (np.concatenate(x) for x in (ids, parents, tokens, weight, depth))
    chosen = np.lexsort((depth, -weight))[:nodes]  # heaviest first, then shallowest
    children: dict[int, list[int]] = {}
    for i in chosen.tolist():  # in weight order, so each child list comes out heaviest first
        children.setdefault(int(parents[i]), []).append(i)
    tree_tokens, tree_parents = [], []
    stack = [(i, 0) for i in reversed(children.get(0, []))]
    while stack:  # depth first: the main path is laid out first
        i, parent_index = stack.pop()
        tree_tokens.append(int(tokens[i]))
        tree_parents.append(parent_index)
        stack += [(c, len(tree_tokens)) for c in reversed(children.get(int(ids[i]), []))]
    return DraftTree(tree_tokens, tree_parents)


def store_path(tokenizer_fingerprint: str, corpus_fingerprint: str) -> Path:
    from .embedded import _cache_root

    key = hashlib.sha256(f"{tokenizer_fingerprint}\0{corpus_fingerprint}\0{STORE_VERSION}".encode()).hexdigest()[:16]
    return _cache_root() / "draftstores" / f"{key}.npz"


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]


class TieredStore:
    """Chains from the first store that has one; trees from all of them, each store's
    continuations weighing `weights[i]` apiece."""

    def __init__(self, *stores: DraftStore, source: str = "", weights: Sequence[float] | None = None):
        self.stores = stores
        self.source = source
        self.weights = tuple(weights) if weights is not None else (1.0,) * len(stores)
        if len(self.weights) != len(stores):
            raise SdsatError("a tiered draft store needs one weight per store")

    def __len__(self) -> int:
        return sum(len(s) for s in self.stores)

    def follow(self, context: Sequence[int], limit: int) -> list[int]:
        for store in self.stores:
            draft = store.follow(context, limit)
            if draft:
                return draft
        return []

    def tree(self, context: Sequence[int], limit: int, nodes: int) -> DraftTree:
        parts = [(store.continuations(context, limit), w) for store, w in zip(self.stores, self.weights)]
        return draft_tree(parts, nodes, self.stores[0].vocab_size)


# Beside a model's weights: its own greedy continuations of training code (`sdsat-lsp draft-store
# --distill`). They say what this model will say, where code says what people wrote. Scored offline
# on the bench's 20 prompts (the embedded model's greedy outputs known, drafts checked against
# them): 67k such tokens alone drafted better than the 7.2M-token corpus (accepted drafts per pass
# 1.89 against 1.36); tiered before it, tokens per pass rose from 2.25 to 2.54 (67k) and 2.71 (339k,
# shipped), and the bench measured 1.84x against fused+lookup's 1.42x in one run.
OWN_DRAFTS_FILE = "drafts.npy"
# In a draft tree, one of the model's own continuations counts as this many of the corpus's. Same
# offline scoring, 24 nodes: accepted drafts per pass 2.47 at weight 1, 2.57 at 4, 2.60 at 16.
OWN_DRAFTS_WEIGHT = 4.0


def store_choice(setting: str, card) -> str | None:
    """What a `draftStore`-like setting names: "auto" is the model card's choice; "off" and
    "none" (and a card naming nothing) are None."""
    choice = card.draft_store if setting == "auto" else setting
    return None if choice in (None, "", "off", "none") else choice


# Limits on a folder a client names as its draft store (`draftStore`): the server walks and tokenizes
# it beside the worker, holds its tokens in memory and caches them on disk. The standard library
# (1,302 files, 26 MiB) builds in about half a minute on 2 cores into a 7.2M-token store of about
# 145 MB in memory (20 bytes a token: ids, order, sorted keys); these allow a project several times its size and refuse a disk or a home folder
# (`draftStore: "/"` walked 29,463 files and grew to 2.2 GiB before anyone stopped it).
MAX_FOLDER_FILES = 10_000  # Python files kept (about 8x the standard library's)
MAX_FOLDER_BYTES = 64 * 2**20  # their bytes: about 2.5x the standard library, ~18M tokens, ~360 MB of store
MAX_FOLDER_ENTRIES = 200_000  # files and folders looked at, .py or not: a walk of a few seconds
# Folders that are never a project: whole disks, homes and the trees the system itself lives in.
_SYSTEM_TREES = {"bin", "boot", "dev", "etc", "lib", "lib32", "lib64", "libx32", "opt", "proc", "run", "sbin",
                 "snap", "srv", "sys", "usr", "var", "System", "Library", "Applications", "Volumes", "private",
                 "Windows", "Program Files", "Program Files (x86)", "ProgramData"}
# Cached stores (~/.cache/sdsat-lsp/draftstores) kept: the newest this many, within this many bytes
# (the standard library's store is 58 MB on disk, a project's often a few KB). A store is "newer"
# when last built or loaded, so the one in use is never the first to go.
MAX_CACHED_STORES = 16
MAX_CACHE_BYTES = 1 << 30
# A half-written store left by a killed build (its name ends in .tmp<pid>.npz) older than this is removed.
STALE_TMP_S = 3600


def refused_folder(folder: Path) -> str | None:
    """Why `folder` (resolved) may not be a draft store, or None: a filesystem root, the home
    folder or one above it, or a system tree."""
    try:
        home = Path.home().resolve()
    except (RuntimeError, OSError):  # no home folder to protect
        home = Path(folder.anchor)
    if folder == Path(folder.anchor) or folder.parent == folder:
        return "it is the root of a disk"
    if folder == home or folder in home.parents:
        return "it is the home folder or holds it"
    if folder.parent == Path(folder.anchor) and folder.name in _SYSTEM_TREES:
        return "it is a system folder"
    return None


def open_store(choice: str, tokenizer, vocab_size: int, progress: Callable[[str], None] | None = None,
               model_dir: str | Path | None = None, cancel: Callable[[], bool] | None = None) -> DraftStore | TieredStore:
    """The store `choice` names: "stdlib" (the standard library's training files) or a folder;
    preceded by the model's own continuations when `model_dir` holds them. `cancel()` true stops a
    build (between files) with corpus.Cancelled."""
    from .corpus import Cancelled

    if cancel is not None and cancel():
        raise Cancelled(f"draft store {choice} cancelled before it started")
    if choice == "stdlib":
        store = stdlib_store(tokenizer, vocab_size, progress, cancel)
    elif Path(choice).is_dir():
        store = folder_store(choice, tokenizer, vocab_size, progress, cancel)
    else:
        raise SdsatError(f"draft store {choice!r}: give stdlib or a folder of Python files (no such folder)")
    store.source = choice
    own = Path(model_dir) / OWN_DRAFTS_FILE if model_dir is not None else None
    if own is None or not own.is_file():
        return store
    try:
        tokens = np.load(own)
    except (OSError, ValueError) as e:
        raise SdsatError(f"cannot read {own}: {e}") from e
    return TieredStore(DraftStore.build(tokens, vocab_size), store, source=f"{OWN_DRAFTS_FILE}+{choice}",
                       weights=(OWN_DRAFTS_WEIGHT, 1.0))


def stdlib_store(tokenizer, vocab_size: int, progress: Callable[[str], None] | None = None,
                 cancel: Callable[[], bool] | None = None) -> DraftStore:
    """The store of the standard library's training files (the held-out ones never enter it)."""
    from .corpus import split_files

    root, train, _held_out = split_files()
    return _cached_store(root, train, tokenizer, vocab_size, progress, cancel)


def folder_store(folder: str | Path, tokenizer, vocab_size: int,
                 progress: Callable[[str], None] | None = None, cancel: Callable[[], bool] | None = None) -> DraftStore:
    """The store of every Python file under `folder`, within the MAX_FOLDER_* limits."""
    from .corpus import Cancelled, bounded_python_files

    root = Path(folder).resolve()
    why = refused_folder(root)
    if why is not None:
        raise SdsatError(f"draft store {folder}: refused, {why}; give a project's folder of Python files")
    try:
        files = bounded_python_files(root, MAX_FOLDER_FILES, MAX_FOLDER_BYTES, MAX_FOLDER_ENTRIES, cancel)
    except Cancelled:
        raise
    except SdsatError as e:
        raise SdsatError(f"draft store: {e}") from e
    return _cached_store(root, files, tokenizer, vocab_size, progress, cancel)


def _cached_store(root: Path, files: list[Path], tokenizer, vocab_size: int,
                  progress: Callable[[str], None] | None, cancel: Callable[[], bool] | None = None) -> DraftStore:
    """Built once (the standard library, 7M tokens: about half a minute on 2 cores, mostly
    tokenizing) and cached under the user's cache folder, keyed by tokenizer and file list. An
    edited file keeps its old tokens until the list changes: drafts stay proposals, so a stale
    store costs speed, never correctness."""
    from .corpus import file_list_hash, token_stream

    path = store_path(tokenizer_fingerprint(tokenizer), f"{root}:{file_list_hash(files, root)}")
    if path.is_file():
        try:
            store = DraftStore.load(path)
            _touch(path)  # recently used: the last to be evicted
            return store
        except SdsatError as e:
            log.warning("%s; building it again", e)
    if progress:
        progress(f"building the draft store from {len(files)} Python files under {root} (once; cached in {path.parent})")
    store = DraftStore.build(token_stream(tokenizer, files, cancel), vocab_size)
    store.save(path)
    evict_cached_stores(path.parent, keep=path)
    return store


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def evict_cached_stores(folder: Path, keep: Path | None = None) -> list[Path]:
    """Remove cached stores beyond the newest MAX_CACHED_STORES or MAX_CACHE_BYTES (never `keep`,
    the one just built), and half-written ones older than STALE_TMP_S; the paths removed. Another
    server that was about to load a removed store builds it again."""
    import time

    removed = []
    stores = []
    for path in folder.glob("*.npz"):
        try:
            stat = path.stat()
        except OSError:
            continue
        if ".tmp" in path.name:
            if time.time() - stat.st_mtime > STALE_TMP_S:
                removed.append(path)
            continue
        stores.append((path != keep, -stat.st_mtime, stat.st_size, path))
    stores.sort()  # `keep` first, then newest first
    total = 0
    for rank, (_, _, size, path) in enumerate(stores):
        total += size
        if path != keep and (rank >= MAX_CACHED_STORES or total > MAX_CACHE_BYTES):
            removed.append(path)
    for path in removed:
        try:
            path.unlink()
            log.info("evicted the cached draft store %s", path)
        except OSError:
            pass
    return removed
