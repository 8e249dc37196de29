"""The tile dataclasses each kernel takes (common.ops names which; common.tiles looks them up),
the `Device` the default rule reads and `next_pow2`: what common.tiles and common.tile_rules both read.

    from common.tiles import MatmulTiles, Device  # re-exported there, the usual import

All block sizes are powers of two (the Triton lowering needs them; ragged edges are masked).
"""

from __future__ import annotations

import dataclasses
import os
import re


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _check_pow2(obj) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{type(obj).__name__}.{f.name}={v!r}: expected a positive integer")
        if f.name.startswith("block_") and v & (v - 1):
            raise ValueError(f"{type(obj).__name__}.{f.name}={v}: expected a power of two")


@dataclasses.dataclass(frozen=True)
class MatmulTiles:
    """Tiles of a (fused) projection out[M, N] = f(x[M, K]) @ W[N, K].T.

    block_m: token rows per program (below 16: multiply and reduce, one weight pass per row;
    16 and more: tensor-core dots); block_n: output features per program (rmsnorm_qkv: a head's
    width fuses the q/k epilogue into the projection, less splits it); block_k: reduction chunk;
    split_k: programs sharing one output tile's reduction (torch_impl's tensor-core path: each
    sums a contiguous run of chunks, the last to finish adds the parts in order and applies the
    epilogue; more programs stream W when the output tiles alone leave SMs idle)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    split_k: int = 1

    def __post_init__(self):
        _check_pow2(self)


@dataclasses.dataclass(frozen=True)
class AttentionTiles:
    """Tiles of decode attention: block_kv keys per step, num_splits programs per sequence and kv
    head over the context (flash-decoding), merged when > 1."""

    block_kv: int
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        _check_pow2(self)


@dataclasses.dataclass(frozen=True)
class PrefillTiles:
    """Tiles of causal prefill attention: block_m queries per program, block_n keys per step
    (both >= 16: tensor-core dots)."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        _check_pow2(self)
        for name in ("block_m", "block_n"):
            if getattr(self, name) < 16:
                raise ValueError(f"PrefillTiles.{name}={getattr(self, name)}: expected a power of two >= 16")


@dataclasses.dataclass(frozen=True)
class LayerTiles:
    """Tiles of the one-launch decoder layer (torch_impl/kernels/decode_layer.py): block_n rows per
    o_proj, gate/up and down task, block_k the chunk of each projection's reduction, block_kv keys
    per attention step (>= 16: tensor-core dots), num_splits attention tasks per kv head (each a
    share of the context, as decode_attention's splits); its grid is sized at launch (as many
    programs as fit at once), not here."""
    block_n: int = 16
    block_k: int = 1024
    block_kv: int = 64
    num_splits: int = 1
    num_warps: int = 4

    def __post_init__(self):
        _check_pow2(self)
        if self.block_kv < 16:
            raise ValueError(f"LayerTiles.block_kv={self.block_kv}: expected a power of two >= 16")


TILE_TYPES = {"matmul": MatmulTiles, "attention": AttentionTiles, "prefill": PrefillTiles, "layer": LayerTiles}


# ----- the device ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Device:
    """What the default rule reads of a GPU (or of the CPU, where kernels run in an interpreter)."""

    name: str
    sm_count: int
    smem_per_block: int  # bytes a kernel may use (the opt-in maximum)
    capability: tuple[int, int] | None  # None: not a CUDA GPU

    @property
    def slug(self) -> str:
        """The table file name of this device: its name with every non-alphanumeric run as '_'."""
        return re.sub(r"[^A-Za-z0-9]+", "_", self.name).strip("_") or "unknown"

    @property
    def is_gpu(self) -> bool:
        return self.capability is not None

    @classmethod
    def cpu(cls) -> "Device":
        return cls("cpu", max(1, os.cpu_count() or 1), 1 << 20, None)
