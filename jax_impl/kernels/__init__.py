"""Pallas (Triton lowering) kernels of the twin API (common.ops); see each module for its layout.

On a non-GPU default backend every op runs in Pallas interpreter mode (tests on CPU);
pass `interpret=False` to lower for CUDA anyway (the lowering tests do). Tiles and the
fused-or-plain choice come from common.tiles.lookup (jax_impl.ops asks it per shape).
"""

from jax_impl.kernels.decode_attention import decode_attention
from jax_impl.kernels.linear_residual import linear_residual
from jax_impl.kernels.mlp import mlp
from jax_impl.kernels.prefill_attention import prefill_attention
from jax_impl.kernels.rms_norm import rms_norm
from jax_impl.kernels.rmsnorm_qkv import rmsnorm_qkv

__all__ = ["rmsnorm_qkv", "mlp", "linear_residual", "decode_attention", "prefill_attention", "rms_norm"]
