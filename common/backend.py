"""What a twin is, to the code that drives either one (the harness, measure, bench, tests), and where
the twins are found - without common naming or importing one.

    from common import backend
    backend.names()             -> ("jax", "torch")
    b = backend.get("torch")    a twin's Backend: b.kernels.mlp(...), b.load(model_dir), b.time_chain(...)

The twins declare themselves as entry points of the group `qwen3_fused.backends` in pyproject.toml
(name = "module:object"): read from the installed package's metadata, else - a source checkout
run without `pip install`, or installed metadata without the group - from the pyproject.toml
beside this package.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Protocol

import numpy as np

from common.tile_types import Device

GROUP = "qwen3_fused.backends"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


class Backend(Protocol):
    """One twin. Its methods import jax or torch, never the making of the object."""

    name: str  # "jax" | "torch": the tile tables' framework and the runner's name
    packages: tuple[str, ...]  # what it needs installed (common.harness.check_runner names the missing)
    layouts: tuple[str, ...]  # the decode_attention cache layouts its kernels read (measure.op_chains.Case)
    default_layout: str  # the layout a chain times when the case names none
    kernels: ModuleType  # the fused ops of common.ops, by name
    plain: ModuleType  # the unfused ops, the same names and arguments
    ops: ModuleType  # the selection: choose_ops(fused), check_weight_format(fused, fmt)

    def device(self, gpu: bool = True) -> Any: ...  # the GPU when there is one and `gpu`, else the CPU
    def device_info(self, device: Any = None) -> Device: ...  # what common.tiles reads of the device
    def asarray(self, values: np.ndarray, dtype: str = "float32", device: Any = None) -> Any: ...
    def to_numpy(self, x: Any) -> np.ndarray: ...  # bf16 read back as float32
    def storage_dtype(self, fmt: str) -> Any: ...  # the dtype of a weight format's stored values
    def random(self, seed: int, device: Any = None) -> Random: ...
    def use_interpreter(self) -> None: ...  # the kernels on CPU run in the interpreter (before import)
    def kernel(self, op: str, *, interpret: bool | None = None) -> Callable: ...  # None: as the machine allows
    def time_chain(self, body: Callable, carry, layers: list, shared, plan, device) -> dict: ...  # measure.timing
    def load(self, model_dir, options=None, **kwargs): ...  # the twin's load(): a common.harness.Runner


class Random(Protocol):
    """Seeded random arrays on one device: bf16 offset + scale * N(0, 1), and a common.formats
    QWeight in `fmt` of N(0, scale^2) values at one scale (for timing only)."""

    def normal(self, shape: tuple[int, ...], scale: float = 1.0, offset: float = 0.0) -> Any: ...
    def qweight(self, shape: tuple[int, int], scale: float, fmt: str) -> Any: ...


@functools.lru_cache(maxsize=None)
def table() -> dict[str, str]:
    """Backend name -> "module:object", from the installed entry points, else from pyproject.toml."""
    found = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=GROUP)}
    if not found and PYPROJECT.is_file():
        with PYPROJECT.open("rb") as f:
            found = tomllib.load(f).get("project", {}).get("entry-points", {}).get(GROUP, {})
    return dict(sorted(found.items()))


def names() -> tuple[str, ...]:
    return tuple(table())


@functools.lru_cache(maxsize=None)
def get(name: str) -> Backend:
    """The backend `name` (its module imported now); ValueError naming the known ones."""
    if name not in table():
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(names()) or '(none declared)'}")
    module, _, attr = table()[name].partition(":")
    return getattr(importlib.import_module(module), attr)
