"""Decoding choices and defaults shared by the engine, the bench and the server.

Kept free of torch: the server validates settings with these before the model (and torch) has
loaded in the background, and must answer `initialize` at once."""

MODES = ("ar", "two-pass", "fused")
DRAFT_LENGTHS = ("adaptive", "fixed")
# Context-lookup drafts: the n-gram that must have occurred before, and how many tokens that
# followed it are verified. The bench measured n = 2..4 and 8..24 tokens within its noise of
# each other on the embedded model; 3 and 8 keep passes small.
LOOKUP_NGRAM = 3
LOOKUP_TOKENS = 8
# Retrieved drafts verified per pass as a tree (drafttree.py) of up to TREE_NODES tokens and
# TREE_DEPTH deep; TREE_NODES 0 = one continuation. On the embedded model, bench: 2.64 accepted
# drafts per pass against one continuation's 2.03, at the same speed on 2 CPU cores within noise
# (two runs: 1.62x and 1.83x against 1.79x and 1.69x), where every fed token costs; on a GPU extra
# tokens should be nearly free (not measured yet). Other shapes, timed with the engine on the bench's prompts in one run
# against one continuation's 1.73x: 24 nodes 8 deep 2.56 (1.65x), 24 x 12 2.72 (1.60x), 16 x 12
# 2.64 (1.73x).
TREE_NODES = 16
TREE_DEPTH = 12
# The most tokens one decoding pass feeds: `draftLength: fixed` with k = 64 prepared a block for
# every acceptance length, 4,225 tokens a pass (43-81 s for 64 tokens on 2 cores). Past this the
# pass carries fewer adaptive blocks; drafts change, the output does not. The defaults feed under 40.
MAX_FED_PER_PASS = 256
