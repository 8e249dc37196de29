"""Which implementation of each op a model runs (`fused`): the one decision of both twins, made when
the model is built.

- False: the plain ops everywhere.
- True: the kernels everywhere; off a CUDA GPU they run in the twin's interpreter; where they cannot
  run here (no interpreter, a GPU below CAPABILITY["kernels"], kernels that do not import), raise
  FusedUnavailable with the reason.
- "auto": on CUDA GPUs of CAPABILITY["kernels"] or newer, each op asks common.tiles.lookup at each
  shape whether its kernel or the plain op runs ("per-shape"); the plain ops elsewhere.
At load, before a weight is read, `check_weight_format` refuses (fused=True) or notes ("auto") a
weight format whose kernels need a newer GPU than one the kernels run on (fp8 below 8.9).
Each twin's ops.py reports its device (`Here`), names its parts (`Twin`), builds its Ops from the
`Decision` (`kernel_ops`) and logs its message once (`log_once`). The gates are common.tile_rules.CAPABILITY.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable

from common.formats import QWeight
from common.harness import resolve_fused
from common.ops import OP_NAMES, Ops, kernel_shape
from common.tile_rules import CAPABILITY, capable, dotted, format_min_capability


class FusedUnavailable(RuntimeError):
    """fused=True was requested where the twin's kernels cannot run."""


@dataclasses.dataclass(frozen=True)
class Twin:
    """How a twin's messages name its parts (a constant of its ops.py)."""

    name: str  # "jax_impl": the logger and the messages' prefix
    kernels: str  # "Pallas kernels"
    plain: str  # "plain XLA path"
    plain_where: str  # where the plain path dequantizes a weight: "in XLA"
    no_gpu: str  # "auto"'s reason off CUDA: "no CUDA GPU"


@dataclasses.dataclass(frozen=True)
class Here:
    """What a twin reports of the device a model runs on."""

    capability: tuple[int, int] | None  # CUDA compute capability; None off CUDA
    interpreter: str = ""  # off CUDA, fused=True: where the kernels run ("in interpreter mode on cpu")
    unusable: str | None = None  # fused=True: why the kernels cannot run here (the error), None: they can


@dataclasses.dataclass(frozen=True)
class Decision:
    path: str  # "plain" everywhere | "fused" (the kernels everywhere) | "per-shape" (common.tiles.lookup)
    message: str  # the one log line of this outcome


def decide(twin: Twin, fused, here: Here, *, load: Callable[[], object], describe: Callable[[], str]) -> Decision:
    """The decision of the module doc. `load` imports the twin's kernels (ImportError where they cannot
    be) and `describe` says how "auto" chooses on this device; each is called only where kernels run."""
    fused = resolve_fused(fused)
    cc = here.capability
    if fused is False:
        return Decision("plain", f"{twin.name}: {twin.plain} (fused=False)")
    need = dotted(CAPABILITY["kernels"])
    if fused is True:
        if here.unusable:
            raise FusedUnavailable(here.unusable)
        if cc is not None and not capable("kernels", cc):
            raise FusedUnavailable(f"fused=True: the {twin.kernels} need compute capability >= {need} "
                                   f"(bfloat16 tensor cores), this GPU has {dotted(cc)}")
        try:
            load()
        except ImportError as e:
            raise FusedUnavailable(f"fused=True: the {twin.kernels} cannot be imported here ({e})") from None
        where = "on the GPU" if cc else here.interpreter
        return Decision("fused", f"{twin.name}: fused {twin.kernels} {where} (fused=True)")
    if not capable("kernels", cc):
        why = twin.no_gpu if cc is None else f"compute capability {dotted(cc)} < {need}"
        return Decision("plain", f"{twin.name}: {twin.plain} (fused='auto': {why})")
    try:
        load()
    except ImportError as e:
        return Decision("plain", f"{twin.name}: {twin.plain} (fused='auto': {twin.kernels} unavailable: {e})")
    return Decision("per-shape", f"{twin.name}: {describe()}")


def check_weight_format(twin: Twin, fused, fmt: str, capability: tuple[int, int] | None) -> None:
    """At load: weights of a format whose kernels need a newer GPU than this one, where the kernels
    themselves run (fp8 on compute capability 8.0-8.8: no e4m3 conversion; below 8.0 no kernel runs,
    as `decide` says). fused=True raises naming the flag and what to use instead; "auto" logs the
    fallback once (those projections dequantize in the plain path, as tile_rules.default_path picks)."""
    fused = resolve_fused(fused)
    need = format_min_capability(fmt)
    if need is None or fused is False or not capable("kernels", capability) or capable(need, capability):
        return
    problem = (f"{fmt} weights: the fused kernels convert e4m3 only on compute capability >= {dotted(need)}, "
               f"this GPU has {dotted(capability)}")
    if fused is True:
        raise FusedUnavailable(f"fused=True (--fused on) with {problem}; use fused='auto' (--fused auto: the "
                               f"{fmt} projections then dequantize {twin.plain_where}) or int8 weights "
                               f"(quantization='int8' on the bf16 checkpoint)")
    log_once(twin.name, f"{twin.name}: {fmt} projections dequantize {twin.plain_where} (fused='auto'; {problem})")


@functools.lru_cache(maxsize=None)
def log_once(logger: str, message: str) -> None:
    """Log `message` at INFO on `logger` the first time only."""
    logging.getLogger(logger).info(message)


def kernel_ops(kernels, plain, choose: Callable, *, auto: bool) -> Ops:
    """The Ops of a decision that runs kernels: the twin's `kernels` everywhere ("fused"), or with
    `auto` ("per-shape") ops that ask `choose(kernel, dtype, fmt, **shape)` (common.tiles.choose on
    the model's device) at each shape whether the kernel or the `plain` op runs: jax while tracing,
    once per compiled shape; torch at each call (a cached lookup; under CUDA graphs once, at capture)."""
    if not auto:
        return Ops.every(kernels, "fused")
    return Ops.of({n: _per_shape(n, getattr(kernels, n), getattr(plain, n), choose) for n in OP_NAMES},
                  dict.fromkeys(OP_NAMES, "per-shape"))


def _per_shape(name: str, fused: Callable, plain_fn: Callable, choose: Callable) -> Callable:
    def op(*args, **kwargs):
        kernel, shape = kernel_shape(name, args, kwargs)
        fmt = next((a.fmt for a in args if isinstance(a, QWeight)), None)  # quantized weights: own table rows
        use = choose(kernel, args[0].dtype, fmt, **shape).path == "fused"
        return (fused if use else plain_fn)(*args, **kwargs)

    op.__name__ = op.__qualname__ = name
    return op
