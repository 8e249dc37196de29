"""The Pallas kernels of jax_impl against common.reference.

One set of tests, two modes (jax's tests/pallas pattern): `TestKernelsInterpret` runs them in
Pallas interpreter mode on CPU at shrunken presets and awkward shapes; `TestKernelsGPU`
(marked gpu) runs the very same tests through the Triton lowering at the full shapes of all
six presets. float32 results must match the float64 reference within TOLERANCES; bfloat16
results may be at most 2x as far from it as the plain jnp op in bfloat16 (jax_impl.ops_plain).
q/k-norm weights are realistic (tens, up to 96: see common.checkpoint's "realistic" scale).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from common import reference as R  # noqa: E402
from common.tiles import AttentionTiles, MatmulTiles, PrefillTiles  # noqa: E402
from common.tolerances import assert_close, assert_lowp_close  # noqa: E402
from jax_impl import kernels as K  # noqa: E402
from jax_impl import ops_plain as P  # noqa: E402
import kernel_shapes as _shared  # noqa: E402
from kernel_shapes import EPS, GPU_SHAPES, THETA, Shape, tiles_id  # noqa: E402

# The shared list plus one more awkward shape (hidden 160, many q heads per kv head).
CPU_SHAPES = _shared.CPU_SHAPES[:3] + [Shape("h160-i384", 160, 384, 8, 2, 64)] + _shared.CPU_SHAPES[3:]


@functools.lru_cache(maxsize=64)
def _normal(shape, dtype, scale, seed):
    """(device array in dtype, float32 numpy copy of the same values): N(0, scale^2), made on the
    default device (fast at full preset shapes) and cached (the presets' big weights are reused)."""
    x = (jax.random.normal(jax.random.key(seed), shape, jnp.float32) * scale).astype(dtype)
    x.block_until_ready()
    return x, np.asarray(x.astype(jnp.float32))


def _host(a, dtype):
    """A small numpy array as (device array in dtype, its float32 values)."""
    x = jnp.asarray(np.asarray(a, np.float32)).astype(dtype)
    return x, np.asarray(x.astype(jnp.float32))


def _rope_table(max_pos, d):
    """cos_sin [max_pos, D] float32 as the kernels take it, from the float64 angles of the
    reference (angles computed in float32 would differ from it by more than the f32 tolerance)."""
    cos, sin = R.rope_cos_sin(np.arange(max_pos), d, THETA)
    return jnp.asarray(np.concatenate([cos[:, :d // 2], sin[:, :d // 2]], axis=1).astype(np.float32))


def _norm_weights(rng, d, big):
    """Realistic q/k-norm weights: uniform in [1, 30] with a few spikes (as common.checkpoint)."""
    w = rng.uniform(1.0, 30.0, size=d)
    w[rng.integers(0, d, size=max(1, d // 16))] = big
    return w


def _check(actual, expected, framework, dtype, what):
    if dtype == "float32":
        assert_close(actual, expected, "float32", what=what)
    else:
        assert_lowp_close(np.asarray(actual, np.float32), np.asarray(framework, np.float32), expected, what=what)


def pytest_generate_tests(metafunc):
    cls = metafunc.cls
    for name in ("qkv_case", "mm_case", "attn_case", "prefill_case"):
        if cls is not None and name in metafunc.fixturenames:
            cases = getattr(cls, name.upper() + "S")
            metafunc.parametrize(name, cases, ids=[f"{c[0].name}-{c[1]}-{c[2]}-{tiles_id(c[3])}" for c in cases])


def _product(shapes, sizes, dtypes):
    return [(s, n, dt, None) for s in shapes for n in sizes for dt in dtypes]


class KernelTests:
    """The tests; subclasses set the shapes (and whether they run on the GPU)."""

    INTERPRET: bool | None
    REF = np.float64  # dtype of the reference computation
    QKV_CASES: list  # (Shape, tokens, dtype, MatmulTiles | None)
    MM_CASES: list   # the same, for mlp and attn_out
    ATTN_CASES: list  # (Shape, batch, dtype, AttentionTiles | None)
    PREFILL_CASES: list  # (Shape, prompt length L, dtype, PrefillTiles | None); batches of 3 prompts
    CONTEXT: int     # longest context of the attention tests
    BLOCK_SIZE: int  # cache block size of the attention tests

    # ----- rmsnorm_qkv ----------------------------------------------------------------------------
    def test_rmsnorm_qkv(self, qkv_case):
        shape, t, dtype, tiles = qkv_case
        rng, ref = np.random.default_rng(t), self.REF
        d, hq, hkv, hidden = shape.d, shape.hq, shape.hkv, shape.hidden
        block_size, num_blocks = 16, (2 * t + 15) // 16 + 1
        x, x_ = _normal((t, hidden), dtype, 1.0, t)
        norm_w, norm_w_ = _host(rng.uniform(0.3, 3.0, hidden), dtype)
        w_qkv, w_qkv_ = _normal(((hq + 2 * hkv) * d, hidden), dtype, hidden ** -0.5, 1)
        q_norm, q_norm_ = _host(_norm_weights(rng, d, 60.0), dtype)
        k_norm, k_norm_ = _host(_norm_weights(rng, d, 96.0), dtype)
        max_pos = 4096
        positions = rng.integers(0, max_pos, size=t).astype(np.int32)
        slots = rng.permutation(num_blocks * block_size)[:t].astype(np.int32)
        slots[::3] = -1  # some tokens are not written
        caches = [_normal((num_blocks, block_size, hkv, d), dtype, 1.0, 2 + i)[0] for i in range(2)]
        args = (x, norm_w, w_qkv, q_norm, k_norm, _rope_table(max_pos, d), jnp.asarray(positions),
                jnp.asarray(slots), *caches)
        kw = dict(num_heads=hq, num_kv_heads=hkv, eps=EPS)
        q, kc, vc = K.rmsnorm_qkv(*args, **kw, tiles=tiles, interpret=self.INTERPRET)
        pq, pkc, pvc = jax.jit(lambda *a: P.rmsnorm_qkv(*a, **kw))(*args)
        rq, rk, rv = R.rmsnorm_qkv(x_, norm_w_, w_qkv_, q_norm_, k_norm_, positions, num_heads=hq,
                                   num_kv_heads=hkv, head_dim=d, eps=EPS, theta=THETA, dtype=ref)
        assert q.shape == (t, hq, d) and q.dtype == x.dtype
        _check(q, rq, pq, dtype, "q")
        written = slots >= 0
        rows = slots[written]
        for name, got, plain, expect, before in (("k_cache", kc, pkc, rk, caches[0]),
                                                 ("v_cache", vc, pvc, rv, caches[1])):
            got, before = _rows(got), _rows(before)
            _check(got[rows], expect[written], _rows(plain)[rows], dtype, f"{name} rows written")
            keep = np.setdiff1d(np.arange(got.shape[0]), rows)
            np.testing.assert_array_equal(got[keep], before[keep], err_msg=f"{name}: rows not in slots must be unchanged")

    # ----- mlp and attn_out -----------------------------------------------------------------------
    def test_mlp(self, mm_case):
        shape, t, dtype, tiles = mm_case
        h, i = shape.hidden, shape.inter
        x, x_ = _normal((t, h), dtype, 1.0, 100 + t)
        norm_w, norm_w_ = _host(np.random.default_rng(t).uniform(0.3, 3.0, h), dtype)
        w_gu, w_gu_ = _normal((2 * i, h), dtype, h ** -0.5, 4)
        w_down, w_down_ = _normal((h, i), dtype, i ** -0.5, 5)
        out = K.mlp(x, norm_w, w_gu, w_down, eps=EPS, tiles=tiles, down_tiles=tiles, interpret=self.INTERPRET)
        plain = jax.jit(lambda *a: P.mlp(*a, eps=EPS))(x, norm_w, w_gu, w_down)
        assert out.shape == (t, h) and out.dtype == x.dtype
        _check(out, R.mlp_block(x_, norm_w_, w_gu_, w_down_, EPS, dtype=self.REF), plain, dtype, "mlp")

    def test_attn_out(self, mm_case):
        shape, t, dtype, tiles = mm_case
        h, kdim = shape.hidden, shape.hq * shape.d
        attn, attn_ = _normal((t, kdim), dtype, 1.0, 200 + t)
        w_o, w_o_ = _normal((h, kdim), dtype, kdim ** -0.5, 6)
        res, res_ = _normal((t, h), dtype, 1.0, 300 + t)
        out = K.attn_out(attn, w_o, res, tiles=tiles, interpret=self.INTERPRET)
        plain = jax.jit(P.attn_out)(attn, w_o, res)
        assert out.shape == (t, h) and out.dtype == res.dtype
        _check(out, R.attn_out(attn_, w_o_, res_, dtype=self.REF), plain, dtype, "attn_out")

    # ----- decode attention -----------------------------------------------------------------------
    def test_decode_attention(self, attn_case):
        shape, b, dtype, tiles = attn_case
        rng = np.random.default_rng(300 + b)
        hq, hkv, d, bs = shape.hq, shape.hkv, shape.d, self.BLOCK_SIZE
        max_blocks = -(-self.CONTEXT // bs)
        num_blocks = b * max_blocks + 3
        q, q_ = _normal((b, hq, d), dtype, 1.0, 400 + b)
        kc, kc_ = _normal((num_blocks, bs, hkv, d), dtype, 1.0, 7)
        vc, vc_ = _normal((num_blocks, bs, hkv, d), dtype, 1.0, 8)
        tables = rng.permutation(num_blocks)[:b * max_blocks].reshape(b, max_blocks).astype(np.int32)
        lens = rng.integers(1, max_blocks * bs + 1, size=b).astype(np.int32)
        lens[0] = 1
        if b > 1:
            lens[1] = max_blocks * bs
        args = (q, kc, vc, jnp.asarray(tables), jnp.asarray(lens))
        out = K.decode_attention(*args, tiles=tiles, interpret=self.INTERPRET)
        plain = jax.jit(P.decode_attention)(*args)
        k_seq = kc_[tables].reshape(b, -1, hkv, d)
        v_seq = vc_[tables].reshape(b, -1, hkv, d)
        assert out.shape == (b, hq, d) and out.dtype == q.dtype
        _check(out, R.decode_attention(q_, k_seq, v_seq, lens, dtype=self.REF), plain, dtype, "decode_attention")

    def test_decode_attention_unpaged(self, attn_case):
        """block_tables=None: sequence b owns cache block b (jax_impl.model's layout), read in place."""
        shape, b, dtype, tiles = attn_case
        rng = np.random.default_rng(500 + b)
        rows = self.CONTEXT  # one block of a non-power-of-two number of rows per sequence
        q, q_ = _normal((b, shape.hq, shape.d), dtype, 1.0, 600 + b)
        kc, kc_ = _normal((b, rows, shape.hkv, shape.d), dtype, 1.0, 9)
        vc, vc_ = _normal((b, rows, shape.hkv, shape.d), dtype, 1.0, 10)
        lens = rng.integers(1, rows + 1, size=b).astype(np.int32)
        lens[-1] = rows
        args = (q, kc, vc, None, jnp.asarray(lens))
        out = K.decode_attention(*args, tiles=tiles, interpret=self.INTERPRET)
        plain = jax.jit(P.decode_attention)(*args)
        _check(out, R.decode_attention(q_, kc_, vc_, lens, dtype=self.REF), plain, dtype, "decode_attention (unpaged)")


    def test_prefill_attention(self, prefill_case):
        """Causal attention over right-padded prompts: a full one, a short one, a single token."""
        shape, l, dtype, tiles = prefill_case
        hq, hkv, d = shape.hq, shape.hkv, shape.d
        q, q_ = _normal((3, l, hq, d), dtype, 1.0, 900 + l)
        k, k_ = _normal((3, l, hkv, d), dtype, 1.0, 901 + l)
        v, v_ = _normal((3, l, hkv, d), dtype, 1.0, 902 + l)
        lens = np.array([l, max(1, l // 3 + 1), 1], np.int32)
        out = K.prefill_attention(q, k, v, jnp.asarray(lens), tiles=tiles, interpret=self.INTERPRET)
        plain = np.asarray(jax.jit(P.prefill_attention)(q, k, v, jnp.asarray(lens)).astype(jnp.float32))
        assert out.shape == q.shape and out.dtype == q.dtype
        out = np.asarray(out.astype(jnp.float32))
        for b, n in enumerate(lens):
            expect = R.attention(q_[b, :n], k_[b, :n], v_[b, :n], np.arange(n), dtype=self.REF)
            _check(out[b, :n], expect, plain[b, :n], dtype, f"prefill_attention (sequence {b}, {n} tokens)")
        assert np.isfinite(out).all(), "prefill_attention: padding rows must stay finite"


def _rows(cache):
    """[num_blocks, block_size, Hkv, D] -> float32 numpy [rows, Hkv, D]."""
    a = np.asarray(jnp.asarray(cache).astype(jnp.float32))
    return a.reshape(-1, *a.shape[2:])


_A, _B, _C, _D, _E = CPU_SHAPES
F32, BF16 = "float32", "bfloat16"


class TestKernelsInterpret(KernelTests):
    """Interpreter mode on CPU: a covering set of (shape, tokens, dtype, tiles), kept small."""

    INTERPRET = None  # automatic: interpreter mode on a CPU backend
    QKV_CASES = [(_A, 1, F32, None), (_A, 1, BF16, None), (_B, 3, BF16, None), (_C, 19, F32, None),
                 (_E, 3, F32, None), (_E, 19, BF16, None), (_D, 1, BF16, None),
                 (_A, 3, BF16, MatmulTiles(2, 128, 32)),    # fused GEMV, 2 token rows per program
                 (_A, 3, BF16, MatmulTiles(4, 16, 64)),     # split: projection kernel + epilogue kernel
                 (_A, 19, BF16, MatmulTiles(16, 32, 32))]   # split, with the dot
    MM_CASES = _product(CPU_SHAPES, (1, 19), (F32,)) + _product(CPU_SHAPES, (3,), (BF16,)) + [
        (_B, 1, BF16, None), (_E, 19, BF16, None),
        (_E, 3, BF16, MatmulTiles(2, 16, 32)), (_D, 19, BF16, MatmulTiles(16, 32, 32)),
        (_C, 19, F32, MatmulTiles(64, 64, 64))]
    ATTN_CASES = [(_A, 1, F32, None), (_B, 3, BF16, None), (_C, 3, F32, AttentionTiles(16, num_splits=4)),
                  (_D, 3, BF16, AttentionTiles(16, num_splits=4)), (_E, 3, BF16, AttentionTiles(32)),
                  (_E, 1, F32, AttentionTiles(16, num_splits=2))]
    PREFILL_CASES = [(_A, 37, F32, None), (_B, 19, BF16, None), (_D, 70, BF16, PrefillTiles(32, 16)),
                     (_E, 33, F32, PrefillTiles(16, 32))]
    CONTEXT = 72
    BLOCK_SIZE = 16


@pytest.mark.gpu
class TestKernelsGPU(KernelTests):
    """Through the Triton lowering on the GPU, at the full shapes of all six presets."""

    INTERPRET = False
    REF = np.float32  # full shapes: a float32 reference is ample for the bf16 rule and much faster
    _tiles = [MatmulTiles(1, 128, 128, num_warps=8), MatmulTiles(1, 16, 512), MatmulTiles(16, 32, 128),
              MatmulTiles(4, 128, 64, num_warps=8)]
    QKV_CASES = _product(GPU_SHAPES, (1, 3, 16, 67), (BF16,)) + [
        (GPU_SHAPES[3], t, BF16, tl) for t, tl in zip((1, 1, 16, 3), _tiles)]
    MM_CASES = _product(GPU_SHAPES, (1, 3, 16, 67), (BF16,)) + [
        (GPU_SHAPES[2], t, BF16, tl) for t, tl in
        ((1, MatmulTiles(1, 8, 1024)), (3, MatmulTiles(4, 16, 128)), (300, MatmulTiles(64, 64, 64)))]
    ATTN_CASES = _product(GPU_SHAPES, (1, 16), (BF16,)) + [
        (GPU_SHAPES[0], 3, BF16, AttentionTiles(32, num_splits=8))]
    PREFILL_CASES = _product(GPU_SHAPES, (700,), (BF16,)) + [(GPU_SHAPES[3], 513, BF16, PrefillTiles(128, 32))]
    CONTEXT = 4000
    BLOCK_SIZE = 256


@pytest.mark.gpu
class TestKernelsGPUFloat32(TestKernelsGPU):
    REF = np.float64
    QKV_CASES = MM_CASES = _product(GPU_SHAPES[:1], (1, 3, 19), (F32,))
    ATTN_CASES = [(GPU_SHAPES[0], 3, F32, None)]
    PREFILL_CASES = [(GPU_SHAPES[0], 300, F32, None)]


# ----- launcher checks ------------------------------------------------------------------------

def test_bad_inputs_name_the_tensor():
    x = jnp.zeros((2, 64), jnp.float32)
    with pytest.raises(ValueError, match="residual"):
        K.attn_out(x, jnp.zeros((32, 64), jnp.float32), jnp.zeros((2, 31), jnp.float32))
    with pytest.raises(ValueError, match="w_gate_up"):
        K.mlp(x, jnp.ones((64,)), jnp.zeros((33, 64), jnp.float32), jnp.zeros((64, 16), jnp.float32), eps=EPS)
    with pytest.raises(ValueError, match="w_gate_up.*float32"):
        K.mlp(x, jnp.ones((64,)), jnp.zeros((32, 64), jnp.bfloat16), jnp.zeros((64, 16), jnp.float32), eps=EPS)
    cache = jnp.zeros((2, 4, 1, 16), jnp.float32)
    with pytest.raises(ValueError, match="slots"):
        K.rmsnorm_qkv(x, jnp.ones((64,)), jnp.zeros((64, 64), jnp.float32), jnp.ones((16,)), jnp.ones((16,)),
                      jnp.zeros((8, 16), jnp.float32), jnp.zeros((2,), jnp.int32), jnp.zeros((3,), jnp.int32),
                      cache, cache, num_heads=2, num_kv_heads=1, eps=EPS)
    with pytest.raises(ValueError, match="context_lens"):
        K.decode_attention(jnp.zeros((2, 2, 16), jnp.float32), cache, cache, jnp.zeros((2, 2), jnp.int32),
                           jnp.ones((2,), jnp.float32))
    with pytest.raises(ValueError, match="block_n"):
        K.rmsnorm_qkv(x, jnp.ones((64,)), jnp.zeros((64, 64), jnp.float32), jnp.ones((16,)), jnp.ones((16,)),
                      jnp.zeros((8, 16), jnp.float32), jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32),
                      cache, cache, num_heads=2, num_kv_heads=1, eps=EPS, tiles=MatmulTiles(1, 32, 64))


def test_prefer_fused_table():
    assert K.prefer_fused("decode_attention", 16, 4096)
    assert K.prefer_fused("mlp", 1, 4096) and not K.prefer_fused("mlp", 4, 1024)
    assert K.prefer_fused("rmsnorm_qkv", 4, 1024) and not K.prefer_fused("rmsnorm_qkv", 16, 4096)
    assert not K.prefer_fused("attn_out", 512, 1024)
    with pytest.raises(ValueError, match="unknown op"):
        K.prefer_fused("lm_head", 1, 1024)
