"""Where a completion is decoded: the backend boundary of the completion core.

- `local` (the default): this process loads the model and decodes with the SDSAT engine
  (completion.complete on the server's worker thread).
- `vllm` / `openai`: an OpenAI-compatible completions endpoint decodes (remote.py over
  endpoint.py). The server still builds the prompt (window, FIM, healing, rules) with the model's
  tokenizer, sends token ids, streams, stops at its own rules and aborts the HTTP request on a
  cancel. `vllm` also uses vLLM's extensions: token ids in the stream (`return_token_ids`), the
  healed first token (`allowed_token_ids`) and the tokenizer check at start (`/tokenize`).
  `openai` uses only the plain protocol: text chunks, no token healing.

Torch-free on import: settings.py validates the `backend` setting with BACKENDS before torch loads.
"""

BACKENDS = ("local", "vllm", "openai")
REMOTE_BACKENDS = ("vllm", "openai")
