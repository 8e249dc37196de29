"""Flax NNX Qwen3 with fused Pallas (Triton lowering) kernels; `load()` returns a common Runner."""


def load(model_dir, *, dtype: str = "bfloat16", fused="auto"):
    """Load a Hugging Face Qwen3 checkpoint directory: see jax_impl.runner.JaxRunner."""
    from jax_impl.runner import load as _load

    return _load(model_dir, dtype=dtype, fused=fused)


__all__ = ["load"]
