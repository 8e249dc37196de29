"""Which implementation of each op a jax_impl model runs (`fused`), chosen when it is built.

- False: the plain XLA ops everywhere (jax_impl/plain.py).
- True: the Pallas kernels everywhere; on a CPU backend they run in interpreter mode (for tests);
  when they cannot run here, raise with the reason.
- "auto": on CUDA GPUs of compute capability >= 8.0, each op asks common.tiles.lookup at each
  shape whether its kernel or plain XLA runs (the tables, else the default rule: attention always,
  the projections at one token per step, the final norm in XLA). Shapes are static, so the choice
  is made while tracing, once per compiled program, never per step. Plain XLA elsewhere.
The choice is logged once per distinct outcome. The op list and the Ops structure are common.ops'.
"""

from __future__ import annotations

import functools
import logging

import jax

from common import tile_rules
from common import tiles as tiles_mod
from common.config import Qwen3Config
from common.harness import resolve_fused
from common.ops import OP_NAMES, Ops, kernel_shape
from common.formats import QWeight
from jax_impl import plain

log = logging.getLogger("jax_impl")


class FusedUnavailable(RuntimeError):
    """fused=True was requested where the Pallas kernels cannot run."""


PLAIN_OPS = Ops.of({n: getattr(plain, n) for n in OP_NAMES}, {n: "plain" for n in OP_NAMES})


def gpu_capability() -> tuple[int, int] | None:
    """(major, minor) of the default CUDA device, or None off CUDA."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return None
    if dev.platform != "gpu":
        return None
    cc = getattr(dev, "compute_capability", None)
    if cc is None:
        return None
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def _per_shape(name: str, fused, plain_fn):
    """The op that asks common.tiles, at each traced shape, which implementation runs."""
    from jax_impl.kernels._lib import choose  # noqa: PLC0415

    def op(*args, **kwargs):
        kernel, shape = kernel_shape(name, args, kwargs)
        fmt = next((a.fmt for a in args if isinstance(a, QWeight)), None)  # quantized weights: own table rows
        use = choose(kernel, args[0].dtype, fmt, **shape).path == "fused"
        return (fused if use else plain_fn)(*args, **kwargs)

    op.__name__ = op.__qualname__ = name
    return op


def _kernel_ops(*, auto: bool) -> Ops:
    from jax_impl import kernels  # noqa: PLC0415 - only when fused kernels are wanted

    if not auto:
        return Ops.of({n: getattr(kernels, n) for n in OP_NAMES}, {n: "fused" for n in OP_NAMES})
    impls = {n: _per_shape(n, getattr(kernels, n), getattr(plain, n)) for n in OP_NAMES}
    return Ops.of(impls, {n: "per-shape" for n in OP_NAMES})


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    log.info(message)


def check_weight_format(fused, fmt: str) -> None:
    """At load, before a weight is read: fp8 weights this GPU's kernels cannot convert are refused
    with fused=True, logged once with "auto" (common.tile_rules.check_fp8_kernels)."""
    tile_rules.check_fp8_kernels(resolve_fused(fused), fmt, gpu_capability(), plain="in XLA", error=FusedUnavailable,
                                 note=lambda message: _log_once(f"jax_impl: {message}"))


def choose_ops(cfg: Qwen3Config, fused, dtype: str) -> Ops:
    """The ops a model of this config runs, per the rules in the module doc."""
    del cfg, dtype  # the per-shape choice reads each call's shapes and dtype
    if fused is False:
        _log_once("jax_impl: plain XLA path (fused=False)")
        return PLAIN_OPS
    cc = gpu_capability()
    if fused is True:
        try:
            ops = _kernel_ops(auto=False)
        except ImportError as e:
            raise FusedUnavailable(f"fused=True: the Pallas kernels cannot be imported here ({e})") from None
        if cc is not None and cc < (8, 0):
            raise FusedUnavailable(f"fused=True: the Pallas Triton kernels need compute capability >= 8.0, "
                                   f"this GPU has {cc[0]}.{cc[1]}")
        where = "on the GPU" if cc else f"in interpreter mode on {jax.default_backend()}"
        _log_once(f"jax_impl: fused Pallas kernels {where} (fused=True)")
        return ops
    if cc is None or cc < (8, 0):
        why = "no CUDA GPU" if cc is None else f"compute capability {cc[0]}.{cc[1]} < 8.0"
        _log_once(f"jax_impl: plain XLA path (fused='auto': {why})")
        return PLAIN_OPS
    try:
        ops = _kernel_ops(auto=True)
        from jax_impl.kernels._lib import device_info  # noqa: PLC0415
    except ImportError as e:
        _log_once(f"jax_impl: plain XLA path (fused='auto': Pallas kernels unavailable: {e})")
        return PLAIN_OPS
    info = device_info()
    _log_once(f"jax_impl: fused='auto' -> Pallas kernels or plain XLA per op and shape on {info.name} "
              f"(from {tiles_mod.sources('jax', info)}; by default attention always, the projections at one "
              f"token per step)")
    return ops
