"""SDSAT decoding over a Hugging Face causal LM: the autoregressive baseline, the two-pass
draft-then-verify scheme and the fused step, greedy and (losslessly) sampled.

The engine knows nothing of LSP, documents or editors. It takes token ids, a model and a
transformers `DynamicCache` that may already hold a prefix of the prompt (the caller's per-document
cache), and returns tokens, stats and what is left in the cache. Forward passes are the unit of
cost and of cancellation: `cancel()` is checked before every pass.

The SDSAT contract (see shared/design/sdsat.md): feed `[x_t, A_1..A_k]` at positions t..t+k under a
causal mask; the output at x_t predicts x_{t+1} and the output at A_j predicts x_{t+j+1}. Adaptive
tokens' KV entries are dropped before any real token is fed, so real tokens never see them.

One loop serves every scheme. State between passes: `y`, the next token (known, not yet in the
cache), and `drafts`, guesses for the tokens after it. A pass feeds `[y, d_1..d_m]` to verify the
drafts and may append adaptive blocks, one per acceptance length n it wants to be ready for: the
block for n sits after d_n (positions of y + n + 1 ...) and sees only the cache, y and d_1..d_n.
After the pass, n drafts are accepted, the next `y` comes from the output at d_n, and the block for
n (if there is one) supplies the next drafts. Everything after y, d_1..d_n is cropped from the cache:
the kept entries are always a prefix of what the pass appended, so `DynamicCache.crop` is the only
rollback needed.

- "ar": no drafts, no blocks; one token per pass.
- "two-pass" (the reference): a pass with no drafts carries the n=0 block (a draft pass: one token
  plus k drafts); a pass with drafts carries no block (a verify pass). At most (k+2)/2 tokens/pass.
- "fused": every pass carries a block for every n in 0..m under a 4-D mask, so verifying and
  drafting share one pass: 1 + accepted tokens per pass. On CPU a pass costs a fixed part plus a
  part per token fed (embedded model, 2 cores: ~10 ms + 0.3 ms per token), so saving passes pays
  as long as the blocks stay small: see `draft_length`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .decoding import DRAFT_LENGTHS, LOOKUP_TOKENS, MODES, TREE_DEPTH
from .drafttree import DraftTree
from .errors import SdsatError


@dataclass
class Sampling:
    """Token choice. temperature 0 is greedy (and seed-independent)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class DecodeStats:
    forward_passes: int = 0
    prefill_tokens: int = 0  # prompt tokens fed (not found in the cache)
    reused_tokens: int = 0  # prompt tokens found in the cache passed in
    tokens_fed: int = 0  # every token fed, adaptive ones included
    drafts_verified: int = 0
    drafts_accepted: int = 0
    verify_passes: int = 0  # passes that checked at least one draft
    lookup_passes: int = 0  # of those, passes whose drafts came from the context (lookup_ngram)
    lookup_accepted: int = 0
    store_passes: int = 0  # passes whose drafts came from the draft store (retrieval)
    store_accepted: int = 0
    new_tokens: int = 0
    prefill_ms: float = 0.0
    wall_ms: float = 0.0
    # Per decoding pass after the prefill: drafts accepted (-1 for a pass that verified none).
    accepted_per_pass: list[int] = field(default_factory=list)
    # Per decoding pass after the prefill: (tokens fed, ms from feeding to the verified path).
    pass_costs: list[tuple[int, float]] = field(default_factory=list)

    @property
    def mean_accepted(self) -> float:
        """Accepted drafts per verifying pass (the paper's acceptance length, minus the free token)."""
        return self.drafts_accepted / self.verify_passes if self.verify_passes else 0.0

    @property
    def mean_accepted_adaptive(self) -> float | None:
        """Accepted drafts per verifying pass whose drafts came from the adaptive tokens (None
        when no pass verified any)."""
        passes = self.verify_passes - self.lookup_passes - self.store_passes
        return (self.drafts_accepted - self.lookup_accepted - self.store_accepted) / passes if passes else None

    @property
    def tokens_per_pass(self) -> float:
        """New tokens per forward pass, the prefill pass included (it yields the first token)."""
        return self.new_tokens / self.forward_passes if self.forward_passes else 0.0

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("accepted_per_pass", "pass_costs")}
        d["mean_accepted"] = self.mean_accepted
        d["mean_accepted_adaptive"] = self.mean_accepted_adaptive
        d["tokens_per_pass"] = self.tokens_per_pass
        return d


@dataclass
class Generation:
    tokens: list[int]
    finish_reason: str  # "eos" | "length" | "stop" | "cancelled" | "budget"
    stats: DecodeStats
    cache_ids: list[int] = field(default_factory=list)  # ids whose KV the cache holds afterwards


# ----------------------------------------------------------------------------------------------
# Stopping: one token at a time, so that SDSAT, which learns several tokens per pass, stops at
# exactly the token where plain decoding would.


class Stopper:
    """Decides, token by token, when generation ends. EOS is not part of the output; a stop string
    ends generation at the token that completes it (that token is kept; callers trim the text).
    Past `deadline` (a time.perf_counter() value) generation ends at the next token holding a
    newline (llama.cpp's t_max_predict_ms rule), or at once when there is no `decode`."""

    def __init__(
        self,
        max_new_tokens: int,
        eos_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        decode: Callable[[list[int]], str] | None = None,
        should_stop: Callable[[list[int]], bool] | None = None,
        deadline: float | None = None,
    ):
        if stop_strings and decode is None:
            raise ValueError("stop strings need a decode function")
        self.max_new_tokens = max_new_tokens
        self.eos_ids = set(eos_ids)
        self.stop_strings = [s for s in stop_strings if s]
        self.decode = decode
        self.should_stop = should_stop
        self.deadline = deadline
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    def push(self, token: int) -> bool:
        """Take one generated token; True once generation is over."""
        assert self.finish_reason is None
        if token in self.eos_ids:
            self.finish_reason = "eos"
            return True
        self.tokens.append(token)
        if self.stop_strings and any(s in self.decode(self.tokens) for s in self.stop_strings):
            self.finish_reason = "stop"
        elif self.should_stop is not None and self.should_stop(self.tokens):
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        elif self.deadline is not None and time.perf_counter() > self.deadline and (
            self.decode is None or "\n" in self.decode([token])
        ):
            self.finish_reason = "budget"
        return self.finish_reason is not None

    def push_all(self, tokens: Sequence[int]) -> bool:
        return any(self.push(t) for t in tokens) if self.finish_reason is None else True


# ----------------------------------------------------------------------------------------------
# Token choice: greedy, sampling, and the lossless speculative acceptance rule.


def logits_to_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """(..., V) logits -> probabilities after temperature, top-k and top-p, in float32."""
    logits = logits.float() / max(sampling.temperature, 1e-5)
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest set whose mass reaches top_p: drop a token when the mass before it does.
        drop_sorted = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())


def accept_draft(probs: torch.Tensor, draft: int, generator: torch.Generator | None) -> int | None:
    """Speculative sampling with a deterministic draft (q is one-hot on `draft`).

    Accept with probability min(1, p(d)/q(d)) = p(d); on rejection sample from
    norm(max(0, p - q)), which is p with d removed. Then P(out = d) = p(d) and, for x != d,
    P(out = x) = (1 - p(d)) * p(x) / (1 - p(d)) = p(x): the model's own distribution.
    Returns None when the draft is accepted, else the token to emit instead.
    """
    p_draft = float(probs[draft])
    u = torch.rand((), generator=generator, device=probs.device).item() if generator is not None else torch.rand(()).item()
    if u < p_draft:
        return None
    residual = probs.clone()
    residual[draft] = 0.0
    if float(residual.sum()) <= 0.0:  # p(d) == 1 cannot be rejected; guard float round-off
        return None
    return _draw(residual / residual.sum(), generator)


AcceptRule = Callable[[torch.Tensor, int, "torch.Generator | None"], "int | None"]


class DraftSource(Protocol):
    """Proposes tokens to follow `context` (its tail; see `STORE_CONTEXT`): one continuation of up
    to `limit` tokens, or a tree of up to `nodes` tokens and `limit` deep."""

    def follow(self, context: Sequence[int], limit: int) -> list[int]: ...

    def tree(self, context: Sequence[int], limit: int, nodes: int) -> DraftTree: ...


# The tokens of context a draft store is given: more than any store matches on (draftstore: 4).
STORE_CONTEXT = 8


# ----------------------------------------------------------------------------------------------
# Forward passes.


def _model_dtype(model) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype if model.get_input_embeddings().weight.is_floating_point() else torch.float32


def _model_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _compiled(model, cache, tokens: int):
    """The model's compiled forward (`compiled.py`, attached by the server or the bench) when it is
    ready and takes this pass; None: the eager path below."""
    compiled = model.__dict__.get("sdsat_forward")
    return compiled if compiled is not None and compiled.accepts(cache, tokens) else None


def forward(model, cache, ids: Sequence[int], positions: Sequence[int], mask: torch.Tensor | None = None,
            logits_to_keep: int = 0) -> torch.Tensor:
    """One forward pass appending `ids` to `cache`; returns (T, V) float32 logits (the last
    `logits_to_keep` positions when it is > 0)."""
    compiled = _compiled(model, cache, len(ids))
    if compiled is not None:
        states = compiled.states(cache, ids, positions, mask)
        with torch.inference_mode():
            return model.get_output_embeddings()(states[-logits_to_keep:] if logits_to_keep else states).float()
    with torch.inference_mode():
        out = model(**_pass_inputs(model, cache, ids, positions, mask), logits_to_keep=logits_to_keep)
    return out.logits[0].float()


def _pass_inputs(model, cache, ids: Sequence[int], positions: Sequence[int], mask: torch.Tensor | None) -> dict:
    device = _model_device(model)
    return dict(
        input_ids=torch.tensor([list(ids)], dtype=torch.long, device=device),
        position_ids=torch.tensor([list(positions)], dtype=torch.long, device=device),
        attention_mask=mask,
        cache=cache,
        use_cache=True,
    )


def _decoder_and_head(model):
    """(decoder, head) when the logits are exactly `head(decoder(...).last_hidden_state)`, else None."""
    if getattr(model.config, "final_logit_softcapping", None):
        return None
    decoder, head = getattr(model, "model", None), model.get_output_embeddings()
    return (decoder, head) if decoder is not None and head is not None else None


def forward_states(model, cache, ids: Sequence[int], positions: Sequence[int], mask: torch.Tensor | None = None):
    """Like `forward`, but the output head is applied later, to the rows that are needed:
    returns (states, to_logits) where `to_logits(states[rows])` gives (len(rows), V) float32 logits.

    A fused pass feeds a block of adaptive tokens for every acceptance length it prepares for and
    then reads only one of them; the head (vocabulary x hidden) is a third of the small models'
    per-token work, so projecting only the rows that are read is worth it."""
    compiled = _compiled(model, cache, len(ids))
    if compiled is not None:
        head = model.get_output_embeddings()

        def head_logits(rows: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return head(rows).float()

        return compiled.states(cache, ids, positions, mask), head_logits
    split = _decoder_and_head(model)
    if split is None:
        return forward(model, cache, ids, positions, mask), (lambda rows: rows)
    decoder, head = split
    with torch.inference_mode():
        out = decoder(**_pass_inputs(model, cache, ids, positions, mask))

    def to_logits(rows: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return head(rows).float()

    return out.last_hidden_state[0], to_logits


def _block_mask(past: int, verify_len: int, blocks: list[int], block_len: int, dtype, device) -> torch.Tensor:
    """Additive (1, 1, q, past + q) mask for `[y, d_1..d_m]` followed by one adaptive block per
    acceptance length n in `blocks`: the block for n sees the cache, y..d_n and its own earlier slots."""
    q = verify_len + len(blocks) * block_len
    allowed = torch.zeros(q, past + q, dtype=torch.bool, device=device)
    allowed[:, :past] = True
    allowed[:verify_len, past:past + verify_len] = torch.ones(verify_len, verify_len, dtype=torch.bool, device=device).tril()
    causal_block = torch.ones(block_len, block_len, dtype=torch.bool, device=device).tril()
    for b, n in enumerate(blocks):
        row = verify_len + b * block_len
        allowed[row:row + block_len, past:past + n + 1] = True
        allowed[row:row + block_len, past + row:past + row + block_len] = causal_block
    mask = torch.zeros(q, past + q, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def _tree_mask(past: int, parents: list[int], dtype, device) -> torch.Tensor:
    """Additive (1, 1, q, past + q) mask for the root and the nodes of a `DraftTree`: each sees
    the cache, its ancestors and itself."""
    q = len(parents) + 1
    blocked = torch.finfo(dtype).min
    rows = [[0.0] + [blocked] * (q - 1)]
    for i, parent in enumerate(parents, start=1):  # parents come first: their rows are complete
        row = list(rows[parent])
        row[i] = 0.0
        rows.append(row)
    mask = torch.zeros(q, past + q, dtype=dtype)
    mask[:, past:] = torch.tensor(rows, dtype=dtype)
    return mask.to(device)[None, None]


def _keep_path(cache, root: int, path: list[int]) -> None:
    """After a tree pass: move the KV of the accepted nodes (fed indices `path`, fed from cache
    position `root`) to follow the root, where plain decoding would have put them. Each was
    computed at the position of its depth, which is where it lands."""
    if path == list(range(1, len(path) + 1)):
        return  # the main path, already in place
    rows = torch.tensor([root + i for i in path])
    with torch.inference_mode():
        for layer in cache.layers:
            source = rows.to(layer.keys.device)
            for kv in (layer.keys, layer.values):
                kv[..., root + 1:root + 1 + len(path), :] = kv.index_select(-2, source)


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


# ----------------------------------------------------------------------------------------------
# The decoder.


def _adaptive_block(adaptive_ids: Sequence[int], k: int) -> list[int]:
    return list(adaptive_ids) * k if len(adaptive_ids) == 1 else list(adaptive_ids[:k])


def check_settings(model, k: int, adaptive_ids: Sequence[int], mode: str) -> None:
    if mode not in MODES:
        raise SdsatError(f"unknown decoding mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "ar":
        return
    if k < 1:
        raise SdsatError(f"k must be at least 1 (got {k})")
    if not adaptive_ids:
        raise SdsatError("no adaptive token id given: pass --adaptive-ids or use a model with an sdsat.json card")
    vocab = model.get_input_embeddings().weight.shape[0]
    bad = [i for i in adaptive_ids if not 0 <= i < vocab]
    if bad:
        raise SdsatError(f"adaptive id(s) {bad} outside the model's vocabulary (0..{vocab - 1})")
    if 1 < len(adaptive_ids) < k:
        raise SdsatError(f"{len(adaptive_ids)} adaptive ids given for k={k}: give one id (repeated) or at least k")


def context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 0) or 2**31


def generate(
    model,
    prompt_ids: Sequence[int],
    *,
    mode: str = "fused",
    k: int = 5,
    adaptive_ids: Sequence[int] = (),
    max_new_tokens: int = 64,
    eos_ids: Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    should_stop: Callable[[list[int]], bool] | None = None,
    sampling: Sampling | None = None,
    cache=None,
    cancel: Callable[[], bool] | None = None,
    deadline: float | None = None,
    accept_rule: AcceptRule = accept_draft,
    first_token_ids: Sequence[int] | None = None,
    draft_length: str = "adaptive",
    lookup_ngram: int = 0,
    lookup_tokens: int = LOOKUP_TOKENS,
    draft_store: DraftSource | None = None,
    tree_nodes: int = 0,
    tree_depth: int = TREE_DEPTH,
) -> Generation:
    """Decode after `prompt_ids`.

    `cache`: a DynamicCache whose entries are the KV of `prompt_ids[:cache.get_seq_length()]`
    (the caller guarantees that prefix); it is extended in place and on return holds
    `Generation.cache_ids`. `deadline`: see `Stopper`. `accept_rule` exists so that tests can
    show a biased rule failing; leave it alone. `first_token_ids`: the first new token is chosen
    among these only (token healing, see `healing.py`); later tokens are free.

    `draft_length`: "fixed" drafts k tokens every time and, in the fused mode, prepares a block for
    every acceptance length (the scheme as published). "adaptive" (the default) starts at one
    draft, drafts one more after a pass that accepted every draft and one fewer after one that did
    not (between 1 and k), and prepares blocks only for accepting 0, 1, 2 or all drafts: a fused
    pass with a block per length feeds about d*d tokens for d drafts, and drafts that are rarely
    accepted cost more than they bring. After an acceptance length without a block the next pass
    drafts afresh (as the two-pass scheme does). The output is the same either way; only the work
    differs. `lookup_ngram` > 0 (SDSAT modes only): when the last `lookup_ngram` tokens occurred
    before in the prompt or the output, up to `lookup_tokens` tokens that followed them there are
    the draft instead of the adaptive tokens' (prompt-lookup decoding: code repeats itself); the
    adaptive draft is used otherwise. `draft_store` (SDSAT modes only; see `draftstore.py`): when
    the context has no draft, up to `lookup_tokens` tokens retrieved from a body of code are the
    draft. A store has a draft nearly always, so a pass whose draft was retrieved (from the store or
    the context) carries no adaptive blocks when there is a store: they would almost never be read.
    A pass that found nothing to retrieve carries them as before. Stats count the kinds apart.
    `tree_nodes` > 0 (greedy decoding with a store): a pass verifies a tree of up to that many
    retrieved tokens (the store's most shared continuations, the context's draft merged in, both
    up to `tree_depth` deep; see `drafttree.py`) instead of one continuation, and counts as a lookup
    pass when the context had a draft.
    """
    from transformers import DynamicCache

    from .growable_cache import GrowableCache

    started = time.perf_counter()
    sampling = sampling or Sampling()
    check_settings(model, k, adaptive_ids, mode)
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise SdsatError("the prompt is empty: give at least one token")
    ctx = context_length(model)
    if len(prompt_ids) >= ctx:
        raise SdsatError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {ctx}")
    if eos_ids is None:
        eos = model.config.eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    stopper = Stopper(min(max_new_tokens, ctx - len(prompt_ids)), eos_ids, stop_strings, decode, should_stop, deadline)
    stats = DecodeStats()
    generator = None
    if not sampling.greedy:
        generator = torch.Generator(device=_model_device(model))
        generator.manual_seed(sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    window = getattr(model.config, "sliding_window", None)
    if window and len(prompt_ids) + max_new_tokens + 2 * k + 1 > window:
        # Our masks and crops assume full attention; inside the window the two are the same.
        raise SdsatError(f"this model uses sliding-window attention ({window} tokens); prompt plus new tokens must fit "
                         f"inside it (got {len(prompt_ids)} + {max_new_tokens})")
    if cache is None:
        # A plain (full-attention) cache: a sliding-window one could not be cropped back.
        cache = DynamicCache() if window else GrowableCache(config=model.config)
    if draft_length not in DRAFT_LENGTHS:
        raise SdsatError(f"unknown draft length policy {draft_length!r}; choose one of {', '.join(DRAFT_LENGTHS)}")
    dtype, device = _model_dtype(model), _model_device(model)
    block = _adaptive_block(adaptive_ids, k) if mode != "ar" else []
    # Adaptive blocks are causal, so the first d slots of a block draft exactly what a block of d
    # would: the draft length is the block's length.
    draft_len = len(block) if draft_length == "fixed" else min(1, len(block))

    def pick(logits_row: torch.Tensor, allowed: Sequence[int] | None = None) -> int:
        if allowed is not None:
            index = torch.as_tensor(list(allowed), dtype=torch.long, device=logits_row.device)
            logits_row = torch.full_like(logits_row, float("-inf")).index_copy_(0, index, logits_row[index])
        if sampling.greedy:
            return int(torch.argmax(logits_row).item())
        return _draw(logits_to_probs(logits_row, sampling), generator)

    def crop_to(length: int) -> None:
        cache.crop(length - cache.get_seq_length())

    # Prefill: reuse what the cache holds, but always feed at least the last prompt token (its
    # logits give the first new token). In SDSAT modes the n=0 block rides along, so the prefill
    # also drafts.
    reused = min(cache.get_seq_length(), len(prompt_ids) - 1)
    crop_to(reused)
    stats.reused_tokens = reused
    feed = prompt_ids[reused:]
    if max_new_tokens <= 0 or (cancel is not None and cancel()):
        stats.wall_ms = (time.perf_counter() - started) * 1e3
        return Generation([], "length" if max_new_tokens <= 0 else "cancelled", stats, prompt_ids[:reused])
    first_block = block[:draft_len]
    logits = forward(model, cache, feed + first_block, range(reused, reused + len(feed) + len(first_block)),
                     logits_to_keep=1 + len(first_block))
    stats.forward_passes += 1
    stats.prefill_tokens = len(feed)
    stats.tokens_fed += len(feed) + len(first_block)
    crop_to(len(prompt_ids))
    stats.prefill_ms = (time.perf_counter() - started) * 1e3
    y = pick(logits[0], first_token_ids)
    drafts = [int(t) for t in torch.argmax(logits[1:], dim=-1).tolist()] if block else []
    done = stopper.push(y)
    # The sequence whose KV the cache holds: prompt, then emitted tokens except the newest (y).
    seq = list(prompt_ids)
    lookup = NgramIndex(lookup_ngram, prompt_ids) if lookup_ngram > 0 and block else None
    store = draft_store if block else None

    while not done:
        if cancel is not None and cancel():
            stopper.finish_reason = "cancelled"
            break
        base = len(seq)  # position of y; the stopper's length limit keeps it inside the context
        as_tree = store is not None and tree_nodes > 0 and sampling.greedy
        looked_up = lookup.follow(y, tree_depth if as_tree else lookup_tokens) if lookup is not None else []
        from_lookup, from_store = bool(looked_up), False
        tree = None
        if as_tree:
            tree = store.tree(seq[-STORE_CONTEXT:] + [y], tree_depth, tree_nodes)
            from_store = len(tree) > 0
            if looked_up:
                tree.add_path(looked_up)
        if tree is None or not len(tree):  # a chain: retrieved, looked up, or the adaptive tokens'
            # After an empty tree too: `follow` still drafts the token most continuations begin
            # with when none is shared widely enough for a tree node.
            retrieved = [] if from_lookup or store is None else store.follow(seq[-STORE_CONTEXT:] + [y], lookup_tokens)
            from_store = bool(retrieved)
            if from_lookup:
                drafts = looked_up
            elif from_store:
                drafts = retrieved
            tree = DraftTree.chain(drafts)
        tree = tree.cut(ctx - base - 1)  # the model's context ends there
        verify = [y] + tree.tokens
        if mode == "ar":
            blocks = []
        elif mode == "two-pass":
            blocks = [] if len(tree) else [0]
        else:
            blocks = list(range(len(tree) + 1))
            if draft_length == "adaptive":
                blocks = blocks[:3] + blocks[3:][-1:]
            if store is not None and (from_lookup or from_store):
                # Measured (bench, embedded model): 1.53x without these blocks, 1.41x with them.
                blocks = []
        ids = list(verify)
        positions = [base] + [base + depth for depth in tree.depths()]
        pass_block = block[:draft_len]
        for n in blocks:  # only after a chain: retrieved trees carry no blocks
            ids += pass_block
            positions += range(base + n + 1, base + n + 1 + len(pass_block))
        if not tree.is_chain():
            mask = _tree_mask(base, tree.parents, dtype, device)
        elif not blocks or blocks == [len(tree)]:
            mask = None  # a single block after the whole draft is still a plain causal layout
        else:
            mask = _block_mask(base, len(verify), blocks, len(pass_block), dtype, device)
        pass_started = time.perf_counter()
        states, to_logits = forward_states(model, cache, ids, positions, mask)
        stats.forward_passes += 1
        stats.tokens_fed += len(ids)

        # Verify: a node is accepted when its parent's output is its token.
        correction = None
        if sampling.greedy:
            # Only the rows on the accepted path need the output head (a third of a small model's
            # work per token): most of a tree, and a chain's tail after a miss, is never read.
            targets: dict[int, int] = {}

            def target(node: int) -> int:
                if node not in targets:
                    targets[node] = int(torch.argmax(to_logits(states[node:node + 1])[0]).item())
                return targets[node]

            path = tree.walk(target)
        else:
            # Speculative sampling takes one draft at a time along a chain (no trees here).
            logits = to_logits(states[: len(verify)])
            path = []
            for i, d in enumerate(tree.tokens):
                correction = accept_rule(logits_to_probs(logits[i], sampling), d, generator)
                if correction is not None:
                    break
                path.append(i + 1)
        accepted = len(path)
        stats.pass_costs.append((len(ids), (time.perf_counter() - pass_started) * 1e3))
        stats.accepted_per_pass.append(accepted if len(tree) else -1)
        if len(tree):
            stats.verify_passes += 1
            stats.drafts_verified += len(tree)
            stats.drafts_accepted += accepted
            if from_lookup:
                stats.lookup_passes += 1
                stats.lookup_accepted += accepted
            elif from_store:
                stats.store_passes += 1
                stats.store_accepted += accepted
        last = path[-1] if path else 0
        next_y = correction if correction is not None else (target(last) if sampling.greedy else pick(logits[last]))
        if accepted in blocks:
            row = len(verify) + blocks.index(accepted) * len(pass_block)
            block_logits = to_logits(states[row:row + len(pass_block)])
            next_drafts = [int(t) for t in torch.argmax(block_logits, dim=-1).tolist()]
        else:
            next_drafts = []
        if len(tree) and draft_length == "adaptive" and not (from_lookup or from_store):
            draft_len = min(len(block), draft_len + 1) if accepted == len(tree) else max(1, draft_len - 1)
            next_drafts = next_drafts[:draft_len]
        _keep_path(cache, base, path)
        crop_to(base + 1 + accepted)
        emitted = [y] + [verify[i] for i in path]
        seq += emitted
        if lookup is not None:
            lookup.extend(emitted)
        done = stopper.push_all(emitted[1:] + [next_y])
        y, drafts = next_y, next_drafts

    tokens = stopper.tokens
    # Never leave KV for tokens past what we return (an EOS or stop inside an accepted draft).
    keep = min(cache.get_seq_length(), len(prompt_ids) + len(tokens))
    crop_to(keep)
    stats.new_tokens = len(tokens)
    stats.wall_ms = (time.perf_counter() - started) * 1e3
    return Generation(tokens, stopper.finish_reason or "length", stats, (prompt_ids + tokens)[:keep])
