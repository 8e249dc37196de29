"""load()'s options (common.load_options): one dataclass, checked where it is built, taken alike by
both twins' load and load_random, the CLIs, nano-vllm's install and the benchmarks."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from common.load_options import LoadOptions, LoadOptionsError
from common.sharding import TensorParallelError


def test_normalized_on_construction():
    opts = LoadOptions(fused="on", quantization="none", warmup=[(1, 8, 4)])
    assert opts.fused is True and opts.quantization is None
    assert opts.warmup == ({"batch": 1, "prompt_tokens": 8, "new_tokens": 4, "temperature": 0.0, "top_k": 0,
                            "top_p": 1.0},)
    assert LoadOptions(fused="off").fused is False and LoadOptions().changed() == {}
    assert LoadOptions(quantization="int8", compile_cache=False).changed() == {"quantization": "int8",
                                                                               "compile_cache": False}
    assert LoadOptions(**LoadOptions(warmup=[(2, 3, 4)]).changed()) == LoadOptions(warmup=[(2, 3, 4)])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dtype="int8"), LoadOptionsError, "dtype='int8': expected one of float32, bfloat16, float16"),
    (dict(fused="sometimes"), LoadOptionsError, "fused='sometimes'"),
    (dict(quantization="int4"), LoadOptionsError, "quantization='int4': expected one of int8, fp8"),
    (dict(tensor_parallel_size=0), TensorParallelError, "tensor_parallel_size=0: expected a positive integer"),
    (dict(tensor_parallel_size="2"), TensorParallelError, "tensor_parallel_size='2'"),
    (dict(lm_head_shard="rows"), TensorParallelError, "lm_head_shard='rows': expected one of 'vocab', 'replicated'"),
    (dict(warmup=[(0, 1, 1)]), LoadOptionsError, "warmup: \\(0, 1, 1\\)"),
    (dict(compile_cache="no"), LoadOptionsError, "compile_cache='no': expected True or False"),
    (dict(block_size=0), LoadOptionsError, "block_size=0: expected a positive integer"),
    (dict(max_cache_tokens=True), LoadOptionsError, "max_cache_tokens=True"),
    (dict(cuda_graphs=1), LoadOptionsError, "cuda_graphs=1"),
])
def test_bad_values_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoadOptions(**kwargs)


def test_twin_options():
    assert LoadOptions.of("torch", device="cpu", block_size=16).block_size == 16
    with pytest.raises(TypeError, match="jax_impl.load\\(\\): device='cpu' is an option of torch_impl only"):
        LoadOptions.of("jax", device="cpu")
    with pytest.raises(TypeError, match="unexpected keyword argument 'quantisation'"):
        LoadOptions.of("jax", quantisation="int8")
    base = LoadOptions(dtype="float32")
    assert LoadOptions.of("jax", base, fused=False) == LoadOptions(dtype="float32", fused=False)
    assert LoadOptions.names("jax") == [f.name for f in dataclasses.fields(LoadOptions)
                                        if f.name not in LoadOptions.TWIN_ONLY]


def test_twins_load_through_the_options():
    """Both twins' load / load_random take the options object or its fields, nothing else."""
    import jax_impl
    import torch_impl

    for twin in (jax_impl, torch_impl):
        for fn in (twin.load, twin.load_random):
            params = inspect.signature(fn).parameters
            assert "options" in params and any(p.kind is p.VAR_KEYWORD for p in params.values()), fn
            assert not set(params) & {f.name for f in dataclasses.fields(LoadOptions)}, fn


def test_load_refuses_before_reading(tmp_path):
    """A bad option fails at the boundary, before the directory is looked at."""
    import jax_impl
    import torch_impl

    missing = tmp_path / "no-such-model"
    with pytest.raises(LoadOptionsError, match="quantization='int4'"):
        jax_impl.load(missing, quantization="int4")
    with pytest.raises(TypeError, match="block_size=16 is an option of torch_impl only"):
        jax_impl.load(missing, block_size=16)
    with pytest.raises(TensorParallelError, match="lm_head_shard='rows'"):
        torch_impl.load(missing, lm_head_shard="rows")
