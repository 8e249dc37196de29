"""common/sampling.py's semantics in torch (greedy, temperature, top-k, top-p, seeded generator)."""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B] int64."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)  # the first (lowest) id on ties
    z = logits.float() / temperature
    if top_k > 0 and top_p < 1.0:
        return _draw(z.masked_fill(~top_k_nucleus(z, min(top_k, z.shape[-1]), top_p), float("-inf")), generator)
    if top_k > 0:
        kth = torch.topk(z, min(top_k, z.shape[-1]), dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))  # ties at the k-th value are kept
    if top_p < 1.0:
        order = torch.argsort(-z, dim=-1, stable=True)  # descending probability, ties by id
        p = torch.softmax(torch.gather(z, -1, order), dim=-1)
        before = torch.cumsum(p, dim=-1) - p  # mass strictly before each token
        keep = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, order, before < top_p)
        z = z.masked_fill(~keep, float("-inf"))
    return _draw(z, generator)


def _draw(z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.multinomial(torch.softmax(z, dim=-1), 1, generator=generator)[:, 0]


def top_k_nucleus(z: torch.Tensor, k: int, top_p: float) -> torch.Tensor:
    """The tokens top-k then top-p keep [B, V] bool, from top-k's k candidates and no sort of the
    vocabulary. Every token above the k-th value is a candidate; the tokens at the k-th value (any
    number, candidates or not) share one probability and come after them in id order, so the mass
    before the r-th of them is the mass above plus r times theirs."""
    vals, ids = torch.topk(z, k, dim=-1)  # descending; the order among equal values is unspecified
    kth = vals[:, -1:]
    by_id = torch.argsort(ids, dim=-1)  # then a stable sort by value: descending value, lower id first
    vals, ids = vals.gather(-1, by_id), ids.gather(-1, by_id)
    by_value = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    vals, ids = vals.gather(-1, by_value), ids.gather(-1, by_value)
    above = vals > kth
    e_above = torch.where(above, torch.exp(vals - vals[:, :1]), 0.0)
    tie = z == kth
    e_tie = torch.exp(kth - vals[:, :1])
    total = e_above.sum(-1, keepdim=True) + tie.sum(-1, keepdim=True) * e_tie
    p_above, p_tie = e_above / total, e_tie / total
    before = torch.cumsum(p_above, dim=-1) - p_above  # mass strictly before each token above the tie
    keep = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, ids, above & (before < top_p))
    rank = torch.cumsum(tie.to(torch.int32), dim=-1) - 1  # each tied token's place among them, by id
    return keep | (tie & (p_above.sum(-1, keepdim=True) + rank * p_tie < top_p))
