"""Greedy decoding's argmax over the vocabulary in one launch of many programs (the decode loop's
CUDA graph replays it every step).

torch.argmax over a row of Qwen3's 151,936 logits took 8.75 us of a Qwen3-0.6B batch-1 step on an
H100 (one reduction per row). Here each program takes a chunk of a row: its largest value and the
first index holding it go to a float32 / int32 workspace, and the last of the row's programs to
arrive (an atomic counter, as decode attention's splits) picks the largest of the chunk maxima,
the first chunk on ties - torch.argmax's answer, the first index of the maximum - then resets the
counter. A NaN counts as +inf (torch.argmax ranks NaN above +inf: the two differ only where a row
holds both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.tiles import next_pow2
from torch_impl.kernels._lib import check, check_device, split_counters

CHUNK = 4096  # logits per program: Qwen3's vocabulary is 38 programs per row


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, val_ptr, idx_ptr, cnt_ptr, V, stride_x, CHUNKS,
                   BLOCK: tl.constexpr, CHUNKS_P: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN as +inf: a NaN row's first NaN, as torch.argmax
    best = tl.max(x, axis=0)
    first = tl.min(tl.where(x == best, offs, V), axis=0)  # the first index holding the maximum
    tl.store(val_ptr + row * CHUNKS + chunk, best)
    tl.store(idx_ptr + row * CHUNKS + chunk, first)
    tl.debug_barrier()  # the chunk's result is stored before the release below
    arrived = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel", scope="gpu")
    last = arrived == CHUNKS - 1
    c = tl.arange(0, CHUNKS_P)
    mine = tl.where(last, c < CHUNKS, False)  # the others load nothing
    vals = tl.load(val_ptr + row * CHUNKS + c, mask=mine, other=float("-inf"), cache_modifier=".cg")
    idxs = tl.load(idx_ptr + row * CHUNKS + c, mask=mine, other=V, cache_modifier=".cg")
    top = tl.max(vals, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(vals == top, idxs, V), axis=0).to(out_ptr.dtype.element_ty),
             mask=last)
    tl.atomic_xchg(cnt_ptr + row, 0, mask=last)


def argmax(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The index of each row's largest logit (the first one on ties), [T] int64 (into `out` if given)
    from logits [T, V] (any float dtype, rows contiguous)."""
    op = "argmax"
    check(logits.dim() == 2 and logits.is_floating_point(),
          f"{op}: logits are {logits.dtype} {list(logits.shape)}, expected floats [T, vocab]")
    check(logits.stride(1) == 1, f"{op}: logits have strides {logits.stride()}, expected contiguous rows")
    t, v = logits.shape
    check(v > 0, f"{op}: logits have an empty vocabulary axis {list(logits.shape)}")
    if out is None:
        out = torch.empty(t, dtype=torch.int64, device=logits.device)
    check(tuple(out.shape) == (t,) and out.dtype in (torch.int64, torch.int32),
          f"{op}: out is {out.dtype} {list(out.shape)}, expected int64 or int32 [{t}]")
    check_device(op, logits=logits, out=out)
    if t == 0:
        return out
    block = min(CHUNK, next_pow2(v))
    chunks = triton.cdiv(v, block)
    val = torch.empty((t, chunks), dtype=torch.float32, device=logits.device)
    idx = torch.empty((t, chunks), dtype=torch.int32, device=logits.device)
    cnt = split_counters(op, logits.device, t, "rows", "take the argmax of fewer rows at a time")
    _argmax_kernel[(t, chunks)](logits, out, val, idx, cnt, v, logits.stride(0), chunks, BLOCK=block,
                                CHUNKS_P=next_pow2(chunks), num_warps=4)
    return out
