"""Which implementation of each op a jax_impl model runs (`fused`): common.fused decides, here is what
only jax knows - its device's compute capability, its kernels and plain ops, and the per-shape op.

- False: the plain XLA ops everywhere (jax_impl/plain.py).
- True: the Pallas kernels everywhere; on a CPU backend they run in interpreter mode (for tests).
- "auto": on CUDA GPUs the kernels run on, each op asks common.tiles.lookup at each shape whether
  its kernel or plain XLA runs (the tables, else the default rule: attention always, the
  projections at one token per step, the final norm in XLA). Shapes are static, so the choice is
  made while tracing, once per compiled program, never per step. Plain XLA elsewhere.
The op list and the Ops structure are common.ops'.
"""

from __future__ import annotations

import jax

from common import fused as fused_mod
from common import tiles as tiles_mod
from common.fused import FusedUnavailable  # noqa: F401 - jax_impl.ops.FusedUnavailable
from common.ops import Ops
from jax_impl import plain
from jax_impl.arrays import device_info

TWIN = fused_mod.Twin(name="jax_impl", kernels="Pallas kernels", plain="plain XLA path", plain_where="in XLA",
                      no_gpu="no CUDA GPU")
PLAIN_OPS = Ops.every(plain, "plain")


def gpu_capability() -> tuple[int, int] | None:
    """(major, minor) of the default CUDA device, or None off CUDA (jax_impl.arrays.device_info's)."""
    try:
        return device_info().capability
    except RuntimeError:  # no backend at all
        return None


def _here() -> fused_mod.Here:
    return fused_mod.Here(gpu_capability(), interpreter=f"in interpreter mode on {jax.default_backend()}")


def _load() -> None:
    from jax_impl import kernels  # noqa: F401, PLC0415 - only when fused kernels are wanted


def _describe() -> str:
    info = device_info()
    return (f"fused='auto' -> Pallas kernels or plain XLA per op and shape on {info.name} (from "
            f"{tiles_mod.sources('jax', info)}; by default attention always, the projections at one token per step)")


def check_weight_format(fused, fmt: str, device=None) -> None:
    """At load, before a weight is read: common.fused.check_weight_format on the default device
    (`device` is torch_impl's; jax_impl's models run on the default backend)."""
    del device
    fused_mod.check_weight_format(TWIN, fused, fmt, gpu_capability())


def choose_ops(fused, device=None) -> Ops:
    """The ops a model runs, per common.fused.decide (`device`: as check_weight_format)."""
    del device
    decision = fused_mod.decide(TWIN, fused, _here(), load=_load, describe=_describe)
    fused_mod.log_once(TWIN.name, decision.message)
    if decision.path == "plain":
        return PLAIN_OPS
    from jax_impl import kernels  # noqa: PLC0415
    from jax_impl.kernels._lib import choose  # noqa: PLC0415

    return fused_mod.kernel_ops(kernels, plain, choose, auto=decision.path == "per-shape")
