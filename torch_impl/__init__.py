"""Qwen3 in torch with fused Triton kernels: a nano-vllm drop-in model and a standalone Runner.

    torch_impl.load(model_dir, dtype="bfloat16", fused="auto", ...) -> Runner (common.harness, common.load_options)
    torch_impl.load(model_dir, tensor_parallel_size=2)    one process per GPU (torch_impl/workers.py)
    torch_impl.model.Qwen3ForCausalLM(hf_config)                      (nano-vllm's interface)
    torch_impl.nanovllm.install()        makes nano-vllm's engine build this model

nano-vllm is never imported unless `install()` is called.
"""


def load(model_dir, options=None, **kwargs):
    """Load a Hugging Face Qwen3 checkpoint directory: see torch_impl.runner.TorchRunner (options: a
    common.load_options.LoadOptions, or its fields as keywords: dtype, fused, quantization,
    tensor_parallel_size, lm_head_shard, warmup, compile_cache, device, block_size, max_cache_tokens,
    cuda_graphs)."""
    from torch_impl.runner import load as _load

    return _load(model_dir, options, **kwargs)


def load_random(config, options=None, *, seed: int = 0, **kwargs):
    """Random weights of a preset name or Qwen3Config, made on the device: see torch_impl.runner."""
    from torch_impl.runner import load_random as _load_random

    return _load_random(config, options, seed=seed, **kwargs)


__all__ = ["load", "load_random"]
