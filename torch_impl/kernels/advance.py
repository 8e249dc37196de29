"""The decode loop's per-step state update in one launch (CUDA graphs replay it every step).

For each sequence b of a padded batch: record the token just produced at out[b, pos - first + 1]
and, for real rows (valid 1), move to the next position: pos += 1, context_len += 1,
slot = slot_base + pos. Padding rows (valid 0) stay put.
"""

from __future__ import annotations

import triton
import triton.language as tl

from common.tiles import next_pow2
from torch_impl.kernels._lib import check, check_device


@triton.jit
def _advance_kernel(tok_ptr, pos_ptr, first_ptr, valid_ptr, base_ptr, slot_ptr, ctx_ptr, out_ptr, B, stride_out,
                    BLOCK: tl.constexpr):
    b = tl.arange(0, BLOCK)
    ok = b < B
    pos = tl.load(pos_ptr + b, mask=ok, other=0)
    valid = tl.load(valid_ptr + b, mask=ok, other=0)
    step = pos - tl.load(first_ptr + b, mask=ok, other=0) + 1
    tl.store(out_ptr + b * stride_out + step, tl.load(tok_ptr + b, mask=ok, other=0), mask=ok & (valid > 0))
    pos = pos + valid
    tl.store(pos_ptr + b, pos, mask=ok)
    tl.store(slot_ptr + b, tl.load(base_ptr + b, mask=ok, other=0) + pos, mask=ok)
    ctx = tl.load(ctx_ptr + b, mask=ok, other=0)
    tl.store(ctx_ptr + b, ctx + valid.to(ctx.dtype), mask=ok)


def advance(tokens, positions, first, valid, slot_base, slots, context_lens, out) -> None:
    """In place; every argument [B] int64 except context_lens [B] int32 and out [B, steps] int64."""
    b = tokens.shape[0]
    for name, t in dict(positions=positions, first=first, valid=valid, slot_base=slot_base, slots=slots,
                        context_lens=context_lens).items():
        check(t.shape == (b,), f"advance: {name} has shape {list(t.shape)}, expected [{b}]")
    check(out.dim() == 2 and out.shape[0] == b and out.stride(1) == 1,
          f"advance: out has shape {list(out.shape)}, expected [{b}, steps] with contiguous rows")
    check_device("advance", tokens=tokens, positions=positions, out=out)
    _advance_kernel[(1,)](tokens, positions, first, valid, slot_base, slots, context_lens, out, b, out.stride(0),
                          BLOCK=next_pow2(b))
