"""Chains of one op over distinct per-layer buffers, the same for both twins (bench and the tuners).

An op is timed as a chain (measure/timing.py): n calls, each "layer" with its own weights (or KV
cache) so every call streams from memory rather than the L2, the output of one call feeding the
next. `setup(case, n, framework, device)` builds the inputs once, with the arrays of the twin's
backend (common.backend), and returns (carry, layers, shared, body_for) with
body_for(ops)(carry, i, layer, shared) -> carry, where `ops` is anything with the op as an
attribute: a twin's kernels module, its plain module, or a namespace of kernels bound to candidate
tiles. `time_chain` times it with the backend's chain timer.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from common import backend, formats, reference
from common.config import Qwen3Config
from common.ops import AttentionMeta

E = 2  # bytes per bf16 element


@dataclasses.dataclass(frozen=True)
class Case:
    """One op at one shape: `tokens` rows (decode batch or prefill tokens); decode_attention over
    `ctx` cached positions per sequence in `layout` ("one-block": block b holds sequence b, jax_impl's
    and the torch runner's layout; "paged": nano-vllm's 256-row blocks); linear_residual with `k`
    input features (default: o_proj's, Hq * D; the MLP's down projection has the intermediate size)."""

    model: str
    cfg: Qwen3Config
    op: str
    phase: str  # "decode" | "prefill"
    tokens: int
    ctx: int = 1024
    layout: str | None = None
    k: int | None = None
    fmt: str | None = None  # the projections' weights: None (bf16) or a quantized format (common.formats)

    @property
    def label(self) -> str:
        extra = f" ctx={self.ctx}" if self.op == "decode_attention" else ""
        extra += f" {self.layout}" if self.layout else ""
        extra += f" k={self.k}" if self.k else ""
        extra += f" {self.fmt}" if self.fmt else ""
        return f"{self.op} {self.model} {self.phase} T={self.tokens}{extra}"

    def in_features(self) -> int:
        return self.k or self.cfg.num_attention_heads * self.cfg.head_dim


def layer_bytes(c: Case) -> int:
    """Bytes of the buffers each layer of the chain owns (weights; the KV cache for attention)."""
    cfg = c.cfg
    h, hq, hkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    w = formats.get(c.fmt).storage_bytes or E  # quantized weights: their storage's bytes
    return {"rmsnorm_qkv": w * (hq + 2 * hkv) * d * h, "mlp": w * 3 * cfg.intermediate_size * h,
            "linear_residual": w * h * c.in_features(), "decode_attention": E * 2 * c.tokens * c.ctx * hkv * d,
            "prefill_attention": E * 2 * c.tokens * hkv * d, "rms_norm": E * h}[c.op]


def chain_layers(c: Case, min_bytes: int = 256 << 20, max_bytes: int = 6 << 30, min_layers: int = 2,
                 max_layers: int = 32) -> int:
    """Layers of a chain: at least `min_bytes` of distinct buffers (far past the L2), at most `max_bytes`."""
    return layers_for_bytes(layer_bytes(c), min_bytes, max_bytes, min_layers, max_layers)


def layers_for_bytes(per: int, min_bytes: int = 256 << 20, max_bytes: int = 6 << 30, min_layers: int = 2,
                     max_layers: int = 32) -> int:
    """chain_layers for layers of `per` bytes each."""
    per = max(1, per)
    n = max(min_layers, -(-min_bytes // per))
    return int(max(min_layers, min(n, max_layers, max_bytes // per)))


def paged(ctx: int) -> tuple[int, int]:
    """(block_size, blocks per sequence) of the paged layout: 256-row blocks as nano-vllm."""
    bs = min(256, ctx)
    return bs, -(-ctx // bs)


class _Arrays:
    """Random bf16 inputs and int32 index arrays on the backend's device, seeded by the case."""

    def __init__(self, b: backend.Backend, label: str, device):
        self.b, self.device = b, device
        self.random = b.random(zlib.crc32(label.encode()), device)

    def normal(self, shape, scale=1.0, offset=0.0):
        return self.random.normal(shape, scale, offset)

    def weight(self, shape, scale, fmt: str | None):
        """A bf16 weight N(0, scale^2), or its common.formats QWeight in `fmt` (one scale: speed only)."""
        return self.normal(shape, scale) if fmt is None else self.random.qweight(shape, scale, fmt)

    def ints(self, values):
        return self.b.asarray(values, "int32", self.device)

    def rope_table(self, positions: int, d: int, theta: float):
        return self.b.asarray(reference.rope_table(positions, d, theta).astype(np.float32), "float32", self.device)


def setup(c: Case, n: int, fw: str, device):
    """(carry, layers, shared, body_for(ops)) of a chain of n layers of case `c` in backend `fw`."""
    a = _Arrays(backend.get(fw), c.label, device)
    cfg, t = c.cfg, c.tokens
    h, hq, hkv, d, eps = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.rms_norm_eps)
    norm_w = lambda size: a.normal((size,), 0.1, 1.0)  # noqa: E731
    if c.op == "mlp":
        i = cfg.intermediate_size
        layers = [dict(nw=norm_w(h), gu=a.weight((2 * i, h), h ** -0.5, c.fmt), dn=a.weight((h, i), i ** -0.5, c.fmt))
                  for _ in range(n)]
        return a.normal((t, h)), layers, {}, lambda ops: (
            lambda x, _, L, S: ops.mlp(x, L["nw"], L["gu"], L["dn"], x, eps=eps))
    if c.op == "linear_residual":
        k = c.in_features()
        layers = [dict(w=a.weight((h, k), k ** -0.5, c.fmt)) for _ in range(n)]
        return a.normal((t, h)), layers, dict(x=a.normal((t, k))), lambda ops: (
            lambda r, _, L, S: ops.linear_residual(S["x"], L["w"], r))
    if c.op == "rms_norm":
        layers = [dict(w=norm_w(h)) for _ in range(n)]
        return a.normal((t, h)), layers, {}, lambda ops: (lambda x, _, L, S: ops.rms_norm(x, L["w"], eps=eps))
    if c.op == "rmsnorm_qkv":
        pos = [c.ctx - 1] * t if c.phase == "decode" else list(range(t))
        shared = dict(cos_sin=a.rope_table(max(c.ctx, t) + 1, d, cfg.rope_theta),
                      meta=AttentionMeta(positions=a.ints(pos), slots=a.ints(list(range(t)))))
        layers = [dict(nw=norm_w(h), w=a.weight(((hq + 2 * hkv) * d, h), h ** -0.5, c.fmt), qn=norm_w(d),
                       kn=norm_w(d)) for _ in range(n)]
        caches = tuple((a.normal((t, 1, hkv, d)), a.normal((t, 1, hkv, d))) for _ in range(n))

        def body_for(ops):
            def body(carry, i, L, S):
                x, cs = carry
                q, kc, vc = ops.rmsnorm_qkv(x, L["nw"], L["w"], L["qn"], L["kn"], S["cos_sin"], cs[i][0], cs[i][1],
                                            S["meta"], num_heads=hq, num_kv_heads=hkv, eps=eps)
                # the next layer's input: q's first `hidden` features (a free reshape when Hq*D == hidden)
                return q.reshape(t, hq * d)[:, :h], cs[:i] + ((kc, vc),) + cs[i + 1:]
            return body

        return (a.normal((t, h)), caches), layers, shared, body_for
    if c.op == "decode_attention":
        layout = c.layout or backend.get(fw).default_layout
        if layout == "one-block":  # block b is sequence b, no table
            shape, table = (t, c.ctx, hkv, d), None
        else:
            bs, nb = paged(c.ctx)
            shape, table = (t * nb, bs, hkv, d), a.ints([[b * nb + j for j in range(nb)] for b in range(t)])
        layers = [dict(k=a.normal(shape), v=a.normal(shape)) for _ in range(n)]
        meta = AttentionMeta(context_lens=a.ints([c.ctx] * t), block_tables=table)
        return a.normal((t, hq, d)), layers, dict(meta=meta), lambda ops: (
            lambda q, _, L, S: ops.decode_attention(q, L["k"], L["v"], S["meta"]))
    if c.op == "prefill_attention":  # one prompt of t tokens in cache block 0 (no cached prefix)
        layers = [dict(k=a.normal((1, t, hkv, d)), v=a.normal((1, t, hkv, d))) for _ in range(n)]
        cu = a.ints([0, t])
        meta = AttentionMeta(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=t, max_seqlen_k=t, is_prefill=True)
        return a.normal((t, hq, d)), layers, dict(meta=meta), lambda ops: (
            lambda q, _, L, S: ops.prefill_attention(q, L["k"], L["v"], S["meta"]))
    raise ValueError(f"unknown op {c.op!r}")


def time_chain(fw: str, body, carry, layers, shared, plan, device) -> dict:
    """measure.timing's figures of one chain (jax: one jit; torch: a CUDA graph on a GPU)."""
    return backend.get(fw).time_chain(body, carry, layers, shared, plan, device)
