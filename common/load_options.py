"""What `load()` takes, once: one dataclass, validated where it is built, shared by both twins.

    from common.load_options import LoadOptions
    opts = LoadOptions.of("jax", dtype="bfloat16", quantization="int8")   # a bad value: one clear error
    jax_impl.load(model_dir, **opts.changed())                            # or jax_impl.load(model_dir, opts)

Both twins' `load` / `load_random`, the generate CLIs, nano-vllm's `install` and the benchmarks
build their options here, so a value is checked once, at the boundary, with the same message
everywhere. Fields a twin does not take (torch_impl's device and cache layout) are refused by name
on the other twin rather than ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from common import formats
from common.harness import DTYPES, resolve_fused, warmup_shapes
from common.sharding import check_lm_head_shard, check_size

TWINS = ("jax", "torch")


class LoadOptionsError(ValueError):
    """A load() option that is unknown, of the wrong type or out of range."""


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """load()'s options. Normalized on construction: `fused` to "auto" / True / False, `quantization`
    to a format name of common.formats or None, `warmup` to a tuple of shape dicts."""

    dtype: str = "bfloat16"  # weights and activations
    fused: Any = "auto"  # "auto" | True ("on") | False ("off")
    quantization: str | None = None  # the projections' weight format (common.formats.QUANTIZED)
    tensor_parallel_size: int = 1  # GPUs of this machine the model is split over
    lm_head_shard: str = "vocab"  # under tensor parallelism: "vocab" rows per rank, or "replicated"
    warmup: tuple = ()  # (batch, prompt tokens, new tokens) shapes compiled at load (common.harness.warmup_shapes)
    compile_cache: bool = True  # keep compiled programs on disk
    # torch_impl's own:
    device: str | None = None  # where the model lives (default: cuda when available, else cpu)
    block_size: int | None = None  # KV-cache block rows (None: one block per sequence)
    max_cache_tokens: int | None = None  # KV-cache rows to allocate (None: what each call needs)
    cuda_graphs: bool = True  # capture decode steps as CUDA graphs

    TWIN_ONLY = {"device": "torch", "block_size": "torch", "max_cache_tokens": "torch", "cuda_graphs": "torch"}

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise LoadOptionsError(f"dtype={self.dtype!r}: expected one of {', '.join(DTYPES)}")
        try:
            object.__setattr__(self, "fused", resolve_fused(self.fused))
            object.__setattr__(self, "quantization", formats.check_quantization(self.quantization))
            object.__setattr__(self, "warmup", tuple(warmup_shapes(self.warmup or ())))
        except ValueError as e:
            raise LoadOptionsError(str(e)) from None
        check_size(self.tensor_parallel_size)  # common.sharding.TensorParallelError, as the model's own checks
        check_lm_head_shard(self.lm_head_shard)
        for name in ("compile_cache", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise LoadOptionsError(f"{name}={getattr(self, name)!r}: expected True or False")
        if self.block_size is not None:
            _positive("block_size", self.block_size, "or None for one block per sequence")
        if self.max_cache_tokens is not None:
            _positive("max_cache_tokens", self.max_cache_tokens, "or None")
        if self.device is not None and not isinstance(self.device, str):
            object.__setattr__(self, "device", str(self.device))  # a torch.device

    @classmethod
    def of(cls, twin: str, options: "LoadOptions | None" = None, **kwargs) -> "LoadOptions":
        """`options` with `kwargs` applied, for `twin` ("jax" | "torch"): an unknown keyword, or one
        of the other twin's, is a TypeError naming it (as Python's for an unexpected keyword)."""
        if twin not in TWINS:
            raise LoadOptionsError(f"twin={twin!r}: expected one of {', '.join(TWINS)}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in kwargs:
            if key not in known:
                raise TypeError(f"{twin}_impl.load() got an unexpected keyword argument {key!r}; its options: "
                                f"{', '.join(cls.names(twin))}")
        opts = dataclasses.replace(options, **kwargs) if options is not None else cls(**kwargs)
        opts.check_twin(twin)
        return opts

    @classmethod
    def names(cls, twin: str) -> list[str]:
        """The options `twin` takes."""
        return [f.name for f in dataclasses.fields(cls) if cls.TWIN_ONLY.get(f.name, twin) == twin]

    def check_twin(self, twin: str) -> None:
        for name, owner in self.TWIN_ONLY.items():
            if owner != twin and getattr(self, name) != _DEFAULTS[name]:
                raise TypeError(f"{twin}_impl.load(): {name}={getattr(self, name)!r} is an option of "
                                f"{owner}_impl only")

    def changed(self) -> dict:
        """The options that differ from the defaults, as keywords (logs, worker processes, messages)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v != _DEFAULTS[k]}

    def replace(self, **changes) -> "LoadOptions":
        return dataclasses.replace(self, **changes)


def _positive(name: str, value, alternative: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LoadOptionsError(f"{name}={value!r}: expected a positive integer{', ' + alternative if alternative else ''}")


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LoadOptions)}

__all__ = ["LoadOptions", "LoadOptionsError"]
