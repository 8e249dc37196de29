"""The op list both twins implement, declared once: names, argument order, reference, tile type.

    from common.ops import OPS, Ops, AttentionMeta

Each twin has, for every op below, a plain implementation (`<twin>/plain.py`) and a kernel
(`<twin>/kernels/<kernel>.py`) with the same name and argument order; its `ops.py` builds one
`Ops` (a field per op) when the model is built. The test suite drives both twins from this list
against `reference` (common.reference) with the tolerance table of common.tolerances; the
tuners time the kernels listed under `kernels` with their `tiles` type.

Conventions shared by every op:
- Activations are token-major: x [T, hidden]; weights are [out_features, in_features] (the
  Hugging Face orientation, the plan's packing: w_qkv = [q; k; v], w_gate_up = [gate; up]).
- The KV cache of a layer is a pair k_cache, v_cache [num_blocks, block_size, Hkv, D];
  `AttentionMeta` says where each token's rows are.
- Row-parallel projections (linear_residual, mlp's down) take the residual as an argument, or
  None to add nothing: under tensor parallelism one rank passes it, so it is added once.
- Everything a kernel writes in place (the cache) is also returned (jax has no in-place writes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from common import reference
from common.tiles import AttentionTiles, MatmulTiles, PrefillTiles


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One op of the twin API."""

    name: str
    args: tuple[str, ...]  # positional arguments, in order
    kwargs: tuple[str, ...]  # keyword-only arguments (besides tiles)
    returns: str
    reference: Callable  # the numpy truth, common.reference
    kernels: tuple[str, ...]  # the kernels (tile-table keys) the fused op launches, in order
    tiles: type | None  # the tile dataclass each kernel takes
    doc: str


OPS: dict[str, OpSpec] = {spec.name: spec for spec in (
    OpSpec("rmsnorm_qkv",
           ("x", "norm_w", "w_qkv", "q_norm_w", "k_norm_w", "cos_sin", "k_cache", "v_cache", "meta"),
           ("num_heads", "num_kv_heads", "eps"), "(q [T, Hq, D], k_cache, v_cache)",
           reference.rmsnorm_qkv, ("rmsnorm_qkv",), MatmulTiles,
           "RMSNorm, the packed QKV projection, per-head q/k RMSNorm, RoPE at meta.positions; k and v "
           "written to the caches at meta.slots (-1: not written)"),
    OpSpec("mlp", ("x", "norm_w", "w_gate_up", "w_down", "residual"), ("eps",), "[T, hidden]",
           reference.mlp_block, ("mlp_gate_up", "linear_residual"), MatmulTiles,
           "residual + down(silu(gate) * up) of RMSNorm(x); residual None adds nothing"),
    OpSpec("linear_residual", ("x", "w", "residual"), (), "[T, N]",
           reference.linear_residual, ("linear_residual",), MatmulTiles,
           "residual + x @ w.T (o_proj); residual None adds nothing"),
    OpSpec("decode_attention", ("q", "k_cache", "v_cache", "meta"), (), "[B, Hq, D]",
           reference.decode_attention, ("decode_attention",), AttentionTiles,
           "one query per sequence over its first meta.context_lens[b] cached positions"),
    OpSpec("prefill_attention", ("q", "k_cache", "v_cache", "meta"), (), "[T, Hq, D]",
           reference.prefill_attention, ("prefill_attention",), PrefillTiles,
           "causal attention of each sequence's new tokens (meta.cu_seqlens_q) over its cached keys "
           "(meta.cu_seqlens_k: a cached prefix plus the new tokens)"),
    OpSpec("rms_norm", ("x", "weight"), ("eps",), "[T, hidden]",
           reference.rms_norm, ("rms_norm",), None, "the final norm"),
)}
OP_NAMES: tuple[str, ...] = tuple(OPS)


@dataclasses.dataclass(frozen=True)
class Ops:
    """The implementation of every op a model runs, chosen once when the model is built.

    `paths` says, per op, what runs: "fused" (the kernel), "plain" (framework ops) or "per-shape"
    (common.tiles.lookup decides at each shape: jax decides while tracing, once per compiled shape).
    """

    rmsnorm_qkv: Callable
    mlp: Callable
    linear_residual: Callable
    decode_attention: Callable
    prefill_attention: Callable
    rms_norm: Callable
    paths: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, impls: dict[str, Callable], paths: dict[str, str]) -> "Ops":
        missing = [n for n in OP_NAMES if n not in impls]
        if missing:
            raise ValueError(f"Ops: no implementation of {', '.join(missing)}")
        return cls(**{n: impls[n] for n in OP_NAMES}, paths=tuple((n, paths[n]) for n in OP_NAMES))

    @property
    def any_fused(self) -> bool:
        return any(path != "plain" for _, path in self.paths)


@dataclasses.dataclass(frozen=True)
class AttentionMeta:
    """Where each token of a step lives: what the attention ops (and the cache write) read.

    Tensors are the twin's arrays (int32). T tokens of B sequences:
    - positions [T]: each token's position in its sequence (RoPE);
    - slots [T]: its flat cache row, block * block_size + offset (-1: not written);
    - cu_seqlens_q [B + 1]: cumulative new-token counts (prefill; token-major, sequence after sequence);
    - cu_seqlens_k [B + 1]: cumulative key counts, a cached prefix plus the new tokens (prefill);
    - context_lens [B]: keys each sequence attends to, its new token included (decode);
    - block_tables [B, max_blocks]: each sequence's cache blocks (-1 padded), or None: one block per
      sequence in batch order (block b holds sequence b from row 0), read in place with no table;
    - max_seqlen_q, max_seqlen_k: Python ints (static: they size grids and loops);
    - is_prefill: Python bool.
    """

    positions: Any = None
    slots: Any = None
    cu_seqlens_q: Any = None
    cu_seqlens_k: Any = None
    context_lens: Any = None
    block_tables: Any = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    is_prefill: bool = False

    ARRAYS = ("positions", "slots", "cu_seqlens_q", "cu_seqlens_k", "context_lens", "block_tables")
    STATIC = ("max_seqlen_q", "max_seqlen_k", "is_prefill")

    def replace(self, **changes) -> "AttentionMeta":
        return dataclasses.replace(self, **changes)


def kernel_shape(name: str, args: tuple, kwargs: dict | None = None) -> tuple[str, dict]:
    """The kernel that decides op `name`'s path, and its shape for common.tiles.lookup, from the
    op's arguments (arrays of either framework: only `.shape` is read)."""
    spec = OPS[name]
    a = dict(zip(spec.args, args)) | (kwargs or {})
    if name in ("rmsnorm_qkv", "mlp", "linear_residual"):
        x = a["x"]
        w = a[{"rmsnorm_qkv": "w_qkv", "mlp": "w_gate_up", "linear_residual": "w"}[name]]
        shape = dict(m=int(x.shape[0]), n=int(w.shape[0]), k=int(x.shape[1]))
        if name == "rmsnorm_qkv":
            shape["head_dim"] = int(a["q_norm_w"].shape[0])
        return spec.kernels[0], shape
    if name == "decode_attention":
        cache, bt = a["k_cache"], a["meta"].block_tables
        blocks = 1 if bt is None else int(bt.shape[1])
        return spec.kernels[0], dict(batch=int(a["q"].shape[0]), num_kv_heads=int(cache.shape[2]),
                                     max_context=blocks * int(cache.shape[1]), one_block=blocks == 1)
    if name == "prefill_attention":
        return spec.kernels[0], dict(max_seqlen_q=int(a["meta"].max_seqlen_q), head_dim=int(a["q"].shape[-1]))
    x = a["x"]
    return spec.kernels[0], dict(m=int(x.shape[0]), n=int(x.shape[1]))


def signature(name: str) -> str:
    """`name(args..., *, kwargs..., tiles=None) -> returns`, for docs and error messages."""
    spec = OPS[name]
    kw = ", ".join([*spec.kwargs, "tiles=None"])
    return f"{spec.name}({', '.join(spec.args)}, *, {kw}) -> {spec.returns}"


__all__ = ["OPS", "OP_NAMES", "OpSpec", "Ops", "AttentionMeta", "kernel_shape", "signature"]
