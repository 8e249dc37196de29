"""Checkpoint reading and validation, the one tensor-name map, and the packing plan.

`Checkpoint(model_dir)` reads config.json and the safetensors headers (one model.safetensors,
or the shards of model.safetensors.index.json), and validates every tensor against the config
before any model is built. Tensors are then read one at a time through safetensors' own
framework readers (`framework="numpy" | "flax" | "pt"`), so loading never holds two copies of
the weights: `iter_params` yields each model parameter (packed where the plan says so) and the
caller places it on the device before asking for the next.

Layout: both twins store every matrix in the Hugging Face orientation [out_features,
in_features] (the reduction axis contiguous, which is what the decode GEMV kernels stream best);
packed matrices stack their sources along the output axis: w_qkv = [q; k; v], w_gate_up =
[gate; up]. Never loads pickles: only *.safetensors files are opened.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors' numpy reader needs it)
import numpy as np

from common import progress
from common.config import ConfigError, Qwen3Config
from common.safetensors_io import (DTYPE_BYTES, FLOAT_DTYPES, INDEX_FILE, SINGLE_FILE, TensorInfo, WeightsError,
                                   _checkpoint_files, read_header)
from common import formats
from common.formats import QuantError, QWeight, WeightFormat, head_format, parse_quantization_config

log = logging.getLogger(__name__)

# ----- the plan: the one tensor-name map ---------------------------------------------------------

WEIGHT_FORMATS = formats.NAMES  # common.formats' registry
SHARD_AXES = ("column", "row", "vocab", "replicated")


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """One model parameter: where its values come from and what it is.

    key: the twins' parameter key ("w_qkv"); sources: the Hugging Face tensors (per-layer names after
    "model.layers.{i}.") stacked along axis 0, in order; module: the packed parameter's name in
    torch_impl's model, which is nano-vllm's ("self_attn.qkv_proj.weight"); shard_ids: nano-vllm's
    shard id of each source in the packed parameter; format: the weight format (WEIGHT_FORMATS);
    shard: the tensor-parallel axis - "column" splits the output rows (QKV by kv-head groups, gate
    and up alike), "row" the input columns (its output all-reduced, the residual added once),
    "vocab" the vocabulary rows, "replicated" none.
    """

    key: str
    sources: tuple[str, ...]
    module: str
    shard_ids: tuple = ()
    format: str = "bf16"
    shard: str = "replicated"
    layer: bool = True
    quantizable: bool = False  # a projection: stored quantized when the load asks or the checkpoint is

    def __post_init__(self):
        if self.format not in WEIGHT_FORMATS or self.shard not in SHARD_AXES:
            raise ValueError(f"plan row {self.key}: format={self.format!r}, shard={self.shard!r}")
        if self.shard_ids and len(self.shard_ids) != len(self.sources):
            raise ValueError(f"plan row {self.key}: one shard id per source")


PLAN: tuple[PlanRow, ...] = (
    PlanRow("embed", ("model.embed_tokens.weight",), "model.embed_tokens.weight", shard="vocab", layer=False),
    PlanRow("final_norm", ("model.norm.weight",), "model.norm.weight", layer=False),
    PlanRow("lm_head", ("lm_head.weight",), "lm_head.weight", shard="vocab", layer=False),  # untied only
    PlanRow("input_norm", ("input_layernorm.weight",), "input_layernorm.weight"),
    PlanRow("w_qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
            "self_attn.qkv_proj.weight", ("q", "k", "v"), shard="column", quantizable=True),
    PlanRow("q_norm", ("self_attn.q_norm.weight",), "self_attn.q_norm.weight"),
    PlanRow("k_norm", ("self_attn.k_norm.weight",), "self_attn.k_norm.weight"),
    PlanRow("w_o", ("self_attn.o_proj.weight",), "self_attn.o_proj.weight", shard="row", quantizable=True),
    PlanRow("post_norm", ("post_attention_layernorm.weight",), "post_attention_layernorm.weight"),
    PlanRow("w_gate_up", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "mlp.gate_up_proj.weight", (0, 1),
            shard="column", quantizable=True),
    PlanRow("w_down", ("mlp.down_proj.weight",), "mlp.down_proj.weight", shard="row", quantizable=True),
)
ROWS: dict[str, PlanRow] = {row.key: row for row in PLAN}

# Views of the plan (derived, never written by hand):
LAYER_PLAN: dict[str, tuple[str, ...]] = {r.key: r.sources for r in PLAN if r.layer}
GLOBAL_PLAN: dict[str, str] = {r.key: r.sources[0] for r in PLAN if not r.layer}
# nano-vllm's packed_modules_mapping: HF module -> (packed module, shard id).
NANOVLLM_PACKED: dict[str, tuple[str, Any]] = {
    src.split(".")[-2]: (r.module.split(".")[-2], sid) for r in PLAN for src, sid in zip(r.sources, r.shard_ids)}
# Orientation each twin stores (see module doc): "out_in" = [out_features, in_features].
TWIN_LAYOUT = {"jax": "out_in", "torch": "out_in"}


def module_name(key: str, layer: int | None) -> str:
    """The full parameter name of plan row `key` in torch_impl's (nano-vllm's) model."""
    row = ROWS[key]
    return f"model.layers.{layer}.{row.module}" if row.layer else row.module


def source_rows(key: str, cfg: Qwen3Config) -> list[tuple[Any, int, int]]:
    """(shard id, first row, row count) of each source inside the packed parameter `key`."""
    row = ROWS[key]
    shapes = expected_shapes(cfg)
    out, start = [], 0
    for src, sid in zip(row.sources, row.shard_ids or [None] * len(row.sources)):
        n = shapes[layer_prefix(0) + src if row.layer else src][0]
        out.append((sid, start, n))
        start += n
    return out


def pack_layer(weights: dict[str, Any], i: int, concat: Callable[[list[Any]], Any]) -> dict[str, Any]:
    """Layer i's parameters by plan key, from tensors by Hugging Face name (the reference's use)."""
    out = {}
    for key, sources in LAYER_PLAN.items():
        parts = [weights[layer_prefix(i) + s] for s in sources]
        out[key] = parts[0] if len(parts) == 1 else concat(parts)
    return out


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def expected_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face Qwen3 checkpoint of this config holds, with its shape."""
    h, d = cfg.hidden_size, cfg.head_dim
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (cfg.q_size, h), "self_attn.k_proj.weight": (cfg.kv_size, h),
        "self_attn.v_proj.weight": (cfg.kv_size, h), "self_attn.o_proj.weight": (h, cfg.q_size),
        "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
        "mlp.gate_proj.weight": (cfg.intermediate_size, h), "mlp.up_proj.weight": (cfg.intermediate_size, h),
        "mlp.down_proj.weight": (h, cfg.intermediate_size),
    }
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        shapes.update({layer_prefix(i) + k: v for k, v in per_layer.items()})
    return shapes


SCALE_SUFFIX = "_scale_inv"  # quantized checkpoints: <projection>.weight_scale_inv, the scales (multipliers)
QUANT_SOURCES = frozenset(src for row in PLAN if row.quantizable for src in row.sources)


def round_trip_projections(weights: dict, fmt: str) -> dict:
    """HF-named float weights with each projection replaced by its `fmt` quantization, dequantized
    (float32): what a model loaded with quantization=fmt multiplies by, the lm_head as
    common.formats.head_format says. Per source tensor: scale rows and blocks never straddle two
    sources (packed sizes are whole blocks)."""
    fmt, head = formats.get(fmt), formats.get(head_format(fmt))
    out = {k: (fmt.dequantize(*fmt.quantize(v)) if k.split(".", 3)[-1] in QUANT_SOURCES else v)
           for k, v in weights.items()}
    if head.quantized:  # the head too; a tied model's is a quantized copy of the embedding
        w = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
        out["lm_head.weight"] = head.dequantize(*head.quantize(np.asarray(w, np.float32)))
    return out


def scale_shapes(cfg: Qwen3Config, fmt: WeightFormat) -> dict[str, tuple[int, ...]]:
    """The scale tensors of a checkpoint stored in `fmt`, with their shapes."""
    shapes = expected_shapes(cfg)
    return {name + SCALE_SUFFIX: fmt.scale_shape(shape) for name, shape in shapes.items()
            if name.split(".", 3)[-1] in QUANT_SOURCES}


class Checkpoint:
    """A validated Hugging Face Qwen3 checkpoint directory."""

    def __init__(self, model_dir: str | Path, config: Qwen3Config | None = None, *, strict: bool = True):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise WeightsError(f"{self.dir}: model directory does not exist")
        self.config = config or Qwen3Config.from_pretrained(self.dir)
        cfg_file = self.dir / "config.json"
        raw = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        try:
            self.stored_format: WeightFormat | None = parse_quantization_config(raw.get("quantization_config"),
                                                                           str(cfg_file))
        except QuantError as e:
            raise WeightsError(str(e)) from None
        self.files = _checkpoint_files(self.dir)
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            for name, info in read_header(path).items():
                if name in self.tensors:
                    raise WeightsError(f"{path}: tensor {name!r} is also in {self.tensors[name].file}")
                self.tensors[name] = info
        self.validate(strict=strict)

    def validate(self, *, strict: bool = True) -> None:
        want = expected_shapes(self.config)
        cfg_file = self.dir / "config.json"
        if self.stored_format is not None:
            self._validate_stored(want, cfg_file)
            want = {k: v for k, v in want.items() if k.split(".", 3)[-1] not in QUANT_SOURCES}
            want.update(scale_shapes(self.config, self.stored_format))
        for name, shape in want.items():
            info = self.tensors.get(name)
            if info is None:
                raise WeightsError(f"{self.dir}: missing tensor {name!r} (expected shape {list(shape)} "
                                   f"from {cfg_file})")
            if info.shape != shape:
                raise WeightsError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected "
                                   f"{list(shape)} from {cfg_file}")
            if info.dtype not in FLOAT_DTYPES:
                raise WeightsError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, expected a "
                                   f"floating dtype ({', '.join(sorted(FLOAT_DTYPES))})")
        extra = sorted(set(self.tensors) - set(want) - (set(expected_shapes(self.config)) if self.stored_format else set()))
        # A tied checkpoint that still stores lm_head (some exporters do) is harmless: ignore it.
        if self.config.tie_word_embeddings and "lm_head.weight" in extra:
            extra.remove("lm_head.weight")
        if extra:
            msg = (f"{self.dir}: unexpected tensor(s) not in a Qwen3 checkpoint of this config: "
                   f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
            if strict:
                raise WeightsError(msg)
            log.warning(msg)

    def _validate_stored(self, want: dict, cfg_file: Path) -> None:
        """The projections of a quantized checkpoint: values in its format and a scale tensor each."""
        dtype = self.stored_format.safetensors_dtype
        for name, shape in want.items():
            if name.split(".", 3)[-1] not in QUANT_SOURCES:
                continue
            info = self.tensors.get(name)
            if info is None:
                raise WeightsError(f"{self.dir}: missing tensor {name!r} (expected shape {list(shape)} from {cfg_file})")
            if info.shape != shape or info.dtype != dtype:
                raise WeightsError(f"{info.file}: tensor {name!r} is {info.dtype} {list(info.shape)}, expected "
                                   f"{dtype} {list(shape)} (quantization_config of {cfg_file})")
            if name + SCALE_SUFFIX not in self.tensors:
                kind = "scales" if self.stored_format.per_row else "block scales"
                raise WeightsError(f"{self.dir}: missing tensor {name + SCALE_SUFFIX!r}: the {kind} of "
                                   f"{name!r} (a checkpoint stored in {self.stored_format.name}, {cfg_file})")

    # ----- reading ------------------------------------------------------------------------------
    def read(self, name: str, framework: str = "numpy") -> Any:
        """One tensor through safetensors' reader for `framework` ("numpy", "flax", "pt"); a quantized
        checkpoint's values as numpy arrays of its format's storage, read from the file's bytes
        (safetensors' numpy reader refuses one-byte floats)."""
        from safetensors import SafetensorError, safe_open

        info = self.tensors.get(name)
        if info is None:
            raise WeightsError(f"{self.dir}: no tensor {name!r}")
        stored = self._stored_format(info)
        if stored is not None:
            return self._read_raw(info, stored)
        try:
            with safe_open(str(info.file), framework=framework) as f:
                return f.get_tensor(name)
        except SafetensorError as e:
            raise WeightsError(f"{info.file}: cannot read tensor {name!r} ({e})") from None

    @staticmethod
    def _stored_format(info: TensorInfo) -> WeightFormat | None:
        """The registry format whose checkpoints store values of this tensor's dtype."""
        return next((f for f in formats.FORMATS.values() if f.safetensors_dtype == info.dtype), None)

    def _read_raw(self, info: TensorInfo, fmt: WeightFormat):
        with open(info.file, "rb") as f:
            f.seek(info.start)
            data = f.read(info.nbytes)
        if len(data) != info.nbytes:
            raise WeightsError(f"{info.file}: truncated: tensor {info.name!r}")
        return np.frombuffer(data, dtype=fmt.storage).reshape(info.shape)

    def read_dense(self, name: str):
        """A float32 numpy copy of HF tensor `name`, dequantized when the checkpoint stores it quantized."""
        stored = self._stored_format(self.tensors[name])
        if stored is not None:
            return stored.dequantize(self.read(name), self.read(name + SCALE_SUFFIX))
        return np.asarray(self.read(name), np.float32)

    def read_all(self, framework: str = "numpy") -> dict[str, Any]:
        """Every expected tensor by Hugging Face name (for the reference and small models)."""
        names = list(expected_shapes(self.config))
        out = {}
        with progress.bar(sum(self.tensors[n].nbytes for n in names), f"loading {self.dir.name}") as pb:
            for name in names:  # a quantized checkpoint's projections dequantized (weight-only semantics)
                out[name] = self.read_dense(name) if self.stored_format else self.read(name, framework)
                pb.update(self.tensors[name].nbytes)
        return out

    def weight_format(self, quantization=None) -> str:
        """The format the projections load in (common.formats.resolve): a quantized checkpoint's own,
        else `quantization`, else "bf16"."""
        try:
            fmt = formats.resolve(quantization, self.stored_format, str(self.dir))
            fmt.check_sizes(self.config, str(self.dir / "config.json"))
        except QuantError as e:
            raise WeightsError(str(e)) from None
        return fmt.name

    def _quantized(self, i: int, sources, fmt: str):
        """A projection's packed sources as a numpy QWeight in `fmt`: a quantized checkpoint's values
        and scales as stored (each source a whole number of scale rows), or quantized here from its floats."""
        names = [layer_prefix(i) + s for s in sources]
        if self.stored_format is None:
            return QWeight(*formats.get(fmt).quantize(np.concatenate([np.asarray(self.read(n), np.float32) for n in names])),
                           fmt)
        block = self.stored_format.row_block
        if len(names) > 1:
            for n in names:
                if self.tensors[n].shape[0] % block:
                    raise WeightsError(f"{self.tensors[n].file}: tensor {n!r} has {self.tensors[n].shape[0]} rows, "
                                       f"not a multiple of {block}: its blocks cannot be packed with {names}")
        q = np.concatenate([self.read(n) for n in names])
        scale = np.concatenate([np.asarray(self.read(n + SCALE_SUFFIX), np.float32) for n in names])
        return QWeight(q, scale, self.stored_format.name)

    def iter_params(self, framework: str, concat: Callable[[list[Any]], Any],
                    convert: Callable[[Any], Any] = lambda a: a, *, quantization=None,
                    convert_quant: Callable[[Any], Any] = lambda w: w,
                    all_finite: Callable[[Any], Any] | None = None) -> Iterator[tuple[int | None, str, Any]]:
        """Yield (layer index or None, parameter key, array) following the packing plan.

        `all_finite(array)` (the twin's, on the array `convert` made: on the device, without a sync)
        returns a flag read once after the last parameter; a false one raises WeightsError naming the
        file and the tensor with NaN or inf values (a quantized projection: its scales). With
        all_finite None nothing is checked.

        `concat` stacks a packed parameter's sources along axis 0; `convert` runs on each result
        (cast, device placement). Only one layer's sources are alive at a time. The projections come
        as numpy common.formats.QWeight through `convert_quant` when they load in a quantized format
        (`weight_format`): quantized here tensor by tensor, or a quantized checkpoint's as stored; the
        lm_head as common.formats.head_format says (quantized also for a tied model).
        """
        items = self._iter_params(framework, concat, convert, quantization, convert_quant)
        if all_finite is None:
            yield from items
            return
        flags = []
        for layer, key, arr in items:
            flags.append((layer, key, all_finite(arr.scale if isinstance(arr, QWeight) else arr)))
            yield layer, key, arr
        for layer, key, flag in flags:
            if not bool(flag):
                self._name_nonfinite(layer, key)

    def _name_nonfinite(self, layer: int | None, key: str) -> None:
        """Raise WeightsError naming the source tensor of parameter `key` that holds NaN or inf (read
        again from the file: only when the load found one)."""
        sources = [GLOBAL_PLAN[key]] if layer is None else [layer_prefix(layer) + s for s in LAYER_PLAN[key]]
        if key == "lm_head" and self.config.tie_word_embeddings:
            sources = [GLOBAL_PLAN["embed"]]
        for name in sources:
            values = self.read_dense(name)
            bad = ~np.isfinite(values)
            if bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                raise WeightsError(f"{self.tensors[name].file}: tensor {name!r} has {int(bad.sum())} non-finite "
                                   f"value(s) (NaN or inf; the first at {list(first)})")
        raise WeightsError(f"{self.dir}: parameter {key!r}{'' if layer is None else f' of layer {layer}'} "
                           f"({', '.join(sources)}) became non-finite when loaded (out of the load dtype's range)")

    def _iter_params(self, framework, concat, convert, quantization, convert_quant):
        cfg = self.config
        fmt = self.weight_format(quantization)
        total = sum(self.tensors[n].nbytes for n in expected_shapes(cfg))
        with progress.bar(total, f"loading {self.dir.name}") as pb:
            head_fmt = head_format(fmt)
            for key, hf in GLOBAL_PLAN.items():
                if key == "lm_head" and head_fmt != "bf16":  # tied: a quantized copy of the embedding
                    name = GLOBAL_PLAN["embed"] if cfg.tie_word_embeddings else hf
                    w = QWeight(*formats.get(head_fmt).quantize(np.asarray(self.read_dense(name), np.float32)), head_fmt)
                    pb.update(0 if cfg.tie_word_embeddings else self.tensors[hf].nbytes)
                    yield None, key, convert_quant(w)
                    continue
                if key == "lm_head" and cfg.tie_word_embeddings:
                    continue
                arr = convert(self.read(hf, framework))
                pb.update(self.tensors[hf].nbytes)
                yield None, key, arr
            for i in range(cfg.num_hidden_layers):
                for key, sources in LAYER_PLAN.items():
                    names = [layer_prefix(i) + s for s in sources]
                    if fmt != "bf16" and ROWS[key].quantizable:
                        arr = convert_quant(self._quantized(i, sources, fmt))
                        pb.update(sum(self.tensors[n].nbytes for n in names))
                        yield i, key, arr
                        continue
                    parts = [self.read(n, framework) for n in names]
                    arr = parts[0] if len(parts) == 1 else concat(parts)
                    del parts
                    arr = convert(arr)
                    pb.update(sum(self.tensors[n].nbytes for n in names))
                    yield i, key, arr


def load_checkpoint(model_dir: str | Path, *, strict: bool = True) -> Checkpoint:
    """Read config.json and validate the checkpoint; raises ConfigError or WeightsError."""
    return Checkpoint(model_dir, strict=strict)


__all__ = ["Checkpoint", "WeightsError", "ConfigError", "PLAN", "PlanRow", "ROWS", "LAYER_PLAN", "GLOBAL_PLAN",
           "TWIN_LAYOUT", "NANOVLLM_PACKED", "WEIGHT_FORMATS", "SHARD_AXES", "expected_shapes", "load_checkpoint",
           "module_name", "pack_layer", "read_header", "source_rows"]
