"""The one fused-or-plain decision of torch_impl (`use_fused_kernels`), made when a model is built.

- False: the plain torch ops everywhere (torch_impl/ops_plain.py).
- True: the Triton kernels everywhere; on CPU they run in Triton's interpreter (TRITON_INTERPRET=1
  must be set before triton is imported); when they cannot run here, raise with the reason.
- "auto": the Triton kernels on CUDA GPUs of compute capability >= 8.0 (per op as AUTO_FUSED
  lists), the plain torch ops elsewhere.
The choice is logged once per distinct outcome.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Callable

import torch

from common.harness import resolve_fused
from torch_impl import ops_plain

log = logging.getLogger("torch_impl")

OP_NAMES = ("rmsnorm_qkv", "mlp", "attn_out", "decode_attention", "prefill_attention", "rms_norm")
# Ops whose Triton kernel runs under "auto" on a capable GPU (see README for the measurements).
AUTO_FUSED = OP_NAMES


class FusedUnavailable(RuntimeError):
    """fused=True was requested where the Triton kernels cannot run."""


@dataclasses.dataclass(frozen=True)
class Ops:
    """The op implementations a model runs, and which of them are fused (for logs and reports)."""

    rmsnorm_qkv: Callable
    mlp: Callable
    attn_out: Callable
    decode_attention: Callable
    prefill_attention: Callable
    rms_norm: Callable  # the final norm
    names: tuple[tuple[str, str], ...] = ()

    @property
    def any_fused(self) -> bool:
        return any(kind == "fused" for _, kind in self.names)


PLAIN_OPS = Ops(*(getattr(ops_plain, n) for n in OP_NAMES), names=tuple((n, "plain") for n in OP_NAMES))


def _kernel_ops(names) -> Ops:
    from torch_impl import kernels  # noqa: PLC0415 - triton only when fused kernels are wanted

    chosen = [getattr(kernels, n) if n in names else getattr(ops_plain, n) for n in OP_NAMES]
    return Ops(*chosen, names=tuple((n, "fused" if n in names else "plain") for n in OP_NAMES))


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


def choose_ops(fused, device: torch.device | str | None = None) -> Ops:
    """The ops a model on `device` runs, per the rules in the module doc."""
    fused = resolve_fused(fused)
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
            ops = _kernel_ops(OP_NAMES)
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
        ops = _kernel_ops(AUTO_FUSED)
    except ImportError as e:
        _log_once(f"torch_impl: plain torch path (fused='auto': Triton kernels unavailable: {e})")
        return PLAIN_OPS
    _log_once("torch_impl: fused='auto' -> " + ", ".join(f"{n}={k}" for n, k in ops.names))
    return ops
