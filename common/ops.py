"""The op list both twins implement, declared once: names, argument order, reference, tile type.

    from common.ops import OPS, Ops, AttentionMeta

Each twin has, for every op below, a plain implementation (`<twin>/plain.py`) and a kernel
(`<twin>/kernels/<kernel>.py`) with the op's signature (`signature`; `signature_drift` says how
a function differs, tests/test_op_contract.py checks all four and the reference); its `ops.py`
builds one `Ops` (a field per op) when the model is built. The test suite drives both twins from
this list against `reference` (common.reference, called with the op's arguments as numpy) with
the tolerance table of common.tolerances; the tuners time the kernels listed under `kernels` with
their `tiles` type. The kernel lists elsewhere derive from OPS: KERNEL_TILES and PROJECTIONS
(common.tiles, common.tile_rules), KERNEL_OP (measure.tune), TILED_OPS (the kernel benchmarks).

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
import inspect
from typing import Any, Callable

from common import reference
from common.tile_types import AttentionTiles, LayerTiles, MatmulTiles, PrefillTiles


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One op of the twin API: every implementation's signature is
    `name(*args, *, *kwargs, *tile_kwargs=None)` (`signature`, checked by `signature_drift`)."""

    name: str
    args: tuple[str, ...]  # positional arguments, in order
    kwargs: tuple[str, ...]  # keyword-only arguments, required (besides the tile keywords)
    returns: str
    reference: Callable  # the numpy truth (common.reference), called with the op's arguments as numpy
    kernels: tuple[str, ...]  # the kernels (tile-table keys) the fused op launches, in order
    tiles: type | None  # the tile dataclass each kernel takes
    tile_kwargs: tuple[str, ...]  # the keyword (default None: the lookup's choice) of each kernel's tiles
    doc: str

    def __post_init__(self):
        want = len(self.kernels) if self.tiles is not None else 0
        if len(self.tile_kwargs) != want:
            raise ValueError(f"OpSpec {self.name}: tile_kwargs={self.tile_kwargs}, expected {want} "
                             f"(one per kernel with tiles)")


OPS: dict[str, OpSpec] = {spec.name: spec for spec in (
    OpSpec("rmsnorm_qkv",
           ("x", "norm_w", "w_qkv", "q_norm_w", "k_norm_w", "cos_sin", "k_cache", "v_cache", "meta"),
           ("num_heads", "num_kv_heads", "eps"), "(q [T, Hq, D], k_cache, v_cache)",
           reference.rmsnorm_qkv, ("rmsnorm_qkv",), MatmulTiles, ("tiles",),
           "RMSNorm, the packed QKV projection, per-head q/k RMSNorm, RoPE at meta.positions; k and v "
           "written to the caches at meta.slots (-1: not written)"),
    OpSpec("mlp", ("x", "norm_w", "w_gate_up", "w_down", "residual"), ("eps",), "[T, hidden]",
           reference.mlp, ("mlp_gate_up", "linear_residual"), MatmulTiles, ("tiles", "down_tiles"),
           "residual + down(silu(gate) * up) of RMSNorm(x); residual None adds nothing"),
    OpSpec("linear_residual", ("x", "w", "residual"), (), "[T, N]",
           reference.linear_residual, ("linear_residual",), MatmulTiles, ("tiles",),
           "residual + x @ w.T (o_proj); residual None adds nothing"),
    OpSpec("decode_attention", ("q", "k_cache", "v_cache", "meta"), (), "[B, Hq, D]",
           reference.decode_attention, ("decode_attention",), AttentionTiles, ("tiles",),
           "one query per sequence over its first meta.context_lens[b] cached positions"),
    OpSpec("prefill_attention", ("q", "k_cache", "v_cache", "meta"), (), "[T, Hq, D]",
           reference.prefill_attention, ("prefill_attention",), PrefillTiles, ("tiles",),
           "causal attention of each sequence's new tokens (meta.cu_seqlens_q) over its cached keys "
           "(meta.cu_seqlens_k: a cached prefix plus the new tokens)"),
    OpSpec("rms_norm", ("x", "weight"), ("eps",), "[T, hidden]",
           reference.rms_norm, ("rms_norm",), None, (), "the final norm"),
)}
OP_NAMES: tuple[str, ...] = tuple(OPS)
# Every op but the final norm (the one without tiles): what the kernel benchmarks time.
TILED_OPS: tuple[str, ...] = tuple(name for name, spec in OPS.items() if spec.tiles is not None)
# Keyword-only arguments a twin's kernels take beyond the spec (each with a default, never needed):
# jax_impl's `interpret` (Pallas interpreter mode; None: on a non-GPU backend).
KERNEL_EXTRAS: dict[str, tuple[str, ...]] = {"jax": ("interpret",), "torch": ()}


def _kernel_tiles() -> dict[str, type | None]:
    out: dict[str, type | None] = {}
    for spec in OPS.values():
        for kernel in spec.kernels:
            if out.setdefault(kernel, spec.tiles) is not spec.tiles:
                raise ValueError(f"OPS: kernel {kernel} takes {out[kernel]} in one op, {spec.tiles} in {spec.name}")
    return out


# Every kernel (a tile-table key) -> its tile dataclass (None: no tiles), in the order of OPS.
KERNEL_TILES: dict[str, type | None] = _kernel_tiles()
# The projections: the kernels whose tiles are MatmulTiles.
PROJECTIONS: tuple[str, ...] = tuple(k for k, kind in KERNEL_TILES.items() if kind is MatmulTiles)
# Kernels that run several ops of a step at once where the tile lookup says so - a decode path, not
# an op of the list: "fused" runs the kernel, "plain" the ops one by one (each as its own lookup says).
COMPOSITE_KERNELS: dict[str, type] = {"decode_layer": LayerTiles}
# Every kernel -> the op it tunes: the op whose first kernel it is (mlp's down projection is
# linear_residual's kernel, tuned on linear_residual).
KERNEL_OP: dict[str, str] = {spec.kernels[0]: name for name, spec in OPS.items()}
if list(KERNEL_OP) != list(KERNEL_TILES):
    raise ValueError(f"OPS: every kernel must be the first kernel of one op, in order: {list(KERNEL_TILES)}")


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

    @classmethod
    def every(cls, module, path: str) -> "Ops":
        """Every op from `module` (a twin's kernels or plain ops), all on `path`."""
        return cls.of({n: getattr(module, n) for n in OP_NAMES}, dict.fromkeys(OP_NAMES, path))

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
    if spec.tiles is MatmulTiles:
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
    kw = ", ".join([*spec.kwargs, *(f"{t}=None" for t in spec.tile_kwargs)])
    return f"{spec.name}({', '.join(spec.args)}{', *, ' + kw if kw else ''}) -> {spec.returns}"


def signature_drift(name: str, fn: Callable, *, extras: tuple[str, ...] = (), tiles: bool = True) -> list[str]:
    """How `fn`'s signature differs from op `name`'s (empty: none): exactly the spec's positional
    arguments in order, none with a default; then, keyword-only, the spec's kwargs (required) and
    tile keywords (default None; tiles=False: none, the reference) in order, and `extras` (a twin's
    own, each with a default)."""
    spec = OPS[name]
    tile_kwargs = spec.tile_kwargs if tiles else ()
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword = [p for p in params if p.kind == p.KEYWORD_ONLY]
    problems = [f"takes *{p.name}" if p.kind == p.VAR_POSITIONAL else f"takes **{p.name}"
                for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if tuple(p.name for p in positional) != spec.args:
        problems.append(f"positional arguments ({', '.join(p.name for p in positional)}), "
                        f"expected ({', '.join(spec.args)})")
    problems += [f"positional argument {p.name} has a default ({p.default!r}), expected none"
                 for p in positional if p.default is not p.empty]
    want = (*spec.kwargs, *tile_kwargs)
    got = tuple(p.name for p in keyword if p.name not in extras)
    if got != want:
        problems.append(f"keyword-only arguments ({', '.join(got)}), expected ({', '.join(want)})"
                        + (f" and optionally {', '.join(extras)}" if extras else ""))
    for p in keyword:
        if p.name in spec.kwargs and p.default is not p.empty:
            problems.append(f"keyword {p.name} has a default ({p.default!r}), expected none (required)")
        elif p.name in tile_kwargs and p.default is not None:
            problems.append(f"keyword {p.name} defaults to {p.default!r}, expected None")
        elif p.name in extras and p.default is p.empty:
            problems.append(f"keyword {p.name} (the twin's own) has no default, expected one")
    return [f"{name}: {problem}; the op is {signature(name)}" for problem in problems]


__all__ = ["OPS", "OP_NAMES", "TILED_OPS", "KERNEL_TILES", "COMPOSITE_KERNELS", "PROJECTIONS", "KERNEL_OP", "KERNEL_EXTRAS", "OpSpec",
           "Ops", "AttentionMeta", "kernel_shape", "signature", "signature_drift"]
