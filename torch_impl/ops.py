"""Which implementation of each op a torch_impl model runs (`use_fused_kernels`), chosen when it is built.

- False: the plain torch ops everywhere (torch_impl/plain.py).
- True: the Triton kernels everywhere; on CPU they run in Triton's interpreter (TRITON_INTERPRET=1
  must be set before triton is imported); when they cannot run here, raise with the reason.
- "auto": on CUDA GPUs of compute capability >= 8.0, each op asks common.tiles.lookup at each
  shape whether its kernel or the plain op runs (the tables, else the default rule: every kernel);
  the plain torch ops elsewhere.
The choice is logged once per distinct outcome. The op list and the Ops structure are common.ops'.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable

import torch

from common import tile_rules
from common import tiles as tiles_mod
from common.harness import resolve_fused
from common.ops import OP_NAMES, Ops, kernel_shape
from common.formats import QWeight
from torch_impl import plain

log = logging.getLogger("torch_impl")


class FusedUnavailable(RuntimeError):
    """fused=True was requested where the Triton kernels cannot run."""


PLAIN_OPS = Ops.of({n: getattr(plain, n) for n in OP_NAMES}, {n: "plain" for n in OP_NAMES})


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    log.info(message)


def gpu_capability(device: torch.device | str | None = None) -> tuple[int, int] | None:
    """(major, minor) of the CUDA device the model runs on, or None off CUDA."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def _per_shape(name: str, fused: Callable, plain_fn: Callable, device: torch.device) -> Callable:
    """The op that asks common.tiles at each call's shape which implementation runs (a cached lookup;
    under CUDA graphs it runs once, at capture)."""
    from torch_impl.kernels._lib import choose  # noqa: PLC0415

    def op(*args, **kwargs):
        kernel, shape = kernel_shape(name, args, kwargs)
        fmt = next((a.fmt for a in args if isinstance(a, QWeight)), None)  # quantized weights: own table rows
        use = choose(kernel, device, args[0].dtype, fmt, **shape).path == "fused"
        return (fused if use else plain_fn)(*args, **kwargs)

    op.__name__ = op.__qualname__ = name
    return op


def _kernel_ops(device: torch.device, *, auto: bool) -> Ops:
    from torch_impl import kernels  # noqa: PLC0415 - triton only when fused kernels are wanted

    if not auto:
        return Ops.of({n: getattr(kernels, n) for n in OP_NAMES}, {n: "fused" for n in OP_NAMES})
    impls = {n: _per_shape(n, getattr(kernels, n), getattr(plain, n), device) for n in OP_NAMES}
    return Ops.of(impls, {n: "per-shape" for n in OP_NAMES})


def check_weight_format(fused, fmt: str, device: torch.device | str | None = None) -> None:
    """At load, before a weight is read: fp8 weights this GPU's kernels cannot convert are refused
    with fused=True, logged once with "auto" (common.tile_rules.check_fp8_kernels)."""
    tile_rules.check_fp8_kernels(resolve_fused(fused), fmt, gpu_capability(device), plain="in the plain path", error=FusedUnavailable,
                                 note=lambda message: _log_once(f"torch_impl: {message}"))


def choose_ops(fused, device: torch.device | str | None = None) -> Ops:
    """The ops a model on `device` runs, per the rules in the module doc."""
    fused = resolve_fused(fused)
    if device is not None and torch.device(device).type == "meta":
        return PLAIN_OPS  # shapes only (random weights' full shapes under tensor parallelism): nothing runs
    if fused is False:
        _log_once("torch_impl: plain torch path (fused=False)")
        return PLAIN_OPS
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cc = gpu_capability(dev)
    if fused is True:
        if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise FusedUnavailable("fused=True on CPU: the Triton kernels run there only in interpreter mode; "
                                   "set TRITON_INTERPRET=1 before importing triton (or use fused='auto'/False)")
        if dev.type not in ("cpu", "cuda"):
            raise FusedUnavailable(f"fused=True: the Triton kernels run on CUDA (or CPU in interpreter mode), "
                                   f"not on {dev}")
        if cc is not None and cc < (8, 0):
            raise FusedUnavailable(f"fused=True: the Triton kernels need compute capability >= 8.0 (bfloat16 "
                                   f"tensor cores), this GPU has {cc[0]}.{cc[1]}")
        try:
            ops = _kernel_ops(dev, auto=False)
        except ImportError as e:
            raise FusedUnavailable(f"fused=True: the Triton kernels cannot be imported here ({e})") from None
        where = "on the GPU" if cc else "in Triton's interpreter on CPU"
        _log_once(f"torch_impl: fused Triton kernels {where} (fused=True)")
        return ops
    if cc is None or cc < (8, 0):
        why = "no CUDA device" if cc is None else f"compute capability {cc[0]}.{cc[1]} < 8.0"
        _log_once(f"torch_impl: plain torch path (fused='auto': {why})")
        return PLAIN_OPS
    try:
        ops = _kernel_ops(dev, auto=True)
    except ImportError as e:
        _log_once(f"torch_impl: plain torch path (fused='auto': Triton kernels unavailable: {e})")
        return PLAIN_OPS
    from torch_impl.kernels._lib import device_info  # noqa: PLC0415

    info = device_info(dev)
    _log_once(f"torch_impl: fused='auto' -> Triton kernels per op and shape on {info.name} (tiles from "
              f"{tiles_mod.sources('torch', info)})")
    return ops
