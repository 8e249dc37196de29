"""Flax NNX Qwen3 with fused Pallas (Triton lowering) kernels; `load()` returns a common Runner."""


def load(model_dir, options=None, **kwargs):
    """Load a Hugging Face Qwen3 checkpoint directory: see jax_impl.runner.load (options: a
    common.load_options.LoadOptions, or its fields as keywords: dtype, fused, quantization,
    tensor_parallel_size, lm_head_shard, warmup, compile_cache)."""
    from jax_impl.runner import load as _load

    return _load(model_dir, options, **kwargs)


def load_random(config, options=None, *, seed: int = 0, **kwargs):
    """Random weights of a preset name or Qwen3Config, made on the device: see jax_impl.runner."""
    from jax_impl.runner import load_random as _load_random

    return _load_random(config, options, seed=seed, **kwargs)


__all__ = ["load", "load_random"]
