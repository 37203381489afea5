"""One completion: settings, document text and cursor in; the text to show and its stats out.

    text + offset --prompt.build_prompt--> prompt ids (FIM, window)   `request_prompt`
                  --healing.heal---------> the ids the model is given  `heal_prompt`
                  --engine.generate------> new tokens (SDSAT or AR)    `decode`
                  --prompt.Rules---------> the completion              `complete`

This is the only place where the pipeline is written down. The server calls `complete` on its
worker thread (with the document's KV cache and the draft store), through typethrough.py, which
first checks whether the answer is known without a pass (`prepare`); the stress tool and the tests
call it with `mode="ar"` as the reference the server must equal; `sdsat-lsp eval` uses the
healing and decoding steps with its own prompts and stops. See docs/architecture.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .healing import heal, healed_decoder
from .prompt import Completion, Prompt, Rules, build_prompt, continuation_decoder
from .settings import Settings

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def model_text(text: str) -> str:
    """The document as the tokenizer can take it: JSON can carry lone surrogates ("\\ud800"), which
    no tokenizer encodes; each becomes U+FFFD, so offsets stay the same."""
    return _LONE_SURROGATE.sub("\ufffd", text) if _LONE_SURROGATE.search(text) else text


def request_prompt(loaded, s: Settings, text: str, offset: int, keep: str | None = None) -> tuple[Prompt, int, str]:
    """(prompt, k, decoding mode) for a completion at `offset` in `text`: the one place that turns
    settings and the model card into a prompt."""
    from .engine import context_length

    model, card = loaded.model, loaded.card
    k = s.k or card.k
    mode = s.mode if card.adaptive_ids else "ar"
    ctx = min(card.context_length or context_length(model), context_length(model))
    budget = max(16, min(s.max_prompt_tokens, ctx - s.max_tokens - 2 * (k + 1) - 8))
    prompt = build_prompt(text, offset, loaded.tokenizer, max_tokens=budget, max_suffix_tokens=s.max_suffix_tokens,
                          fim_ids=card.fim if s.fim else None, line_mode=s.line_mode, keep=keep)
    return prompt, k, mode


@dataclass
class ModelPrompt:
    """The prompt as the model is given it: healed when it ended inside a token (healing.py)."""

    ids: list[int]
    decode: Callable[[list[int]], str]  # new tokens -> the text after the cursor
    first_token_ids: list[int] | None  # the first new token is chosen among these (healing)
    healed: bool


def heal_prompt(tokenizer, ids: list[int], token_healing: bool = True) -> ModelPrompt:
    healing = heal(tokenizer, ids) if token_healing else None
    if healing is not None:
        ids = healing.ids
    # Decoded after the prompt's last tokens: SentencePiece drops a leading space at a decode's start.
    decode = healed_decoder(continuation_decoder(tokenizer, ids), healing)
    return ModelPrompt(list(ids), decode, healing.first_token_ids if healing is not None else None, healing is not None)


def decode(model, prompt: ModelPrompt, **options):
    """`engine.generate` after `prompt`, its text decoded and its first token healed."""
    from .engine import generate

    return generate(model, prompt.ids, decode=prompt.decode, first_token_ids=prompt.first_token_ids, **options)


@dataclass
class Result:
    completion: Completion | None  # None: nothing worth showing, or cancelled
    stats: dict[str, Any]  # the request's figures, as `sdsat/stats` reports them
    prompt: Prompt
    model_prompt: ModelPrompt
    generation: Any  # engine.Generation


@dataclass
class Prepared:
    """A request before any model pass: its prompt, the ids the model is given, its rules."""

    prompt: Prompt
    model_prompt: ModelPrompt
    rules: Rules
    k: int
    mode: str  # the decoding mode the settings and the model card give


def prepare(loaded, s: Settings, text: str, offset: int, keep: str | None = None) -> Prepared:
    """Prompt, healing and rules for a completion at `offset` in `text`: tokenizer work only.
    `complete` decodes after it; typethrough.py may answer from it with no pass at all."""
    prompt, k, mode = request_prompt(loaded, s, model_text(text), offset, keep=keep)
    mp = heal_prompt(loaded.tokenizer, prompt.ids, s.token_healing)
    return Prepared(prompt, mp, Rules(prompt.context), k, mode)


def complete(loaded, s: Settings, text: str, offset: int, *, keep: str | None = None, mode: str | None = None,
             kv=None, uri: str = "", draft_store=None, cancel: Callable[[], bool] | None = None,
             deadline: float | None = None, hard_deadline: float | None = None,
             prepared: Prepared | None = None) -> Result:
    """The completion at `offset` in `text` with settings `s` and `loaded` (model, tokenizer, card).

    `keep`: the window head of the previous prompt for this document (prompt.build_prompt keeps the
    window still while it fits). `mode`: the decoding mode instead of the settings' ("ar" for the
    reference). `kv`: a kvcache.KVCacheStore whose entry for `uri` is reused and updated.
    `draft_store`, `cancel`, `deadline` and `hard_deadline`: as `engine.generate` takes them.
    `prepared`: `prepare(loaded, s, text, offset, keep)` when the caller has it already."""
    from .kvshift import cache_shift
    from .sampling import Sampling

    p = prepared or prepare(loaded, s, text, offset, keep)
    prompt, k, mp, rules = p.prompt, p.k, p.model_prompt, p.rules
    mode = mode or p.mode
    lease = kv.acquire(uri, mp.ids, shift=cache_shift(loaded.model, s.cache_shift)) if kv is not None else None
    try:
        gen = decode(
            loaded.model, mp, mode=mode, k=k, adaptive_ids=loaded.card.adaptive_ids, max_new_tokens=s.max_tokens,
            should_stop=lambda tokens: rules.should_stop(mp.decode(tokens)),
            sampling=Sampling(s.temperature, s.top_k, s.top_p, None if s.seed < 0 else s.seed),
            cache=lease.cache if lease is not None else None, cancel=cancel, deadline=deadline, hard_deadline=hard_deadline,
            draft_length=s.draft_length, lookup_ngram=s.lookup_ngram, draft_store=draft_store, tree_nodes=s.tree_nodes,
        )
    except BaseException:
        if lease is not None:
            kv.discard(lease)  # its state is unknown
        raise
    if lease is not None:
        kv.release(lease, gen.cache_ids)
    stats = stats_of(gen, mp, prompt, lease.cached_before if lease is not None else 0, mode, k, lease)
    completion = None if gen.finish_reason == "cancelled" else rules.finish(mp.decode(gen.tokens))
    return Result(completion, stats, prompt, mp, gen)


def stats_of(gen, mp: ModelPrompt, prompt: Prompt, cached_before: int, mode: str, k: int, lease=None) -> dict[str, Any]:
    """A request's figures as `sdsat/stats` reports them (`cached_before`: tokens the document's KV
    cache held before it; `lease`: the KV store's, for what a cache shift did)."""
    st = gen.stats
    # Tokens a cache shift fed (the edited span) were prefilled, not reused; its time is prefill time.
    fed, shift_ms = (lease.fed, lease.shift_ms) if lease is not None else (0, 0.0)
    return dict(
        promptTokens=len(mp.ids), healed=mp.healed, reusedTokens=st.reused_tokens - fed,
        prefillTokens=st.prefill_tokens + fed, shiftedTokens=lease.shifted if lease is not None else 0,
        cachedBefore=cached_before, prefillMs=round(st.prefill_ms + shift_ms, 2),
        decodeMs=round(st.wall_ms - st.prefill_ms, 2), newTokens=st.new_tokens, forwardPasses=st.forward_passes,
        draftsAccepted=st.drafts_accepted, draftsVerified=st.drafts_verified, lookupAccepted=st.lookup_accepted,
        storeAccepted=st.store_accepted, storePasses=st.store_passes,
        finishReason=gen.finish_reason,
        multiline=prompt.context.multiline, fim=prompt.fim, windowStart=prompt.prefix_start, mode=mode, k=k,
    )
