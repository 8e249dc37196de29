"""Random-weight checkpoints with the real preset shapes, written once per run directory."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

from common.checkpoint import write_checkpoint
from common.config import Qwen3Config

DEFAULT_DIR = Path(os.environ.get("QWEN3_BENCH_CKPT_DIR", "/tmp/qwen3-bench-ckpt"))


def random_checkpoint(preset: str, *, layers: int | None = None, root: Path = DEFAULT_DIR,
                      dtype: str = "bfloat16") -> Path:
    """A checkpoint of `preset` (optionally fewer layers) with random weights; reused if present."""
    cfg = Qwen3Config.preset(preset)
    if layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    path = root / f"{preset}-L{cfg.num_hidden_layers}-{dtype}"
    if (path / "config.json").is_file():
        return path
    t0 = time.perf_counter()
    print(f"writing random {preset} checkpoint ({cfg.num_parameters() / 1e9:.2f}B parameters) to {path} ...",
          file=sys.stderr, flush=True)
    tmp = path.with_name(path.name + ".partial")
    write_checkpoint(tmp, cfg, dtype=dtype, fast=True, shards=max(1, cfg.num_parameters() // 2_000_000_000))
    tmp.rename(path)
    print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return path
