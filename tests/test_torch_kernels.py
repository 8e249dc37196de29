"""The Triton kernels of torch_impl against common.reference.

One set of tests, two modes: `TestKernelsInterpret` runs them in Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1, set by conftest) at shrunken presets and awkward shapes;
`TestKernelsGPU` (marked gpu) runs the very same tests compiled on the GPU at the full shapes of
all six presets. float32 results must match the float64 reference within TOLERANCES; bfloat16
results may be at most 2x as far from it as the plain torch op in bfloat16 (torch_impl.ops_plain).
q/k-norm weights are realistic (tens, up to 96), as common.checkpoint's "realistic" scale.
"""

from __future__ import annotations

import functools
import importlib
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from common import reference as R  # noqa: E402
from kernel_shapes import CPU_SHAPES, EPS, GPU_SHAPES, THETA, Shape, tiles_id  # noqa: E402,F401
from common.tiles import AttentionTiles, MatmulTiles, PrefillTiles  # noqa: E402
from common.tolerances import assert_close, assert_lowp_close  # noqa: E402
from torch_impl import kernels as K  # noqa: E402
from torch_impl import ops_plain as P  # noqa: E402

# the modules (the package re-exports the ops under the same names)
decode_mod = importlib.import_module("torch_impl.kernels.decode_attention")

MAX_POS = 40960
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _norm_weights(rng, d, big):
    """Realistic q/k-norm weights: uniform in [1, 30] with a few spikes (as common.checkpoint)."""
    w = rng.uniform(1.0, 30.0, size=d)
    w[rng.integers(0, d, size=max(1, d // 16))] = big
    return w


def _f64(t):
    return t.detach().float().cpu().numpy().astype(np.float64)


def _check(actual, expected, framework, dtype, what):
    if dtype == "float32":
        assert_close(_f64(actual), expected, "float32", what=what)
    else:
        assert_lowp_close(_f64(actual), _f64(framework), expected, what=what)


def pytest_generate_tests(metafunc):
    cls = metafunc.cls
    if cls is None or not hasattr(cls, "SHAPES"):
        return
    if "qkv_case" in metafunc.fixturenames:
        cases = [(s, t, dt, None) for s in cls.SHAPES for t in cls.TOKENS for dt in cls.DTYPES]
        cases += [(cls.SHAPES[0], t, cls.DTYPES[-1], tl) for t, tl in cls.QKV_TILES]
        metafunc.parametrize("qkv_case", cases, ids=[f"{s.name}-T{t}-{dt}-{tiles_id(tl)}" for s, t, dt, tl in cases])
    if "mm_case" in metafunc.fixturenames:
        cases = [(s, t, dt, None) for s in cls.SHAPES for t in cls.TOKENS for dt in cls.DTYPES]
        cases += [(cls.SHAPES[-1], t, cls.DTYPES[-1], tl) for t, tl in cls.MM_TILES]
        metafunc.parametrize("mm_case", cases, ids=[f"{s.name}-T{t}-{dt}-{tiles_id(tl)}" for s, t, dt, tl in cases])
    if "attn_case" in metafunc.fixturenames:
        cases = [(s, b, dt, tl) for s in cls.SHAPES for b, tl in cls.ATTN for dt in cls.DTYPES]
        metafunc.parametrize("attn_case", cases, ids=[f"{s.name}-B{b}-{dt}-{tiles_id(tl)}" for s, b, dt, tl in cases])
    if "prefill_case" in metafunc.fixturenames:
        cases = [(s, layout, dt, tl) for s in cls.SHAPES[:2] for layout, tl in cls.PREFILL for dt in cls.DTYPES]
        metafunc.parametrize("prefill_case", cases,
                             ids=[f"{s.name}-{lay}-{dt}-{tiles_id(tl)}" for s, lay, dt, tl in cases])


def _weights(shape: Shape, kind: str, dtype: str, device: str) -> tuple[dict, dict]:
    """(tensors, their float64 numpy values) of one shape, shared by the token counts (full-preset
    weights are costly to draw and to convert)."""
    w = _draw(shape, kind, dtype, device)
    return w, _as_f64(shape, kind, dtype, device)


@functools.lru_cache(maxsize=2)
def _as_f64(shape, kind, dtype, device):
    return {k: _f64(v) for k, v in _draw(shape, kind, dtype, device).items()}


@functools.lru_cache(maxsize=2)
def _draw(shape: Shape, kind: str, dtype: str, device: str) -> dict:
    rng = np.random.default_rng(zlib.crc32(f"{shape.name}/{kind}".encode()))
    f32 = lambda a: torch.as_tensor(np.asarray(a, np.float32)).to(device, TORCH_DTYPES[dtype])  # noqa: E731
    h, d = shape.hidden, shape.d
    if kind == "qkv":
        return dict(norm_w=f32(rng.uniform(0.3, 3.0, h)),
                    w_qkv=f32(rng.standard_normal(((shape.hq + 2 * shape.hkv) * d, h), np.float32) / np.sqrt(h)),
                    q_norm=f32(_norm_weights(rng, d, 60.0)), k_norm=f32(_norm_weights(rng, d, 96.0)))
    if kind == "mlp":
        i = shape.inter
        return dict(norm_w=f32(rng.uniform(0.3, 3.0, h)),
                    w_gu=f32(rng.standard_normal((2 * i, h), np.float32) / np.sqrt(h)),
                    w_down=f32(rng.standard_normal((h, i), np.float32) / np.sqrt(i)))
    kdim = shape.hq * d
    return dict(w_o=f32(rng.standard_normal((h, kdim), np.float32) / np.sqrt(kdim)))


class KernelTests:
    """The tests; subclasses set the device and shapes."""

    DEVICE: str
    SHAPES: list[Shape]
    TOKENS: tuple[int, ...]
    DTYPES: tuple[str, ...]
    QKV_TILES: list  # (T, MatmulTiles) extra cases on SHAPES[0]
    MM_TILES: list   # (T, MatmulTiles) extra cases on SHAPES[-1]
    ATTN: list       # (batch, AttentionTiles | None)
    PREFILL: list    # (layout, PrefillTiles | None)
    CONTEXT: int     # longest context of the attention tests
    BLOCK_SIZE: int  # cache block size of the attention tests
    PREFILL_LENS: tuple  # (new tokens, cached prefix) per sequence

    def _t(self, a, dtype="float32"):
        return torch.as_tensor(np.asarray(a, np.float32)).to(self.DEVICE, TORCH_DTYPES[dtype])

    def _i(self, a):
        return torch.as_tensor(np.asarray(a), dtype=torch.int32, device=self.DEVICE)

    # ----- rmsnorm_qkv ----------------------------------------------------------------------------
    def test_rmsnorm_qkv(self, qkv_case):
        shape, t, dtype, tiles = qkv_case
        rng = np.random.default_rng(t)
        d, hq, hkv, hidden = shape.d, shape.hq, shape.hkv, shape.hidden
        block_size, num_blocks = 16, (2 * t + 15) // 16 + 1
        x = self._t(rng.standard_normal((t, hidden)), dtype)
        w, w64 = _weights(shape, "qkv", dtype, self.DEVICE)
        norm_w, w_qkv, q_norm, k_norm = w["norm_w"], w["w_qkv"], w["q_norm"], w["k_norm"]
        positions = rng.integers(0, MAX_POS, size=t)
        slots = rng.permutation(num_blocks * block_size)[:t]
        slots[::3] = -1  # some tokens are not written
        caches = [self._t(rng.standard_normal((num_blocks, block_size, hkv, d)), dtype) for _ in range(2)]
        before = [c.clone() for c in caches]
        cos_sin = P.rope_table(MAX_POS, d, THETA, device=self.DEVICE)
        kw = dict(num_heads=hq, num_kv_heads=hkv, eps=EPS)
        plain_caches = [c.clone() for c in caches]
        pq, pkc, pvc = P.rmsnorm_qkv(x, norm_w, w_qkv, q_norm, k_norm, cos_sin, self._i(positions), self._i(slots),
                                     *plain_caches, **kw)
        q, kc, vc = K.rmsnorm_qkv(x, norm_w, w_qkv, q_norm, k_norm, cos_sin, self._i(positions), self._i(slots),
                                  *caches, **kw, tiles=tiles)
        assert kc is caches[0] and vc is caches[1], "the caches are written in place and returned"
        rq, rk, rv = R.rmsnorm_qkv(_f64(x), w64["norm_w"], w64["w_qkv"], w64["q_norm"], w64["k_norm"], positions,
                                   num_heads=hq, num_kv_heads=hkv, head_dim=d, eps=EPS, theta=THETA)
        assert q.shape == (t, hq, d) and q.dtype == x.dtype
        _check(q, rq, pq, dtype, "q")
        written = slots >= 0
        rows = torch.as_tensor(slots[written], device=self.DEVICE)
        for name, got, plain, ref, old in (("k_cache", kc, pkc, rk, before[0]), ("v_cache", vc, pvc, rv, before[1])):
            flat, flat_plain, flat_old = (c.view(-1, hkv, d) for c in (got, plain, old))
            _check(flat[rows], ref[written], flat_plain[rows], dtype, f"{name} rows written")
            keep = torch.ones(flat.shape[0], dtype=torch.bool, device=self.DEVICE)
            keep[rows] = False
            assert torch.equal(flat[keep], flat_old[keep]), f"{name}: rows not in slots must be unchanged"

    # ----- mlp and attn_out -----------------------------------------------------------------------
    def test_mlp(self, mm_case):
        shape, t, dtype, tiles = mm_case
        rng = np.random.default_rng(100 + t)
        h = shape.hidden
        x = self._t(rng.standard_normal((t, h)), dtype)
        w, w64 = _weights(shape, "mlp", dtype, self.DEVICE)
        norm_w, w_gu, w_down = w["norm_w"], w["w_gu"], w["w_down"]
        out = K.mlp(x, norm_w, w_gu, w_down, eps=EPS, tiles=tiles, down_tiles=tiles)
        plain = P.mlp(x, norm_w, w_gu, w_down, eps=EPS)
        assert out.shape == (t, h) and out.dtype == x.dtype
        _check(out, R.mlp_block(_f64(x), w64["norm_w"], w64["w_gu"], w64["w_down"], EPS), plain, dtype, "mlp")

    def test_attn_out(self, mm_case):
        shape, t, dtype, tiles = mm_case
        rng = np.random.default_rng(200 + t)
        h, kdim = shape.hidden, shape.hq * shape.d
        wide = self._t(rng.standard_normal((t, kdim + 8)), dtype)
        attn = wide[:, 3:3 + kdim]  # non-contiguous rows: a slice of a wider tensor
        (w, w64) = _weights(shape, "attn_out", dtype, self.DEVICE)
        w_o = w["w_o"]
        res = self._t(rng.standard_normal((t, h)), dtype)
        out = K.attn_out(attn, w_o, res, tiles=tiles)
        plain = P.attn_out(attn, w_o, res)
        assert out.shape == (t, h) and out.dtype == res.dtype
        _check(out, R.attn_out(_f64(attn), w64["w_o"], _f64(res)), plain, dtype, "attn_out")

    def test_rms_norm(self, mm_case):
        shape, t, dtype, _ = mm_case
        rng = np.random.default_rng(250 + t)
        x = self._t(rng.standard_normal((t, shape.hidden)) * 3, dtype)
        w = self._t(rng.uniform(0.3, 3.0, shape.hidden), dtype)
        out = K.rms_norm(x, w, eps=EPS)
        assert out.shape == x.shape and out.dtype == x.dtype
        _check(out, R.rms_norm(_f64(x), _f64(w), EPS), P.rms_norm(x, w, EPS), dtype, "rms_norm")

    # ----- decode attention -----------------------------------------------------------------------
    def test_decode_attention(self, attn_case):
        shape, b, dtype, tiles = attn_case
        rng = np.random.default_rng(300 + b)
        hq, hkv, d, bs = shape.hq, shape.hkv, shape.d, self.BLOCK_SIZE
        max_blocks = -(-self.CONTEXT // bs)
        num_blocks = b * max_blocks + 3
        q = self._t(rng.standard_normal((b, hq, d)), dtype)
        kc = self._t(rng.standard_normal((num_blocks, bs, hkv, d)), dtype)
        vc = self._t(rng.standard_normal((num_blocks, bs, hkv, d)), dtype)
        tables = rng.permutation(num_blocks)[:b * max_blocks].reshape(b, max_blocks)
        lens = rng.integers(1, max_blocks * bs + 1, size=b)
        lens[0] = 1
        if b > 1:
            lens[1] = max_blocks * bs
        for r in range(b):  # -1 padding past each sequence's last block, as nano-vllm's tables
            tables[r, -(-lens[r] // bs):] = -1
        args = (q, kc, vc, self._i(tables), self._i(lens))
        out = K.decode_attention(*args, tiles=tiles)
        plain = P.decode_attention(*args)
        k_seq = _f64(kc)[np.maximum(tables, 0)].reshape(b, -1, hkv, d)
        v_seq = _f64(vc)[np.maximum(tables, 0)].reshape(b, -1, hkv, d)
        assert out.shape == (b, hq, d) and out.dtype == q.dtype
        _check(out, R.decode_attention(_f64(q), k_seq, v_seq, lens), plain, dtype, "decode_attention")
        counters = decode_mod._COUNTERS.get(q.device)
        assert counters is None or int(counters.sum()) == 0, "split counters must be reset to zero"

    def test_decode_attention_one_block_per_sequence(self):
        """Tables of one block (the kernel reads the block id once, before its loop), with splits."""
        shape = self.SHAPES[-1]
        rng = np.random.default_rng(11)
        b, bs, hkv, d = 3, self.BLOCK_SIZE, shape.hkv, shape.d
        q = self._t(rng.standard_normal((b, shape.hq, d)))
        kc = self._t(rng.standard_normal((b + 2, bs, hkv, d)))
        vc = self._t(rng.standard_normal((b + 2, bs, hkv, d)))
        tables = np.array([[3], [0], [4]])
        lens = np.array([bs, 1, bs // 2 + 3])
        want = R.decode_attention(_f64(q), _f64(kc)[tables[:, 0]], _f64(vc)[tables[:, 0]], lens)
        for tiles in (AttentionTiles(block_kv=16), AttentionTiles(block_kv=16, num_splits=3)):
            out = K.decode_attention(q, kc, vc, self._i(tables), self._i(lens), tiles=tiles)
            _check(out, want, P.decode_attention(q, kc, vc, self._i(tables), self._i(lens)), "float32",
                   f"decode_attention one block {tiles}")

    def test_decode_attention_padding_rows(self):
        """CUDA-graph padding (context_lens 0, any block table) gives zeros and reads nothing."""
        shape = self.SHAPES[0]
        rng = np.random.default_rng(7)
        bs = self.BLOCK_SIZE
        q = self._t(rng.standard_normal((2, shape.hq, shape.d)))
        kc = self._t(rng.standard_normal((2, bs, shape.hkv, shape.d)))
        tables = self._i([[0, 1], [1_000_000, -7]])  # garbage in the padding row
        for tiles in (AttentionTiles(block_kv=16), AttentionTiles(block_kv=16, num_splits=4)):
            out = K.decode_attention(q, kc, kc, tables, self._i([bs + 3, 0]), tiles=tiles)
            assert torch.isfinite(out).all()
            assert torch.count_nonzero(out[1]) == 0

    # ----- prefill attention ----------------------------------------------------------------------
    def test_prefill_attention(self, prefill_case):
        shape, layout, dtype, tiles = prefill_case
        rng = np.random.default_rng(400)
        hq, hkv, d, bs = shape.hq, shape.hkv, shape.d, self.BLOCK_SIZE
        lens = self.PREFILL_LENS if layout == "block_tables" else tuple((n, 0) for n, _ in self.PREFILL_LENS)
        len_q = [n for n, _ in lens]
        len_k = [n + c for n, c in lens]
        cu_q, cu_k = np.concatenate([[0], np.cumsum(len_q)]), np.concatenate([[0], np.cumsum(len_k)])
        q = self._t(rng.standard_normal((sum(len_q), hq, d)), dtype)
        keys = [rng.standard_normal((n, hkv, d)) for n in len_k]
        vals = [rng.standard_normal((n, hkv, d)) for n in len_k]
        kw = {}
        if layout == "contiguous":
            k, v = self._t(np.concatenate(keys), dtype), self._t(np.concatenate(vals), dtype)
        else:
            max_blocks = max(-(-n // bs) for n in len_k)
            num_blocks = len(lens) * max_blocks + 2
            kc, vc = np.zeros((2, num_blocks * bs, hkv, d))
            perm = rng.permutation(num_blocks)
            tables = np.full((len(lens), max_blocks), -1)
            slots = []
            for b, n in enumerate(len_k):
                nb = -(-n // bs)
                tables[b, :nb] = perm[b * max_blocks:b * max_blocks + nb]
                rows = tables[b, np.arange(n) // bs] * bs + np.arange(n) % bs
                kc[rows], vc[rows] = keys[b], vals[b]
                slots.append(rows)
            k = self._t(kc.reshape(num_blocks, bs, hkv, d), dtype)
            v = self._t(vc.reshape(num_blocks, bs, hkv, d), dtype)
            kw = dict(block_tables=self._i(tables)) if layout == "block_tables" else \
                dict(kv_slots=self._i(np.concatenate(slots)))
        args = (q, k, v, self._i(cu_q), self._i(cu_k))
        out = K.prefill_attention(*args, max_seqlen_q=max(len_q), **kw, tiles=tiles)
        plain = P.prefill_attention(*args, max_seqlen_q=max(len_q), **kw)
        kq = _f64(q)
        ref = np.concatenate([R.attention(kq[cu_q[b]:cu_q[b + 1]], _f64(self._t(keys[b], dtype)),
                                          _f64(self._t(vals[b], dtype)), np.arange(len_k[b] - len_q[b], len_k[b]))
                              for b in range(len(lens))])
        assert out.shape == q.shape and out.dtype == q.dtype
        _check(out, ref, plain, dtype, f"prefill_attention ({layout})")


class TestKernelsInterpret(KernelTests):
    DEVICE = "cpu"
    SHAPES = CPU_SHAPES
    TOKENS = (1, 3, 19)
    DTYPES = ("float32", "bfloat16")
    QKV_TILES = [(3, MatmulTiles(1, 16, 32)),     # one token row per program, heads split over 4 programs
                 (19, MatmulTiles(16, 16, 32)),   # tensor-core dot, split heads (last program finishes)
                 (19, MatmulTiles(16, 64, 64))]   # whole half-heads per program
    MM_TILES = [(3, MatmulTiles(1, 16, 32)), (19, MatmulTiles(16, 32, 32)), (19, MatmulTiles(32, 64, 64)),
                (5, MatmulTiles(16, 64, 32))]  # the last: weights as the left operand (block_n >= 64)
    # Splits in use follow each sequence's length (>= 2 blocks of keys each): with 4 splits of 16
    # keys the lengths 1..80 use 1 or 2 of them; with 2 splits both are used from 32 keys on.
    ATTN = [(1, None), (3, AttentionTiles(block_kv=16, num_splits=4)), (3, AttentionTiles(block_kv=16, num_splits=2)),
            (3, AttentionTiles(block_kv=32))]
    PREFILL = [("contiguous", None), ("kv_slots", PrefillTiles(16, 16)), ("block_tables", PrefillTiles(16, 32))]
    CONTEXT = 72
    BLOCK_SIZE = 16
    PREFILL_LENS = ((5, 0), (20, 11), (1, 30))


@pytest.mark.gpu
class TestKernelsGPU(KernelTests):
    DEVICE = "cuda"
    SHAPES = GPU_SHAPES
    TOKENS = (1, 16, 67)
    DTYPES = ("bfloat16",)
    QKV_TILES = [(1, MatmulTiles(1, 64, 128, num_warps=8)), (1, MatmulTiles(1, 16, 512)),
                 (16, MatmulTiles(16, 32, 128)), (3, MatmulTiles(4, 16, 64, num_warps=8))]
    MM_TILES = [(1, MatmulTiles(1, 8, 1024)), (3, MatmulTiles(4, 16, 128)), (300, MatmulTiles(64, 64, 64)),
                (16, MatmulTiles(16, 64, 128, num_stages=3))]
    ATTN = [(1, None), (16, None), (3, AttentionTiles(block_kv=32, num_splits=8))]
    PREFILL = [("contiguous", None), ("kv_slots", None), ("block_tables", PrefillTiles(32, 32))]
    CONTEXT = 4000
    BLOCK_SIZE = 256
    PREFILL_LENS = ((300, 0), (77, 1000), (1, 513))


@pytest.mark.gpu
class TestKernelsGPUFloat32(TestKernelsGPU):
    SHAPES = GPU_SHAPES[:1]
    TOKENS = (1, 19)
    DTYPES = ("float32",)
    QKV_TILES = MM_TILES = []
    ATTN = [(3, None)]
    PREFILL = [("block_tables", None)]
