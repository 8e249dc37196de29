"""The one fused-or-plain decision of jax_impl (`use_fused_kernels`), made when a model is built.

- False: the plain XLA ops everywhere.
- True: the Pallas kernels everywhere; on a CPU backend they run in interpreter mode (for tests);
  when they cannot run here, raise with the reason.
- "auto": the Pallas kernels on CUDA GPUs of compute capability >= 8.0, and per op and shape only
  where the kernel measured faster than plain XLA on the H100 (jax_impl.kernels.prefer_fused);
  plain XLA elsewhere. Prefill attention is the Pallas flash-attention kernel
  (jax_impl/kernels/prefill_attention.py) under "auto" too: 1.85-6.5x faster than XLA's on the
  H100 at 512 and 4096 prompt tokens.
The choice is logged once per distinct outcome.
"""

from __future__ import annotations

import functools
import logging

import jax

from common.config import Qwen3Config
from jax_impl.model import PLAIN_OPS, Ops

log = logging.getLogger("jax_impl")

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


OP_NAMES = ("rmsnorm_qkv", "mlp", "attn_out", "decode_attention")


def _kernel_ops(cfg: Qwen3Config, *, auto: bool) -> Ops:
    """All Pallas ops (fused=True), or per-shape dispatch by the measured table (auto).

    The auto table (jax_impl.kernels.prefer_fused) is keyed by the token count of the call, a
    static shape: the choice happens once per compiled shape at trace time, never per step.
    """
    from jax_impl import kernels  # noqa: PLC0415 - only when fused kernels are wanted

    if not auto:
        return Ops(**{n: getattr(kernels, n) for n in OP_NAMES}, prefill_attention=kernels.prefill_attention,
                   names=tuple((n, "fused") for n in (*OP_NAMES, "prefill_attention")))

    def dispatch(name):
        fused_fn, plain_fn = getattr(kernels, name), getattr(PLAIN_OPS, name)

        def op(x, *args, **kwargs):
            use = kernels.prefer_fused(name, x.shape[0], cfg.hidden_size)
            return (fused_fn if use else plain_fn)(x, *args, **kwargs)

        op.__name__ = name
        return op

    return Ops(**{n: dispatch(n) for n in OP_NAMES}, prefill_attention=kernels.prefill_attention,
               names=(*((n, "per-shape") for n in OP_NAMES), ("prefill_attention", "fused")))


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    log.info(message)


def choose_ops(cfg: Qwen3Config, fused, dtype: str) -> Ops:
    """The ops a model of this config runs, per the rules in the module doc."""
    del dtype  # the measured table is keyed by op, token count and hidden size
    if fused is False:
        _log_once("jax_impl: plain XLA path (fused=False)")
        return PLAIN_OPS
    cc = gpu_capability()
    if fused is True:
        try:
            ops = _kernel_ops(cfg, auto=False)
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
        ops = _kernel_ops(cfg, auto=True)
    except ImportError as e:
        _log_once(f"jax_impl: plain XLA path (fused='auto': Pallas kernels unavailable: {e})")
        return PLAIN_OPS
    _log_once("jax_impl: fused='auto' -> Pallas kernels where they measured faster than XLA on the H100 "
              "(decode and prefill attention always; rmsnorm_qkv, attn_out, mlp at one token per step; "
              "rmsnorm_qkv up to 16 tokens below hidden 4096), plain XLA elsewhere")
    return ops
