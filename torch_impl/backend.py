"""torch_impl as a common.backend.Backend (declared in pyproject.toml's qwen3_fused.backends).
torch is imported by the methods, so the object exists where torch is not installed."""

from __future__ import annotations

import importlib
import os

import numpy as np


class TorchBackend:
    name = "torch"
    packages = ("torch",)
    layouts = ("one-block", "paged")  # the runner's cache; nano-vllm's 256-row blocks
    default_layout = "paged"

    kernels = property(lambda self: importlib.import_module("torch_impl.kernels"))
    plain = property(lambda self: importlib.import_module("torch_impl.plain"))
    ops = property(lambda self: importlib.import_module("torch_impl.ops"))

    def device(self, gpu: bool = True):
        import torch
        return torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")

    def device_info(self, device=None):
        import torch
        from torch_impl.kernels._lib import device_info
        return device_info(torch.device(device or "cpu"))

    def asarray(self, values, dtype: str = "float32", device=None):
        import torch
        return torch.as_tensor(np.asarray(values)).to(device, getattr(torch, dtype))

    def to_numpy(self, x) -> np.ndarray:
        import torch
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()

    def storage_dtype(self, fmt: str):
        from torch_impl.quant_loading import storage_dtype
        return storage_dtype(fmt)

    def random(self, seed: int, device=None) -> Random:
        return Random(seed, device)

    def use_interpreter(self) -> None:
        os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors run the kernels in Triton's interpreter

    def kernel(self, op: str, *, interpret: bool | None = None):
        return getattr(self.kernels, op)  # the interpreter: use_interpreter, before triton is imported

    def time_chain(self, body, carry, layers, shared, plan, device) -> dict:
        """A CUDA graph of the chain on a GPU (measure.timing.time_torch_chain)."""
        import torch
        from measure.timing import time_torch_chain

        state = dict(carry=carry)

        def call(k):
            state["carry"] = body(state["carry"], k, layers[k], shared)

        with torch.inference_mode():
            return time_torch_chain(call, len(layers), torch.device(device), plan, state=state)

    def load(self, model_dir, options=None, **kwargs):
        from torch_impl import load
        return load(model_dir, options, **kwargs)


class Random:
    """Random tensors on `device` from one generator."""

    def __init__(self, seed: int, device):
        import torch

        self.torch, self.device = torch, device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def normal(self, shape, scale=1.0, offset=0.0):
        t = self.torch.randn(tuple(shape), generator=self.gen, device=self.device, dtype=self.torch.float32)
        return (offset + t * scale).to(self.torch.bfloat16)

    def qweight(self, shape, scale, fmt: str):
        from torch_impl.quant_loading import random_qweight

        return random_qweight(tuple(shape), fmt, self.gen, self.device, scale)


BACKEND = TorchBackend()
