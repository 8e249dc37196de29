"""Write new k/v rows into the paged KV cache at flat slots (-1 = skip): the plain path's cache
write on CUDA (a masked index would need a host sync, which CUDA graphs forbid)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.tiles import next_pow2
from torch_impl.kernels._lib import check, check_cache, check_device, check_index, check_rows


@triton.jit
def _store_kv_kernel(
    val_ptr,  # [T, Hkv, D]
    cache_ptr,  # [num_slots, Hkv, D] (flattened blocks)
    slot_ptr,  # [T]
    num_slots,
    stride_vt, stride_vh, stride_cs, stride_ch,
    HKV: tl.constexpr, D: tl.constexpr, HKV_P: tl.constexpr, D_P: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, HKV_P)[:, None]
    d = tl.arange(0, D_P)[None, :]
    # The slot test on the tile (slot broadcast first), not on the scalar: Triton's interpreter
    # splats a scalar comparison as the integer dtype it compared (int64 here), so `tile & ok` came
    # out int32 and tl.load refused it ("mask has unsupported dtype"). Same mask on the GPU (the
    # sm_90 PTX holds the same instructions as with the scalar test, reordered).
    slots = tl.zeros([HKV_P, D_P], dtype=tl.int64) + slot
    mask = (h < HKV) & (d < D) & (slots >= 0) & (slots < num_slots)
    v = tl.load(val_ptr + t * stride_vt + h * stride_vh + d, mask=mask, other=0.0)
    tl.store(cache_ptr + slot * stride_cs + h * stride_ch + d, v.to(cache_ptr.dtype.element_ty), mask=mask)


def store_kv(values: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[slot // bs, slot % bs] = values[t] for every t with a slot in range; returns cache."""
    op = "store_kv"
    check(values.dim() == 3, f"{op}: values has shape {list(values.shape)}, expected [T, Hkv, D]")
    t, hkv, d = values.shape
    check_cache(op, "cache", cache, hkv, d)
    check(slots.shape == (t,), f"{op}: slots has shape {list(slots.shape)}, expected [{t}]")
    check_index(op, slots=slots)
    check_device(op, values=values, cache=cache, slots=slots)
    check_rows(op, values=values)
    if t == 0 or cache.numel() == 0:
        return cache
    _store_kv_kernel[(t,)](values, cache, slots, cache.shape[0] * cache.shape[1],
                           values.stride(0), values.stride(1), cache.stride(1), cache.stride(2),
                           HKV=hkv, D=d, HKV_P=next_pow2(hkv), D_P=next_pow2(d))
    return cache
