"""Weight formats: the registry every loader, kernel, tuner, benchmark and CLI reads its formats from.

    from common import formats
    fmt = formats.get("int8")          # a WeightFormat: storage, scales, limits, capability, ...
    q, scale = fmt.quantize(w)         # numpy, the reference
    w2 = fmt.dequantize(q, scale)

A format is how the projections' weights are stored; `quantization=` (load, --quantization) asks for
one, an FP8 checkpoint is in one by itself (`resolve`). The registry's entries:

- "bf16": the checkpoint's floating values in the model dtype (no scales).
- "int8" (quantized at load from a bf16 checkpoint): symmetric per output row,
  `scale[i] = max(amax(w[i]), 1e-10) / 127`, `q = clip(round(w / scale), -127, 127)`;
  `w ~ q * scale[i]` (float32 scale [out]). -128 is never used, so negating a row is exact.
- "fp8" (Qwen's published FP8 checkpoints, or quantized at load into the same layout): e4m3 values
  and one multiplier per 128 x 128 block, `scale[i // 128, j // 128] = max(block amax, 1e-10) / 448`
  (`weight_scale_inv` in the checkpoint: despite its name, the multiplier), `w ~ q * scale`; values
  are clamped to +-448 before the cast (ml_dtypes gives NaN past 464).

Activations are a second axis (`ACTIVATIONS`): today every format is weight-only - activations stay
in the model dtype and products accumulate in float32, the semantics transformers uses when it loads
an FP8 checkpoint on a machine without fp8 matmuls. The tile tables key a projection's rows by both
(`tile_dtype`: "bfloat16", "bfloat16-int8", ...).

Adding a format is an entry here plus one dequantization branch per path (kernel and plain) per twin.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# numpy and ml_dtypes load when a value is first quantized or read: the CLIs build their --help and
# check their flags from the registry before the Ctrl-C handler's heavy imports (common.interrupt).


class QuantError(ValueError):
    """A weight format, quantization setting or quantized checkpoint that cannot be used."""


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """One entry of the registry."""

    name: str
    storage_name: str | None  # the stored values' dtype by numpy / ml_dtypes / torch name; None: the model dtype
    storage_bytes: int | None  # bytes per stored value (None: the model dtype's)
    max_value: float | None  # largest magnitude a stored value takes (quantize clips to it)
    scale_block: tuple[int, int] | None  # weight rows x columns per scale (0 columns: a whole row); None: no scales
    min_capability: tuple[int, int] | None  # CUDA capability the fused kernels need to convert the values
    head: str  # the lm_head's format when the projections are in this one
    code: int  # the kernels' format constant (torch_impl.kernels._jit.load_w's QUANT)
    help: str  # one line for --help and the docs
    checkpoint_config: dict | None = None  # config.json's quantization_config of checkpoints stored in it
    safetensors_dtype: str | None = None  # the dtype such a checkpoint's values have in safetensors

    @property
    def quantized(self) -> bool:
        return self.scale_block is not None

    @property
    def storage(self):
        """The stored values' numpy dtype (ml_dtypes for the one-byte floats); None: the model dtype."""
        if self.storage_name is None:
            return None
        import ml_dtypes
        import numpy as np

        return np.dtype(getattr(ml_dtypes, self.storage_name, None) or self.storage_name)

    @property
    def integer(self) -> bool:
        return self.storage_name is not None and self.storage_name.startswith(("int", "uint"))

    @property
    def row_block(self) -> int:
        """Weight rows per scale row: a shard or a packed part of the weight keeps whole multiples."""
        return 1 if self.scale_block is None else self.scale_block[0]

    @property
    def per_row(self) -> bool:
        """One scale per output row ([out] scales), multiplied after the sum over K."""
        return self.scale_block == (1, 0)

    def scale_shape(self, shape: tuple[int, int]) -> tuple[int, ...]:
        """The scale tensor's shape for a weight [out, in]."""
        rows, cols = self.scale_block or (0, 0)
        if not rows:
            return ()
        if not cols:
            return (-(-shape[0] // rows),)
        return -(-shape[0] // rows), -(-shape[1] // cols)

    def quantize(self, w):
        """w [out, in] -> (numpy values in `storage`, float32 scales of `scale_shape`)."""
        import numpy as np

        if not self.quantized:
            raise QuantError(f"format {self.name!r} stores no quantized values")
        w = np.asarray(w, np.float32)
        out, inp = w.shape
        if self.per_row:
            scale = np.maximum(np.abs(w).max(axis=1), 1e-10) / self.max_value
            q = np.clip(np.rint(w / scale[:, None]), -self.max_value, self.max_value)
            return q.astype(self.storage), scale.astype(np.float32)
        br, bc = self.scale_block
        sr, sc = self.scale_shape(w.shape)
        pad = np.zeros((sr * br, sc * bc), np.float32)
        pad[:out, :inp] = w
        blocks = pad.reshape(sr, br, sc, bc)
        scale = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-10) / self.max_value  # [sr, sc]
        q = np.clip(blocks / scale[:, None, :, None], -self.max_value, self.max_value).reshape(pad.shape)
        q = q[:out, :inp]
        return (np.rint(q) if self.integer else q).astype(self.storage), scale.astype(np.float32)

    def dequantize(self, q, scale, dtype=None):
        """The float weight [out, in] a quantized one stands for: q * its scale, in `dtype` (numpy;
        default float32)."""
        import numpy as np

        dtype = np.float32 if dtype is None else dtype
        q32 = np.asarray(q).astype(np.float32)
        s = np.asarray(scale).astype(np.float32)
        if self.per_row:
            return (q32 * s.reshape(-1)[:, None]).astype(dtype)
        br, bc = self.scale_block
        full = np.repeat(np.repeat(s, br, axis=0), bc, axis=1)[:q32.shape[0], :q32.shape[1]]
        return (q32 * full).astype(dtype)

    def check_sizes(self, cfg, source: str) -> None:
        """Each packed projection's parts whole scale blocks (a block may not straddle q and k, or
        gate and up), as in every Qwen3 release."""
        if self.row_block == 1:
            return
        for name, size in (("num_attention_heads * head_dim", cfg.q_size),
                           ("num_key_value_heads * head_dim", cfg.kv_size),
                           ("intermediate_size", cfg.intermediate_size)):
            if size % self.row_block:
                block = "x".join(map(str, self.scale_block))
                raise QuantError(f"{source}: {name}={size} is not a multiple of {self.row_block}: {self.name} weights "
                                 f"are stored in {block} blocks, which may not straddle two packed projections "
                                 f"(use quantization={per_row_format().name!r})")

    def tile_dtype(self, dtype: str, activations: str = "model") -> str:
        """The tile tables' dtype field: the activations' dtype name, with the format when quantized."""
        act = ACTIVATIONS_SUFFIX.get(activations)
        if act is None:
            raise QuantError(f"activations={activations!r}: expected one of {', '.join(ACTIVATIONS_SUFFIX)}")
        return dtype if not self.quantized else f"{dtype}-{self.name}{act}"


FORMATS: dict[str, WeightFormat] = {f.name: f for f in (
    WeightFormat("bf16", None, None, None, None, None, "bf16", 0,
                 "the checkpoint's floating values in the model dtype"),
    WeightFormat("int8", "int8", 1, 127.0, (1, 0), None, "int8", 1,
                 "int8 values, one float32 scale per output row (quantized at load)"),
    WeightFormat("fp8", "float8_e4m3fn", 1, 448.0, (128, 128), (8, 9), "bf16", 2,
                 "e4m3 values, one float32 scale per 128x128 block (Qwen's FP8 layout; an FP8 checkpoint loads "
                 "in it by itself)",
                 checkpoint_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "weight_block_size": [128, 128]},
                 safetensors_dtype="F8_E4M3"),
)}
NAMES: tuple[str, ...] = tuple(FORMATS)
QUANTIZED: tuple[str, ...] = tuple(n for n, f in FORMATS.items() if f.quantized)  # what quantization= takes
ACTIVATIONS_SUFFIX = {"model": ""}  # activation precisions: "model" = the model dtype (weight-only formats)


def get(name) -> WeightFormat:
    """The registry entry `name` (a WeightFormat passes through; None is "bf16")."""
    if isinstance(name, WeightFormat):
        return name
    fmt = FORMATS.get("bf16" if name is None else name)
    if fmt is None:
        raise QuantError(f"weight format {name!r}: expected one of {', '.join(NAMES)}")
    return fmt


def of_tile_dtype(dtype: str) -> WeightFormat:
    """The weights' format of a tile-table dtype field ("bfloat16" -> bf16, "bfloat16-int8" -> int8)."""
    _, _, suffix = dtype.partition("-")
    return get(suffix or None)


def per_row_format() -> WeightFormat:
    """The quantized format any shape can take (one scale per row): the advice when a block one cannot."""
    return next(f for f in FORMATS.values() if f.per_row)


def check_quantization(name) -> str | None:
    """A `quantization=` value (None, "none", or one of QUANTIZED) -> the format name, or None."""
    if name in (None, "none", "None", ""):
        return None
    if name not in QUANTIZED:
        raise QuantError(f"quantization={name!r}: expected one of {', '.join(QUANTIZED)} (or None)")
    return name


def cli_choices() -> list[str]:
    """--quantization's choices: "none" and every quantized format."""
    return ["none", *QUANTIZED]


def cli_help() -> str:
    """--quantization's help: what each choice stores."""
    return "; ".join(f"{n}: {FORMATS[n].help}" for n in QUANTIZED)


def parse_quantization_config(d: Any, source: str) -> WeightFormat | None:
    """config.json's quantization_config -> the format its checkpoint is stored in (None when absent);
    one error naming the field for anything else than a layout of the registry."""
    if d is None:
        return None
    if not isinstance(d, dict):
        raise QuantError(f"{source}: quantization_config={d!r}: expected an object")
    method = d.get("quant_method")
    stored = {f.checkpoint_config["quant_method"]: f for f in FORMATS.values() if f.checkpoint_config}
    fmt = stored.get(method)
    if fmt is None:
        raise QuantError(f"{source}: quantization_config.quant_method={method!r}: only "
                         f"{', '.join(repr(m) for m in stored)} checkpoints (Qwen's releases) are read; load the bf16 "
                         f"checkpoint with quantization= one of {', '.join(QUANTIZED)}")
    want = fmt.checkpoint_config
    if d.get("fmt", want["fmt"]) != want["fmt"]:
        raise QuantError(f"{source}: quantization_config.fmt={d.get('fmt')!r}: expected {want['fmt']!r}")
    block = d.get("weight_block_size")
    if not (isinstance(block, list) and block == want["weight_block_size"]):
        raise QuantError(f"{source}: quantization_config.weight_block_size={block!r}: expected "
                         f"{want['weight_block_size']}")
    if d.get("modules_to_not_convert"):
        raise QuantError(f"{source}: quantization_config.modules_to_not_convert is not supported")
    return fmt


def resolve(quantization, stored: WeightFormat | None, source: str) -> WeightFormat:
    """The format the projections load in: a quantized checkpoint's own (`stored`), else the one
    `quantization` asks for, else "bf16"; a request to quantize a checkpoint quantized already fails."""
    q = check_quantization(quantization)
    if stored is not None:
        if q not in (None, stored.name):
            raise QuantError(f"{source}: a checkpoint stored in {stored.name}; quantization={q!r} would quantize "
                             f"weights that are quantized already (load it as it is: quantization=None or "
                             f"{stored.name!r})")
        return stored
    return get(q)


@dataclasses.dataclass
class QWeight:
    """A quantized [out, in] weight: q (values in the format's storage), scale (the format's
    scale_shape, float32), fmt (the format's name). Arrays of any framework: the loaders place numpy
    ones on their device."""

    q: Any
    scale: Any
    fmt: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def format(self) -> WeightFormat:
        return FORMATS[self.fmt]


def head_format(fmt) -> str:
    """The lm_head's format when the projections load in `fmt` (the entry's `head`): int8 quantizes
    it too (one scale per vocabulary row; with tied embeddings a quantized copy of the embedding, the
    lookup keeps the float table), fp8 keeps it in the model dtype as Qwen's FP8 checkpoints publish it."""
    return get(fmt).head


def quantize(w, fmt):
    return get(fmt).quantize(w)


def dequantize(q, scale, fmt, dtype=None):
    return get(fmt).dequantize(q, scale, dtype)


__all__ = ["FORMATS", "NAMES", "QUANTIZED", "ACTIVATIONS_SUFFIX", "WeightFormat", "QWeight", "QuantError", "get",
           "check_quantization", "cli_choices", "cli_help", "parse_quantization_config", "resolve", "head_format",
           "quantize", "dequantize", "per_row_format", "of_tile_dtype"]
