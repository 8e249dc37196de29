"""Flax NNX Qwen3 decoder whose layers call the ops chosen once at build time (fused or plain).

Weights are laid out at load in the form the kernels want (packed w_qkv / w_gate_up, the
[out, in] orientation, the model dtype) and every layer owns its buffers: a slice of a stacked
[layers, ...] array handed to a custom kernel would be copied on every call.

The model works on flat token batches with explicit positions and cache slots:
- `prefill(ids [B, L], lengths [B], caches)`: right-padded prompts from position 0, writing
  each sequence's k/v into its cache rows; returns the final hidden states [B, L, hidden].
- `decode(ids [B], positions [B], caches)`: one token per sequence.
Per layer the KV cache is [num_blocks, block_size, Hkv, D] with one block of `rows` rows per
sequence (block b is sequence b), so the attention ops read it with block_tables=None, no gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from common.config import Qwen3Config
from common.ops import AttentionMeta, Ops
from jax_impl import plain
from jax_impl.ops import PLAIN_OPS


class Buffer(nnx.Variable):
    """A non-trainable array owned by the model (the RoPE table)."""


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3Config, w: dict[str, jax.Array], reduce=None):
        self.cfg = cfg
        self.reduce = reduce  # tensor parallel: the all-reduce of a row-parallel partial sum (None: one device)
        self.input_norm = nnx.Param(w["input_norm"])  # [hidden]
        self.w_qkv = nnx.Param(w["w_qkv"])  # [(Hq + 2 Hkv) D, hidden]
        self.q_norm = nnx.Param(w["q_norm"])  # [D]
        self.k_norm = nnx.Param(w["k_norm"])  # [D]
        self.w_o = nnx.Param(w["w_o"])  # [hidden, Hq D]
        self.post_norm = nnx.Param(w["post_norm"])  # [hidden]
        self.w_gate_up = nnx.Param(w["w_gate_up"])  # [2 I, hidden]
        self.w_down = nnx.Param(w["w_down"])  # [hidden, I]

    def qkv(self, ops: Ops, x, cos_sin, k_cache, v_cache, meta: AttentionMeta):
        cfg = self.cfg
        return ops.rmsnorm_qkv(x, self.input_norm[...], self.w_qkv.get_value(), self.q_norm[...], self.k_norm[...],
                               cos_sin, k_cache, v_cache, meta, num_heads=cfg.num_attention_heads,
                               num_kv_heads=cfg.num_key_value_heads, eps=cfg.rms_norm_eps)

    def finish(self, ops: Ops, attn, x):
        """o_proj + residual, then the MLP block (with its residual)."""
        x = self.row_parallel(lambda r: ops.linear_residual(attn, self.w_o.get_value(), r), x)
        return self.row_parallel(lambda r: ops.mlp(x, self.post_norm[...], self.w_gate_up.get_value(),
                                                   self.w_down.get_value(), r, eps=self.cfg.rms_norm_eps), x)

    def row_parallel(self, project, residual):
        """residual + a row-parallel projection: on one device the op adds the residual itself
        (`project(residual)`); under tensor parallelism each rank's partial sum (`project(None)`,
        rounded to the activation dtype) is all-reduced, then the residual added once."""
        if self.reduce is None:
            return project(residual)
        return residual + self.reduce(project(None))


class Qwen3(nnx.Module):
    def __init__(self, cfg: Qwen3Config, params: dict, ops: Ops = PLAIN_OPS, *, reduce=None, gather_vocab=None):
        """params: {"embed", "final_norm", ["lm_head"], "layers": [per-layer dicts]} (see common.weights).

        Tensor parallelism (jax_impl.parallel) builds it with one rank's config and shards and two
        collectives: `reduce` sums the row-parallel partials over the ranks, `gather_vocab` joins a
        vocab-parallel head's logits; None (one device) runs neither."""
        self.cfg = cfg
        self.ops = ops
        self.gather_vocab = gather_vocab
        self.embed = nnx.Param(params["embed"])  # [vocab, hidden]
        self.final_norm = nnx.Param(params["final_norm"])
        self.lm_head = nnx.Param(params["lm_head"]) if "lm_head" in params else None
        self.layers = nnx.List([DecoderLayer(cfg, w, reduce) for w in params["layers"]])
        self.cos_sin = Buffer(plain.rope_table(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta))

    @property
    def dtype(self):
        return self.embed[...].dtype

    def logits(self, h):
        """Final norm and head: h [..., hidden] -> float32 logits [..., vocab]."""
        flat = self.ops.rms_norm(h.reshape(-1, h.shape[-1]), self.final_norm[...], eps=self.cfg.rms_norm_eps)
        h = flat.reshape(h.shape)
        head = self.embed[...] if self.lm_head is None else self.lm_head.get_value()  # tied: read, never alias
        # (a quantized head, common.formats.head_format, is a QWeight: matmul_f32 dequantizes it in the product)
        return plain.matmul_f32(h, head)

    def full_logits(self, h):
        """logits(h) over the whole vocabulary: a vocab-parallel head's per-rank slices gathered."""
        out = self.logits(h)
        return out if self.gather_vocab is None else self.gather_vocab(out)

    def prefill(self, ids, lengths, caches, cache_rows: int):
        """ids [B, L] right-padded, lengths [B]; caches: list of (k, v) [B, cache_rows, Hkv, D].

        The prompts run as one varlen batch of B sequences of L tokens each (the padding rows are
        tokens too: they write no cache row and only padding queries see them)."""
        cfg, ops = self.cfg, self.ops
        b, l = ids.shape
        pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
        slots = jnp.where(pos < lengths[:, None], jnp.arange(b, dtype=jnp.int32)[:, None] * cache_rows + pos, -1)
        cu = jnp.arange(b + 1, dtype=jnp.int32) * l
        meta = AttentionMeta(positions=pos.reshape(-1), slots=slots.reshape(-1), cu_seqlens_q=cu, cu_seqlens_k=cu,
                             max_seqlen_q=l, max_seqlen_k=l, is_prefill=True)
        x = self.embed[...][ids.reshape(-1)]  # [B*L, hidden]
        new_caches = []
        for layer, (kc, vc) in zip(self.layers, caches):
            q, kc, vc = layer.qkv(ops, x, self.cos_sin[...], kc, vc, meta)
            attn = ops.prefill_attention(q, kc, vc, meta)
            x = layer.finish(ops, attn.reshape(b * l, cfg.q_size), x)
            new_caches.append((kc, vc))
        return x.reshape(b, l, cfg.hidden_size), new_caches

    def decode(self, ids, positions, caches):
        """One token per sequence: ids, positions [B]; returns hidden [B, hidden] and the caches.

        Sequence b owns cache block b (block_tables None in the attention op: no gather).
        """
        ops = self.ops
        b = ids.shape[0]
        rows = caches[0][0].shape[1]
        meta = AttentionMeta(positions=positions, slots=jnp.arange(b, dtype=jnp.int32) * rows + positions,
                             context_lens=positions + 1, max_seqlen_q=1, max_seqlen_k=rows)
        x = self.embed[...][ids]
        new_caches = []
        for layer, (kc, vc) in zip(self.layers, caches):
            q, kc, vc = layer.qkv(ops, x, self.cos_sin[...], kc, vc, meta)
            attn = ops.decode_attention(q, kc, vc, meta)
            x = layer.finish(ops, attn.reshape(b, -1), x)
            new_caches.append((kc, vc))
        return x, new_caches


def init_caches(cfg: Qwen3Config, batch: int, rows: int, dtype, sharding=None) -> list[tuple[jax.Array, jax.Array]]:
    """Per-layer (k, v) caches [batch, rows, Hkv, D]: one block of `rows` per sequence; `sharding`
    places them (tensor parallel: split on the kv-head axis; None: the default device)."""
    shape = (batch, rows, cfg.num_key_value_heads, cfg.head_dim)
    return [(jnp.zeros(shape, dtype, device=sharding), jnp.zeros(shape, dtype, device=sharding))
            for _ in range(cfg.num_hidden_layers)]
