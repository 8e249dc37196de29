"""Building torch_impl's model for a runner: the CPU thread count, construction under the default
dtype and device (as nano-vllm's runner does), and the random weights of `load_random`."""

from __future__ import annotations

import logging
import os

import torch

from torch_impl.model import Qwen3ForCausalLM
from torch_impl.parallel import SINGLE, TPGroup
from torch_impl.quant_loading import load_quantized, random_qweight, random_quantized_

log = logging.getLogger("torch_impl")


def cpu_threads() -> int:
    """Threads for the CPU path: half the cores this process may use, at least one.

    torch's default (every core) spins its OpenMP threads; with one of two cores busy with other
    work the shipped model fell from 169 to 5.8 tok/s that way, while one thread ran at 317. Half
    the cores leaves room for the rest of a shared machine. OMP_NUM_THREADS, when set, wins."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    return max(1, usable // 2)


def use_cpu_threads() -> None:
    if os.environ.get("OMP_NUM_THREADS"):
        return  # torch read it at start
    n = cpu_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
        log.info(f"torch_impl: {n} CPU thread{'s' if n > 1 else ''} (half the usable cores; OMP_NUM_THREADS "
                 f"overrides)")


def build_model(cfg, dtype: torch.dtype, device: torch.device, fused, quantization=None, *,
                tp_group: TPGroup = SINGLE, lm_head_shard: str = "vocab") -> Qwen3ForCausalLM:
    """Construct under the default dtype/device, as nano-vllm's runner does (tp_group: this rank's)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(cfg, use_fused_kernels=fused, quantization=quantization, tp_group=tp_group,
                                     lm_head_shard=lm_head_shard)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def fill_random(model: Qwen3ForCausalLM, g: torch.Generator, whole: Qwen3ForCausalLM) -> None:
    """TorchRunner.random's values, drawn at the shapes and in the order of `whole` (the model itself,
    or at tensor-parallel size > 1 a meta-device model of the full shapes): in place, or each draw
    handed to the parameter's loader, which keeps this rank's part."""
    dev = model.model.embed_tokens.weight.device
    local = dict(model.named_modules())
    for name, module in whole.named_modules():
        if getattr(module, "fmt", "bf16") == "bf16":
            continue
        if whole is model:
            random_quantized_(module, g)
        else:
            qw = random_qweight(tuple(module.weight.shape), module.fmt, g, dev)
            load_quantized(local[name], f"{name}.weight", model.shard_of(f"{name}.weight", qw))
    for name, p in whole.named_parameters():
        if not p.is_floating_point() or p.element_size() == 1 or name.endswith("_scale_inv"):
            continue  # quantized: filled above
        target = p if whole is model else torch.empty(p.shape, dtype=model.get_parameter(name).dtype, device=dev)
        if p.dim() == 2:
            target.normal_(0.0, 0.02, generator=g)
        elif "q_norm" in name or "k_norm" in name:
            target.uniform_(1.0, 30.0, generator=g)
        else:
            target.uniform_(0.5, 1.5, generator=g)
        if whole is not model:
            param = model.get_parameter(name)
            load = param.weight_loader
            getattr(load, "untied", load)(param, target)  # a tied quantized head keeps its own draw, as at size 1
