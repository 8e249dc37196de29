"""torch_impl's kernel launchers: bad input names the tensor, out-of-range slots are dropped, CPU needs
the interpreter, the decode-state update, and every kernel compiles for an H100 (sm_90) without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from common.ops import AttentionMeta  # noqa: E402
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
