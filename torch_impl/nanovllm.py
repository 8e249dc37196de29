"""One call to run nano-vllm's engine on torch_impl's Qwen3 model.

    import torch_impl.nanovllm
    torch_impl.nanovllm.install()            # before nanovllm.LLM(...) is built
    from nanovllm import LLM, SamplingParams
    llm = LLM("/path/to/Qwen3-0.6B")         # nano-vllm's loader, scheduler, CUDA graphs, sampler

After `install()`, nano-vllm's model runner constructs `torch_impl.model.Qwen3ForCausalLM`
(with `use_fused_kernels` as given) instead of its own model; that model reads nano-vllm's
attention context (`nanovllm.utils.context`), loads through nano-vllm's `load_model`
(packed_modules_mapping + weight_loader) and receives nano-vllm's KV cache in its attention
modules' k_cache / v_cache. Attention runs in this project's Triton kernels, so flash-attn is
not needed: when it is not installed, `install()` registers a placeholder `flash_attn` module
while it imports nano-vllm (whose own attention layer, never called, imports it) and removes it
again, so that other libraries (transformers) still see no flash_attn.
nano-vllm supports tensor parallelism; this model runs with tensor_parallel_size=1.
`uninstall()` restores nano-vllm's model.
"""

from __future__ import annotations

import importlib
import sys
import types

from torch_impl import context as ctx_mod
from torch_impl.model import Qwen3ForCausalLM
from torch_impl.quant_loading import weight_format_of

_SAVED: dict = {}


def _flash_attn_placeholder() -> bool:
    """Register the placeholder when flash_attn is not importable; True when it did."""
    try:
        importlib.import_module("flash_attn")
        return False
    except ImportError:
        mod = types.ModuleType("flash_attn")

        def _unavailable(*args, **kwargs):
            raise RuntimeError("flash_attn is not installed: torch_impl.nanovllm.install() replaced nano-vllm's "
                               "model with one whose attention needs no flash-attn; nano-vllm's own attention "
                               "layer cannot run here")

        mod.flash_attn_varlen_func = mod.flash_attn_with_kvcache = _unavailable
        mod.__torch_impl_placeholder__ = True
        sys.modules["flash_attn"] = mod
        return True


def install(*, use_fused_kernels="auto", quantization=None) -> type:
    """Make nano-vllm build torch_impl's Qwen3ForCausalLM; returns the class it will build.
    quantization: None, "int8" or "fp8" (the projections quantized as nano-vllm's loader hands them
    over); an FP8 checkpoint's config makes "fp8" by itself and its blocks load as stored."""
    weight_format_of(None, quantization)  # a bad value fails here, not inside nano-vllm
    placeholder = _flash_attn_placeholder()  # before any nanovllm import: its package imports the attention layer
    try:
        nctx = importlib.import_module("nanovllm.utils.context")
        models = importlib.import_module("nanovllm.models.qwen3")
        runner = importlib.import_module("nanovllm.engine.model_runner")
    except ImportError as e:
        raise ImportError(f"torch_impl.nanovllm.install(): nano-vllm is not importable ({e}); install it "
                          f"from https://github.com/GeeeekExplorer/nano-vllm") from None
    finally:
        if placeholder:  # nano-vllm has bound its names; others (transformers) must see no flash_attn
            sys.modules.pop("flash_attn", None)

    class NanoVllmQwen3ForCausalLM(Qwen3ForCausalLM):
        """torch_impl's model with nano-vllm's constructor signature `(hf_config)`."""

        def __init__(self, hf_config):
            super().__init__(hf_config, use_fused_kernels=use_fused_kernels, quantization=quantization)

    _SAVED.setdefault("models", models.Qwen3ForCausalLM)
    _SAVED.setdefault("runner", runner.Qwen3ForCausalLM)
    models.Qwen3ForCausalLM = runner.Qwen3ForCausalLM = NanoVllmQwen3ForCausalLM
    ctx_mod.set_provider(nctx.get_context)
    return NanoVllmQwen3ForCausalLM


def uninstall() -> None:
    """Give nano-vllm its own model back and the model its own context."""
    if "models" in _SAVED:
        importlib.import_module("nanovllm.models.qwen3").Qwen3ForCausalLM = _SAVED.pop("models")
        importlib.import_module("nanovllm.engine.model_runner").Qwen3ForCausalLM = _SAVED.pop("runner")
    ctx_mod.set_provider(None)
