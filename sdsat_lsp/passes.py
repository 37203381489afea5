"""Forward passes and their layouts: the masks that let one pass verify drafts and draft again
(adaptive blocks) or verify a tree of drafts, and the KV move that keeps an accepted side branch
where plain decoding would have put it. See docs/decoding.md."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def model_dtype(model) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype if model.get_input_embeddings().weight.is_floating_point() else torch.float32


def model_device(model) -> torch.device:
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
    device = model_device(model)
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


def block_mask(past: int, verify_len: int, blocks: list[int], block_len: int, dtype, device) -> torch.Tensor:
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


def tree_mask(past: int, parents: list[int], dtype, device) -> torch.Tensor:
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


def keep_path(cache, root: int, path: list[int]) -> None:
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
