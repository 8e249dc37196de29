"""common/sampling.py's semantics in torch (greedy, temperature, top-k, top-p, seeded generator)."""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B] int64."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)  # the first (lowest) id on ties
    z = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(z, min(top_k, z.shape[-1]), dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))  # ties at the k-th value are kept
    if top_p < 1.0:
        order = torch.argsort(-z, dim=-1, stable=True)  # descending probability, ties by id
        p = torch.softmax(torch.gather(z, -1, order), dim=-1)
        before = torch.cumsum(p, dim=-1) - p  # mass strictly before each token
        keep = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, order, before < top_p)
        z = z.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
