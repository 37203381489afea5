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
# TREE_DEPTH deep; TREE_NODES 0 = one continuation. Measured on the embedded model (bench prompts,
# one run): 16 nodes 12 deep accepted 2.64 drafts per pass against one continuation's 2.03 at the
# same speed on 2 CPU cores (1.73x over plain decoding), where every fed token costs; 24 nodes 8
# deep 2.56 (1.65x); 24 nodes 16 deep 2.81 (1.67x). On a GPU extra tokens are nearly free.
TREE_NODES = 16
TREE_DEPTH = 12
