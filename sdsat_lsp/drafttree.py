"""A tree of draft tokens, verified in one forward pass.

One retrieved continuation is often nearly right: the code after `for i in` goes on with `range(`
in some places and `enumerate(` in others. REST (He et al., 2023) and Medusa (Cai et al., 2024)
verify several candidate continuations at once, sharing their common prefixes as a tree: every node
is fed once, at the position of its depth, and attends to the cache, the token being verified and
its own ancestors only. The accepted path is the longest one whose every token is what the model
itself would have produced, so the output is still exactly greedy decoding.

Nodes are stored parents first, as the pass feeds them after the token being verified (which is
index 0): `parents[i]` is the index, in that fed order, of node i+1's parent. Children are laid
out heaviest first, so a tree's main path is contiguous and a pass that accepts it leaves the cache
in order with no move. Pure Python: the engine (torch) and the draft store (numpy) both use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)  # node tokens in fed order (the root, index 0, is not here)
    parents: list[int] = field(default_factory=list)  # fed index of each node's parent; 0 is the root

    def __post_init__(self) -> None:
        assert len(self.tokens) == len(self.parents)
        assert all(0 <= p <= i for i, p in enumerate(self.parents)), "parents must come before their children"
        self._children = {(p, t): i + 1 for i, (p, t) in enumerate(zip(self.parents, self.tokens))}

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> DraftTree:
        return cls(list(tokens), list(range(len(tokens))))

    def __len__(self) -> int:
        return len(self.tokens)

    def child(self, node: int, token: int) -> int | None:
        """The fed index of `node`'s child holding `token`, if the tree has one."""
        return self._children.get((node, token))

    def depths(self) -> list[int]:
        """Each node's depth (1 for the root's children): its position offset from the root."""
        depth = [0]
        for p in self.parents:
            depth.append(depth[p] + 1)
        return depth[1:]

    def is_chain(self) -> bool:
        return self.parents == list(range(len(self.parents)))

    def cut(self, max_depth: int) -> DraftTree:
        """The tree without nodes deeper than `max_depth` (room left in the model's context)."""
        kept: dict[int, int] = {0: 0}  # old fed index -> new
        tokens, parents = [], []
        for i, (token, parent, depth) in enumerate(zip(self.tokens, self.parents, self.depths()), start=1):
            if depth <= max_depth:
                tokens.append(token)
                parents.append(kept[parent])
                kept[i] = len(tokens)
        return DraftTree(tokens, parents)

    def add_path(self, path: Sequence[int]) -> None:
        """Merge one more continuation of the root: its tokens not already in the tree are
        appended (the layout stays parents first; the main path is unchanged)."""
        node = 0
        for token in path:
            found = self.child(node, token)
            if found is None:
                self.tokens.append(int(token))
                self.parents.append(node)
                found = len(self.tokens)
                self._children[(node, int(token))] = found
            node = found

    def walk(self, choice: Callable[[int], int]) -> list[int]:
        """The accepted path: fed indices of the nodes reached by following, from the root, the
        child holding what the model chose at each node (`choice(i)` for fed index i; asked only
        for the nodes on the path and the last one's, so the caller can compute it lazily)."""
        path: list[int] = []
        node = 0
        while (node := self.child(node, choice(node))) is not None:
            path.append(node)
        return path
