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

Tensor parallelism: `LLM(path, tensor_parallel_size=N)` runs this model on N GPUs as nano-vllm runs
its own. nano-vllm spawns ranks 1..N-1 with its engine's ModelRunner as their target; install()
replaces that target with one whose unpickling in the new process runs install() there first (the
rank imports nano-vllm afresh), so every rank builds this model. Each builds it after nano-vllm's
process group is up, reading rank and size from torch.distributed as nano-vllm's layers do:
column-parallel QKV (whole kv-head groups) and gate/up, row-parallel o_proj and down (one
all-reduce each, the residual added once), the embedding and lm_head split by vocabulary
(compute_logits gathers the full logits on every rank; nano-vllm samples on rank 0), the KV cache
of num_key_value_heads // N heads that nano-vllm allocates. Its loader hands every weight_loader the
whole checkpoint tensor: each keeps its rank's part (common.sharding), quantized formats included.
`uninstall()` restores nano-vllm's model and engine.
"""

from __future__ import annotations

import importlib
import sys
import types

from common.load_options import LoadOptions
from torch_impl import context as ctx_mod
from torch_impl.model import Qwen3ForCausalLM

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
    quantization: None or a quantized format of common.formats (the projections quantized as
    nano-vllm's loader hands them over); a quantized checkpoint's config makes its format by itself
    and its values and scales load as stored."""
    LoadOptions.of("torch", fused=use_fused_kernels, quantization=quantization)  # bad values fail here, not in nano-vllm
    placeholder = _flash_attn_placeholder()  # before any nanovllm import: its package imports the attention layer
    try:
        nctx = importlib.import_module("nanovllm.utils.context")
        models = importlib.import_module("nanovllm.models.qwen3")
        runner = importlib.import_module("nanovllm.engine.model_runner")
        engine = importlib.import_module("nanovllm.engine.llm_engine")
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
    _SAVED.setdefault("engine", engine.ModelRunner)
    models.Qwen3ForCausalLM = runner.Qwen3ForCausalLM = NanoVllmQwen3ForCausalLM
    engine.ModelRunner = RankRunner(dict(use_fused_kernels=use_fused_kernels, quantization=quantization))
    ctx_mod.set_provider(nctx.get_context)
    return NanoVllmQwen3ForCausalLM


class RankRunner:
    """nano-vllm's ModelRunner as its engine calls it - `(config, rank, event)`, rank 0 in the engine's
    process and the target of each spawned rank - with this model. Pickled into a spawned rank, it is
    rebuilt by `_rank_runner`, which runs install() there before the rest of the process arguments
    (nano-vllm's Config, whose import loads nano-vllm) are unpickled."""

    def __init__(self, options: dict):
        self.options = options

    def __reduce__(self):
        return _rank_runner, (self.options,)

    def __call__(self, config, rank: int, event):
        return importlib.import_module("nanovllm.engine.model_runner").ModelRunner(config, rank, event)


def _rank_runner(options: dict) -> RankRunner:
    install(**options)
    return RankRunner(options)


def uninstall() -> None:
    """Give nano-vllm its own model and engine back and the model its own context."""
    if "models" in _SAVED:
        importlib.import_module("nanovllm.models.qwen3").Qwen3ForCausalLM = _SAVED.pop("models")
        importlib.import_module("nanovllm.engine.model_runner").Qwen3ForCausalLM = _SAVED.pop("runner")
        importlib.import_module("nanovllm.engine.llm_engine").ModelRunner = _SAVED.pop("engine")
    ctx_mod.set_provider(None)
