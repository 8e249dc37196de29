"""The projections of both twins on quantized weights (common.formats: int8 per output row, fp8 e4m3 in
128 x 128 blocks) against common.reference's ops on the same QWeight (q * scale).

Weight-only semantics: what a kernel on a QWeight computes is the float model whose weights are
q * scale. float32 runs must match the float64 reference on those weights within TOLERANCES (so a
misplaced scale, a block read from the wrong row or column, or a scale applied twice fails);
bfloat16 runs may be at most 2x as far as the twin's plain op, which dequantizes the whole weight
first. Shapes cover a hidden size that is not a multiple of 128 (a partial last block column),
one-token (GEMV) and tensor-core tiles, chunks shorter and longer than a block.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import twins
from common import formats
from common import reference as R
from common.config import PRESETS
from common.tiles import MatmulTiles
from kernel_shapes import EPS, THETA, Shape, from_config, tiles_id
from test_kernels import _check, _x  # the kernel suite's comparison and activations (small rows included)

F32, BF16 = "float32", "bfloat16"
FORMATS = ("int8", "fp8")


def _quantized(tw, w: np.ndarray, fmt: str):
    """(the twin's QWeight, the same numpy QWeight for common.reference's ops)."""
    q, s = formats.quantize(w, fmt)
    return tw.qweight(q, s, fmt), formats.QWeight(q, s, fmt)


class QuantKernelTests:
    GPU: bool
    CASES: list  # (Shape, tokens, dtype, MatmulTiles | None)

    @pytest.fixture
    def tw(self, framework):
        return twins.make(framework, self.GPU)

    def test_linear_residual(self, tw, fmt, case):
        shape, t, dtype, tiles = case
        tiles = _for_twin(tw, tiles)
        rng = np.random.default_rng(t)
        k, n = shape.hq * shape.d, shape.hidden
        w, wf = _quantized(tw, rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k), fmt)
        x, res = tw.arr(rng.standard_normal((t, k)), dtype), tw.arr(rng.standard_normal((t, n)), dtype)
        out = tw.kernel("linear_residual")(x, w, res, tiles=tiles)
        assert tuple(out.shape) == (t, n) and out.dtype == x.dtype
        _check(tw, out, tw.reference("linear_residual", x, wf, res), tw.plain("linear_residual")(x, w, res), dtype,
               f"{fmt} linear_residual")

    def test_mlp(self, tw, fmt, case):
        shape, t, dtype, tiles = case
        tiles = _for_twin(tw, tiles)
        rng = np.random.default_rng(10 + t)
        h, i = shape.hidden, shape.inter
        gu, guf = _quantized(tw, rng.standard_normal((2 * i, h)).astype(np.float32) / np.sqrt(h), fmt)
        down, downf = _quantized(tw, rng.standard_normal((h, i)).astype(np.float32) / np.sqrt(i), fmt)
        x, nw = tw.arr(_x(rng, t, h), dtype), tw.arr(rng.uniform(0.3, 3.0, h), dtype)
        out = tw.kernel("mlp")(x, nw, gu, down, x, eps=EPS, tiles=tiles, down_tiles=tiles)
        want = tw.reference("mlp", x, nw, guf, downf, x, eps=EPS)
        _check(tw, out, want, tw.plain("mlp")(x, nw, gu, down, x, eps=EPS), dtype, f"{fmt} mlp")

    def test_rmsnorm_qkv(self, tw, fmt, case):
        shape, t, dtype, tiles = case
        tiles = _for_twin(tw, tiles)
        rng = np.random.default_rng(20 + t)
        h, d, hq, hkv = shape.hidden, shape.d, shape.hq, shape.hkv
        if tw.name == "jax" and tiles is not None and tiles.block_n > d:
            tiles = MatmulTiles(tiles.block_m, d, tiles.block_k)  # jax: one head per program at most
        w, wf = _quantized(tw, rng.standard_normal(((hq + 2 * hkv) * d, h)).astype(np.float32) / np.sqrt(h), fmt)
        x, nw = tw.arr(_x(rng, t, h), dtype), tw.arr(rng.uniform(0.3, 3.0, h), dtype)
        qn, kn = tw.arr(rng.uniform(1.0, 30.0, d), dtype), tw.arr(rng.uniform(1.0, 30.0, d), dtype)
        max_pos, slots = 512, rng.permutation(2 * t + 4)[:t]
        positions = rng.integers(0, max_pos, size=t)
        meta = tw.meta(positions=positions, slots=slots)
        caches = [tw.arr(np.zeros((2 * t + 4, 1, hkv, d)), dtype) for _ in range(2)]
        args = (x, nw, w, qn, kn, tw.rope_table(max_pos, d, THETA))
        kw = dict(num_heads=hq, num_kv_heads=hkv, eps=EPS)
        q, kc, vc = tw.kernel("rmsnorm_qkv")(*args, *[tw.copy(c) for c in caches], meta, **kw, tiles=tiles)
        pq, pkc, pvc = tw.plain("rmsnorm_qkv")(*args, *[tw.copy(c) for c in caches], meta, **kw)
        rq, rkc, rvc = tw.reference("rmsnorm_qkv", x, nw, wf, qn, kn, R.rope_table(max_pos, d, THETA), *caches, meta,
                                    **kw)
        _check(tw, q, rq, pq, dtype, f"{fmt} q")
        for name, got, plain, want in (("k", kc, pkc, rkc), ("v", vc, pvc, rvc)):
            rows = lambda c: tw.np(c).reshape(-1, hkv, d)[slots]  # noqa: E731
            _check(tw, rows(got), rows(want), rows(plain), dtype, f"{fmt} {name} cache rows")


def pytest_generate_tests(metafunc):
    cls = metafunc.cls
    if cls is None or "case" not in metafunc.fixturenames:
        return
    cases = [(fw, fmt, c) for fw in twins.FRAMEWORKS for fmt in FORMATS for c in cls.CASES]
    ids = [f"{fw}-{fmt}-{c[0].name}-t{c[1]}-{c[2]}-{tiles_id(c[3])}" for fw, fmt, c in cases]
    metafunc.parametrize(("framework", "fmt", "case"), cases, ids=ids)


def _for_twin(tw, tiles):
    """jax_impl's projections take split_k 1: its cases run the same tiles unsplit."""
    return dataclasses.replace(tiles, split_k=1) if tw.name == "jax" and tiles is not None else tiles


# hidden 320: two whole 128-column blocks and a half one; q 256 and k/v 128 rows: whole row blocks
_S = Shape("h320-i384", 320, 384, 4, 2, 64)


class TestInterpret(QuantKernelTests):
    GPU = False
    CASES = [(_S, 1, F32, MatmulTiles(1, 16, 64)),    # chunks inside one block
             (_S, 1, F32, MatmulTiles(1, 8, 256)),    # chunks of two blocks, the last one partial
             (_S, 3, BF16, MatmulTiles(4, 16, 512)),  # a few rows (jax: rows; torch: padded dot)
             (_S, 19, F32, MatmulTiles(16, 32, 64)),  # tensor-core dot
             (_S, 19, BF16, MatmulTiles(32, 64, 256)),
             (_S, 19, BF16, MatmulTiles(16, 32, 64, split_k=3)),  # torch: K in 3 parts (jax: split_k 1)
             (_S, 1, BF16, None)]


@pytest.mark.gpu
class TestGPU(QuantKernelTests):
    GPU = True
    CASES = [(from_config(n, PRESETS[n]), t, BF16, None) for n in ("Qwen3-0.6B", "Qwen3-8B") for t in (1, 3, 16, 67)]
