"""What the Triton launchers share (no kernel bodies here): checks, the device's properties and
the one tile lookup (common.tiles), PDL and projection meta-parameters."""

from __future__ import annotations

import functools
import os

import torch

from common import tiles as tiles_mod
from common.formats import QWeight
from common.tile_rules import capable
from torch_impl.quant_loading import storage_dtype

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _gpu(index: int) -> tiles_mod.Device:
    p = torch.cuda.get_device_properties(index)
    cc = (p.major, p.minor)
    smem = getattr(p, "shared_memory_per_block_optin", 0) or tiles_mod.smem_for(cc)
    return tiles_mod.Device(p.name, p.multi_processor_count, int(smem), cc)


def device_info(device: torch.device) -> tiles_mod.Device:
    """The properties common.tiles' default rule reads, of the GPU `device` (or of the CPU)."""
    if device.type != "cuda":
        return tiles_mod.Device.cpu()
    return _gpu(device.index if device.index is not None else torch.cuda.current_device())


def choose(kernel: str, device: torch.device, dtype: torch.dtype, fmt: str | None = None, **shape) -> tiles_mod.Choice:
    """The path and tiles of `kernel` at this shape (common.tiles.choose for the torch twin)."""
    return tiles_mod.choose(kernel, "torch", device_info(device), str(dtype).removeprefix("torch."), fmt, **shape)


def tiles_for(kernel: str, op: str, tiles, tile_type, device: torch.device, dtype: torch.dtype,
              fmt: str | None = None, **shape):
    """The tiles a launcher runs: the caller's, else the lookup's; checked to be `tile_type`."""
    return tiles_mod.launch_tiles(op, tiles, tile_type, lambda: choose(kernel, device, dtype, fmt, **shape))


def split_weight(op: str, name: str, w, dtype: torch.dtype | None = None):
    """(values, scales, scale row stride, fmt) of a weight argument: a float tensor (scales: the
    values themselves, unread), or a common.formats.QWeight: values in its format's storage, float32
    scales of its scale_shape."""
    if not isinstance(w, QWeight):
        check(isinstance(w, torch.Tensor), f"{op}: {name} is {type(w).__name__}, expected a tensor or a QWeight")
        check_float(op, dtype, **{name: w})
        return w, w, 0, None
    check(w.q.dim() == 2, f"{op}: {name} has shape {list(w.q.shape)}, expected [out_features, in_features]")
    fmt = tiles_mod.check_qweight(f"{op}: {name}", w, storage_dtype, device_info(w.q.device).capability,
                                  "Triton", "plain")
    want_scale = fmt.scale_shape(tuple(w.q.shape))
    check(tuple(w.scale.shape) == want_scale and w.scale.dtype == torch.float32 and w.scale.is_contiguous(),
          f"{op}: {name}'s scale is {w.scale.dtype} {list(w.scale.shape)}, expected contiguous float32 "
          f"{list(want_scale)} ({w.fmt})")
    check(w.scale.device == w.q.device, f"{op}: {name}'s scale is on {w.scale.device}, its values on {w.q.device}")
    return w.q, w.scale, (0 if fmt.per_row else w.scale.stride(0)), w.fmt


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_device(op: str, **tensors: torch.Tensor) -> None:
    """All tensors on one device where Triton can run: CUDA, or CPU under TRITON_INTERPRET=1."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        check(dev == first, f"{op}: {name} is on {dev}, expected {first} like the other inputs")
    if first.type == "cpu":
        check(interpreting(), f"{op}: CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before "
                              f"importing triton), or use the plain torch path")
    else:
        check(first.type == "cuda", f"{op}: tensors on {first}, expected a CUDA device (or CPU in interpreter mode)")


def check_float(op: str, dtype: torch.dtype | None = None, **tensors: torch.Tensor) -> torch.dtype:
    """Float tensors of one dtype (float32, bfloat16 or float16); returns it."""
    for name, t in tensors.items():
        check(t.dtype in FLOAT_DTYPES, f"{op}: {name}.dtype={t.dtype}, expected float32, bfloat16 or float16")
        dtype = dtype or t.dtype
        check(t.dtype == dtype, f"{op}: {name}.dtype={t.dtype}, expected {dtype} like the activations")
    return dtype


def check_index(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        check(t.dtype in INDEX_DTYPES, f"{op}: {name}.dtype={t.dtype}, expected int32 or int64")


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    check(tuple(t.shape) == tuple(shape), f"{op}: {name} has shape {list(t.shape)}, expected {list(shape)}")


def check_rows(op: str, **tensors: torch.Tensor) -> None:
    """The last dimension contiguous (row-strided 2-D access)."""
    for name, t in tensors.items():
        check(t.stride(-1) == 1 or t.shape[-1] == 1,
              f"{op}: {name} has stride {t.stride()}, expected its last dimension contiguous")


def check_cache(op: str, name: str, cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    """[num_blocks, block_size, Hkv, D] with rows of one block adjacent (flat row = block * bs + offset)."""
    check(cache.dim() == 4, f"{op}: {name} has shape {list(cache.shape)}, expected [num_blocks, block_size, "
                            f"num_kv_heads={num_kv_heads}, head_dim={head_dim}]")
    check(tuple(cache.shape[2:]) == (num_kv_heads, head_dim),
          f"{op}: {name} has shape {list(cache.shape)}, expected [num_blocks, block_size, {num_kv_heads}, {head_dim}]")
    check(cache.stride(-1) == 1 and cache.stride(0) == cache.shape[1] * cache.stride(1),
          f"{op}: {name} has strides {cache.stride()}; expected contiguous head_dim and blocks of adjacent rows")


def precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact float32 products for float32 (tests), the default otherwise;
    "upcast" in the interpreter for 16-bit inputs (see _jit.dot)."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if interpreting() else "default"


_PDL: dict = {}


_COUNTERS: dict[torch.device, torch.Tensor] = {}
MAX_COUNTERS = 1 << 16


def split_counters(op: str, device: torch.device, n: int, what: str, fix: str) -> torch.Tensor:
    """The device's arrival counters of kernels whose programs split one output's work and the last
    to arrive finishes it (decode attention's splits, the projections' split_k): int32 zeros, each
    reset by the program that finishes. One buffer per device serves every such kernel: a kernel
    touches them only after its wait for the previous kernel (PDL or stream order), so two never
    count at once on one stream."""
    check(n <= MAX_COUNTERS, f"{op}: {n} {what} need split counters, more than {MAX_COUNTERS}; {fix}")
    buf = _COUNTERS.get(device)
    if buf is None:
        buf = _COUNTERS[device] = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
    return buf


def pdl_meta(device: torch.device, early: bool = False) -> dict:
    """Programmatic dependent launch (a kernel starts while the previous one drains, waiting in-kernel
    before it reads that kernel's output) on CUDA GPUs of compute capability >= 9.0 when this Triton
    supports it; TORCH_IMPL_PDL=0 turns it off. PDL 2 (`early`: launches of one token row) lets the
    next kernel launch before this one's loads, PDL 1 after them (_jit.release_first/_after)."""
    if device.type != "cuda":
        return {"PDL": 0}
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _PDL:
        ok = os.environ.get("TORCH_IMPL_PDL", "1") != "0" and capable("pdl", torch.cuda.get_device_capability(key))
        if ok:
            import dataclasses

            from triton.backends.nvidia.compiler import CUDAOptions

            from torch_impl.kernels import _jit

            ok = _jit.gdc_wait is not None and "launch_pdl" in {f.name for f in dataclasses.fields(CUDAOptions)}
        _PDL[key] = ok
    return {"PDL": 2 if early else 1, "launch_pdl": True} if _PDL[key] else {"PDL": 0}


def matmul_meta(tiles, m: int, k: int, device: torch.device) -> dict:
    """Kernel meta-parameters of a projection from its MatmulTiles: one token row streams W with a
    multiply-and-reduce (block_m 1); more rows use tensor-core dots padded to 16 rows."""
    use_dot = tiles.block_m > 1
    check(not use_dot or tiles.block_n >= 16, f"tiles.block_n={tiles.block_n}: the tensor-core path "
                                              f"(block_m={tiles.block_m} > 1) needs block_n >= 16")
    block_m = max(16, tiles.block_m) if use_dot else 1
    block_k = min(tiles.block_k, max(16, 1 << max(0, (k - 1).bit_length())))
    # up to 32 token rows against >= 64 weight rows: W is the left operand (warpgroup MMA, pipelined
    # loads; Qwen3-0.6B / 8B batch 32 on an H100: 13,781 / 2,959 tok/s against 12,267 / 2,381 with
    # the tokens on the left)
    swap = use_dot and block_m <= 32 and tiles.block_n >= 64
    # split_k: tensor-core tiles only, at most one program per reduction chunk
    split = min(tiles.split_k, -(-k // block_k)) if use_dot else 1
    return dict(BLOCK_M=block_m, BLOCK_K=block_k, EVEN_K=k % block_k == 0, USE_DOT=use_dot, SWAP=swap,
                ONE_SHOT=not use_dot and k <= block_k, SPLIT=split,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages, **pdl_meta(device, early=not use_dot))


def split_buffers(op: str, meta: dict, m: int, rows: int, tiles_n: int, x: torch.Tensor):
    """(workspace, counters, workspace strides) of a split_k launch: float32 partial sums
    [SPLIT, m, rows] (rows: W's rows) and one counter per output tile; with SPLIT 1 placeholders
    the kernel never reads."""
    if meta["SPLIT"] == 1:
        return x, x, 0, 0
    tiles = tiles_n * -(-m // meta["BLOCK_M"])
    cnt = split_counters(op, x.device, tiles, "output tiles", "use split_k=1 or larger tiles")
    ws = torch.empty((meta["SPLIT"], m, rows), dtype=torch.float32, device=x.device)
    return ws, cnt, ws.stride(0), ws.stride(1)
