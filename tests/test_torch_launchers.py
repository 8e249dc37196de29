"""torch_impl's kernel launchers: bad input names the tensor, out-of-range slots are dropped, CPU needs
the interpreter, the decode-state update, and every kernel compiles for an H100 (sm_90) without a GPU."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from common.ops import AttentionMeta  # noqa: E402
import torch_impl  # noqa: E402
from torch_impl import kernels as K  # noqa: E402
from torch_impl import plain as P  # noqa: E402

EPS = 1e-6
THETA = 1_000_000.0
DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ----- launcher checks ------------------------------------------------------------------------

def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


def test_bad_inputs_name_the_tensor():
    x = torch.zeros(2, 64)
    with pytest.raises(ValueError, match="residual"):
        K.linear_residual(x, torch.zeros(32, 64), torch.zeros(2, 31))
    with pytest.raises(ValueError, match="w_gate_up"):
        K.mlp(x, torch.ones(64), torch.zeros(33, 64), torch.zeros(64, 16), x, eps=EPS)
    with pytest.raises(ValueError, match="w_gate_up.*float32"):
        K.mlp(x, torch.ones(64), torch.zeros(32, 64, dtype=torch.bfloat16), torch.zeros(64, 16), x, eps=EPS)
    cache = torch.zeros(2, 4, 1, 16)
    qkv_args = (x, torch.ones(64), torch.zeros(64, 64), torch.ones(16), torch.ones(16), torch.zeros(8, 16))
    with pytest.raises(ValueError, match="slots"):
        K.rmsnorm_qkv(*qkv_args, cache, cache, AttentionMeta(positions=_i32(0, 0), slots=_i32(0, 0, 0)),
                      num_heads=2, num_kv_heads=1, eps=EPS)
    with pytest.raises(ValueError, match="k_cache"):
        K.rmsnorm_qkv(*qkv_args, torch.zeros(2, 4, 2, 16), cache, AttentionMeta(positions=_i32(0, 0), slots=_i32(0, 0)),
                      num_heads=2, num_kv_heads=1, eps=EPS)
    with pytest.raises(ValueError, match="context_lens"):
        K.decode_attention(torch.zeros(2, 2, 16), cache, cache,
                           AttentionMeta(block_tables=torch.zeros(2, 2, dtype=torch.int32), context_lens=torch.ones(2)))
    with pytest.raises(ValueError, match="block_tables"):
        K.prefill_attention(torch.zeros(3, 2, 16), cache, cache,
                            AttentionMeta(cu_seqlens_q=_i32(0, 3), cu_seqlens_k=_i32(0, 3), max_seqlen_q=3,
                                          block_tables=torch.zeros(2, 1, dtype=torch.int32), is_prefill=True))


def test_out_of_range_slots_are_not_written():
    """Slots past the cache (a caller's capacity bug) are dropped, never written out of bounds."""
    rng = np.random.default_rng(0)
    d, hkv = 16, 1
    big = torch.zeros(3, 4, hkv, d, device=DEV)  # the cache is big[:2]; block 2 stands for the memory behind it
    cache = big[:2]
    f32 = dict(dtype=torch.float32, device=DEV)
    x = torch.as_tensor(rng.standard_normal((2, 32)), **f32)
    w = torch.as_tensor(rng.standard_normal((4 * d, 32)), **f32)
    meta = AttentionMeta(positions=torch.tensor([0, 1], device=DEV), slots=torch.tensor([8, 9], device=DEV))
    K.rmsnorm_qkv(x, torch.ones(32, device=DEV), w, torch.ones(d, device=DEV), torch.ones(d, device=DEV),
                  P.rope_table(16, d, THETA, device=DEV), cache, cache.clone(), meta, num_heads=2, num_kv_heads=hkv,
                  eps=EPS)
    assert torch.count_nonzero(big) == 0


# (num_blocks, block_size, Hkv, head_dim): powers of two, and Hkv / head_dim that are not (masked tiles)
STORE_KV_SHAPES = [(3, 4, 2, 16), (2, 8, 3, 80), (4, 4, 5, 24), (1, 16, 1, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", STORE_KV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_store_kv_equals_a_masked_write(shape, dtype):
    """The Triton store (the plain path's cache write on CUDA) writes values[t] at flat row slots[t]
    of the cache, bit for bit as a masked indexed write: -1 and slots past the cache are dropped,
    and nothing behind the cache is touched. (Values in the cache's dtype, as the model passes
    them: the interpreter truncates a float32 -> bfloat16 cast where the GPU rounds to nearest.)"""
    from torch_impl.kernels.store_kv import store_kv

    nb, bs, hkv, d = shape
    rows = nb * bs
    gen = torch.Generator().manual_seed(rows * 131 + hkv * 7 + d)
    big = torch.randn(nb + 1, bs, hkv, d, generator=gen).to(dtype).to(DEV)  # block nb: the memory behind the cache
    cache = big[:nb]
    # every row of the cache once (shuffled), with skips (-1) and out-of-range slots in between
    valid = torch.randperm(rows, generator=gen)[:max(1, rows - 3)].tolist()
    slots = valid[:2] + [-1] + valid[2:4] + [rows, rows + bs + 1] + valid[4:] + [-1, 2 ** 31 - 1]
    values = torch.randn(len(slots), hkv, d, generator=gen).to(dtype).to(DEV)
    before = big.clone()
    for index_dtype in (torch.int32, torch.int64):
        big.copy_(before)
        want = before.clone()
        flat = want[:nb].view(rows, hkv, d)
        for t, s in enumerate(slots):
            if 0 <= s < rows:
                flat[s] = values[t]
        out = store_kv(values, cache, torch.tensor(slots, dtype=index_dtype, device=DEV))
        assert out.data_ptr() == cache.data_ptr()
        assert torch.equal(big[nb], before[nb]), "wrote past the cache"
        for r in range(rows):
            got = big[:nb].view(rows, hkv, d)[r]
            assert torch.equal(got, flat[r]), (f"{index_dtype}: cache row {r} wrong (written from t="
                                               f"{[t for t, s in enumerate(slots) if s == r]})")


def test_store_kv_with_nothing_to_write():
    from torch_impl.kernels.store_kv import store_kv

    cache = torch.ones(2, 4, 1, 16, device=DEV)
    store_kv(torch.zeros(3, 1, 16, device=DEV), cache, torch.tensor([-1, 8, 99], dtype=torch.int32, device=DEV))
    assert torch.equal(cache, torch.ones_like(cache))
    store_kv(torch.zeros(0, 1, 16, device=DEV), cache, torch.zeros(0, dtype=torch.int32, device=DEV))
    assert torch.equal(cache, torch.ones_like(cache))


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        K.linear_residual(torch.zeros(1, 16), torch.zeros(16, 16), torch.zeros(1, 16))


def test_kernels_compile_for_sm90():
    """Every kernel compiles for an H100 at real preset shapes (the interpreter checks none of
    Triton's compile-time rules); see tests/torch_compile_check.py."""
    script = Path(__file__).with_name("torch_compile_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    failures = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0, "\n".join(failures) or proc.stderr[-3000:]
    assert proc.stdout.count("ok ") >= 20, proc.stdout


def test_row_offsets_are_64_bit():
    """Row * row stride past 2^31 (an int8 lm_head over 14k tokens, a long prefill's MLP): the
    projection kernels address in 64 bits; see tests/wide_rows_check.py (a crash there fails here)."""
    script = Path(__file__).with_name("wide_rows_check.py")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stdout}{proc.stderr[-2000:]}"


def test_advance_updates_the_decode_state():
    from torch_impl.kernels.advance import advance

    i64 = dict(dtype=torch.int64, device=DEV)
    tokens = torch.tensor([7, 8, 9], **i64)
    positions = torch.tensor([5, 9, 0], **i64)
    first = torch.tensor([4, 6, 0], **i64)
    valid = torch.tensor([1, 1, 0], **i64)
    base = torch.tensor([100, 200, -(1 << 40)], **i64)
    slots = torch.zeros(3, **i64)
    ctx = torch.tensor([6, 10, 0], dtype=torch.int32, device=DEV)
    out = torch.zeros(3, 8, **i64)
    advance(tokens, positions, first, valid, base, slots, ctx, out)
    assert positions.tolist() == [6, 10, 0] and ctx.tolist() == [7, 11, 0]
    assert slots.tolist() == [106, 210, -(1 << 40)]
    assert out[0, 2] == 7 and out[1, 4] == 8 and int(out.count_nonzero()) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_is_torch_argmax(dtype):
    """The greedy argmax kernel (chunks of a row, the last program to finish picks among them) gives
    torch.argmax's index: the first maximum on ties within and across chunks, the first NaN, a row
    of -inf, vocabularies above, at and below one chunk; its counters are left at zero."""
    from torch_impl.kernels import _lib
    from torch_impl.kernels.argmax import CHUNK, argmax

    g = torch.Generator().manual_seed(0)
    for v in (7, CHUNK, 3 * CHUNK + 5):
        x = torch.randn(6, v, generator=g).to(dtype)
        x[1, :] = 1.0  # all tied: index 0
        x[2, v - 1] = x[2].max() + 1  # the last index
        if v > CHUNK:
            x[3, [5, CHUNK + 2, 2 * CHUNK]] = 100.0  # tied across chunks: the first
        x[4, :] = float("-inf")
        x[5, v // 2] = float("nan")
        got = argmax(x.to(DEV))
        assert got.dtype == torch.int64
        assert got.cpu().tolist() == torch.argmax(x, dim=-1).tolist(), v
        out = torch.full((6,), -1, dtype=torch.int64, device=DEV)
        assert argmax(x.to(DEV), out) is out and out.cpu().tolist() == got.cpu().tolist()
    counters = _lib._COUNTERS.get(torch.device(DEV))
    assert counters is None or int(counters.abs().sum()) == 0
    with pytest.raises(ValueError, match="logits"):
        argmax(torch.zeros(3, dtype=dtype))
    with pytest.raises(ValueError, match="out"):
        argmax(torch.zeros(2, 5, dtype=dtype), torch.zeros(3, dtype=torch.int64))


@pytest.mark.skipif(DEV == "cuda", reason="the interpreter's program order is what this test reverses (CPU only)")
def test_the_last_program_to_arrive_gives_the_same_result_in_any_order(monkeypatch):
    """Kernels whose last-arriving program finishes a tile (the projections' split_k, decode
    attention's splits, the argmax) sum their parts in a fixed order: with Triton's interpreter
    running the programs in reverse order, every output is bitwise the same as in order, and the
    counters end at zero."""
    import triton.runtime.interpreter as interp

    from common.tiles import AttentionTiles, MatmulTiles
    from torch_impl.kernels import _lib
    from torch_impl.kernels.argmax import argmax

    g = torch.Generator().manual_seed(3)
    x, w, r = torch.randn(19, 96, generator=g), torch.randn(40, 96, generator=g) / 10, torch.randn(19, 40, generator=g)
    nw, gu, dn = torch.rand(96, generator=g) + 0.5, torch.randn(64, 96, generator=g) / 10, torch.randn(96, 32, generator=g)
    q = torch.randn(3, 4, 16, generator=g)
    kc, vc = torch.randn(6, 16, 2, 16, generator=g), torch.randn(6, 16, 2, 16, generator=g)
    meta = AttentionMeta(context_lens=_i32(30, 5, 17), block_tables=_i32(0, 1, 4, 2, 3, 5).view(3, 2))
    logits = torch.randn(2, 9000, generator=g)
    logits[1, [10, 4100, 8999]] = 50.0  # tied across chunks
    tiles = MatmulTiles(16, 16, 16, split_k=5)

    def outputs():
        return [K.linear_residual(x, w, r, tiles=tiles),
                K.mlp(x, nw, gu, dn, x, eps=EPS, tiles=tiles, down_tiles=tiles),
                K.decode_attention(q, kc, vc, meta, tiles=AttentionTiles(16, num_splits=2)),
                argmax(logits)]

    forward = outputs()
    builder = interp.interpreter_builder
    set_idx = builder.set_grid_idx
    monkeypatch.setattr(builder, "set_grid_idx", lambda i, j, k: set_idx(*(d - 1 - v for d, v in
                                                                            zip(builder.grid_dim, (i, j, k)))))
    backward = outputs()
    for a, b in zip(forward, backward):
        assert torch.equal(a, b)
    assert torch.allclose(forward[0], r + x @ w.T, atol=1e-5)
    assert forward[3].tolist() == torch.argmax(logits, dim=-1).tolist()
    counters = _lib._COUNTERS.get(torch.device("cpu"))
    assert counters is not None and int(counters.abs().sum()) == 0


def _draw_cases():
    """(z [B, V] float32, k, top_p) rows: bf16-rounded logits (ties among and at the k-th value), a
    vocabulary over two passes of the kernel, 100 tokens tied at the k-th value past the
    candidates, an all-equal row, a single candidate."""
    from torch_impl.kernels.draw import BLOCK

    g = torch.Generator().manual_seed(5)
    wide = (torch.randn(8, 2 * BLOCK + 77, generator=g) * 3).to(torch.bfloat16).float()
    tied = torch.zeros(6, 500)
    tied[:, 100:200] = 5.0
    tied[::2, [7, 450]] = 6.0
    flat = torch.zeros(3, 300)
    return [(wide, 40, 0.95), (wide, 20, 0.5), (wide, 1, 0.9), (wide, 64, 1.0), (tied, 40, 0.305),
            (tied, 40, 0.955), (tied, 40, 1.0), (flat, 20, 0.9), (flat, 300, 0.5)]


def test_draw_is_the_torch_samplers_draw():
    """The draw kernel picks the token torch_impl.sampling's torch ops pick from the same candidates
    and uniforms: top-p over the candidates, the tied group at the k-th value (the t-th kept tied
    token, found by a second pass), the inverse of the cumulative weights."""
    from torch_impl import sampling
    from torch_impl.kernels.draw import draw_top_k

    g = torch.Generator().manual_seed(6)
    for z, k, top_p in _draw_cases():
        for _ in range(3):
            u = torch.rand(z.shape[0], 2, generator=g)
            vals, ids = sampling.candidates(z, k)
            want = sampling._draw_top_k(z, sampling._Candidates(z, vals, ids, top_p), u)
            got = draw_top_k(z.to(DEV), vals.contiguous().to(DEV), ids.contiguous().to(DEV), u.to(DEV), top_p)
            assert got.dtype == torch.int64
            assert got.cpu().tolist() == want.tolist(), (z.shape, k, top_p)
            kept = sampling.top_k_nucleus(z, k, top_p)
            assert kept.gather(-1, want[:, None]).all(), (z.shape, k, top_p)  # never outside the nucleus
    z = torch.zeros(2, 50)
    with pytest.raises(ValueError, match="vals"):
        draw_top_k(z, torch.zeros(2, 51), torch.zeros(2, 51, dtype=torch.int64), torch.zeros(2, 2), 0.9)
    with pytest.raises(ValueError, match="top_p"):
        draw_top_k(z, torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, 2), 0.0)


def test_fused_sampling_draws_the_same_tokens():
    """sample(fused=True) (the draw kernel) and the torch ops draw the same tokens from one seed."""
    from torch_impl.sampling import sample

    z = (torch.randn(5, 3000, generator=torch.Generator().manual_seed(1)) * 2).to(DEV)
    for top_k, top_p in ((40, 0.95), (20, 1.0), (5, 0.6)):
        a = sample(z, 0.7, top_k, top_p, torch.Generator(device=DEV).manual_seed(9))
        b = sample(z, 0.7, top_k, top_p, torch.Generator(device=DEV).manual_seed(9), fused=True)
        assert a.tolist() == b.tolist(), (top_k, top_p)


# ----- programmatic dependent launch (PDL) ----------------------------------------------------
# On CPU the launchers always pick PDL 0; these tests force the modes an H100 runs (1: release after
# the loads, 2: release first), with the device calls as interpreter no-ops that log who called them.

def _force_pdl(monkeypatch, mode):
    """Every launcher's PDL meta-parameters forced (mode 1 or 2; None: as on an H100, 2 for one token
    row); returns the log of launches [(kernel, grid, PDL)] and of gdc calls [(launch, program, call)]."""
    import importlib
    import pkgutil

    import triton.runtime.interpreter as interp

    from torch_impl.kernels import _jit

    picked = []  # the PDL of the next launch (0: a kernel without PDL)

    def meta(device, early=False):
        picked[:] = [mode or (2 if early else 1)]
        return {"PDL": picked[0], "launch_pdl": True}

    for info in pkgutil.iter_modules(K.__path__):
        mod = importlib.import_module(f"torch_impl.kernels.{info.name}")
        if hasattr(mod, "pdl_meta"):  # _lib (matmul_meta) and the launchers that import it
            monkeypatch.setattr(mod, "pdl_meta", meta)
    launches, calls = [], []
    builder = interp.interpreter_builder

    def log(call):
        return lambda: calls.append((len(launches) - 1, tuple(builder.grid_idx), call))

    # the interpreter has no gdc_wait / gdc_launch_dependents (it asks for a jit context)
    monkeypatch.setattr(_jit, "gdc_wait", log("wait"))
    monkeypatch.setattr(_jit, "gdc_launch_dependents", log("release"))
    run = interp.GridExecutor.__call__

    def logged_run(self, *args, **kwargs):
        launches.append([self.fn.__name__, None, picked.pop() if picked else 0])
        run(self, *args, **kwargs)
        launches[-1][1] = tuple(builder.grid_dim)

    monkeypatch.setattr(interp.GridExecutor, "__call__", logged_run)
    return launches, calls


def _check_gdc_calls(launches, calls):
    """Each program of each PDL launch waits for the previous kernel and releases the next exactly
    once: before its first wait in mode 2, after its last in mode 1; launches without PDL call neither."""
    for i, (name, grid, mode) in enumerate(launches):
        for program in itertools.product(*map(range, grid)):
            seq = [c for j, p, c in calls if j == i and p == program]
            where = f"{name} program {program} (PDL {mode}): {seq}"
            if mode == 0:
                assert not seq, where
                continue
            assert "wait" in seq and seq.count("release") == 1, where
            r = seq.index("release")
            assert (r == 0) if mode == 2 else (r == len(seq) - 1), where


def _decode_step_outputs(m, qkv_tiles, tiles, attn_tiles):
    """The fused ops of one decode step (Qwen3-0.6B shrunk, bf16, m sequences of ~40 cached tokens)."""
    from kernel_shapes import CPU_SHAPES

    s = CPU_SHAPES[0]
    g = torch.Generator().manual_seed(11 + m)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    x, nw = rnd(m, s.hidden), 1 + rnd(s.hidden, scale=0.1)
    w_qkv, w_o = rnd((s.hq + 2 * s.hkv) * s.d, s.hidden, scale=0.1), rnd(s.hidden, s.hq * s.d, scale=0.1)
    gu, dn = rnd(2 * s.inter, s.hidden, scale=0.1), rnd(s.hidden, s.inter, scale=0.1)
    bs = 64  # one block per sequence
    ctx = torch.tensor([37 + 3 * i for i in range(m)], dtype=torch.int32)
    tables = torch.arange(m, dtype=torch.int32)[:, None]
    qkv_meta = AttentionMeta(positions=(ctx - 1).long(), slots=(tables[:, 0] * bs + ctx - 1).long())
    q, kc, vc = K.rmsnorm_qkv(x, nw, w_qkv, 1 + rnd(s.d, scale=0.1), 1 + rnd(s.d, scale=0.1),
                              P.rope_table(128, s.d, THETA), rnd(m, bs, s.hkv, s.d), rnd(m, bs, s.hkv, s.d),
                              qkv_meta, num_heads=s.hq, num_kv_heads=s.hkv, eps=EPS, tiles=qkv_tiles)
    attn = K.decode_attention(q, kc, vc, AttentionMeta(context_lens=ctx, block_tables=tables), tiles=attn_tiles)
    h = K.linear_residual(attn.reshape(m, -1), w_o, x, tiles=tiles)
    out = K.mlp(h, nw, gu, dn, h, eps=EPS, tiles=tiles, down_tiles=tiles)
    return {"q": q, "k_cache": kc, "v_cache": vc, "decode_attention": attn, "linear_residual": h, "mlp": out,
            "rms_norm": K.rms_norm(out, nw, eps=EPS)}


# (tokens, qkv tiles, other projections' tiles, attention tiles (block_kv, splits)): one row
# (multiply-and-reduce, PDL 2 on an H100) and 5 rows on tensor-core tiles with K in 2 parts; qkv's
# block_n 32 < head_dim / 2 splits the heads (the qk epilogue)
PDL_CASES = [(1, (1, 32, 64, 1), (1, 64, 128, 1), (16, 2)), (5, (16, 32, 64, 2), (16, 64, 64, 2), (16, 2))]


@pytest.mark.skipif(DEV == "cuda", reason="forces the interpreter's PDL path (CPU only)")
@pytest.mark.parametrize("m,qkv,mm,attn", PDL_CASES, ids=["m1", "m5-split_k"])
def test_pdl_modes_change_no_output(monkeypatch, m, qkv, mm, attn):
    """Forced PDL 1 and 2 (as on an H100; CI never runs them): every fused op of the decode step
    gives bitwise the outputs of PDL 0, and every program waits and releases once."""
    from common.tiles import AttentionTiles, MatmulTiles

    tiles = [MatmulTiles(*t[:3], split_k=t[3]) if t else None for t in (qkv, mm)]
    args = (m, *tiles, AttentionTiles(attn[0], num_splits=attn[1]))
    want = _decode_step_outputs(*args)
    for mode in (1, 2):
        with monkeypatch.context() as patch:
            launches, calls = _force_pdl(patch, mode)
            got = _decode_step_outputs(*args)
        assert {"_rmsnorm_qkv_kernel", "_qk_epilogue_kernel", "_decode_attention_kernel", "_linear_residual_kernel",
                "_norm_gate_up_kernel", "_rms_norm_kernel"} <= {name for name, _, _ in launches}, launches
        assert {pdl for _, _, pdl in launches} == {mode}, launches
        _check_gdc_calls(launches, calls)
        for name, a in want.items():
            bad = (got[name].view(torch.int16) != a.view(torch.int16)).nonzero().tolist()
            assert not bad, f"{name}: {len(bad)} of {a.numel()} values differ with PDL {mode}, first at {bad[:3]}"


@pytest.mark.skipif(DEV == "cuda", reason="forces the interpreter's PDL path (CPU only)")
def test_greedy_decode_with_pdl_is_the_same(monkeypatch):
    """A tiny model's greedy decode (a prefill of 5 tokens, then one-row decode steps) picks the same
    tokens with PDL forced on as on an H100 (2 for one token row, else 1) as with PDL 0."""
    from common.config import Qwen3Config

    cfg = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                      dtype="float32", max_position_embeddings=512)

    def generate():
        return torch_impl.load_random(cfg, dtype="float32", fused=True, seed=1).generate([[9, 1, 200, 44, 7]], 4)

    want = generate()
    assert len(set(want[0])) > 1, want  # not a fixed point: a wrong step would show
    launches, calls = _force_pdl(monkeypatch, None)
    assert generate() == want
    assert {(name, pdl) for name, _, pdl in launches} >= {("_rmsnorm_qkv_kernel", 1), ("_rmsnorm_qkv_kernel", 2),
                                                          ("_decode_attention_kernel", 2)}, launches
    _check_gdc_calls(launches, calls)


@pytest.mark.parametrize("env,cap,on", [(None, (8, 9), False), (None, (9, 0), True), (None, (10, 0), True),
                                        ("0", (9, 0), False), ("1", (9, 0), True)])
def test_pdl_decision(monkeypatch, env, cap, on):
    """PDL runs on CUDA GPUs of compute capability >= 9.0 unless TORCH_IMPL_PDL=0; never on the CPU.
    One token row (the multiply-and-reduce tiles) gets PDL 2, tensor-core tiles PDL 1."""
    from common.tiles import MatmulTiles
    from torch_impl.kernels import _lib

    monkeypatch.setattr(_lib, "_PDL", {})  # the per-device decision is cached
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap)
    if env is None:
        monkeypatch.delenv("TORCH_IMPL_PDL", raising=False)
    else:
        monkeypatch.setenv("TORCH_IMPL_PDL", env)
    gpu = torch.device("cuda", 0)
    assert _lib.pdl_meta(gpu) == ({"PDL": 1, "launch_pdl": True} if on else {"PDL": 0})
    assert _lib.pdl_meta(gpu, early=True) == ({"PDL": 2, "launch_pdl": True} if on else {"PDL": 0})
    assert _lib.matmul_meta(MatmulTiles(1, 64, 128), 1, 256, gpu)["PDL"] == (2 if on else 0)
    assert _lib.matmul_meta(MatmulTiles(16, 64, 64), 19, 256, gpu)["PDL"] == (1 if on else 0)
    assert _lib.pdl_meta(torch.device("cpu"), early=True) == {"PDL": 0}
