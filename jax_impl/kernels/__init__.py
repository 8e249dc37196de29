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

    Kernel device time on an H100 (jax 0.11.2, bf16, bench/jax_kernels_probe.py), Pallas vs XLA:
    - decode_attention: faster at every batch measured (1, 4, 16 sequences; 1.6-7.9x).
    - prefill_attention (`python -m bench kernels`, one prompt, commit 16ca7f8): 1.85x / 6.0x at
      512 / 4096 tokens on 0.6B shapes, 3.1x / 6.5x on 8B shapes (20.5 vs 37.9 us ... 597 vs
      3,857 us).
    - one token: rmsnorm_qkv 2.0x (0.6B) and 1.5x (8B), attn_out 1.1x / 1.2x, mlp 1.2x / 1.1x.
    - 2-16 tokens: rmsnorm_qkv 1.6-1.8x at 0.6B, 0.91-0.95x at 8B; attn_out 0.86-1.04x;
      mlp 0.64-1.0x: plain XLA there.
    - prefill-sized inputs (> 16 tokens): not measured: plain XLA.
    Presets other than 0.6B and 8B follow by hidden size (not measured).
    The XLA side of these figures is XLA's GEMV; the plain path's one-token projections are now
    multiply-and-reduce (faster), and end to end this table still beats it at batch 1 (8B 176.0 vs
    170.4 tok/s, 0.6B 1,113 vs 845); per op it has not been re-measured against that form.
    """
    if op in ("decode_attention", "prefill_attention"):
        return True
    if op not in ("rmsnorm_qkv", "mlp", "attn_out"):
        raise ValueError(f"prefer_fused: unknown op {op!r}")
    if tokens == 1:
        return True
    return op == "rmsnorm_qkv" and tokens <= 16 and hidden_size < 4096
