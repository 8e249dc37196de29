"""What jax_impl's plain path and kernels share: the precision rule of products, common's
AttentionMeta as a pytree (its arrays are leaves, its sizes static), so it crosses jit boundaries,
and what common.tiles.lookup reads of the device."""

import functools

import jax
import jax.numpy as jnp

from common import formats
from common import tiles as tiles_mod
from common.ops import AttentionMeta

jax.tree_util.register_dataclass(AttentionMeta, data_fields=list(AttentionMeta.ARRAYS),
                                 meta_fields=list(AttentionMeta.STATIC))


def precision_for(dtype):
    """Full float32 products for float32 operands: XLA on GPUs (and the Triton lowering) default to
    TF32 for them (a float32 model would drift ~1e-3 from transformers'); bf16 operands use the
    tensor cores as they are."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


@functools.lru_cache(maxsize=None)
def device_info() -> tiles_mod.Device:
    """The properties common.tiles' default rule reads, of jax's default device (or of the CPU)."""
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    if dev.platform != "gpu" or cc is None:
        return tiles_mod.Device.cpu()
    major, _, minor = str(cc).partition(".")
    cap = (int(major), int(minor or 0))
    sms = int(getattr(dev, "core_count", 0) or 0) or 1
    return tiles_mod.Device(str(dev.device_kind), sms, tiles_mod.smem_for(cap), cap)


def dtype_key(dtype, fmt: str | None = None) -> str:
    """The tables' dtype field: the activations' dtype, with the weights' format when quantized."""
    return formats.get(fmt).tile_dtype(jnp.dtype(dtype).name)


# common.formats.QWeight (a quantized weight: q, scale, fmt) as a pytree: q and scale are leaves.
from common.formats import QWeight  # noqa: E402

jax.tree_util.register_dataclass(QWeight, data_fields=["q", "scale"], meta_fields=["fmt"])


def dense(w, dtype):
    """The weight [out, in] in `dtype`: a plain array as it is, a QWeight dequantized as
    common.formats.WeightFormat.dequantize (per-row scales, or one per block)."""
    if not isinstance(w, QWeight):
        return w
    q = w.q.astype(jnp.float32)
    if w.format.per_row:
        return (q * w.scale[:, None]).astype(dtype)
    br, bc = w.format.scale_block
    s = jnp.repeat(jnp.repeat(w.scale, br, axis=0), bc, axis=1)[:q.shape[0], :q.shape[1]]
    return (q * s).astype(dtype)


def weight_shape(w) -> tuple[int, ...]:
    return tuple((w.q if isinstance(w, QWeight) else w).shape)


def random_qweight(w, fmt: str) -> QWeight:
    """A QWeight for random float32 values `w` (benchmarks without a checkpoint): one scale for the
    whole tensor, 4.5 standard deviations at the format's largest value, laid out as common.formats'."""
    f = formats.get(fmt)
    s = jnp.float32(4.5) * jnp.std(w) / f.max_value
    q = jnp.clip(w / s, -f.max_value, f.max_value)
    q = jnp.rint(q) if f.integer else q
    return QWeight(q.astype(f.storage), jnp.full(f.scale_shape(w.shape), s, jnp.float32), f.name)
