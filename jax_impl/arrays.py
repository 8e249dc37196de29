"""What jax_impl's plain path and kernels share: the precision rule of products, and common's
AttentionMeta as a pytree (its arrays are leaves, its sizes static), so it crosses jit boundaries."""

import jax
import jax.numpy as jnp

from common.ops import AttentionMeta

jax.tree_util.register_dataclass(AttentionMeta, data_fields=list(AttentionMeta.ARRAYS),
                                 meta_fields=list(AttentionMeta.STATIC))


def precision_for(dtype):
    """Full float32 products for float32 operands: XLA on GPUs (and the Triton lowering) default to
    TF32 for them (a float32 model would drift ~1e-3 from transformers'); bf16 operands use the
    tensor cores as they are."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
