"""Which implementation of each op a torch_impl model runs (`use_fused_kernels`): common.fused decides,
here is what only torch knows - its device's compute capability and whether Triton's interpreter is on,
its kernels and plain ops, and the per-shape op.

- False: the plain torch ops everywhere (torch_impl/plain.py).
- True: the Triton kernels everywhere; on CPU they run in Triton's interpreter (TRITON_INTERPRET=1
  must be set before triton is imported).
- "auto": on CUDA GPUs the kernels run on, each op asks common.tiles.lookup at each shape whether
  its kernel or the plain op runs (the tables, else the default rule: every kernel); the plain
  torch ops elsewhere.
The op list and the Ops structure are common.ops'.
"""

from __future__ import annotations

import os

import torch

from common import fused as fused_mod
from common import tiles as tiles_mod
from common.fused import FusedUnavailable  # noqa: F401 - torch_impl.ops.FusedUnavailable
from common.harness import resolve_fused
from common.ops import Ops
from torch_impl import plain

TWIN = fused_mod.Twin(name="torch_impl", kernels="Triton kernels", plain="plain torch path",
                      plain_where="in the plain path", no_gpu="no CUDA device")
PLAIN_OPS = Ops.every(plain, "plain")


def gpu_capability(device: torch.device | str | None = None) -> tuple[int, int] | None:
    """(major, minor) of the CUDA device the model runs on, or None off CUDA."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def _here(dev: torch.device) -> fused_mod.Here:
    unusable = None
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        unusable = ("fused=True on CPU: the Triton kernels run there only in interpreter mode; "
                    "set TRITON_INTERPRET=1 before importing triton (or use fused='auto'/False)")
    elif dev.type not in ("cpu", "cuda"):
        unusable = f"fused=True: the Triton kernels run on CUDA (or CPU in interpreter mode), not on {dev}"
    return fused_mod.Here(gpu_capability(dev), interpreter="in Triton's interpreter on CPU", unusable=unusable)


def _load() -> None:
    from torch_impl import kernels  # noqa: F401, PLC0415 - triton only when fused kernels are wanted


def _describe(dev: torch.device) -> str:
    from torch_impl.kernels._lib import device_info  # noqa: PLC0415

    info = device_info(dev)
    return (f"fused='auto' -> Triton kernels per op and shape on {info.name} (tiles from "
            f"{tiles_mod.sources('torch', info)})")


def check_weight_format(fused, fmt: str, device: torch.device | str | None = None) -> None:
    """At load, before a weight is read: common.fused.check_weight_format on `device`."""
    fused_mod.check_weight_format(TWIN, fused, fmt, gpu_capability(device))


def choose_ops(fused, device: torch.device | str | None = None) -> Ops:
    """The ops a model on `device` (default: CUDA if available, else the CPU) runs, per common.fused.decide."""
    fused = resolve_fused(fused)
    if device is not None and torch.device(device).type == "meta":
        return PLAIN_OPS  # shapes only (random weights' full shapes under tensor parallelism): nothing runs
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    decision = fused_mod.decide(TWIN, fused, _here(dev), load=_load, describe=lambda: _describe(dev))
    fused_mod.log_once(TWIN.name, decision.message)
    if decision.path == "plain":
        return PLAIN_OPS
    from torch_impl import kernels  # noqa: PLC0415
    from torch_impl.kernels._lib import choose  # noqa: PLC0415

    return fused_mod.kernel_ops(kernels, plain, lambda kernel, *a, **shape: choose(kernel, dev, *a, **shape),
                                auto=decision.path == "per-shape")
