"""Random-weight checkpoints with the real preset shapes, written once per run directory."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

from common.checkpoint import write_checkpoint, write_tokenizer
from common.config import Qwen3Config

DEFAULT_DIR = Path(os.environ.get("QWEN3_BENCH_CKPT_DIR", "/tmp/qwen3-bench-ckpt"))


def random_checkpoint(preset: str, *, layers: int | None = None, root: Path = DEFAULT_DIR,
                      dtype: str = "bfloat16", tokenizer: bool = False) -> Path:
    """A checkpoint of `preset` (optionally fewer layers) with random weights; reused if present.
    `tokenizer`: with a small byte-level tokenizer too (engines that build one from the directory)."""
    cfg = Qwen3Config.preset(preset)
    if layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    path = root / f"{preset}-L{cfg.num_hidden_layers}-{dtype}"
    if (path / "config.json").is_file():
        if tokenizer and not (path / "tokenizer.json").is_file():
            write_tokenizer(path, cfg.vocab_size)
        return path
    t0 = time.perf_counter()
    print(f"writing random {preset} checkpoint ({cfg.num_parameters() / 1e9:.2f}B parameters) to {path} ...",
          file=sys.stderr, flush=True)
    tmp = path.with_name(path.name + ".partial")
    write_checkpoint(tmp, cfg, dtype=dtype, fast=True, shards=max(1, cfg.num_parameters() // 2_000_000_000),
                     tokenizer=tokenizer)
    tmp.rename(path)
    print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return path
