"""Shapes and constants the kernel tests of both twins share (one list, two frameworks)."""

from __future__ import annotations

import dataclasses

from common.config import PRESETS, shrink
from common.tiles import AttentionTiles, PrefillTiles

EPS = 1e-6
THETA = 1_000_000.0


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inter: int
    hq: int
    hkv: int
    d: int


def from_config(name, cfg) -> Shape:
    return Shape(name, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                 cfg.num_key_value_heads, cfg.head_dim)


CPU_SHAPES = [
    from_config("0.6B/8", shrink(PRESETS["Qwen3-0.6B"])),  # hidden 128, inter 384, GQA 2:1, D 128
    from_config("4B/8", shrink(PRESETS["Qwen3-4B"])),      # hidden 320, inter 1216, GQA 4:1, D 128
    Shape("h96-i97", 96, 97, 4, 2, 64),
    Shape("h111-i97", 111, 97, 4, 1, 64),
]
GPU_SHAPES = [from_config(name, cfg) for name, cfg in PRESETS.items()]  # all six presets, full size


def projection_shapes(shape: Shape, m: int) -> list[tuple[str, dict]]:
    """(kernel, tile shape) of each projection a kernel-test case runs at `shape` and m tokens: a
    QKV case's tiles go to rmsnorm_qkv; an MM case's to mlp's gate/up and down projections (the
    down one looked up as linear_residual) and to linear_residual's o_proj."""
    return [("rmsnorm_qkv", dict(m=m, n=(shape.hq + 2 * shape.hkv) * shape.d, k=shape.hidden, head_dim=shape.d)),
            ("mlp_gate_up", dict(m=m, n=2 * shape.inter, k=shape.hidden)),
            ("linear_residual", dict(m=m, n=shape.hidden, k=shape.inter)),
            ("linear_residual", dict(m=m, n=shape.hidden, k=shape.hq * shape.d))]


def tiles_id(tiles) -> str:
    """A short test id of a tiles object (None: the default tiles)."""
    if tiles is None:
        return "default"
    if isinstance(tiles, AttentionTiles):
        return f"kv{tiles.block_kv}x{tiles.num_splits}"
    if isinstance(tiles, PrefillTiles):
        return f"pm{tiles.block_m}n{tiles.block_n}"
    return f"m{tiles.block_m}n{tiles.block_n}k{tiles.block_k}" + (f"s{tiles.split_k}" if tiles.split_k > 1 else "")
