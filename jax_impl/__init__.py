"""Flax NNX Qwen3 with fused Pallas (Triton lowering) kernels; `load()` returns a common Runner."""


def load(model_dir, options=None, **kwargs):
    """A runner over a Hugging Face Qwen3 checkpoint directory (jax_impl.runner.JaxRunner). options: a
    common.load_options.LoadOptions, or its fields as keywords (jax_impl takes dtype, fused, quantization,
    tensor_parallel_size, lm_head_shard, warmup, compile_cache): warmup's (batch, prompt tokens, new
    tokens) shapes compile at load, each covering the calls of its batch bucket with at most that many
    prompt and new tokens; compile_cache is jax's persistent compilation cache (jax_impl/compilation.py);
    tensor parallel splits the model over local devices (jax_impl/parallel.py)."""
    from jax_impl.runner import JaxRunner

    return JaxRunner(model_dir, options, **kwargs)


def load_random(config, options=None, *, seed: int = 0, **kwargs):
    """A runner over random weights of a preset name or Qwen3Config, made on the device (benchmarks,
    tuning: no checkpoint)."""
    from jax_impl.runner import JaxRunner

    return JaxRunner.random(config, options, seed=seed, **kwargs)


__all__ = ["load", "load_random"]
