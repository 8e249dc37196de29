"""Tuned tiles per GPU: data, not code.

`tuned/<gpu name>.json` maps "<kernel>/m<bucket>/n<N>/k<K>" to MatmulTiles fields (and
"decode_attention/b<bucket>/h<Hkv>/c<context bucket>" to AttentionTiles fields), written from the
sweep of bench/torch_kernels_probe.py. A launcher asks here first and falls back to common.tiles'
`default_for` when the GPU or the shape has no entry (and always on CPU).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

from common.tiles import AttentionTiles, MatmulTiles, next_pow2

TUNED_DIR = Path(__file__).parent / "tuned"


def m_bucket(m: int) -> int:
    """Token-count buckets: 1 (GEMV), up to 16 (one 16-row dot tile), then powers of two up to 128."""
    return 1 if m <= 1 else 16 if m <= 16 else min(128, next_pow2(m))


def device_file(name: str) -> Path:
    return TUNED_DIR / (re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ".json")


@functools.lru_cache(maxsize=None)
def _table(index: int) -> dict:
    path = device_file(torch.cuda.get_device_name(index))
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def matmul_key(kernel: str, m: int, n: int, k: int) -> str:
    return f"{kernel}/m{m_bucket(m)}/n{n}/k{k}"


def attention_key(batch: int, num_kv_heads: int, max_context: int, one_block: bool = False) -> str:
    """one_block: every sequence's keys lie in one cache block (the standalone runner's layout)."""
    key = f"decode_attention/b{m_bucket(batch)}/h{num_kv_heads}/c{next_pow2(max_context)}"
    return key + "/one-block" if one_block else key


def matmul_tiles(kernel: str, device: torch.device, m: int, n: int, k: int) -> MatmulTiles:
    """The tuned tiles of this projection on this GPU, else common's per-shape default."""
    if device.type == "cuda":
        entry = _table(device.index if device.index is not None else torch.cuda.current_device()).get(
            matmul_key(kernel, m, n, k))
        if entry:
            return MatmulTiles(**entry)
    return MatmulTiles.default_for(m, n, k)


def attention_tiles(device: torch.device, batch: int, num_kv_heads: int, max_context: int,
                    one_block: bool = False) -> AttentionTiles:
    """Tuned tiles (those of the one-block layout first, when it applies), else common's default."""
    if device.type == "cuda":
        table = _table(device.index if device.index is not None else torch.cuda.current_device())
        keys = [attention_key(batch, num_kv_heads, max_context)]
        if one_block:
            keys.insert(0, attention_key(batch, num_kv_heads, max_context, one_block=True))
        entry = next((table[k] for k in keys if k in table), None)
        if entry:
            return AttentionTiles(**entry)
    return AttentionTiles.default_for(batch, num_kv_heads, max_context)
