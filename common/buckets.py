"""Shape buckets: the few compiled shapes (jax programs, torch CUDA graphs) that cover every length.

Geometric (powers of two), so a handful of shapes reach max_position_embeddings: prompt lengths from
16, cache rows per sequence from 128, batch sizes from 1. Both twins bucket with these rules.
"""

from __future__ import annotations

MIN_PROMPT = 16
MIN_CACHE_ROWS = 128


def pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


def batch_bucket(batch: int) -> int:
    return pow2_at_least(batch)


def prompt_bucket(tokens: int, max_positions: int) -> int:
    return min(pow2_at_least(tokens, MIN_PROMPT), max_positions)


def cache_bucket(rows: int, max_positions: int, floor: int = MIN_CACHE_ROWS, half_steps: bool = False) -> int:
    """Cache rows per sequence: a power of two (or, with half_steps, also 1.5 times one: 128, 192,
    256, 384, 512, ...) at least `rows` and `floor`, at most max_positions."""
    p = pow2_at_least(rows, floor)
    if half_steps and p // 4 * 3 >= max(rows, floor):
        p = p // 4 * 3
    return min(p, max_positions)
