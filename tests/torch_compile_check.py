"""Compile every torch_impl Triton kernel for an H100 (sm_90) on a machine without a GPU.

    python tests/torch_compile_check.py        (run by tests/test_torch_launchers.py in a subprocess)

The interpreter checks none of Triton's compile-time rules (power-of-two blocks, consistent types
across branches, constexpr globals, dot shapes): this runs each launcher at real preset shapes with
the launch replaced by a full `triton.compile` (Triton IR -> PTX -> cubin with the bundled ptxas)
of the kernel it would have launched, with programmatic dependent launch on as on an H100: one
token, 16-67 tokens (tensor cores, W on the left, the reduction split over programs), bf16, int8
and fp8 weights.
Prints one line per kernel, and checks that the projections do not specialize on the token count
(a new prompt length compiles nothing); exit status 1 on any failure.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from common.config import PRESETS  # noqa: E402
from common.ops import AttentionMeta  # noqa: E402
from common.tiles import AttentionTiles, MatmulTiles  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
           torch.int64: "*i64", torch.int8: "*i8", torch.float8_e4m3fn: "*fp8e4nv"}
LAUNCHES: list = []


def _record(self, *args, grid, warmup, **kwargs):
    LAUNCHES.append((self, args, kwargs))


def _signature(fn, args, kwargs):
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "launch_pdl") if k in kwargs}
    values = dict(zip(fn.arg_names, args)) | kwargs
    sig, const = {}, {}
    for param in fn.params:
        v = values[param.name]
        if param.is_constexpr:
            sig[param.name], const[param.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[param.name] = POINTER[v.dtype]
        elif isinstance(v, bool):
            sig[param.name] = "i1"
        elif isinstance(v, int):
            sig[param.name] = "i64" if abs(v) >= 2 ** 31 else "i32"
        else:
            sig[param.name] = "fp32"
    return sig, const, options


def launch_all(preset: str, m: int, dtype=torch.bfloat16) -> None:
    from torch_impl import kernels as K
    from torch_impl.kernels.store_kv import store_kv

    cfg = PRESETS[preset]
    h, i, d, hq, hkv = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_attention_heads,
                        cfg.num_key_value_heads)
    z = lambda *s: torch.empty(*s, dtype=dtype)  # noqa: E731
    i32 = lambda *s: torch.zeros(*s, dtype=torch.int32)  # noqa: E731
    x, cache = z(m, h), z(max(4, m), 256, hkv, d)
    qkv_meta = AttentionMeta(positions=i32(m).long(), slots=i32(m))
    K.rmsnorm_qkv(x, z(h), z(cfg.qkv_size, h), z(d), z(d), torch.empty(64, d), cache, cache, qkv_meta,
                  num_heads=hq, num_kv_heads=hkv, eps=1e-6)
    K.mlp(x, z(h), z(2 * i, h), z(h, i), x, eps=1e-6)
    K.mlp(x, z(h), z(2 * i, h), z(h, i), None, eps=1e-6)  # a row-parallel shard: no residual
    K.linear_residual(z(m, hq * d), z(h, hq * d), x)
    for splits in (1, 4):
        K.decode_attention(z(m, hq, d), cache, cache, AttentionMeta(context_lens=i32(m), block_tables=i32(m, 4)),
                           tiles=AttentionTiles(64, splits))
    K.decode_attention(z(m, hq, d), cache, cache, AttentionMeta(context_lens=i32(m)))  # block b is sequence b
    if m > 16:
        cu = torch.tensor([0, m], dtype=torch.int32)
        meta = AttentionMeta(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m, max_seqlen_k=m, is_prefill=True)
        K.prefill_attention(z(m, hq, d), cache, cache, meta)
        K.prefill_attention(z(m, hq, d), cache, cache, meta.replace(block_tables=i32(1, 4)))
    if m == 1:
        K.rmsnorm_qkv(x, z(h), z(cfg.qkv_size, h), z(d), z(d), torch.empty(64, d), cache, cache,
                      AttentionMeta(positions=i32(m), slots=i32(m)), num_heads=hq, num_kv_heads=hkv, eps=1e-6,
                      tiles=MatmulTiles(16, 16, 128))
    if m > 16:  # tensor-core tiles with W on the left (block_n 64) or not, the reduction split (split_k)
        for t in (MatmulTiles(32, 64, 64, num_stages=3, split_k=4), MatmulTiles(32, 16, 128, num_stages=3, split_k=2)):
            K.rmsnorm_qkv(x, z(h), z(cfg.qkv_size, h), z(d), z(d), torch.empty(64, d), cache, cache, qkv_meta,
                          num_heads=hq, num_kv_heads=hkv, eps=1e-6, tiles=t)
            K.mlp(x, z(h), z(2 * i, h), z(h, i), x, eps=1e-6, tiles=t, down_tiles=t)
    if dtype == torch.bfloat16:  # int8 and fp8 weights (scaled after the sum / dequantized as loaded)
        from common import formats
        from common.formats import QWeight
        from torch_impl.quant_loading import storage_dtype

        for fmt in formats.QUANTIZED:
            def qw(n, k):
                return QWeight(torch.zeros(n, k, dtype=storage_dtype(fmt)), torch.ones(formats.get(fmt).scale_shape((n, k))),
                               fmt)
            K.rmsnorm_qkv(x, z(h), qw(cfg.qkv_size, h), z(d), z(d), torch.empty(64, d), cache, cache, qkv_meta,
                          num_heads=hq, num_kv_heads=hkv, eps=1e-6)
            K.mlp(x, z(h), qw(2 * i, h), qw(h, i), x, eps=1e-6)
            if m > 16:
                K.linear_residual(z(m, hq * d), qw(h, hq * d), x, tiles=MatmulTiles(32, 64, 64, num_stages=3, split_k=4))
    store_kv(z(m, hkv, d), cache, i32(m))
    K.rms_norm(x, z(h), eps=1e-6)
    from torch_impl.kernels.argmax import argmax

    argmax(z(m, cfg.vocab_size))
    from torch_impl.kernels.draw import draw_top_k

    f32 = lambda *s: torch.zeros(*s, dtype=torch.float32)  # noqa: E731
    draw_top_k(f32(m, cfg.vocab_size), f32(m, 40), torch.zeros(m, 40, dtype=torch.int64), f32(m, 2), 0.95)
    if m == 1:
        from torch_impl.kernels.advance import advance

        i64 = lambda *s: torch.zeros(*s, dtype=torch.int64)  # noqa: E731
        advance(i64(4), i64(4), i64(4), i64(4), i64(4), i64(4), i32(4), i64(4, 8))


def main() -> int:
    JITFunction.run = _record
    pdl = lambda device, early=False: {"PDL": 2 if early else 1, "launch_pdl": True}  # noqa: E731 - as on an H100
    importlib.import_module("torch_impl.kernels._lib").pdl_meta = pdl
    for name in ("linear_residual", "mlp", "rmsnorm_qkv", "decode_attention", "prefill_attention", "store_kv", "rms_norm",
                 "advance", "argmax", "draw"):
        mod = importlib.import_module(f"torch_impl.kernels.{name}")
        mod.check_device = lambda *a, **k: None
        if hasattr(mod, "pdl_meta"):
            mod.pdl_meta = pdl
    cases = [("Qwen3-0.6B", 1, torch.bfloat16), ("Qwen3-8B", 16, torch.bfloat16), ("Qwen3-4B", 67, torch.bfloat16),
             ("Qwen3-0.6B", 32, torch.bfloat16), ("Qwen3-8B", 1, torch.bfloat16), ("Qwen3-0.6B", 19, torch.float32)]
    failed = 0
    seen = set()
    for preset, m, dtype in cases:
        launch_all(preset, m, dtype)
        for fn, args, kwargs in LAUNCHES:
            sig, const, options = _signature(fn, args, dict(kwargs))
            key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in const.items())),
                   tuple(sorted(options.items())))
            if key in seen:
                continue
            seen.add(key)
            what = f"{fn.__name__} {preset} M={m} {dtype}"
            try:
                triton.compile(ASTSource(fn, sig, const), target=TARGET, options=options)
                print(f"ok   {what}")
            except Exception as e:  # report every kernel, fail at the end
                failed += 1
                print(f"FAIL {what}: {type(e).__name__}: {e}")
        LAUNCHES.clear()
    # a new prompt length compiles nothing: the projections' token count is a plain runtime integer
    for mod, name in (("linear_residual", "_linear_residual_kernel"), ("mlp", "_norm_gate_up_kernel"),
                      ("rmsnorm_qkv", "_rmsnorm_qkv_kernel"), ("rmsnorm_qkv", "_qk_epilogue_kernel")):
        fn = getattr(importlib.import_module(f"torch_impl.kernels.{mod}"), name)
        if next(p for p in fn.params if p.name == "M").do_not_specialize:
            print(f"ok   {name}: the token count M is not specialized")
        else:
            failed += 1
            print(f"FAIL {name}: the token count M is specialized (a variant per prompt length class)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
