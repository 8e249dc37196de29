"""Tensor-parallel shards of the weight plan: what rank r of N holds of each parameter.

The plan row's shard axis (common.weights.PLAN) says how a parameter splits:
- "column": the output rows. A packed parameter splits each of its sources alike, so rank r holds
  the r-th part of q, of k and of v (whole kv-head groups: the query heads of a kv head stay with
  it), or of gate and of up, concatenated in the packed order.
- "row": the input columns (o_proj over the query heads, down over the intermediate size); each
  rank's product is a partial sum, all-reduced, with the residual added once.
- "vocab": the vocabulary rows (ceil(V / N) per rank, the last one shorter).
- "replicated": the whole tensor on every rank.
Quantized weights (common.formats.QWeight) split the same way with their scales: per-row scales
follow the rows; block scales follow whole blocks, so every shard boundary must fall on a multiple
of the block (checked by check_tensor_parallel).

Works on numpy, torch and jax arrays alike (slicing, and `concat` for packed parameters).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from common.config import Qwen3Config
from common import formats
from common.formats import QWeight
from common.weights import ROWS, source_rows


LM_HEAD_SHARDS = ("vocab", "replicated")  # the head (and embedding) split by vocabulary rows, or whole on each rank


class TensorParallelError(ValueError):
    """A tensor-parallel size this model cannot be split into."""


def check_size(size, what: str = "tensor_parallel_size") -> int:
    """A tensor-parallel size: a positive integer, whatever the model."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise TensorParallelError(f"{what}={size!r}: expected a positive integer")
    return size


def check_lm_head_shard(value) -> str:
    if value not in LM_HEAD_SHARDS:
        raise TensorParallelError(f"lm_head_shard={value!r}: expected one of {', '.join(map(repr, LM_HEAD_SHARDS))}")
    return value


def check_tensor_parallel(cfg: Qwen3Config, size, fmt: str = "bf16", *, what: str = "tensor_parallel_size") -> int:
    """`size` as an int, or one clear error naming the value and what it must divide."""
    check_size(size, what)
    for name, n in (("num_key_value_heads", cfg.num_key_value_heads), ("num_attention_heads", cfg.num_attention_heads),
                    ("intermediate_size", cfg.intermediate_size)):
        if n % size:
            raise TensorParallelError(f"{what}={size}: the model's {name} ({n}) is not divisible by it "
                                      f"(kv heads are split whole; try a divisor of {cfg.num_key_value_heads})")
    fmt = formats.get(fmt)
    block = max(fmt.scale_block or (1,))
    if block > 1 and size > 1:  # one rank: WeightFormat.check_sizes says it
        for name, n in (("q_size", cfg.q_size), ("kv_size", cfg.kv_size), ("intermediate_size", cfg.intermediate_size)):
            if (n // size) % block:
                raise TensorParallelError(f"{what}={size}: {fmt.name} weights split in whole {block}-blocks, but the "
                                          f"model's {name} ({n}) gives {n // size} per rank")
    return size


def shard_config(cfg: Qwen3Config, size: int) -> Qwen3Config:
    """The shapes one rank computes with: 1/size of the heads and of the intermediate size."""
    if size == 1:
        return cfg
    check_tensor_parallel(cfg, size)
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // size,
                               num_key_value_heads=cfg.num_key_value_heads // size,
                               intermediate_size=cfg.intermediate_size // size)


def shard_ranges(key: str, cfg: Qwen3Config, size: int, rank: int) -> list[tuple[int, int]]:
    """(first, count) along plan row `key`'s shard axis that rank `rank` of `size` holds: rows of
    the packed parameter ("column", "vocab"), columns ("row"), or the whole ("replicated")."""
    row = ROWS[key]
    if not 0 <= rank < size:
        raise TensorParallelError(f"rank {rank} of tensor_parallel_size={size}")
    if row.shard == "column":
        return [(start + rank * (n // size), n // size) for _, start, n in source_rows(key, cfg)]
    if row.shard == "row":
        n = {"w_o": cfg.q_size, "w_down": cfg.intermediate_size}[key]
        return [(rank * (n // size), n // size)]
    if row.shard == "vocab":
        first, count, _ = vocab_shard(cfg.vocab_size, size, rank)
        return [(first, count)]
    return []


def vocab_shard(vocab_size: int, size: int, rank: int) -> tuple[int, int, int]:
    """(first row, rows, rows per rank) of rank `rank`'s vocabulary slice: ceil(V / size) rows per
    rank, the last one shorter (its logits are padded to the common width before they are gathered)."""
    per = -(-vocab_size // size)
    first = min(rank * per, vocab_size)
    return first, min(per, vocab_size - first), per


def source_ranges(key: str, shard_id, cfg: Qwen3Config, size: int, rank: int) -> list[tuple[int, int]]:
    """(first, count) along plan row `key`'s shard axis inside ONE of its source tensors, whole as
    nano-vllm's loader hands it to a weight_loader: `shard_id` names the source of a packed parameter
    (nano-vllm's id: "q", "k", "v"; 0, 1), None for an unpacked one."""
    row = ROWS[key]
    ranges = shard_ranges(key, cfg, size, rank)
    if shard_id is None or not row.shard_ids:
        if shard_id is not None:
            raise TensorParallelError(f"plan row {key}: not a packed parameter, but shard id {shard_id!r}")
        return ranges
    if shard_id not in row.shard_ids:
        raise TensorParallelError(f"plan row {key}: unknown shard id {shard_id!r} (expected one of "
                                  f"{list(row.shard_ids)})")
    j = row.shard_ids.index(shard_id)  # packed parameters split by rows ("column"), each source alike
    start = source_rows(key, cfg)[j][1]
    first, n = ranges[j]
    return [(first - start, n)]


def take_shard(key: str, w: Any, cfg: Qwen3Config, size: int, rank: int,
               concat: Callable[[list[Any]], Any]) -> Any:
    """Rank `rank`'s part of parameter `key` (an array in the plan's [out, in] layout, or a QWeight)."""
    if size == 1 or ROWS[key].shard == "replicated":
        return w
    return _take_weight(w, shard_ranges(key, cfg, size, rank), ROWS[key].shard == "row", concat)


def take_source_shard(key: str, shard_id, w: Any, cfg: Qwen3Config, size: int, rank: int, *, block: int = 1) -> Any:
    """Rank `rank`'s part of one whole source tensor of plan row `key` (see source_ranges): an array, a
    QWeight of that source, or with block=b a block-scale tensor of b-row blocks (ranges counted in blocks)."""
    if size == 1 or ROWS[key].shard == "replicated":
        return w
    ranges = [(s // block, -(-n // block)) for s, n in source_ranges(key, shard_id, cfg, size, rank)]
    return _take_weight(w, ranges, ROWS[key].shard == "row", concat=None)  # one range: nothing to concatenate


def _take_weight(w: Any, ranges: list[tuple[int, int]], cols: bool, concat) -> Any:
    if isinstance(w, QWeight):
        if not w.format.per_row:  # block scales: whole blocks along the split axis
            b = w.format.scale_block[1 if cols else 0]
            blocks = [(s // b, n // b) for s, n in ranges]
            return QWeight(_take(w.q, ranges, cols, concat), _take(w.scale, blocks, cols, concat), w.fmt)
        scale = w.scale if cols else _take(w.scale, ranges, False, concat)  # one scale per output row
        return QWeight(_take(w.q, ranges, cols, concat), scale, w.fmt)
    return _take(w, ranges, cols, concat)


def _take(a: Any, ranges: list[tuple[int, int]], cols: bool, concat):
    parts = [a[:, s:s + n] if cols else a[s:s + n] for s, n in ranges]
    return parts[0] if len(parts) == 1 else concat(parts)


__all__ = ["LM_HEAD_SHARDS", "TensorParallelError", "check_lm_head_shard", "check_size", "check_tensor_parallel", "shard_config", "shard_ranges", "source_ranges",
           "take_shard", "take_source_shard", "vocab_shard"]
