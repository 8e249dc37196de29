"""The kernels of both twins against common.reference: one suite over common.ops' op list x {jax, torch}.

One set of tests, two modes (jax's tests/pallas pattern): `TestInterpret` runs them on CPU in the
kernels' interpreters (Pallas interpret=True, Triton TRITON_INTERPRET=1) at shrunken presets and
awkward shapes; `TestGPU` (marked gpu) runs the very same tests compiled on the GPU at the full
shapes of all six presets. float32 results must match the float64 reference within TOLERANCES;
bfloat16 results may be at most 2x as far from it as the twin's plain op in bfloat16 - and the
plain op itself, the yardstick, must be within the bf16 tolerance of the reference. q/k-norm
weights are realistic (tens, up to 96); some token rows have a norm so small that eps matters.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import pytest

import twins
from common import reference as R
from common.ops import OPS
from common.tiles import AttentionTiles, MatmulTiles, PrefillTiles
from common.tolerances import TOLERANCES, assert_close, assert_lowp_close, rel_error
from common import tile_rules
from common.tiles import next_pow2
from kernel_shapes import CPU_SHAPES, EPS, GPU_SHAPES, THETA, Shape, projection_shapes, tiles_id

F32, BF16 = "float32", "bfloat16"
SMALL_ROW = 1e-3  # rows of x this small: mean(x^2) ~ 1e-6 ~ eps, so an eps-free norm is visibly wrong


def _check(tw, actual, expected, plain, dtype: str, what: str) -> None:
    """The kernel against the reference (float32: tolerance; bf16: 2x the plain op's error), and the
    plain op against the reference (its own tolerance)."""
    actual, plain = tw.np(actual), tw.np(plain)
    if dtype == F32:
        assert_close(plain, expected, F32, what=f"{tw.name} plain {what}")
        assert_close(actual, expected, F32, what=f"{tw.name} kernel {what}")
        return
    err = rel_error(plain, expected)
    assert err <= TOLERANCES[BF16][1], f"{tw.name} plain {what}: relative error {err:.3g} against the reference"
    assert_lowp_close(actual, plain, expected, what=f"{tw.name} kernel {what}")


def _assert_counters_reset(device) -> None:
    """torch_impl's split counters (decode attention's splits, the projections' split_k) are all
    zero after a launch: the program that finishes a tile resets its counter."""
    from torch_impl.kernels import _lib

    counters = _lib._COUNTERS.get(device)
    assert counters is None or int(counters.abs().sum()) == 0, "split counters must be reset to zero"


def _x(rng, t: int, hidden: int) -> np.ndarray:
    """Activations N(0, 1) with every fourth row scaled to SMALL_ROW."""
    x = rng.standard_normal((t, hidden))
    x[1::4] *= SMALL_ROW
    return x


def _norm_weights(rng, d: int, big: float) -> np.ndarray:
    """Realistic q/k-norm weights: uniform in [1, 30] with a few spikes (as common.checkpoint)."""
    w = rng.uniform(1.0, 30.0, size=d)
    w[rng.integers(0, d, size=max(1, d // 16))] = big
    return w


@functools.lru_cache(maxsize=2)
def _weights(shape: Shape, kind: str) -> dict[str, np.ndarray]:
    """float32 weights of one shape, drawn once and shared by its cases (full-preset matrices are
    costly to draw): "qkv", "mlp" or "o"."""
    rng = np.random.default_rng(zlib.crc32(f"{shape.name}/{kind}".encode()))
    h, d = shape.hidden, shape.d
    normal = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    if kind == "qkv":
        return dict(norm_w=rng.uniform(0.3, 3.0, h), w_qkv=normal((shape.hq + 2 * shape.hkv) * d, h) / np.sqrt(h),
                    q_norm_w=_norm_weights(rng, d, 60.0), k_norm_w=_norm_weights(rng, d, 96.0))
    if kind == "mlp":
        i = shape.inter
        return dict(norm_w=rng.uniform(0.3, 3.0, h), w_gate_up=normal(2 * i, h) / np.sqrt(h),
                    w_down=normal(h, i) / np.sqrt(i))
    return dict(w_o=normal(h, shape.hq * d) / np.sqrt(shape.hq * d))


def _rows(tw, cache) -> np.ndarray:
    a = tw.np(cache)
    return a.reshape(-1, *a.shape[2:])


def _cases(cases, twin_names=twins.FRAMEWORKS):
    """Parametrize (twin, case) pairs with readable ids; a case may name the twins it applies to last."""
    out, ids = [], []
    for fw in twin_names:
        for case in cases:
            only = case[4] if len(case) > 4 else twins.FRAMEWORKS
            if fw in only:
                out.append((fw, case[:4]))
                ids.append(f"{fw}-{case[0].name}-{case[1]}-{case[2]}-{tiles_id(case[3])}")
    return out, ids


CASE_FIXTURES = ("qkv_case", "mm_case", "attn_case", "prefill_case", "long_prefill_case")


def pytest_generate_tests(metafunc):
    cls = metafunc.cls
    if cls is None or "framework" not in metafunc.fixturenames:
        return
    for name in CASE_FIXTURES:
        if name in metafunc.fixturenames:
            params, ids = _cases(getattr(cls, name.upper() + "S"))
            metafunc.parametrize(("framework", name), params, ids=ids)
            return
    metafunc.parametrize("framework", list(twins.FRAMEWORKS))


class KernelTests:
    """The tests; subclasses set the mode and the cases."""

    GPU: bool
    QKV_CASES: list  # (Shape, tokens, dtype, MatmulTiles | None[, twins])
    MM_CASES: list  # the same, for mlp, linear_residual and rms_norm
    ATTN_CASES: list  # (Shape, batch, dtype, AttentionTiles | None[, twins])
    PREFILL_CASES: list  # (Shape, layout "one-block" | "paged", dtype, PrefillTiles | None[, twins])
    CONTEXT: int  # longest context of the decode attention tests
    BLOCK_SIZE: int  # cache block size of the paged attention tests
    PREFILL_LENS: tuple  # (new tokens, cached prefix) per sequence
    LONG_PREFILL_CASES: list  # as PREFILL_CASES, run at LONG_PREFILL_LENS
    LONG_PREFILL_LENS: tuple  # prompts of several key blocks below the diagonal, after cached prefixes

    @pytest.fixture
    def tw(self, framework):
        return twins.make(framework, self.GPU)

    # ----- rmsnorm_qkv ----------------------------------------------------------------------------
    def test_rmsnorm_qkv(self, tw, qkv_case):
        shape, t, dtype, tiles = qkv_case
        rng = np.random.default_rng(t)
        d, hq, hkv, hidden = shape.d, shape.hq, shape.hkv, shape.hidden
        block_size, num_blocks, max_pos = 16, (2 * t + 15) // 16 + 1, 4096
        x_ = _x(rng, t, hidden)
        w = {k: tw.arr(v, dtype) for k, v in _weights(shape, "qkv").items()}
        positions = rng.integers(0, max_pos, size=t)
        slots = rng.permutation(num_blocks * block_size)[:t]
        slots[::3] = -1  # some tokens are not written
        caches_ = [rng.standard_normal((num_blocks, block_size, hkv, d)) for _ in range(2)]
        meta = tw.meta(positions=positions, slots=slots)
        x = tw.arr(x_, dtype)
        weights = (x, w["norm_w"], w["w_qkv"], w["q_norm_w"], w["k_norm_w"])
        args = (*weights, tw.rope_table(max_pos, d, THETA))
        kw = dict(num_heads=hq, num_kv_heads=hkv, eps=EPS)
        before = [tw.arr(c, dtype) for c in caches_]
        pq, pkc, pvc = tw.plain("rmsnorm_qkv")(*args, *[tw.copy(c) for c in before], meta, **kw)
        q, kc, vc = tw.kernel("rmsnorm_qkv")(*args, *[tw.copy(c) for c in before], meta, **kw, tiles=tiles)
        # the reference's RoPE table is float64 (the twins' is float32): a wrong table shows
        rq, rkc, rvc = tw.reference("rmsnorm_qkv", *weights, R.rope_table(max_pos, d, THETA), *before, meta, **kw)
        assert tuple(q.shape) == (t, hq, d) and q.dtype == x.dtype
        _check(tw, q, rq, pq, dtype, "q")
        rows = slots[slots >= 0]
        for name, got, plain, expect, old in (("k_cache", kc, pkc, rkc, before[0]),
                                              ("v_cache", vc, pvc, rvc, before[1])):
            got_rows, plain_rows, old_rows = _rows(tw, got), _rows(tw, plain), _rows(tw, old)
            _check(tw, got_rows[rows], _rows(tw, expect)[rows], plain_rows[rows], dtype, f"{name} rows written")
            keep = np.setdiff1d(np.arange(got_rows.shape[0]), rows)
            np.testing.assert_array_equal(got_rows[keep], old_rows[keep],
                                          err_msg=f"{tw.name} {name}: rows not in slots must be unchanged")
        if tw.name == "torch":
            _assert_counters_reset(x.device)

    # ----- mlp, linear_residual, rms_norm -----------------------------------------------------------
    def _mlp_inputs(self, tw, shape, t, dtype):
        rng = np.random.default_rng(100 + t)
        h = shape.hidden
        vals = dict(x=_x(rng, t, h), other=rng.standard_normal((t, h)), **_weights(shape, "mlp"))
        return {k: tw.arr(v, dtype) for k, v in vals.items()}

    def test_mlp(self, tw, mm_case):
        shape, t, dtype, tiles = mm_case
        a = self._mlp_inputs(tw, shape, t, dtype)
        args = (a["x"], a["norm_w"], a["w_gate_up"], a["w_down"], a["x"])  # the decoder layer's residual: x
        out = tw.kernel("mlp")(*args, eps=EPS, tiles=tiles, down_tiles=tiles)
        plain = tw.plain("mlp")(*args, eps=EPS)
        assert tuple(out.shape) == (t, shape.hidden) and out.dtype == a["x"].dtype
        want = tw.reference("mlp", *args, eps=EPS)
        _check(tw, out, want, plain, dtype, "mlp")
        if tw.name == "torch":
            _assert_counters_reset(out.device)

    def test_linear_residual(self, tw, mm_case):
        shape, t, dtype, tiles = mm_case
        rng = np.random.default_rng(200 + t)
        h, kdim = shape.hidden, shape.hq * shape.d
        wide = tw.arr(rng.standard_normal((t, kdim + 8)), dtype)
        x = wide[:, 3:3 + kdim]  # torch: rows of a wider tensor (non-contiguous)
        w_o = tw.arr(_weights(shape, "o")["w_o"], dtype)
        res = tw.arr(rng.standard_normal((t, h)), dtype)
        out = tw.kernel("linear_residual")(x, w_o, res, tiles=tiles)
        assert tuple(out.shape) == (t, h) and out.dtype == res.dtype
        _check(tw, out, tw.reference("linear_residual", x, w_o, res),
               tw.plain("linear_residual")(x, w_o, res), dtype, "linear_residual")
        if tw.name == "torch":
            _assert_counters_reset(out.device)

    def test_rms_norm(self, tw, mm_case):
        shape, t, dtype, _ = mm_case
        rng = np.random.default_rng(250 + t)
        x = tw.arr(_x(rng, t, shape.hidden) * 3, dtype)
        w = tw.arr(rng.uniform(0.3, 3.0, shape.hidden), dtype)
        out = tw.kernel("rms_norm")(x, w, eps=EPS)
        assert tuple(out.shape) == tuple(x.shape) and out.dtype == x.dtype
        _check(tw, out, tw.reference("rms_norm", x, w, eps=EPS), tw.plain("rms_norm")(x, w, eps=EPS), dtype,
               "rms_norm")

    def test_row_parallel_residual(self, tw):
        """residual None adds nothing (a tensor-parallel shard); another tensor is added as given."""
        shape, t, dtype = self.MM_CASES[0][0], 3, F32
        a = self._mlp_inputs(tw, shape, t, dtype)
        act = tw.arr(np.random.default_rng(9).standard_normal((t, shape.inter)))
        for residual in (None, a["other"]):
            what = "none" if residual is None else "another tensor"
            args = (a["x"], a["norm_w"], a["w_gate_up"], a["w_down"], residual)
            want = tw.reference("mlp", *args, eps=EPS)
            _check(tw, tw.kernel("mlp")(*args, eps=EPS), want, tw.plain("mlp")(*args, eps=EPS), dtype,
                   f"mlp residual={what}")
            _check(tw, tw.kernel("linear_residual")(act, a["w_down"], residual),
                   tw.reference("linear_residual", act, a["w_down"], residual),
                   tw.plain("linear_residual")(act, a["w_down"], residual), dtype, f"linear_residual residual={what}")

    # ----- decode attention -----------------------------------------------------------------------
    def _decode_inputs(self, tw, shape, b, dtype, rng):
        hq, hkv, d, bs = shape.hq, shape.hkv, shape.d, self.BLOCK_SIZE
        max_blocks = -(-self.CONTEXT // bs)
        num_blocks = b * max_blocks + 3
        q = tw.arr(rng.standard_normal((b, hq, d)), dtype)
        kc = tw.arr(rng.standard_normal((num_blocks, bs, hkv, d)), dtype)
        vc = tw.arr(rng.standard_normal((num_blocks, bs, hkv, d)), dtype)
        return q, kc, vc, max_blocks, num_blocks

    def test_decode_attention(self, tw, attn_case):
        shape, b, dtype, tiles = attn_case
        rng = np.random.default_rng(300 + b)
        bs, d = self.BLOCK_SIZE, shape.d
        q, kc, vc, max_blocks, num_blocks = self._decode_inputs(tw, shape, b, dtype, rng)
        tables = rng.permutation(num_blocks)[:b * max_blocks].reshape(b, max_blocks)
        lens = rng.integers(2, max_blocks * bs + 1, size=b)  # >= 2 keys: with one, any scale gives softmax 1
        if b > 1:
            lens[0], lens[1] = 1, max_blocks * bs
        for r in range(b):  # -1 padding past each sequence's last block, as nano-vllm's tables
            tables[r, -(-lens[r] // bs):] = -1
        meta = tw.meta(block_tables=tables, context_lens=lens)
        out = tw.kernel("decode_attention")(q, kc, vc, meta, tiles=tiles)
        plain = tw.plain("decode_attention")(q, kc, vc, meta)
        assert tuple(out.shape) == (b, shape.hq, d) and out.dtype == q.dtype
        _check(tw, out, tw.reference("decode_attention", q, kc, vc, meta), plain, dtype, "decode_attention")
        if tw.name == "torch":
            _assert_counters_reset(q.device)

    def test_decode_attention_one_block_per_sequence(self, tw, attn_case):
        """block_tables None (block b holds sequence b, the jax model's layout) and one-block tables."""
        shape, b, dtype, tiles = attn_case
        rng = np.random.default_rng(500 + b)
        rows = self.CONTEXT  # one block of a non-power-of-two number of rows per sequence
        q = tw.arr(rng.standard_normal((b, shape.hq, shape.d)), dtype)
        kc_, vc_ = (rng.standard_normal((b + 2, rows, shape.hkv, shape.d)) for _ in range(2))
        kc, vc = tw.arr(kc_, dtype), tw.arr(vc_, dtype)
        lens = rng.integers(2, rows + 1, size=b)
        lens[-1] = rows
        order = rng.permutation(b + 2)[:b]
        for tables in (None, order[:, None]):
            meta = tw.meta(block_tables=tables, context_lens=lens)
            out = tw.kernel("decode_attention")(q, kc, vc, meta, tiles=tiles)
            want = tw.reference("decode_attention", q, kc, vc, meta)
            _check(tw, out, want, tw.plain("decode_attention")(q, kc, vc, meta), dtype,
                   f"decode_attention one block ({'no table' if tables is None else 'table'})")

    def test_decode_attention_padding_rows(self, tw):
        """CUDA-graph padding (context_lens 0, any block table) gives zeros and reads nothing."""
        shape = self.MM_CASES[0][0]
        rng = np.random.default_rng(7)
        bs = self.BLOCK_SIZE
        q = tw.arr(rng.standard_normal((2, shape.hq, shape.d)))
        kc = tw.arr(rng.standard_normal((2, bs, shape.hkv, shape.d)))
        meta = tw.meta(block_tables=[[0, 1], [1_000_000, -7]], context_lens=[bs + 3, 0])  # garbage in the padding row
        for tiles in (AttentionTiles(block_kv=16), AttentionTiles(block_kv=16, num_splits=4)):
            out = tw.np(tw.kernel("decode_attention")(q, kc, kc, meta, tiles=tiles))
            assert np.isfinite(out).all() and np.count_nonzero(out[1]) == 0

    # ----- prefill attention ----------------------------------------------------------------------
    def test_prefill_attention(self, tw, prefill_case):
        """Sequences of new tokens after cached prefixes, keys in the caches: block b holds sequence b
        (no table), or through block tables of scattered blocks."""
        self._prefill_check(tw, prefill_case, self.PREFILL_LENS)

    def test_prefill_attention_long(self, tw, long_prefill_case):
        """Long prompts: most of each tile's keys in whole blocks below the diagonal (the unmasked
        loop), then a diagonal block cut short; cached prefixes (len_k > len_q) and lengths that
        are no multiple of any block."""
        self._prefill_check(tw, long_prefill_case, self.LONG_PREFILL_LENS)

    def _prefill_check(self, tw, case, lens):
        shape, layout, dtype, tiles = case
        rng = np.random.default_rng(400)
        hq, hkv, d = shape.hq, shape.hkv, shape.d
        len_q = [n for n, _ in lens]
        len_k = [n + c for n, c in lens]
        nb = len(len_q)
        bs = max(len_k) + 5 if layout == "one-block" else self.BLOCK_SIZE
        max_blocks = max(-(-n // bs) for n in len_k)
        num_blocks = nb * max_blocks + 2
        keys, vals = np.zeros((2, num_blocks * bs, hkv, d))
        tables = np.full((nb, max_blocks), -1)
        perm = rng.permutation(num_blocks) if layout == "paged" else np.arange(num_blocks)
        for b, n in enumerate(len_k):
            tables[b, :-(-n // bs)] = perm[b * max_blocks:b * max_blocks + -(-n // bs)]
            rows = tables[b, np.arange(n) // bs] * bs + np.arange(n) % bs
            keys[rows], vals[rows] = rng.standard_normal((2, n, hkv, d))
        kc = tw.arr(keys.reshape(num_blocks, bs, hkv, d), dtype)
        vc = tw.arr(vals.reshape(num_blocks, bs, hkv, d), dtype)
        cu_q, cu_k = np.concatenate([[0], np.cumsum(len_q)]), np.concatenate([[0], np.cumsum(len_k)])
        q = tw.arr(rng.standard_normal((cu_q[-1], hq, d)), dtype)
        meta = tw.meta(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_tables=None if layout == "one-block" else tables,
                       max_seqlen_q=max(len_q), max_seqlen_k=max(len_k), is_prefill=True)
        out = tw.kernel("prefill_attention")(q, kc, vc, meta, tiles=tiles)
        plain = tw.plain("prefill_attention")(q, kc, vc, meta)
        want = tw.reference("prefill_attention", q, kc, vc, meta)
        assert tuple(out.shape) == tuple(q.shape) and out.dtype == q.dtype
        _check(tw, out, want, plain, dtype, f"prefill_attention ({layout})")

_A, _B, _C, _D = CPU_SHAPES
_E = Shape("h160-i384", 160, 384, 8, 2, 64)  # many q heads per kv head


class TestInterpret(KernelTests):
    """On CPU in the interpreters: a covering set of (shape, tokens, dtype, tiles), kept small."""

    GPU = False
    QKV_CASES = [(_A, 1, F32, None), (_A, 1, BF16, None), (_B, 3, BF16, None), (_C, 19, F32, None),
                 (_E, 3, F32, None), (_E, 19, BF16, None), (_D, 1, BF16, None),
                 (_A, 3, BF16, MatmulTiles(4, 16, 64)),   # split heads: projection + epilogue
                 (_A, 19, BF16, MatmulTiles(16, 32, 32)),  # split, with the dot
                 (_A, 19, BF16, MatmulTiles(16, 64, 64), ("torch",)),  # torch: whole half-heads per program
                 (_A, 3, BF16, MatmulTiles(2, 128, 32), ("jax",)),  # jax: fused GEMV, 2 rows per program
                 (_A, 19, BF16, MatmulTiles(16, 32, 16, split_k=3), ("torch",)),  # split heads, K 128: 48 + 48 + 32
                 (_B, 19, F32, MatmulTiles(16, 64, 64, split_k=2), ("torch",)),  # whole half-heads, K in 2
                 (_A, 1, BF16, MatmulTiles(1, 4, 32)),  # one row over K in chunks: the norm's first pass over x
                 (_D, 1, F32, MatmulTiles(1, 2, 64))]  # the same with a masked last chunk
    MM_CASES = [(s, t, F32, None) for s in CPU_SHAPES for t in (1, 19)] + [
        (s, 3, BF16, None) for s in CPU_SHAPES] + [
        (_E, 19, BF16, None), (_E, 3, BF16, MatmulTiles(2, 16, 32)), (_D, 19, BF16, MatmulTiles(16, 32, 32)),
        (_C, 19, F32, MatmulTiles(64, 64, 64)), (_B, 5, BF16, MatmulTiles(16, 64, 32), ("torch",)),
        (_A, 19, BF16, MatmulTiles(16, 32, 32, split_k=4), ("torch",)),  # K of 128 / 384 in 4 parts
        (_D, 19, F32, MatmulTiles(16, 16, 16, split_k=3), ("torch",)),  # K 111 / 97: the last part is the tail
        (_A, 1, BF16, MatmulTiles(1, 4, 32)), (_D, 1, F32, MatmulTiles(1, 8, 32))]  # one row, K in chunks
    ATTN_CASES = [(_A, 1, F32, None), (_B, 3, BF16, None), (_C, 3, F32, AttentionTiles(16, num_splits=4)),
                  (_D, 3, BF16, AttentionTiles(16, num_splits=2)), (_E, 3, BF16, AttentionTiles(32)),
                  (_E, 1, F32, AttentionTiles(16, num_splits=2))]
    PREFILL_CASES = [(_A, "one-block", F32, None), (_B, "paged", BF16, PrefillTiles(16, 32)),
                     (_D, "one-block", BF16, PrefillTiles(32, 16)), (_E, "paged", F32, PrefillTiles(16, 16))]
    CONTEXT = 72
    BLOCK_SIZE = 16
    PREFILL_LENS = ((5, 0), (20, 11), (1, 30))
    # 16-key blocks: sequence 0's last tile (queries 64-76 at positions 109-121) sees 6 whole
    # blocks, then 2 on the diagonal; with 32-query tiles a tile crosses 3 diagonal blocks
    LONG_PREFILL_CASES = [(_A, "paged", F32, PrefillTiles(16, 16)), (_A, "one-block", BF16, PrefillTiles(32, 16))]
    LONG_PREFILL_LENS = ((77, 45), (50, 0), (1, 93))


@pytest.mark.gpu
class TestGPU(KernelTests):
    """Compiled on the GPU at the full shapes of all six presets."""

    GPU = True
    _T = [MatmulTiles(1, 128, 128, num_warps=8), MatmulTiles(1, 16, 512), MatmulTiles(16, 32, 128),
          MatmulTiles(4, 16, 64, num_warps=8)]
    QKV_CASES = [(s, t, BF16, None) for s in GPU_SHAPES for t in (1, 3, 16, 32, 67)] + [
        (GPU_SHAPES[3], t, BF16, tl) for t, tl in zip((1, 1, 16, 3), _T)] + [
        (GPU_SHAPES[i], t, BF16, MatmulTiles(32, bn, 64, num_stages=3, split_k=sk), ("torch",))
        for i, t, bn, sk in ((0, 32, 64, 4), (3, 19, 32, 8))]
    MM_CASES = [(s, t, BF16, None) for s in GPU_SHAPES for t in (1, 3, 16, 32, 67)] + [  # 32: default split_k
        (GPU_SHAPES[2], t, BF16, tl) for t, tl in
        ((1, MatmulTiles(1, 8, 1024)), (3, MatmulTiles(4, 16, 128)), (300, MatmulTiles(64, 64, 64)),
         (16, MatmulTiles(16, 64, 128, num_stages=3)))] + [
        (GPU_SHAPES[i], t, BF16, MatmulTiles(bm, bn, 64, num_stages=3, split_k=sk), ("torch",))
        for i, t, bm, bn, sk in ((0, 32, 32, 64, 4), (3, 61, 64, 32, 8), (5, 16, 16, 16, 3))]
    ATTN_CASES = [(s, b, BF16, None) for s in GPU_SHAPES for b in (1, 16)] + [
        (GPU_SHAPES[0], 3, BF16, AttentionTiles(32, num_splits=8))]
    PREFILL_CASES = [(s, layout, BF16, None) for s in GPU_SHAPES for layout in ("one-block", "paged")] + [
        (GPU_SHAPES[3], "paged", BF16, PrefillTiles(128, 32))]
    CONTEXT = 4000
    BLOCK_SIZE = 256
    PREFILL_LENS = ((300, 0), (77, 1000), (1, 513))
    LONG_PREFILL_CASES = [(GPU_SHAPES[0], "one-block", BF16, None), (GPU_SHAPES[3], "paged", BF16, None),
                          (GPU_SHAPES[0], "paged", BF16, PrefillTiles(128, 64, num_warps=8, num_stages=3))]
    LONG_PREFILL_LENS = ((2500, 0), (700, 1900), (1, 3000))


@pytest.mark.gpu
class TestGPUFloat32(TestGPU):
    QKV_CASES = MM_CASES = [(GPU_SHAPES[0], t, F32, None) for t in (1, 3, 19)]
    ATTN_CASES = [(GPU_SHAPES[0], 3, F32, None)]
    PREFILL_CASES = [(GPU_SHAPES[0], "paged", F32, None)]
    LONG_PREFILL_CASES = [(GPU_SHAPES[0], "one-block", F32, None)]


def _case_projection_tiles():
    """(case, kernel, shape, tiles) of every explicit projection tile of the cases above: a QKV
    case's tiles run rmsnorm_qkv, an MM case's mlp's two projections and linear_residual."""
    for cls in (TestInterpret, TestGPU, TestGPUFloat32):
        for cases, kernels in ((cls.QKV_CASES, ("rmsnorm_qkv",)), (cls.MM_CASES, ("mlp_gate_up", "linear_residual"))):
            for shape, t, _, tiles, *_ in cases:
                for kernel, s in projection_shapes(shape, t):
                    if tiles is not None and kernel in kernels:
                        yield f"{cls.__name__} {shape.name} t={t} {tiles_id(tiles)}", kernel, s, tiles


def test_every_case_tile_reaches_all_of_k():
    """Each case's block_k is at most K's power-of-two ceiling (torch_impl cuts a longer one: the
    case would run another tile than it names) and, with split_k, every part has chunks of K to
    sum (tile_rules.misfit): an empty last part could not show a bug in that part's code."""
    bad = []
    for case, kernel, s, tiles in _case_projection_tiles():
        cap = max(16, next_pow2(s["k"]))
        problem = (f"block_k={tiles.block_k} beyond {cap}" if tiles.block_k > cap else
                   tile_rules.misfit(kernel, "torch", tiles, s) if tiles.split_k > 1 else None)
        if problem:
            bad.append(f"{case}: {kernel} k={s['k']}: {problem}")
    assert not bad, "\n".join(bad)
    assert any(t.split_k > 1 for *_, t in _case_projection_tiles())  # the split cases are among them


def test_every_op_of_the_list_is_tested_in_both_twins():
    tested = {"rmsnorm_qkv", "mlp", "linear_residual", "rms_norm", "decode_attention", "prefill_attention"}
    assert set(OPS) == tested
    for fw in twins.FRAMEWORKS:
        for name in OPS:
            try:
                tw = twins.make(fw, gpu=False)
            except pytest.skip.Exception:
                continue
            assert callable(getattr(tw.K, name)) and callable(getattr(tw.P, name)), f"{fw}: {name}"


@pytest.mark.parametrize("framework", twins.FRAMEWORKS)
def test_bad_inputs_name_the_tensor(framework):
    tw = twins.make(framework, gpu=False)
    z = lambda *s, dt="float32": tw.arr(np.zeros(s), dt)  # noqa: E731
    x, cache = z(2, 64), z(2, 4, 1, 16)
    k = tw.kernel
    with pytest.raises(ValueError, match="residual"):
        k("linear_residual")(x, z(32, 64), z(2, 31))
    with pytest.raises(ValueError, match="w_gate_up"):
        k("mlp")(x, z(64), z(33, 64), z(64, 16), x, eps=EPS)
    with pytest.raises(ValueError, match="w_gate_up.*float32"):
        k("mlp")(x, z(64), z(32, 64, dt=BF16), z(64, 16), x, eps=EPS)
    qkv = (x, z(64), z(64, 64), z(16), z(16), z(8, 16), cache, cache)
    with pytest.raises(ValueError, match="slots"):
        k("rmsnorm_qkv")(*qkv, tw.meta(positions=[0, 0], slots=[0, 0, 0]), num_heads=2, num_kv_heads=1, eps=EPS)
    with pytest.raises(ValueError, match="context_lens"):
        k("decode_attention")(z(2, 2, 16), cache, cache, tw.meta(block_tables=np.zeros((2, 2))).replace(
            context_lens=z(2)))
    with pytest.raises(ValueError, match="block_tables"):
        k("prefill_attention")(z(3, 2, 16), cache, cache, tw.meta(cu_seqlens_q=[0, 3], cu_seqlens_k=[0, 3],
                                                                 block_tables=np.zeros((2, 1)), max_seqlen_q=3,
                                                                 is_prefill=True))
    if framework == "jax":  # split_k is torch_impl's: jax_impl sums each tile in one program
        with pytest.raises(ValueError, match="split_k=2"):
            k("linear_residual")(z(16, 64), z(32, 64), z(16, 32), tiles=MatmulTiles(16, 16, 32, split_k=2))
    if framework == "jax":  # one program per head cannot hold more than head_dim rows
        with pytest.raises(ValueError, match="block_n"):
            k("rmsnorm_qkv")(*qkv, tw.meta(positions=[0, 0], slots=[0, 0]), num_heads=2, num_kv_heads=1, eps=EPS,
                             tiles=MatmulTiles(1, 32, 64))
