"""Run by tests/test_torch_launchers.py in a process of its own (a 32-bit offset would read outside
the buffer and may crash it): the projection kernels where row * row stride passes 2^31.

x and the residual are 3-row views of one lazily allocated 8.6 GB buffer (only their rows are
touched) with a row stride that fits 32 bits (Triton passes it as int32); with 32-bit row offsets
row 2's address wraps below the buffer - what an int8 lm_head over 14,134 tokens of Qwen3's
151,936-row vocabulary, or a long prefill through the MLP, would do."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from common.formats import QWeight  # noqa: E402
from torch_impl import kernels as K  # noqa: E402

STRIDE = (1 << 30) + 64  # elements between rows: row 2 starts 2^31 + 128 elements in
K_IN, N = 64, 32

base = torch.empty(3 * STRIDE, dtype=torch.float32)  # virtual memory: pages are touched only where written
x = base.as_strided((3, K_IN), (STRIDE, 1))
res = base.as_strided((3, N), (STRIDE, 1), K_IN)
g = torch.Generator().manual_seed(0)
x.copy_(torch.randn(3, K_IN, generator=g))
res.copy_(torch.randn(3, N, generator=g))
w = torch.randn(N, K_IN, generator=g) * 0.1
want = res.clone() + x.clone() @ w.T
got = K.linear_residual(x, w, res)
err = (got - want).abs().max().item()
ok = err < 1e-4
print(f"linear_residual, rows {STRIDE} elements apart: max error {err:.2e}")
q = torch.randint(-127, 128, (N, K_IN), dtype=torch.int8, generator=g)
s = torch.rand(N, generator=g) * 0.01
want_q = x.clone() @ (q.float() * s[:, None]).T
got_q = K.linear_residual(x, QWeight(q, s, "int8"), None)
err_q = (got_q - want_q).abs().max().item()
ok &= err_q < 1e-4
print(f"linear_residual, int8 weights, no residual: max error {err_q:.2e}")
gate_up = torch.randn(2 * N, K_IN, generator=g) * 0.1
down = torch.randn(K_IN, N, generator=g) * 0.1
nw = torch.rand(K_IN, generator=g) + 0.5
xc = x.clone()
h = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + 1e-6) * nw
gu = h @ gate_up.T
want_m = xc + (torch.nn.functional.silu(gu[:, :N]) * gu[:, N:]) @ down.T
got_m = K.mlp(x, nw, gate_up, down, x, eps=1e-6)
err_m = (got_m - want_m).abs().max().item()
ok &= err_m < 1e-4
print(f"mlp: max error {err_m:.2e}")
sys.exit(0 if ok else 1)
