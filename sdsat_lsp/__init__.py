"""sdsat-lsp: editor code completion over LSP, fast through SDSAT speculative decoding.

A regular package (not a namespace one), so that a checkout on PYTHONPATH shadows an installed
copy whole instead of being merged with it module by module.
"""
