"""Token choice: greedy, sampling (temperature, top-k, top-p), and the lossless speculative
acceptance rule that keeps sampled SDSAT output distributed exactly as the model's own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


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


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
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
    return draw(residual / residual.sum(), generator)


AcceptRule = Callable[[torch.Tensor, int, "torch.Generator | None"], "int | None"]
