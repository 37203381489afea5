"""Loading the model for the server, on its worker thread: torch and transformers are imported
here (seconds), after `initialize` has been answered."""

from __future__ import annotations

import logging
import time
from typing import Any

from . import faults
from .kvcache import KVCacheStore
from .settings import Settings

log = logging.getLogger(__name__)


def load_blocking(settings: Settings, report) -> tuple[Any, KVCacheStore]:
    """Import torch/transformers, load the model, build its KV cache store, warm up.
    `report(message, percentage)` tells the client how far it got. For a remote backend
    (backends/remote.py): its tokenizer and the endpoint checked, and no KV cache store (None)."""
    if settings.backend != "local":
        from .backends.remote import load_remote

        return load_remote(settings, report), None
    report("importing torch", 5)
    faults.before_loading()
    started = time.perf_counter()
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    from .embedded import resolve_model
    from .growable_cache import GrowableCache

    log.info("torch and transformers imported in %.1f s", time.perf_counter() - started)
    report("loading weights", 50)
    loaded = resolve_model(settings.model or None, quantize=settings.quantize, device=settings.device,
                           dtype=settings.dtype)
    model = loaded.model
    kv = KVCacheStore(lambda: GrowableCache(config=model.config), settings.cache_budget_mb * 2**20,
                      enabled=settings.kv_cache)
    report("warming up", 90)
    from .engine import generate
    from .healing import token_texts

    ids = loaded.tokenizer("def f(x):\n    return", add_special_tokens=False)["input_ids"] or [0]
    token_texts(loaded.tokenizer)  # the vocabulary's texts, for token healing (once, not on the first request)
    generate(model, ids, mode="ar", max_new_tokens=2)  # the first pass of a process is slow
    faults.after_loading(model)
    return loaded, kv
