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
