"""Qwen3ForCausalLM: a drop-in for nano-vllm's model whose decoder layers run the fused Triton ops.

Interface (as nano-vllm's `nanovllm/models/qwen3.py`):
- `Qwen3ForCausalLM(hf_config)` under torch's default dtype and device; hf_config is a
  transformers Qwen3Config (or common's Qwen3Config); `use_fused_kernels` picks the ops once
  ("auto" | True | False, see torch_impl/fused.py).
- `forward(input_ids [T], positions [T]) -> hidden states [T, hidden]` (final norm applied),
  `compute_logits(hidden)` (in prefill only each sequence's last token, from the context).
- `packed_modules_mapping` (from common.weights.NANOVLLM_PACKED) and a `weight_loader` on every
  parameter, so nano-vllm's loader fills it from the Hugging Face safetensors unchanged.
- Each layer's `self_attn.attn` has `k_cache` / `v_cache` [num_blocks, block_size, Hkv, D].
- Attention metadata comes from a context object with nano-vllm's fields (torch_impl/context.py).

Residual semantics (transformers'): the residual stream is kept in the activation dtype; each
sub-layer's projection is rounded to that dtype and then added (nano-vllm adds in float32; the
two differ in the last bit). Decoder layers take and return the residual stream itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.config import Qwen3Config
from common.weights import NANOVLLM_PACKED
from torch_impl import context as context_mod
from torch_impl import ops_plain
from torch_impl.fused import Ops, choose_ops

# common.weights' plan keys -> this model's parameter names (the standalone loader's one map).
GLOBAL_PARAMS = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
                 "lm_head": "lm_head.weight"}
LAYER_PARAMS = {"input_norm": "input_layernorm.weight", "w_qkv": "self_attn.qkv_proj.weight",
                "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
                "w_o": "self_attn.o_proj.weight", "post_norm": "post_attention_layernorm.weight",
                "w_gate_up": "mlp.gate_up_proj.weight", "w_down": "mlp.down_proj.weight"}


def as_config(config) -> Qwen3Config:
    """common's validated Qwen3Config from a transformers config (or one already)."""
    if isinstance(config, Qwen3Config):
        return config
    d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    return Qwen3Config.from_dict(d, source=f"{type(config).__name__}")


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _attach_loaders(model: nn.Module, shards: dict[str, dict]) -> None:
    """A weight_loader(param, tensor[, shard_id]) on every parameter that checks shapes by name."""
    for name, p in model.named_parameters():
        def loader(param, loaded, shard_id=None, _name=name, _shards=shards.get(name)):
            target = param.data
            if shard_id is not None:
                if _shards is None or shard_id not in _shards:
                    raise ValueError(f"{_name}: unknown shard id {shard_id!r} (expected one of "
                                     f"{sorted(_shards or {}, key=str)})")
                start, size = _shards[shard_id]
                target = target.narrow(0, start, size)
            if tuple(loaded.shape) != tuple(target.shape):
                where = f" shard {shard_id!r}" if shard_id is not None else ""
                raise ValueError(f"{_name}{where}: checkpoint tensor has shape {list(loaded.shape)}, "
                                 f"expected {list(target.shape)}")
            target.copy_(loaded)
        p.weight_loader = loader


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _param(size)

    def forward(self, x):
        return ops_plain.rms_norm(x, self.weight, self.eps)


class Linear(nn.Module):
    """Weight only ([out, in], the Hugging Face layout the kernels stream); the layer calls the ops."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = _param(out_features, in_features)


class Attention(nn.Module):
    """Holds this layer's KV cache (assigned by nano-vllm's runner or torch_impl's)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.k_cache = self.v_cache = torch.tensor([])


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = Linear(cfg.hidden_size, cfg.qkv_size)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.attn = Attention(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)

    def forward(self, ops: Ops, ctx, positions, x, norm_w, cos_sin):
        """x + o_proj(attention(rmsnorm_qkv(x))) for the tokens of `ctx`."""
        cfg, t = self.cfg, x.shape[0]
        kc, vc, slots = self.attn.k_cache, self.attn.v_cache, ctx.slot_mapping
        cached = kc.numel() > 0 and slots is not None
        if not cached:  # no cache (nano-vllm's warm-up, or a cache-free forward): this step's keys only
            if not ctx.is_prefill or ctx.block_tables is not None:
                raise RuntimeError("decode (or prefill over a cached prefix) needs the KV cache: k_cache is "
                                   "empty or the context has no slot_mapping")
            kc = x.new_empty(t, 1, cfg.num_key_value_heads, cfg.head_dim)
            vc = torch.empty_like(kc)
            slots = torch.arange(t, dtype=torch.int32, device=x.device)
        q, kc, vc = ops.rmsnorm_qkv(x, norm_w, self.qkv_proj.weight, self.q_norm.weight, self.k_norm.weight,
                                    cos_sin, positions, slots, kc, vc, num_heads=cfg.num_attention_heads,
                                    num_kv_heads=cfg.num_key_value_heads, eps=cfg.rms_norm_eps)
        if not ctx.is_prefill:
            o = ops.decode_attention(q, kc, vc, ctx.block_tables, ctx.context_lens)
        else:
            layout = {}
            if not cached:
                kc, vc = kc.view(t, *kc.shape[2:]), vc.view(t, *vc.shape[2:])
            elif ctx.block_tables is not None:
                layout = dict(block_tables=ctx.block_tables)
            else:
                layout = dict(kv_slots=slots)
            o = ops.prefill_attention(q, kc, vc, ctx.cu_seqlens_q, ctx.cu_seqlens_k,
                                      max_seqlen_q=int(ctx.max_seqlen_q), **layout)
        return ops.attn_out(o.view(t, cfg.q_size), self.o_proj.weight, x)


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)


class OptimizedQwen3DecoderLayer(nn.Module):
    """x -> x + Attn(RMSNorm(x)) -> + MLP(RMSNorm(.)): four op calls, each fused or plain per `ops`."""

    def __init__(self, cfg: Qwen3Config, ops: Ops):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen3MLP(cfg)

    def forward(self, ctx, positions: torch.Tensor, x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(self.ops, ctx, positions, x, self.input_layernorm.weight, cos_sin)
        return self.ops.mlp(x, self.post_attention_layernorm.weight, self.mlp.gate_up_proj.weight,
                            self.mlp.down_proj.weight, eps=self.cfg.rms_norm_eps)


class Embedding(nn.Module):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = _param(num, dim)

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class LMHead(Embedding):
    def forward(self, h):
        return F.linear(h, self.weight)


class Qwen3Model(nn.Module):
    def __init__(self, cfg: Qwen3Config, ops: Ops):
        super().__init__()
        self.ops = ops
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([OptimizedQwen3DecoderLayer(cfg, ops) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # float32 [max_positions, head_dim]: cos | sin, shared by every layer
        self.register_buffer("cos_sin", ops_plain.rope_table(cfg.max_position_embeddings, cfg.head_dim,
                                                             cfg.rope_theta, device=torch.empty(0).device),
                             persistent=False)

    def forward(self, ctx, input_ids, positions):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(ctx, positions, x, self.cos_sin)
        return self.ops.rms_norm(x, self.norm.weight, eps=self.norm.eps)


class Qwen3ForCausalLM(nn.Module):
    packed_modules_mapping = dict(NANOVLLM_PACKED)

    def __init__(self, config, use_fused_kernels="auto"):
        super().__init__()
        cfg = self.config = as_config(config)
        self.ops = choose_ops(use_fused_kernels, torch.empty(0).device)
        self.model = Qwen3Model(cfg, self.ops)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight.data = self.model.embed_tokens.weight.data
        self.context_source = None  # None: torch_impl.context.get_context (nano-vllm's once installed)
        q, kv = cfg.q_size, cfg.kv_size
        shards = {f"model.layers.{i}.self_attn.qkv_proj.weight": {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}
                  for i in range(cfg.num_hidden_layers)}
        shards.update({f"model.layers.{i}.mlp.gate_up_proj.weight": {0: (0, cfg.intermediate_size),
                                                                      1: (cfg.intermediate_size, cfg.intermediate_size)}
                       for i in range(cfg.num_hidden_layers)})
        _attach_loaders(self, shards)

    def context(self):
        return self.context_source() if self.context_source is not None else context_mod.get_context()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(self.context(), input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ctx = self.context()
        if ctx.is_prefill:
            hidden_states = hidden_states[(ctx.cu_seqlens_q[1:] - 1).long()]
        return self.lm_head(hidden_states)

    def load_params(self, items) -> None:
        """Fill from common.weights.Checkpoint.iter_params items: (layer or None, plan key, tensor)."""
        for layer, key, tensor in items:
            if layer is None:
                name = GLOBAL_PARAMS[key]
            else:
                name = f"model.layers.{layer}.{LAYER_PARAMS[key]}"
            param = self.get_parameter(name)
            param.weight_loader(param, tensor)
