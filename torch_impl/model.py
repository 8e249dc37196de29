"""Qwen3ForCausalLM: a drop-in for nano-vllm's model whose decoder layers run the fused Triton ops.

Interface (as nano-vllm's `nanovllm/models/qwen3.py`):
- `Qwen3ForCausalLM(hf_config)` under torch's default dtype and device; hf_config is a
  transformers Qwen3Config (or common's Qwen3Config); `use_fused_kernels` picks the ops once
  ("auto" | True | False: common.fused decides, torch_impl/ops.py applies).
- `forward(input_ids [T], positions [T]) -> hidden states [T, hidden]` (final norm applied),
  `compute_logits(hidden)` (in prefill only each sequence's last token, from the context).
- `packed_modules_mapping` (from common.weights.NANOVLLM_PACKED) and a `weight_loader` on every
  parameter, so nano-vllm's loader fills it from the Hugging Face safetensors unchanged.
- Each layer's `self_attn.attn` has `k_cache` / `v_cache` [num_blocks, block_size, Hkv, D].
- Attention metadata comes from a context object with nano-vllm's fields (torch_impl/context.py).

Residual semantics (transformers'): the residual stream is kept in the activation dtype; each
sub-layer's projection is rounded to that dtype and then added (nano-vllm adds in float32; the
two differ in the last bit). Decoder layers take and return the residual stream itself.

Tensor parallelism (`tp_group`, torch_impl/parallel.py; default: torch.distributed's default group once
initialized, as nano-vllm's layers read it): each rank is built with the shapes of
common.sharding.shard_config - its kv-head groups of the QKV projection and the KV cache, its slice
of gate/up (column-parallel) and the matching input columns of o_proj and down (row-parallel);
the row-parallel projections run with residual None, are all-reduced, and the residual is added
once after the sum (so the partial products are rounded to the activation dtype before the sum).
The embedding and lm_head hold a vocabulary slice (`lm_head_shard="vocab"`, nano-vllm's layout) or
the whole table ("replicated"). Every weight_loader takes this rank's part of the whole checkpoint tensor it is
handed (common.sharding). At size 1 the group's hooks are the single-GPU code itself.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import Qwen3Config
from common.ops import Ops
from common import formats
from common.formats import QuantError, QWeight, head_format
from common.sharding import (check_lm_head_shard, check_tensor_parallel, shard_config, take_shard, take_source_shard,
                             vocab_shard)
from common.weights import NANOVLLM_PACKED, PLAN, module_name, source_rows
from torch_impl import context as context_mod
from torch_impl import plain
from torch_impl.ops import check_weight_format, choose_ops
from torch_impl.parallel import SINGLE, TPGroup, from_dist
from torch_impl.quant_loading import (attach_quant_loaders, load_quantized, storage_dtype, tie_quantized_head,
                                      weight_format_of)


def as_config(config) -> Qwen3Config:
    """common's validated Qwen3Config from a transformers config (or one already)."""
    if isinstance(config, Qwen3Config):
        return config
    d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    return Qwen3Config.from_dict(d, source=f"{type(config).__name__}")


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _concat(parts):
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)


def _attach_loaders(model: nn.Module, shards: dict[str, dict], cut) -> None:
    """A weight_loader(param, tensor[, shard_id]) on every parameter: `cut(name, tensor, shard_id)` keeps
    this rank's part of the whole checkpoint tensor, then shapes are checked by name."""
    for name, p in model.named_parameters():
        def loader(param, loaded, shard_id=None, _name=name, _shards=shards.get(name)):
            target = param.data
            if shard_id is not None:
                if _shards is None or shard_id not in _shards:
                    raise ValueError(f"{_name}: unknown shard id {shard_id!r} (expected one of "
                                     f"{sorted(_shards or {}, key=str)})")
                start, size = _shards[shard_id]
                target = target.narrow(0, start, size)
            loaded = cut(_name, loaded, shard_id)
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
        return plain.rms_norm(x, self.weight, eps=self.eps)


class Linear(nn.Module):
    """Weight only ([out, in], the Hugging Face layout the kernels stream); the layer calls the ops.

    fmt a quantized format (common.formats): `weight` holds the values in its storage and
    `weight_scale_inv` the float32 multipliers of its scale_shape (as Qwen's quantized checkpoints
    name and store them, so nano-vllm's loader fills both from such a checkpoint)."""

    def __init__(self, in_features: int, out_features: int, fmt: str = "bf16"):
        super().__init__()
        self.fmt = fmt
        if fmt == "bf16":
            self.weight = _param(out_features, in_features)
            return
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=storage_dtype(fmt)),
                                   requires_grad=False)
        scale = formats.get(fmt).scale_shape((out_features, in_features))
        self.weight_scale_inv = nn.Parameter(torch.empty(*scale, dtype=torch.float32), requires_grad=False)

    @property
    def w(self):
        """What the ops take: the weight, or a common.formats.QWeight of the values and their scales."""
        return self.weight if self.fmt == "bf16" else QWeight(self.weight, self.weight_scale_inv, self.fmt)


class Attention(nn.Module):
    """Holds this layer's KV cache (assigned by nano-vllm's runner or torch_impl's)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.k_cache = self.v_cache = torch.tensor([])


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config, fmt: str = "bf16", tp: TPGroup = SINGLE):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.qkv_proj = Linear(cfg.hidden_size, cfg.qkv_size, fmt)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, fmt)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.attn = Attention(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)

    def forward(self, ops: Ops, meta, x, norm_w, cos_sin, scratch=None):
        """x + o_proj(attention(rmsnorm_qkv(x))) for the tokens of `meta` (common.ops.AttentionMeta);
        `scratch`: the (k, v) caches of a cache-free forward, else this layer's own."""
        cfg, t = self.cfg, x.shape[0]
        kc, vc = scratch if scratch is not None else (self.attn.k_cache, self.attn.v_cache)
        q, kc, vc = ops.rmsnorm_qkv(x, norm_w, self.qkv_proj.w, self.q_norm.weight, self.k_norm.weight,
                                    cos_sin, kc, vc, meta, num_heads=cfg.num_attention_heads,
                                    num_kv_heads=cfg.num_key_value_heads, eps=cfg.rms_norm_eps)
        attend = ops.prefill_attention if meta.is_prefill else ops.decode_attention
        o = attend(q, kc, vc, meta)
        return self.tp.row_parallel(ops.linear_residual, o.view(t, cfg.q_size), self.o_proj.w, residual=x)


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config, fmt: str = "bf16"):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, fmt)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, fmt)


class OptimizedQwen3DecoderLayer(nn.Module):
    """x -> x + Attn(RMSNorm(x)) -> + MLP(RMSNorm(.)): four op calls, each fused or plain per `ops`."""

    def __init__(self, cfg: Qwen3Config, ops: Ops, fmt: str = "bf16", tp: TPGroup = SINGLE):
        super().__init__()
        self.cfg, self.ops, self.tp = cfg, ops, tp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg, fmt, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen3MLP(cfg, fmt)

    def forward(self, meta, x: torch.Tensor, cos_sin: torch.Tensor, scratch=None) -> torch.Tensor:
        x = self.self_attn(self.ops, meta, x, self.input_layernorm.weight, cos_sin, scratch)
        return self.tp.row_parallel(self.ops.mlp, x, self.post_attention_layernorm.weight, self.mlp.gate_up_proj.w,
                                    self.mlp.down_proj.w, residual=x, eps=self.cfg.rms_norm_eps)


class Embedding(nn.Module):
    """The token table: all `num` rows, or under a TPGroup of size N this rank's vocabulary slice
    (common.sharding.vocab_shard): ids outside it give zeros, and the ranks' rows are summed."""

    def __init__(self, num: int, dim: int, tp: TPGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.first, rows, self.per = vocab_shard(num, tp.size, tp.rank)
        self.weight = _param(rows, dim)

    def forward(self, ids):
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.first) & (ids < self.first + self.weight.shape[0])
        y = F.embedding(torch.where(mine, ids - self.first, 0), self.weight)
        return self.tp.all_reduce(y.masked_fill_(~mine[:, None], 0))


class LMHead(Linear):
    """[vocab, hidden]: bf16 through torch's matmul, a quantized head (common.formats.head_format)
    through the ops' linear kernel with no residual (the weight streamed in its storage)."""

    def __init__(self, num: int, dim: int, fmt: str = "bf16", ops: Ops | None = None, tp: TPGroup = SINGLE):
        first, rows, per = vocab_shard(num, tp.size, tp.rank)  # under tp: this rank's vocabulary slice
        super().__init__(dim, rows, fmt)
        self.ops, self.tp, self.vocab_size, self.first, self.per = ops, tp, num, first, per

    @property
    def fused(self) -> bool:
        """The fused ops are on: the step's argmax and sampling draw run torch_impl's kernels on a GPU."""
        return self.ops is not None and self.ops.any_fused

    def project(self, h):
        """This rank's logits [T, rows] (all of them at tensor-parallel size 1)."""
        return F.linear(h, self.weight) if self.fmt == "bf16" else self.ops.linear_residual(h, self.w, None)

    def forward(self, h):
        """The logits [T, vocab] (under tp: gathered, on every rank)."""
        return self.tp.gather_vocab(self.project(h), self.per, self.vocab_size)

    def greedy(self, h, out: torch.Tensor) -> torch.Tensor:
        """The greedy tokens [T] into `out` (under tp: without gathering the logits); with the fused
        ops on a GPU the argmax is torch_impl.kernels.argmax (one launch of many programs per step)."""
        fn = None
        if h.is_cuda and self.fused:
            from torch_impl.kernels.argmax import argmax  # noqa: PLC0415 - triton only with the fused ops

            fn = argmax
        return self.tp.argmax_vocab(self.project(h), self.first, out, fn)


# The one-launch layer's waits give up after this many reads of a counter (seconds, where a program
# of the grid never runs) and flag the error, which the runner raises on: never a hang.
LAYER_MAX_SPIN = 1 << 24


class Qwen3Model(nn.Module):
    """cfg: this rank's shapes (common.sharding.shard_config); vocab_tp: the embedding's group."""

    def __init__(self, cfg: Qwen3Config, ops: Ops, fmt: str = "bf16", tp: TPGroup = SINGLE,
                 vocab_tp: TPGroup = SINGLE):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, vocab_tp)
        self.layers = nn.ModuleList([OptimizedQwen3DecoderLayer(cfg, ops, fmt, tp)
                                     for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layer_state = None  # the one-launch layer's counters (torch_impl/kernels/decode_layer.py), at first use
        self.decode_path = "per-op"  # what the last decode step ran: "per-op" or "one launch per layer"
        # float32 [max_positions, head_dim]: cos | sin, shared by every layer
        self.register_buffer("cos_sin", plain.rope_table(cfg.max_position_embeddings, cfg.head_dim,
                                                             cfg.rope_theta, device=torch.empty(0).device),
                             persistent=False)

    def forward(self, ctx, input_ids, positions):
        x = self.embed_tokens(input_ids)
        cache = self.layers[0].self_attn.attn.k_cache
        scratch = None
        if cache.numel() > 0 and ctx.slot_mapping is not None:
            meta = context_mod.attention_meta(ctx, positions, cache.shape[1])
        else:  # no cache (nano-vllm's warm-up, a logits-only forward): this step's keys only
            meta, rows = context_mod.cache_free_meta(ctx, positions)
            blocks = meta.cu_seqlens_q.shape[0] - 1
            kc = x.new_empty(blocks, rows, self.cfg.num_key_value_heads, self.cfg.head_dim)
            scratch = (kc, torch.empty_like(kc))
        tiles = self._layer_kernel(meta, x, scratch)
        if tiles is not None:
            from torch_impl.kernels.decode_layer import LayerState, decode_layer  # noqa: PLC0415 - triton

            if self.layer_state is None:
                self.layer_state = LayerState.new(x.device)
            for layer in self.layers:
                x = decode_layer(x, layer, layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache, self.cos_sin,
                                 meta.positions, meta.slots, meta.context_lens, meta.block_tables,
                                 self.layer_state, eps=self.cfg.rms_norm_eps, tiles=tiles, max_spin=LAYER_MAX_SPIN)
        else:
            for layer in self.layers:
                x = layer(meta, x, self.cos_sin, scratch)
        return self.ops.rms_norm(x, self.norm.weight, eps=self.norm.eps)

    def check_layer_state(self) -> None:
        """Raise (RuntimeError) if a one-launch layer's wait gave up since the state was made: its
        output is wrong (a host sync; the runner calls it with each chunk's tokens)."""
        if self.layer_state is not None:
            from torch_impl.kernels.decode_layer import check_state  # noqa: PLC0415

            check_state(self.layer_state)

    def _layer_kernel(self, meta, x, scratch):
        """The tiles of the one-launch decoder layer where it runs this step, else None (each layer's
        ops one by one): a decode step of one sequence over one cache block, no tensor parallelism, the
        fused kernels in use, and the tile lookup's path for the layer's shape "fused" (the default
        rule says "plain" until the kernel measures faster: common.tile_rules.default_path)."""
        if meta.is_prefill or x.shape[0] != 1 or scratch is not None or not self.ops.any_fused:
            return None
        if self.layers[0].tp.size != 1 or meta.block_tables is None or meta.block_tables.shape[1] != 1:
            return None
        from torch_impl.kernels._lib import choose  # noqa: PLC0415 - triton
        from torch_impl.kernels.decode_layer import layer_shape  # noqa: PLC0415

        fmt = self.layers[0].self_attn.qkv_proj.fmt
        choice = choose("decode_layer", x.device, x.dtype, None if fmt == "bf16" else fmt, **layer_shape(self.cfg, 1))
        self.decode_path = "one launch per layer" if choice.path == "fused" else "per-op"
        return choice.tiles if choice.path == "fused" else None


class Qwen3ForCausalLM(nn.Module):
    packed_modules_mapping = dict(NANOVLLM_PACKED)

    def __init__(self, config, use_fused_kernels="auto", quantization=None, *, tp_group: TPGroup | None = None,
                 lm_head_shard: str = "vocab"):
        """quantization: None or a quantized format of common.formats (the projections' storage,
        weight-only); a config with a quantized checkpoint's quantization_config is in its format by
        itself. tp_group: this rank's
        tensor-parallel group (None: torch.distributed's default group when initialized, else none);
        lm_head_shard: "vocab" splits the embedding and lm_head by vocabulary under it, "replicated"
        keeps them whole on every rank."""
        super().__init__()
        cfg = self.config = as_config(config)
        self.weight_format = weight_format_of(config, quantization)
        try:
            formats.get(self.weight_format).check_sizes(cfg, f"{type(config).__name__}")
        except QuantError as e:
            raise ValueError(str(e)) from None
        tp = self.tp = tp_group if tp_group is not None else from_dist()
        if tp.size > 1:
            check_tensor_parallel(cfg, tp.size, self.weight_format)
        local = self.shard_config = shard_config(cfg, tp.size)  # this rank's heads and intermediate size
        vocab_tp = tp if check_lm_head_shard(lm_head_shard) == "vocab" else SINGLE
        check_weight_format(use_fused_kernels, self.weight_format, torch.empty(0).device)  # under nano-vllm too
        self.ops = choose_ops(use_fused_kernels, torch.empty(0).device)
        self.model = Qwen3Model(local, self.ops, self.weight_format, tp, vocab_tp)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, head_format(self.weight_format), self.ops, vocab_tp)
        if cfg.tie_word_embeddings and self.lm_head.fmt == "bf16":
            self.lm_head.weight.data = self.model.embed_tokens.weight.data
        self.context_source = None  # None: torch_impl.context.get_context (nano-vllm's once installed)
        # where each source of a packed parameter goes (nano-vllm's shard ids), from common's plan
        shards = {module_name(row.key, i): {sid: (start, n) for sid, start, n in source_rows(row.key, local)}
                  for row in PLAN if row.shard_ids for i in range(cfg.num_hidden_layers)}
        self._plan_keys = {module_name(row.key, i): row.key for row in PLAN
                           for i in (range(cfg.num_hidden_layers) if row.layer else [None])}
        _attach_loaders(self, shards, self.shard_of)
        if self.weight_format != "bf16":
            attach_quant_loaders(self, shards, self.shard_of)
        if cfg.tie_word_embeddings and self.lm_head.fmt != "bf16":
            tie_quantized_head(self.model.embed_tokens.weight, self.lm_head.weight)

    def shard_of(self, name: str, w, shard_id=None, *, block: int = 1):
        """This rank's part of `w`, the whole checkpoint tensor (or common.formats.QWeight) of parameter
        `name`: a packed parameter's, or with `shard_id` one of its sources as nano-vllm's loader hands
        them; block=b: a block-scale tensor of b-row blocks. The tensor itself at tensor-parallel size 1."""
        key = self._plan_keys.get(name.removesuffix("_scale_inv"))
        tp = self.lm_head.tp if key in ("embed", "lm_head") else self.tp
        if key is None or tp.size == 1:
            return w
        if shard_id is None and block == 1:
            return take_shard(key, w, self.config, tp.size, tp.rank, _concat)
        return take_source_shard(key, shard_id, w, self.config, tp.size, tp.rank, block=block)

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
        """Fill from common.weights.Checkpoint.iter_params items: (layer or None, plan key, tensor or
        common.formats.QWeight of tensors)."""
        for layer, key, tensor in items:
            name = module_name(key, layer)
            if isinstance(tensor, QWeight):
                linear = self.get_submodule(name.removesuffix(".weight"))
                load_quantized(linear, name, self.shard_of(name, tensor))
                continue
            param = self.get_parameter(name)
            param.weight_loader(param, tensor)
