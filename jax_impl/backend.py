"""jax_impl as a common.backend.Backend (declared in pyproject.toml's qwen3_fused.backends).
jax is imported by the methods, so the object exists where jax is not installed."""

from __future__ import annotations

import importlib
import functools

import numpy as np

from common import formats


class JaxBackend:
    name = "jax"
    packages = ("jax", "flax")
    layouts = ("one-block",)  # block b holds sequence b: the runner's cache
    default_layout = "one-block"

    kernels = property(lambda self: importlib.import_module("jax_impl.kernels"))
    plain = property(lambda self: importlib.import_module("jax_impl.plain"))
    ops = property(lambda self: importlib.import_module("jax_impl.ops"))

    def device(self, gpu: bool = True):
        return None  # jax's default device

    def device_info(self, device=None):
        from jax_impl.arrays import device_info
        return device_info()

    def asarray(self, values, dtype: str = "float32", device=None):
        import jax.numpy as jnp
        return jnp.asarray(np.asarray(values)).astype(dtype)

    def to_numpy(self, x) -> np.ndarray:
        import jax.numpy as jnp
        x = jnp.asarray(x)
        return np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x)

    def storage_dtype(self, fmt: str):
        import jax.numpy as jnp
        return jnp.dtype(formats.get(fmt).storage)

    def random(self, seed: int, device=None) -> Random:
        return Random(seed)

    def use_interpreter(self) -> None:
        pass  # the kernels interpret on their own where the default backend is not a GPU

    def kernel(self, op: str, *, interpret: bool | None = None):
        fn = getattr(self.kernels, op)
        return fn if interpret is None else functools.partial(fn, interpret=interpret)

    def time_chain(self, body, carry, layers, shared, plan, device) -> dict:
        from measure.timing import time_jax_chain
        return time_jax_chain(body, carry, layers, shared, plan)

    def load(self, model_dir, options=None, **kwargs):
        from jax_impl import load
        return load(model_dir, options, **kwargs)


class Random:
    """Random arrays from one key: each array from the key folded with its ordinal."""

    def __init__(self, seed: int):
        import jax

        self.jax, self.base, self.count = jax, jax.random.key(seed), 0

    def _key(self):
        self.count += 1
        return self.jax.random.fold_in(self.base, self.count)

    def normal(self, shape, scale=1.0, offset=0.0):
        return _normal_fn()(self._key(), tuple(shape), float(scale), float(offset))

    def qweight(self, shape, scale, fmt: str):
        from jax_impl.arrays import random_qweight

        return random_qweight(self.jax.random.normal(self._key(), tuple(shape)) * scale, fmt)


@functools.lru_cache(maxsize=None)
def _normal_fn():
    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def normal(key, shape, scale, offset):  # bf16 offset + scale * N(0, 1), compiled once per shape
        return (offset + scale * jax.random.normal(key, shape, jnp.float32)).astype(jnp.bfloat16)

    return normal


BACKEND = JaxBackend()
