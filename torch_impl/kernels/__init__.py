"""Triton twins of jax_impl/kernels (same file names, public names and argument order: common.ops).

Each file holds the kernel body, a launcher that checks shapes/strides/dtypes and picks the
grid and tiles (common.tiles.lookup), and the public op. On CPU they run in Triton's interpreter
(TRITON_INTERPRET=1 set before triton is imported), on CPU tensors.
"""

from torch_impl.kernels.decode_attention import decode_attention
from torch_impl.kernels.linear_residual import linear_residual
from torch_impl.kernels.mlp import mlp
from torch_impl.kernels.prefill_attention import prefill_attention
from torch_impl.kernels.rms_norm import rms_norm
from torch_impl.kernels.rmsnorm_qkv import rmsnorm_qkv

__all__ = ["rmsnorm_qkv", "mlp", "linear_residual", "decode_attention", "prefill_attention", "rms_norm"]
