"""Flax NNX Qwen3 with fused Pallas (Triton lowering) kernels; `load()` returns a common Runner."""


def load(model_dir, *, dtype: str = "bfloat16", fused="auto", **kwargs):
    """Load a Hugging Face Qwen3 checkpoint directory: see jax_impl.runner.load (kwargs: warmup,
    compile_cache, quantization, tensor_parallel_size, lm_head_shard)."""
    from jax_impl.runner import load as _load

    return _load(model_dir, dtype=dtype, fused=fused, **kwargs)


def load_random(config, *, dtype: str = "bfloat16", fused="auto", seed: int = 0, **kwargs):
    """Random weights of a preset name or Qwen3Config, made on the device: see jax_impl.runner."""
    from jax_impl.runner import load_random as _load_random

    return _load_random(config, dtype=dtype, fused=fused, seed=seed, **kwargs)


__all__ = ["load", "load_random"]
