"""One adapter per twin, so the kernel suite drives both from common.ops' one op list.

`Twin` makes the twin's arrays from numpy (in a dtype, on its device), reads them back as float64
numpy, builds common.ops.AttentionMeta, and calls an op of its kernels (K) or its plain path (P):
`twin.kernel(name)(*args, tiles=...)` and `twin.plain(name)(*args)`, and the reference
`twin.reference(name, *args)` (common.ops' OPS[name].reference on the same arguments read back as
numpy). On CPU the kernels run in
their interpreters (Pallas interpret=True; Triton under TRITON_INTERPRET=1, set by conftest).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from common.formats import QWeight
from common.ops import OPS, AttentionMeta

FRAMEWORKS = ("jax", "torch")


class Twin:
    name: str

    def __init__(self, gpu: bool):
        self.gpu = gpu

    def __repr__(self):
        return f"{self.name}-{'gpu' if self.gpu else 'interpret'}"

    def meta(self, **fields) -> AttentionMeta:
        arrays = {k: (None if v is None else self.idx(v)) for k, v in fields.items() if k in AttentionMeta.ARRAYS}
        static = {k: v for k, v in fields.items() if k in AttentionMeta.STATIC}
        return AttentionMeta(**arrays, **static)

    def reference(self, name: str, *args, **kwargs):
        """OPS[name].reference (float64 numpy) on an op's arguments: this twin's arrays read back as
        float64, the meta's as integers; numpy arrays, QWeights and None as given."""
        def host(a):
            if a is None or isinstance(a, (np.ndarray, QWeight)):
                return a
            if isinstance(a, AttentionMeta):
                return a.replace(**{k: None if getattr(a, k) is None else self.ints(getattr(a, k))
                                    for k in AttentionMeta.ARRAYS})
            return self.np(a)

        return OPS[name].reference(*map(host, args), **kwargs)  # the keywords: Python numbers


class JaxTwin(Twin):
    name = "jax"

    def __init__(self, gpu: bool):
        super().__init__(gpu)
        self.jax = pytest.importorskip("jax")
        self.jnp = importlib.import_module("jax.numpy")
        self.K = importlib.import_module("jax_impl.kernels")
        self.P = importlib.import_module("jax_impl.plain")

    def arr(self, a, dtype: str = "float32"):
        return self.jnp.asarray(np.asarray(a, np.float32)).astype(dtype)

    def idx(self, a):
        return self.jnp.asarray(np.asarray(a), self.jnp.int32)

    def np(self, x) -> np.ndarray:
        if isinstance(x, np.ndarray):
            return x.astype(np.float64)
        return np.asarray(self.jnp.asarray(x).astype(self.jnp.float32)).astype(np.float64)

    def ints(self, x) -> np.ndarray:
        return np.asarray(x)

    def kernel(self, name: str):
        fn = getattr(self.K, name)
        interpret = False if self.gpu else None
        return lambda *a, **kw: fn(*a, interpret=interpret, **kw)

    def plain(self, name: str):
        fn = getattr(self.P, name)
        return lambda *a, **kw: self.jax.jit(lambda *b: fn(*b, **kw))(*a)

    def rope_table(self, max_pos: int, d: int, theta: float):
        """cos_sin [max_pos, D] float32 from float64 angles (as the reference computes them)."""
        from common import reference as R

        return self.jnp.asarray(R.rope_table(max_pos, d, theta).astype(np.float32))

    def copy(self, x):
        return x  # jax arrays are immutable: the ops return new caches

    def qweight(self, q: np.ndarray, scale: np.ndarray, fmt: str):
        """A common.formats.QWeight on this twin's device from numpy values (int8 or ml_dtypes e4m3)."""
        return QWeight(self.jnp.asarray(q), self.jnp.asarray(scale, self.jnp.float32), fmt)


class TorchTwin(Twin):
    name = "torch"

    def __init__(self, gpu: bool):
        super().__init__(gpu)
        self.torch = pytest.importorskip("torch")
        pytest.importorskip("triton")
        self.device = "cuda" if gpu else "cpu"
        self.K = importlib.import_module("torch_impl.kernels")
        self.P = importlib.import_module("torch_impl.plain")

    def arr(self, a, dtype: str = "float32"):
        return self.torch.as_tensor(np.asarray(a, np.float32)).to(self.device, getattr(self.torch, dtype))

    def idx(self, a):
        return self.torch.as_tensor(np.asarray(a), dtype=self.torch.int32, device=self.device)

    def np(self, x) -> np.ndarray:
        if isinstance(x, np.ndarray):
            return x.astype(np.float64)
        return x.detach().float().cpu().numpy().astype(np.float64)

    def ints(self, x) -> np.ndarray:
        return x.cpu().numpy()

    def kernel(self, name: str):
        return getattr(self.K, name)

    def plain(self, name: str):
        return getattr(self.P, name)

    def rope_table(self, max_pos: int, d: int, theta: float):
        return self.P.rope_table(max_pos, d, theta, device=self.device)

    def copy(self, x):
        return x.clone()

    def qweight(self, q: np.ndarray, scale: np.ndarray, fmt: str):
        t = self.torch
        values = t.from_numpy(q.view(np.int8)) if fmt == "int8" else t.from_numpy(q.view(np.uint8)).view(t.float8_e4m3fn)
        return QWeight(values.to(self.device), t.as_tensor(scale, dtype=t.float32, device=self.device), fmt)


def make(framework: str, gpu: bool) -> Twin:
    return (JaxTwin if framework == "jax" else TorchTwin)(gpu)
