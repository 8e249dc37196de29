"""Sampling's draw after top-k in one launch: top-p over the k candidates, the tied group at the
k-th value, and the draw itself (torch_impl.sampling's semantics, the same float32 steps).

torch_impl.sampling's torch ops take about 70 launches per sampled step (sorts, cumulative sums,
masks over the vocabulary, the draw): 300 us of a Qwen3-0.6B batch-1 step on an H100 (973.4
sampled against 1,381.5 greedy tok/s). Here one program per row takes top-k's candidates (values
and ids in any order) and two uniforms:
- candidates ranked by value, then lower id (pairwise comparisons: k is small);
- the row's tokens equal to the k-th value counted, and the first of them found, in one pass over
  the vocabulary (a second pass finds the t-th only when a draw needs a later one);
- top-p's masses (cumsum minus self, as the torch code), the tied tokens kept (a binary search
  for the count the torch code gets by comparing every rank);
- the draw by the inverse of the cumulative weights at u[0] (the kept candidates in rank order,
  then the tied group as one outcome), a tied token by u[1] (the t-th kept one in id order).
Sums run in another order than torch's: the two can differ where a mass lands within float32
rounding of top_p or of a uniform.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.tiles import next_pow2
from torch_impl.kernels._lib import check, check_device

BLOCK = 4096  # logits per step of the passes over the vocabulary


@triton.jit
def _tied_at(z_row, kth, t, V, BLOCK: tl.constexpr):
    """The id of the t-th (0-based, id order) token of the row equal to kth."""
    seen = 0
    found = V
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        hit = tl.load(z_row + offs, mask=offs < V, other=float("nan")) == kth
        upto = tl.cumsum(hit.to(tl.int32), axis=0) + seen  # ties up to and including each id
        found = tl.minimum(found, tl.min(tl.where(hit & (upto == t + 1), offs, V), axis=0))
        seen += tl.sum(hit.to(tl.int32), axis=0)
    return found


@triton.jit
def _draw_kernel(z_ptr, vals_ptr, ids_ptr, u_ptr, out_ptr, V, K, stride_z, stride_c, stride_u, top_p,
                 KP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, KP)
    c_ok = c < K
    v = tl.load(vals_ptr + row * stride_c + c, mask=c_ok, other=float("-inf"))
    ids = tl.load(ids_ptr + row * stride_c + c, mask=c_ok, other=0).to(tl.int32)
    kth = tl.min(tl.where(c_ok, v, float("inf")), axis=0)
    vmax = tl.max(v, axis=0)
    # rank: how many candidates come first (larger value, or the same value and a lower id)
    first = c_ok[None, :] & ((v[None, :] > v[:, None]) | ((v[None, :] == v[:, None]) & (ids[None, :] < ids[:, None])))
    rank = tl.sum(first.to(tl.int32), axis=1)
    upto = rank[None, :] <= rank[:, None]  # [i, j]: candidate j is at or before candidate i
    above = c_ok & (v > kth)
    e = tl.where(above, tl.exp(v - vmax), 0.0)
    e_tie = tl.exp(kth - vmax)

    z_row = z_ptr + row.to(tl.int64) * stride_z
    n_tie = 0
    first_tie = V
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        hit = tl.load(z_row + offs, mask=offs < V, other=float("nan")) == kth
        n_tie += tl.sum(hit.to(tl.int32), axis=0)
        first_tie = tl.minimum(first_tie, tl.min(tl.where(hit, offs, V), axis=0))

    total = tl.sum(e, axis=0) + n_tie.to(tl.float32) * e_tie
    p = e / total
    p_tie = e_tie / total
    before = tl.sum(tl.where(upto, p[None, :], 0.0), axis=1) - p  # mass strictly before, in rank order
    keep = above & (before < top_p)
    mass = tl.sum(p, axis=0)
    lo = 0  # tied tokens kept: the r in [0, n_tie) with mass + r p_tie < top_p (a prefix of r)
    hi = n_tie
    while lo < hi:
        mid = (lo + hi) // 2
        fits = mass + mid.to(tl.float32) * p_tie < top_p
        lo = tl.where(fits, mid + 1, lo)
        hi = tl.where(fits, hi, mid)
    n_tie_kept = lo

    w = tl.where(keep, e, 0.0)
    cw = tl.sum(tl.where(upto, w[None, :], 0.0), axis=1)  # cumulative weight in rank order
    w_tie = n_tie_kept.to(tl.float32) * e_tie
    target = tl.load(u_ptr + row * stride_u) * (tl.sum(w, axis=0) + w_tie)
    j = tl.sum((c_ok & (cw <= target)).to(tl.int32), axis=0)  # outcomes passed before the draw's
    tie_group = (j >= K) & (w_tie > 0)
    j = tl.maximum(tl.minimum(j, tl.sum(keep.to(tl.int32), axis=0) - 1), 0)
    chosen = tl.sum(tl.where(c_ok & (rank == j), ids, 0), axis=0)
    t = (tl.load(u_ptr + row * stride_u + 1) * n_tie_kept.to(tl.float32)).to(tl.int32)
    t = tl.maximum(tl.minimum(t, n_tie_kept - 1), 0)
    tied = first_tie
    if tie_group & (t > 0):
        tied = _tied_at(z_row, kth, t, V, BLOCK)
    tl.store(out_ptr + row, tl.where(tie_group, tied, chosen).to(out_ptr.dtype.element_ty))


def draw_top_k(z: torch.Tensor, vals: torch.Tensor, ids: torch.Tensor, u: torch.Tensor, top_p: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids [B] int64 drawn from z [B, V] float32 (temperature applied) given top-k's k
    candidates `vals`, `ids` [B, k] (any order) and uniforms u [B, 2] in [0, 1)."""
    op = "draw_top_k"
    check(z.dim() == 2 and z.dtype == torch.float32 and z.stride(1) == 1,
          f"{op}: z is {z.dtype} {list(z.shape)}, expected float32 [B, vocab] with contiguous rows")
    b, v = z.shape
    check(vals.dim() == 2 and vals.shape[0] == b and 0 < vals.shape[1] <= v and vals.dtype == torch.float32,
          f"{op}: vals are {vals.dtype} {list(vals.shape)}, expected float32 [{b}, k] with 0 < k <= {v}")
    k = vals.shape[1]
    check(tuple(ids.shape) == (b, k) and not ids.is_floating_point(),
          f"{op}: ids are {ids.dtype} {list(ids.shape)}, expected integers [{b}, {k}]")
    check(vals.stride() == ids.stride() and vals.stride(1) == 1,
          f"{op}: vals {vals.stride()} and ids {ids.stride()} need the same strides, contiguous rows")
    check(tuple(u.shape) == (b, 2) and u.dtype == torch.float32 and u.stride(1) == 1,
          f"{op}: u is {u.dtype} {list(u.shape)}, expected float32 [{b}, 2]")
    check(0.0 < top_p <= 1.0, f"{op}: top_p={top_p}, expected in (0, 1]")
    if out is None:
        out = torch.empty(b, dtype=torch.int64, device=z.device)
    check(tuple(out.shape) == (b,) and out.dtype in (torch.int64, torch.int32),
          f"{op}: out is {out.dtype} {list(out.shape)}, expected int64 or int32 [{b}]")
    check_device(op, z=z, vals=vals, ids=ids, u=u, out=out)
    if b == 0:
        return out
    _draw_kernel[(b,)](z, vals, ids, u, out, v, k, z.stride(0), vals.stride(0), u.stride(0), float(top_p),
                       KP=max(16, next_pow2(k)), BLOCK=min(BLOCK, next_pow2(v)), num_warps=4)
    return out
