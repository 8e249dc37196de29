"""Weight formats (numpy, the reference): int8 per output channel, fp8 e4m3 in 128x128 blocks.

- "int8" (quantized at load from a bf16 checkpoint): symmetric per output row,
  `scale[i] = max(amax(w[i]), 1e-10) / 127`, `q = clip(round(w / scale), -127, 127)`;
  `w ~ q * scale[i]` (float32 scale [out]). -128 is never used, so negating a row is exact.
- "fp8" (Qwen's published FP8 checkpoints, or quantized at load into the same layout): e4m3 values
  and one multiplier per 128 x 128 block, `scale[i // 128, j // 128] = max(block amax, 1e-10) / 448`
  (`weight_scale_inv` in the checkpoint: despite its name, the multiplier), `w ~ q * scale`; values
  are clamped to +-448 before the cast (ml_dtypes gives NaN past 464).

Both are weight-only: activations stay in the model dtype, products accumulate in float32 - the
same semantics transformers uses when it loads an FP8 checkpoint on a machine without fp8 matmuls.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np

FORMATS = ("bf16", "int8", "fp8")  # "bf16": the checkpoint's floating values in the model dtype
QUANTIZATIONS = ("int8", "fp8")
FP8_BLOCK = 128
FP8_MAX = 448.0
INT8_MAX = 127
E4M3 = ml_dtypes.float8_e4m3fn


@dataclasses.dataclass
class QWeight:
    """A quantized [out, in] weight: q (int8 or e4m3), scale (int8: [out]; fp8: [out/128, in/128]
    float32), fmt. Arrays of any framework: the loaders place numpy ones on their device."""

    q: Any
    scale: Any
    fmt: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)


class QuantError(ValueError):
    """A quantization setting or quantized checkpoint that cannot be used."""


@dataclasses.dataclass(frozen=True)
class CheckpointQuant:
    """What a checkpoint's config.json says of its quantization (`quantization_config`)."""

    method: str  # "fp8"
    block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)
    activation_scheme: str = "dynamic"


def parse_quantization_config(d: Any, source: str) -> CheckpointQuant | None:
    """config.json's quantization_config -> CheckpointQuant (None when absent); one error naming the
    field for anything else than Qwen's FP8 layout."""
    if d is None:
        return None
    if not isinstance(d, dict):
        raise QuantError(f"{source}: quantization_config={d!r}: expected an object")
    method = d.get("quant_method")
    if method != "fp8":
        raise QuantError(f"{source}: quantization_config.quant_method={method!r}: only 'fp8' checkpoints (Qwen's "
                         f"FP8 releases) are read; load the bf16 checkpoint with quantization='int8' or 'fp8'")
    fmt = d.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise QuantError(f"{source}: quantization_config.fmt={fmt!r}: expected 'e4m3'")
    block = d.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and tuple(block) == (FP8_BLOCK, FP8_BLOCK)):
        raise QuantError(f"{source}: quantization_config.weight_block_size={block!r}: expected "
                         f"[{FP8_BLOCK}, {FP8_BLOCK}]")
    if d.get("modules_to_not_convert"):
        raise QuantError(f"{source}: quantization_config.modules_to_not_convert is not supported")
    return CheckpointQuant("fp8", (FP8_BLOCK, FP8_BLOCK), str(d.get("activation_scheme", "dynamic")))


def check_quantization(name) -> str | None:
    if name in (None, "none", "None", ""):
        return None
    if name not in QUANTIZATIONS:
        raise QuantError(f"quantization={name!r}: expected one of {', '.join(QUANTIZATIONS)} (or None)")
    return name


def head_format(fmt: str) -> str:
    """The lm_head's format when the projections load in `fmt`: int8 quantizes it too (one scale per
    vocabulary row; with tied embeddings a quantized copy of the embedding, the lookup keeps the
    float table), fp8 keeps it in the model dtype as Qwen's FP8 checkpoints publish it."""
    return "int8" if fmt == "int8" else "bf16"


def check_fp8_sizes(cfg, source: str) -> None:
    """fp8 weights of a config: each packed projection's parts whole 128-row blocks (a block may not
    straddle q and k, or gate and up), as in every Qwen3 release."""
    for name, size in (("num_attention_heads * head_dim", cfg.q_size), ("num_key_value_heads * head_dim",
                                                                         cfg.kv_size),
                       ("intermediate_size", cfg.intermediate_size)):
        if size % FP8_BLOCK:
            raise QuantError(f"{source}: {name}={size} is not a multiple of {FP8_BLOCK}: fp8 weights are stored in "
                             f"{FP8_BLOCK}x{FP8_BLOCK} blocks, which may not straddle two packed projections "
                             f"(use quantization='int8')")


def fp8_scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
    return -(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK)


def quantize_int8(w) -> tuple[np.ndarray, np.ndarray]:
    """w [out, in] -> (int8 [out, in], float32 scale [out])."""
    w = np.asarray(w, np.float32)
    scale = np.maximum(np.abs(w).max(axis=1), 1e-10) / INT8_MAX
    q = np.clip(np.rint(w / scale[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale.astype(np.float32)


def quantize_fp8(w) -> tuple[np.ndarray, np.ndarray]:
    """w [out, in] -> (e4m3 [out, in], float32 scale [ceil(out/128), ceil(in/128)])."""
    w = np.asarray(w, np.float32)
    out, inp = w.shape
    sr, sc = fp8_scale_shape(w.shape)
    pad = np.zeros((sr * FP8_BLOCK, sc * FP8_BLOCK), np.float32)
    pad[:out, :inp] = w
    blocks = pad.reshape(sr, FP8_BLOCK, sc, FP8_BLOCK)
    scale = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-10) / FP8_MAX  # [sr, sc]
    q = np.clip(blocks / scale[:, None, :, None], -FP8_MAX, FP8_MAX).reshape(pad.shape)[:out, :inp]
    return q.astype(E4M3), scale.astype(np.float32)


def dequantize(q, scale, fmt: str, dtype=np.float32) -> np.ndarray:
    """The float weight [out, in] a quantized one stands for."""
    q32 = np.asarray(q).astype(np.float32)
    s = np.asarray(scale).astype(np.float32)
    if fmt == "int8":
        return (q32 * s.reshape(-1)[:, None]).astype(dtype)
    if fmt == "fp8":
        full = np.repeat(np.repeat(s, FP8_BLOCK, axis=0), FP8_BLOCK, axis=1)[:q32.shape[0], :q32.shape[1]]
        return (q32 * full).astype(dtype)
    raise QuantError(f"format={fmt!r}: expected 'int8' or 'fp8'")


def quantize(w, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    if fmt == "int8":
        return quantize_int8(w)
    if fmt == "fp8":
        return quantize_fp8(w)
    raise QuantError(f"format={fmt!r}: expected 'int8' or 'fp8'")
