"""The SDSAT fine-tuning recipe: teach a causal LM that adaptive tokens placed after a prefix
predict the next several tokens, without changing what it does on ordinary tokens.

No training code was published; this follows the inference contract (shared/design/sdsat.md).
A training sequence is a batch row of real tokens x_0..x_{T-1} followed by blocks of adaptive
tokens. Physical order does not matter to a transformer once positions and the mask are explicit,
so blocks go after the real tokens, which keeps the real part an ordinary causal LM:

    real:   x_0 ... x_{T-1}            positions 0..T-1, causal, never see any adaptive token
    block:  A_1 ... A_m (anchor t)     positions t+1..t+m, see x_0..x_t and A_1..A_j of their block
    labels: real x_i -> x_{i+1};  A_j -> x_{t+j+1}

Because no real token attends to an adaptive token, the real-token loss is exactly the standard
language-model loss: training on it keeps the model's ordinary behaviour, training on the blocks
teaches the drafts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class SdsatBatch:
    input_ids: torch.Tensor  # (B, S) real tokens then adaptive blocks, S = T + blocks * L
    position_ids: torch.Tensor  # (B, S)
    attention_mask: torch.Tensor  # (B, 1, S, S) additive float mask
    labels: torch.Tensor  # (B, S) target for the output at each slot, IGNORE where none
    real_len: int  # T


def make_sdsat_batch(
    tokens: torch.Tensor,
    adaptive_ids: list[int],
    max_block: int,
    blocks_per_row: int,
    rng: random.Random,
    dtype: torch.dtype = torch.float32,
) -> SdsatBatch:
    """Append `blocks_per_row` adaptive blocks of `max_block` slots at random anchors to each row of
    `tokens` (B, T). Every block has the full length (the contract is the same for any k <= L: slot
    j only sees slots before it, so a block of L trains every k at once)."""
    B, T = tokens.shape
    L = max_block
    S = T + blocks_per_row * L
    ids = torch.empty(B, S, dtype=torch.long)
    pos = torch.empty(B, S, dtype=torch.long)
    labels = torch.full((B, S), IGNORE, dtype=torch.long)
    allowed = torch.zeros(B, S, S, dtype=torch.bool)
    causal_real = torch.ones(T, T, dtype=torch.bool).tril()
    causal_block = torch.ones(L, L, dtype=torch.bool).tril()
    block_ids = torch.tensor((adaptive_ids * L)[:L] if len(adaptive_ids) == 1 else adaptive_ids[:L])
    for b in range(B):
        ids[b, :T] = tokens[b]
        pos[b, :T] = torch.arange(T)
        labels[b, : T - 1] = tokens[b, 1:]
        allowed[b, :T, :T] = causal_real
        # Anchors leave at least one real token to predict.
        anchors = [rng.randrange(0, T - 1) for _ in range(blocks_per_row)]
        for i, t in enumerate(anchors):
            s = T + i * L
            ids[b, s : s + L] = block_ids
            pos[b, s : s + L] = torch.arange(t + 1, t + 1 + L)
            targets = tokens[b, t + 2 : t + 2 + L]  # A_j (j = 1..L) predicts x_{t+j+1}
            labels[b, s : s + len(targets)] = targets
            allowed[b, s : s + L, : t + 1] = True
            allowed[b, s : s + L, s : s + L] = causal_block
    mask = torch.zeros(B, 1, S, S, dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return SdsatBatch(ids, pos, mask, labels, T)


def sdsat_losses(model, batch: SdsatBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(real-token loss, adaptive-token loss), each a mean cross-entropy over its own slots."""
    device = model.get_input_embeddings().weight.device
    out = model(
        input_ids=batch.input_ids.to(device),
        position_ids=batch.position_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        use_cache=False,
    )
    logits = out.logits.float()
    labels = batch.labels.to(device)
    T = batch.real_len
    real = F.cross_entropy(logits[:, :T].reshape(-1, logits.shape[-1]), labels[:, :T].reshape(-1), ignore_index=IGNORE)
    adaptive = F.cross_entropy(logits[:, T:].reshape(-1, logits.shape[-1]), labels[:, T:].reshape(-1), ignore_index=IGNORE)
    return real, adaptive


def token_chunks(token_stream: list[int], length: int, rng: random.Random, count: int) -> torch.Tensor:
    """`count` random windows of `length` tokens from one long stream of token ids."""
    starts = [rng.randrange(0, len(token_stream) - length) for _ in range(count)]
    return torch.tensor([token_stream[s : s + length] for s in starts], dtype=torch.long)


def train_steps(
    model,
    token_stream: list[int],
    adaptive_ids: list[int],
    *,
    steps: int,
    seq_len: int = 128,
    batch_size: int = 8,
    max_block: int = 5,
    blocks_per_row: int = 8,
    lr: float = 3e-3,
    adaptive_weight: float = 1.0,
    seed: int = 0,
    params=None,
    log=None,
):
    """A plain AdamW loop over random windows; returns the last (real, adaptive) losses."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / max(1, steps)))
    model.train()
    real = adaptive = torch.tensor(0.0)
    for step in range(steps):
        tokens = token_chunks(token_stream, seq_len, rng, batch_size)
        batch = make_sdsat_batch(tokens, adaptive_ids, max_block, blocks_per_row, rng)
        real, adaptive = sdsat_losses(model, batch)
        loss = real + adaptive_weight * adaptive
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if log is not None:
            log(step, real.item(), adaptive.item())
    model.eval()
    return real.item(), adaptive.item()
