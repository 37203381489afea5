"""Reusing a document's cached KV after an edit above the cursor, by shifting positions (RoPE).

The per-document cache (kvcache.py) is reused up to the longest common prefix of the cached ids and
the new prompt's. An edit above the cursor changes the prompt from the edit on, so that prefix ends
at the edit and everything after it, down to the cursor, would be prefilled again. Here the cached
KV of the unchanged text after the edit is kept instead, as llama.cpp's `--cache-reuse N` does:

    cached ids:  A  Y  B  (G: the generated continuation)
    prompt ids:  A  X  B' (B' = B, up to the cursor)

`plan` finds chunks of the cached ids after the common prefix A that reappear, in order, in the
prompt (B here; at least `min_tokens` each). `CacheShift` then crops the cache to A, feeds the
edited span X, and appends the kept chunk's keys and values after it, the keys re-rotated from
their old positions to the new ones (`RopeShift`). The engine prefills only what follows the last
kept chunk (at least the prompt's last token, which it always feeds).

What this reuse is, precisely. A Llama layer's keys are RoPE-rotated when they are computed and
never again; attention depends on query/key positions only through their difference. So:

- the keys of a sequence computed at positions t.. and re-rotated by d equal the keys of the same
  sequence computed at t+d.. (all layers), and so do the logits after them: a pure shift is exact up
  to float rounding (tests/test_kvshift.py checks keys to 1e-4 and logits in float32);
- the first layer's keys and values depend only on the token and its position, so for them the
  shifted chunk is exact even after an edit;
- every later layer's KV of a chunk token depends on all the tokens before it, the edited text
  included. After an edit the shifted KV is the one computed in the *old* context: an
  approximation, which llama.cpp accepts too. The engine's guarantee (greedy SDSAT output equals
  greedy AR output) still holds for the cache it is given, but that cache is not the one a fresh
  prefill would build, so a completion after a shifted reuse can differ from a fresh one. How often
  was measured (`sdsat_lsp.tools.shiftcheck`; see docs/decoding.md), and the `cacheShift` setting
  (0 = off) decides whether it is used at all. Reused KV stays in the cache after the request, so a
  later request builds on it too: the approximation lasts until an edit before it invalidates it.

Refused (no shift, plain prefix reuse): rope types other than default, linear and llama3 (dynamic NTK
changes frequencies with the length; yarn and longrope scale cos/sin, which composes differently),
partial rotary embeddings, per-layer rope parameters, model types not verified here, a model whose
rotary buffer differs from its config, and caches with layers other than full attention.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

SUPPORTED_ROPE = ("default", "linear", "llama3")
# Model types whose keys are rotated with rotate_half at full head width after any projection or
# norm, checked by tests/test_kvshift.py (rotated keys equal freshly computed ones).
SUPPORTED_MODELS = ("llama", "mistral", "qwen2")
KEY_TOKENS = 8  # tokens of the lookup key that finds where a chunk may start (fewer when min_tokens is)
MAX_CANDIDATES = 16  # cached positions tried per prompt position (bounds the work on repetitive text)
MAX_CHUNKS = 8  # each chunk after an edited span costs one more forward pass for that span


@dataclass(frozen=True)
class Chunk:
    old: int  # start in the cached ids
    new: int  # start in the prompt
    length: int


def plan(cached: Sequence[int], prompt: Sequence[int], keep: int, min_tokens: int,
         max_chunks: int = MAX_CHUNKS) -> list[Chunk]:
    """Chunks of `cached[keep:]` that reappear in `prompt[keep:-1]`, in order in both, each at least
    `min_tokens` long and as long as it matches. Greedy from the left: at each prompt position the
    longest match among the first MAX_CANDIDATES cached positions that share its first tokens is
    taken when it is long enough, else the next position is tried. The prompt's last token is never
    part of a chunk: the engine feeds it whatever the cache holds."""
    end = len(prompt) - 1
    if min_tokens <= 0 or end - keep < min_tokens or len(cached) - keep < min_tokens:
        return []
    key_len = min(min_tokens, KEY_TOKENS)
    index: dict[tuple[int, ...], list[int]] = {}
    for j in range(keep, len(cached) - key_len + 1):
        index.setdefault(tuple(cached[j:j + key_len]), []).append(j)
    chunks: list[Chunk] = []
    i, floor = keep, keep  # floor: cached positions before it belong to an earlier chunk
    while i + min_tokens <= end and len(chunks) < max_chunks:
        start, length = _longest(cached, prompt, i, end, index.get(tuple(prompt[i:i + key_len]), ()), floor)
        if length >= min_tokens:
            chunks.append(Chunk(start, i, length))
            i, floor = i + length, start + length
        else:
            i += 1
    return chunks


def _longest(cached: Sequence[int], prompt: Sequence[int], i: int, end: int, candidates: Sequence[int],
             floor: int) -> tuple[int, int]:
    """(start, length) of the longest match of `prompt[i:end]` at one of `candidates` >= floor."""
    best = (0, 0)
    first = bisect.bisect_left(candidates, floor)
    for j in candidates[first:first + MAX_CANDIDATES]:
        n, limit = 0, min(len(cached) - j, end - i)
        while n < limit and cached[j + n] == prompt[i + n]:
            n += 1
        if n > best[1]:
            best = (j, n)
            if n == end - i:
                break  # nothing can match longer
    return best


# ---- RoPE ------------------------------------------------------------------------------------------


class RopeShift:
    """Re-rotates cached keys from the positions they were computed at to new ones."""

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq.detach().float().cpu()

    @property
    def head_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def rotate(self, keys: torch.Tensor, old: int, new: int) -> torch.Tensor:
        """`keys` (..., T, head_dim), computed at positions old..old+T-1, as if computed at new..new+T-1."""
        count = keys.shape[-2]
        inv_freq = self.inv_freq.to(keys.device)

        def angles(start: int) -> torch.Tensor:
            # In float32, exactly as transformers' rotary embedding computes them (position * inv_freq),
            # so that the rotation lands on the angle a fresh forward would have used, rounding included.
            return torch.arange(start, start + count, device=keys.device).float()[:, None] * inv_freq

        turn = angles(new).double() - angles(old).double()
        cos = torch.cat((turn.cos(), turn.cos()), dim=-1).float()
        sin = torch.cat((turn.sin(), turn.sin()), dim=-1).float()
        k = keys.float()
        half = k.shape[-1] // 2
        rotated_half = torch.cat((-k[..., half:], k[..., :half]), dim=-1)  # transformers' rotate_half
        return (k * cos + rotated_half * sin).to(keys.dtype)


def _config_inv_freq(config) -> tuple[torch.Tensor | None, str]:
    """The inverse frequencies the config asks for, or None and why they are not supported."""
    if getattr(config, "model_type", None) not in SUPPORTED_MODELS:
        return None, f"model type {getattr(config, 'model_type', None)!r} is not one shifting was verified on"
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        return None, "per-layer or missing rope parameters"
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE:
        return None, f"rope type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE)})"
    if float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        return None, "partial rotary embedding"
    if rope_type == "default":
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        theta = float(params["rope_theta"])
        inv_freq, scaling = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
    if scaling != 1.0:
        return None, f"rope attention scaling {scaling}"
    return inv_freq.float(), ""


def rope_shift(model) -> tuple[RopeShift | None, str]:
    """(the model's RopeShift, "") or (None, why shifting is refused). Read from the config and
    checked against the rotary buffer the model really uses, once per model."""
    cached = model.__dict__.get("sdsat_rope_shift")
    if cached is not None:
        return cached
    inv_freq, reason = _config_inv_freq(model.config)
    if inv_freq is not None:
        rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
        buffer = getattr(rotary, "inv_freq", None)
        if buffer is None or getattr(rotary, "attention_scaling", 1.0) != 1.0:
            inv_freq, reason = None, "no rotary embedding with plain scaling found in the model"
        elif buffer.shape != inv_freq.shape or not torch.allclose(
                buffer.float().cpu(), inv_freq, rtol=max(1e-5, 2 * torch.finfo(buffer.dtype).eps), atol=0):
            # (A model cast to bfloat16 holds its frequencies rounded to it: that is not a mismatch.)
            inv_freq, reason = None, "the model's rotary frequencies are not what its config says"
        else:
            inv_freq = buffer  # the frequencies the forward uses, to the bit
    result = (RopeShift(inv_freq) if inv_freq is not None else None, reason)
    if inv_freq is None:
        log.info("KV cache shifting is off for this model: %s", reason)
    model.__dict__["sdsat_rope_shift"] = result
    return result


# ---- applying a plan to a cache --------------------------------------------------------------------


@dataclass
class Shifted:
    """What `CacheShift` did to a cache: it now holds the KV of `prompt[:held]`."""

    held: int
    shifted: int  # of those, tokens whose KV was kept by shifting
    fed: int  # of those, tokens fed here (the edited spans before the chunks)
    ms: float


def _full_attention(cache) -> bool:
    from transformers.cache_utils import DynamicLayer

    from .growable_cache import GrowableLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in (DynamicLayer, GrowableLayer) and layer.keys is not None
                                for layer in layers)


class CacheShift:
    """`KVCacheStore.acquire`'s `shift`: keeps chunks of a document's cache after an edit."""

    def __init__(self, model, rope: RopeShift, min_tokens: int):
        self.model, self.rope, self.min_tokens = model, rope, min_tokens

    def __call__(self, cache, cached_ids: Sequence[int], prompt_ids: Sequence[int], keep: int) -> Shifted | None:
        """Crop `cache` (which holds the KV of `cached_ids`) to `keep`, then rebuild what it can of
        `prompt_ids` after it: None (cache untouched) when no chunk is worth keeping."""
        if not _full_attention(cache) or cache.layers[0].keys.shape[-1] != self.rope.head_dim:
            return None
        chunks = plan(cached_ids, prompt_ids, keep, self.min_tokens)
        if not chunks:
            return None
        from .passes import forward_states

        started = time.perf_counter()
        with torch.inference_mode():
            # Copies first: feeding an edited span writes over the positions the chunks come from.
            saved = [[(layer.keys[..., c.old:c.old + c.length, :].clone(), layer.values[..., c.old:c.old + c.length, :].clone())
                      for layer in cache.layers] for c in chunks]
            cache.crop(keep - cache.get_seq_length())
            pos, fed, shifted = keep, 0, 0
            for chunk, kv in zip(chunks, saved):
                if chunk.new > pos:
                    forward_states(self.model, cache, list(prompt_ids[pos:chunk.new]), range(pos, chunk.new))
                    fed += chunk.new - pos
                for layer, (keys, values) in zip(cache.layers, kv):
                    layer.update(self.rope.rotate(keys, chunk.old, chunk.new), values)
                pos = chunk.new + chunk.length
                shifted += chunk.length
        assert cache.get_seq_length() == pos, "the shifted cache must hold the prompt's first tokens"
        return Shifted(pos, shifted, fed, (time.perf_counter() - started) * 1e3)


def cache_shift(model, min_tokens: int) -> CacheShift | None:
    """The shift for `model` with chunks of at least `min_tokens` (0: off), None when off or refused."""
    if min_tokens <= 0:
        return None
    rope, _ = rope_shift(model)
    return CacheShift(model, rope, min_tokens) if rope is not None else None
