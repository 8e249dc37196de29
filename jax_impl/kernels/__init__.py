"""Pallas (Triton lowering) kernels of the twin kernel API; see each module for its layout.

On a non-GPU default backend every op runs in Pallas interpreter mode (tests on CPU);
pass `interpret=False` to lower for CUDA anyway (the lowering tests do).
"""

from jax_impl.kernels.attn_out import attn_out
from jax_impl.kernels.decode_attention import decode_attention
from jax_impl.kernels.mlp import mlp
from jax_impl.kernels.prefill_attention import prefill_attention
from jax_impl.kernels.rmsnorm_qkv import rmsnorm_qkv

__all__ = ["rmsnorm_qkv", "mlp", "attn_out", "decode_attention", "prefill_attention", "prefer_fused"]


def prefer_fused(op: str, tokens: int, hidden_size: int) -> bool:
    """Whether the Pallas kernel of `op` measured faster than plain XLA for `tokens` rows.

    Kernel device time on an H100 (jax 0.11.2, bf16), Pallas vs the plain path's XLA ops
    (`python -m bench kernels`, commit 6de49a9; docs/MEASUREMENTS.md):
    - decode_attention: faster at every batch (1-128 sequences, 1,024 positions: 1.25-1.38x).
    - prefill_attention: 2.1x / 6.0x at 512 / 4,096 prompt tokens on 0.6B shapes, 3.3x / 6.5x on 8B.
    - one token: rmsnorm_qkv 1.49x (0.6B) / 1.19x (8B), mlp 1.31x / 1.00x (96% of the copy
      bandwidth at 8B), attn_out 1.21x / 1.05x.
    - 8-128 tokens and prefill, both sizes: mlp 0.36-0.66x, attn_out 0.37-0.95x; rmsnorm_qkv
      0.34-0.62x at 8B, at 0.6B 0.99x at 8 and 32 tokens, 1.12-1.16x at 128 and 512 (1.6-1.8x at
      2-16 tokens in bench/jax_kernels_probe.py against XLA's GEMV form): plain XLA, except
      rmsnorm_qkv up to 16 tokens below hidden 4096.
    Presets other than 0.6B and 8B follow by hidden size (not measured).
    """
    if op in ("decode_attention", "prefill_attention"):
        return True
    if op not in ("rmsnorm_qkv", "mlp", "attn_out"):
        raise ValueError(f"prefer_fused: unknown op {op!r}")
    if tokens == 1:
        return True
    return op == "rmsnorm_qkv" and tokens <= 16 and hidden_size < 4096
