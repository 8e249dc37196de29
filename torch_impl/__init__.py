"""Qwen3 in torch with fused Triton kernels: a nano-vllm drop-in model and a standalone Runner.

    torch_impl.load(model_dir, dtype="bfloat16", fused="auto", ...) -> Runner (common.harness, common.load_options)
    torch_impl.load(model_dir, tensor_parallel_size=2)    one process per GPU (torch_impl/workers.py)
    torch_impl.model.Qwen3ForCausalLM(hf_config)                      (nano-vllm's interface)
    torch_impl.nanovllm.install()        makes nano-vllm's engine build this model

nano-vllm is never imported unless `install()` is called.
"""


def load(model_dir, options=None, **kwargs):
    """A runner over a Hugging Face Qwen3 checkpoint directory (torch_impl.runner.TorchRunner). options:
    a common.load_options.LoadOptions, or its fields as keywords (torch_impl takes all of them: dtype,
    fused, quantization, tensor_parallel_size, lm_head_shard, warmup, compile_cache, device, block_size,
    max_cache_tokens, cuda_graphs)."""
    from torch_impl.runner import TorchRunner

    return TorchRunner(model_dir, options, **kwargs)


def load_random(config, options=None, *, seed: int = 0, **kwargs):
    """A runner over random weights of a preset name or Qwen3Config, made on the device (benchmarks,
    tuning: no checkpoint)."""
    from torch_impl.runner import TorchRunner

    return TorchRunner.random(config, options, seed=seed, **kwargs)


__all__ = ["load", "load_random"]
