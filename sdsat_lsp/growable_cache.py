"""A transformers `DynamicCache` whose layers write new keys/values into spare room instead of
concatenating.

`DynamicLayer.update` does `torch.cat([keys, new])`: every forward pass copies the whole cache of
every layer once more. Speculative decoding makes that worse than plain decoding, because every
verify pass appends drafts (and adaptive blocks) that are cropped straight away, and the next pass
copies everything again. In a torch profile of one-token passes on the embedded model (600 cached
tokens, 2 cores, machine busy at the time) `aten::cat` was about a sixth of the CPU time. `GrowableLayer` keeps a buffer with room to spare (it grows by
half again when full), writes into it in place, and crops by moving its length back: what it hands
to attention is a view of the first `length` positions, exactly the tensors `DynamicLayer` would
have built.

Only full-attention layers are replaced: a sliding-window model keeps transformers' own layers
(the engine refuses to decode past its window anyway).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

# The first allocation: enough for a typical editor prompt without regrowing.
_MIN_CAPACITY = 256


class GrowableLayer(DynamicLayer):
    """A `DynamicLayer` backed by a buffer with spare capacity along the sequence axis."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        return 0 if self._key_buffer is None else self._key_buffer.shape[-2]

    def _grow(self, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        capacity = max(needed, _MIN_CAPACITY, self.capacity + self.capacity // 2)

        def bigger(old: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
            shape = (*like.shape[:-2], capacity, like.shape[-1])
            # Zeros, not empty: the compiled forward's padded passes attend over spare room (masked),
            # and uninitialized memory could hold NaN or inf, which a mask does not cancel.
            new = torch.zeros(shape, dtype=like.dtype, device=like.device)
            if old is not None and self.length:
                new[..., : self.length, :] = old[..., : self.length, :]
            return new

        self._key_buffer = bigger(self._key_buffer, key_states)
        self._value_buffer = bigger(self._value_buffer, value_states)

    def _expose(self) -> None:
        self.keys = self._key_buffer[..., : self.length, :]
        self.values = self._value_buffer[..., : self.length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end, key_states, value_states)
        self._key_buffer[..., self.length:end, :] = key_states
        self._value_buffer[..., self.length:end, :] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        # transformers' convention: a negative count removes that many tokens from the end.
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove (got {tokens_to_remove})")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.length = max(0, self.length + tokens_to_remove)
        self._expose()

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        self.keys = self.values = None
        self.length = 0
        self.is_initialized = False

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("GrowableLayer holds one sequence: batch reordering is not supported")

    batch_repeat_interleave = batch_select_indices = reorder_cache = _unsupported


class GrowableCache(DynamicCache):
    """`DynamicCache(config=...)` with `GrowableLayer` for every full-attention layer."""

    def __init__(self, config=None):
        if config is None:
            Cache.__init__(self, layer_class_to_replicate=GrowableLayer)
            return
        super().__init__(config=config)
        self.layers = [GrowableLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
