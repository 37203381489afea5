"""SDSAT decoding over a Hugging Face causal LM: the autoregressive baseline, the two-pass
draft-then-verify scheme and the fused step, greedy and (losslessly) sampled.

The engine knows nothing of LSP, documents or editors. It takes token ids, a model and a
transformers `DynamicCache` that may already hold a prefix of the prompt (the caller's per-document
cache), and returns tokens, stats and what is left in the cache. Forward passes are the unit of
cost and of cancellation: `cancel()` is checked before every pass.

The SDSAT contract (see docs/decoding.md): feed `[x_t, A_1..A_k]` at positions t..t+k under a
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

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .decoding import DRAFT_LENGTHS, MAX_FED_PER_PASS, MODES
from .drafting import Drafting, NgramIndex, Proposal, propose
from .errors import SdsatError
from .passes import block_mask, forward, forward_states, keep_path, model_device, model_dtype, tree_mask
from .sampling import AcceptRule, Sampling, accept_draft, draw, logits_to_probs
from .stopping import Stopper, Stopping


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


def generate(model, prompt_ids: Sequence[int], *, sampling: Sampling | None = None, drafting: Drafting | None = None,
             stopping: Stopping | None = None, cache=None, cancel: Callable[[], bool] | None = None,
             first_token_ids: Sequence[int] | None = None, accept_rule: AcceptRule = accept_draft,
             **options) -> Generation:
    """Decode after `prompt_ids`.

    Parameters come in groups: `sampling` (sampling.py), `drafting` (drafting.py) and `stopping`
    (stopping.py); any field of `Drafting` or `Stopping` may also be given on its own as a keyword
    (`mode="ar", max_new_tokens=8`), overriding the group's. `cache`: a DynamicCache whose entries
    are the KV of `prompt_ids[:cache.get_seq_length()]` (the caller guarantees that prefix); it is
    extended in place and on return holds `Generation.cache_ids`. `cancel` is asked before every
    pass. `first_token_ids`: the first new token is chosen among these only (token healing, see
    healing.py); later tokens are free. `accept_rule` exists so that tests can show a biased rule
    failing; leave it alone. The loop is `_Decode.run`; see docs/decoding.md."""
    drafting, stopping = _with_options(drafting or Drafting(), stopping or Stopping(), options)
    run = _Decode(model, list(prompt_ids), sampling or Sampling(), drafting, stopping, cache, cancel, accept_rule)
    return run.run(first_token_ids)


def _with_options(drafting: Drafting, stopping: Stopping, options: dict) -> tuple[Drafting, Stopping]:
    names = {f.name for f in dataclasses.fields(Drafting)}, {f.name for f in dataclasses.fields(Stopping)}
    unknown = set(options) - names[0] - names[1]
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments {sorted(unknown)}")
    return (dataclasses.replace(drafting, **{k: v for k, v in options.items() if k in names[0]}),
            dataclasses.replace(stopping, **{k: v for k, v in options.items() if k in names[1]}))


@dataclass
class _Pass:
    """One decoding pass laid out: `verify` = [y] + the tree's tokens, then adaptive blocks."""

    proposal: Proposal
    base: int  # the position of y
    verify: list[int]
    ids: list[int]
    positions: list[int]
    mask: torch.Tensor | None
    blocks: list[int]  # the acceptance lengths that carry an adaptive block
    block_len: int


class _Decode:
    """One decode's state between passes: `y`, the next token (known, not yet in the cache), and
    `drafts`, guesses for the tokens after it; `seq`, the tokens whose KV the cache holds."""

    def __init__(self, model, prompt_ids: list[int], sampling: Sampling, drafting: Drafting, stopping: Stopping,
                 cache, cancel, accept_rule: AcceptRule):
        self.started = time.perf_counter()
        self.model, self.prompt_ids, self.sampling, self.drafting = model, prompt_ids, sampling, drafting
        self.cancel, self.accept_rule = cancel, accept_rule
        self.ctx = _check(model, prompt_ids, drafting, stopping)
        self.max_new_tokens = stopping.max_new_tokens
        self.stopper = _stopper(model, stopping, self.ctx - len(prompt_ids))
        self.stats = DecodeStats()
        self.generator = _generator(model, sampling)
        self.cache = cache if cache is not None else _new_cache(model)
        self.dtype, self.device = model_dtype(model), model_device(model)
        self.block = _adaptive_block(drafting.adaptive_ids, drafting.k) if drafting.mode != "ar" else []
        # Adaptive blocks are causal, so the first d slots of a block draft exactly what a block of d
        # would: the draft length is the block's length.
        self.draft_len = len(self.block) if drafting.draft_length == "fixed" else min(1, len(self.block))
        self.lookup = NgramIndex(drafting.lookup_ngram, prompt_ids) if drafting.lookup_ngram > 0 and self.block else None
        self.store = drafting.draft_store if self.block else None
        self.seq = list(prompt_ids)
        self.y, self.drafts = 0, []

    def run(self, first_token_ids) -> Generation:
        done = self.prefill(first_token_ids)
        while not done:
            if self.cancel is not None and self.cancel():
                self.stopper.finish_reason = "cancelled"
                break
            p = self.lay_out(propose(self.drafting, self.sampling.greedy, self.lookup, self.store, self.seq, self.y,
                                     self.drafts))
            pass_started = time.perf_counter()
            states, to_logits = forward_states(self.model, self.cache, p.ids, p.positions, p.mask)
            path, next_y = self.verify(p, states, to_logits)
            self.stats.pass_costs.append((len(p.ids), (time.perf_counter() - pass_started) * 1e3))
            self.count(p, path)
            next_drafts = self.next_drafts(p, path, states, to_logits)
            done = self.advance(p, path, next_y, next_drafts)
        return self.finish()

    def pick(self, logits_row: torch.Tensor, allowed: Sequence[int] | None = None) -> int:
        if allowed is not None:
            index = torch.as_tensor(list(allowed), dtype=torch.long, device=logits_row.device)
            logits_row = torch.full_like(logits_row, float("-inf")).index_copy_(0, index, logits_row[index])
        if self.sampling.greedy:
            return int(torch.argmax(logits_row).item())
        return draw(logits_to_probs(logits_row, self.sampling), self.generator)

    def crop_to(self, length: int) -> None:
        self.cache.crop(length - self.cache.get_seq_length())

    def prefill(self, first_token_ids) -> bool:
        """Reuse what the cache holds, but always feed at least the last prompt token (its logits
        give the first new token). In SDSAT modes the n=0 block rides along, so the prefill also
        drafts. True when generation is already over."""
        prompt_ids, stats = self.prompt_ids, self.stats
        reused = min(self.cache.get_seq_length(), len(prompt_ids) - 1)
        self.crop_to(reused)
        stats.reused_tokens = reused
        feed = prompt_ids[reused:]
        if self.max_new_tokens <= 0 or (self.cancel is not None and self.cancel()):
            self.stopper.finish_reason = "length" if self.max_new_tokens <= 0 else "cancelled"
            return True
        first_block = self.block[:self.draft_len]
        logits = forward(self.model, self.cache, feed + first_block, range(reused, reused + len(feed) + len(first_block)),
                         logits_to_keep=1 + len(first_block))
        stats.forward_passes += 1
        stats.prefill_tokens = len(feed)
        stats.tokens_fed += len(feed) + len(first_block)
        self.crop_to(len(prompt_ids))
        stats.prefill_ms = (time.perf_counter() - self.started) * 1e3
        self.y = self.pick(logits[0], first_token_ids)
        self.drafts = [int(t) for t in torch.argmax(logits[1:], dim=-1).tolist()] if self.block else []
        return self.stopper.push(self.y)

    def lay_out(self, proposal: Proposal) -> _Pass:
        """[y] + the drafts at the positions of their depths, then the adaptive blocks this pass
        carries, under the mask that lets each see only what it may."""
        base = len(self.seq)  # position of y; the stopper's length limit keeps it inside the context
        tree = proposal.tree = proposal.tree.cut(self.ctx - base - 1)  # the model's context ends there
        verify = [self.y] + tree.tokens
        blocks = self.blocks_for(proposal)
        ids, positions = list(verify), [base] + [base + depth for depth in tree.depths()]
        pass_block = self.block[:self.draft_len]
        for n in blocks:  # only after a chain: retrieved trees carry no blocks
            ids += pass_block
            positions += range(base + n + 1, base + n + 1 + len(pass_block))
        if not tree.is_chain():
            mask = tree_mask(base, tree.parents, self.dtype, self.device)
        elif not blocks or blocks == [len(tree)]:
            mask = None  # a single block after the whole draft is still a plain causal layout
        else:
            mask = block_mask(base, len(verify), blocks, len(pass_block), self.dtype, self.device)
        return _Pass(proposal, base, verify, ids, positions, mask, blocks, len(pass_block))

    def blocks_for(self, proposal: Proposal) -> list[int]:
        """The acceptance lengths this pass prepares the next drafts for (one adaptive block each)."""
        mode, n = self.drafting.mode, len(proposal.tree)
        if mode == "ar":
            return []
        if mode == "two-pass":
            return [] if n else [0]
        blocks = list(range(n + 1))
        if self.drafting.draft_length == "adaptive":
            blocks = blocks[:3] + blocks[3:][-1:]
        if self.store is not None and (proposal.from_lookup or proposal.from_store):
            # Measured (bench, embedded model): 1.53x without these blocks, 1.41x with them.
            blocks = []
        room = (MAX_FED_PER_PASS - n - 1) // max(1, self.draft_len)
        if len(blocks) > room:  # keep the shortest acceptance lengths and the whole draft's
            blocks = blocks[:max(0, room - 1)] + blocks[-1:] if room > 0 else []
        return blocks

    def verify(self, p: _Pass, states: torch.Tensor, to_logits) -> tuple[list[int], int]:
        """(the fed indices of the accepted nodes, the token after them): a node is accepted when
        its parent's output is its token (greedy), or by the lossless rule (sampling)."""
        tree = p.proposal.tree
        if self.sampling.greedy:
            # Only the rows on the accepted path need the output head (a third of a small model's
            # work per token): most of a tree, and a chain's tail after a miss, is never read.
            targets: dict[int, int] = {}

            def target(node: int) -> int:
                if node not in targets:
                    targets[node] = int(torch.argmax(to_logits(states[node:node + 1])[0]).item())
                return targets[node]

            path = tree.walk(target)
            return path, target(path[-1] if path else 0)
        # Speculative sampling takes one draft at a time along a chain (no trees here).
        logits = to_logits(states[: len(p.verify)])
        path = []
        for i, d in enumerate(tree.tokens):
            correction = self.accept_rule(logits_to_probs(logits[i], self.sampling), d, self.generator)
            if correction is not None:
                return path, correction
            path.append(i + 1)
        return path, self.pick(logits[path[-1] if path else 0])

    def count(self, p: _Pass, path: list[int]) -> None:
        stats, tree, accepted = self.stats, p.proposal.tree, len(path)
        stats.forward_passes += 1
        stats.tokens_fed += len(p.ids)
        stats.accepted_per_pass.append(accepted if len(tree) else -1)
        if not len(tree):
            return
        stats.verify_passes += 1
        stats.drafts_verified += len(tree)
        stats.drafts_accepted += accepted
        if p.proposal.from_lookup:
            stats.lookup_passes += 1
            stats.lookup_accepted += accepted
        elif p.proposal.from_store:
            stats.store_passes += 1
            stats.store_accepted += accepted

    def next_drafts(self, p: _Pass, path: list[int], states: torch.Tensor, to_logits) -> list[int]:
        """The adaptive block for the acceptance length that happened (if the pass carried one),
        and the next draft length."""
        accepted, tree = len(path), p.proposal.tree
        drafts: list[int] = []
        if accepted in p.blocks:
            row = len(p.verify) + p.blocks.index(accepted) * p.block_len
            block_logits = to_logits(states[row:row + p.block_len])
            drafts = [int(t) for t in torch.argmax(block_logits, dim=-1).tolist()]
        if len(tree) and self.drafting.draft_length == "adaptive" and not (p.proposal.from_lookup or p.proposal.from_store):
            grow = accepted == len(tree)
            self.draft_len = min(len(self.block), self.draft_len + 1) if grow else max(1, self.draft_len - 1)
            drafts = drafts[:self.draft_len]
        return drafts

    def advance(self, p: _Pass, path: list[int], next_y: int, next_drafts: list[int]) -> bool:
        """Keep the accepted tokens' KV (moved into place off the main path), drop the rest, emit
        the tokens; True when generation is over."""
        keep_path(self.cache, p.base, path)
        self.crop_to(p.base + 1 + len(path))
        emitted = [self.y] + [p.verify[i] for i in path]
        self.seq += emitted
        if self.lookup is not None:
            self.lookup.extend(emitted)
        done = self.stopper.push_all(emitted[1:] + [next_y])
        self.y, self.drafts = next_y, next_drafts
        return done

    def finish(self) -> Generation:
        tokens, prompt_ids = self.stopper.tokens, self.prompt_ids
        # Never leave KV for tokens past what we return (an EOS or stop inside an accepted draft).
        keep = min(self.cache.get_seq_length(), len(prompt_ids) + len(tokens))
        self.crop_to(keep)
        self.stats.new_tokens = len(tokens)
        self.stats.wall_ms = (time.perf_counter() - self.started) * 1e3
        return Generation(tokens, self.stopper.finish_reason or "length", self.stats, (prompt_ids + tokens)[:keep])


def _check(model, prompt_ids: list[int], drafting: Drafting, stopping: Stopping) -> int:
    """The model's context length, once the request is known to fit the engine."""
    check_settings(model, drafting.k, drafting.adaptive_ids, drafting.mode)
    if not prompt_ids:
        raise SdsatError("the prompt is empty: give at least one token")
    ctx = context_length(model)
    if len(prompt_ids) >= ctx:
        raise SdsatError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {ctx}")
    window = getattr(model.config, "sliding_window", None)
    if window and len(prompt_ids) + stopping.max_new_tokens + 2 * drafting.k + 1 > window:
        # Our masks and crops assume full attention; inside the window the two are the same.
        raise SdsatError(f"this model uses sliding-window attention ({window} tokens); prompt plus new tokens must fit "
                         f"inside it (got {len(prompt_ids)} + {stopping.max_new_tokens})")
    if drafting.draft_length not in DRAFT_LENGTHS:
        raise SdsatError(f"unknown draft length policy {drafting.draft_length!r}; choose one of {', '.join(DRAFT_LENGTHS)}")
    return ctx


def _stopper(model, stopping: Stopping, room: int) -> Stopper:
    eos_ids = stopping.eos_ids
    if eos_ids is None:
        eos = model.config.eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return Stopper(min(stopping.max_new_tokens, room), eos_ids, stopping.stop_strings, stopping.decode,
                   stopping.should_stop, stopping.deadline, stopping.hard_deadline)


def _generator(model, sampling: Sampling) -> torch.Generator | None:
    if sampling.greedy:
        return None
    generator = torch.Generator(device=model_device(model))
    generator.manual_seed(sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return generator


def _new_cache(model):
    from transformers import DynamicCache

    from .growable_cache import GrowableCache

    # A plain (full-attention) cache: a sliding-window one could not be cropped back.
    return DynamicCache() if getattr(model.config, "sliding_window", None) else GrowableCache(config=model.config)
