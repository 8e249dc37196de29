"""Quantized projections (common.formats) in torch_impl's model: which format a model is built in, and
how its quantized `Linear`s are filled - from common.weights' items (torch_impl.load) or through
nano-vllm's weight_loader protocol (Hugging Face tensors by shard: a bf16 checkpoint's are
quantized as they arrive, a quantized checkpoint's values and `weight_scale_inv` scales copied)."""

from __future__ import annotations

import numpy as np
import torch

from common import formats
from common.formats import QuantError, QWeight, parse_quantization_config


def storage_dtype(fmt) -> torch.dtype:
    """The torch dtype of a quantized format's stored values (its storage_name, common.formats)."""
    return getattr(torch, formats.get(fmt).storage_name)


def weight_format_of(config, quantization) -> str:
    """The format a model of `config` is built in (common.formats.resolve): the one of a quantized
    checkpoint's quantization_config, else `quantization`, else "bf16"."""
    raw = getattr(config, "quantization_config", None)
    if raw is not None and not isinstance(raw, dict):
        raw = raw.to_dict() if hasattr(raw, "to_dict") else vars(raw)
    source = f"{type(config).__name__}.quantization_config"
    try:
        return formats.resolve(quantization, parse_quantization_config(raw, source), source).name
    except QuantError as e:
        raise ValueError(str(e)) from None


def to_torch(values: np.ndarray, device=None) -> torch.Tensor:
    """numpy values of a quantized format's storage (numpy integers, ml_dtypes floats) as a torch
    tensor of the same bits."""
    if values.dtype.kind in "iu":
        return torch.from_numpy(np.ascontiguousarray(values)).to(device)
    raw = np.ascontiguousarray(values).view(np.uint8 if values.dtype.itemsize == 1 else np.int16)
    return torch.from_numpy(raw).view(getattr(torch, values.dtype.name)).to(device)


def load_quantized(linear, name: str, w: QWeight) -> None:
    """Copy a QWeight (numpy or torch arrays) into a quantized Linear, checking format and shapes."""
    if linear.fmt != w.fmt:
        raise ValueError(f"{name}: a {w.fmt} weight for a model built with {linear.fmt} projections")
    q = w.q if isinstance(w.q, torch.Tensor) else to_torch(w.q)
    scale = torch.as_tensor(np.asarray(w.scale, np.float32) if not isinstance(w.scale, torch.Tensor) else w.scale)
    for what, dst, src in (("values", linear.weight, q), ("scales", linear.weight_scale_inv, scale)):
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"{name}: {what} of shape {list(src.shape)}, expected {list(dst.shape)}")
    linear.weight.data.copy_(q.to(linear.weight.device))
    linear.weight_scale_inv.data.copy_(scale.to(linear.weight_scale_inv.device, torch.float32))


def _scale_rows(fmt: str, start: int, n: int, total: int, name: str) -> tuple[int, int]:
    """The scale rows of weight rows [start, start + n) of `total`: one per row, or one per block of
    rows, so a shard must start on a block and fill its blocks unless it ends the tensor."""
    block = formats.get(fmt).row_block
    if block == 1:
        return start, n
    if start % block or (n % block and start + n != total):
        raise ValueError(f"{name}: a shard of rows [{start}, {start + n}) does not fill whole {block}-row "
                         f"blocks: it cannot be stored in {fmt} blocks")
    return start // block, -(-n // block)


def attach_quant_loaders(model: torch.nn.Module, shards: dict[str, dict], cut=None) -> None:
    """nano-vllm's weight_loader(param, tensor[, shard_id]) on each quantized Linear's two parameters.
    `cut(name, w, shard_id, block=1)` keeps this rank's part of a whole checkpoint tensor or QWeight
    (the model's shard_of; a bf16 tensor is quantized whole first, so a row-parallel shard of per-row
    scales keeps the scales of the full rows)."""
    cut = cut or (lambda name, w, shard_id=None, block=1: w)
    for mod_name, linear in model.named_modules():
        fmt = getattr(linear, "fmt", "bf16")
        if fmt == "bf16" or not hasattr(linear, "weight_scale_inv"):
            continue
        name = f"{mod_name}.weight"
        rows = shards.get(name)

        def where(shard_id, _name=name, _rows=rows, _linear=linear):
            if shard_id is None:
                return 0, _linear.weight.shape[0]
            if _rows is None or shard_id not in _rows:
                raise ValueError(f"{_name}: unknown shard id {shard_id!r} (expected one of {sorted(_rows or {}, key=str)})")
            return _rows[shard_id]

        def weight_loader(param, loaded, shard_id=None, _name=name, _linear=linear, _where=where, _fmt=fmt):
            start, n = _where(shard_id)
            stored = not loaded.is_floating_point() or loaded.element_size() == 1  # a quantized checkpoint's values
            if stored and loaded.dtype != storage_dtype(_fmt):  # (their scales load on their own)
                raise ValueError(f"{_name}: {loaded.dtype} checkpoint values for a model built with {_fmt} projections")
            w = cut(_name, loaded if stored else QWeight(*formats.get(_fmt).quantize(loaded.float().cpu().numpy()),
                                                          _fmt), shard_id)
            q = w if stored else w.q
            if tuple(q.shape) != (n, param.shape[1]):
                part = " (this rank's part)" if tuple(q.shape) != tuple(loaded.shape) else ""
                raise ValueError(f"{_name}: checkpoint tensor has shape {list(q.shape)}{part}, expected "
                                 f"[{n}, {param.shape[1]}]")
            s0, sn = _scale_rows(_fmt, start, n, param.shape[0], _name)
            if stored:
                param.data.narrow(0, start, n).copy_(q)
                return
            param.data.narrow(0, start, n).copy_(to_torch(q))
            _linear.weight_scale_inv.data.narrow(0, s0, sn).copy_(torch.from_numpy(np.asarray(w.scale, np.float32)))

        def scale_loader(param, loaded, shard_id=None, _name=name, _linear=linear, _where=where, _fmt=fmt):
            block = formats.get(_fmt).row_block
            if block == 1:
                raise ValueError(f"{_name}_scale_inv: block scales for a model built with {_fmt} projections")
            s0, sn = _scale_rows(_fmt, *_where(shard_id), _linear.weight.shape[0], _name)
            loaded = cut(_name, loaded, shard_id, block=block)
            if tuple(loaded.shape) != (sn, param.shape[1]):
                raise ValueError(f"{_name}_scale_inv: checkpoint tensor has shape {list(loaded.shape)}, expected "
                                 f"[{sn}, {param.shape[1]}]")
            param.data.narrow(0, s0, sn).copy_(loaded.to(torch.float32))

        linear.weight.weight_loader = weight_loader
        linear.weight_scale_inv.weight_loader = scale_loader


def tie_quantized_head(embed: torch.nn.Parameter, head: torch.nn.Parameter) -> None:
    """A tied model's quantized lm_head is filled from the embedding as nano-vllm's loader hands it
    over (the checkpoint has no lm_head tensor): the embedding's loader quantizes a copy."""
    load_embed = embed.weight_loader

    def weight_loader(param, loaded, *args):
        load_embed(param, loaded, *args)
        head.weight_loader(head, loaded)

    weight_loader.untied = load_embed  # the embedding alone (random weights: the head has its own draw)
    embed.weight_loader = weight_loader


def random_qweight(shape: tuple[int, int], fmt: str, generator: torch.Generator, device, std: float = 0.02) -> QWeight:
    """The QWeight of N(0, std) values at one scale (benchmarks, tuning: 4.5 standard deviations at the
    format's largest value, as jax_impl.arrays.random_qweight), laid out as common.formats'."""
    f = formats.get(fmt)
    s = 4.5 * std / f.max_value
    q = torch.empty(shape, device=device).normal_(0.0, std, generator=generator).div_(s).clamp_(-f.max_value,
                                                                                               f.max_value)
    q = (q.round_() if f.integer else q).to(storage_dtype(f))
    return QWeight(q, torch.full(f.scale_shape(shape), s, dtype=torch.float32, device=device), f.name)


def random_quantized_(linear, generator: torch.Generator, std: float = 0.02) -> None:
    """Fill a quantized Linear with random_qweight values."""
    load_quantized(linear, "random", random_qweight(tuple(linear.weight.shape), linear.fmt, generator,
                                                    linear.weight.device, std))
