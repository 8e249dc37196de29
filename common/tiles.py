"""Tile-size dataclasses shared by the twin kernels (same fields in Pallas and Triton).

Each kernel launcher takes `tiles=None` and falls back to `<Tiles>.default_for(...)`; tuning
later swaps data (a per-GPU table of overrides), not code. All block sizes are powers of two:
the Triton lowering needs power-of-two blocks, ragged edges are masked.
"""

from __future__ import annotations

import dataclasses


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _check_pow2(obj) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.name.startswith("block_") and (v < 1 or v & (v - 1)):
            raise ValueError(f"{type(obj).__name__}.{f.name}={v}: expected a power of two")
        if v < 1:
            raise ValueError(f"{type(obj).__name__}.{f.name}={v}: expected a positive integer")


@dataclasses.dataclass(frozen=True)
class MatmulTiles:
    """Tiles of a (fused) projection out[M, N] = f(x[M, K]) @ W[N, K].T.

    block_m: token rows per program (decode: the whole batch up to 16, padded);
    block_n: output features per program; block_k: reduction chunk per step.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        _check_pow2(self)

    @classmethod
    def default_for(cls, m: int, n: int, k: int) -> "MatmulTiles":
        if m <= 16:
            # GEMV-like decode: stream W; small N tiles give enough programs to fill the GPU.
            block_n = 16 if n <= 8192 else 32
            return cls(block_m=max(1, next_pow2(m)), block_n=block_n, block_k=min(512, next_pow2(k)),
                       num_warps=4, num_stages=2)
        return cls(block_m=min(64, next_pow2(m)), block_n=64, block_k=min(64, next_pow2(k)),
                   num_warps=4, num_stages=3)


@dataclasses.dataclass(frozen=True)
class AttentionTiles:
    """Tiles of decode attention: block_kv keys per step, num_splits programs per sequence
    and kv head over the context (flash-decoding), reduced in a second pass when > 1."""

    block_kv: int
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        _check_pow2(self)

    @classmethod
    def default_for(cls, batch: int, num_kv_heads: int, max_context: int) -> "AttentionTiles":
        """128 keys per step (on the H100 faster than 64 in both twins: Pallas 14.0 vs 15.8 us at
        batch 1 and 4096 positions); splits while the GPU's 132 SMs are not yet covered and each
        split keeps >= 256 positions of the capacity. jax_impl keeps these splits with 64 keys per
        step and 3 stages (jax_impl.kernels.decode_attention.attention_tiles: faster there)."""
        programs = batch * num_kv_heads
        splits = 1
        while programs * splits < 132 and max_context // (splits * 2) >= 256:
            splits *= 2
        return cls(block_kv=128, num_splits=splits)


@dataclasses.dataclass(frozen=True)
class PrefillTiles:
    """Tiles of causal prefill attention: block_m queries per program, block_n keys per step
    (both >= 16: tensor-core dots)."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"PrefillTiles.{name}={v}: expected a power of two >= 16")

    @classmethod
    def default_for(cls, max_seqlen_q: int, head_dim: int) -> "PrefillTiles":
        block_m = min(64, max(16, next_pow2(max_seqlen_q)))
        return cls(block_m=block_m, block_n=64 if head_dim <= 128 else 32, num_warps=4, num_stages=2)
