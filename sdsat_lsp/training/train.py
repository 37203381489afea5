"""The SDSAT fine-tuning recipe: teach a causal LM that adaptive tokens placed after a prefix
predict the next several tokens, without changing what it does on ordinary tokens.

No training code was published; this follows the inference contract (docs/decoding.md).
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

import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import SdsatError

IGNORE = -100
log = logging.getLogger(__name__)


@dataclass
class SdsatBatch:
    input_ids: torch.Tensor  # (B, S) real tokens then adaptive blocks, S = T + blocks * L
    position_ids: torch.Tensor  # (B, S)
    attention_mask: torch.Tensor  # (B, 1, S, S) additive float mask
    labels: torch.Tensor  # (B, S) target for the output at each slot, IGNORE where none
    real_len: int  # T
    # (B, S): j - 1 at the j-th slot of a block, -1 on real tokens (slot weights index by it).
    slot: torch.Tensor | None = None
    # (B, S): the real position t + j whose output predicts the same token as slot j of an anchor
    # t (the model's own distribution there is the soft target), -1 on real tokens.
    teacher_pos: torch.Tensor | None = None


def sample_anchors(batch: int, real_len: int, blocks_per_row: int, rng: random.Random) -> list[list[int]]:
    """Random anchor positions per row; each leaves at least one real token to predict."""
    return [[rng.randrange(0, real_len - 1) for _ in range(blocks_per_row)] for _ in range(batch)]


def make_sdsat_batch(
    tokens: torch.Tensor,
    adaptive_ids: list[int],
    max_block: int,
    blocks_per_row: int,
    rng: random.Random,
    dtype: torch.dtype = torch.float32,
    anchors: list[list[int]] | None = None,
    block_targets: torch.Tensor | None = None,
) -> SdsatBatch:
    """Append `blocks_per_row` adaptive blocks of `max_block` slots at random anchors to each row of
    `tokens` (B, T). Every block has the full length (the contract is the same for any k <= L: slot
    j only sees slots before it, so a block of L trains every k at once).

    Labels of a block are the file's next tokens, or `block_targets` (B, blocks, L) when given (the
    model's own greedy continuation: see `greedy_block_targets`)."""
    B, T = tokens.shape
    L = max_block
    if anchors is None:
        anchors = sample_anchors(B, T, blocks_per_row, rng)
    S = T + blocks_per_row * L
    ids = torch.empty(B, S, dtype=torch.long)
    pos = torch.empty(B, S, dtype=torch.long)
    labels = torch.full((B, S), IGNORE, dtype=torch.long)
    slot = torch.full((B, S), -1, dtype=torch.long)
    teacher_pos = torch.full((B, S), -1, dtype=torch.long)
    allowed = torch.zeros(B, S, S, dtype=torch.bool)
    causal_real = torch.ones(T, T, dtype=torch.bool).tril()
    causal_block = torch.ones(L, L, dtype=torch.bool).tril()
    block_ids = _block_ids(adaptive_ids, L)
    for b in range(B):
        ids[b, :T] = tokens[b]
        pos[b, :T] = torch.arange(T)
        labels[b, : T - 1] = tokens[b, 1:]
        allowed[b, :T, :T] = causal_real
        for i, t in enumerate(anchors[b]):
            s = T + i * L
            ids[b, s : s + L] = block_ids
            pos[b, s : s + L] = torch.arange(t + 1, t + 1 + L)
            # A_j (j = 1..L) stands in for x_{t+j} and predicts x_{t+j+1}.
            targets = tokens[b, t + 2 : t + 2 + L] if block_targets is None else block_targets[b, i]
            labels[b, s : s + len(targets)] = targets
            slot[b, s : s + L] = torch.arange(L)
            teacher_pos[b, s : s + L] = torch.arange(t + 1, t + 1 + L).clamp(max=T - 1)
            allowed[b, s : s + L, : t + 1] = True
            allowed[b, s : s + L, s : s + L] = causal_block
    mask = torch.zeros(B, 1, S, S, dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return SdsatBatch(ids, pos, mask, labels, T, slot, teacher_pos)


def _block_ids(adaptive_ids: list[int], length: int) -> torch.Tensor:
    return torch.tensor((adaptive_ids * length)[:length] if len(adaptive_ids) == 1 else adaptive_ids[:length])


@torch.no_grad()
def greedy_block_targets(model, tokens: torch.Tensor, anchors: list[list[int]], max_block: int,
                         return_logits: bool = False):
    """(B, blocks, L): for each anchor t, tokens 2..L+1 of the model's own greedy continuation of x_0..x_t.

    Decoding accepts a draft only when it equals what greedy decoding would emit, so the target
    that maximizes acceptance is the model's greedy output, not the file's text (self-distillation,
    as Medusa-2 does). Computed for every anchor at once: one pass over the real tokens, then L
    small passes that each extend every anchor's continuation by one token through the KV cache,
    each continuation seeing only x_0..x_t and itself (the mask of an SDSAT block).
    With `return_logits`, also the (B, blocks, L, V) logits each target was the argmax of (the
    model's own distributions: soft self-distillation targets)."""
    from transformers import DynamicCache

    device = model.get_input_embeddings().weight.device
    dtype = torch.float32 if not model.get_input_embeddings().weight.is_floating_point() else model.get_input_embeddings().weight.dtype
    B, T = tokens.shape
    M, L = len(anchors[0]), max_block
    anchor_t = torch.tensor(anchors, dtype=torch.long, device=device)  # (B, M)
    was_training = model.training
    model.eval()
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=tokens.to(device), cache=cache, use_cache=True).logits
    current = logits.gather(1, anchor_t[..., None].expand(B, M, logits.shape[-1])).argmax(-1)  # c_1: (B, M)
    targets = torch.empty(B, M, L, dtype=torch.long)
    teacher = [] if return_logits else None
    neg = torch.finfo(dtype).min
    for j in range(1, L + 1):  # feed c_j at position t+j, read c_{j+1}
        past = T + (j - 1) * M
        allowed = torch.zeros(B, M, past + M, dtype=torch.bool, device=device)
        allowed[:, :, :T] = torch.arange(T, device=device)[None, None] <= anchor_t[..., None]
        for i in range(1, j):  # this anchor's earlier continuation tokens, one per earlier step
            allowed[:, torch.arange(M), T + (i - 1) * M + torch.arange(M)] = True
        allowed[:, torch.arange(M), past + torch.arange(M)] = True
        mask = torch.zeros(B, 1, M, past + M, dtype=dtype, device=device).masked_fill_(~allowed[:, None], neg)
        out = model(input_ids=current, position_ids=anchor_t + j, attention_mask=mask, cache=cache, use_cache=True)
        current = out.logits.argmax(-1)
        targets[:, :, j - 1] = current.cpu()
        if teacher is not None:
            teacher.append(out.logits.float())
    model.train(was_training)
    if teacher is not None:
        return targets, torch.stack(teacher, dim=2)
    return targets


def sdsat_losses(model, batch: SdsatBatch, slot_decay: float = 1.0, soft_weight: float = 0.0,
                 block_teacher: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(real-token loss, adaptive-token loss), each a mean cross-entropy over its own slots.
    A batch without blocks is plain causal language modelling (no explicit mask: the fast path).

    `slot_decay` g weights slot j's cross-entropy by g^(j-1) (a draft is accepted up to its first
    miss, so slot 1 gates every later one). `soft_weight` w adds w * KL(teacher || slot) to the
    adaptive loss, the teacher being the model's own next-token distribution for the same token:
    `block_teacher` (B, blocks, L, V) from `greedy_block_targets`, else the real-token output at
    the matching position of this very pass (detached)."""
    device = model.get_input_embeddings().weight.device
    plain = batch.input_ids.shape[1] == batch.real_len
    out = model(
        input_ids=batch.input_ids.to(device),
        position_ids=None if plain else batch.position_ids.to(device),
        attention_mask=None if plain else batch.attention_mask.to(device),
        use_cache=False,
    )
    logits = out.logits.float()
    T = batch.real_len
    real = _real_loss(logits[:, :T], batch.labels[:, :T].to(device))
    if plain:
        return real, torch.zeros((), device=device)
    return real, _adaptive_loss(logits[:, T:], logits[:, :T].detach(), batch, slot_decay, soft_weight, block_teacher)


def frozen_prefix_losses(model, batch: SdsatBatch, slot_decay: float = 1.0, soft_weight: float = 0.0,
                         block_teacher: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sdsat_losses` for a model whose only trainable weights are the adaptive rows (`--peft
    adaptive-rows`). No gradient can reach a real token then, but autograd works on whole tensors:
    in one pass over [real; blocks] the backward would cost the whole row. So the real tokens run
    once without autograd into a KV cache, and only the blocks run with it (their mask rows over
    the same columns): the backward costs blocks x L tokens instead of T + blocks x L."""
    from transformers import DynamicCache

    device = model.get_input_embeddings().weight.device
    T = batch.real_len
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        real_logits = model(input_ids=batch.input_ids[:, :T].to(device), cache=cache, use_cache=True).logits.float()
    real = _real_loss(real_logits, batch.labels[:, :T].to(device))
    out = model(input_ids=batch.input_ids[:, T:].to(device), position_ids=batch.position_ids[:, T:].to(device),
                attention_mask=batch.attention_mask[:, :, T:].to(device), cache=cache, use_cache=True)
    return real, _adaptive_loss(out.logits.float(), real_logits, batch, slot_decay, soft_weight, block_teacher)


def _real_loss(real_logits: torch.Tensor, real_labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(real_logits.reshape(-1, real_logits.shape[-1]), real_labels.reshape(-1), ignore_index=IGNORE)


def _adaptive_loss(block_logits: torch.Tensor, real_logits: torch.Tensor, batch: SdsatBatch, slot_decay: float,
                   soft_weight: float, block_teacher: torch.Tensor | None) -> torch.Tensor:
    """The blocks' loss from their logits (B, blocks x L, V); `real_logits` (detached) are the
    soft targets when no `block_teacher` is given."""
    device, V, T = block_logits.device, block_logits.shape[-1], batch.real_len
    ada_labels = batch.labels[:, T:].to(device)
    if slot_decay == 1.0 and not soft_weight:
        return F.cross_entropy(block_logits.reshape(-1, V), ada_labels.reshape(-1), ignore_index=IGNORE)
    valid = ada_labels != IGNORE
    slot = batch.slot[:, T:].to(device)
    weight = (slot_decay ** slot.clamp(min=0).float()) * valid
    ce = F.cross_entropy(block_logits.reshape(-1, V), ada_labels.reshape(-1), ignore_index=IGNORE,
                         reduction="none").reshape(ada_labels.shape)
    adaptive = (ce * weight).sum() / weight.sum().clamp(min=1e-6)
    if soft_weight:
        if block_teacher is not None:
            teacher = block_teacher.to(device).reshape(ada_labels.shape[0], -1, V)  # slot order = block order
        else:
            pos = batch.teacher_pos[:, T:].to(device).clamp(min=0)
            teacher = real_logits[torch.arange(pos.shape[0], device=device)[:, None], pos]
        log_q = F.log_softmax(block_logits, dim=-1)
        log_p = F.log_softmax(teacher, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        adaptive = adaptive + soft_weight * (kl * weight).sum() / weight.sum().clamp(min=1e-6)
    return adaptive


def token_chunks(token_stream: list[int], length: int, rng: random.Random, count: int) -> torch.Tensor:
    """`count` random windows of `length` tokens from one long stream of token ids."""
    starts = [rng.randrange(0, len(token_stream) - length) for _ in range(count)]
    return torch.tensor([token_stream[s : s + length] for s in starts], dtype=torch.long)


def train_step(model, opt, sched, params, tokens: torch.Tensor, adaptive_ids: list[int], max_block: int,
               blocks_per_row: int, adaptive_weight: float, rng: random.Random,
               targets: str = "data", slot_decay: float = 1.0, soft_weight: float = 0.0,
               real_weight: float = 1.0, frozen_prefix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on SDSAT blocks added to `tokens` (B, T); returns the two losses.
    `targets`: what a block learns to predict, "data" (the file's next tokens) or "greedy".
    `real_weight` 0 trains the drafts alone (the real-token loss is still computed and returned).
    `frozen_prefix`: only adaptive rows train (`frozen_prefix_losses`, the same losses, cheaper)."""
    anchors = sample_anchors(tokens.shape[0], tokens.shape[1], blocks_per_row, rng)
    block_targets = teacher = None
    if targets == "greedy" and blocks_per_row:
        block_targets = greedy_block_targets(model, tokens, anchors, max_block, return_logits=bool(soft_weight))
        if soft_weight:
            block_targets, teacher = block_targets
    batch = make_sdsat_batch(tokens, adaptive_ids, max_block, blocks_per_row, rng, anchors=anchors,
                             block_targets=block_targets)
    losses = frozen_prefix_losses if frozen_prefix and blocks_per_row else sdsat_losses
    real, adaptive = losses(model, batch, slot_decay, soft_weight, teacher)
    opt.zero_grad(set_to_none=True)
    (real_weight * real + adaptive_weight * adaptive).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    return real.detach(), adaptive.detach()


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
    on_step=None,
    targets: str = "data",
    slot_decay: float = 1.0,
    soft_weight: float = 0.0,
    real_weight: float = 1.0,
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
        real, adaptive = train_step(model, opt, sched, params, tokens, adaptive_ids, max_block, blocks_per_row,
                                    adaptive_weight, rng, targets, slot_decay, soft_weight, real_weight)
        if on_step is not None:
            on_step(step, real.item(), adaptive.item())
    model.eval()
    return real.item(), adaptive.item()


# ----------------------------------------------------------------------------------------------
# `sdsat-lsp train`: the whole recipe with data, checkpoints, resume and a final evaluation.
# One code path serves a micro model on CPU and CodeLlama on a GPU: only the flags differ.

# Sizes for models trained from scratch (GQA throughout, like the Llama family we serve).
ARCHS = {
    "micro": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4),
    "base": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2),
}


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="output folder (checkpoints, final model, report); resumes if it holds a checkpoint")
    p.add_argument("--init", help="model folder or hub id to fine-tune (default: train a new model from scratch)")
    p.add_argument("--arch", default="small",
                   help=f"size of a model trained from scratch: {', '.join(sorted(ARCHS))}, or "
                        "layers=N,hidden=N,intermediate=N,heads=N,kv=N")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer size for a model trained from scratch")
    p.add_argument("--context", type=int, default=2048, help="context length of a model trained from scratch")
    p.add_argument("--peft", choices=["auto", "lora", "none", "adaptive-rows"], default="auto",
                   help="lora: adapters plus the adaptive-token embedding (the default with --init); none: all weights; "
                        "adaptive-rows: only the adaptive tokens' embedding rows (real-token outputs stay exactly the base's)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--adaptive-id", type=int, help="adaptive token id (default: the card's, else a new special token)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-block", type=int, default=5, help="L: adaptive tokens per block (trains every k <= L)")
    p.add_argument("--blocks-per-row", type=int, default=8, help="adaptive blocks per row; 0: plain language-model training (a base model)")
    p.add_argument("--targets", choices=["data", "greedy"], default="data",
                   help="what a block learns: the file's next tokens, or the model's own greedy continuation (self-distillation: higher acceptance)")
    p.add_argument("--lr", type=float, default=None, help="default 3e-3 from scratch, 5e-4 for lora")
    p.add_argument("--warmup", type=int, help="learning-rate warm-up steps (default: min(100, steps / 10 + 1))")
    p.add_argument("--adaptive-weight", type=float, default=1.0, help="loss = real + w * adaptive")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--stop-after", type=int, help="checkpoint and stop after this many steps in this run (train in chunks)")
    p.add_argument("--time-budget", type=float,
                   help="train for about this many seconds: after the first steps, --steps is lowered to what the "
                        "measured speed affords (the learning-rate schedule follows; a resume keeps the count)")
    p.add_argument("--source", help="train on the Python files under this folder (default: the standard library)")
    p.add_argument("--corpus", help="train on the shards of a `sdsat-lsp corpus` folder (and, from scratch, with its "
                                    "tokenizer); its manifest goes into the model card")
    # The SDSAT recipe's options (off by default: the recipe as the embedded model was trained).
    p.add_argument("--slot-ids", action="store_true",
                   help="a distinct adaptive id per slot (the tokenizer's <|sdsat_slot_j|> tokens) instead of one shared id")
    p.add_argument("--slot-decay", type=float, default=1.0, help="weight slot j's loss by DECAY^(j-1) (e.g. 0.8; 1: uniform)")
    p.add_argument("--soft-weight", type=float, default=0.0,
                   help="add W * KL(model's own next-token distribution || slot) to the adaptive loss (0: hard labels only)")
    p.add_argument("--real-weight", type=float, default=1.0, help="loss = R * real + w * adaptive (0: train the drafts only)")
    p.add_argument("--eval-prompts", type=int, default=20, help="held-out prompts for the acceptance evaluation (0: skip it)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")


def _prepare_data(args, out: Path, tokenizer):
    """Token streams for training and held-out files, cached in `out` (tokenizing takes a while)."""
    from ..corpus import file_list_hash, split_files, token_stream

    if getattr(args, "corpus", None):
        from .corpus import load_corpus

        return load_corpus(args.corpus)
    cache = out / "data.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True)
    root, train_files, held_files = split_files(args.source)
    log.info("tokenizing %d training and %d held-out files", len(train_files), len(held_files))
    data = {
        "train": torch.tensor(token_stream(tokenizer, train_files), dtype=torch.int32),
        "held": torch.tensor(token_stream(tokenizer, held_files), dtype=torch.int32),
        "files_hash": file_list_hash(train_files + held_files, root),
        "held_files": [str(f.relative_to(root)) for f in held_files],
    }
    torch.save(data, cache)
    return data


def _new_model(args, out: Path):
    """A fresh tokenizer and model for training from scratch (saved at once so resume finds them)."""
    from .tinymodel import ADAPTIVE_TOKEN, build_tiny_model, train_tokenizer

    tok_dir = out / "tokenizer"
    if getattr(args, "corpus", None) and not tok_dir.exists():
        import shutil

        shutil.copytree(Path(args.corpus) / "tokenizer", tok_dir)
    if tok_dir.exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
    else:
        tokenizer = train_tokenizer(vocab_size=args.vocab_size, max_files=10**6, source=args.source)
        tokenizer.save_pretrained(tok_dir)
    model = build_tiny_model(tokenizer, seed=args.seed, max_position_embeddings=args.context, **arch_config(args.arch))
    return model, tokenizer, _adaptive_ids(args, tokenizer, model)


def arch_config(arch: str) -> dict:
    """A named size, or one spelled out: "layers=8,hidden=512,intermediate=1536,heads=8,kv=4"."""
    if arch in ARCHS:
        return ARCHS[arch]
    keys = {"layers": "num_hidden_layers", "hidden": "hidden_size", "intermediate": "intermediate_size",
            "heads": "num_attention_heads", "kv": "num_key_value_heads"}
    try:
        fields = dict(part.split("=") for part in arch.split(","))
        config = {keys[k.strip()]: int(v) for k, v in fields.items()}
    except (ValueError, KeyError) as exc:
        from ..errors import SdsatError

        raise SdsatError(f"--arch {arch!r}: a name ({', '.join(sorted(ARCHS))}) or {','.join(f'{k}=N' for k in keys)}") from exc
    return {**ARCHS["small"], **config}


def _adaptive_ids(args, tokenizer, model) -> list[int]:
    """The shared adaptive id, or with --slot-ids one id per slot (added to the tokenizer, and the
    embedding grown, when it has no slot tokens yet)."""
    from .tinymodel import ADAPTIVE_TOKEN, slot_token_names

    if not getattr(args, "slot_ids", False):
        return [tokenizer.convert_tokens_to_ids(ADAPTIVE_TOKEN)]
    names = slot_token_names(args.max_block)
    missing = [n for n in names if n not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    return [tokenizer.convert_tokens_to_ids(n) for n in names]


def _pretrained_model(args):
    from ..model import load_model
    from .tinymodel import ADAPTIVE_TOKEN

    loaded = load_model(args.init, quantize="none", dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    if args.adaptive_id is not None:
        ids = [args.adaptive_id]
    elif getattr(args, "slot_ids", False):
        ids = _adaptive_ids(args, tokenizer, model)
    elif loaded.card.adaptive_ids:
        ids = loaded.card.adaptive_ids[:1]
    else:  # a new special token; its embedding row is trained
        tokenizer.add_special_tokens({"additional_special_tokens": [ADAPTIVE_TOKEN]})
        model.resize_token_embeddings(len(tokenizer))
        ids = [tokenizer.convert_tokens_to_ids(ADAPTIVE_TOKEN)]
    return model, tokenizer, ids


def freeze_all_but_adaptive_rows(model, adaptive_ids) -> list:
    """Train only the adaptive tokens' input-embedding rows: capacity used at adaptive positions
    alone. Real tokens never attend to adaptive ones, so every real token's output stays bitwise
    the base model's (AdamW without weight decay leaves a zero-gradient row untouched)."""
    for param in model.parameters():
        param.requires_grad_(False)
    weight = model.get_input_embeddings().weight
    weight.requires_grad_(True)
    keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    keep[sorted(set(adaptive_ids))] = 1
    weight.register_hook(lambda grad: grad * keep)
    return [weight]


def _wrap_lora(model, adaptive_ids, rank):
    """LoRA adapters on every projection plus a trainable row for each adaptive token (peft's
    trainable_token_indices), so what makes a model SDSAT-capable ships as a small delta."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        trainable_token_indices={"embed_tokens": sorted(set(adaptive_ids))},
    )
    return get_peft_model(model, config)


def heldout_real_loss(model, held: torch.Tensor, seq_len: int, windows: int = 32) -> float:
    """Mean next-token loss on real tokens over fixed held-out windows (no adaptive tokens)."""
    device = model.get_input_embeddings().weight.device
    step = max(seq_len, (len(held) - seq_len - 1) // windows)
    losses = []
    with torch.inference_mode():
        for start in range(0, len(held) - seq_len - 1, step)[:windows]:
            x = held[start : start + seq_len + 1].long()[None].to(device)
            logits = model(input_ids=x[:, :-1]).logits.float()
            losses.append(F.cross_entropy(logits[0], x[0, 1:]).item())
    return sum(losses) / len(losses)


def acceptance_by_k(model, held: torch.Tensor, adaptive_ids: list[int], max_k: int, prompts: int = 20,
                    max_new_tokens: int = 48, prompt_len: int = 192) -> dict[int, float]:
    """Mean accepted drafts per verifying pass (fused mode) on held-out prompts, for k = 1..max_k."""
    from ..engine import generate

    rng = random.Random(1)
    starts = [rng.randrange(0, len(held) - prompt_len - 1) for _ in range(prompts)]
    result = {}
    for k in range(1, max_k + 1):
        accepted = passes = 0
        for s in starts:
            g = generate(model, held[s : s + prompt_len].tolist(), mode="fused", k=k, adaptive_ids=adaptive_ids,
                         max_new_tokens=max_new_tokens, eos_ids=[])
            accepted += g.stats.drafts_accepted
            passes += g.stats.verify_passes
        result[k] = round(accepted / max(1, passes), 4)
    return result


def _evaluate(model, held: torch.Tensor, adaptive_ids: list[int], args) -> dict:
    result = {"heldout_real_loss": heldout_real_loss(model, held, args.seq_len)}
    if args.eval_prompts:
        result["mean_accepted_by_k"] = acceptance_by_k(model, held, adaptive_ids, args.max_block, args.eval_prompts)
    return result


def _save_checkpoint(path: Path, model, opt, sched, step: int, rng: random.Random, steps: int,
                     budget_settled: bool) -> None:
    tmp = path.with_suffix(".tmp")
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    # Optimizer state stays on the training device; torch.load(map_location=...) brings it back.
    torch.save({"step": step, "steps": steps, "budget_settled": budget_settled, "trainable": trainable,
                "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state()}, tmp)
    tmp.replace(path)  # atomic: a kill mid-save leaves the previous checkpoint intact


def load_checkpoint(path: Path, device) -> dict:
    """A training checkpoint, read without running pickled code (weights_only: tensors, numbers,
    strings and containers only), so a checkpoint file from elsewhere cannot run anything."""
    import pickle

    try:
        return torch.load(path, weights_only=True, map_location=device)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise SdsatError(f"{path} is not a checkpoint of tensors and plain values; refusing it "
                         f"(delete it to start over): {str(exc).splitlines()[0]}") from exc


def run_training(args) -> dict:
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text("sdsat-lsp train " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["train"] else sys.argv[1:]) + "\n")
    from_scratch = args.init is None
    model, tokenizer, adaptive_ids = _new_model(args, out) if from_scratch else _pretrained_model(args)
    device = _device(args)
    model.to(device)
    if device.startswith("cuda"):  # TF32 matmuls: several times fp32's speed, plenty for training
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peft_mode = args.peft if args.peft != "auto" else ("none" if from_scratch else "lora")
    data = _prepare_data(args, out, tokenizer)
    train_stream, held = data["train"], data["held"]
    lr = args.lr or (3e-3 if peft_mode == "none" else 5e-4)
    log.info("train tokens %d, held-out tokens %d, adaptive ids %s", len(train_stream), len(held), adaptive_ids)

    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    if "before" not in report and from_scratch:
        report["before"] = {"note": "trained from scratch: the starting point is random weights"}
    if "before" not in report:
        model.eval()
        report["before"] = _evaluate(model, held, adaptive_ids, args)
        report_path.write_text(json.dumps(report, indent=2))
    if peft_mode == "lora":
        model = _wrap_lora(model, adaptive_ids, args.lora_rank)
    elif peft_mode == "adaptive-rows":
        freeze_all_but_adaptive_rows(model, adaptive_ids)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    warmup = args.warmup or min(100, args.steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    run = _Run(args, out, model, tokenizer, adaptive_ids, peft_mode, params, opt, sched, rng, held, data.get("manifest"))
    run.resume(device)
    stream = train_stream.tolist()
    if not run.train(stream):
        return report  # --stop-after: the checkpoint is saved, the same command resumes
    model.eval()
    _save_final(model, tokenizer, adaptive_ids, args, out / "model", peft_mode, data.get("manifest"))
    report["after"] = _evaluate(model, held, adaptive_ids, args)
    report.update(files_hash=data["files_hash"], held_out_files=len(data["held_files"]), train_tokens=len(stream),
                  held_tokens=len(held), steps=args.steps, seed=args.seed, peft=peft_mode, lr=lr,
                  loss_mix=f"real + {args.adaptive_weight} * adaptive", adaptive_ids=adaptive_ids,
                  block_targets=args.targets, blocks_per_row=args.blocks_per_row, warmup=warmup,
                  time_budget=args.time_budget, slot_ids=args.slot_ids, slot_decay=args.slot_decay,
                  soft_weight=args.soft_weight, real_weight=args.real_weight, arch=args.arch if from_scratch else None)
    if "manifest" in data:
        report["corpus"] = corpus_summary(data["manifest"])
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _check_args(args) -> None:
    for flag, value in (("--steps", args.steps), ("--time-budget", args.time_budget), ("--warmup", args.warmup)):
        if value is not None and value <= 0:
            raise SdsatError(f"{flag} must be positive (got {value})")


def _device(args) -> str:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SdsatError("--device cuda was asked for, but this machine has no CUDA GPU (torch.cuda.is_available() is False)")
    return device


@dataclass
class _Run:
    """The training loop's state: what a checkpoint saves and a resume restores."""

    args: Any
    out: Path
    model: Any
    tokenizer: Any
    adaptive_ids: list[int]
    peft_mode: str
    params: list
    opt: Any
    sched: Any
    rng: random.Random
    held: Any
    manifest: dict | None = None  # the corpus's (sdsat-lsp corpus), recorded in every snapshot's card
    start_step: int = 0
    budget_settled: bool = False  # once the time budget has set the step count, it stays

    @property
    def ckpt(self) -> Path:
        return self.out / "checkpoint.pt"

    def resume(self, device: str) -> None:
        args = self.args
        self.budget_settled = not args.time_budget
        if not self.ckpt.exists():
            return
        state = load_checkpoint(self.ckpt, device)
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                named[name].copy_(value)
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.start_step = state["step"]
        if args.time_budget and state.get("budget_settled"):
            # The budget's count rules over --steps (an upper bound then); without a budget, --steps
            # rules, so a finished schedule can be stretched by resuming with more steps.
            args.steps, self.budget_settled = state["steps"], True
        log.info("resumed from step %d of %d", self.start_step, args.steps)

    def save(self, step: int) -> None:
        _save_checkpoint(self.ckpt, self.model, self.opt, self.sched, step, self.rng, self.args.steps, self.budget_settled)

    def train(self, stream: list[int]) -> bool:
        """Steps up to `args.steps`; False when `--stop-after` stopped it first."""
        from tqdm import tqdm

        args, model, start_step = self.args, self.model, self.start_step
        model.train()
        bar = tqdm(initial=start_step, total=args.steps, desc="sdsat train", file=sys.stderr, dynamic_ncols=True)
        started, tokens_seen = time.perf_counter(), 0
        budget_from = start_step + 5  # the first steps include one-off costs (allocation, kernel choice)
        step = start_step
        while step < args.steps:
            if args.stop_after and step >= start_step + args.stop_after:
                bar.close()
                self.save(step)
                log.info("stopped after step %d of %d; run the same command again to resume", step, args.steps)
                return False
            if not self.budget_settled and step == budget_from:
                budget_started = time.perf_counter()
            if not self.budget_settled and step == budget_from + 20:
                self.settle_budget(step, (time.perf_counter() - budget_started) / 20, time.perf_counter() - started, bar)
            tokens = token_chunks(stream, args.seq_len, self.rng, args.batch_size)
            real, adaptive = train_step(model, self.opt, self.sched, self.params, tokens, self.adaptive_ids, args.max_block,
                                        args.blocks_per_row, args.adaptive_weight, self.rng, args.targets,
                                        args.slot_decay, args.soft_weight, args.real_weight,
                                        frozen_prefix=self.peft_mode == "adaptive-rows")
            step += 1
            bar.update(1)
            tokens_seen += tokens.numel()
            bar.set_postfix(real=f"{real.item():.3f}", adaptive=f"{adaptive.item():.3f}",
                            tok_s=f"{tokens_seen / (time.perf_counter() - started):.0f}")
            if step % args.checkpoint_every == 0 or step == args.steps:
                self.checkpoint(step, real, adaptive)
        bar.close()
        return True

    def settle_budget(self, step: int, per_step: float, elapsed: float, bar) -> None:
        """Set the step count from the speed of the first steps (`--time-budget`)."""
        args = self.args
        self.budget_settled = True
        affordable = step + int((args.time_budget - elapsed) / per_step)
        if affordable < args.steps:
            log.info("time budget %.0f s at %.3f s/step: %d steps instead of %d", args.time_budget, per_step,
                     affordable, args.steps)
            args.steps = bar.total = max(step + 1, affordable)

    def checkpoint(self, step: int, real, adaptive) -> None:
        self.save(step)
        model, args = self.model, self.args
        if self.peft_mode != "lora":  # a usable snapshot at every checkpoint (long runs end without warning)
            _save_final(model, self.tokenizer, self.adaptive_ids, args, self.out / "snapshot", self.peft_mode, self.manifest)
        # A few held-out windows show when more steps stop helping (over-fitting a small corpus).
        model.eval()
        heldout = heldout_real_loss(model, self.held, args.seq_len, windows=8)
        model.train()
        with (self.out / "log.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "real": real.item(), "adaptive": adaptive.item(),
                                "heldout_real_8": round(heldout, 4), "lr": self.sched.get_last_lr()[0],
                                "time": time.time()}) + "\n")


def corpus_summary(manifest: dict) -> dict:
    """What a model card says of the corpus a model was trained on (the manifest, minus bulk)."""
    keys = ("command", "seed", "python", "files", "train_files", "held_files", "file_list_hash", "held_out_packages",
            "held_out_rule", "exclusions", "train_tokens", "held_tokens", "tokens_per_package", "fim", "near_duplicate")
    return {k: manifest[k] for k in keys if k in manifest}


def _save_final(model, tokenizer, adaptive_ids, args, folder: Path, peft_mode: str, manifest: dict | None = None) -> None:
    from ..modelcard import ModelCard, write_model_card

    folder.mkdir(parents=True, exist_ok=True)
    if peft_mode == "lora":
        model.save_pretrained(folder / "sdsat-delta")  # the small delta: adapters + adaptive rows
        model = model.merge_and_unload()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # FIM ids are written only for a model that already infills (its own card says so): this recipe
    # does not train infilling, and a server would otherwise build prompts the model never saw.
    from ..modelcard import read_model_card

    init_card = read_model_card(args.init) if args.init else None
    fim = dict(init_card.fim) if init_card else {}
    if manifest and (manifest.get("fim") or {}).get("rate", 0) > 0 and (init_card is None or init_card.fim):
        # Trained (or fine-tuned from a model trained) on a FIM corpus: the server may infill.
        fim = {role: int(i) for role, i in manifest["tokenizer"]["fim"].items()}
    corpus = corpus_summary(manifest) if manifest else (init_card.corpus if init_card else None)
    write_model_card(folder, ModelCard(adaptive_ids=list(adaptive_ids), k=args.max_block, fim=fim,
                                       context_length=model.config.max_position_embeddings, corpus=corpus))


def main(args) -> int:
    report = run_training(args)
    print(json.dumps({k: report[k] for k in ("before", "after") if k in report}, indent=2))
    return 0
