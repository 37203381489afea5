"""Where drafts come from, beside the draft tree that verifies them (drafttree.py): the adaptive
tokens (engine.py), the context (`NgramIndex`, prompt lookup) and a draft store (draftstore.py,
retrieval), and which of them a pass uses (`propose`). Pure Python. See docs/decoding.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .decoding import LOOKUP_TOKENS, TREE_DEPTH
from .drafttree import DraftTree


class DraftSource(Protocol):
    """Proposes tokens to follow `context` (its tail; see `STORE_CONTEXT`): one continuation of up
    to `limit` tokens, or a tree of up to `nodes` tokens and `limit` deep."""

    def follow(self, context: Sequence[int], limit: int) -> list[int]: ...

    def tree(self, context: Sequence[int], limit: int, nodes: int) -> DraftTree: ...


# The tokens of context a draft store is given: more than any store matches on (draftstore: 4).
STORE_CONTEXT = 8


class NgramIndex:
    """Where each n-gram of a growing token sequence last occurred, for prompt-lookup drafts."""

    def __init__(self, n: int, tokens: Sequence[int]):
        self.n = n
        self.tokens: list[int] = []
        self._last_end: dict[tuple[int, ...], int] = {}  # n-gram -> end index of its latest occurrence
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens)
            if end >= self.n:
                self._last_end[tuple(self.tokens[end - self.n:end])] = end

    def follow(self, next_token: int, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the last n-gram of
        tokens + [next_token]; [] when it never occurred before."""
        if self.n < 1 or len(self.tokens) + 1 < self.n:
            return []
        size = len(self.tokens)
        gram = tuple(self.tokens[size + 1 - self.n:]) + (next_token,)
        end = self._last_end.get(gram)
        if end is None:
            return []
        # Copy as LZ77 does, overlaps included: past the end of the tokens the copy continues from
        # what it has produced itself, so a loop of period p drafts its next `limit` tokens.
        tail = [next_token]
        for j in range(end, end + limit):
            tail.append(self.tokens[j] if j < size else tail[j - size])
        return tail[1:]


@dataclass
class Drafting:
    """How a decode drafts. `mode`: "ar" | "two-pass" | "fused" (engine.py); `k` adaptive tokens per
    block, `adaptive_ids` their ids (one, repeated, or k).

    `draft_length`: "fixed" drafts k tokens every time and, in the fused mode, prepares a block for
    every acceptance length (the scheme as published). "adaptive" (the default) starts at one
    draft, drafts one more after a pass that accepted every draft and one fewer after one that did
    not (between 1 and k), and prepares blocks only for accepting 0, 1, 2 or all drafts: a fused
    pass with a block per length feeds about d*d tokens for d drafts, and drafts that are rarely
    accepted cost more than they bring. After an acceptance length without a block the next pass
    drafts afresh (as the two-pass scheme does). The output is the same either way; only the work
    differs.

    `lookup_ngram` > 0 (SDSAT modes only): when the last `lookup_ngram` tokens occurred before in
    the prompt or the output, up to `lookup_tokens` tokens that followed them there are the draft
    instead of the adaptive tokens' (prompt-lookup decoding: code repeats itself). `draft_store`
    (SDSAT modes only; see draftstore.py): when the context has no draft, up to `lookup_tokens`
    tokens retrieved from a body of code are the draft. A store has a draft nearly always, so a pass
    whose draft was retrieved (from the store or the context) carries no adaptive blocks when there
    is a store: they would almost never be read. `tree_nodes` > 0 (greedy decoding with a store): a
    pass verifies a tree of up to that many retrieved tokens (the store's most shared
    continuations, the context's draft merged in, both up to `tree_depth` deep; see drafttree.py)
    instead of one continuation, and counts as a lookup pass when the context had a draft."""

    mode: str = "fused"
    k: int = 5
    adaptive_ids: Sequence[int] = ()
    draft_length: str = "adaptive"
    lookup_ngram: int = 0
    lookup_tokens: int = LOOKUP_TOKENS
    draft_store: DraftSource | None = None
    tree_nodes: int = 0
    tree_depth: int = TREE_DEPTH


@dataclass
class Proposal:
    """What a pass verifies, and where it came from (the stats count the kinds apart)."""

    tree: DraftTree
    from_lookup: bool
    from_store: bool


def propose(drafting: Drafting, greedy: bool, lookup: NgramIndex | None, store: DraftSource | None,
            seq: Sequence[int], y: int, adaptive: list[int]) -> Proposal:
    """The drafts to verify after `seq` + [y]: the context's, else the store's, else the adaptive
    tokens' (`adaptive`); as a tree when there is a store and the decode is greedy."""
    as_tree = store is not None and drafting.tree_nodes > 0 and greedy
    looked_up = lookup.follow(y, drafting.tree_depth if as_tree else drafting.lookup_tokens) if lookup is not None else []
    from_lookup, from_store = bool(looked_up), False
    tree = None
    if as_tree:
        tree = store.tree(list(seq[-STORE_CONTEXT:]) + [y], drafting.tree_depth, drafting.tree_nodes)
        from_store = len(tree) > 0
        if looked_up:
            tree.add_path(looked_up)
    if tree is None or not len(tree):  # a chain: retrieved, looked up, or the adaptive tokens'
        # After an empty tree too: `follow` still drafts the token most continuations begin
        # with when none is shared widely enough for a tree node.
        retrieved = [] if from_lookup or store is None else store.follow(list(seq[-STORE_CONTEXT:]) + [y], drafting.lookup_tokens)
        from_store = bool(retrieved)
        chain = looked_up if from_lookup else retrieved if from_store else adaptive
        tree = DraftTree.chain(chain)
    return Proposal(tree, from_lookup, from_store)
