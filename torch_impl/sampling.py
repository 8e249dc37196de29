"""common/sampling.py's semantics in torch (greedy, temperature, top-k, top-p, seeded generator).

With top-k on (as in Qwen3's generation configs) nothing passes over the vocabulary more than a few
times: top-k runs per chunk of the vocabulary and then over the chunks' winners, top-p works on the
k candidates, and the draw is among them. Every token above the k-th value is a candidate; the
tokens at the k-th value (any number of them, candidates or not) share one probability, count in id
order for top-p, and enter the draw as one outcome, resolved to one of the kept ones uniformly.
"""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None, *, fused: bool = False) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B] int64. `fused` (CUDA, with the fused ops): top-k's
    candidates go to torch_impl.kernels.draw, one launch for what follows top-k (the same draws
    from the same uniforms, up to float32 rounding at a boundary)."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)  # the first (lowest) id on ties
    z = logits.float() / temperature
    if top_k > 0:
        vals, ids = candidates(z, min(top_k, z.shape[-1]))
        u = torch.rand(z.shape[0], 2, generator=generator, device=z.device)  # the draw's, the tied token's
        if fused:
            from torch_impl.kernels.draw import draw_top_k  # noqa: PLC0415 - triton only with the fused ops

            return draw_top_k(z, vals.contiguous(), ids.contiguous(), u, top_p)
        return _draw_top_k(z, _Candidates(z, vals, ids, top_p), u)
    if top_p < 1.0:
        order = torch.argsort(-z, dim=-1, stable=True)  # descending probability, ties by id
        p = torch.softmax(torch.gather(z, -1, order), dim=-1)
        before = torch.cumsum(p, dim=-1) - p  # mass strictly before each token
        keep = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, order, before < top_p)
        z = z.masked_fill(~keep, float("-inf"))
    return torch.multinomial(torch.softmax(z, dim=-1), 1, generator=generator)[:, 0]


def candidates(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) [B, k] of the k largest of z [B, V], values descending (the order among equal
    values unspecified). Over up to 128 equal chunks of the vocabulary first, then over their
    winners: one row of 151,936 is a single program's work in torch.topk, 128 chunks are not."""
    b, v = z.shape
    chunks = next((c for c in (128, 64, 32, 16, 8, 4, 2) if v % c == 0 and v // c >= k), 1)
    if chunks == 1:
        return torch.topk(z, k, dim=-1)
    width = v // chunks
    cv, ci = torch.topk(z.view(b, chunks, width), k, dim=-1)  # each chunk's k largest
    ci = ci + torch.arange(0, v, width, device=z.device)[None, :, None]
    vals, pos = torch.topk(cv.reshape(b, chunks * k), k, dim=-1)
    return vals, ci.reshape(b, chunks * k).gather(-1, pos)


class _Candidates:
    """What top-k then top-p keep of z [B, V], from top-k's k candidates: those above the k-th value
    (`ids`, `keep` [B, k], descending value then lower id, with their unnormalized probabilities
    `e`), and of the tokens tied at the k-th value (`tie` [B, V]) the first `n_tie_kept` [B, 1] in
    id order, each with probability `e_tie` [B, 1] (unnormalized as `e`)."""

    def __init__(self, z: torch.Tensor, vals: torch.Tensor, ids: torch.Tensor, top_p: float):
        kth = vals[:, -1:]
        by_id = torch.argsort(ids, dim=-1)  # then a stable sort by value: descending value, lower id first
        vals, ids = vals.gather(-1, by_id), ids.gather(-1, by_id)
        by_value = torch.sort(vals, dim=-1, descending=True, stable=True).indices
        vals, self.ids = vals.gather(-1, by_value), ids.gather(-1, by_value)
        above = vals > kth
        self.e = torch.where(above, torch.exp(vals - vals[:, :1]), 0.0)
        self.tie = z == kth
        n_tie = self.tie.sum(-1, keepdim=True)
        self.e_tie = torch.exp(kth - vals[:, :1])
        total = self.e.sum(-1, keepdim=True) + n_tie * self.e_tie
        p_above, p_tie = self.e / total, self.e_tie / total
        before = torch.cumsum(p_above, dim=-1) - p_above  # mass strictly before each token above the tie
        self.keep = above & (before < top_p)
        # the r-th tied token (r = 0, 1, ... in id order) is kept while the mass before it is < top_p
        rank = torch.arange(z.shape[-1], device=z.device)[None, :]
        fits = (p_above.sum(-1, keepdim=True) + rank * p_tie < top_p) & (rank < n_tie)
        self.n_tie_kept = fits.sum(-1, keepdim=True)


def top_k_nucleus(z: torch.Tensor, k: int, top_p: float) -> torch.Tensor:
    """The tokens top-k then top-p keep [B, V] bool (what `sample` draws from)."""
    c = _Candidates(z, *candidates(z, k), top_p)
    keep = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, c.ids, c.keep)
    rank = torch.cumsum(c.tie.to(torch.int64), dim=-1) - 1  # each tied token's place among them, by id
    return keep | (c.tie & (rank < c.n_tie_kept))


def _draw_top_k(z: torch.Tensor, c: _Candidates, u: torch.Tensor) -> torch.Tensor:
    """One token per row among the kept candidates, by the inverse of their cumulative weights at
    u[:, 0] (the candidates in rank order, then the tied group as one outcome of its kept tokens'
    total weight), a tied token by u[:, 1]: the t-th kept one in id order."""
    w = torch.where(c.keep, c.e, 0.0)  # [B, k]
    cw = torch.cumsum(w, dim=-1)
    w_tie = c.n_tie_kept * c.e_tie  # [B, 1]
    target = u[:, :1] * (w.sum(-1, keepdim=True) + w_tie)
    j = (cw <= target).sum(-1)  # outcomes passed before the draw's
    tie_group = (j >= w.shape[-1]) & (w_tie[:, 0] > 0)
    j = torch.minimum(j, c.keep.sum(-1) - 1).clamp(min=0)  # past the last weight by rounding: the last kept
    above = c.ids.gather(-1, j[:, None])[:, 0]
    t = (u[:, 1:] * c.n_tie_kept).long().clamp(max=c.n_tie_kept - 1).clamp(min=0)  # [B, 1]
    rank = torch.cumsum(c.tie.to(torch.int32), dim=-1)
    tied = torch.argmax((rank > t).to(torch.int32), dim=-1)  # the first id with t + 1 ties up to it
    return torch.where(tie_group, tied, above)
