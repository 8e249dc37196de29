"""What the Pallas launchers share (no kernel bodies here; in-kernel helpers: _jit.py): the backend
choice and interpreter mode, checks, and the one tile lookup (common.tiles).

The one place that picks the Pallas backend: every kernel goes through `pallas_call` below,
which passes `pltriton.CompilerParams` (the Triton lowering; without it jax >= 0.9 sends a
GPU pallas_call to Mosaic GPU). jax 0.11 deprecates the Triton backend with a warning at
lowering time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from common import tiles as tiles_mod
from common.formats import QWeight
from jax_impl.arrays import device_info


def use_interpret(interpret: bool | None = None) -> bool:
    """Interpreter mode: as asked, else automatically when the default backend is not a GPU."""
    if interpret is not None:
        return bool(interpret)
    return jax.default_backend() != "gpu"


def pallas_call(kernel, *, name: str, grid: tuple[int, ...], out_shape, num_warps: int, num_stages: int,
                interpret: bool | None = None, input_output_aliases: dict[int, int] | None = None):
    """pl.pallas_call on whole-array refs through the Triton lowering (the one backend choice).

    Jitted and kept per launch (`_launch`) when the kernel is a functools.partial of a module-level
    function, as every kernel here is: a model calls the same launch in each of its layers, and a
    jitted function is traced once per input shape in the process and lowered once per program,
    where an anonymous pallas_call is traced and lowered again at every layer (Qwen3-0.6B's decode
    program: 169 launches of 7 distinct kernels; the times saved: docs/MEASUREMENTS.md)."""
    aliases = tuple(sorted((input_output_aliases or {}).items()))
    settings = (name, tuple(grid), tuple(jax.tree.leaves(out_shape)), jax.tree.structure(out_shape), num_warps,
                num_stages, use_interpret(interpret), aliases)
    if isinstance(kernel, functools.partial) and not kernel.args:
        try:
            return _launch(kernel.func, tuple(sorted(kernel.keywords.items())), settings)
        except TypeError:  # an unhashable keyword: not kept
            pass
    return _pallas_call(kernel, settings)


def _pallas_call(kernel, settings):
    name, grid, leaves, tree, num_warps, num_stages, interpret, aliases = settings
    return pl.pallas_call(
        kernel, out_shape=jax.tree.unflatten(tree, leaves), grid=grid, name=name,
        input_output_aliases=dict(aliases), interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    )


@functools.lru_cache(maxsize=4096)
def _launch(func, keywords: tuple, settings: tuple):
    call = _pallas_call(functools.partial(func, **dict(keywords)), settings)

    def launch(*args):
        return call(*args)

    launch.__name__ = launch.__qualname__ = settings[0]  # the program's function: the kernel's name
    return jax.jit(launch)


# ----- the one tile lookup (common.tiles; the device's properties: jax_impl.arrays.device_info) ------

def choose(kernel: str, dtype, fmt: str | None = None, **shape) -> tiles_mod.Choice:
    """The path and tiles of `kernel` at this shape (common.tiles.choose for the jax twin)."""
    return tiles_mod.choose(kernel, "jax", device_info(), jnp.dtype(dtype).name, fmt, **shape)


def tiles_for(kernel: str, op: str, tiles, tile_type, dtype, fmt: str | None = None, **shape):
    """The tiles a launcher runs: the caller's, else the lookup's; checked to be `tile_type`."""
    tiles = tiles_mod.launch_tiles(op, tiles, tile_type, lambda: choose(kernel, dtype, fmt, **shape))
    check(getattr(tiles, "split_k", 1) == 1, f"{op}: tiles.split_k={getattr(tiles, 'split_k', 1)}: jax_impl's "
                                             f"projections sum each output tile in one program (split_k 1)")
    return tiles


def split_weight(name: str, w, dtype):
    """(values, [scale] inputs, fmt) of a weight argument: a plain array in the activations' dtype, or
    a common.formats.QWeight (values in the format's storage, scales of its scale_shape)."""
    if isinstance(w, QWeight):
        fmt = tiles_mod.check_qweight(name, w, lambda f: jnp.dtype(f.storage), device_info().capability,
                                      "Pallas", "in XLA")
        check_shape(f"{name} scale", w.scale, fmt.scale_shape(w.q.shape))
        return w.q, [w.scale.astype(jnp.float32)], w.fmt
    check_float(name, w, dtype)
    return w, [], None


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_shape(name: str, x, shape: tuple) -> None:
    check(tuple(x.shape) == tuple(shape), f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")


def check_float(name: str, x, dtype=None) -> None:
    check(jnp.issubdtype(x.dtype, jnp.floating), f"{name}: expected a float array, got {x.dtype}")
    if dtype is not None:
        check(x.dtype == dtype, f"{name}: dtype {x.dtype} must match the activations' {jnp.dtype(dtype)}")


def check_int(name: str, x) -> None:
    check(x.dtype == jnp.int32, f"{name}: expected int32, got {x.dtype}")
