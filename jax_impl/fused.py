"""The one fused-or-plain decision of jax_impl (`use_fused_kernels`), made when a model is built.

- False: the plain XLA ops everywhere.
- True: the Pallas kernels everywhere; on a CPU backend they run in interpreter mode (for tests);
  when they cannot run here, raise with the reason.
- "auto": the Pallas kernels on CUDA GPUs of compute capability >= 8.0, and per op only where
  the kernel measured faster than plain XLA on the H100 (AUTO_FUSED); plain XLA elsewhere.
The choice is logged once per distinct outcome.
"""

from __future__ import annotations

import functools
import logging

import jax

from common.config import Qwen3Config
from jax_impl.model import PLAIN_OPS, Ops

log = logging.getLogger("jax_impl")

# Ops whose Pallas kernel measured faster than plain XLA in decode on the H100 (see README).
AUTO_FUSED = ("rmsnorm_qkv", "mlp", "attn_out", "decode_attention")


class FusedUnavailable(RuntimeError):
    """fused=True was requested where the Pallas kernels cannot run."""


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


def _kernel_ops(names) -> Ops:
    from jax_impl import kernels  # noqa: PLC0415 - only when fused kernels are wanted

    chosen = {n: getattr(kernels, n) if n in names else getattr(PLAIN_OPS, n)
              for n in ("rmsnorm_qkv", "mlp", "attn_out", "decode_attention")}
    labels = tuple((n, "fused" if n in names else "plain") for n in chosen)
    return Ops(**chosen, names=labels)


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    log.info(message)


def choose_ops(cfg: Qwen3Config, fused, dtype: str) -> Ops:
    """The ops a model of this config runs, per the rules in the module doc."""
    del cfg, dtype  # the per-op table is the same for every shape measured so far
    if fused is False:
        _log_once("jax_impl: plain XLA path (fused=False)")
        return PLAIN_OPS
    cc = gpu_capability()
    if fused is True:
        try:
            ops = _kernel_ops(AUTO_FUSED)
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
        ops = _kernel_ops(AUTO_FUSED)
    except ImportError as e:
        _log_once(f"jax_impl: plain XLA path (fused='auto': Pallas kernels unavailable: {e})")
        return PLAIN_OPS
    _log_once("jax_impl: fused='auto' -> " + ", ".join(f"{n}={k}" for n, k in ops.names))
    return ops
